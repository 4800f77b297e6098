"""Where FFN channels and attention heads live in each supported architecture, and how to cut them.

Elastic width is applied during training by masking the input channels of the FFN down projection and of the
attention output projection, which is exactly equivalent to removing those channels or heads. Physical slicing
(`slice_layer_width`) removes them for real when a sub-network is extracted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D


def _phi3_heads(attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    attn.config = copy.copy(attn.config)
    attn.config.num_attention_heads = num_heads
    attn.config.num_key_value_heads = num_kv_heads
    attn.num_key_value_heads = num_kv_heads


def _gpt2_heads(attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    attn.num_heads = num_heads
    attn.split_size = num_heads * attn.head_dim


def _bert_heads(attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    attn.num_attention_heads = num_heads
    attn.all_head_size = num_heads * attn.attention_head_size


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to one transformer layer) that carry FFN channels and attention heads."""

    attn_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    ffn_in_fused: bool = False
    attn_module: str = "self_attn"
    set_heads: Callable[[nn.Module, int, int], None] | None = None
    ffn_config_attr: str = "intermediate_size"
    heads_in_config: bool = True


_LLAMA = ArchSpec(
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
)
_BERT = ArchSpec(
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    attn_module="attention.self",
    set_heads=_bert_heads,
    heads_in_config=False,
)
ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "phi3": ArchSpec(
        qkv="self_attn.qkv_proj",
        attn_out="self_attn.o_proj",
        ffn_in=("mlp.gate_up_proj",),
        ffn_in_fused=True,
        ffn_out="mlp.down_proj",
        set_heads=_phi3_heads,
    ),
    "gpt2": ArchSpec(
        qkv="attn.c_attn",
        attn_out="attn.c_proj",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        attn_module="attn",
        set_heads=_gpt2_heads,
        ffn_config_attr="n_inner",
        heads_in_config=False,
    ),
    "bert": _BERT,
    "roberta": _BERT,
}


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as an (out_features, in_features) view."""
    module = base_layer(module)
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise ValueError(
        f"{type(module).__name__} has no float weight to slice or score: width sub-networks need nn.Linear or Conv1D "
        "modules. Extract the sub-network from the float base, then quantize it."
    )


def _units(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Expand unit indices (heads, groups) of `size` channels each into channel indices."""
    return (indices[:, None] * size + torch.arange(size, device=indices.device)).reshape(-1)


@dataclass
class WidthLayer:
    """One transformer layer of a supported architecture, with its sizes."""

    index: str
    prefix: str
    module: nn.Module
    spec: ArchSpec
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def path(self, rel: str) -> str:
        return f"{self.prefix}.{rel}"

    def ffn_slices(self, keep: torch.Tensor) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(rows, cols) to keep in each module for the FFN channels `keep` (sorted)."""
        rows = torch.cat([keep, keep + self.ffn_dim]) if self.spec.ffn_in_fused else keep
        out = dict.fromkeys(self.spec.ffn_in, (rows, None))
        out[self.spec.ffn_out] = (None, keep)
        return out

    def head_slices(self, groups: torch.Tensor) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(rows, cols) to keep in each module for the key/value groups `groups` (sorted)."""
        heads = _units(groups, self.group_size)
        q_rows, kv_rows = _units(heads, self.head_dim), _units(groups, self.head_dim)
        out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {self.spec.attn_out: (None, q_rows)}
        if self.spec.qkv is not None:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            out[self.spec.qkv] = (torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows]), None)
        else:
            out.update({self.spec.q: (q_rows, None), self.spec.k: (kv_rows, None), self.spec.v: (kv_rows, None)})
        return out


def transformer_layers(model: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Module]]:
    """(path, module) of each transformer layer, in order: the members of a `ModuleList` that hold both output
    projections of `spec`, whatever their linear modules are (float or quantized)."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for i, layer in enumerate(module):
            try:
                layer.get_submodule(spec.ffn_out)
                layer.get_submodule(spec.attn_out)
            except AttributeError:
                continue
            layers.append((f"{name}.{i}", layer))
    return layers


def _has_matrix(module: nn.Module) -> bool:
    """Whether a module holds a 2-D weight (a float parameter or a quantized buffer such as `qweight`)."""
    return any(t.dim() == 2 for t in (*module.parameters(), *module.buffers()))


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each transformer layer of any Hugging Face model, in order.

    Architectures in `ARCH_SPECS` use their spec. Any other model's layers are the members of its `nn.ModuleList`
    of blocks: the list whose members are of a class named in `model._no_split_modules` (what accelerate keeps on one
    device, e.g. `Gemma3DecoderLayer`, `GPTNeoXLayer`, `OPTDecoderLayer`), or else the longest outermost list of
    same-class modules that hold weights. Only the layers are needed, not where their heads or FFN channels live.
    """
    spec = ARCH_SPECS.get(getattr(getattr(model, "config", None), "model_type", None))
    if spec is not None and (layers := transformer_layers(model, spec)):
        return layers
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(m) for m in module}) == 1
        and any(_has_matrix(m) for m in module)
    ]
    named = [(n, m) for n, m in lists if type(m[0]).__name__ in block_names]
    outermost = [(n, m) for n, m in lists if not any(n.startswith(f"{o}.") for o, _ in lists if o != n)]
    candidates = named or outermost
    if not candidates:
        raise ValueError(
            f"Found no transformer layers in {type(model).__name__}: no nn.ModuleList of blocks with weights (and "
            f"none of the classes in _no_split_modules={sorted(block_names)}). hf_elastic needs the model's list of "
            "decoder layers, as every Hugging Face causal LM has."
        )
    name, layers = max(candidates, key=lambda c: len(c[1]))  # the first of the longest
    return [(f"{name}.{i}" if name else str(i), layer) for i, layer in enumerate(layers)]


def find_width_layers(model: nn.Module) -> tuple[ArchSpec, list[WidthLayer]]:
    """Locate the transformer layers of a Hugging Face model of a supported architecture."""
    config = model.config
    spec = ARCH_SPECS.get(config.model_type)
    if spec is None:
        raise ValueError(
            f"Elastic width is not supported for model_type={config.model_type!r}; supported: {sorted(ARCH_SPECS)}. "
            "Use NLSConfig (elastic rank only) for other architectures."
        )
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    layers = []
    for path, layer in transformer_layers(model, spec):
        ffn_dim = weight_out_in(layer.get_submodule(spec.ffn_out)).shape[1]
        index = path.rsplit(".", 1)[1]
        layers.append(WidthLayer(index, path, layer, spec, num_heads, num_kv_heads, head_dim, ffn_dim))
    if not layers:
        raise ValueError(f"Found no {config.model_type} layers with {spec.attn_out!r} and {spec.ffn_out!r}.")
    return spec, layers


def _slice_module(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Cut an nn.Linear or Conv1D in place to the given output rows and input columns."""
    if isinstance(module, BaseTunerLayer):
        raise ValueError("Merge or unload the adapters before slicing the base model.")
    weight = weight_out_in(module).detach()
    if rows is not None:
        weight = weight[rows]
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach()[rows].clone(), requires_grad=module.bias.requires_grad)
    if cols is not None:
        weight = weight[:, cols]
    if isinstance(module, Conv1D):
        module.weight = nn.Parameter(weight.T.contiguous(), requires_grad=module.weight.requires_grad)
        module.nf = weight.shape[0]
        module.nx = weight.shape[1]
    else:
        module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
        module.out_features, module.in_features = weight.shape


def slice_layer_width(layer: WidthLayer, ffn_keep: torch.Tensor | None, kv_keep: torch.Tensor | None) -> None:
    """Physically remove FFN channels and key/value groups (with their query heads) from one layer."""
    slices = {}
    if ffn_keep is not None:
        slices.update(layer.ffn_slices(ffn_keep))
    if kv_keep is not None:
        slices.update(layer.head_slices(kv_keep))
    for rel, (rows, cols) in slices.items():
        _slice_module(layer.module.get_submodule(rel), rows, cols)
    if kv_keep is not None and layer.spec.set_heads is not None:
        attn = layer.module.get_submodule(layer.spec.attn_module)
        layer.spec.set_heads(attn, len(kv_keep) * layer.group_size, len(kv_keep))


def unit_scores(layer: WidthLayer, element_score: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Importance of each FFN channel (`"ffn"`) and key/value group (`"heads"`) of a layer.

    `element_score(module)` returns a non-negative (out_features, in_features) score per weight element, e.g. W**2 or
    |W * dL/dW|; a unit's score is the sum over every weight element that belongs to it.
    """
    spec, get = layer.spec, layer.module.get_submodule
    ffn = element_score(get(spec.ffn_out)).sum(0)
    for rel in spec.ffn_in:
        rows = element_score(get(rel)).sum(1)
        ffn = ffn + (rows[: layer.ffn_dim] + rows[layer.ffn_dim :] if spec.ffn_in_fused else rows)

    def per_group(rows: torch.Tensor, per_head: bool) -> torch.Tensor:
        heads = rows.reshape(-1, layer.head_dim).sum(1)
        return heads.reshape(layer.num_kv_heads, -1).sum(1) if per_head else heads

    q_size, kv_size = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
    if spec.qkv is not None:
        rows = element_score(get(spec.qkv)).sum(1)
        q, k, v = rows[:q_size], rows[q_size : q_size + kv_size], rows[q_size + kv_size :]
    else:
        q, k, v = (element_score(get(rel)).sum(1) for rel in (spec.q, spec.k, spec.v))
    o = element_score(get(spec.attn_out)).sum(0)
    groups = per_group(q, True) + per_group(o, True) + per_group(k, False) + per_group(v, False)
    return {"ffn": ffn, "heads": groups}
