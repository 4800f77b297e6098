"""Costs of a sub-network that see compression: non-zero parameters and bytes at the stored precision.

`SuperNetwork.count` reports `params`, which are the same for a dense, a 50 %-sparse and an INT4 sub-network. The two
costs here tell them apart:

- `nonzero_params`: base parameters that are not zero (the zeros of a pruned base do not count; a quantized weight
  counts when its code differs from its group's zero point, i.e. when it dequantizes to a non-zero value), plus the
  adapter parameters. A sparse adapter (`sparse_adapter=True`, SparsePEFT/QA-SparsePEFT) merges into the base's
  non-zero pattern, so it adds nothing (a quantization-aware merge re-rounds the codes, so a few weights may then
  land on their zero point: the count is an upper bound there); any other adapter counts in full, as a separate
  low-rank adapter.
- `bytes`: the base at its stored precision (a `QuantLinear` stores `bits / 8` bytes per code, a float32 scale and a
  `bits / 8`-byte zero point per group of each row, and its bias at its dtype; other weights take their dtype's size;
  pruned weights are stored dense), plus the adapter at its dtype (nothing for a sparse adapter, which is merged).

Both cover the kept rows and columns of a width sub-network; buffers (e.g. rotary tables) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..compression.quantization.format import QuantLinear
from ..devices import full_tensor
from ..models.arch import base_layer, weight_out_in
from .geometry import SubnetGeometry

COMPRESSION_COSTS = ("nonzero_params", "bytes")


@dataclass
class _Linear:
    """What the costs need of one base linear layer, computed once (the base is frozen during NAS)."""

    module: nn.Module  # the base layer, for a sub-network that cuts both its rows and its columns
    row_nonzero: torch.Tensor  # (out,) non-zero weights per row
    col_nonzero: torch.Tensor  # (in,) non-zero weights per column
    quant_bits: int | None  # bits of a QuantLinear, None for a float weight
    group_size: int
    weight_bytes: int  # element size of a float weight
    bias_bytes: int  # element size of the bias, 0 without bias


def _nonzero_mask(base: nn.Module) -> torch.Tensor:
    """Bool (out, in): which weights are not zero (a quantized weight: its code is not its group's zero point)."""
    return base.nonzero_mask() if isinstance(base, QuantLinear) else full_tensor(weight_out_in(base).detach()) != 0


def _linear_info(module: nn.Module) -> _Linear:
    base = base_layer(module)
    mask = _nonzero_mask(base)
    bias = getattr(base, "bias", None)
    bias_bytes = bias.element_size() if bias is not None else 0
    quantized = isinstance(base, QuantLinear)
    return _Linear(
        base,
        mask.sum(1).cpu(),
        mask.sum(0).cpu(),
        base.bits if quantized else None,
        base.group_size if quantized else 1,
        0 if quantized else weight_out_in(base).element_size(),
        bias_bytes,
    )


def _linear_costs(info: _Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> tuple[int, int]:
    out_f = len(info.row_nonzero) if rows is None else len(rows)
    in_f = len(info.col_nonzero) if cols is None else len(cols)
    if rows is not None and cols is not None:
        mask = _nonzero_mask(info.module)
        nonzero = int(mask[rows.to(mask.device)][:, cols.to(mask.device)].sum())
    elif rows is not None:
        nonzero = int(info.row_nonzero[rows.cpu()].sum())
    else:
        nonzero = int(info.col_nonzero[cols.cpu()].sum() if cols is not None else info.row_nonzero.sum())
    nbytes = out_f * info.bias_bytes
    if info.quant_bits is None:
        return nonzero, nbytes + out_f * in_f * info.weight_bytes
    full_in = len(info.col_nonzero)
    groups = full_in // info.group_size if cols is None else len(torch.unique(cols.cpu() // info.group_size))
    packed_bits = out_f * (in_f + groups) * info.quant_bits  # codes and zero points at `bits` each
    return nonzero, nbytes + math.ceil(packed_bits / 8) + out_f * groups * 4  # float32 scales


class CompressionCosts:
    """`nonzero_params` and `bytes` of the sub-networks of one frozen base model; see the module docstring.

    Args:
        base: the base model (with its adapter layers in place).
        geometry: the super-network's `SubnetGeometry`.
        adapters: the elastic adapter layers, by module path.
        adapter_name: the adapter whose parameters count.
        adapter_merges: whether the adapter merges into the base's non-zero pattern (a sparse or quantization-aware
            adapter), so that it adds nothing.

    Building it reads every base weight once; `SuperNetwork` builds it on first use.
    """

    def __init__(
        self,
        base: nn.Module,
        geometry: SubnetGeometry,
        adapters: Mapping[str, nn.Module],
        adapter_name: str,
        adapter_merges: bool,
    ) -> None:
        self.geometry, self.adapter_merges = geometry, adapter_merges
        self.linears = {name: _linear_info(base.get_submodule(name)) for name in geometry.linear_sizes}
        seen = set()
        for name in self.linears:
            layer = base_layer(base.get_submodule(name))
            seen.update(id(t) for t in layer.parameters(recurse=False))  # weight and bias, or codes, scales, ...
        self.other_nonzero, self.other_bytes = 0, 0
        for name, param in base.named_parameters():
            if "lora_" in name or id(param) in seen:
                continue
            seen.add(id(param))
            self.other_nonzero += int((full_tensor(param.detach()) != 0).sum())
            self.other_bytes += param.numel() * param.element_size()
        self.adapter_bytes = {
            key: module.lora_A[adapter_name].weight.element_size() for key, module in adapters.items()
        }
        self.fixed_adapter_bytes = sum(
            p.numel() * p.element_size()
            for n, p in base.named_parameters()
            if "lora_" in n and f".{adapter_name}" in n and n.rsplit(".lora_", 1)[0] not in adapters
        )

    def __call__(self, config: Mapping[str, int], ranks: Mapping[str, int], adapter_params: int) -> dict[str, int]:
        """The costs of the sub-network `config` (a resolved config) with adapter `ranks` by module path and
        `adapter_params` adapter parameters."""
        cuts = self.geometry.kept_indices(config)
        nonzero, nbytes = self.other_nonzero, self.other_bytes
        for name, info in self.linears.items():
            n, b = _linear_costs(info, *cuts.get(name, (None, None)))
            nonzero, nbytes = nonzero + n, nbytes + b
        if not self.adapter_merges:
            sizes = self.geometry.sizes(config)
            nonzero += adapter_params
            nbytes += sum(ranks[k] * sum(sizes[k]) * size for k, size in self.adapter_bytes.items())
            nbytes += self.fixed_adapter_bytes
        return {"nonzero_params": nonzero, "bytes": nbytes}
