"""hlo_counts: matmul FLOPs and collective bytes of one step, loops weighted by their trip counts, from
the CPU's HLO text (operand shapes inline, XLA's known_trip_count) and libtpu's (matmuls written as
convolutions, operands by name, the trip count only in the loop condition)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from af_next_jax.compile import hlo_counts
from af_next_jax.compile.topology import parse_topology, topology_devices

LAYERS, ROWS, WIDTH, HEADS, HEAD_DIM = 6, 64, 128, 4, 32


def _loss(per_layer_remat: bool):
    """A scanned stack of q-projection-like layers: [rows, width] @ [width, heads, head_dim] -> back."""
    def layer(x, weights):
        w_in, w_out = weights
        heads = jnp.einsum("rd,dhk->rhk", x, w_in)
        return jnp.tanh(jnp.einsum("rhk,hkd->rd", heads, w_out)), None

    body = jax.checkpoint(layer) if per_layer_remat else layer
    return lambda x, w_in, w_out: jax.lax.scan(body, x, (w_in, w_out))[0].sum()


def _arguments(dtype=jnp.float32):
    return (jax.ShapeDtypeStruct((ROWS, WIDTH), dtype), jax.ShapeDtypeStruct((LAYERS, WIDTH, HEADS, HEAD_DIM), dtype),
            jax.ShapeDtypeStruct((LAYERS, HEADS, HEAD_DIM, WIDTH), dtype))


FORWARD = LAYERS * 2 * (2 * ROWS * WIDTH * HEADS * HEAD_DIM)    # two matmuls per layer


@pytest.mark.parametrize("remat, passes", [(False, 3), (True, 4)])  # forward + 2 backward (+ the recompute)
def test_cpu_gradient_counts_every_layer_and_the_recompute(remat, passes):
    step = jax.jit(jax.grad(_loss(remat), argnums=(1, 2)))
    counts = hlo_counts.count(step.lower(*_arguments()).compile().as_text())
    assert counts.matmul_flops == passes * FORWARD and not counts.unknown_loops


def test_tpu_gradient_counts_convolutions_and_the_loop_condition_bound():
    devices = np.array(topology_devices(parse_topology("v5p-8", 1))).reshape(-1)
    mesh = Mesh(devices, ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    step = jax.jit(jax.grad(_loss(True), argnums=(1, 2)), in_shardings=(rows, replicated, replicated))
    counts = hlo_counts.count(step.lower(*_arguments(jnp.bfloat16)).compile().as_text())
    assert counts.matmul_flops == 4 * FORWARD / len(devices)        # rows split over the chips
    weight_bytes = LAYERS * 2 * WIDTH * HEADS * HEAD_DIM * 2     # bf16 gradients, summed over the chips
    assert counts.collective_bytes == {"all-reduce": weight_bytes} and not counts.unknown_loops


def test_a_loop_without_a_readable_bound_counts_once_and_is_named_unless_xla_wrote_its_trip_count():
    """And an async collective counts the array it delivers once."""
    text = """HloModule m
%cond (p: (s32[])) -> pred[] {
  %p = (s32[]) parameter(0)
  ROOT %r = pred[] custom-call(%p), custom_call_target="opaque"
}
%body (p: (s32[])) -> (s32[]) {
  %p = (s32[]) parameter(0)
  %a = f32[4,8]{1,0} constant({...})
  %b = f32[8,2]{1,0} constant({...})
  %d = f32[4,2]{1,0} dot(f32[4,8]{1,0} %a, f32[8,2]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %s = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1},{1,0}}
  %e = f32[4,8]{1,0} collective-permute-done(%s)
  ROOT %t = (s32[]) tuple(%p)
}
ENTRY %main (x: s32[]) -> (s32[]) {
  %x = s32[] parameter(0)
  %t = (s32[]) tuple(%x)
  %w = (s32[]) while(%t), condition=%cond, body=%body
  ROOT %known = (s32[]) while(%w), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
}
"""
    counts = hlo_counts.count(text)
    assert counts.matmul_flops == (1 + 5) * 2 * 4 * 2 * 8 and counts.unknown_loops == ["w"]
    assert counts.collective_bytes == {"collective-permute": (1 + 5) * 4 * 8 * 4}  # the result, not the operand too


def test_a_collective_over_groups_of_one_device_moves_nothing():
    """XLA:CPU keeps shard_map's psum over size-1 mesh axes as an all-reduce over groups of one: it moves no
    byte, so it is not counted; the same all-reduce over a group of two is."""
    def module(groups: str) -> str:
        return f"""HloModule m
%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}}
ENTRY %main (x: f32[4,8]) -> f32[4,8] {{
  %x = f32[4,8]{{1,0}} parameter(0)
  ROOT %r = f32[4,8]{{1,0}} all-reduce(%x), replica_groups={groups}, to_apply=%add
}}
"""
    alone = ["mesh['data'=1,'ulysses'=8] {'data'}", "[8,1]<=[8]", "{{0},{1}}"]
    paired = ["mesh['data'=2,'ulysses'=4] {'data'}", "[4,2]<=[8]", "{{0,1},{2,3}}"]
    assert all(hlo_counts.count(module(groups)).collective_bytes == {} for groups in alone)
    assert all(hlo_counts.count(module(groups)).collective_bytes == {"all-reduce": 4 * 8 * 4} for groups in paired)


def test_collective_bytes_split_by_the_scope_of_their_op_name():
    text = """HloModule m
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
ENTRY %main (x: f32[4,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %p = f32[4,8]{1,0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}, metadata={op_name="jit(step)/decoder/layers/attention/shard_map/ppermute"}
  %q = f32[4,8]{1,0} collective-permute(%p), source_target_pairs={{0,1},{1,0}}, metadata={op_name="jit(step)/merge/shard_map/ppermute"}
  ROOT %r = f32[4,8]{1,0} all-reduce(%q), replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(step)/attention/sum"}
}
"""
    counts = hlo_counts.count(text, {"ring": "layers/attention/shard_map", "reductions": "attention"})
    block = 4 * 8 * 4
    assert counts.collective_bytes_by_scope == {"ring": {"collective-permute": block},
                                                "other": {"collective-permute": block},
                                                "reductions": {"all-reduce": block}}
    assert counts.collective_bytes == {"collective-permute": 2 * block, "all-reduce": block}


def test_a_loop_counting_by_two_runs_half_its_bound():
    """XLA's bidirectional windowed einsum (a collective matmul) does two steps' work an iteration: its body
    puts counter + 2 back, its condition reads counter < 16, so it runs 8 times (libtpu writes no
    known_trip_count for it)."""
    text = """HloModule m
%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %b = f32[8,8]{1,0} constant({...})
  %d = f32[4,8]{1,0} dot(f32[4,8]{1,0} %x, f32[8,8]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%next, /*index=1*/%d)
}
ENTRY %main (x: f32[4,8]) -> (s32[], f32[4,8]) {
  %x = f32[4,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[4,8]{1,0}) tuple(%zero, %x)
  ROOT %w = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body
}
"""
    counts = hlo_counts.count(text)
    assert counts.matmul_flops == 8 * 2 * 4 * 8 * 8 and not counts.unknown_loops
