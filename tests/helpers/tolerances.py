"""Comparing fp32 results that differ only in summation order, independently of the CPU.

An element of a matmul output or of a gradient is a sum of many terms; its fp32 rounding error
scales with the magnitude of those terms (~ the tensor's largest values), not with the element
itself, and the summation order -- hence the error -- changes with the CPU's vector width
(AVX2 vs AVX-512), the thread count and the library's blocking. An elementwise check such as
`assert_close(a, b, atol=2e-5)` on gradients of magnitude ~500 fails on another CPU (seen:
1.3e-4 on a Xeon without AVX-512). So compare relative to the tensor's scale, in float64.
"""

from __future__ import annotations

import torch


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64; 0 for an all-zero pair)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float,
                          what: str = "") -> None:
    """Every element within rel x max |expected| of the expected one (same shape)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = scaled_error(actual, expected)
    assert err <= rel, (f"{what}: max |diff| is {err:.2e} of max |expected| "
                        f"({expected.detach().abs().max().item():.3e}) > {rel:.0e}")
