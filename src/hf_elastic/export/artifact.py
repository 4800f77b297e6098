"""Which kind of sub-network artefact a folder holds (LoRA adapter, merged checkpoint, OpenVINO IR, GGUF file), and
what the weights of a GGUF file or an OpenVINO IR are stored as."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from .card_info import ArtifactKind

# Files each artefact kind must hold; a tuple inside means "one of these". A GGUF folder holds one `*.gguf` file.
_REQUIRED_FILES: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "adapter": ("adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")),
    "merged": (
        "config.json",
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
    "openvino": ("openvino_model.xml", "openvino_model.bin", "config.json"),
    "gguf": (),
}
_KIND_TITLES = {
    "adapter": "LoRA adapter (peft)",
    "merged": "merged transformers checkpoint",
    "openvino": "OpenVINO IR model (optimum-intel)",
    "gguf": "GGUF file (llama.cpp)",
}
GGUF_SUFFIX = ".gguf"
# ggml tensor types of quantized weights: bits, and what a block holds
_GGML_BLOCKS = {
    "Q4_0": (4, "ggml `Q4_0` blocks of 32 weights (fp16 scale `d` per block: `w = d * (q - 8)`, symmetric)"),
    "Q4_1": (4, "ggml `Q4_1` blocks of 32 weights (fp16 scale `d` and offset `m` per block: `w = d * q + m`)"),
    "Q8_0": (8, "ggml `Q8_0` blocks of 32 weights (fp16 scale `d` per block: `w = d * q`, `q` in int8)"),
}


def detect_artifact_kind(source_dir: str | os.PathLike) -> ArtifactKind:
    """Tell which kind of sub-network artefact a folder holds: `"adapter"`, `"merged"`, `"openvino"` or `"gguf"`.

    Raises `FileNotFoundError` when the folder or a file the kind needs is missing, and `ValueError` when the folder
    holds no known artefact.
    """
    source = Path(source_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"Sub-network folder {str(source)!r} does not exist or is not a directory.")
    names = {p.name for p in source.iterdir() if p.is_file()}
    if "openvino_model.xml" in names or "openvino_model.bin" in names:
        kind = "openvino"
    elif "adapter_config.json" in names or any(n.startswith("adapter_model.") for n in names):
        kind = "adapter"
    elif "config.json" in names:
        kind = "merged"
    elif any(n.endswith(GGUF_SUFFIX) for n in names):
        kind = "gguf"
        gguf_file(source)
    else:
        expected = "; ".join(f"{k}: {_describe(req) or 'one *.gguf file'}" for k, req in _REQUIRED_FILES.items())
        raise ValueError(
            f"{str(source)!r} holds no sub-network artefact (files: {sorted(names) or 'none'}). Expected one of "
            f"{expected}. Write one with SuperNetwork.extract_adapter, extract_model(...).save_pretrained, "
            "export_subnetwork (format='hf-elastic', 'compressed-tensors' or 'gguf') or the OpenVINO export."
        )
    missing = [_describe((req,)) for req in _REQUIRED_FILES[kind] if not _has(names, req)]
    if missing:
        raise FileNotFoundError(
            f"{str(source)!r} looks like a {_KIND_TITLES[kind]} but lacks {', '.join(missing)} "
            f"(needs {_describe(_REQUIRED_FILES[kind])})."
        )
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if kind == "merged" and index_name in names:
            shards = set(json.loads((source / index_name).read_text()).get("weight_map", {}).values())
            lost = sorted(s for s in shards if not (source / s).is_file())
            if lost:
                raise FileNotFoundError(f"{str(source)!r}: {index_name} lists missing weight shards {lost}.")
    return kind


def _has(names: set[str], req: str | tuple[str, ...]) -> bool:
    return any(r in names for r in req) if isinstance(req, tuple) else req in names


def _describe(reqs: tuple[str | tuple[str, ...], ...]) -> str:
    return " + ".join(" or ".join(r) if isinstance(r, tuple) else r for r in reqs)


def gguf_file(source: Path) -> str:
    """The name of the one `*.gguf` file in `source`; a ValueError names them when there are several."""
    found = sorted(p.name for p in source.iterdir() if p.is_file() and p.name.endswith(GGUF_SUFFIX))
    if len(found) != 1:
        raise ValueError(
            f"{str(source)!r} holds {len(found)} GGUF files ({found}); publish one GGUF model per folder."
        )
    return found[0]


def gguf_facts(path: Path) -> dict[str, Any]:
    """What the header of the GGUF file `path` says: architecture, and for quantized weights their bits, ggml block
    type and a sentence describing the blocks. Empty when the `gguf` package is not installed."""
    if importlib.util.find_spec("gguf") is None:
        return {}
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    facts: dict[str, Any] = {"arch": field.contents() if field is not None else None}
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    block = next((name for name in _GGML_BLOCKS if types.get(name)), None)
    if block is not None:
        bits, text = _GGML_BLOCKS[block]
        facts |= {"bits": bits, "group_size": 32, "block": block, "block_text": text}
    return facts


_OV_INT4_CONSTANT = re.compile(r'<data element_type="([ui]4)" shape="([0-9, ]+)"')


def openvino_int4_facts(xml_path: Path) -> dict[str, Any]:
    """Bits and group size of the 4-bit weights of an OpenVINO IR, read from its XML (codes of shape (out, groups,
    group size); NNCF's and hf-elastic's exact-codes export alike); empty when it holds no 4-bit constants. The IR
    records nothing else about them: `openvino_config.json` is only written by optimum-intel's own compression."""
    found = _OV_INT4_CONSTANT.findall(xml_path.read_text(encoding="utf-8", errors="ignore"))
    if not found:
        return {}
    shapes = [[int(x) for x in shape.split(",")] for _, shape in found]
    grouped = [shape[-1] for shape in shapes if len(shape) == 3 and shape[-1] > 1]
    return {"bits": 4, "group_size": max(grouped) if grouped else -1, "symmetric": found[0][0] == "i4"}
