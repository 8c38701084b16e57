"""Conversion streams: peak host memory stays near one float32 copy of the model (benchmarks/convert_memory.py,
~350 MB random model, each command in its own process). Slow (about a minute): run with `-m slow`."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "convert_memory.py"
# Measured on the 2-core CPU box: 1.2-1.6 (the fixed part, tensorstore's chunk buffers and one tensor in
# flight, weighs more on a small model). Holding a second copy of the model would give >= 2.
MAX_PEAK_ABOVE_BASELINE_PER_MODEL = 1.8


@pytest.mark.slow
def test_peak_memory_of_every_conversion_stays_below_two_copies(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_memory", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.main(["--work-dir", str(tmp_path)])
    for row in rows:
        ratio = (row["peak"] - row["baseline"]) / row["model_bytes"]
        assert ratio < MAX_PEAK_ABOVE_BASELINE_PER_MODEL, f"{row['step']}: (peak - baseline) / model = {ratio:.2f}"
