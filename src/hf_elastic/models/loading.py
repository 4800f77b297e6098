"""Load a base model and its tokenizer from a local folder or a Hub id, with clear errors for what users mistype."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def resolve_dtype(value: str | torch.dtype | None, option: str = "--dtype") -> torch.dtype | str | None:
    """`"auto"`, `"bfloat16"`, `"float16"`, `"float32"` (or a `torch.dtype`, or None) as `from_pretrained` takes it."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"{option} {value!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[value]


def is_hub_id(value: str) -> bool:
    """Whether `value` reads as a Hub repo id (`name` or `namespace/name`) rather than a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(value).exists() or value.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _check_source(name_or_path: str, what: str) -> None:
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path} is not a model folder (no config.json). Pass the folder {what}.")
    elif path.exists():
        raise ValueError(
            f"{name_or_path} is a file; pass a model folder or a Hub id such as 'meta-llama/Llama-3.1-8B'."
        )
    elif not is_hub_id(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path} is neither a model folder nor a Hub model id (e.g. 'mistralai/Mistral-7B-v0.3')."
        )


def _hub_error(name_or_path: str, revision: str | None, err: Exception) -> Exception:
    at = f" at revision {revision!r}" if revision else ""
    return FileNotFoundError(
        f"Could not load {name_or_path!r}{at}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. Check "
        "the id (and `huggingface-cli login` for gated models), or pass a local folder. Offline "
        "(HF_HUB_OFFLINE=1) only models already in the Hub cache load."
    )


def load_causal_lm(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    device_map: Any = None,
    **kwargs: Any,
) -> Any:
    """`AutoModelForCausalLM.from_pretrained` for a local folder or a Hub id, with errors that say what to fix.

    Args:
        name_or_path: a local model folder or a Hub id such as `"meta-llama/Llama-3.1-8B"`.
        revision: a branch, tag or commit of the Hub repo.
        dtype: `"auto"` (the checkpoint's dtype), `"bfloat16"`, `"float16"`, `"float32"` or a `torch.dtype`.
        trust_remote_code: run the repo's own modelling code; off unless asked for.
        device_map: passed to `from_pretrained` (e.g. `"auto"` to spread a large model over the GPUs).
    """
    from transformers import AutoModelForCausalLM

    _check_source(name_or_path, "written by save_pretrained")
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            **kwargs,
        )
    except OSError as err:
        raise _hub_error(name_or_path, revision, err) from None


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained`, refusing folders without tokenizer files instead of a silent fallback."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{name_or_path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}). Save the tokenizer into the "
            "folder (tokenizer.save_pretrained) or copy it from the base model."
        )
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _hub_error(name_or_path, revision, err) from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
