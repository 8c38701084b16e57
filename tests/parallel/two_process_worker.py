"""One process of the two-process test: 4 CPU devices each, joined with jax.distributed on 127.0.0.1.

Run by test_two_processes.py as `python two_process_worker.py PORT PROCESS_ID OUT.npz`; also imported
there for `attention_layer_loss`, the function both the 2 x 4 and the 1 x 8 runs evaluate.
"""

import os
import sys

import numpy as np

BATCH, LENGTH, WIDTH, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 32, 8, 2, 8


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, LENGTH, WIDTH), dtype=np.float32)
    target = rng.standard_normal((BATCH, LENGTH, HEADS, HEAD_DIM), dtype=np.float32)
    segment_ids = np.repeat(np.array([[1] * 40 + [2] * 24]), BATCH, axis=0).astype(np.int32)
    params = {name: 0.2 * rng.standard_normal((WIDTH, heads * HEAD_DIM), dtype=np.float32)
              for name, heads in (("query", HEADS), ("key", KV_HEADS), ("value", KV_HEADS))}
    return params, x, target, segment_ids


def attention_layer_loss(params, x, target, segment_ids):
    """Project, zigzag-permute, hybrid sequence-parallel attention, un-permute, squared error."""
    from af_next_jax.parallel import from_load_balanced, to_load_balanced
    from af_next_jax.attention.sequence_parallel import sequence_parallel_attention

    def project(name, heads):
        return (x @ params[name]).reshape(BATCH, LENGTH, heads, HEAD_DIM)

    query, key, value = project("query", HEADS), project("key", KV_HEADS), project("value", KV_HEADS)
    query, key, value, segments = (to_load_balanced(t) for t in (query, key, value, segment_ids))
    out = sequence_parallel_attention(query, key, value, implementation="hybrid", causal=True,
                                      segment_ids_q_BxL=segments, segment_ids_kv_BxS=segments)
    return ((from_load_balanced(out) - target) ** 2).mean()


def sharded_loss_and_grads(mesh, make_global):
    """Loss and parameter gradients on `mesh`, inputs placed by `make_global(array, spec)`."""
    import jax
    from jax.sharding import PartitionSpec as P

    params, x, target, segment_ids = inputs()
    with jax.set_mesh(mesh):
        params = {name: make_global(value, P()) for name, value in params.items()}
        x = make_global(x, P(None, ("ring", "ulysses")))
        target = make_global(target, P(None, ("ring", "ulysses")))
        segment_ids = make_global(segment_ids, P(None, ("ring", "ulysses")))
        return jax.jit(jax.value_and_grad(attention_layer_loss))(params, x, target, segment_ids)


def main(port, process_id, out_path):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding

    from af_next_jax.parallel import MeshConfig, make_mesh
    from af_next_jax.train import launch

    # The trainer's explicit launch (--coordinator/--num-processes/--process-id): gloo collectives on
    # CPU, then jax.distributed; peers find each other through process 0's coordinator address.
    joined = launch.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
    assert (joined.cluster, joined.num_processes, joined.process_id) == ("explicit", 2, process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    # Ulysses inside a process ("node"), the ring across the two processes (a DCN axis).
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, ulysses=4, dcn_ring=2))

    def make_global(array, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    loss, grads = sharded_loss_and_grads(mesh, make_global)
    loss, grads = multihost_utils.process_allgather((loss, grads), tiled=True)
    if process_id == 0:
        np.savez(out_path, loss=np.asarray(loss), **{k: np.asarray(v) for k, v in grads.items()})
    launch.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
