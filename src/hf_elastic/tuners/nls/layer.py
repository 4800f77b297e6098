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
from ...devices import full_tensor, local_tensor

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


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool (out, in) as uint8 (out, ceil(in / 8)), eight columns per byte (column `8k + i` in bit `i` of byte `k`)."""
    pad = -mask.shape[1] % 8
    bits = F.pad(mask.to(torch.uint8), (0, pad)).view(mask.shape[0], -1, 8)
    return (bits << _bit_shifts(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The bool (out, `columns`) mask that `pack_mask` packed."""
    bits = (packed.unsqueeze(-1) >> _bit_shifts(packed.device)).bitwise_and_(1).view(torch.bool)
    return bits.view(packed.shape[0], -1)[:, :columns]


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)  # made on the device: no host-to-device copy


class _MaskedLora(torch.autograd.Function):
    """The adapted layer `F.linear(x, W + M ⊙ sBA, bias)` (or its QA form on the base's grid), without a dense float
    `W_eff` or delta stored for backward.

    Autograd through the expression would keep a dense `W_eff` (and its intermediates) per layer for the backward pass.
    On a float base this keeps only the adapter's input and the adapter and recomputes the masked delta in backward;
    the mask `M` comes bit-packed from the layer's cache (`packed`), so it costs no bytes per step. With dropout, `h`
    (the dropped input) enters only the adapter's product, as in peft: `F.linear(x, W, bias) + F.linear(h, M ⊙ sBA)`,
    and `h` is kept instead of `x`. On a quantized base (`quant`, the `QuantLinear`) it keeps the moved codes (uint8)
    and the gradient gate (bool, which holds `M`): two bytes per weight; backward only dequantizes them, instead of
    redoing the residual, rounding and clamping. The gradient of the masked delta, `M ⊙ (gᵀx)` (and the gate), is
    projected onto `A` and `B`. The delta is built in float32 outside autocast; the dense products run in the
    activations' and gradient's dtype, as for a plain `nn.Linear`.
    """

    @staticmethod
    def forward(ctx, x, h, weight, bias, a, b, scaling, packed, quant):
        mask = None if packed is None else unpack_mask(packed, x.shape[-1])
        bias = None if bias is None else bias.to(x.dtype)
        moved = gate = None
        with _full_precision(x.device):
            delta = _masked_delta(a.float(), b.float(), scaling, mask)
            if quant is not None:
                moved, gate = _grid_codes(_quant_grid(quant), delta, mask)
                moved = moved.to(torch.uint8)
                w_eff = _dequantize_moved(moved, *_quant_grid(quant)[1:3])
            elif h is None:
                w_eff = weight + delta
        ctx.scaling, ctx.quant, ctx.dropped = scaling, quant, h is not None
        if quant is not None:
            ctx.save_for_backward(x, a, b, moved, gate)
        else:
            ctx.save_for_backward(x if h is None else h, weight, a, b, packed)
        if h is None:
            return F.linear(x, w_eff.to(x.dtype), bias)
        return F.linear(x, weight.to(x.dtype), bias) + F.linear(h, delta.to(h.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_h = grad_bias = grad_a = grad_b = None
        if ctx.quant is not None:
            x, a, b, moved, gate = ctx.saved_tensors
            with _full_precision(x.device):
                w_eff = _dequantize_moved(moved, *_quant_grid(ctx.quant)[1:3])
        else:
            x, weight, a, b, packed = ctx.saved_tensors  # x is the dropped input with dropout
            gate = None if packed is None else unpack_mask(packed, x.shape[-1])
            with _full_precision(x.device):
                delta = _masked_delta(a.float(), b.float(), ctx.scaling, gate)
                w_eff = delta if ctx.dropped else weight + delta
        if ctx.dropped:
            if ctx.needs_input_grad[0]:
                grad_x = (g2 @ weight.to(g2.dtype)).reshape(grad.shape[:-1] + (weight.shape[1],))
            if ctx.needs_input_grad[1]:
                grad_h = (g2 @ w_eff.to(g2.dtype)).reshape(x.shape).to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = (g2 @ w_eff.to(g2.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_w = (g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(a.dtype)
            if gate is not None:
                grad_w = grad_w * gate
            grad_a, grad_b = (b * ctx.scaling).T @ grad_w, grad_w @ (a * ctx.scaling).T
        return grad_x, grad_h, None, grad_bias, grad_a, grad_b, None, None, None


def _quant_grid(base: QuantLinear) -> _Grid:
    """Codes (out, in) of a quantized base, its scales and zero points as (out, groups, 1) floats, the top code and
    the rounding residual (or None)."""
    return base.qweight, base.scales.float()[..., None], base.zeros.float()[..., None], 2**base.bits - 1, base.residual


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
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
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
        return _quant_grid(base) if isinstance(base, QuantLinear) else None

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): a view for `nn.Linear`/`Conv1D`, dequantized for `QuantLinear`."""
        base = self.get_base_layer()
        if isinstance(base, QuantLinear):
            return base.dequantize()
        return base.weight.T if isinstance(base, Conv1D) else base.weight

    def base_mask(self) -> torch.Tensor:
        """Where the base weight is non-zero, as (out, in) booleans (on a quantized base: code != zero point)."""
        return unpack_mask(self.packed_base_mask(), self.in_features)

    def packed_base_mask(self) -> torch.Tensor:
        """`base_mask` bit-packed by `pack_mask` (1/8 byte per weight), computed once and kept on the base's device.

        It is rebuilt when the base's weight (or codes and zero points) is replaced or changed in place, and after
        `merge`/`unmerge`, which write the weight through `.data`.
        """
        key = self._mask_key()
        if self._mask_cache is None or self._mask_cache[0] != key:
            base = self.get_base_layer()
            with torch.no_grad():
                mask = base.nonzero_mask() if isinstance(base, QuantLinear) else full_tensor(self.base_weight()) != 0
                self._mask_cache = (key, pack_mask(mask))
        return self._mask_cache[1]

    def _mask_key(self) -> tuple:
        base = self.get_base_layer()
        tensors = (base.qweight, base.zeros) if isinstance(base, QuantLinear) else (base.weight,)
        tensors = [local_tensor(t) for t in tensors]  # FSDP2: this rank's shard outside forward, the whole inside
        return tuple((t.data_ptr(), t._version, t.device, t.dtype, t.shape) for t in tensors)

    def _packed_mask(self, adapter: str) -> torch.Tensor | None:
        """The SparsePEFT mask, bit-packed; while merged, the one taken before the merge (which may add zeros)."""
        if not self.sparse_adapter.get(adapter):
            return None
        return self._merged_state[adapter] if adapter in self._merged_state else self.packed_base_mask()

    def _mask(self, adapter: str) -> torch.Tensor | None:
        """The SparsePEFT mask as (out, in) booleans (see `_packed_mask`), or None for a dense adapter."""
        packed = self._packed_mask(adapter)
        return None if packed is None else unpack_mask(packed, self.in_features)

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
                self._merged_state.setdefault("mask", self.packed_base_mask())
                if base.residual is not None:  # it belongs to the unmerged codes
                    self._merged_state["residual"] = base.residual
                    base.residual = None
                base.qweight.copy_(moved.view(base.qweight.shape).to(base.qweight.dtype))
                self.merged_adapters.append(name)
            else:
                if self.sparse_adapter.get(name):
                    self._merged_state[name] = self.packed_base_mask()
                super().merge(safe_merge, [name])
                self._mask_cache = None  # peft writes the weight through `.data`, which its version does not see

    def forget_unmerge(self) -> None:
        """Drop what `unmerge` would restore (the unmerged codes, rounding residual and base masks), for a merged layer
        that is being discarded, as `extract_model` does one layer at a time."""
        self._merged_state = {}

    def unmerge(self) -> None:
        """Undo `merge`; quantization-aware merges restore the saved base codes exactly."""
        mask = None
        if "codes" in self._merged_state:
            base = self.get_base_layer()
            base.qweight.copy_(self._merged_state["codes"])
            if "residual" in self._merged_state:
                base.residual = self._merged_state["residual"]
            self.merged_adapters = [n for n in self.merged_adapters if not self.quantization_aware.get(n)]
            mask = self._merged_state["mask"]
        if self.merged_adapters:
            super().unmerge()
            mask = None
        self._merged_state.clear()
        self._mask_cache = None
        if mask is not None:  # the codes are back bit for bit, and so is their mask
            self._mask_cache = (self._mask_key(), mask)

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
        quant = base if self.quantization_aware[adapter] else None
        h = None
        if self.training and not isinstance(dropout, nn.Identity):
            if quant is not None:
                raise ValueError("quantization_aware=True needs lora_dropout=0: dropout cannot act on a merged grid.")
            h = dropout(self._cast_input_dtype(x, a.dtype))
        weight = None if quant is not None else self.base_weight()
        packed = self._packed_mask(adapter)
        return _MaskedLora.apply(x, h, weight, base.bias, a, b, self.scaling[adapter], packed, quant)

    def __repr__(self) -> str:
        return "hf_elastic." + super().__repr__()
