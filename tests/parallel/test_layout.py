"""The zigzag layout for causal load balancing (layout.py): order, inverse, balance, sharded moves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.parallel import MeshConfig, from_load_balanced, make_mesh, to_load_balanced
from af_next_jax.parallel.layout import zigzag_chunk_order


def test_zigzag_gives_each_ring_rank_one_early_and_one_late_chunk():
    assert zigzag_chunk_order(4).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]


def test_from_load_balanced_inverts_to_load_balanced():
    x = np.arange(2 * 48 * 3).reshape(2, 48, 3)
    balanced = to_load_balanced(x, axis=1, ring_degree=3)
    assert not np.array_equal(balanced, x)
    np.testing.assert_array_equal(from_load_balanced(balanced, axis=1, ring_degree=3), x)


def test_ring_degree_one_is_the_identity():
    x = np.arange(10)
    assert to_load_balanced(x, axis=0, ring_degree=1) is x
    assert to_load_balanced(x, axis=0) is x  # no mesh: ring degree 1


def test_every_ring_rank_gets_the_same_causal_work():
    ring_degree, length = 4, 64
    positions = np.asarray(to_load_balanced(np.arange(length), axis=0, ring_degree=ring_degree))
    visible_pairs = [int(sum(p + 1 for p in shard)) for shard in np.split(positions, ring_degree)]
    assert len(set(visible_pairs)) == 1, visible_pairs
    contiguous = [int(sum(p + 1 for p in shard)) for shard in np.split(np.arange(length), ring_degree)]
    assert max(contiguous) > 3 * min(contiguous)  # what the layout fixes


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1, fsdp=1, ring=8), MeshConfig(data=1, fsdp=1, ring=2, ulysses=4),
                                         MeshConfig(data=2, fsdp=1, ring=2, ulysses=2)],
                         ids=["ring8", "ring2-ulysses4", "data2-ring2-ulysses2"])
def test_sharded_permutation_equals_the_global_gather_and_moves_only_local_shards(mesh_config):
    x = np.arange(2 * 64 * 3, dtype=np.float32).reshape(2, 64, 3)
    mesh = make_mesh(mesh_config)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), ("ring", "ulysses")))
    with jax.set_mesh(mesh):
        permute = jax.jit(lambda v: to_load_balanced(v, axis=1), out_shardings=sharding)
        balanced = permute(jax.device_put(x, sharding))
        restored = jax.jit(lambda v: from_load_balanced(v, axis=1))(balanced)
        hlo = permute.lower(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)).compile().as_text()
    np.testing.assert_array_equal(balanced, to_load_balanced(x, axis=1, ring_degree=mesh_config.ring))
    np.testing.assert_array_equal(restored, x)
    assert "all-gather" not in hlo and "collective-permute" in hlo
