"""The model's platform numerics (model/numerics.py) reach every place they switch, explicitly: the layer
stacks (plain Dense/SwiGLU autodiff under a remat policy), the loss's lm_head, and the "xla" attention
kernel's backward. A program lowered for the TPU (libtpu's compile-only devices) carries none of the
CPU layouts' optimization barriers; one lowered for the CPU carries them."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import pytest

from af_next_jax.compile.topology import parse_topology, topology_devices
from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.numerics import Numerics, numerics_for_platform
from af_next_jax.model.synthetic import synthetic_batch
from af_next_jax.train.train_step import model_loss_sums

# Custom VJPs, named by their backward functions.
DENSE, SWIGLU = "_cpu_friendly_backward", "_swiglu_backward"  # model/contract.py, model/layers.py
ATTENTION = "_whole_row_backward"  # attention/recompute.py: a custom VJP on every platform


@pytest.fixture(scope="module")
def abstract_batch():
    # "xla" attention: the kernel recompute.py implements; TPU/GPU programs select it when configured.
    batch = synthetic_batch(tiny(attention_kernel="xla"), audio_frames_per_example=[[700], []], seq_len=256,
                            num_windows=4)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)


def _abstract_params(model, batch):
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch))


def _hidden_loss(model):
    return lambda params, batch: jnp.sum(jnp.square(model.apply(params, batch, return_hidden=True)))


def _custom_vjps(jaxpr, inside_remat=False, found=None):
    """[(custom VJP's backward name, traced inside a remat)] over `jaxpr` and every jaxpr nested in it:
    each call site once (a scanned layer's body is traced once)."""
    found = [] if found is None else found
    for equation in jaxpr.eqns:
        if equation.primitive.name == "custom_vjp_call":
            found.append((equation.params["bwd"].__name__, inside_remat))
        nested_inside = inside_remat or equation.primitive.name.startswith("remat")
        for value in equation.params.values():
            for candidate in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(candidate, "jaxpr", candidate)
                if hasattr(inner, "eqns"):
                    _custom_vjps(inner, nested_inside, found)
    return found


def _model_custom_vjps(config, numerics, batch, loss=_hidden_loss):
    model = AFNextModel(config) if numerics is None else AFNextModel(config, numerics=numerics)
    return _custom_vjps(jax.make_jaxpr(loss(model))(_abstract_params(model, batch), batch).jaxpr)


@pytest.mark.parametrize("remat_policy", ["dots", "full"])
def test_remat_stacks_run_plain_dense_and_swiglu_while_the_rest_keeps_the_cpu_backward(remat_policy, abstract_batch):
    config = tiny(attention_kernel="xla", remat_policy=remat_policy)
    found = _model_custom_vjps(config, numerics_for_platform("cpu"), abstract_batch)
    inside = {name for name, in_remat in found if in_remat}
    outside = [name for name, in_remat in found if not in_remat]
    assert ATTENTION in inside, found  # the walk does see into the remat'd layers
    assert not {DENSE, SWIGLU} & inside, found
    assert outside == [DENSE, DENSE], found  # the projector's two layers: outside every layer stack


def test_without_remat_every_dense_and_swiglu_runs_the_cpu_backward(abstract_batch):
    found = _model_custom_vjps(tiny(attention_kernel="xla"), numerics_for_platform("cpu"), abstract_batch)
    assert {name for name, _ in found} == {DENSE, SWIGLU, ATTENTION}


@pytest.mark.parametrize("numerics", [None, numerics_for_platform("tpu"), numerics_for_platform("gpu")],
                         ids=["default", "tpu", "gpu"])
def test_default_tpu_and_gpu_numerics_are_plain_autodiff(numerics, abstract_batch):
    assert AFNextModel(tiny()).numerics == Numerics()
    found = _model_custom_vjps(tiny(attention_kernel="xla"), numerics, abstract_batch)
    assert {name for name, _ in found} == {ATTENTION}


def _count_cpu_contracts(numerics, batch, with_loss):
    def loss(model):
        if with_loss:
            return lambda params, b: model_loss_sums(model, params, b, loss_chunk_length=64)[0]
        return _hidden_loss(model)

    found = _model_custom_vjps(tiny(attention_kernel="xla"), numerics, batch, loss)
    return sum(name == DENSE for name, _ in found)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_the_loss_lm_head_runs_the_model_numerics(platform, abstract_batch):
    """model_loss_sums hands `model.numerics` to the loss: on the CPU exactly one more hand-written
    matmul (the lm_head) than the model's own Dense layers; elsewhere none in either."""
    numerics = numerics_for_platform(platform)
    model_only = _count_cpu_contracts(numerics, abstract_batch, with_loss=False)
    with_loss = _count_cpu_contracts(numerics, abstract_batch, with_loss=True)
    assert (model_only, with_loss) == ((15, 16) if platform == "cpu" else (0, 0))


def _devices(platform):
    if platform == "cpu":
        return jax.devices("cpu")
    try:
        return topology_devices(parse_topology("v5p-8"))
    except RuntimeError as error:  # libtpu missing: the TPU program cannot be lowered here
        pytest.skip(f"libtpu cannot build a TPU topology here ({error}); `pip install -e \".[tpu]\"`")


def _lowered_barriers(devices, numerics, batch):
    """optimization_barriers in the model's forward + backward with attention_kernel="xla", lowered (not
    compiled) for the platform of `devices` under their abstract mesh. The model has no other
    optimization_barrier (no remat), so every one counted comes from the CPU layouts."""
    platform = devices[0].platform
    model = AFNextModel(tiny(attention_kernel="xla"), numerics=numerics)
    with jax.sharding.use_abstract_mesh(jax.sharding.Mesh(devices[:1], ("data",)).abstract_mesh):
        params = _abstract_params(model, batch)
        gradient = jax.jit(jax.grad(_hidden_loss(model)))
        text = gradient.trace(params, batch).lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.dot_general" in text  # a real lowered program
    return text.count("stablehlo.optimization_barrier")


@pytest.mark.parametrize("platform", ["tpu", "cpu"])
def test_only_the_cpu_program_carries_the_cpu_layout_barriers(platform, abstract_batch):
    """With the numerics the program builder derives from the mesh devices' platform."""
    devices = _devices(platform)
    barriers = _lowered_barriers(devices, numerics_for_platform(devices[0].platform), abstract_batch)
    assert (barriers > 0) == (platform == "cpu"), f"{barriers} optimization barriers in the {platform} program"


@pytest.mark.parametrize("field", ["cpu_dense_backward", "cpu_attention_layouts"])
def test_each_cpu_layout_reaches_the_decoder_and_the_audio_path(field, abstract_batch):
    """Each switch on its own puts barriers into the program, in the decoder (a text-only batch never
    runs the encoder) and, with audio, also in the encoder and projector: the model hands it to every site."""
    numerics = Numerics(**{field: True})
    text_batch = {name: abstract_batch[name] for name in ("token_ids", "positions", "segment_ids")}
    decoder_only = _lowered_barriers(_devices("cpu"), numerics, text_batch)
    with_audio = _lowered_barriers(_devices("cpu"), numerics, abstract_batch)
    assert with_audio > decoder_only > 0, (with_audio, decoder_only)
