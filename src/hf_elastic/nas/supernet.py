"""`SuperNetwork`: activate, sample, measure and extract sub-networks of an elastic peft model."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from ..compression.quantization.format import QuantLinear
from ..devices import full_tensor
from ..models.arch import (
    WidthLayer,
    base_layer,
    decoder_layers,
    find_width_layers,
    slice_layer_width,
    weight_out_in,
)
from ..models.loading import copy_module
from ..tuners.elastic_lora.config import ElasticLoraConfig
from ..tuners.elastic_lora.width import WIDTH_KINDS, WidthMasks, check_channel_order, width_choices, width_key
from ..tuners.nls.config import ADAPTER_CONFIG_NAME, NLSConfig, guard_adapter_config
from ..tuners.nls.layer import ElasticLoraLinear
from ..utils import SUBNET_CONFIG_NAME, atomic_save_safetensors, atomic_write_json, matches_module, split_layer_key
from .costs import COMPRESSION_COSTS, CompressionCosts
from .geometry import SubnetGeometry, linear_sizes
from .importance import IMPORTANCE_METHODS
from .search_space import Dimension, SearchSpace, SubnetConfig

_CACHE_ATTR = "_hf_elastic_supernets"
NamedConfig = Literal["max", "min", "median"]


class SuperNetwork:
    """The weight-sharing super-network behind a peft model built from `NLSConfig` or `ElasticLoraConfig`.

    Use `get_supernet(model)` to obtain it; it is created once per model and adapter. The search space is built from
    the config and the model: one rank dimension per group of elastic adapters in each layer, and for
    `ElasticLoraConfig` an `"<layer>.ffn"` and `"<layer>.heads"` dimension per transformer layer.

    It owns the `geometry` (sizes of the base's linear layers and the units each sub-network keeps, which the costs
    and channel importance read) and, for elastic widths, the `WidthMasks` that make the base compute a narrower
    sub-network (`hf_elastic.tuners.elastic_lora.width`).
    """

    def __init__(self, model: PeftModel, adapter_name: str | None = None) -> None:
        if not isinstance(model, PeftModel):
            raise ValueError(f"SuperNetwork needs a peft.PeftModel, got {type(model).__name__}.")
        self.model = model
        self.adapter_name = adapter_name or model.active_adapter
        self.config = model.peft_config.get(self.adapter_name)
        if not isinstance(self.config, NLSConfig):
            raise ValueError(
                f"Adapter {self.adapter_name!r} uses {type(self.config).__name__}, not an elastic config. "
                "Create the model with NLSConfig or ElasticLoraConfig."
            )
        self.base = model.get_base_model()
        self.lora_modules: dict[str, ElasticLoraLinear] = {
            name: module
            for name, module in self.base.named_modules()
            if isinstance(module, ElasticLoraLinear) and self.adapter_name in module.lora_A
        }
        self._fixed_adapter_params = 0
        for name, module in self.base.named_modules():
            if not isinstance(module, LoraLayer) or isinstance(module, ElasticLoraLinear):
                continue
            if self.config.nls_target_modules is None or any(
                matches_module(name, p) for p in self.config.nls_target_modules
            ):
                raise ValueError(
                    f"Module {name!r} is of type {type(base_layer(module)).__name__}; an elastic rank supports "
                    "nn.Linear and transformers Conv1D. Leave it out of nls_target_modules to keep its rank fixed."
                )
            self._fixed_adapter_params += sum(
                p.numel() for n, p in module.named_parameters() if "lora_" in n and f".{self.adapter_name}" in n
            )
        dims = self._rank_dimensions()
        width_layers: list[WidthLayer] = []
        if isinstance(self.config, ElasticLoraConfig) and (self.config.ffn_width_choices or self.config.head_choices):
            _, width_layers = find_width_layers(self.base)
            for layer in width_layers:
                choices = width_choices(self.config, layer)
                dims += [Dimension(width_key(layer, kind), kind, values) for kind, values in choices.items()]
        channel_order = getattr(self.config, "channel_order", None)
        check_channel_order(channel_order, width_layers)
        if not dims:
            raise ValueError("The model has no elastic dimension: no adapter is elastic and no width choices are set.")
        self.space = SearchSpace(dims)
        self._active: SubnetConfig = self.space.max_config()
        self.geometry = SubnetGeometry(linear_sizes(self.base), width_layers, channel_order)
        self.width_masks = WidthMasks(self.base, width_layers)
        self._costs: CompressionCosts | None = None
        grids = {  # a quantized weight counts once, by its codes
            id(t) for m in self.base.modules() if isinstance(m, QuantLinear) for t in (m.scales, m.zeros, m.residual)
        }
        self._base_params = sum(
            p.numel() for n, p in self.base.named_parameters() if "lora_" not in n and id(p) not in grids
        )
        if self.config.sparse_adapter:
            self._check_base_sparsity()
        if self.config.base_fingerprint is None:
            self.config.base_fingerprint = self.base_fingerprint()
        model.__dict__.setdefault(_CACHE_ATTR, {})
        old = model.__dict__[_CACHE_ATTR].get(self.adapter_name)
        if old is not None:
            old.remove_hooks()
        model.__dict__[_CACHE_ATTR][self.adapter_name] = self

    def base_fingerprint(self) -> str:
        """Digest of the adapted base weights: class, shape and first row of each (cheap on any model size)."""
        return base_fingerprint(self.lora_modules)

    @property
    def width_layers(self) -> list[WidthLayer]:
        """The transformer layers with an elastic width (empty without width choices)."""
        return self.geometry.width_layers

    def _check_base_sparsity(self) -> None:
        """Record the base's zero pattern in the config, or check it against the record of a loaded adapter."""
        digest = hashlib.sha256()
        zeros = {}
        for key, module in sorted(self.lora_modules.items()):
            mask = module.base_mask().cpu().numpy()
            zeros[key] = int(mask.size - mask.sum())
            digest.update(np.packbits(mask).tobytes())
        found = {"zeros": zeros, "sha256": digest.hexdigest()}
        recorded = self.config.base_sparsity
        if recorded is None:
            self.config.base_sparsity = found
        elif recorded["sha256"] != found["sha256"]:
            differ = [k for k in zeros if recorded["zeros"].get(k) != zeros[k]]
            detail = (
                f"module {differ[0]!r} has {zeros[differ[0]]} zeros here but {recorded['zeros'].get(differ[0])} in "
                "the adapter's record"
                if differ
                else "the zero counts agree but the positions differ"
            )
            raise ValueError(
                f"This sparse adapter was trained on a base with another zero pattern: {detail}. Load it onto the "
                "base it was trained on (same sparsify settings and calibration data)."
            )

    # ------------------------------------------------------------------ space construction
    def _rank_dimensions(self) -> list[Dimension]:
        config = self.config
        groups = config.rank_groups or []
        patterns = config.nls_target_modules
        members: dict[str, list[str]] = {}
        used_groups: set[int] = set()
        for key in self.lora_modules:
            if patterns is not None and not any(matches_module(key, p) for p in patterns):
                continue
            layer, rel = split_layer_key(key)
            group = next((i for i, g in enumerate(groups) if any(matches_module(rel, p) for p in g)), None)
            label = rel if group is None else "+".join(groups[group])
            if group is not None:
                used_groups.add(group)
            members.setdefault(f"{layer}.rank.{label}", []).append(key)
        if patterns is not None and not members:
            raise ValueError(
                f"nls_target_modules={patterns} matches none of the adapted modules "
                f"(e.g. {list(self.lora_modules)[:3]}). Use names from target_modules."
            )
        unused = [groups[i] for i in range(len(groups)) if i not in used_groups]
        if unused:
            raise ValueError(f"rank_groups entries {unused} match no elastic adapter; check the module names.")
        self._rank_members = members
        return [Dimension(name, "rank", tuple(config.rank_choices)) for name in members]

    def remove_hooks(self) -> None:
        """Detach the width masks from the model (the super-network then always runs at full width)."""
        self.width_masks.remove()

    # ------------------------------------------------------------------ activation
    @property
    def active_config(self) -> SubnetConfig:
        return dict(self._active)

    def resolve(self, config: Mapping[str, int] | NamedConfig) -> SubnetConfig:
        """Turn `"max"`, `"min"`, `"median"` or a config dict into a validated config."""
        if isinstance(config, str):
            named = {"max": self.space.max_config, "min": self.space.min_config, "median": self.space.median_config}
            if config not in named:
                raise ValueError(f"Unknown named sub-network {config!r}; use one of {list(named)} or a dict.")
            return named[config]()
        return self.space.validate(config)

    def activate(self, config: Mapping[str, int] | NamedConfig) -> SubnetConfig:
        """Make `config` the sub-network that forward passes, merges and counts use. Returns the resolved config."""
        config = self.resolve(config)
        for name, keys in self._rank_members.items():
            for key in keys:
                self.lora_modules[key].active_rank[self.adapter_name] = config[name]
        for layer in self.width_layers:
            for kind in WIDTH_KINDS:
                self.width_masks.keep(layer, kind, self.kept_units(layer, kind, config.get(width_key(layer, kind))))
        self._active = config
        return dict(config)

    def sample(self, rng: Any = None, activate: bool = True) -> SubnetConfig:
        """Draw a uniformly random sub-network (seed or `random.Random`), and activate it unless told not to."""
        config = self.space.sample(rng)
        return self.activate(config) if activate else config

    def kept_units(self, layer: WidthLayer, kind: str, value: int | None) -> torch.Tensor | None:
        """Sorted indices of the FFN channels or key/value groups kept at `value`; None when nothing is cut."""
        return self.geometry.kept_units(layer, kind, value)

    # ------------------------------------------------------------------ size
    @property
    def costs(self) -> CompressionCosts:
        """The `nonzero_params` and `bytes` of sub-networks (`hf_elastic.nas.costs`), built on first use."""
        if self._costs is None:
            merges = bool(self.config.sparse_adapter or self.config.quantization_aware)
            self._costs = CompressionCosts(self.base, self.geometry, self.lora_modules, self.adapter_name, merges)
        return self._costs

    def count(self, config: Mapping[str, int] | NamedConfig | None = None) -> dict[str, int]:
        """Parameters and per-token linear-layer MACs of a sub-network (default: the active one).

        Returns `params` (base + adapter), `base_params`, `adapter_params`, `macs` (multiply-accumulates per token
        of every linear layer and adapter; attention score products are not included), and the costs that see
        sparsity and quantization, `nonzero_params` and `bytes` (see `hf_elastic.nas.costs`).
        """
        config = self._active if config is None else self.resolve(config)
        sizes = self.geometry.sizes(config)
        removed = 0
        for name, (out_f, in_f) in sizes.items():
            full_out, full_in = self.geometry.linear_sizes[name]
            removed += full_out * full_in - out_f * in_f
            if base_layer(self.base.get_submodule(name)).bias is not None:
                removed += full_out - out_f
        ranks = self.module_ranks(config)
        adapter = sum(ranks[k] * sum(sizes[k]) for k in self.lora_modules) + self._fixed_adapter_params
        macs = sum(o * i for o, i in sizes.values()) + adapter
        base = self._base_params - removed
        counts = {"params": base + adapter, "base_params": base, "adapter_params": adapter, "macs": macs}
        return counts | self.costs(config, ranks, adapter)

    def module_ranks(self, config: Mapping[str, int] | NamedConfig | None = None) -> dict[str, int]:
        """The LoRA rank of every adapted module under a sub-network config."""
        config = self._active if config is None else self.resolve(config)
        ranks = {key: module.r[self.adapter_name] for key, module in self.lora_modules.items()}
        for name, keys in self._rank_members.items():
            ranks.update(dict.fromkeys(keys, config[name]))
        return ranks

    # ------------------------------------------------------------------ channel importance
    def reorder_channels(
        self, method: Literal["magnitude", "activation", "gradient"] = "magnitude", batches: Iterable | None = None
    ):
        """Order FFN channels and key/value groups by importance so that narrower widths keep the important ones.

        `"magnitude"` scores a channel by the squared norm of every weight tied to it; `"activation"` weights each
        weight by the norm of its input feature over `batches` (Wanda's |W| * ||x||, so a channel that is rarely
        active scores low); `"gradient"` by the first-order Taylor term |W * dL/dW| summed over `batches` (dicts
        passed to the model; with labels for `"gradient"`). The full model's output does not change; the order is
        stored in the config's `channel_order` and saved with the adapter.
        """
        if not self.width_layers:
            raise ValueError("reorder_channels needs an ElasticLoraConfig with ffn_width_choices or head_choices.")
        if method not in IMPORTANCE_METHODS:
            raise ValueError(f"Unknown importance method {method!r}; use one of {list(IMPORTANCE_METHODS)}.")
        if method != "magnitude" and batches is None:
            raise ValueError(f"reorder_channels(method={method!r}) needs `batches` of model inputs (with labels).")
        scores = IMPORTANCE_METHODS[method](self.geometry, self, batches)
        order = dict(self.config.channel_order or {})
        for layer, layer_scores in zip(self.width_layers, scores, strict=True):
            for kind, s in layer_scores.items():
                order[width_key(layer, kind)] = torch.argsort(s, descending=True, stable=True).tolist()
        self.config.channel_order = order
        self.geometry.set_channel_order(order)
        self.activate(self._active)
        return order

    # ------------------------------------------------------------------ extraction
    def extract_adapter(self, config: Mapping[str, int] | NamedConfig, save_directory: str | Path) -> Path:
        """Write the rank sub-network `config` as a plain LoRA adapter that stock `PeftModel.from_pretrained` loads.

        Ranks that differ from `r` go to `rank_pattern`, with `alpha_pattern` keeping each module's scaling. Width
        sub-networks change the base model, so they need `extract_model` instead. `elastic_subnet.json` records the
        method, the config, its size and whether the adapter is sparse or quantization-aware.

        A sparse (SparsePEFT) adapter is not the same function as a stock LoRA adapter: its delta is masked by the
        base's zeros, which stock peft neither does unmerged nor keeps in `merge_and_unload`. So its
        `adapter_config.json` gets a `target_modules` that makes stock peft raise an error naming
        `hf_elastic.merge_subnet_adapter`, which merges it exactly; the real target modules are kept in
        `elastic_subnet.json` (pass them as `config.target_modules` for an approximate stock load). Quantization-aware
        adapters are guarded the same way: they merge only through the super-network (`extract_model`).
        """
        config = self.resolve(config)
        narrowed = [d.name for d in self.space if d.kind != "rank" and config[d.name] != d.choices[0]]
        if narrowed:
            raise ValueError(
                f"Sub-network narrows the base model ({narrowed[:3]}...); a plain LoRA adapter cannot express that. "
                "Use SuperNetwork.extract_model(config) for a sliced, merged model."
            )
        ranks = self.module_ranks(config)
        state = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        tensors = {}
        for key, value in state.items():
            module_key = key.removeprefix("base_model.model.").split(".lora_", 1)[0]
            rank = ranks.get(module_key)
            if rank is not None and ".lora_A." in key:
                value = value[:rank]
            elif rank is not None and ".lora_B." in key:
                value = value[:, :rank]
            tensors[key] = value.clone()
        lora = self.config
        full_scaling = lora.lora_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
        rank_pattern = {k: r for k, r in ranks.items() if r != lora.r}
        alpha_pattern = {k: full_scaling * (math.sqrt(r) if lora.use_rslora else r) for k, r in rank_pattern.items()}
        adapter_config = lora.to_dict() | {
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "inference_mode": True,
        }
        adapter_config = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter_config.items()}
        save_directory = Path(save_directory)
        atomic_save_safetensors(tensors, save_directory / "adapter_model.safetensors")
        atomic_write_json(save_directory / ADAPTER_CONFIG_NAME, adapter_config)
        flags = {k: getattr(self.config, k) for k in ("sparse_adapter", "quantization_aware")}
        info = {"method": self.config.elastic_method, "config": config, **self.count(config), "max": self.count("max")}
        info |= flags
        if self.config.quantization_aware:
            info["target_modules"] = guard_adapter_config(
                save_directory, "quantization-aware adapter", "hf_elastic.export_subnetwork from its super-adapter"
            )
        elif self.config.sparse_adapter:
            info["target_modules"] = guard_adapter_config(
                save_directory, "sparse adapter", "hf_elastic.merge_subnet_adapter"
            )
        info["base_fingerprint"] = self.config.base_fingerprint
        atomic_write_json(save_directory / SUBNET_CONFIG_NAME, info)
        return save_directory

    def extract_model(self, config: Mapping[str, int] | NamedConfig, *, share_weights: bool = False) -> nn.Module:
        """A merged, physically sliced copy of the base model for `config` (the super-network is left untouched).

        FFN channels and attention heads that the config drops are removed for real, and quantized layers drop their
        training-only rounding residual. When every layer has the same widths and the model's config can express them
        (Llama-family configs carry `head_dim`, but only for head counts that divide the hidden size; GPT-2's and
        BERT's cannot express cut heads), the config is updated so
        that `save_pretrained` gives a stock checkpoint; otherwise the widths are recorded in
        `config.elastic_layer_widths`, and `hf_elastic.export_subnetwork` marks the folder for `load_exported`.

        The copy is built one transformer layer at a time on the super-network's device: the adapted weights of a
        layer are copied, merged and sliced before the next layer's, and nothing else of the super-network (adapters,
        other adapters, hooks) is duplicated. With `share_weights=True` the tensors the sub-network keeps unchanged
        (embeddings, norms, layers without adapter or cut) are the super-network's own rather than copies, so the
        extraction costs only the merged and sliced layers; the result is then for reading (saving, exporting,
        inference), not for changing in place.
        """
        config = self.resolve(config)
        model = copy_module(self.model)  # the modules, not the weights: those are copied layer by layer below
        sub: SuperNetwork = model.__dict__[_CACHE_ATTR][self.adapter_name]
        sub.activate(config)
        for name in list(model.peft_config):
            if name != self.adapter_name:
                model.delete_adapter(name)
        sub.remove_hooks()
        base = model.get_base_model()
        _, layers = find_width_layers(base) if self.width_layers else (None, [])
        widths = {}
        for block in [] if layers else _blocks(base):
            _merge_in(block)  # one layer's merged weights at a time
        for layer in layers:
            _merge_in(layer.module)  # sliced before the next layer is merged
            ffn_keep = self.kept_units(layer, "ffn", config.get(f"{layer.index}.ffn"))
            kv_keep = self.kept_units(layer, "heads", config.get(f"{layer.index}.heads"))
            slice_layer_width(layer, ffn_keep, kv_keep)
            widths[layer.index] = {
                "ffn": layer.ffn_dim if ffn_keep is None else len(ffn_keep),
                "heads": layer.num_heads if kv_keep is None else len(kv_keep) * layer.group_size,
            }
        _merge_in(base, unload=False)  # adapters outside the transformer layers, merged by merge_and_unload
        merged = model.merge_and_unload()
        if hasattr(merged.config, "use_cache"):  # `Trainer` switched the KV cache off for training
            merged.config.use_cache = True
        for module in merged.modules():
            if isinstance(module, QuantLinear):
                module.residual = None  # training-only: a deployable model holds codes, scales and zero points
        if not share_weights:
            _own_tensors(merged, self.model)
        if not layers:
            return merged
        spec, first = layers[0].spec, layers[0]
        uniform = all(w == widths[first.index] for w in widths.values())
        heads = widths[first.index]["heads"]
        # transformers refuses a config whose hidden size is not a multiple of its head count, even with head_dim set
        heads_fit = spec.heads_in_config and getattr(merged.config, "hidden_size", 0) % heads == 0
        if uniform and (heads == first.num_heads or heads_fit):
            setattr(merged.config, spec.ffn_config_attr, widths[first.index]["ffn"])
            if spec.heads_in_config:
                merged.config.head_dim = first.head_dim
                merged.config.num_attention_heads = heads
                merged.config.num_key_value_heads = heads // first.group_size
        else:
            merged.config.elastic_layer_widths = widths
        return merged


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of `model`, or none when it has no list of them (then all merge at once)."""
    try:
        return [module for _, module in decoder_layers(model)]
    except ValueError:
        return []


def _own(module: nn.Module) -> None:
    """Give `module` its own copy of the tensors it holds directly (before a merge writes into them)."""
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is None:
            continue
        own = tensor.detach().clone()
        setattr(
            module, name, nn.Parameter(own, requires_grad=tensor.requires_grad) if name in module._parameters else own
        )


def _merge_in(root: nn.Module, unload: bool = True) -> None:
    """Merge every peft tuner layer under `root` into a copy of its base layer's weights and, if `unload`, put the
    base layer in its place (as `merge_and_unload` does); without `unload` only the base weights are copied, for
    `merge_and_unload` to merge."""
    for path, module in list(root.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "base_layer"):
            continue
        _own(module.get_base_layer())
        if not unload:
            continue
        module.merge()
        if isinstance(module, ElasticLoraLinear):
            module.forget_unmerge()  # the layer is discarded, but the super-network copy still references it
        base = module.get_base_layer()
        if isinstance(base, QuantLinear):
            base.residual = None  # training-only, dropped per layer so that the copies never add up
        parent, _, child = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, base)


def _own_tensors(model: nn.Module, source: nn.Module) -> None:
    """Copy every tensor of `model` that shares storage with `source` (tied tensors stay tied)."""
    shared = {t.untyped_storage().data_ptr() for t in [*source.parameters(), *source.buffers()]}
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or tensor.untyped_storage().data_ptr() not in shared:
                continue
            if id(tensor) not in copies:
                own = tensor.detach().clone()
                param = name in module._parameters
                copies[id(tensor)] = nn.Parameter(own, requires_grad=tensor.requires_grad) if param else own
            setattr(module, name, copies[id(tensor)])


def base_fingerprint(lora_modules: Mapping[str, LoraLayer]) -> str:
    """Digest of the base weights under LoRA modules (keyed by module path): class, shape and first row of each."""
    sha = hashlib.sha256()
    for key, module in sorted(lora_modules.items()):
        base = module.get_base_layer()
        weight = base.dequantize() if isinstance(base, QuantLinear) else full_tensor(weight_out_in(base))
        sha.update(f"{key}:{type(base).__name__}:{tuple(weight.shape)}".encode())
        sha.update(weight[0, :256].detach().float().cpu().numpy().tobytes())
    return sha.hexdigest()[:16]


def get_supernet(model: PeftModel, adapter_name: str | None = None) -> SuperNetwork:
    """The `SuperNetwork` of an elastic peft model, created on first use and cached on the model."""
    name = adapter_name or getattr(model, "active_adapter", None)
    cached = getattr(model, "__dict__", {}).get(_CACHE_ATTR, {}).get(name)
    return cached if cached is not None else SuperNetwork(model, name)


def compression_costs(supernet: SuperNetwork, config: Mapping[str, int] | NamedConfig) -> dict[str, int]:
    """`nonzero_params` and `bytes` of the sub-network `config` (see `hf_elastic.nas.costs`); `count` includes them."""
    counts = supernet.count(config)
    return {name: counts[name] for name in COMPRESSION_COSTS}
