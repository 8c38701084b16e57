"""Checkpointer: fallback past a corrupted latest step, and restoring onto another device count."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.train.checkpointing import Checkpointer


def _state(value: float, sharding=None) -> dict:
    params = jnp.full((8, 4), value, jnp.float32)
    if sharding is not None:
        params = jax.device_put(params, sharding)
    return {"params": params, "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(sharding) -> dict:
    return {"params": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(sharding.mesh, P()))}


def _single_device_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    return NamedSharding(mesh, P("fsdp"))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog):
    sharding = _single_device_sharding()
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _state(step, sharding), f'{{"position": {step}}}'.encode())
    checkpointer.wait()
    # Truncate every array file of the latest step (a disk that filled up mid-write).
    for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as handle:
                handle.truncate(3)
    with caplog.at_level(logging.WARNING):
        step, state, data_state = checkpointer.restore_latest(_abstract(sharding))
    assert step == 1 and int(state["step"]) == 1 and data_state == b'{"position": 1}'
    np.testing.assert_array_equal(state["params"], 1.0)
    assert "falling back" in caplog.text
    assert os.listdir(tmp_path / "corrupt_checkpoints")  # kept for inspection, out of the way
    # Training continues: step 2 can be written again.
    assert checkpointer.save(2, _state(2, sharding), b"{}", force=True)
    checkpointer.close()


def test_checkpoint_saved_on_eight_devices_restores_onto_two(tmp_path):
    eight = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    saved = _state(3.0, NamedSharding(eight, P("fsdp")))
    saved["params"] = saved["params"] + jnp.arange(32, dtype=jnp.float32).reshape(8, 4)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=2, async_save=True)
    checkpointer.save(3, saved, None)
    checkpointer.wait()
    target = NamedSharding(two, P("fsdp"))
    step, restored, data_state = checkpointer.restore_latest(_abstract(target))
    checkpointer.close()
    assert step == 3 and data_state is None
    assert restored["params"].sharding == target and len(restored["params"].addressable_shards) == 2
    np.testing.assert_array_equal(restored["params"], saved["params"])
