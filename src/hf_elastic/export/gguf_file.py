"""Write a Llama-architecture sub-network as GGUF (llama.cpp, ollama, LM Studio) with its INT4/INT8 codes.

The integer codes are written as they are, in ggml's blocks of 32 weights:

- INT4 groups become `Q4_1` blocks, `w = d * q + m` with `d = fp16(s)` and `m = fp16(-z * d)`; a group of 64 or 128
  is split into blocks with the same `d` and `m`. The weights equal hf-elastic's `(q - z) * s` up to the fp16
  rounding of `d` and `m`. Symmetric layers (every `z = 8`) become `Q4_0` blocks instead, `w = d * (q - 8)`: equal up
  to the rounding of `d` alone, every zero exact, 10 % smaller, and llama.cpp's fastest 4-bit kernels.
- INT8 groups become `Q8_0` blocks, `w = d * (q - z)` with `d = fp16(s)`, where every `q - z` fits in int8 (always
  for symmetric INT8); a layer whose asymmetric codes do not fit is written as F32 `(q - z) * s` instead (exact,
  four times larger), and `write_gguf` returns which layers took that route.
- Everything else (embeddings, norms, float linear layers such as the LM head) keeps the model's float type
  (F32 / F16 / BF16).

The query and key rows are permuted as llama.cpp's `convert_hf_to_gguf.py` does for Llama (rows move whole, so the
codes are unchanged). The tokenizer (byte-level BPE: `tokenizer.ggml.model = gpt2`) and its chat template go into the
file too.

Per-layer widths (LoNAS): llama.cpp's `llama` graph reads per-layer feed-forward and head counts from the metadata but
builds every layer with layer 0's, so such a file does not load. Its `deci` architecture (Nemotron-NAS: the same
tensors, names and rotary layout) builds each layer with its own counts, so a sub-network whose layers differ is
written as `deci`, with per-layer `feed_forward_length`, `attention.head_count` and `attention.head_count_kv`
arrays. llama.cpp runs it; transformers' GGUF loader does not read `deci`.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..compression.quantization.format import QuantLinear, expand_groups

logger = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
INSTALL_HINT = "pip install 'hf-elastic[gguf]'"
BLOCK = 32  # weights per ggml block (Q4_0, Q4_1, Q8_0)
_FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def import_gguf() -> Any:
    """The `gguf` module, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise ImportError(f"format='gguf' needs the gguf package: {INSTALL_HINT}.") from None


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a query/key projection (or its scales, zero points, codes) from Hugging Face's rotary
    layout (halves) to the interleaved one llama.cpp expects for Llama, as `convert_hf_to_gguf.py` does."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """(rows, in / 32, 16) bytes: weight j of a block in the low nibble of byte j, weight j + 16 in its high nibble."""
    rows, cols = qweight.shape
    codes = qweight.reshape(rows, cols // BLOCK, BLOCK)
    return codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)


def q4_0_blocks(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> np.ndarray:
    """ggml `Q4_0` bytes (rows, in / 32 * 18) of symmetric INT4 codes (zero point 8): per block fp16 `d` and 16 bytes
    of nibbles, `w = d * (q - 8)`."""
    rows, cols = qweight.shape
    d = scales.float().half().repeat_interleave(group_size // BLOCK, dim=1)
    parts = [d.numpy().view(np.uint8), _nibbles(qweight).numpy()]
    return np.concatenate([p.reshape(rows, cols // BLOCK, -1) for p in parts], axis=-1).reshape(rows, -1)


def q4_1_blocks(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> np.ndarray:
    """ggml `Q4_1` bytes (rows, in / 32 * 20) of INT4 codes: per block fp16 `d`, fp16 `m`, 16 bytes of nibbles
    (weight j in the low nibble of byte j, weight j + 16 in its high nibble)."""
    rows, cols = qweight.shape
    reps = group_size // BLOCK
    d = scales.float().half().repeat_interleave(reps, dim=1)
    m = (-zeros.float().repeat_interleave(reps, dim=1) * d.float()).half()
    parts = [d.numpy().view(np.uint8), m.numpy().view(np.uint8), _nibbles(qweight).numpy()]
    return np.concatenate([p.reshape(rows, cols // BLOCK, -1) for p in parts], axis=-1).reshape(rows, -1)


def q8_0_blocks(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> np.ndarray | None:
    """ggml `Q8_0` bytes (rows, in / 32 * 34) of INT8 codes: per block fp16 `d` and 32 int8 `q - z`; None when some
    `q - z` falls outside int8 (asymmetric groups whose zero point is far from 128)."""
    rows, cols = qweight.shape
    signed = qweight.to(torch.int16) - expand_groups(zeros, group_size).to(torch.int16)
    if int(signed.min()) < -128 or int(signed.max()) > 127:
        return None
    d = scales.float().half().repeat_interleave(group_size // BLOCK, dim=1)
    parts = [d.numpy().view(np.uint8), signed.to(torch.int8).numpy().view(np.uint8)]
    return np.concatenate([p.reshape(rows, cols // BLOCK, -1) for p in parts], axis=-1).reshape(rows, -1)


def head_dim_of(config: Any) -> int:
    """The attention head size of a Llama config (its `head_dim`, else hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_widths(model: nn.Module) -> list[tuple[int, int, int]]:
    """(feed-forward size, query heads, key/value heads) of every layer of a Llama, read from its linear layers.

    Raises a ValueError for the model checks `write_gguf` needs: a Llama with default rotary embeddings, consistent
    projection shapes in every layer, and INT4/INT8 groups that fill ggml's blocks of 32 weights.
    """
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(
            f"format='gguf' writes Llama-architecture models (SmolLM2, Llama 2/3, TinyLlama); this one is "
            f"model_type={getattr(config, 'model_type', None)!r}. Use format='compressed-tensors' or 'hf-elastic'."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"format='gguf' writes default rotary embeddings only; this model has rope_type={rope['rope_type']!r}."
        )
    head_dim, hidden = head_dim_of(config), config.hidden_size
    widths = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        ffn, heads, kv = mlp.down_proj.in_features, attn.q_proj.out_features, attn.k_proj.out_features
        expected = {
            "self_attn.q_proj": (heads, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, heads),
            "mlp.gate_proj": (ffn, hidden),
            "mlp.up_proj": (ffn, hidden),
            "mlp.down_proj": (hidden, ffn),
        }
        if heads % head_dim or kv % head_dim or not kv:
            raise ValueError(
                f"format='gguf' cannot describe layer {i}: its query and key projections have {heads} and {kv} rows, "
                f"not whole heads of {head_dim} with at least one key/value head."
            )
        for name, shape in expected.items():
            module = layer.get_submodule(name)
            if (module.out_features, module.in_features) != shape:
                raise ValueError(
                    f"format='gguf' cannot describe layer {i}: {name} is {module.out_features}x{module.in_features}, "
                    f"where the layer's other projections make it {shape[0]}x{shape[1]}."
                )
        widths.append((ffn, heads // head_dim, kv // head_dim))
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.group_size % BLOCK:
            raise ValueError(
                f"format='gguf' stores INT{module.bits} groups in ggml blocks of {BLOCK} weights with one scale, "
                f"but {name} has group_size={module.group_size}. Quantize with a group size that is a multiple of "
                f"{BLOCK} (32, 64, 128), or use format='compressed-tensors'."
            )
    return widths


def _pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for the byte-level BPE pre-tokenizer of `tokenizer`."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"] or {}
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = [step.get("type") for step in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (convert_hf_to_gguf_update.py); "gpt2" is refused
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise ValueError(
        f"format='gguf' knows llama.cpp's name for byte-level BPE pre-tokenizers (GPT-2's, SmolLM's), not for "
        f"{json.dumps(spec)[:200]}. Convert the model with llama.cpp's convert_hf_to_gguf.py instead."
    )


def _add_tokenizer(writer: Any, gguf: Any, tokenizer: Any, vocab_size: int) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(
            f"format='gguf' writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2); this one is a "
            f"{model.get('type')} tokenizer. Convert the model with llama.cpp's convert_hf_to_gguf.py instead."
        )
    pre = _pre_tokenizer(tokenizer)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < vocab_size:
            tokens[i] = added.content
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    dropped = len(tokenizer) - sum(t != gguf.TokenType.UNUSED for t in types)
    if dropped > 0:
        logger.warning("GGUF: %d tokenizer entries have ids beyond the embedding's %d rows; left out.", dropped,
                       vocab_size)  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None and token_id < vocab_size:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(
    model: nn.Module, gguf: Any, arch: Any, widths: list[tuple[int, int, int]]
) -> tuple[list[tuple[str, np.ndarray, Any]], dict[str, str]]:
    """(GGUF name, array, ggml type) of every tensor, and the ggml type written for each linear layer."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {
        f"model.layers.{i}.self_attn.{proj}.": n
        for i, (_, q, kv) in enumerate(widths)
        for proj, n in (("q_proj", q), ("k_proj", kv))
    }
    out, kinds, seen = [], {}, set()
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{n}." for n in quant))}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for name, module in quant.items():
        state[f"{name}.weight"] = module  # written from its codes below
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias
    for key, value in state.items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"format='gguf' has no GGUF name for the tensor {key!r} of this Llama model.")
        if target in seen:
            continue
        seen.add(target)
        n_head = next((n for prefix, n in heads.items() if key.startswith(prefix)), None)
        if isinstance(value, QuantLinear):
            q, s, z = value.qweight, value.scales, value.zeros
            if n_head is not None:
                q, s, z = (permute_rows(t, n_head) for t in (q, s, z))
            if value.bits == 4 and bool((z == 8).all()):
                blocks, qtype = q4_0_blocks(q, s, value.group_size), gguf.GGMLQuantizationType.Q4_0
            elif value.bits == 4:
                blocks, qtype = q4_1_blocks(q, s, z, value.group_size), gguf.GGMLQuantizationType.Q4_1
            else:
                blocks, qtype = q8_0_blocks(q, s, z, value.group_size), gguf.GGMLQuantizationType.Q8_0
            if blocks is not None:
                out.append((target, blocks, qtype))
                kinds[key.removesuffix(".weight")] = qtype.name
                continue
            value = torch.from_numpy(np.ascontiguousarray(value.dequantize(torch.float32).numpy()))
            kinds[key.removesuffix(".weight")] = "F32"
        elif key.endswith(".weight") and value.dim() == 2:
            kinds[key.removesuffix(".weight")] = _FLOAT_TYPES.get(value.dtype, "F32")
        tensor = value.detach().cpu()
        if n_head is not None:
            tensor = permute_rows(tensor, n_head)
        if tensor.dim() == 1 or tensor.dtype not in _FLOAT_TYPES:
            tensor = tensor.float()  # norms and biases: F32, as llama.cpp's converter writes them
        if tensor.dtype == torch.bfloat16:
            out.append((target, tensor.view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16))
        else:
            out.append((target, tensor.contiguous().numpy(), None))
    return out, kinds


def write_gguf(model: nn.Module, path: str | Path, tokenizer: Any, *, name: str | None = None) -> dict[str, str]:
    """Write `model` (a Llama; `QuantLinear` layers keep their codes) and `tokenizer` to the GGUF file `path`.

    Layers of different widths (LoNAS) make a `deci` file (per-layer counts; see the module docstring). Returns the
    ggml type written for each linear layer (`Q4_0`, `Q4_1`, `Q8_0`, `F32`, ...), so that asymmetric INT8 layers
    written as F32 are visible.
    """
    gguf = import_gguf()
    if tokenizer is None:
        raise ValueError("format='gguf' needs the tokenizer: llama.cpp reads the vocabulary from the GGUF file.")
    widths = layer_widths(model)
    config = model.config
    uniform = len(set(widths)) == 1
    arch = gguf.MODEL_ARCH.LLAMA if uniform else gguf.MODEL_ARCH.DECI
    tensors, kinds = _tensors(model, gguf, arch, widths)
    head_dim = head_dim_of(config)
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "hf-elastic-subnetwork")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    ffn, heads, kv_heads = (list(column) for column in zip(*widths, strict=True))
    writer.add_feed_forward_length(ffn[0] if uniform else ffn)
    writer.add_head_count(heads[0] if uniform else heads)
    writer.add_head_count_kv(kv_heads[0] if uniform else kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if not uniform or head_dim != config.hidden_size // heads[0]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    types = set(kinds.values())
    file_type = next(
        (
            t
            for k, t in (
                ("Q4_1", "MOSTLY_Q4_1"),
                ("Q4_0", "MOSTLY_Q4_0"),
                ("Q8_0", "MOSTLY_Q8_0"),
                ("F16", "MOSTLY_F16"),
            )
            if k in types
        ),  # fmt: skip
        "ALL_F32",
    )
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, gguf, tokenizer, config.vocab_size)
    for target, array, qtype in tensors:
        writer.add_tensor(target, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    exact_f32 = [k for k, v in kinds.items() if v == "F32" and k in {n for n, _ in _quantized(model)}]
    if exact_f32:
        logger.warning(
            "GGUF: %d asymmetric INT8 layers have codes q - z outside int8, so Q8_0 cannot hold them; written as "
            "exact F32 (e.g. %s).",
            len(exact_f32),
            exact_f32[0],
        )
    return kinds


def _quantized(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
