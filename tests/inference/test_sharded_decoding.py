"""The KV cache shards by the one rules table: on an 8-device mesh (fsdp 2 x ring 2 x ulysses 2) the
cache comes out of the decode steps laid out as its logical axes say (batch over the batch axes,
slots over the sequence axes), and prefill and decode steps give the unsharded logits."""

import flax.linen as nn
import jax
import numpy as np

from af_next_jax.config import tiny
from af_next_jax.inference.decoding import Generator, cache_shardings
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.parallel import MeshConfig, batch_shardings, logical_axis_rules, make_mesh, param_shardings
from decoding_helpers import left_padded_prompts

RELATIVE_TOLERANCE = 1e-4
MESH = MeshConfig(data=1, fsdp=2, ring=2, ulysses=2)


def prefill_and_two_steps(generator, params, prompts, max_length):
    logits = []
    logits_BxV, cache = generator.prefill(params, prompts, max_length=max_length)
    logits.append(np.asarray(logits_BxV))
    positions_B = np.asarray(prompts["positions"])[:, -1] + 1
    for step, token in enumerate((17, 23)):
        logits_BxV, cache = generator.decode_step(params, np.full(2, token, np.int32), positions_B + step, cache)
        logits.append(np.asarray(logits_BxV))
    return np.stack(logits, axis=1), cache


def test_sharded_cache_follows_the_rules_and_decodes_like_one_device():
    config = tiny()
    prompts = left_padded_prompts(config, [[700], [300]], seq_len=512, seed=4, extra_text=(0, 6))
    model = AFNextModel(config)
    params = model.init(jax.random.key(0), prompts)
    plain_params = nn.unbox(params)  # outside the rules scope: there unbox would add constraints
    length = prompts["token_ids"].shape[1]
    max_length = -(-(length + 2) // 8) * 8  # room for two decode steps; divisible by the sequence axes
    expected, _ = prefill_and_two_steps(Generator(config), plain_params, prompts, max_length)

    mesh, rules = make_mesh(MESH.resolved(8)), logical_axis_rules(MESH)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded_params = jax.device_put(plain_params, param_shardings(params, mesh, rules))
        text = {k: prompts[k] for k in ("token_ids", "positions", "segment_ids")}
        sharded = {**prompts, **jax.device_put(text, batch_shardings(text, mesh, rules))}
        got, cache = prefill_and_two_steps(Generator(config), sharded_params, sharded, max_length)
        wanted = cache_shardings(cache, mesh, rules)
    for name in ("key", "value", "segment_ids"):
        assert cache[name].sharding.is_equivalent_to(wanted[name], cache[name].ndim), (
            name, cache[name].sharding, wanted[name])
    assert len({shard.device for shard in cache["key"].addressable_shards}) == 8
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * scale
