"""Upstream SQFT's SparsePEFT and QA-SparsePEFT formulations, re-implemented as peft LoRA layers for benchmarks.

These are baselines, not library code: they compute what upstream SQFT's patched peft computes, with plain autograd
through the expression, so `bench_peers.py` can time hf_elastic's fused layer against them on equal work.

- `UpstreamSparseLoraConfig` -> `UpstreamSparseLoraLinear`: `base(x) + F.linear(dropout(x), (B @ A) * scaling * M)`
  with the mask `M = (W != 0)` rebuilt from the base weight on every forward.
- `UpstreamQALoraConfig` -> `UpstreamQALoraLinear`: keeps the float (sparse) base weight `W` and computes
  `F.linear(dropout(x), DQ(Q(W + M ⊙ sBA)))` with `Q(w) = clamp(round_ste(w / s) + z, 0, 2**bits - 1)`,
  `DQ(q) = (q - z) * s`, round with a straight-through estimator, on round-to-nearest group scales `s` and zero
  points `z` of `W` (the same grid `hf_elastic.quantize` builds).

Both are wired like hf_elastic's own layer: a `LoraConfig` subclass registers the layer for `nn.Linear` through
peft's custom-module dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from hf_elastic.compression.quantization.rtn import compute_qparams


class UpstreamSparseLoraLinear(LoraLinear):
    """peft `lora.Linear` with upstream SQFT's sparse adapter: the delta is masked by the base's non-zeros."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        weight = self.get_base_layer().weight
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            mask = weight != 0  # rebuilt from the base weight on every forward, as upstream does
            delta = (b @ a) * self.scaling[adapter] * mask
            result = result + F.linear(self.lora_dropout[adapter](x.to(a.dtype)), delta).to(result.dtype)
        return result


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """`round(v)` forward, identity backward (straight-through estimator)."""
    return v + (torch.round(v) - v).detach()


class UpstreamQALoraLinear(LoraLinear):
    """peft `lora.Linear` with upstream SQFT's quantization-aware sparse adapter over a float copy of the weights."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        weight = self.get_base_layer().weight.detach()
        scales, zeros = compute_qparams(weight, config.bits, config.group_size, config.symmetric)
        self.bits, self.group_size = config.bits, config.group_size
        self.register_buffer("grid_scales", scales.float()[..., None], persistent=False)
        self.register_buffer("grid_zeros", zeros.float()[..., None], persistent=False)

    def adapted_weight(self, adapter: str) -> torch.Tensor:
        """`DQ(Q(W + M ⊙ sBA))` as (out, in), differentiable in the adapter through the straight-through round."""
        weight = self.get_base_layer().weight
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        mask = weight != 0
        w = weight + (b @ a) * self.scaling[adapter] * mask
        grouped = w.view(w.shape[0], -1, self.group_size)
        q = torch.clamp(round_ste(grouped / self.grid_scales) + self.grid_zeros, 0, 2**self.bits - 1)
        return ((q - self.grid_zeros) * self.grid_scales).view(w.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.lora_A]
        adapter = active[0]
        bias = self.get_base_layer().bias
        w = self.adapted_weight(adapter)
        return F.linear(self.lora_dropout[adapter](x.to(w.dtype)), w, bias).to(x.dtype)


@dataclass
class UpstreamSparseLoraConfig(LoraConfig):
    """LoRA whose `nn.Linear` targets get `UpstreamSparseLoraLinear`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._register_custom_module({nn.Linear: UpstreamSparseLoraLinear})


@dataclass
class UpstreamQALoraConfig(LoraConfig):
    """LoRA whose `nn.Linear` targets get `UpstreamQALoraLinear` on a `bits`-bit round-to-nearest group grid."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._register_custom_module({nn.Linear: UpstreamQALoraLinear})
