"""LoNAS elastic width: the widths each layer may take, which units a width keeps, and the masks that apply it.

A width sub-network keeps, per transformer layer, the first FFN channels and key/value groups of `channel_order`
(`ElasticLoraConfig.channel_order`; default: the original order). During training the dropped units are masked: the
input channels of the FFN down projection and of the attention output projection are zeroed by forward pre-hooks,
which is exactly what removing the channels or heads computes. `models.arch.slice_layer_width` removes them for real
when a sub-network is extracted.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ...models.arch import WidthLayer, weight_out_in
from .config import ElasticLoraConfig

WIDTH_KINDS = ("ffn", "heads")


def width_key(layer: WidthLayer, kind: str) -> str:
    """The name of a layer's width dimension and of its `channel_order` entry: `"<layer>.ffn"` or `"<layer>.heads"`."""
    return f"{layer.index}.{kind}"


def unit_count(layer: WidthLayer, kind: str) -> int:
    """How many units a width kind cuts in: FFN channels (`"ffn"`) or key/value groups (`"heads"`)."""
    return layer.ffn_dim if kind == "ffn" else layer.num_kv_heads


def _resolve(name: str, value: float | int, full: int) -> int:
    if isinstance(value, float):
        resolved = value * full
        if abs(resolved - round(resolved)) > 1e-6:
            raise ValueError(f"{name} value {value} gives {resolved:g} of {full}, not a whole number; pick another.")
        return round(resolved)
    return value


def width_choices(config: ElasticLoraConfig, layer: WidthLayer) -> dict[str, tuple[int, ...]]:
    """The FFN widths (`"ffn"`) and head counts (`"heads"`) that `config` allows in `layer`, as absolute sizes."""
    choices = {}
    if config.ffn_width_choices:
        values = [_resolve("ffn_width_choices", v, layer.ffn_dim) for v in config.ffn_width_choices]
        bad = [v for v in values if not 1 <= v <= layer.ffn_dim]
        if bad:
            raise ValueError(
                f"ffn_width_choices={config.ffn_width_choices} gives widths {bad} outside [1, {layer.ffn_dim}]"
                f" for layer {layer.index}."
            )
        choices["ffn"] = tuple(values)
    if config.head_choices:
        values = [_resolve("head_choices", v, layer.num_heads) for v in config.head_choices]
        bad = [v for v in values if v % layer.group_size or not layer.group_size <= v <= layer.num_heads]
        if bad:
            raise ValueError(
                f"head_choices={config.head_choices} gives head counts {bad} that are not whole key/value "
                f"groups: layer {layer.index} has {layer.num_heads} heads in {layer.num_kv_heads} groups of "
                f"{layer.group_size}. Use multiples of {layer.group_size} up to {layer.num_heads}."
            )
        choices["heads"] = tuple(values)
    return choices


def check_channel_order(order: Mapping[str, list[int]] | None, layers: list[WidthLayer]) -> None:
    """Every entry of `channel_order` must be a permutation of its layer's FFN channels or key/value groups."""
    units = {width_key(layer, kind): unit_count(layer, kind) for layer in layers for kind in WIDTH_KINDS}
    for key, permutation in (order or {}).items():
        if key not in units:
            raise ValueError(f"channel_order has {key!r}, which names no width dimension ({sorted(units)[:4]}).")
        if sorted(permutation) != list(range(units[key])):
            raise ValueError(
                f"channel_order[{key!r}] must be a permutation of 0..{units[key] - 1}, got {len(permutation)} entries "
                f"from {min(permutation, default=None)} to {max(permutation, default=None)}. Reorder again with "
                "reorder_channels or remove the entry."
            )


def kept_units(layer: WidthLayer, kind: str, value: int | None, order: torch.Tensor | None) -> torch.Tensor | None:
    """Sorted indices of the FFN channels (`value` a width) or key/value groups (`value` a head count) kept at
    `value`: the first ones of `order` (None: the original order). None when nothing is cut."""
    units = unit_count(layer, kind)
    count = value if kind == "ffn" or value is None else value // layer.group_size
    if count is None or count == units:
        return None
    order = torch.arange(units) if order is None else order
    return order[:count].sort().values


class WidthMasks:
    """Forward pre-hooks that run each layer's FFN down projection and attention output projection on the kept input
    channels only (the others are multiplied by 0), so the base model computes a width sub-network.

    `keep(layer, kind, units)` sets the units a layer keeps (None: all of them); `remove()` detaches the hooks. The
    mask of each kept set is built once, on the layer's device, and reused whenever the same units come back, so
    switching sub-networks (every training step) copies nothing from the host.
    """

    def __init__(self, base: nn.Module, layers: list[WidthLayer]) -> None:
        self.base = base
        self._masks: dict[str, torch.Tensor] = {}
        self._built: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for layer in layers:
            for rel in (layer.spec.ffn_out, layer.spec.attn_out):
                path = layer.path(rel)
                hook = functools.partial(WidthMasks._mask_input, self, path)
                self._hooks.append(base.get_submodule(path).register_forward_pre_hook(hook))

    def keep(self, layer: WidthLayer, kind: str, units: torch.Tensor | None) -> None:
        """Let `layer` compute with the FFN channels or key/value groups `units` only (sorted; None: all)."""
        rel = layer.spec.ffn_out if kind == "ffn" else layer.spec.attn_out
        path = layer.path(rel)
        if units is None:
            self._masks.pop(path, None)
            return
        built = self._built.setdefault(path, [])
        weight = weight_out_in(self.base.get_submodule(path))
        for kept, mask in built:
            if kept.shape == units.shape and torch.equal(kept, units) and mask.device == weight.device:
                break
        else:
            cols = (layer.ffn_slices(units) if kind == "ffn" else layer.head_slices(units))[rel][1]
            mask = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
            mask[cols.to(weight.device)] = 1
            built.append((units.clone(), mask))
        self._masks[path] = mask

    def _mask_input(self, path: str, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        mask = self._masks.get(path)
        if mask is None:
            return None
        x = args[0]
        return (x * mask.to(dtype=x.dtype, device=x.device), *args[1:])

    def remove(self) -> None:
        """Detach the hooks (the base then always runs at full width)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._masks.clear()
        self._built.clear()
