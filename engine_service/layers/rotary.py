"""Rotary position embeddings with the rope scalings our checkpoints use.

``rope_scaling`` is the checkpoint's dict with ``rope_type`` set (``None`` for plain rope):
``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1) keeps the high
frequencies, divides the low ones by ``factor`` and blends in between; ``yarn`` (DeepSeek-V3)
interpolates the low frequencies by ``factor`` with a linear ramp between the dimensions
``beta_fast`` and ``beta_slow`` rotations select, and scales cos/sin by its attention factor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """Inverse frequency of each rotary pair (fp32, CPU) and the attention scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = "default" if scaling is None else scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(
        f"rope scaling {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched ``scale`` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits ``rotations`` times in the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    cpu = torch.device("cpu")  # built on the CPU even under a meta-device context
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=cpu) / head_dim)
    ramp = (
        (torch.arange(head_dim // 2, dtype=torch.float32, device=cpu) - low) / (high - low)
    ).clamp(0, 1)
    keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: interpolated by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Gives the cos/sin tables for a batch's positions; computed once per forward pass and
    shared by every layer (they all rotate by the same positions).

    Multimodal rotary positions (M-RoPE, Qwen2-VL): with ``mrope_section`` (sizes summing to
    ``head_dim / 2``), positions may be ``[3, T]``, a (temporal, height, width) triple per
    token, and the rotary pairs are split into three sections, each turned by its own
    coordinate. A token whose three coordinates are equal (all text) rotates exactly as
    with plain 1-D positions, so text-only steps pass ``[T]`` positions as usual."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict[str, Any] | None,
        mrope_section: list[int] | None = None,
    ) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(head_dim, theta, scaling)
        # Built on the CPU even under a meta-device context, so loading keeps it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        axis = None
        if mrope_section is not None:
            if sum(mrope_section) != head_dim // 2:
                raise ValueError(
                    f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}"
                )
            # Which coordinate (0 t, 1 h, 2 w) turns each rotary pair.
            axis = torch.repeat_interleave(
                torch.arange(len(mrope_section), device="cpu") % 3,
                torch.tensor(mrope_section, device="cpu"),
            )
        self.mrope_axis: torch.Tensor | None
        self.register_buffer("mrope_axis", axis, persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[T, 1, head_dim]`` in ``dtype``, broadcasting over heads;
        ``positions`` is ``[T]``, or ``[3, T]`` under M-RoPE."""
        if positions.dim() == 2:
            assert self.mrope_axis is not None, "3-D positions need an M-RoPE model"
            # [T, pairs]: each pair's own coordinate of each token.
            axis = self.mrope_axis[None, :].expand(positions.shape[1], -1)
            chosen = positions.t().gather(1, axis)
            freqs = chosen.float() * self.inv_freq[None, :].float()
        else:
            freqs = positions.float()[:, None] * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[T, heads, head_dim]``) in the half-split layout of HF checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
