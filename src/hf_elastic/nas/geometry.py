"""`SubnetGeometry`: the sizes of a super-network's base linear layers under each sub-network config.

`SuperNetwork` builds and owns it (`supernet.geometry`); `nas.costs` and `nas.importance` read it, so neither needs
the super-network itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..compression.quantization.format import QuantLinear
from ..models.arch import WidthLayer, base_layer, weight_out_in
from ..tuners.elastic_lora.width import WIDTH_KINDS, kept_units, unit_count, width_key

# (rows, cols) kept of a base linear layer: index tensors, None where the dimension is whole
Cut = tuple[torch.Tensor | None, torch.Tensor | None]


def linear_sizes(base: nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer of a base model (float, Conv1D or quantized), by path.

    Adapter modules (`lora_*`) are left out, and a peft-wrapped layer is listed under its own path, not its
    `base_layer`'s.
    """
    return {
        name: (base_layer(m).out_features, base_layer(m).in_features)
        if isinstance(base_layer(m), QuantLinear)
        else tuple(weight_out_in(m).shape)
        for name, m in base.named_modules()
        if isinstance(base_layer(m), (nn.Linear, Conv1D, QuantLinear))
        and not any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))
    }


@dataclass
class SubnetGeometry:
    """Full (out, in) sizes of every base linear layer, the width layers, and the units a sub-network keeps in them.

    Args:
        linear_sizes: (out_features, in_features) of each base linear layer by module path (see `linear_sizes`).
        width_layers: the transformer layers with an elastic width (empty for elastic ranks only).
        channel_order: importance order of the units, most important first, as `ElasticLoraConfig.channel_order`;
            a narrower sub-network keeps the first ones (missing entries: the original order).
    """

    linear_sizes: dict[str, tuple[int, int]]
    width_layers: list[WidthLayer] = field(default_factory=list)
    channel_order: dict[str, list[int]] | None = None
    _orders: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def set_channel_order(self, channel_order: dict[str, list[int]] | None) -> None:
        """Use a new importance order (e.g. after `SuperNetwork.reorder_channels`) for the kept units."""
        self.channel_order = channel_order
        self._orders.clear()

    def kept_units(self, layer: WidthLayer, kind: str, value: int | None) -> torch.Tensor | None:
        """Sorted indices of the FFN channels or key/value groups kept at `value`; None when nothing is cut."""
        key = width_key(layer, kind)
        if key not in self._orders:
            order = (self.channel_order or {}).get(key)
            self._orders[key] = torch.tensor(order) if order is not None else torch.arange(unit_count(layer, kind))
        return kept_units(layer, kind, value, self._orders[key])

    def kept_indices(self, config: Mapping[str, int]) -> dict[str, Cut]:
        """The kept rows and columns of every base linear layer that `config` narrows, by module path."""
        cuts: dict[str, Cut] = {}
        for layer in self.width_layers:
            for kind in WIDTH_KINDS:
                keep = self.kept_units(layer, kind, config.get(width_key(layer, kind)))
                if keep is None:
                    continue
                slices = layer.ffn_slices(keep) if kind == "ffn" else layer.head_slices(keep)
                cuts.update({layer.path(rel): cut for rel, cut in slices.items()})
        return cuts

    def sizes(self, config: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every base linear layer in the sub-network `config`."""
        sizes = dict(self.linear_sizes)
        for path, (rows, cols) in self.kept_indices(config).items():
            out_f, in_f = sizes[path]
            sizes[path] = (len(rows) if rows is not None else out_f, len(cols) if cols is not None else in_f)
        return sizes
