"""YaRN rotary position embedding (gpt-oss flavour), driven by explicit positions.

Positions are an input rather than `arange(seq_len)` because packed documents restart
their positions and context parallelism hands each rank a non-contiguous slice.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.model.args import ModelArgs


def _correction_dim(num_rotations: float, dim: int, base: float, original_seq_len: int) -> float:
    """Rotary dimension whose wavelength makes `num_rotations` turns over the original context."""
    return dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim // 2] fp32, concentration).

    High-frequency dims (> beta_fast rotations over the original context) keep their
    frequency (extrapolation), low-frequency dims (< beta_slow rotations) are divided by
    `factor` (interpolation), with a linear ramp between. The concentration
    0.1 * ln(factor) + 1 multiplies both cos and sin.
    """
    dim, base, factor = args.head_dim, args.rope_theta, args.rope_factor
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)

    low = _correction_dim(args.rope_beta_fast, dim, base, args.rope_original_seq_len)
    high = _correction_dim(args.rope_beta_slow, dim, base, args.rope_original_seq_len)
    if args.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 for fast-rotating dims
    inv_freq = interpolation * ramp + extrapolation * extrapolation_weight

    concentration = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, concentration


class RotaryEmbedding(nn.Module):
    """Maps integer positions [B, S] to (cos, sin) [B, S, head_dim // 2] in fp32."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, self.concentration = yarn_inv_freq(args)
        # Not persistent: derived from args, so checkpoints stay independent of it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Refill the buffer after `to_empty()` (building on the meta device leaves it empty)."""
        self.inv_freq.copy_(yarn_inv_freq(self.args)[0])

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, S, head_dim/2]
        return freqs.cos() * self.concentration, freqs.sin() * self.concentration


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotate-half. x: [B, H, S, D]; cos/sin: [B, S, D/2] (fp32)."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
