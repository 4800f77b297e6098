"""The elastic-rank LoRA layer that `NLSConfig` plugs into peft through its custom-module dispatch."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import transpose
from transformers.pytorch_utils import Conv1D

from ...compression.quantization.format import QuantLinear
from ...compression.quantization.rtn import RESIDUAL_STEPS

# codes (out, in), scales and zero points (out, groups, 1), top code, residual (out, in) int8 or None
_Grid = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None]


def _masked_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    delta = (b @ a) * scaling
    return delta if mask is None else delta * mask


def _grouped(t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An (out, in) tensor viewed as (out, groups, group_size) to broadcast against (out, groups, 1) scales."""
    return t.view(scales.shape[0], scales.shape[1], -1)


def _moved_codes(grid: _Grid, delta: torch.Tensor) -> torch.Tensor:
    """Base codes shifted by `round(residual + delta / scale)`, before clamping to the code range, as (out, groups,
    size): `round(W / s + z + delta / s)` when the base kept its rounding residual, `q + round(delta / s)` if not."""
    codes, scales, _, _, residual = grid
    steps = _grouped(delta, scales) / scales
    if residual is not None:
        steps = steps + _grouped(residual, scales).float() / RESIDUAL_STEPS
    return _grouped(codes, scales) + torch.round(steps)


def _grid_codes(
    grid: _Grid, delta: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of the adapted weight on the base's grid, `_moved_codes` clamped to the code range, as floats (out,
    groups, size); and the gradient gate (out, in): where the codes stayed inside the range (straight-through
    estimator for `round`, zero gradient where `clamp` cut), and `mask`."""
    moved = _moved_codes(grid, delta)
    qmax = grid[3]
    gate = ((moved >= 0) & (moved <= qmax)).view(delta.shape)
    if mask is not None:
        gate &= mask
    return moved.clamp_(0, qmax), gate


def _dequantize_moved(moved: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """`(q - z) * s` of clamped codes `moved` (out, groups, size) as a float32 (out, in) weight."""
    return ((moved.float() - zeros) * scales).view(moved.shape[0], -1)


def _full_precision(device: torch.device) -> AbstractContextManager:
    """Autocast switched off on `device`, so that the adapted weight is built in float32 under mixed precision too."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def _effective_weight(
    weight: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    grid: _Grid | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The adapted weight `W + M ⊙ sBA` (fp base) or `DQ(Q(W + M ⊙ sBA))` on the base's grid, in float32, and the
    gradient gate. The delta is computed in float32 whatever the dtypes of the weights, so a bf16/fp16 base is rounded
    once, when the caller casts the result, as peft's merge rounds it.

    On a quantized base `weight` is unused: the codes move by `round(r + M ⊙ sBA / scale)` (`r` the base's rounding
    residual, 0 if it kept none), clamped to the code range, so the result lies on the base's grid; the gate is `M`
    and the codes that stayed inside the range (straight-through estimator for `round`, zero gradient where `clamp`
    cut).
    """
    delta = _masked_delta(a.float(), b.float(), scaling, mask)
    if grid is None:
        return weight + delta, mask
    moved, gate = _grid_codes(grid, delta, mask)
    return _dequantize_moved(moved, grid[1], grid[2]), gate


class _MaskedLora(torch.autograd.Function):
    """`F.linear(x, W_eff, bias)` with `W_eff` from `_effective_weight`, not stored for backward as a dense float.

    Autograd through the expression would keep a dense `W_eff` (and its intermediates) per layer for the backward pass.
    On a float base this keeps only `x` and the adapter and recomputes `W_eff` in backward; on a quantized base it
    keeps the moved codes (uint8) and the gradient gate (bool), two bytes per weight, and backward only dequantizes
    them, instead of redoing the residual, rounding and clamping. The gradient of the masked delta, `M ⊙ (gᵀx)` (and
    the gate), is projected onto `A` and `B`. `W_eff` is built in float32 outside autocast; the two dense products
    (`F.linear` and `gᵀx`) run in the activations' and gradient's dtype, as for a plain `nn.Linear`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, mask, codes, scales, zeros, qmax, residual):
        moved = gate = None
        with _full_precision(x.device):
            if codes is None:
                w_eff, _ = _effective_weight(weight, a, b, scaling, mask, None)
            else:
                grid = (codes, scales, zeros, qmax, residual)
                moved, gate = _grid_codes(grid, _masked_delta(a.float(), b.float(), scaling, mask), mask)
                moved = moved.to(torch.uint8)
                w_eff = _dequantize_moved(moved, scales, zeros)
        ctx.scaling = scaling
        ctx.save_for_backward(x, weight, a, b, mask, moved, gate, scales, zeros)
        return F.linear(x, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, mask, moved, gate, scales, zeros = ctx.saved_tensors
        with _full_precision(x.device):
            if moved is None:
                w_eff, gate = _effective_weight(weight, a, b, ctx.scaling, mask, None)
            else:
                w_eff = _dequantize_moved(moved, scales, zeros)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ w_eff.to(g2.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_w = (g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(a.dtype)
            if gate is not None:
                grad_w = grad_w * gate
            grad_a, grad_b = (b * ctx.scaling).T @ grad_w, grad_w @ (a * ctx.scaling).T
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None, None, None


class ElasticLoraLinear(LoraLinear):
    """A peft `lora.Linear` (for `nn.Linear`, GPT-2 style `Conv1D` and hf_elastic's `QuantLinear`) whose rank can be
    lowered at run time.

    `active_rank[adapter]` selects the sub-network rank; it defaults to the stored rank `r[adapter]`. At the full rank
    the computation is the same as peft's LoRA layer. With `sparse_adapter` the delta is masked by the base weight's
    non-zero pattern (SparsePEFT); with `quantization_aware` the adapted weight is put on the base's INT4/INT8 grid
    (QA-SparsePEFT) and merging writes new integer codes with the same scales and zero points.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        is_conv1d = isinstance(base, Conv1D)
        if is_conv1d != config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(base).__name__}; "
                f"setting fan_in_fan_out={is_conv1d}.",
                stacklevel=2,
            )
            config.fan_in_fan_out = is_conv1d
        kwargs["is_target_conv_1d_layer"] = is_conv1d
        self.active_rank: dict[str, int] = {}
        self.sparse_adapter: dict[str, bool] = {}
        self.quantization_aware: dict[str, bool] = {}
        self._merged_state: dict[str, torch.Tensor] = {}
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        base = self.get_base_layer()
        quantization_aware = bool(getattr(config, "quantization_aware", False))
        if quantization_aware and not isinstance(base, QuantLinear):
            raise ValueError(
                f"quantization_aware=True needs a base quantized with hf_elastic.quantize, but target module "
                f"{kwargs.get('target_name', '?')!r} is {type(base).__name__}. Quantize the base model first, leave "
                "the module out of target_modules (or add it to exclude_modules), or set quantization_aware=False."
            )
        self.quantization_aware[adapter_name] = quantization_aware
        if quantization_aware and base.residual is None:
            warnings.warn(
                "quantization_aware=True on a base quantized without its rounding residual: the adapter trains "
                "through the codes alone, so a code moves only once its delta passes half a grid step and training "
                "is slow. Quantize with hf_elastic.quantize(..., keep_residual=True) unless the float weights are "
                "gone.",
                stacklevel=2,
            )
        self.sparse_adapter[adapter_name] = bool(getattr(config, "sparse_adapter", False))
        if self.sparse_adapter[adapter_name] and bool(self.base_mask().all()):
            warnings.warn(
                "sparse_adapter=True, but a targeted base weight has no zeros, so its adapter is not masked. "
                "Sparsify the base first (hf_elastic.sparsify) if you meant to keep its sparsity.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ base weight, mask and grid
    def base_grid(self) -> _Grid | None:
        """Codes (out, in) of a quantized base, its scales and zero points as (out, groups, 1) floats, the top code and
        the rounding residual (or None)."""
        base = self.get_base_layer()
        if not isinstance(base, QuantLinear):
            return None
        scales, zeros = base.scales.float()[..., None], base.zeros.float()[..., None]
        return base.qweight, scales, zeros, 2**base.bits - 1, base.residual

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): a view for `nn.Linear`/`Conv1D`, dequantized for `QuantLinear`."""
        base = self.get_base_layer()
        if isinstance(base, QuantLinear):
            return base.dequantize()
        return base.weight.T if isinstance(base, Conv1D) else base.weight

    def base_mask(self) -> torch.Tensor:
        """Where the base weight is non-zero, as (out, in) booleans (on a quantized base: code != zero point)."""
        base = self.get_base_layer()
        return base.nonzero_mask() if isinstance(base, QuantLinear) else self.base_weight() != 0

    def _mask(self, adapter: str) -> torch.Tensor | None:
        """The SparsePEFT mask; while merged, the one taken before the merge (a merge could create new zeros)."""
        if not self.sparse_adapter.get(adapter):
            return None
        return self._merged_state[adapter] if adapter in self._merged_state else self.base_mask()

    # ------------------------------------------------------------------ adapter
    def lora_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`lora_A` and `lora_B` weights cut to the active rank (views, no copy)."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        rank = self.active_rank.get(adapter, a.shape[0])
        if rank < a.shape[0]:
            a, b = a[:rank], b[:, :rank]
        return a, b

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.lora_weights(adapter)
        with _full_precision(a.device):
            delta = _masked_delta(a.float(), b.float(), self.scaling[adapter], self._mask(adapter))
            grid = self.base_grid() if self.quantization_aware.get(adapter) else None
            if grid is not None:
                codes, scales = grid[:2]
                moved, _ = _grid_codes(grid, delta)
                delta = ((moved - _grouped(codes, scales)) * scales).view(delta.shape)
        return transpose(delta, self.fan_in_fan_out).to(b.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge like peft; sparse adapters keep every base zero, quantization-aware ones write new integer codes."""
        names = [
            n for n in (adapter_names or self.active_adapters) if n in self.lora_A and n not in self.merged_adapters
        ]
        for name in names:
            if self.quantization_aware.get(name):
                base, grid = self.get_base_layer(), self.base_grid()
                a, b = (w.float() for w in self.lora_weights(name))
                with _full_precision(a.device):
                    moved, _ = _grid_codes(grid, _masked_delta(a, b, self.scaling[name], self._mask(name)))
                self._merged_state.setdefault("codes", base.qweight.clone())
                if base.residual is not None:  # it belongs to the unmerged codes
                    self._merged_state["residual"] = base.residual
                    base.residual = None
                base.qweight.copy_(moved.view(base.qweight.shape).to(base.qweight.dtype))
                self.merged_adapters.append(name)
            else:
                if self.sparse_adapter.get(name):
                    self._merged_state[name] = self.base_mask()
                super().merge(safe_merge, [name])

    def unmerge(self) -> None:
        """Undo `merge`; quantization-aware merges restore the saved base codes exactly."""
        if "codes" in self._merged_state:
            base = self.get_base_layer()
            base.qweight.copy_(self._merged_state["codes"])
            if "residual" in self._merged_state:
                base.residual = self._merged_state["residual"]
            self.merged_adapters = [n for n in self.merged_adapters if not self.quantization_aware.get(n)]
        if self.merged_adapters:
            super().unmerge()
        self._merged_state.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or self.lora_variant:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.lora_A]
        masked = [n for n in active if self.sparse_adapter.get(n) or self.quantization_aware.get(n)]
        if masked:
            if len(active) > 1:
                raise ValueError(
                    f"Adapters {active} are active together; a sparse or quantization-aware adapter must be the only "
                    "active adapter. Call set_adapter with one of them."
                )
            return self._masked_forward(x, masked[0])
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in active:
            a, b = self.lora_weights(adapter)
            h = self.lora_dropout[adapter](self._cast_input_dtype(x, a.dtype))
            result = result + F.linear(F.linear(h, a), b) * self.scaling[adapter]
        return result.to(result_dtype)

    def _masked_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        a, b = self.lora_weights(adapter)
        base = self.get_base_layer()
        dropout = self.lora_dropout[adapter]
        if self.training and not isinstance(dropout, nn.Identity):
            if self.quantization_aware[adapter]:
                raise ValueError("quantization_aware=True needs lora_dropout=0: dropout cannot act on a merged grid.")
            delta = _masked_delta(a, b, self.scaling[adapter], self._mask(adapter))
            return self.base_layer(x) + F.linear(dropout(x.to(a.dtype)), delta).to(x.dtype)
        grid = self.base_grid() if self.quantization_aware[adapter] else None
        weight = None if grid is not None else self.base_weight()
        codes, scales, zeros, qmax, residual = grid if grid is not None else (None, None, None, 0, None)
        mask = self._mask(adapter)
        return _MaskedLora.apply(
            x, weight, base.bias, a, b, self.scaling[adapter], mask, codes, scales, zeros, qmax, residual
        )

    def __repr__(self) -> str:
        return "hf_elastic." + super().__repr__()
