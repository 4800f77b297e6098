"""Where the FFN channels and attention heads of a transformer layer live, and how to cut them.

`find_width_layers` reads them off the modules of each decoder layer. The attention block is the submodule whose class
is an `...Attention`: its output projection is the last linear in it that writes the hidden size, the linears that read
the hidden size are the query, key and value projections (one fused, or three), and their sizes give the number of
heads and of key/value groups. The FFN is every other linear of the layer: the last one that writes the hidden size
is the down projection, and the ones that map the hidden size to its input channels are the up (and gate)
projections. `ARCH_OVERRIDES` holds only what the modules cannot tell: the row layout of fused projections, and head
counts that an attention module reads from elsewhere than its own attributes.

Elastic width is applied during training by masking the input channels of the FFN down projection and of the
attention output projection, which is exactly equivalent to removing those channels or heads. Physical slicing
(`slice_layer_width`) removes them for real when a sub-network is extracted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from ..utils import warn_renamed

QkvLayout = Literal["blocks", "heads"]

FFN_CONFIG_ATTRS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff")
_HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")
_QKV_LETTERS = {"q": 0, "k": 1, "v": 2}


def _phi3_heads(attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    attn.config = copy.copy(attn.config)  # Phi3Attention reads the query head count from its config
    attn.config.num_attention_heads = num_heads
    attn.config.num_key_value_heads = num_kv_heads


@dataclass(frozen=True)
class ArchOverride:
    """What the modules of a layer do not tell about an architecture."""

    fused_qkv: QkvLayout | None = None
    fused_gate_up: bool = False
    set_heads: Callable[[nn.Module, int, int], None] | None = None


ARCH_OVERRIDES: dict[str, ArchOverride] = {
    # `qkv_proj` holds [q; k; v] rows, `gate_up_proj` [gate; up]; the attention reads its config's head count
    "phi3": ArchOverride(fused_qkv="blocks", fused_gate_up=True, set_heads=_phi3_heads),
    "gpt2": ArchOverride(fused_qkv="blocks"),  # `c_attn` (a Conv1D) holds [q; k; v] rows
    "gpt_neox": ArchOverride(fused_qkv="heads"),  # `query_key_value` holds [q_h; k_h; v_h] for each head h in turn
}


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to one transformer layer) that carry FFN channels and attention heads.

    `qkv_layout` says how a fused `qkv` projection orders its rows: `"blocks"` (all query rows, then key, then value)
    or `"heads"` (query, key and value rows of head 0, then of head 1, ...). `set_heads` is an extra step to record a
    new head count (the attention module's own head count attributes are always updated). `ffn_config_attr` is the
    model config field of the FFN width; `heads_in_config` whether the config can carry a head size beside the head
    counts (`head_dim`, as Llama-family configs do).
    """

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
    qkv_layout: QkvLayout = "blocks"


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
    """One transformer layer, with the sizes of its attention and FFN."""

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
        if self.spec.qkv is None:
            out.update({self.spec.q: (q_rows, None), self.spec.k: (kv_rows, None), self.spec.v: (kv_rows, None)})
        elif self.spec.qkv_layout == "heads":  # one query head per key/value head
            out[self.spec.qkv] = (_units(heads, 3 * self.head_dim), None)
        else:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            out[self.spec.qkv] = (torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows]), None)
        return out

    def qkv_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a per-row quantity of the fused `qkv` projection into its query, key and value rows, head by head."""
        if self.spec.qkv_layout == "heads":
            q, k, v = rows.reshape(self.num_heads, 3, self.head_dim).unbind(1)
            return q.reshape(-1), k.reshape(-1), v.reshape(-1)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return rows[:q_size], rows[q_size : q_size + kv_size], rows[q_size + kv_size :]


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

    The layers are the members of the model's `nn.ModuleList` of blocks: the list whose members are of a class named
    in `model._no_split_modules` (what accelerate keeps on one device, e.g. `LlamaDecoderLayer`, `Gemma3DecoderLayer`,
    `GPTNeoXLayer`), or else the longest outermost list of same-class modules that hold weights.
    """
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


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a linear-like module (nn.Linear, Conv1D, quantized linear, peft layer)."""
    module = base_layer(module)
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    return (out_f, in_f) if isinstance(out_f, int) and isinstance(in_f, int) else None


def _linears(module: nn.Module, prefix: str = "") -> list[tuple[str, tuple[int, int]]]:
    """(relative path, (out, in)) of each linear-like module under `module`, in registration order."""
    found = []
    for name, child in module.named_children():
        shape = _linear_shape(child)
        if shape is not None:
            found.append((f"{prefix}{name}", shape))
        elif not isinstance(child, BaseTunerLayer):
            found.extend(_linears(child, f"{prefix}{name}."))
    return found


def _under(path: str, parent: str) -> bool:
    return path.startswith(f"{parent}.")


def _letter(path: str) -> str:
    """The first letter of a module's own name: `q` for `q_proj` or `query`."""
    return path.rpartition(".")[2][:1].lower()


Shapes = list[tuple[str, tuple[int, int]]]


class _LayoutError(ValueError):
    """A layer whose attention or FFN layout `_read_layer` cannot read."""


def _read_attention(attn: Shapes, hidden: int, head_dim: int, override: ArchOverride) -> tuple[dict, int, int]:
    """Paths of the attention projections (`ArchSpec` fields), and the query and key/value widths."""
    # the last linear that writes the hidden size, unless named as a query/key/value (which may have its shape)
    writers = sorted((x for x in attn if x[1][0] == hidden), key=lambda x: _letter(x[0]) not in _QKV_LETTERS)
    if not writers:
        raise _LayoutError(f"no linear of its attention block writes the hidden size {hidden}")
    out_path, (_, q_size) = writers[-1]
    readers = [x for x in attn if x[0] != out_path]
    if q_size % head_dim or any(s[1] != hidden for _, s in readers) or len(readers) not in (1, 3):
        raise _LayoutError(
            f"its attention block should hold an output projection reading heads of {head_dim} channels and one fused "
            f"or three query/key/value projections reading the hidden size {hidden}; it holds {attn}"
        )
    paths: dict[str, str | None] = {"attn_out": out_path} | dict.fromkeys(("q", "k", "v", "qkv"))
    if len(readers) == 1:
        paths["qkv"], (qkv_out, _) = readers[0]
        kv_size = (qkv_out - q_size) // 2 if (qkv_out - q_size) % 2 == 0 else 0
        if override.fused_qkv is None:
            raise _LayoutError(
                f"{paths['qkv']!r} fuses the query, key and value rows, in a layout its shape does not tell: name it "
                "with ArchOverride(fused_qkv='blocks' or 'heads') in ARCH_OVERRIDES"
            )
        if override.fused_qkv == "heads" and kv_size != q_size:
            raise _LayoutError(f"{paths['qkv']!r} is laid out head by head but has {qkv_out} rows, not 3 x {q_size}")
    else:  # where sizes tie (no grouped query attention), by name (q_proj, query, ...), else as registered
        readers.sort(key=lambda x: _QKV_LETTERS.get(_letter(x[0]), 3))
        q = next((x for x in readers if x[1][0] == q_size), readers[0])
        (k_path, (kv_size, _)), (v_path, (v_size, _)) = [x for x in readers if x is not q]
        paths |= {"q": q[0], "k": k_path, "v": v_path}
        if q[1][0] != q_size or v_size != kv_size:
            raise _LayoutError(f"its query/key/value projections {readers} do not match {q_size} query channels")
    if kv_size <= 0 or kv_size % head_dim or (q_size // head_dim) % (kv_size // head_dim):
        raise _LayoutError(f"its {kv_size} key/value channels are not whole groups of {head_dim}-channel heads")
    return paths, q_size, kv_size


def _read_ffn(ffn: Shapes, hidden: int, override: ArchOverride) -> tuple[tuple[str, ...], str, int]:
    """Paths of the up (and gate) projections and of the down projection, and the number of FFN channels."""
    down = [x for x in ffn if x[1][0] == hidden]
    if not down:
        raise _LayoutError(f"no linear outside its attention block writes the hidden size {hidden}")
    down_path, (_, ffn_dim) = down[-1]  # an up projection of the same shape comes first
    ups = [x for x in ffn if x[0] != down_path]
    if not override.fused_gate_up and any(s == (2 * ffn_dim, hidden) for _, s in ups):
        raise _LayoutError(
            f"the FFN projections {ups} look like a fused gate/up projection: name it with "
            "ArchOverride(fused_gate_up=True) in ARCH_OVERRIDES"
        )
    if not ups or any(s != ((2 if override.fused_gate_up else 1) * ffn_dim, hidden) for _, s in ups):
        raise _LayoutError(
            f"the FFN projections {ups} should map the hidden size {hidden} to the {ffn_dim} channels that "
            f"{down_path!r} reads"
        )
    return tuple(p for p, _ in ups), down_path, ffn_dim


def _read_layer(layer: nn.Module, config: Any, override: ArchOverride) -> tuple[ArchSpec, tuple[int, int, int, int]]:
    """The spec of one decoder layer and its (num_heads, num_kv_heads, head_dim, ffn_dim), read off its modules."""
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise _LayoutError("its config has no `hidden_size`")
    attention = [n for n, m in layer.named_modules() if n and "Attention" in type(m).__name__]
    blocks = [n for n in attention if not any(_under(n, o) for o in attention)]
    if len(blocks) != 1:
        raise _LayoutError(f"it has {len(blocks)} attention blocks {blocks} (modules of an `...Attention` class)")
    held = (getattr(layer.get_submodule(n), a, None) for n in reversed(attention) for a in _HEAD_DIM_ATTRS)
    head_dim = next((value for value in held if isinstance(value, int)), None)
    head_dim = head_dim or getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    linears = _linears(layer)
    attn = [x for x in linears if _under(x[0], blocks[0])]
    paths, q_size, kv_size = _read_attention(attn, hidden, head_dim, override)
    ffn_in, ffn_out, ffn_dim = _read_ffn([x for x in linears if x not in attn], hidden, override)
    ffn_config_attr = next((a for a in FFN_CONFIG_ATTRS if hasattr(config, a)), None)
    if ffn_config_attr is None:
        raise _LayoutError(f"its config has none of {FFN_CONFIG_ATTRS} to hold the FFN width")
    reads = paths["qkv"] or paths["q"]
    spec = ArchSpec(
        **paths,
        ffn_in=ffn_in,
        ffn_out=ffn_out,
        ffn_in_fused=override.fused_gate_up,
        attn_module=max((n for n in attention if _under(reads, n)), key=len),
        set_heads=override.set_heads,
        ffn_config_attr=ffn_config_attr,
        heads_in_config=getattr(config, "num_key_value_heads", None) is not None,
        qkv_layout=(paths["qkv"] and override.fused_qkv) or "blocks",
    )
    return spec, (q_size // head_dim, kv_size // head_dim, head_dim, ffn_dim)


def find_width_layers(model: nn.Module) -> tuple[ArchSpec, list[WidthLayer]]:
    """The transformer layers of a Hugging Face model, with where their FFN channels and heads live.

    Every layer must have the same layout (the same module paths); their sizes may differ.
    """
    config = model.config
    override = ARCH_OVERRIDES.get(config.model_type, ArchOverride())
    spec, layers = None, []
    for path, layer in decoder_layers(model):
        try:
            found, sizes = _read_layer(layer, config, override)
            if spec is not None and found != spec:
                raise _LayoutError(f"its layout differs from the first layer's: {found} vs {spec}")
        except _LayoutError as err:
            raise ValueError(
                f"Elastic width cannot find the FFN channels and attention heads of {path!r} ({type(layer).__name__},"
                f" model_type={config.model_type!r}): {err}. Use NLSConfig (elastic rank only) for this model."
            ) from None
        spec = found
        layers.append(WidthLayer(path.rsplit(".", 1)[-1], path, layer, spec, *sizes))
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


def _set_head_counts(attn: nn.Module, layer: WidthLayer, num_heads: int, num_kv_heads: int) -> None:
    """Rewrite the attention module's attributes that hold the layer's head counts or width (e.g. OPT's `num_heads`,
    GPT-2's `split_size`, BERT's `all_head_size`); the other attention classes infer them from the tensors."""
    counts = {
        "num_heads": (layer.num_heads, num_heads),
        "num_attention_heads": (layer.num_heads, num_heads),
        "num_key_value_heads": (layer.num_kv_heads, num_kv_heads),
        "all_head_size": (layer.num_heads * layer.head_dim, num_heads * layer.head_dim),
        "split_size": (layer.num_heads * layer.head_dim, num_heads * layer.head_dim),
    }
    for attr, (old, new) in counts.items():
        if getattr(attn, attr, None) == old:
            setattr(attn, attr, new)


def slice_layer_width(layer: WidthLayer, ffn_keep: torch.Tensor | None, kv_keep: torch.Tensor | None) -> None:
    """Physically remove FFN channels and key/value groups (with their query heads) from one layer."""
    slices = {}
    if ffn_keep is not None:
        slices.update(layer.ffn_slices(ffn_keep))
    if kv_keep is not None:
        slices.update(layer.head_slices(kv_keep))
    for rel, (rows, cols) in slices.items():
        _slice_module(layer.module.get_submodule(rel), rows, cols)
    if kv_keep is not None:
        attn = layer.module.get_submodule(layer.spec.attn_module)
        _set_head_counts(attn, layer, len(kv_keep) * layer.group_size, len(kv_keep))
        if layer.spec.set_heads is not None:
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

    if spec.qkv is not None:
        q, k, v = layer.qkv_rows(element_score(get(spec.qkv)).sum(1))
    else:
        q, k, v = (element_score(get(rel)).sum(1) for rel in (spec.q, spec.k, spec.v))
    o = element_score(get(spec.attn_out)).sum(0)
    groups = per_group(q, True) + per_group(o, True) + per_group(k, False) + per_group(v, False)
    return {"ffn": ffn, "heads": groups}


def __getattr__(name: str) -> Any:
    if name == "ARCH_SPECS":
        warn_renamed(
            "ARCH_SPECS",
            "ARCH_OVERRIDES",
            "find_width_layers reads layouts off the layer modules; the table holds only fused projection layouts",
        )
        return ARCH_OVERRIDES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
