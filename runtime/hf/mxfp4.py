"""MXFP4 (OCP microscaling FP4) as stored in the openai/gpt-oss checkpoints.

Layout of one expert projection with R output rows and C input columns (C % 32 == 0):

    *_blocks  uint8 [E, R, G, 16]   G = C // 32 blocks of 32 values, two FP4 (E2M1) per byte,
                                    the LOW nibble holds the even column, the HIGH nibble the odd
    *_scales  uint8 [E, R, G]       E8M0 shared exponent per block: value = fp4 * 2**(scale - 127)

Dequantizing gives [E, R, C], which is exactly our runtime layout (`mlp1_weight` [E, 2F, D] from
`gate_up_proj_*`, `mlp2_weight` [E, D, F] from `down_proj_*`). transformers transposes the
last two dims afterwards to get its `gate_up_proj` [E, D, 2F] / `down_proj` [E, F, D]
(`dequantize_mxfp4_hf_layout`).

Exactness: every FP4 value times a power of two is exact in fp32, so we dequantize in fp32
and cast once; that rounds the same way transformers does (it multiplies in fp32 too).
"""

from __future__ import annotations

import math

import torch

BLOCK = 32  # values per block (one shared scale)
BYTES_PER_BLOCK = BLOCK // 2

# E2M1 code -> value; bit 3 is the sign (same table as transformers' FP4_VALUES).
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4_MAX = 6.0
_FP4_EMAX = 2  # exponent of the largest FP4 value: 6 = 1.5 * 2**2

# E8M0 code -> 2**(code - 127) in fp32: exact for every code (2**-127 is an fp32 subnormal);
# code 255 is NaN in the OCP spec but overflows to inf here, as in transformers' ldexp.
_E8M0_SCALES = tuple(math.ldexp(1.0, code - 127) if code < 255 else math.inf for code in range(256))

# Bound the int64 index temporaries (8 bytes per value) when dequantizing big tensors.
_ROWS_PER_CHUNK = 1 << 16


def _check_pair(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} / scales {list(scales.shape)} must be "
            f"[..., G, {BYTES_PER_BLOCK}] / [..., G]"
        )


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> values [..., G * 32] in `dtype`."""
    _check_pair(blocks, scales)
    *prefix, groups, _ = blocks.shape
    rows = math.prod(prefix) * groups
    flat_blocks = blocks.reshape(rows, BYTES_PER_BLOCK)  # one row per block
    flat_scales = scales.reshape(rows)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    scale_lut = torch.tensor(_E8M0_SCALES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(rows, BLOCK, dtype=dtype, device=blocks.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        chunk = flat_blocks[r0:r0 + _ROWS_PER_CHUNK]
        # [n, 16, 2]: low nibble first, so flattening interleaves even/odd columns.
        values = torch.stack((lut[(chunk & 0x0F).long()], lut[(chunk >> 4).long()]), dim=-1)
        scale = scale_lut[flat_scales[r0:r0 + _ROWS_PER_CHUNK].long()]  # [n]
        out[r0:r0 + _ROWS_PER_CHUNK] = (values.reshape(-1, BLOCK) * scale[:, None]).to(dtype)
    return out.reshape(*prefix, groups * BLOCK)


def dequantize_mxfp4_hf_layout(blocks: torch.Tensor, scales: torch.Tensor,
                               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What transformers' `convert_moe_packed_tensors` returns: [E, R, G, 16] -> [E, G * 32, R]."""
    return dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2).contiguous()


def _encode_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8 in [0, 16)) of values already in [-6, 6]; ties to the even code
    (round-half-to-even, as the OCP spec recommends)."""
    magnitudes = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=x.device)
    distance = (x.abs()[..., None] - magnitudes).abs()  # [..., 8]
    nearest = distance == distance.amin(dim=-1, keepdim=True)  # one entry, or two on a tie
    even = torch.arange(8, device=x.device) % 2 == 0
    tie_even = nearest & even
    code = torch.where(tie_even.any(dim=-1), tie_even.int().argmax(dim=-1), nearest.int().argmax(dim=-1))
    sign = (x < 0) | ((x == 0) & torch.signbit(x))  # keep -0.0 as code 8
    return (code + 8 * sign.long()).to(torch.uint8)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [n, 32] -> (blocks uint8 [n, 16], scales uint8 [n])."""
    amax = x.abs().amax(dim=-1)
    exponent = torch.floor(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny))) - _FP4_EMAX
    exponent = exponent.clamp(-127, 127)
    scaled = (x / torch.exp2(exponent)[:, None]).clamp(-_FP4_MAX, _FP4_MAX)  # exact: power of two
    codes = _encode_fp4(scaled)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), (exponent + 127).to(torch.uint8)  # low nibble = even


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., C] (C % 32 == 0) -> (blocks uint8 [..., C // 32, 16], scales uint8 [..., C // 32]).

    The OCP recipe: the block exponent is floor(log2(amax)) - 2, so the block maximum lands in
    [4, 8) and saturates at 6; values round to the nearest FP4 (ties to even). Values that are
    FP4 numbers times a power of two, with a block maximum of 4 or 6 times it, round-trip
    exactly (tests rely on that).
    """
    if values.ndim == 0 or values.shape[-1] % BLOCK != 0:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {BLOCK}, got shape {list(values.shape)}")
    *prefix, columns = values.shape
    rows = values.reshape(-1, BLOCK)  # one row per block
    blocks = torch.empty(rows.shape[0], BYTES_PER_BLOCK, dtype=torch.uint8, device=values.device)
    scales = torch.empty(rows.shape[0], dtype=torch.uint8, device=values.device)
    for r0 in range(0, rows.shape[0], _ROWS_PER_CHUNK):  # bounds the [n, 32, 8] temporaries
        r1 = r0 + _ROWS_PER_CHUNK
        blocks[r0:r1], scales[r0:r1] = _quantize_rows(rows[r0:r1].float())
    groups = columns // BLOCK
    return blocks.reshape(*prefix, groups, BYTES_PER_BLOCK), scales.reshape(*prefix, groups)
