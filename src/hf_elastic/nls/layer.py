"""The elastic-rank LoRA layer that `NLSConfig` plugs into peft through its custom-module dispatch."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import transpose
from transformers.pytorch_utils import Conv1D


class ElasticLoraLinear(LoraLinear):
    """A peft `lora.Linear` (for `nn.Linear` and GPT-2 style `Conv1D`) whose rank can be lowered at run time.

    `active_rank[adapter]` selects the sub-network rank; it defaults to the stored rank `r[adapter]`. At the full rank
    the computation is the same as peft's LoRA layer.
    """

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
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
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.active_rank: dict[str, int] = {}

    def lora_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`lora_A` and `lora_B` weights cut to the active rank (views, no copy)."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        rank = self.active_rank.get(adapter, a.shape[0])
        if rank < a.shape[0]:
            a, b = a[:rank], b[:, :rank]
        return a, b

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.lora_weights(adapter)
        dtype = b.dtype
        if a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        return (transpose(b @ a, self.fan_in_fan_out) * self.scaling[adapter]).to(dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or self.lora_variant:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            a, b = self.lora_weights(adapter)
            h = self.lora_dropout[adapter](self._cast_input_dtype(x, a.dtype))
            result = result + F.linear(F.linear(h, a), b) * self.scaling[adapter]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "hf_elastic." + super().__repr__()
