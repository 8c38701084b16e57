"""Sequence parallelism's claim, compiled: stage 4's step with the sequence and the chips grown together.

    python benchmarks/scaling.py --recompile-sequence-scaling   # compile the four points (minutes each)

Stage 4 (experiments/af_next_stage4_long_context.py) on v5p-16, -32, -64 and -128 (8 to 64 chips):
Ulysses 4 inside, the ring over the rest (chips / 4), the batch of 8 rows kept, and the sequence grown
with the chips, 4,096 tokens per chip per row (32K to 256K); the window slots grow with it, one block
of slots per sequence slice, as the experiment lays them out (experiments/common.py `window_slots`).
Every layer has the same shapes at every point, so the step is compiled with `LAYERS` decoder and encoder layers to keep the compiles short;
the remat policy is the experiment's. Per chip, from libtpu's compile: the temporaries (activations and
the collectives' buffers: what sequence parallelism must keep flat), the live peak, and the bytes each
kind of collective moves in one step (`af_next_jax.compile.hlo_counts`: loops counted by trip count).
Parameters and optimizer state shrink as chips are added (they are sharded over all of them) and are
shown apart.

The second table splits the collective bytes by where they come from (the op_name of each collective):
Ulysses' all-to-alls, the ring's K/V tour, the audio merge's block swap and hops, and everything
else (FSDP's weight gathers and gradient reductions, the loss's lm_head gather, the embedding's
gradient). One of them cannot be flat at a fixed number of tokens per chip: every chip's queries must
meet every K/V block of its row, so the ring's bytes per chip grow with the sequence, as the attention
FLOPs per chip do (both shown, and their ratio). The merge's loops run as many hops as the data needs
(model/audio_merge.py): one when every window sits in the block of the slice holding its first token,
as the data pipeline places them (data/packing.py). XLA cannot know that count, so hlo_counts counts
those two loops (forward and backward) once: one hop, the figure for the pipeline's batches.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import sys

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sequence_scaling.json")

CHIPS = (8, 16, 32, 64)
TOKENS_PER_CHIP_PER_ROW = 4096
ULYSSES = 4
LAYERS = 4
FLAT = 0.05                 # the goal: temporaries and collective bytes per chip within 5% across the points
# Where a collective comes from, by the text of its op_name (hlo_counts.count's scopes).
SCOPES = {"attention": "layers/attention/shard_map", "audio merge": "embed_audio_and_text/shard_map"}


def overrides(stage4_config, chips: int) -> list[str]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    from common import window_slots

    seq_len = TOKENS_PER_CHIP_PER_ROW * chips
    windows = window_slots(stage4_config.data.batch_size, seq_len, chips, slot_blocks=chips)  # data 1, fsdp 1
    return [f"mesh.ring={chips // ULYSSES}", f"mesh.ulysses={ULYSSES}", "mesh.fsdp=-1", "mesh.data=1",
            f"data.seq_len={seq_len}", f"data.max_windows_per_batch={windows}", f"target_topology=v5p-{2 * chips}"]


def point_config(load_config, spec: str, chips: int, extra=()):
    """Stage 4's config at `chips`, with LAYERS decoder and encoder layers."""
    import ml_collections

    config = load_config(spec, overrides(load_config(spec), chips) + list(extra))
    with config.unlocked():
        config.model.decoder = ml_collections.ConfigDict({"num_layers": LAYERS})
        config.model.encoder = ml_collections.ConfigDict({"num_layers": LAYERS})
    return config


def load_points(path: str = CACHE) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        return json.load(file)


def save_points(points: dict, path: str = CACHE) -> None:
    with open(path, "w") as file:
        json.dump(points, file, indent=1, sort_keys=True)
        file.write("\n")


def compile_points(load_config, spec: str, extra: list[str], figures_of, versions, hlo_dir=None,
                   commit: str = "unknown") -> None:
    """Compile each point (with the `extra` config overrides) and store it in CACHE, by chips."""
    from af_next_jax.compile.report import bytes_per_device
    from af_next_jax.compile.steps import compile_experiment
    from af_next_jax.compile.topology import parse_topology, topology_devices

    for chips in CHIPS:
        config = point_config(load_config, spec, chips, extra)
        topology = parse_topology(config.target_topology, 1)
        print(f"compiling stage 4 at {chips} chips ({config.data.seq_len} tokens a row) ...", flush=True)
        result = compile_experiment(config, topology_devices(topology), with_eval=False)
        hlo = result.train.compiled.as_text()
        if hlo_dir:
            os.makedirs(hlo_dir, exist_ok=True)
            with gzip.open(os.path.join(hlo_dir, f"sequence_scaling_{chips}.hlo.gz"), "wt") as out:
                out.write(hlo)
        inputs = result.train.inputs
        points = load_points()
        points[str(chips)] = {
            "topology": topology.name, "seq_len": config.data.seq_len, "windows": config.data.max_windows_per_batch,
            "mesh": {k: v for k, v in result.mesh_sizes.items() if v > 1}, "remat": config.model.remat_policy,
            "train": figures_of(result.train),
            "state_bytes": bytes_per_device(inputs["parameters"]) + bytes_per_device(inputs["optimizer state"]),
            **counted(hlo, config, chips), "versions": versions(), "commit": commit, "date": datetime.date.today().isoformat()}
        save_points(points)


def attention_flops(config, chips: int) -> float:
    """The attention cores' analytic FLOPs of one step per chip (they run in kernels the HLO cannot count)."""
    from af_next_jax.experiment import experiment_from
    from af_next_jax.experiment.program import step_flops

    experiment = experiment_from(config)
    return (step_flops(experiment, attention=True) - step_flops(experiment, attention=False)) / chips


def counted(hlo: str, config, chips: int) -> dict:
    """A point's figures read from its compiled HLO, and the analytic attention FLOPs beside them."""
    from af_next_jax.compile import hlo_counts

    counts = hlo_counts.count(hlo, SCOPES)
    return {"collective_bytes": counts.collective_bytes, "matmul_flops": counts.matmul_flops,
            "collective_bytes_by_scope": counts.collective_bytes_by_scope,
            "attention_flops": attention_flops(config, chips), "unknown_loops": len(counts.unknown_loops)}


def recount_points(load_config, spec: str, extra: list[str], hlo_dir: str) -> None:
    """Count each point's collectives (by scope) again from the HLO `compile_points` kept in `hlo_dir`."""
    points = load_points()
    for chips in list(points):
        path = os.path.join(hlo_dir, f"sequence_scaling_{chips}.hlo.gz")
        if not os.path.exists(path):
            continue
        with gzip.open(path, "rt") as text:
            points[chips].update(counted(text.read(), point_config(load_config, spec, int(chips), extra), int(chips)))
    save_points(points)


def _by_source(point: dict) -> dict[str, float]:
    """GiB per step by source: Ulysses, the ring's K/V, the audio merge, everything else."""
    scopes = point.get("collective_bytes_by_scope", {})
    attention = scopes.get("attention", {})
    ring = attention.get("collective-permute", 0)
    ulysses = sum(attention.values()) - ring
    merge = sum(scopes.get("audio merge", {}).values())
    rest = sum(point["collective_bytes"].values()) - ring - ulysses - merge
    return {"Ulysses": ulysses / 2**30, "ring K/V": ring / 2**30, "audio merge": merge / 2**30,
            "everything else": rest / 2**30}


def source_table(points: dict) -> list[str]:
    chips_sorted = sorted(points, key=int)
    if not all("collective_bytes_by_scope" in points[chips] for chips in chips_sorted):
        return ["(Collective bytes by source: not counted yet; `python benchmarks/scaling.py --recount DIR`.)"]
    lines = ["| chips | Ulysses all-to-all GiB | ring K/V GiB | audio merge GiB | everything else GiB | "
             "attention TFLOPs / chip | ring GiB per attention PFLOP |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for chips in chips_sorted:
        point, sources = points[chips], _by_source(points[chips])
        attention = point["attention_flops"]
        cells = [f"{sources[source]:.2f}" for source in ("Ulysses", "ring K/V", "audio merge", "everything else")]
        lines.append(f"| {chips} | {' | '.join(cells)} | {attention / 1e12:.0f} | "
                     f"{sources['ring K/V'] / (attention / 1e15):.2f} |")
    return lines


def section(points: dict) -> str:
    lines = ["### Sequence parallelism: stage 4 with the sequence and the chips grown together", "", " ".join(
        __doc__.split("\n\n")[2:]).replace("\n", " ").strip(), ""]
    if not points:
        return "\n".join(lines + ["Not compiled yet (`python benchmarks/scaling.py --recompile-sequence-scaling`)."])
    kinds = sorted({kind for point in points.values() for kind in point["collective_bytes"]})
    commits = sorted({point.get("commit", "unknown") for point in points.values()})
    lines += [f"Compiled at commit {', '.join(commits)}.", ""]
    lines += ["| target | chips | mesh | tokens a row | windows / chip | temporaries GiB | live peak GiB | "
              "parameters + optimizer GiB | " + " | ".join(f"{kind} GiB" for kind in kinds) + " | matmul TFLOPs |",
              "|---|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(kinds) + "---:|"]
    for chips in sorted(points, key=int):
        point = points[chips]
        train = point["train"]
        lines.append(f"| {point['topology']} | {chips} | {' x '.join(f'{k} {v}' for k, v in point['mesh'].items())} | "
                     f"{point['seq_len']:,} | {point['windows'] // int(chips)} | {train['temp_size_in_bytes'] / 2**30:.2f} | "
                     f"{train['peak_memory_in_bytes'] / 2**30:.2f} | {point['state_bytes'] / 2**30:.2f} | "
                     + " | ".join(f"{point['collective_bytes'].get(kind, 0) / 2**30:.2f}" for kind in kinds)
                     + f" | {point['matmul_flops'] / 1e12:.1f} |")
    unknown = sum(point.get("unknown_loops", 0) for point in points.values())
    lines += ["", spread_line(points, kinds)] + ([f"({unknown} loops of unreadable trip count counted once: "
                                                  f"the audio merge's, at one hop.)"] if unknown else [])
    return "\n".join(lines + [""] + source_table(points))


def growth(values: list[float]) -> float:
    """How much the largest value exceeds the first (the smallest mesh's): per-chip cost that shrinks as
    chips are added (the sharded state) is not growth."""
    return max(values) / values[0] - 1 if values[0] > 0 else float("inf")


def spread_line(points: dict, kinds: list[str]) -> str:
    ordered = [points[chips] for chips in sorted(points, key=int)]
    verdict = lambda value: f"{value:+.1%} ({'flat' if value <= FLAT else '**not flat**'})"  # noqa: E731
    temps = [p["train"]["temp_size_in_bytes"] for p in ordered]
    peaks = [p["train"]["peak_memory_in_bytes"] for p in ordered]
    moved = [sum(p["collective_bytes"].values()) for p in ordered]
    line = (f"Growth over the smallest point, per chip (goal: within {FLAT:.0%}): temporaries "
            f"{verdict(growth(temps))}, live peak {verdict(growth(peaks))}, bytes moved by collectives "
            f"{verdict(growth(moved))}")
    if all("collective_bytes_by_scope" in p for p in ordered):
        sources = [_by_source(p) for p in ordered]
        line += (f"; without the ring's K/V (next table) "
                 f"{verdict(growth([s['Ulysses'] + s['audio merge'] + s['everything else'] for s in sources]))}")
    return line + "."
