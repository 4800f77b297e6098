"""`NLSConfig`: LoRA with an elastic rank (Neural Low-rank adapter Search, as in Shears and SQFT)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch.nn as nn
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from transformers.pytorch_utils import Conv1D

from ...utils import (
    ELASTIC_CONFIG_NAME,
    atomic_write_json,
    digest,
    file_sha256,
    read_json,
    recover_files,
    typed_fields,
)

_METHODS: dict[str, type[NLSConfig]] = {}
ADAPTER_CONFIG_NAME = "adapter_config.json"


def stock_load_guard(what: str, loader: str) -> str:
    """A `target_modules` pattern that matches no module, so that stock peft refuses an adapter whose stock load
    would be a different function: `PeftModel.from_pretrained` raises "Target modules hf_elastic sparse adapter: load
    it with hf_elastic.merge_subnet_adapter not found in the base model"."""
    return f"hf_elastic {what}: load it with {loader}"


def is_stock_load_guard(target_modules: Any) -> bool:
    return isinstance(target_modules, str) and target_modules.startswith("hf_elastic ")


def guard_adapter_config(directory: str | Path, what: str, loader: str) -> list[str] | str:
    """Replace `target_modules` in `directory/adapter_config.json` by `stock_load_guard`; returns the real ones."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    saved = json.loads(path.read_text())
    targets = saved["target_modules"]
    targets = sorted(targets) if isinstance(targets, (list, set, tuple)) else targets
    atomic_write_json(path, saved | {"target_modules": stock_load_guard(what, loader)})
    return targets


def _check_int_choices(owner: str, name: str, values: Any, example: str) -> list[int]:
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise ValueError(f"{owner}.{name} must be a non-empty list, got {values!r}. Pass e.g. {name}={example}.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(
                f"{owner}.{name} must hold positive integers, got {v!r} in {list(values)!r}. "
                f"Pass e.g. {name}={example}."
            )
    return sorted(set(values), reverse=True)


@dataclass
class NLSConfig(LoraConfig):
    """LoRA whose rank is elastic: every group of modules can run at any rank in `rank_choices`.

    The adapter keeps `r = max(rank_choices)` weights; a sub-network of rank `k` uses the first `k` rows of `lora_A`
    and the first `k` columns of `lora_B` (nested ranks) with the scaling of the full rank, so a smaller rank is
    exactly a truncation of the larger one. The adapter is saved as a plain LoRA adapter (the max sub-network) plus
    `elastic_config.json`.

    Example:

    ```py
    >>> from peft import get_peft_model
    >>> from hf_elastic import NLSConfig
    >>> model = get_peft_model(base, NLSConfig(rank_choices=[32, 24, 16], target_modules=["q_proj", "v_proj"]))
    ```
    """

    elastic_method: ClassVar[str] = "nls"
    elastic_fields: ClassVar[tuple[str, ...]] = (
        "rank_choices",
        "rank_groups",
        "nls_target_modules",
        "sparse_adapter",
        "quantization_aware",
        "base_sparsity",
        "base_fingerprint",
    )

    r: int | None = field(
        default=None, metadata={"help": "Maximum LoRA rank (the stored adapter size). Defaults to max(rank_choices)."}
    )
    rank_choices: list[int] | None = field(
        default=None,
        metadata={
            "help": "Ranks a sub-network may use, e.g. [32, 24, 16]. Every choice must be <= r. "
            "Defaults to [r, 3r/4, r/2], or [32, 24, 16] when r is not given either."
        },
    )
    rank_groups: list[list[str]] | None = field(
        default=None,
        metadata={
            "help": "Modules that share one rank inside each transformer layer, e.g. "
            "[['q_proj', 'k_proj', 'v_proj'], ['up_proj'], ['down_proj']] as in Shears. Names are matched as "
            "suffixes of the module path inside the layer. None gives every module its own rank."
        },
    )
    nls_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Subset of target_modules whose rank is elastic (suffix match). The other adapters always use "
            "the max rank r. None makes every adapter elastic."
        },
    )

    sparse_adapter: bool = field(
        default=False,
        metadata={
            "help": "SparsePEFT: mask the adapter delta with the base weight's non-zero pattern, so merging keeps "
            "every zero of a sparse (e.g. Wanda-pruned) base. Costs one dense (out, in) product per adapted layer "
            "and step."
        },
    )
    quantization_aware: bool = field(
        default=False,
        metadata={
            "help": "QA-SparsePEFT: train the adapter through the INT4/INT8 grid of a base quantized with "
            "hf_elastic.quantize (fixed scales and zero points, straight-through rounding), so merging gives new "
            "integer codes exactly. Combine with sparse_adapter=True for a sparse base; needs lora_dropout=0."
        },
    )
    base_sparsity: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Fingerprint of the base model's zero pattern that a sparse adapter was trained on (zeros per "
            "module and a digest). Filled in by hf_elastic and checked when the adapter is loaded; leave it None."
        },
    )

    base_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Digest of the targeted base weights (class, shape and first row of each) the adapter was trained "
            "on. Filled in by hf_elastic; load_super_network warns (or with strict=True raises) on another base."
        },
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _METHODS[cls.elastic_method] = cls

    @typed_fields()
    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.rank_choices is None:
            if self.r is None:
                self.rank_choices = [32, 24, 16]
            else:
                self.rank_choices = [c for c in (self.r, 3 * self.r // 4, self.r // 2) if c > 0]
        self.rank_choices = _check_int_choices(name, "rank_choices", self.rank_choices, "[32, 24, 16]")
        if self.r is None:
            self.r = self.rank_choices[0]
        if self.rank_choices[0] > self.r:
            raise ValueError(
                f"{name}.rank_choices contains {self.rank_choices[0]}, above r={self.r}. "
                f"Raise r to {self.rank_choices[0]} or drop the larger choices."
            )
        for flag in ("use_dora", "lora_bias"):
            if getattr(self, flag):
                raise ValueError(f"{name}.{flag}=True is not supported with an elastic rank. Set {flag}=False.")
        for pattern in ("rank_pattern", "alpha_pattern"):
            if getattr(self, pattern):
                raise ValueError(
                    f"{name}.{pattern}={getattr(self, pattern)!r} is not supported: the rank is set per sub-network "
                    "through rank_choices. Leave it empty."
                )
        if self.rank_groups is not None:
            ok = isinstance(self.rank_groups, list) and all(
                isinstance(g, list) and g and all(isinstance(m, str) and m for m in g) for g in self.rank_groups
            )
            if not ok or not self.rank_groups:
                raise ValueError(
                    f"{name}.rank_groups must be a non-empty list of non-empty lists of module names, got "
                    f"{self.rank_groups!r}. Pass e.g. [['q_proj', 'k_proj', 'v_proj'], ['up_proj'], ['down_proj']]."
                )
        if isinstance(self.nls_target_modules, str):
            self.nls_target_modules = [self.nls_target_modules]
        if self.nls_target_modules is not None and not self.nls_target_modules:
            raise ValueError(
                f"{name}.nls_target_modules is empty. Pass None to make every adapter elastic, or name modules."
            )
        if self.quantization_aware and self.lora_dropout:
            raise ValueError(
                f"{name}.lora_dropout={self.lora_dropout} cannot be used with quantization_aware=True: dropout cannot "
                "act on weights that are put on the quantization grid. Set lora_dropout=0."
            )
        super().__post_init__()
        from ...compression.quantization.format import QuantLinear
        from .layer import ElasticLoraLinear

        self._register_custom_module(
            {nn.Linear: ElasticLoraLinear, Conv1D: ElasticLoraLinear, QuantLinear: ElasticLoraLinear}
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain `LoraConfig` part: what `adapter_config.json` holds, so stock peft loads it without warnings."""
        return {k: v for k, v in super().to_dict().items() if k not in self.elastic_fields}

    def elastic_dict(self) -> dict[str, Any]:
        """The elastic part of the config, as written to `elastic_config.json`."""
        from ...version import __version__

        return {"method": self.elastic_method, "hf_elastic_version": __version__} | {
            k: getattr(self, k) for k in self.elastic_fields
        }

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write `adapter_config.json` (plain LoRA, max rank) and `elastic_config.json` (search space settings).

        `elastic_config.json` also records a digest of its own settings and, when peft has just written the adapter
        beside it, the adapter's SHA-256, so that an edited config or weights of another save are detected on load.
        A sparse or quantization-aware super-adapter is not the same function as a stock LoRA adapter (its delta is
        masked by the base's zeros, or rounded to the INT4 grid): its `adapter_config.json` gets a `target_modules`
        that makes stock peft raise an error naming `hf_elastic.load_super_network`, and the real target modules go
        to `elastic_config.json`.
        """
        super().save_pretrained(save_directory, **kwargs)
        data = self.elastic_dict()
        if self.sparse_adapter or self.quantization_aware:
            what = "quantization-aware super-adapter" if self.quantization_aware else "sparse super-adapter"
            data["target_modules"] = guard_adapter_config(save_directory, what, "hf_elastic.load_super_network")
        data |= {"save_id": uuid.uuid4().hex, "digest": _settings_digest(data)}
        weights = Path(save_directory) / SAFETENSORS_WEIGHTS_NAME
        if weights.is_file():
            data["adapter_sha256"] = file_sha256(weights)
        atomic_write_json(Path(save_directory) / ELASTIC_CONFIG_NAME, data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load the config of a saved super-adapter, restoring the elastic class (`NLSConfig` or a subclass)."""
        directory = Path(pretrained_model_name_or_path, subfolder or "")
        recover_files(directory)  # a save killed after its commit point is finished first
        elastic_path = directory / ELASTIC_CONFIG_NAME
        if not elastic_path.is_file():
            if not directory.is_dir():
                from huggingface_hub import hf_hub_download

                elastic_path = Path(
                    hf_hub_download(str(pretrained_model_name_or_path), ELASTIC_CONFIG_NAME, subfolder=subfolder)
                )
            else:
                raise FileNotFoundError(
                    f"No {ELASTIC_CONFIG_NAME} in {directory}: this is not an hf_elastic super-adapter. "
                    "Load a plain LoRA adapter with peft.PeftModel.from_pretrained instead."
                )
        fix = "save the super-adapter again (NASTrainer.save_model or model.save_pretrained)"
        elastic = read_json(elastic_path, fix)
        stored_digest, adapter_sha = elastic.pop("digest", None), elastic.pop("adapter_sha256", None)
        elastic.pop("save_id", None)
        method = elastic.get("method")
        if not isinstance(method, str) or method not in _METHODS:
            raise ValueError(f"{elastic_path} names method={method!r}; known methods are {sorted(_METHODS)}.")
        target_cls = _METHODS[method]
        known = {"method", "hf_elastic_version", "target_modules"}
        unknown = sorted(set(elastic) - set(target_cls.elastic_fields) - known)
        if unknown:
            raise ValueError(f"{elastic_path} has keys {unknown} that {target_cls.__name__} does not know; {fix}.")
        if "rank_choices" not in elastic:
            raise ValueError(f"{elastic_path} has no 'rank_choices'; {fix}.")
        if stored_digest is not None and stored_digest != _settings_digest(elastic):
            raise ValueError(
                f"{elastic_path} was edited after it was saved (its settings no longer match its digest): restore it, "
                f"or {fix}."
            )
        weights = elastic_path.parent / SAFETENSORS_WEIGHTS_NAME
        if adapter_sha is not None and weights.is_file() and file_sha256(weights) != adapter_sha:
            raise ValueError(
                f"{weights} and {ELASTIC_CONFIG_NAME} come from different saves (e.g. after an interrupted "
                f"overwrite); {fix}."
            )
        elastic.pop("method")
        elastic.pop("hf_elastic_version", None)
        targets = elastic.pop("target_modules", None)  # the real ones, for a guarded (sparse or QA) adapter
        try:
            lora = LoraConfig.from_pretrained(str(elastic_path.parent), **kwargs).to_dict()
        except (OSError, ValueError, TypeError) as error:
            lora_path = elastic_path.parent / "adapter_config.json"
            raise ValueError(f"{lora_path} cannot be read ({error}); {fix}.") from None
        if targets is not None:
            lora["target_modules"] = targets
        init_names = {f.name for f in fields(target_cls) if f.init}
        try:
            config = target_cls(**{k: v for k, v in lora.items() if k in init_names}, **elastic)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{elastic_path}: {error}") from None
        if config.r != max(config.rank_choices):
            raise ValueError(
                f"adapter_config.json has r={config.r}, but {ELASTIC_CONFIG_NAME} has rank_choices "
                f"{config.rank_choices} (largest {max(config.rank_choices)}); the two files do not belong together: "
                f"{fix}."
            )
        return config


def _settings_digest(data: dict[str, Any]) -> str:
    return digest({k: v for k, v in data.items() if k not in ("hf_elastic_version", "save_id", "digest")})


_METHODS[NLSConfig.elastic_method] = NLSConfig
