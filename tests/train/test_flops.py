"""The analytic FLOP count (train/flops.py) against an independent count of the compiled program.

Reference: every matmul XLA runs, read from the compiled HLO of the tiny model (2 x result size x
contracted size per `dot`; per `convolution` the same with the kernel taps as the contraction), for
the forward pass and for the real training step of every stage (`make_train_step`, frozen groups
under stop_gradient, one micro-batch). That is what flops.py claims to count (matmuls and the
attention products, no elementwise work), so the two agree exactly (measured ratio 1.00000) and the
bound is 0.1%: forgetting the projector (1.4% of the step) or counting conv1's input gradient (5.8%)
fails. Excluded from the reference, as flops.py excludes them: remat's recomputation (the loss
recomputes each chunk's logits in the backward pass). Layers are unrolled (`scan_layers=False`) and
the loss is one chunk, so no matmul sits in a loop (the counter refuses loops).

The attention is counted as the model's math, through the materialising reference
(`reference.xla_attention`, patched in for this module): the CPU training kernel (attention/recompute.py)
also recomputes the scores in the backward pass, which MFU does not count (like remat), and skips
fully masked causal tiles.

Causal: the reference computes all L x L attention scores. A causal kernel computes only the
visible (query, key) pairs, so the causal reference is the compiled count with the decoder's
attention products (forward and backward) scaled by the visible fraction of the causal mask.
"""

import math
import re

import jax
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.train.flops import forward_flops_by_part, train_step_flops
from af_next_jax.train.optimizer import STAGES, make_optimizer, parameter_labels, trainable_mask
from af_next_jax.experiment import unbox
from af_next_jax.train.train_step import make_train_step, model_loss_sums, new_train_state
from trainer_helpers import NUM_WINDOWS, SEQ_LEN, micro_batch, stack

RELATIVE_TOLERANCE = 1e-3
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>\S+?)(?:\{[\d,]*\})? (?P<op>[\w\-]+)\("
                         r"(?P<operands>[^)]*)\)(?P<attributes>.*)$")


def _dims(type_text):
    match = re.match(r"^\w+\[([\d,]*)\]", type_text)
    return [int(size) for size in match.group(1).split(",") if size] if match else None


def compiled_matmuls(compiled_hlo: str) -> list[tuple[float, bool, str]]:
    """(FLOPs, has batch dims, op_name) of every dot and convolution of a compiled HLO module."""
    shapes, instructions = {}, []
    for line in compiled_hlo.splitlines():
        match = INSTRUCTION.match(line)
        if match:
            shapes[match.group("name")] = _dims(match.group("type"))
            instructions.append(match)
    matmuls = []
    for match in instructions:
        op, attributes = match.group("op"), match.group("attributes")
        assert op != "while", f"a loop would be counted once: {match.group(0)[:200]}"
        if op not in ("dot", "convolution"):
            continue
        lhs, rhs = (shapes[name.strip().lstrip("%")] for name in match.group("operands").split(",")[:2])
        if op == "dot":
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attributes).group(1)
            contracted = math.prod(lhs[int(d)] for d in contracting.split(",") if d)
        else:
            kernel_labels = re.search(r"dim_labels=\w+_(\w+)->", attributes).group(1)
            contracted = math.prod(rhs) / rhs[kernel_labels.index("o")]
            # The input gradient of a strided convolution dilates its input with zeros: only
            # 1 / dilation of the taps multiply real values.
            dilation = re.search(r"lhs_dilate=([\dx]+)", attributes)
            contracted /= math.prod(int(d) for d in dilation.group(1).split("x")) if dilation else 1
        op_name = re.search(r'op_name="([^"]*)"', attributes)
        matmuls.append((2 * math.prod(_dims(match.group("type"))) * contracted, "lhs_batch_dims" in attributes,
                        op_name.group(1) if op_name else ""))
    return matmuls


def model_work(matmuls, *, causal: bool) -> float:
    """FLOPs of the model's matmuls, without remat's recomputation; `causal` keeps only the visible
    fraction of the decoder's attention products (the ones with batch dims: weights have none)."""
    visible = np.tril(np.ones((SEQ_LEN, SEQ_LEN), bool)).mean()
    total = 0.0
    for flops, batched, op_name in matmuls:
        if "rematted_computation" in op_name:
            continue
        decoder_attention = batched and "/decoder/" in op_name
        total += flops * (visible if causal and decoder_attention else 1.0)
    return total


@pytest.fixture(scope="module", autouse=True)
def reference_attention():
    """Route the `xla` kernel to the materialising reference for every compile in this module."""
    from af_next_jax.attention import dispatch, reference

    def materialising(*args, cpu_layouts=False, **masks):
        del cpu_layouts  # the reference has one layout
        return reference.xla_attention(*args, **masks)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "recompute_attention", materialising)
        yield


def part_of(op_name: str) -> str:
    return "encoder" if "/encoder/" in op_name else "projector" if "/projector/" in op_name else "decoder"


@pytest.fixture(scope="module")
def tiny_unrolled():
    config = tiny(scan_layers=False)
    model = AFNextModel(config)
    batch = micro_batch(0, config)
    # Shapes are all a compile needs: skip compiling `init`.
    params = unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch))
    return config, model, batch, params


@pytest.fixture(scope="module")
def compiled_train_steps(tiny_unrolled, debug_config):
    """trained groups -> the matmuls of the compiled training step (one compile per distinct groups)."""
    _, model, batch, params = tiny_unrolled
    compiled = {}

    def get(stage):
        groups = STAGES[stage]
        if groups not in compiled:
            labels = parameter_labels(params, stage)
            optimizer, schedule = make_optimizer(debug_config.optimizer, labels, total_steps=10)
            step = make_train_step(model, optimizer, schedule, trainable_mask(labels), loss_chunk_length=SEQ_LEN)
            state = jax.eval_shape(lambda p: new_train_state(p, optimizer, jax.random.PRNGKey(0)), params)
            compiled[groups] = compiled_matmuls(jax.jit(step).lower(state, stack(batch)).compile().as_text())
        return compiled[groups]

    return get


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_analytic_forward_flops_of_each_part_match_the_compiled_matmuls(tiny_unrolled, causal):
    config, model, batch, params = tiny_unrolled
    loss = lambda p, b: model_loss_sums(model, p, b, loss_chunk_length=SEQ_LEN)[0]  # noqa: E731
    matmuls = compiled_matmuls(jax.jit(loss).lower(params, batch).compile().as_text())
    analytic = forward_flops_by_part(config, batch_size=batch["token_ids"].shape[0], seq_len=SEQ_LEN,
                                     num_windows=NUM_WINDOWS, causal=causal)
    for part in ("encoder", "projector", "decoder"):
        measured = model_work([m for m in matmuls if part_of(m[2]) == part], causal=causal)
        assert analytic[part].forward == pytest.approx(measured, rel=RELATIVE_TOLERANCE), part


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_analytic_training_flops_match_the_compiled_training_step(tiny_unrolled, compiled_train_steps, stage,
                                                                   causal):
    config, _, batch, _ = tiny_unrolled
    analytic = train_step_flops(config, batch_size=batch["token_ids"].shape[0], seq_len=SEQ_LEN,
                                num_windows=NUM_WINDOWS, trained_groups=STAGES[stage], causal=causal)
    measured = model_work(compiled_train_steps(stage), causal=causal)
    assert analytic == pytest.approx(measured, rel=RELATIVE_TOLERANCE), f"ratio {analytic / measured:.5f}"
