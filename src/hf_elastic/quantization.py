"""Group-wise INT4/INT8 weight quantization of the base model: round-to-nearest (RTN) and GPTQ.

Storage format
--------------
`QuantLinear` replaces an `nn.Linear` or a GPT-2 `Conv1D` (whose weight is transposed to (out, in) first). It has
the attributes `in_features`, `out_features`, `bits` (4 or 8), `group_size` (a divisor of `in_features`) and
`symmetric`, and holds

- `qweight`: uint8 (out_features, in_features), one code per byte, values in [0, 2**bits - 1];
- `scales`: float32 (out_features, in_features // group_size), one scale per group of `group_size` consecutive
  input channels of a row; `scales` stay float32 when the model is cast to another dtype;
- `zeros`: uint8 (out_features, in_features // group_size), integer zero points; symmetric quantization uses
  2**(bits - 1) everywhere;
- `bias`: optional float parameter (out_features,), in the dtype of the rest of the model;
- `residual`: optional int8 (out_features, in_features), kept by `quantize(..., keep_residual=True)` for
  QA-SparsePEFT training: the rounding residual `r = w / s + z - q` of each weight in units of 1/254 of a grid step
  (|r| <= 127/254 < 1/2). QA-SparsePEFT then computes `clamp(round(q + r + delta / s))`, which equals
  `Q(w + delta)` with the base's scales (the SQFT forward) without a float copy of `w`. Inference ignores it.

With `s` and `z` the scale and zero point of the group of column `j`:

    q = clamp(round(w / s) + z, 0, 2**bits - 1)        (`quantize_codes`, round half to even)
    w = (q - z) * s                                    (`dequantize_codes`)

and `forward(x) = F.linear(x, dequantize(x.dtype), bias)`. The asymmetric range of each group always contains 0 and
zero points are integers, so a weight equal to 0 gets the code `z` and dequantizes to exactly 0: the zeros of a
sparse base model survive quantization. A group of zeros gets scale 1.

`save_quantized` writes `config.json`, `model.safetensors` (the state dict, with `qweight`/`scales`/`zeros` and any
`residual` in place of the quantized weights) and `quantization_config.json` (bits, group size, symmetric, method,
dtype and every quantized module); `load_quantized` rebuilds the model from them bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .calibration import (
    CalibrationData,
    CalibrationSettings,
    Hessian,
    calibration_ids,
    find_target_modules,
    run_layerwise,
)
from .elastic_lora.arch import weight_out_in
from .utils import atomic_save_safetensors, atomic_write_json, rows_by_name

QUANT_CONFIG_NAME = "quantization_config.json"
QUANT_WEIGHTS_NAME = "model.safetensors"
QUANT_REPORT_NAME = "quantization_report.json"
FORMAT_NAME = "hf_elastic.QuantLinear"
FORMAT_VERSION = 2  # 2 added the optional `residual`
RESIDUAL_STEPS = 254
_BITS = (4, 8)
_METHODS = ("rtn", "gptq")


def _check_bits(bits: Any, owner: str = "QuantizationConfig") -> None:
    if bits not in _BITS or isinstance(bits, bool):
        raise ValueError(f"{owner}.bits={bits!r} is not supported. Use bits=4 or bits=8.")


def resolve_group_size(group_size: int, in_features: int, name: str = "the module") -> int:
    """The group size used for a module with `in_features` inputs (-1 means one group per row)."""
    if group_size == -1:
        return in_features
    if in_features % group_size:
        divisors = [d for d in (256, 128, 64, 32, 16, 8) if in_features % d == 0][:2]
        raise ValueError(
            f"QuantizationConfig.group_size={group_size} does not divide in_features={in_features} of {name}. "
            f"Use a divisor of {in_features}{' such as ' + ' or '.join(map(str, divisors)) if divisors else ''}, "
            "or group_size=-1 for one group per output row."
        )
    return group_size


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = t.shape
    return t.reshape(rows, cols // group_size, group_size)


def expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat per-group values (out, groups) along the input dimension to (out, groups * group_size)."""
    return t.repeat_interleave(group_size, dim=1)


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


def dequantize_codes(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`(q - z) * s` with per-group `scales`/`zeros`, computed in float32 and returned in `dtype`."""
    q = _grouped(qweight, group_size).float()
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(qweight.shape).to(dtype)


class QuantLinear(nn.Module):
    """A linear layer with group-wise integer weights; see the module docstring for the format.

    Built with `QuantLinear.from_linear(linear, bits, group_size, symmetric)` (round-to-nearest) or from codes
    computed elsewhere (GPTQ). It has no `weight` attribute: `dequantize()` gives the float weight (out, in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_bits(bits, "QuantLinear")
        group_size = resolve_group_size(group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, bool(symmetric)
        groups = in_features // group_size
        zero = 2 ** (bits - 1) if symmetric else 0
        self.register_buffer(
            "qweight", torch.full((out_features, in_features), zero, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), zero, dtype=torch.uint8, device=device))
        self.register_buffer("residual", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = False,
        *,
        qweight: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        residual: torch.Tensor | bool = False,
    ) -> QuantLinear:
        """Quantize an `nn.Linear` or `Conv1D`: round-to-nearest, or the given codes/scales/zeros (e.g. GPTQ's).

        `residual=True` keeps the rounding residual of round-to-nearest (for QA-SparsePEFT); a tensor sets it.
        """
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise TypeError(f"QuantLinear.from_linear needs an nn.Linear or Conv1D, got {type(module).__name__}.")
        weight = weight_out_in(module).detach()
        out_features, in_features = weight.shape
        bias = module.bias
        new = cls(
            in_features, out_features, bits, group_size, symmetric, bias is not None, weight.device, weight.dtype
        )
        if scales is None or zeros is None:
            scales, zeros = compute_qparams(weight, new.bits, new.group_size, new.symmetric)
        if qweight is None:
            qweight = quantize_codes(weight, scales, zeros, new.bits, new.group_size)
        if residual is True:
            gs = new.group_size
            residual = residual_codes(
                _grouped(weight, gs), scales[..., None], zeros[..., None], _grouped(qweight, gs)
            ).view(qweight.shape)
        new.set_quantized(qweight, scales, zeros, residual if isinstance(residual, torch.Tensor) else None)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return new

    def set_quantized(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> None:
        """Replace codes, scales, zero points and the optional residual after checking shapes, dtypes and ranges."""
        expected = {
            "qweight": ((self.out_features, self.in_features), torch.uint8, qweight),
            "scales": ((self.out_features, self.in_features // self.group_size), torch.float32, scales),
            "zeros": ((self.out_features, self.in_features // self.group_size), torch.uint8, zeros),
        }
        if residual is not None:
            expected["residual"] = ((self.out_features, self.in_features), torch.int8, residual)
        for name, (shape, dtype, value) in expected.items():
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"QuantLinear.{name} must have shape {shape} for in_features={self.in_features}, "
                    f"out_features={self.out_features}, group_size={self.group_size}; got {tuple(value.shape)}."
                )
            if dtype != torch.float32 and value.dtype != dtype:
                raise ValueError(f"QuantLinear.{name} must be {str(dtype).removeprefix('torch.')}, got {value.dtype}.")
        if int(qweight.max()) > 2**self.bits - 1 or int(zeros.max()) > 2**self.bits - 1:
            raise ValueError(
                f"QuantLinear codes and zero points must lie in [0, {2**self.bits - 1}] for {self.bits} bits."
            )
        device = self.qweight.device
        self.qweight = qweight.to(device)
        self.scales = scales.to(device, torch.float32)
        self.zeros = zeros.to(device)
        self.residual = None if residual is None else residual.to(device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out_features, in_features) in `dtype`."""
        return dequantize_codes(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = scales.to(self.scales.device, torch.float32)
        return self

    # peft's `_get_in_out_features` reads these names for quantized linears; without them it warns per module.
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
            + (", residual=True" if self.residual is not None else "")
        )


@dataclass
class QuantizationConfig(CalibrationSettings):
    """How `quantize` turns the linear layers of a model into `QuantLinear`."""

    bits: int = field(default=4, metadata={"help": "Bits per weight code: 4 or 8."})
    group_size: int = field(
        default=128,
        metadata={
            "help": "Consecutive input channels sharing one scale and zero point; must divide the in_features of "
            "every quantized module. -1 uses one group per output row."
        },
    )
    symmetric: bool = field(
        default=False,
        metadata={"help": "Symmetric codes around the zero point 2**(bits-1); False fits [min, max] of each group."},
    )
    method: str = field(
        default="rtn",
        metadata={"help": "'rtn' (round to nearest) or 'gptq' (Frantar et al., 2022; needs calibration data)."},
    )
    damp_percent: float = field(
        default=0.01, metadata={"help": "GPTQ damping added to the Hessian diagonal, as a fraction of its mean."}
    )
    act_order: bool = field(
        default=False,
        metadata={
            "help": "GPTQ: quantize columns in order of decreasing Hessian diagonal; groups keep their scales from "
            "the original weight (static groups)."
        },
    )
    block_size: int = field(default=128, metadata={"help": "GPTQ: columns per lazy-update block."})
    modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to quantize, matched as suffixes of paths inside a transformer layer. None quantizes "
            "every linear/Conv1D layer inside the transformer layers; embeddings and the LM head stay as they are."
        },
    )
    keep_residual: bool = field(
        default=False,
        metadata={
            "help": "Keep each weight's rounding residual (int8, one byte per weight) for QA-SparsePEFT training: "
            "the adapter then trains as through Q(W + delta) on the float weights, so deltas below half a grid step "
            "still move the codes of weights near a rounding boundary. Inference ignores it; merging drops it."
        },
    )

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or not (self.group_size == -1 or self.group_size > 0)
        ):
            raise ValueError(
                f"QuantizationConfig.group_size={self.group_size!r} is invalid. Use a positive divisor of the input "
                "dimension (e.g. 128) or -1 for one group per output row."
            )
        for name in ("symmetric", "act_order", "keep_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantizationConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.method not in _METHODS:
            raise ValueError(
                f"QuantizationConfig.method={self.method!r} is not supported. Use one of {list(_METHODS)}."
            )
        if (
            isinstance(self.damp_percent, bool)
            or not isinstance(self.damp_percent, (int, float))
            or not (0 < self.damp_percent <= 1)
        ):
            raise ValueError(
                f"QuantizationConfig.damp_percent={self.damp_percent!r} is outside (0, 1]. Use e.g. 0.01; raise it "
                "if the Hessian is not positive definite."
            )
        self._check_calibration(("block_size",), verb="quantize")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    h = hessian.detach().float().clone()
    pruned = w == 0
    has_zeros = bool(pruned.any())
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    groups = cols // group_size
    scales = torch.ones(groups, rows, device=w.device)
    zeros = torch.zeros(groups, rows, device=w.device)
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
    codes = torch.empty(cols, rows, device=w.device)
    residual = torch.empty(cols, rows, dtype=torch.int8, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block, hinv_block = w[i1:i2], hinv[i1:i2, i1:i2]
        errors = torch.empty(i2 - i1, rows, device=w.device)
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
    delta = (weight.float() - approx.float()).T
    w = weight.float().T
    num = (delta * (hessian @ delta)).sum()
    den = (w * (hessian @ w)).sum()
    return float((num / den).sqrt()) if den > 0 else 0.0


@dataclass
class ModuleQuantization:
    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    weight_error: float
    output_error: float | None = None


@dataclass
class QuantizationReport:
    """What `quantize` did: settings and, per module, the relative weight error ‖W - Ŵ‖/‖W‖ and (with calibration
    data) the relative output error ‖X(W - Ŵ)ᵀ‖/‖XWᵀ‖ on the calibration inputs of the module."""

    config: QuantizationConfig
    modules: list[ModuleQuantization]
    num_calibration_samples: int = 0
    seconds: float = 0.0

    @property
    def mean_weight_error(self) -> float:
        return sum(m.weight_error for m in self.modules) / max(len(self.modules), 1)

    @property
    def mean_output_error(self) -> float | None:
        errors = [m.output_error for m in self.modules if m.output_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "num_calibration_samples": self.num_calibration_samples,
            "seconds": self.seconds,
            "mean_weight_error": self.mean_weight_error,
            "mean_output_error": self.mean_output_error,
            "modules": rows_by_name(self.modules),
        }

    def save(self, directory: str | Path) -> Path:
        """Write `quantization_report.json` into `directory` (atomically)."""
        path = Path(directory) / QUANT_REPORT_NAME
        atomic_write_json(path, self.to_dict())
        return path

    def __str__(self) -> str:
        width = max([len(m.name) for m in self.modules] + [6])
        c = self.config
        lines = [
            f"{c.method.upper()} INT{c.bits}, group_size={c.group_size}, symmetric={c.symmetric}",
            f"{'module':<{width}}  {'shape':>11}  {'group':>5}  {'W error':>8}  {'out error':>9}",
        ]
        for m in self.modules:
            out = f"{m.output_error:>9.4f}" if m.output_error is not None else f"{'-':>9}"
            lines.append(
                f"{m.name:<{width}}  {m.shape[0]:>5}x{m.shape[1]:<5}  {m.group_size:>5}  {m.weight_error:>8.4f}  {out}"
            )
        mean_out = self.mean_output_error
        lines.append(
            f"{'mean':<{width}}  {'':>11}  {'':>5}  {self.mean_weight_error:>8.4f}  "
            + (f"{mean_out:>9.4f}" if mean_out is not None else f"{'-':>9}")
        )
        return "\n".join(lines)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    norm = weight.float().norm()
    return float((weight.float() - approx).norm() / norm) if norm > 0 else 0.0


def quantize(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    method: str = "rtn",
    *,
    calibration: CalibrationData = None,
    tokenizer: Any = None,
    seq_len: int | None = None,
    num_samples: int = 128,
    batch_size: int = 8,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    modules: list[str] | None = None,
    keep_residual: bool = False,
    show_progress: bool = True,
) -> QuantizationReport:
    """Replace the linear layers inside the transformer layers by `QuantLinear`, in place (RTN or GPTQ).

    Args:
        model: a Hugging Face model of a supported architecture (llama, mistral, qwen2, phi3, gpt2, bert, roberta).
        bits, group_size, symmetric, method, damp_percent, act_order, block_size, seq_len, num_samples, batch_size,
            modules, keep_residual: see `QuantizationConfig`.
        calibration: calibration data (a `datasets.Dataset`, a list of texts with `tokenizer`, or token id tensors).
            Required for GPTQ, which quantizes layer by layer on the outputs of the already quantized layers. With
            RTN it is optional and only adds the output errors to the report.
        tokenizer: the model's tokenizer, when `calibration` holds text.

    Returns:
        A `QuantizationReport`. Save the model with `save_quantized` and load it back with `load_quantized`.

    Example:

    ```py
    >>> report = quantize(model, bits=4, group_size=128, method="gptq", calibration=texts, tokenizer=tokenizer)
    >>> save_quantized(model, "model-int4")
    ```
    """
    config = QuantizationConfig(
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        method=method,
        damp_percent=damp_percent,
        act_order=act_order,
        block_size=block_size,
        seq_len=seq_len,
        num_samples=num_samples,
        batch_size=batch_size,
        modules=modules,
        keep_residual=keep_residual,
    )
    start = time.perf_counter()
    targets = find_target_modules(model, config.modules, caller="quantize")
    group_sizes = {
        name: resolve_group_size(config.group_size, weight_out_in(module).shape[1], name)
        for target in targets
        for name, module in target.modules.items()
    }
    if config.method == "gptq" and calibration is None:
        raise ValueError(
            "method='gptq' needs calibration data: pass calibration=<a datasets.Dataset or a list of texts> (with "
            "tokenizer=<the model's tokenizer>), or use method='rtn'."
        )
    results: list[ModuleQuantization] = []

    def convert(path: str, module: nn.Module, stat: Hessian | None) -> None:
        weight = weight_out_in(module).detach()
        gs = group_sizes[path]
        if config.method == "gptq":
            codes, scales, zeros, residual = gptq_quantize(
                weight, stat.hessian, config.bits, gs, config.symmetric,
                damp_percent=config.damp_percent, act_order=config.act_order, block_size=config.block_size,
            )  # fmt: skip
            new = QuantLinear.from_linear(
                module, config.bits, gs, config.symmetric, qweight=codes, scales=scales, zeros=zeros,
                residual=residual if config.keep_residual else False,
            )  # fmt: skip
        else:
            new = QuantLinear.from_linear(module, config.bits, gs, config.symmetric, residual=config.keep_residual)
        approx = new.dequantize()
        error = output_error(weight, approx, stat.hessian) if stat is not None else None
        results.append(
            ModuleQuantization(path, tuple(weight.shape), config.bits, gs, _relative_error(weight, approx), error)
        )
        _replace(model, path, new)

    num_used = 0
    if calibration is None:
        for target in targets:
            for path, module in target.modules.items():
                convert(path, module, None)
    else:
        ids = calibration_ids(model, calibration, tokenizer, config.seq_len, config.num_samples)
        num_used = ids.shape[0]

        def make_statistic(path: str, module: nn.Module) -> Hessian:
            weight = weight_out_in(module)
            return Hessian(weight.shape[1], weight.device)

        run_layerwise(
            model, ids, targets, make_statistic, convert, config.batch_size, config.method, show_progress=show_progress
        )
    model.hf_elastic_quantization = config
    return QuantizationReport(config, results, num_used, time.perf_counter() - start)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_quantized(model: nn.Module, save_directory: str | Path) -> Path:
    """Write a model quantized by `quantize` to `save_directory`: config.json, model.safetensors and
    quantization_config.json, each file atomically. Returns the directory."""
    from . import __version__

    directory = Path(save_directory)
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ValueError("save_quantized found no QuantLinear in the model. Call quantize(model, ...) first.")
    state = model.state_dict()
    tensors, tied, seen = {}, {}, {}
    for key, tensor in state.items():
        ref = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ref in seen:
            tied[key] = seen[ref]
        else:
            seen[ref] = key
            tensors[key] = tensor
    config = getattr(model, "hf_elastic_quantization", None)
    first = next(iter(quant.values()))
    quant_config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "hf_elastic_version": __version__,
        "method": config.method if config is not None else None,
        "bits": config.bits if config is not None else first.bits,
        "group_size": config.group_size if config is not None else first.group_size,
        "symmetric": config.symmetric if config is not None else first.symmetric,
        "settings": config.to_dict() if config is not None else None,
        "model_class": type(model).__name__,
        "dtype": str(_model_dtype(model)).removeprefix("torch."),
        "tied": tied,
        "modules": {
            name: {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bits": m.bits,
                "group_size": m.group_size,
                "symmetric": m.symmetric,
                "bias": m.bias is not None,
                "residual": m.residual is not None,
            }
            for name, m in quant.items()
        },
    }
    atomic_save_safetensors(tensors, directory / QUANT_WEIGHTS_NAME)
    model_config = json.loads(model.config.to_json_string(use_diff=True))
    model_config["architectures"] = [type(model).__name__]
    atomic_write_json(directory / "config.json", model_config)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(model, "can_generate") and model.can_generate():
        atomic_write_json(directory / "generation_config.json", generation.to_diff_dict())
    atomic_write_json(directory / QUANT_CONFIG_NAME, quant_config)
    return directory


def _tie(model: nn.Module, alias: str, source: str) -> None:
    """Make `alias` the same parameter (or buffer) object as `source`, as it was when saved."""
    owner, _, attr = alias.rpartition(".")
    src_owner, _, src_attr = source.rpartition(".")
    setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(src_owner), src_attr))


def load_quantized(
    directory: str | Path, model_class: type[nn.Module] | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Rebuild a model written by `save_quantized`: from its config, with `QuantLinear` modules, bit for bit.

    `model_class` defaults to the transformers class named in `quantization_config.json`.
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    qc_path = directory / QUANT_CONFIG_NAME
    if not qc_path.is_file():
        raise FileNotFoundError(
            f"No {QUANT_CONFIG_NAME} in {directory}: it was not written by save_quantized. Load an unquantized model "
            "with from_pretrained instead."
        )
    qc = json.loads(qc_path.read_text())
    if qc.get("format") != FORMAT_NAME or qc.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{qc_path} has format={qc.get('format')!r} version {qc.get('format_version')}; this hf_elastic reads "
            f"{FORMAT_NAME!r} up to version {FORMAT_VERSION}. Upgrade hf_elastic."
        )
    if model_class is None:
        model_class = getattr(transformers, qc["model_class"], None)
        if model_class is None:
            raise ValueError(
                f"{qc_path} names model_class={qc['model_class']!r}, which transformers does not have. Pass "
                "model_class=<the model's class> to load_quantized."
            )
    config = AutoConfig.from_pretrained(directory)
    dtype = getattr(torch, qc["dtype"])
    with no_init_weights():
        model = model_class._from_config(config, dtype=dtype)
    tensors = load_file(directory / QUANT_WEIGHTS_NAME)
    for name, spec in qc["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{qc_path} lists module {name!r}, which {model_class.__name__} does not have.") from None
        new = QuantLinear(
            spec["in_features"],
            spec["out_features"],
            spec["bits"],
            spec["group_size"],
            spec["symmetric"],
            spec["bias"],
            dtype=dtype,
        )
        if spec.get("residual", False):
            new.residual = torch.zeros_like(new.qweight, dtype=torch.int8)
        for buffer in ("qweight", "scales", "zeros") + (("residual",) if new.residual is not None else ()):
            key, expected = f"{name}.{buffer}", getattr(new, buffer)
            if key not in tensors:
                raise ValueError(f"{directory / QUANT_WEIGHTS_NAME} has no {key!r}; the file is incomplete.")
            saved = tensors[key]
            if saved.shape != expected.shape or saved.dtype != expected.dtype:
                raise ValueError(
                    f"{key} in {QUANT_WEIGHTS_NAME} is {saved.dtype} {tuple(saved.shape)}, but {QUANT_CONFIG_NAME} "
                    f"(in_features={spec['in_features']}, out_features={spec['out_features']}, "
                    f"group_size={spec['group_size']}) needs {expected.dtype} {tuple(expected.shape)}. The two files "
                    "do not belong together: save the model again with save_quantized."
                )
        _replace(model, name, new.to(weight_out_in(old).device))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    untied = [k for k in missing if qc["tied"].get(k) not in tensors]
    for alias in missing:
        if alias not in untied:
            _tie(model, alias, qc["tied"][alias])
    if untied or unexpected:
        raise ValueError(
            f"{directory / QUANT_WEIGHTS_NAME} does not match {model_class.__name__}: missing {untied}, unexpected "
            f"{list(unexpected)}."
        )
    for name in qc["modules"]:
        module = model.get_submodule(name)
        if int(module.qweight.max()) > 2**module.bits - 1:
            raise ValueError(f"{name}.qweight holds codes above {2**module.bits - 1} for bits={module.bits}.")
    settings = qc.get("settings")
    if settings is not None:
        model.hf_elastic_quantization = QuantizationConfig(**settings)
    if device is not None:
        model.to(device)
    return model.eval()
