"""Helpers shared by the input-pipeline tests (tests/data/test_pipeline.py, test_shards.py)."""

from __future__ import annotations

import numpy as np

from af_next_jax.data.pipeline import DataConfig, make_batch_iterator


def small_config(demo_dir, sources, **changes) -> DataConfig:
    """The demo data's pipeline config at test size; `sources` are manifests and/or shard patterns."""
    base = DataConfig(manifests=tuple(sources), tokenizer=str(demo_dir / "tokenizer.json"), seq_len=512,
                      batch_size=2, max_windows_per_batch=8, num_threads=1, seed=3, process_index=0, process_count=1)
    return base.replace(**changes)


def take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for step, (a, b) in enumerate(zip(first, second)):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"step {step}: {name}")


def assert_restored_iterator_continues_exactly(config: DataConfig, model_config) -> None:
    """Two batches, save the state, three more; a new iterator restored from the state gives those three."""
    iterator = make_batch_iterator(config, model_config)
    take(iterator, 2)
    state = iterator.get_state()
    expected = take(iterator, 3)
    iterator.close()
    restored = make_batch_iterator(config, model_config)
    restored.set_state(state)
    assert_same_batches(take(restored, 3), expected)
    restored.close()
