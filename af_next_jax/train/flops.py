"""Analytic FLOP count of one training step, for MFU.

Counted: every matmul (2 x multiply-adds) and the attention score / value products; elementwise
work (norms, GELU, softmax, RoPE, the optimizer) is left out, as is remat's recomputation (MFU
measures useful model work, not what the hardware re-did).

Forward, per token of the decoder (D hidden, H heads, G K/V heads, K head_dim, F SwiGLU width,
V vocabulary, n layers, S keys attended):

    n x [2 D (H K) + 2 x 2 D (G K) + 2 (H K) D + 3 x 2 D F  +  4 S H K]  +  2 D V (lm_head)

S = L for a dense count (what the `xla` kernel computes: the full L x L scores), (L + 1) / 2 for a
causal count (what a flash / ring kernel computes and what MFU reports). Per 30 s window of the
encoder (M mel bins, T mel frames, A hidden, Fa FFN width, T2 = T / 2 tokens after conv2), plus the
projector on the T2 / 2 pooled tokens:

    2 T (3 M) A + 2 T2 (3 A) A  +  n_enc x T2 x [4 x 2 A A + 2 x 2 A Fa + 4 T2 A]  +  T2 / 2 x [2 A D + 2 D D]

Backward: for each part, its weight gradients cost 1x the part's matmul forward if it is trained,
and its input gradients 1x (2x for the attention core) if it or a part upstream of it is trained
(gradients must reach its own earlier layers or the upstream part); conv1's input gradient (with
respect to the mel spectrogram) is never needed. A full fine-tune is therefore ~3x forward, the
projector-only stage ~2x (the decoder's input gradients, no weight gradients; nor the input gradient of
the projector's linear_1, since nothing upstream of it is trained).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from af_next_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures), matched by prefix of `device_kind`, first
# match wins (so the more specific kinds come first).
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v6 lite": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA H20": 148e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA GB200": 2500e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 70e12,
}


@dataclasses.dataclass(frozen=True)
class PartFlops:
    """Forward FLOPs of one model part: in weight matmuls and in the attention core (no weights)."""

    matmul: float
    attention: float = 0.0
    first_input_matmul: float = 0.0  # the part's first matmul when its input needs no gradient (conv1)

    @property
    def forward(self) -> float:
        return self.matmul + self.attention


def forward_flops_by_part(config: ModelConfig, *, batch_size: int, seq_len: int, num_windows: int,
                          causal: bool = True) -> dict[str, PartFlops]:
    encoder, decoder = config.encoder, config.decoder
    d, heads, kv_heads, head_dim = decoder.hidden_size, decoder.num_heads, decoder.num_kv_heads, decoder.head_dim
    tokens = batch_size * seq_len
    keys = (seq_len + 1) / 2 if causal else seq_len
    per_layer = 2 * d * heads * head_dim + 2 * 2 * d * kv_heads * head_dim + 2 * heads * head_dim * d \
        + 3 * 2 * d * decoder.intermediate_size
    decoder_flops = PartFlops(
        matmul=tokens * (decoder.num_layers * per_layer + 2 * d * decoder.vocab_size),
        attention=tokens * decoder.num_layers * 4 * keys * heads * head_dim)

    a, frames, mels = encoder.hidden_size, encoder.mel_frames_per_window, encoder.num_mel_bins
    t2 = encoder.max_source_positions
    conv = 2 * frames * 3 * mels * a + 2 * t2 * 3 * a * a
    layers = encoder.num_layers * t2 * (4 * 2 * a * a + 2 * 2 * a * encoder.intermediate_size)
    encoder_flops = PartFlops(matmul=num_windows * (conv + layers),
                              attention=num_windows * encoder.num_layers * t2 * 4 * t2 * a,
                              first_input_matmul=num_windows * 2 * frames * 3 * mels * a)
    projector_flops = PartFlops(matmul=num_windows * (t2 // 2) * (2 * a * d + 2 * d * d),
                                first_input_matmul=num_windows * (t2 // 2) * 2 * a * d)
    return {"encoder": encoder_flops, "projector": projector_flops, "decoder": decoder_flops}


def train_step_flops(config: ModelConfig, *, batch_size: int, seq_len: int, num_windows: int,
                     trained_groups=("encoder", "projector", "decoder"), causal: bool = True,
                     attention: bool = True) -> float:
    """FLOPs of one micro-batch forward + backward (multiply by grad_accum_steps for a step).
    `attention=False` leaves the attention cores out: what a compiled HLO shows when they run as kernels."""
    parts = forward_flops_by_part(config, batch_size=batch_size, seq_len=seq_len, num_windows=num_windows,
                                  causal=causal)
    if not attention:
        parts = {name: dataclasses.replace(part, attention=0.0) for name, part in parts.items()}
    order = ("encoder", "projector", "decoder")  # data flows this way; gradients flow back
    total = 0.0
    for index, name in enumerate(order):
        part = parts[name]
        upstream_trained = any(group in trained_groups for group in order[:index])
        total += part.forward
        if name in trained_groups:
            total += part.matmul  # weight gradients
        if upstream_trained:
            total += part.matmul + 2 * part.attention  # input gradients, all the way to the part's input
        elif name in trained_groups:
            total += part.matmul - part.first_input_matmul + 2 * part.attention
    return total


def peak_flops_per_device(configured: float = 0.0, devices=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from) for the devices a run uses.

    `devices` are the mesh's devices (default: all). The kind comes from them; an unknown kind
    (a CPU, or an accelerator missing from the table) is measured with a matmul on one of this
    process's devices among them, outside any mesh context, so any device count works.
    """
    if configured:
        return configured, "config"
    devices = list(jax.devices() if devices is None else devices)
    kinds = sorted({device.device_kind for device in devices})
    if len(kinds) == 1:
        for kind, flops in PEAK_FLOPS_BY_DEVICE_KIND.items():
            if kinds[0].startswith(kind):
                return flops, f"table ({kinds[0]})"
    local = [device for device in devices if device.process_index == jax.process_index()] or jax.local_devices()
    return measured_matmul_flops(device=local[0]), f"measured matmul ({', '.join(kinds)})"


def measured_matmul_flops(size: int = 1024, repeats: int = 5, device=None) -> float:
    """FLOP/s of a [size, size] matmul on `device` (default: this process's first): float32 on a CPU
    (its practical peak), bfloat16 with size >= 4096 on an accelerator. Runs outside any mesh context."""
    device = device if device is not None else jax.local_devices()[0]
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    if device.platform != "cpu":
        size = max(size, 4096)
    with jax.set_mesh(None):  # a run calls this inside its mesh; the matmul runs on one device
        x = jax.device_put(jnp.ones((size, size), dtype), device)
        matmul = jax.jit(lambda a: a @ a)
        matmul(x).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(x).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
