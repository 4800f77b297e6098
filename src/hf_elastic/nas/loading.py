"""Load a saved super-adapter as a super-network, and merge extracted sub-adapters the way they were trained."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ..tuners.nls.config import ADAPTER_CONFIG_NAME, NLSConfig, is_stock_load_guard
from ..utils import SUBNET_CONFIG_NAME, load_safetensors
from .supernet import base_fingerprint, get_supernet


def load_super_network(
    model: nn.Module, path: str | Path, adapter_name: str = "default", *, strict: bool = False, **kwargs: Any
) -> PeftModel:
    """Load a saved super-adapter (`adapter_config.json` + `elastic_config.json`) onto `model` as a super-network.

    The adapter's record of its base (`base_fingerprint`) is compared with `model`: another base gives a warning, or
    a `ValueError` with `strict=True`. Keyword arguments go to `PeftModel.from_pretrained` (e.g. `is_trainable=True`).
    """
    config = NLSConfig.from_pretrained(str(path))
    weights = Path(path, SAFETENSORS_WEIGHTS_NAME)
    if Path(path).is_dir():
        load_safetensors(weights, "save the super-adapter again")
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config, **kwargs)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
        raise ValueError(
            f"The adapter in {path} does not fit this base model ({first}). It was trained on a base with other "
            "shapes (hidden size, heads, layers), or adapter_config.json's r does not match the stored weights."
        ) from None
    recorded = config.base_fingerprint
    config.base_fingerprint = None
    supernet = get_supernet(peft_model, adapter_name)
    found = supernet.config.base_fingerprint
    supernet.config.base_fingerprint = recorded or found
    if recorded is not None and recorded != found:
        message = (
            f"The adapter in {path} was trained on another base model (base fingerprint {recorded}, this model "
            f"{found}): its weights, sparsity or quantization differ. Load it onto the base it was trained on."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return peft_model


def merge_subnet_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter written by `SuperNetwork.extract_adapter` onto `model` and merge it.

    A sparse adapter's delta is masked with the base's zeros, which stock peft's `merge_and_unload` would fill in; the
    result equals the sparse sub-network of the super-network. Quantization-aware adapters need the super-network:
    use `SuperNetwork.extract_model`.
    """
    path = Path(path)
    info = json.loads((path / SUBNET_CONFIG_NAME).read_text()) if (path / SUBNET_CONFIG_NAME).is_file() else {}
    if info.get("quantization_aware"):
        raise ValueError(
            f"{path} holds a quantization-aware adapter; its merge needs the INT4 base's grid. Load the super-adapter "
            "with load_super_network and call get_supernet(model).extract_model(config)."
        )
    config = LoraConfig.from_pretrained(str(path))
    if is_stock_load_guard(config.target_modules):
        if info.get("target_modules") is None:
            raise ValueError(
                f"{path / SUBNET_CONFIG_NAME} has no 'target_modules', which this sparse adapter needs: its "
                f"{ADAPTER_CONFIG_NAME} names no module. Extract the adapter again with SuperNetwork.extract_adapter."
            )
        targets = info["target_modules"]
        config.target_modules = targets if isinstance(targets, str) else set(targets)
    peft_model = PeftModel.from_pretrained(model, str(path), config=config)
    recorded = info.get("base_fingerprint")
    layers = {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    found = base_fingerprint(layers)
    if recorded is not None and recorded != found:
        warnings.warn(
            f"The sub-adapter in {path} was extracted from a super-network on another base model (fingerprint "
            f"{recorded}, this model {found}); merge it onto the base it was trained on.",
            stacklevel=2,
        )
    if not info.get("sparse_adapter"):
        return peft_model.merge_and_unload()
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                for name in module.active_adapters:  # float32 deltas: a bf16 weight is rounded once, as by peft
                    weight += module.get_delta_weight(name) * (weight != 0)
    return peft_model.unload()
