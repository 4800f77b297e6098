"""Load a base model and its tokenizer from a local folder or a Hub id, with clear errors for what users mistype."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

HF_ELASTIC_ONLY_KEY = "hf_elastic_only"
_MODEL_TYPE_KEY = "hf_elastic_model_type"
_QUANT_KEY = "hf_elastic_quantization_config"
LOADER = "hf_elastic.load_exported"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
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
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}). Save the tokenizer into the "
            "folder (tokenizer.save_pretrained) or copy it from the base model."
        )
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _hub_error(name_or_path, revision, err) from None


def mark_hf_elastic_only(config: dict[str, Any], reason: str) -> dict[str, Any]:
    """The contents of a `config.json` that stock transformers refuses to load, naming hf_elastic and its loader.

    For folders only hf_elastic reads (per-layer widths, hf_elastic's INT4/INT8 format), which stock transformers
    would otherwise load silently wrong. `AutoConfig`, `AutoModel*.from_pretrained` and `pipeline` stop on the model
    type, e.g. "has model type `llama (hf_elastic per-layer widths: load it with hf_elastic.load_exported)` but
    Transformers does not recognize this architecture"; a model class's own `from_pretrained` stops on the
    `quantization_config`, which has no `quant_method`. The real values are kept in flat `hf_elastic_*` keys (nested
    dicts holding `model_type` confuse transformers' config loading), and `load_config` restores them.
    """
    if HF_ELASTIC_ONLY_KEY in config:
        return dict(config)
    note = f"hf_elastic {reason}: load it with {LOADER}"
    out = config | {
        "model_type": f"{config['model_type']} ({note})",
        "quantization_config": {"hf_elastic": note},
        HF_ELASTIC_ONLY_KEY: reason,
        _MODEL_TYPE_KEY: config["model_type"],
    }
    if config.get("quantization_config") is not None:
        out[_QUANT_KEY] = json.dumps(config["quantization_config"])
    return out


def hf_elastic_only_reason(path: str | Path) -> str | None:
    """Why the model folder `path` needs hf_elastic to load (e.g. `"per-layer widths"`), or None for a stock one."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    reason = json.loads(file.read_text()).get(HF_ELASTIC_ONLY_KEY)
    return reason if isinstance(reason, str) else None


def load_config(path: str | Path) -> Any:
    """`AutoConfig.from_pretrained` of a local model folder, also for the folders `mark_hf_elastic_only` marked."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..utils import read_json

    path = Path(path)
    data = read_json(path / "config.json", "save the model again or restore the file")
    if HF_ELASTIC_ONLY_KEY not in data:
        return AutoConfig.from_pretrained(path)
    data.pop(HF_ELASTIC_ONLY_KEY)
    model_type = data.pop(_MODEL_TYPE_KEY, None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{path / 'config.json'} records {_MODEL_TYPE_KEY}={model_type!r}, which this transformers does not "
            "know. Upgrade transformers, or pass the folder hf_elastic wrote."
        )
    data["model_type"] = model_type
    data.pop("quantization_config", None)
    if _QUANT_KEY in data:
        data["quantization_config"] = json.loads(data.pop(_QUANT_KEY))
    return CONFIG_MAPPING[model_type].from_dict(data)


def build_from_config(model_class: Any, path: str | Path, config: Any, dtype: torch.dtype) -> Any:
    """`model_class` built from `config` with uninitialized weights (the caller loads them), and with the folder's
    `generation_config.json` as `from_pretrained` reads it (else `generate` would follow `config.use_cache`, which
    `Trainer` switches off)."""
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = model_class._from_config(config, dtype=dtype)
    if (Path(path) / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def copy_module(
    module: torch.nn.Module,
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
    replace: Mapping[torch.nn.Module, torch.nn.Module] | None = None,
) -> Any:
    """A deep copy of `module` that copies no tensor data: each parameter and buffer becomes `convert(tensor)` (by
    default a new tensor object on the same storage), and each submodule in `replace` becomes its mapped module.

    Tied tensors stay tied. With the default, replacing a tensor of the copy leaves the original as it is, but writing
    into one in place writes into both. `convert=lambda t: t.to("cpu", torch.float32)` gives a float32 CPU copy that
    holds each weight once, in float32, with no intermediate copy in the original dtype.
    """
    memo: dict[int, Any] = {id(old): new for old, new in (replace or {}).items()}
    for sub in module.modules():
        for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
            if tensor is None or id(tensor) in memo:
                continue
            new = tensor.detach() if convert is None else convert(tensor.detach())
            if isinstance(tensor, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad and new.is_floating_point())
            memo[id(tensor)] = new
    return copy.deepcopy(module, memo)
