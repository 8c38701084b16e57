"""Peak host memory (RSS) of `convert from-hf` and `convert to-hf` on a few-hundred-MB random model.

Each command runs in its own child process; its peak RSS is the child's `ru_maxrss` (os.wait4).
The parent stays small (the random model is written by another child): a forked child's maxrss
starts from the parent's resident size. Baseline: a child that only imports jax and the converter.
Prints the markdown table recorded in docs/PERFORMANCE.md (## Conversion).

  python benchmarks/convert_memory.py            # ~350 MB float32 model
  python benchmarks/convert_memory.py --small    # ~40 MB, a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from af_next_jax.config import DecoderConfig, EncoderConfig, ModelConfig

# ~89M parameters = ~355 MB in float32; the embedding and lm_head are the largest tensors (98 MB each),
# as in the real model where they are the largest too.
BENCHMARK_CONFIG = ModelConfig(
    encoder=EncoderConfig(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    decoder=DecoderConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=4, num_heads=12,
                          num_kv_heads=4, head_dim=64, rope_theta=1e6, max_position_embeddings=4096),
    audio_token_id=31997, audio_bos_token_id=31998, audio_eos_token_id=31999)
SMALL_CONFIG = BENCHMARK_CONFIG.replace(
    decoder=dataclasses.replace(BENCHMARK_CONFIG.decoder, vocab_size=4096, num_layers=2),
    encoder=dataclasses.replace(BENCHMARK_CONFIG.encoder, num_layers=2),
    audio_token_id=4093, audio_bos_token_id=4094, audio_eos_token_id=4095)

# The interpreter with jax and the converter imported: what every conversion holds before its first tensor.
BASELINE_CODE = "import jax; from af_next_jax.convert import cli, hf_export, hf_import, orbax_io, verify"


def write_random_hf_dir(config: ModelConfig, hf_dir: Path, shard_bytes: int = 150 * 2**20) -> int:
    """A MusicFlamingo directory of random float32 tensors, written with safetensors' own writer."""
    from safetensors.numpy import save_file
    from af_next_jax.convert.checks import expected_shapes
    from af_next_jax.convert.hf_config import to_hf_config
    from af_next_jax.convert.mapping import model_rules
    rng = np.random.default_rng(0)
    shapes = expected_shapes(config)
    hf_dir.mkdir(parents=True)
    shards, current, current_bytes = [], {}, 0
    for rule in model_rules(config):
        shape = shapes[rule.path][1:] if rule.num_layers else shapes[rule.path]
        for key in rule.hf_keys():
            tensor = np.ascontiguousarray(rule.to_hf(rng.standard_normal(shape, dtype=np.float32) * 0.02))
            if current and current_bytes + tensor.nbytes > shard_bytes:
                shards.append(current)
                current, current_bytes = {}, 0
            current[key] = tensor
            current_bytes += tensor.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(hf_dir / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        total += sum(t.nbytes for t in shard.values())
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (hf_dir / "config.json").write_text(json.dumps(to_hf_config(config)))
    return total


def peak_rss_bytes(argv: list[str]) -> int:
    """Run argv in a child process; return its peak resident set size."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    return usage.ru_maxrss * 1024  # KiB on Linux


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(config: ModelConfig, work: Path) -> list[dict]:
    convert = [sys.executable, "-m", "af_next_jax.convert"]
    hf_dir = work / "hf_f32"
    peak_rss_bytes([sys.executable, __file__, "--write-model", str(hf_dir)] + (["--small"] if config is SMALL_CONFIG else []))
    baseline = peak_rss_bytes([sys.executable, "-c", BASELINE_CODE])
    steps = [
        ("from-hf (float32 safetensors -> orbax)", hf_dir,
         ["from-hf", "--hf-dir", hf_dir, "--out", work / "ckpt", "--quiet"], work / "ckpt"),
        ("to-hf --dtype float32 (orbax -> safetensors)", work / "ckpt",
         ["to-hf", "--checkpoint", work / "ckpt", "--out", work / "out_f32", "--dtype", "float32", "--quiet"],
         work / "out_f32"),
        ("to-hf --dtype bfloat16", work / "ckpt",
         ["to-hf", "--checkpoint", work / "ckpt", "--out", work / "out_bf16", "--dtype", "bfloat16", "--quiet"],
         work / "out_bf16"),
        ("from-hf (bfloat16 safetensors -> float32 orbax)", work / "out_bf16",
         ["from-hf", "--hf-dir", work / "out_bf16", "--out", work / "ckpt_bf16", "--quiet"], work / "ckpt_bf16"),
    ]
    rows = []
    model_bytes = directory_bytes(hf_dir) - sum(directory_bytes(p) for p in hf_dir.glob("*.json"))
    for name, source, argv, output in steps:
        peak = peak_rss_bytes(convert + [str(a) for a in argv])
        rows.append({"step": name, "input_bytes": directory_bytes(source), "output_bytes": directory_bytes(output),
                     "model_bytes": model_bytes, "peak": peak, "baseline": baseline})
    return rows


def table(rows: list[dict]) -> str:
    """Ratios are against the float32 model (safetensors bytes), the size the converter holds in memory."""
    mib = 2**20
    lines = ["| step | input | output | peak RSS | peak / model | peak - baseline | (peak - baseline) / model |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        above = r["peak"] - r["baseline"]
        lines.append(f"| {r['step']} | {r['input_bytes'] / mib:.0f} MiB | {r['output_bytes'] / mib:.0f} MiB | "
                     f"{r['peak'] / mib:.0f} MiB | {r['peak'] / r['model_bytes']:.2f} | {above / mib:.0f} MiB | "
                     f"{above / r['model_bytes']:.2f} |")
    r = rows[0]
    lines.append(f"\nfloat32 model: {r['model_bytes'] / mib:.0f} MiB of safetensors; baseline (python + jax + the "
                 f"converter imported): {r['baseline'] / mib:.0f} MiB")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a ~40 MB model instead of ~350 MB")
    parser.add_argument("--work-dir", help="where to write the model and checkpoints (default: a temp dir)")
    parser.add_argument("--write-model", help=argparse.SUPPRESS)  # internal: the child that writes the model
    args = parser.parse_args(argv)
    config = SMALL_CONFIG if args.small else BENCHMARK_CONFIG
    if args.write_model:
        write_random_hf_dir(config, Path(args.write_model))
        return []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        rows = measure(config, Path(work))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
