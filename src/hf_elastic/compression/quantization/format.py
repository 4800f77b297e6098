"""Group-wise INT4/INT8 weight quantization of the base model: round-to-nearest (RTN) and GPTQ.

Storage format
--------------
`QuantLinear` replaces an `nn.Linear` or a GPT-2 `Conv1D` (whose weight is transposed to (out, in) first). It has
the attributes `in_features`, `out_features`, `bits` (4 or 8), `group_size` (a divisor of `in_features`) and
`symmetric`, and holds as frozen parameters (`requires_grad=False`: DDP does not re-send them each forward as it does
buffers, and FSDP2 shards them with the layer; assigning a plain tensor wraps it)

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

and `forward(x) = F.linear(x, dequantize(x.dtype), bias)`; for backward it keeps the codes it already holds, not the
dequantized weight, and dequantizes again for the input's gradient. The asymmetric range of each group always contains
0 and zero points are integers, so a weight equal to 0 gets the code `z` and dequantizes to exactly 0: the zeros of a
sparse base model survive quantization. A group of zeros gets scale 1.

`save_quantized` writes `config.json`, `model.safetensors` (the state dict, with `qweight`/`scales`/`zeros` and any
`residual` in place of the quantized weights) and `quantization_config.json` (bits, group size, symmetric, method,
dtype and every quantized module); `load_quantized` rebuilds the model from them bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ...devices import full_tensor
from ...models.arch import weight_out_in
from .rtn import _grouped, compute_qparams, quantize_codes, residual_codes

QUANT_CONFIG_NAME = "quantization_config.json"
QUANT_WEIGHTS_NAME = "model.safetensors"
# the tensors of a `QuantLinear` that `dequantize_codes` reads: codes, per-group scales and zero points
GRID_TENSORS = ("qweight", "scales", "zeros")
QUANT_REPORT_NAME = "quantization_report.json"
FORMAT_NAME = "hf_elastic.QuantLinear"
FORMAT_VERSION = 2  # 2 added the optional `residual`
_BITS = (4, 8)
QUANT_TENSORS = ("qweight", "scales", "zeros", "residual")
"""The frozen parameters of a `QuantLinear` that hold its weight (codes, scales, zero points, optional residual)."""


def _check_bits(bits: Any, owner: str = "QuantizationConfig") -> None:
    if bits not in _BITS or isinstance(bits, bool):
        raise ValueError(f"{owner}.bits={bits!r} is not supported. Use bits=4 or bits=8.")


GROUP_SIZE_CANDIDATES = (128, 64, 32)


def default_group_size(in_features: Iterable[int], option: str = "group_size") -> int:
    """The largest of 128, 64 and 32 that divides every input size in `in_features` (the default group size).

    SmolLM2-135M's hidden size 576 gives 64; a hidden size of 96 gives 32. Raises when none of them divides them all.
    """
    sizes = sorted(set(in_features))
    if not sizes:
        raise ValueError(f"No input sizes to choose {option} for: the model has no layers to quantize.")
    for candidate in GROUP_SIZE_CANDIDATES:
        if all(size % candidate == 0 for size in sizes):
            return candidate
    raise ValueError(
        f"None of {'/'.join(map(str, GROUP_SIZE_CANDIDATES))} divides every input size {sizes}, so {option} has no "
        f"default. Pass {option}=<a divisor of {math.gcd(*sizes)}> or -1 for one group per output row."
    )


def group_size_note(group_size: int) -> str:
    """The line saying which default group size was chosen."""
    return (
        f"group size {group_size}: the largest of {'/'.join(map(str, GROUP_SIZE_CANDIDATES))} that divides every "
        "quantized input size"
    )


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


def expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat per-group values (out, groups) along the input dimension to (out, groups * group_size)."""
    return t.repeat_interleave(group_size, dim=1)


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


class _QuantLinearFunction(torch.autograd.Function):
    """`F.linear(x, layer.dequantize(x.dtype), bias)` that keeps nothing new for backward: it holds the layer's own
    codes, scales and zero points and dequantizes them again for the input's gradient (autograd would keep the
    dequantized copy, 2 to 4 bytes per weight)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.grid = (layer.qweight, layer.scales, layer.zeros, layer.group_size)
        ctx.version = layer.qweight._version
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros, group_size = ctx.grid
        if qweight._version != ctx.version:
            raise RuntimeError(
                "The codes of a QuantLinear changed between its forward and backward pass (a merge in between?); "
                "run backward first."
            )
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_codes(qweight, scales, zeros, group_size, grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None


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
        self.qweight = torch.full((out_features, in_features), zero, dtype=torch.uint8, device=device)
        self.scales = torch.ones(out_features, groups, dtype=torch.float32, device=device)
        self.zeros = torch.full((out_features, groups), zero, dtype=torch.uint8, device=device)
        self.register_parameter("residual", None)
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
        """The float weight (out_features, in_features) in `dtype` (whole, also where FSDP2 shards the layer)."""
        qweight, scales, zeros = (full_tensor(t) for t in (self.qweight, self.scales, self.zeros))
        return dequantize_codes(qweight, scales, zeros, self.group_size, dtype)

    def nonzero_mask(self) -> torch.Tensor:
        """Bool (out_features, in_features): where the weight is not zero (its code is not its group's zero point)."""
        return full_tensor(self.qweight) != expand_groups(full_tensor(self.zeros), self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        cache = getattr(self, "_weight_cache", None)
        if cache is not None and not torch.is_grad_enabled():
            key = (x.dtype, x.device, self.qweight.data_ptr(), self.qweight._version)
            if key not in cache:
                cache.clear()
                cache[key] = self.dequantize(x.dtype)
            return F.linear(x, cache[key], bias)
        return _QuantLinearFunction.apply(x, bias, self)

    @contextlib.contextmanager
    def cached_weight(self) -> Iterator[None]:
        """Within the block, forwards without gradients dequantize once and reuse the float weight (until the codes
        change): faster for many batches on the same codes, at the cost of a float copy of the weight."""
        self._weight_cache = {}
        try:
            yield
        finally:
            self._weight_cache = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in QUANT_TENSORS and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        scales = self.scales.detach()  # `Module._apply` may replace the parameter's data in place
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
