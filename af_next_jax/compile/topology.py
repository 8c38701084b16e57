"""TPU topology names users know (v5p-256, v5e-16, ...) -> libtpu's compile-only devices.

Cloud TPU names count TensorCores for v4 and v5p (two per chip, fused into one "megacore" device)
and chips for v5e and v6e. libtpu wants a chip grid instead (`v5p:4x8x8`), which
`jax.experimental.topologies.get_topology_desc` turns into devices that can be compiled for but
never run: the compiler needs no TPU, only the libtpu wheel (`pip install -e ".[tpu]"`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str                 # the user-facing prefix: v5p in "v5p-256"
    libtpu_name: str          # the prefix of libtpu's topology string
    cores_per_chip: int       # how many TensorCores the user-facing count counts per chip
    dims: int                 # 3 (twisted torus) or 2 (grid)
    hbm_bytes_per_chip: int   # one device's memory budget (one megacore device = one chip)
    max_chips: int            # the largest single slice
    libtpu_options: tuple = ()  # extra get_topology_desc arguments


GENERATIONS = {
    # v4 compiles per TensorCore unless asked for megacore chips, as Cloud TPU runs it.
    "v4": Generation("v4", "v4", 2, 3, 32 * GIB, 4096, (("chip_config_name", "megacore"),)),
    "v5p": Generation("v5p", "v5p", 2, 3, 95 * GIB, 8960),
    "v5e": Generation("v5e", "v5e", 1, 2, 16 * GIB, 256),
    "v6e": Generation("v6e", "v6e", 1, 2, 32 * GIB, 256),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                 # as the user wrote it: "v5p-256"
    generation: Generation
    chips: int                # per slice
    grid: tuple[int, ...]     # chips per slice as libtpu's grid: (4, 8, 8)
    slices: int = 1

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.libtpu_name}:{'x'.join(map(str, self.grid))}"

    @property
    def devices_total(self) -> int:
        return self.chips * self.slices

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes_per_chip

    def describe(self) -> str:
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return f"{self.name}{slices} ({self.libtpu_name}, {self.devices_total} chips, " \
               f"{self.hbm_bytes / GIB:.0f} GiB HBM each)"


def _grid_3d(chips: int) -> tuple[int, int, int] | None:
    """The most cube-like a x b x c grid (a <= b <= c): powers of two below 64 chips (2x2x1 .. 2x4x4),
    multiples of 4 from 64 chips on (full 4x4x4 cubes, as Cloud TPU slices are built)."""
    step = 4 if chips >= 64 else 1
    best = None
    for a in range(step, round(chips ** (1 / 3)) + step + 1, step):
        for b in range(a, int(math.isqrt(chips // a)) + step + 1, step):
            if chips % (a * b):
                continue
            c = chips // (a * b)
            if c < b or (step == 4 and c % 4) or (step == 1 and (c & (c - 1) or a & (a - 1) or b & (b - 1))):
                continue
            if best is None or c / a < best[2] / best[0]:
                best = (a, b, c)
    if chips == 4:
        return (2, 2, 1)
    return best


def _grid_2d(chips: int) -> tuple[int, int] | None:
    """a x b with a <= b <= 2a, powers of two (1x1, 2x2, 2x4, 4x4, ..., 16x16)."""
    if chips & (chips - 1):
        return None
    a = 1 << (chips.bit_length() - 1) // 2
    return (a, chips // a)


def valid_sizes(generation: Generation, limit: int = 12) -> list[str]:
    """Some valid names of a generation, for error messages."""
    chips = [1, 4, 8, 16, 32, 64, 128, 256] if generation.dims == 2 else [4, 8, 16, 32, 64, 128, 256, 512, 1024]
    return [f"{generation.name}-{c * generation.cores_per_chip}" for c in chips if c <= generation.max_chips][:limit]


def parse_topology(name: str, slices: int = 1) -> Topology:
    """"v5p-256" (TensorCores for v4/v5p, chips for v5e/v6e) -> Topology; ValueError names valid ones."""
    match = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", name.strip().lower())
    generation = GENERATIONS.get(match.group(1)) if match else None
    if generation is None:
        raise ValueError(f"unknown TPU topology {name!r}; use GENERATION-SIZE with GENERATION one of "
                         f"{sorted(GENERATIONS)}, e.g. {', '.join(valid_sizes(GENERATIONS['v5p'], 6))}, v5e-16, v6e-64")
    if slices < 1:
        raise ValueError(f"--slices must be >= 1, got {slices}")
    size = int(match.group(2))
    chips, remainder = divmod(size, generation.cores_per_chip)
    grid = None
    if not remainder and 0 < chips <= generation.max_chips:
        grid = _grid_3d(chips) if generation.dims == 3 else _grid_2d(chips)
    if grid is None:
        raise ValueError(f"{name!r} is not a {generation.name} slice shape this tool knows; valid sizes include "
                         f"{', '.join(valid_sizes(generation))}")
    return Topology(name, generation, chips, grid, slices)


def topology_devices(topology: Topology) -> list:
    """Compile-only libtpu devices of the topology (slice-major when multislice)."""
    # libtpu takes a host-wide lock meant for processes sharing real chips; compile-only devices share
    # nothing, and two compiles (a test run and this tool) must not refuse each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        kwargs = dict(topology.generation.libtpu_options)
        if topology.slices > 1:
            kwargs["num_slices"] = topology.slices
        description = topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs)
    except Exception as error:  # no libtpu: say how to get it, in one line
        raise RuntimeError(f"cannot build TPU topology {topology.libtpu_name} ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}); install the compiler with "
                           f"`pip install -e \".[tpu]\"` (libtpu, no TPU needed)") from error
    devices = list(description.devices)
    if len(devices) != topology.devices_total:
        raise RuntimeError(f"libtpu returned {len(devices)} devices for {topology.libtpu_name} x {topology.slices}, "
                           f"expected {topology.devices_total} (one per chip)")
    return devices
