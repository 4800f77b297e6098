"""GPTQ (Frantar et al., 2022): layer-wise quantization that corrects each column's rounding error with the
inverse Hessian of the layer's inputs, in blocks of columns."""

from __future__ import annotations

import torch

from ...devices import ieee_fp32_matmul
from .format import _check_bits, resolve_group_size
from .rtn import compute_qparams, residual_codes, round_codes


def _inverse_cholesky(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹; the damping grows tenfold while H is not positive definite."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = damp_percent * float(hessian.diagonal().mean())
    for _ in range(4):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ValueError(
        f"GPTQ: the Hessian is not positive definite even with damping {damp / 10:.3g}. Raise damp_percent "
        "(e.g. 0.1) or use more calibration samples."
    )


@torch.no_grad()
@ieee_fp32_matmul()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022) of one (out, in) weight with the Hessian H = 2XᵀX/n of its inputs.

    Columns are quantized one by one; each one's rounding error, divided by the diagonal of the Cholesky factor of
    H⁻¹, is pushed onto the columns not yet quantized (lazily per block of `block_size` columns). The scales and zero
    points of a group are computed from the updated weights when the group is entered (from the original weights with
    `act_order`). Weights that are exactly zero stay zero: they receive no error update and get code == zero point.

    Returns:
        `(qweight uint8 (out, in), scales float32 (out, groups), zeros uint8 (out, groups), residual int8 (out, in))`;
        the residual is that of each column's error-compensated weight when it was rounded (see `residual_codes`).
    """
    _check_bits(bits)
    # Work on Wᵀ (in, out): a column of W is a contiguous row, and the error updates are BLAS rank-1/rank-k updates.
    w = weight.detach().float().T.contiguous()
    cols, rows = w.shape
    group_size = resolve_group_size(group_size, cols)
    h = hessian.detach().to(w.device, torch.float32, copy=True)
    pruned = w == 0
    has_zeros = bool(pruned.any())
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    groups = cols // group_size
    scales = torch.ones(groups, rows, dtype=w.dtype, device=w.device)
    zeros = torch.zeros(groups, rows, dtype=w.dtype, device=w.device)
    perm, group_of = None, [c // group_size for c in range(cols)]
    if act_order:
        s, z = compute_qparams(weight, bits, group_size, symmetric)
        scales, zeros = s.T.contiguous(), z.T.float().contiguous()
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, pruned, h = w[perm], pruned[perm], h[perm][:, perm]
        group_of = (perm // group_size).tolist()
    hinv = _inverse_cholesky(h, damp_percent)
    diag = hinv.diagonal().tolist()
    # Group starts must see fully updated weights: blocks are multiples of the group size, or divide it.
    if group_size < block_size:
        block_size = group_size * (block_size // group_size)
    elif group_size % block_size:
        block_size = group_size
    codes = torch.empty(cols, rows, dtype=w.dtype, device=w.device)
    residual = torch.empty(cols, rows, dtype=torch.int8, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block, hinv_block = w[i1:i2], hinv[i1:i2, i1:i2]
        errors = torch.empty(i2 - i1, rows, dtype=w.dtype, device=w.device)
        for i in range(i2 - i1):
            col = i1 + i
            if perm is None and col % group_size == 0:
                group = w[col : col + group_size]
                if has_zeros:
                    group.masked_fill_(pruned[col : col + group_size], 0)
                s, z = compute_qparams(group.T, bits, group_size, symmetric)
                scales[col // group_size], zeros[col // group_size] = s[:, 0], z[:, 0]
            s, z = scales[group_of[col]], zeros[group_of[col]]
            # Pruned weights are quantized as exact zeros and pass no error on; their drifting values are never read.
            x = block[i].masked_fill(pruned[col], 0) if has_zeros else block[i]
            q = round_codes(x, s, z, bits)
            codes[col] = q
            residual[col] = residual_codes(x, s, z, q)
            err = (x - (q - z) * s) / diag[col]
            errors[i] = err
            block[i + 1 :].addr_(hinv_block[i, i + 1 :], err, alpha=-1)
        if i2 < cols:
            w[i2:].addmm_(hinv[i1:i2, i2:].T, errors, alpha=-1)
    codes, residual = codes.T, residual.T
    if perm is not None:
        codes, residual = codes[:, torch.argsort(perm)], residual[:, torch.argsort(perm)]
    scales, zeros = scales.T.contiguous(), zeros.T.to(torch.uint8).contiguous()
    return codes.to(torch.uint8).contiguous(), scales, zeros, residual.contiguous()


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ‖X(W - Ŵ)ᵀ‖ / ‖XWᵀ‖ on the calibration inputs, from H ∝ XᵀX."""
    hessian = hessian.to(weight.device, torch.float32)
    delta = (weight.float() - approx.to(weight.device, torch.float32)).T
    w = weight.float().T
    with ieee_fp32_matmul():
        num = (delta * (hessian @ delta)).sum()
        den = (w * (hessian @ w)).sum()
    return float((num / den).sqrt()) if den > 0 else 0.0
