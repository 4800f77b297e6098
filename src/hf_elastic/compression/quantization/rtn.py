"""Round-to-nearest (RTN) codes, scales and zero points of group-wise integer weights."""

from __future__ import annotations

import torch

RESIDUAL_STEPS = 254


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = t.shape
    return t.reshape(rows, cols // group_size, group_size)


def compute_qparams(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales (float32) and integer zero points (uint8) of every group of an (out, in) weight.

    Asymmetric groups span [min(w, 0), max(w, 0)]; symmetric groups span [-max|w|, max|w|] around zero point
    2**(bits - 1). All-zero groups get scale 1.
    """
    maxq = 2**bits - 1
    w = _grouped(weight.detach().float(), group_size)
    if symmetric:
        scales = w.abs().amax(-1) * (2 / maxq)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = (high - low) / maxq
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zeros = torch.round(-low / scales).clamp(0, maxq)
    return scales, zeros.to(torch.uint8)


def round_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """`clamp(round(w / s) + z, 0, 2**bits - 1)` elementwise (broadcasting), as float."""
    return (torch.round(w / scales) + zeros.float()).clamp(0, 2**bits - 1)


def quantize_codes(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """uint8 codes (out, in) of `weight` with fixed per-group `scales` and `zeros` (out, in // group_size)."""
    w = _grouped(weight.detach().float(), group_size)
    codes = round_codes(w, scales.float()[..., None], zeros[..., None], bits)
    return codes.to(torch.uint8).reshape(weight.shape)


def residual_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The int8 rounding residual `round(254 * (w / s + z - q))`, clipped to [-127, 127], elementwise."""
    r = w.float() / scales.float() + zeros.float() - codes.float()
    return torch.round(r * RESIDUAL_STEPS).clamp(-127, 127).to(torch.int8)
