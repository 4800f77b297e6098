"""Publish extracted sub-networks to the Hugging Face Hub: the artefact plus a generated model card, in one upload."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .quantization import FORMAT_NAME as QUANT_FORMAT_NAME
from .quantization import QUANT_CONFIG_NAME
from .sparsity import SPARSITY_REPORT_NAME
from .utils import SUBNET_CONFIG_NAME, atomic_directory, check_output_dir

logger = logging.getLogger(__name__)

ArtifactKind = Literal["adapter", "merged", "openvino"]
Method = Literal["lonas", "nls", "shears", "sqft", "sqft-sparsepeft", "sqft-qa-sparsepeft"]

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "hf_elastic_card.md"
OV_CONFIG_NAME = "openvino_config.json"
CARD_NAME = "README.md"

SIZE_KEYS = ("params", "base_params", "adapter_params", "macs")
_SIZE_LABELS = {"params": "parameters", "base_params": "base parameters", "adapter_params": "adapter parameters"}
_PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp")
_SEARCH_STEMS = ("search", "search_progression")  # hf_elastic.search writes search.csv/.png; LoNAS search_progression
_MAX_PARETO_ROWS = 30
# Hub `base_model_relation` values (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
# Files each artefact kind must hold; a tuple inside means "one of these".
_REQUIRED_FILES: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "adapter": ("adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")),
    "merged": (
        "config.json",
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
    "openvino": ("openvino_model.xml", "openvino_model.bin", "config.json"),
}
_KIND_TITLES = {
    "adapter": "LoRA adapter (peft)",
    "merged": "merged transformers checkpoint",
    "openvino": "OpenVINO IR model (optimum-intel)",
}
_AUTO_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "feature-extraction": "AutoModel",
}


@dataclass(frozen=True)
class _Paper:
    short: str
    title: str
    venue: str
    url: str
    arxiv: str | None
    bibtex: str

    @property
    def link(self) -> str:
        return f"[arXiv:{self.arxiv}](https://arxiv.org/abs/{self.arxiv})" if self.arxiv else f"<{self.url}>"


_PAPERS = {
    "lonas": _Paper(
        "LoNAS",
        "LoNAS: Elastic Low-Rank Adapters for Efficient Large Language Models",
        "LREC-COLING 2024",
        "https://aclanthology.org/2024.lrec-main.940",
        None,
        "@inproceedings{munoz2024lonas,\n"
        "  title = {LoNAS: Elastic Low-Rank Adapters for Efficient Large Language Models},\n"
        "  author = {Mu{\\~n}oz, J. Pablo and Yuan, Jinjie and Zheng, Yi and Jain, Nilesh},\n"
        "  booktitle = {Proceedings of the 2024 Joint International Conference on Computational Linguistics, "
        "Language Resources and Evaluation (LREC-COLING 2024)},\n"
        "  year = {2024},\n"
        "  url = {https://aclanthology.org/2024.lrec-main.940}\n"
        "}",
    ),
    "shears": _Paper(
        "Shears",
        "Shears: Unstructured Sparsity with Neural Low-rank Adapter Search",
        "NAACL 2024, Industry Track",
        "https://arxiv.org/abs/2404.10934",
        "2404.10934",
        "@inproceedings{munoz2024shears,\n"
        "  title = {Shears: Unstructured Sparsity with Neural Low-rank Adapter Search},\n"
        "  author = {Mu{\\~n}oz, J. Pablo and Yuan, Jinjie and Jain, Nilesh},\n"
        "  booktitle = {Proceedings of the 2024 Conference of the North American Chapter of the Association for "
        "Computational Linguistics: Human Language Technologies (Volume 6: Industry Track)},\n"
        "  year = {2024},\n"
        "  eprint = {2404.10934},\n"
        "  archivePrefix = {arXiv}\n"
        "}",
    ),
    "sqft": _Paper(
        "SQFT",
        "SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models",
        "Findings of EMNLP 2024",
        "https://arxiv.org/abs/2410.03750",
        "2410.03750",
        "@inproceedings{munoz2024sqft,\n"
        "  title = {SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models},\n"
        "  author = {Mu{\\~n}oz, Juan Pablo and Yuan, Jinjie and Jain, Nilesh},\n"
        "  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2024},\n"
        "  pages = {12817--12832},\n"
        "  year = {2024},\n"
        "  eprint = {2410.03750},\n"
        "  archivePrefix = {arXiv}\n"
        "}",
    ),
}


@dataclass(frozen=True)
class _MethodInfo:
    title: str
    description: str
    tags: tuple[str, ...]
    papers: tuple[str, ...]


_NLS = (
    "Neural Low-rank adapter Search (NLS) trains LoRA adapters whose rank is elastic: a sub-network uses the first "
    "`r` rank dimensions of every adapter group, so one training run of the weight-sharing super-network yields "
    "adapters of many sizes, and a search picks one of them."
)
_METHODS: dict[str, _MethodInfo] = {
    "lonas": _MethodInfo(
        "LoNAS",
        "LoNAS trains a weight-sharing super-network of elastic low-rank adapters in which the LoRA rank, the FFN "
        "width and the number of attention heads of the base model can all shrink. A sub-network fixes one rank per "
        "adapter group and one width per layer; merging it removes the dropped channels and heads for real.",
        ("lonas",),
        ("lonas",),
    ),
    "nls": _MethodInfo("NLS", _NLS, ("nls",), ("shears",)),
    "shears": _MethodInfo(
        "Shears",
        "Shears sparsifies the base model with an unstructured, zeroth-order method (Wanda) and freezes it. " + _NLS,
        ("shears", "nls"),
        ("shears",),
    ),
    "sqft": _MethodInfo(
        "SQFT",
        "SQFT fine-tunes a sparse, optionally low-precision, base model with elastic-rank adapters. " + _NLS,
        ("sqft", "nls"),
        ("sqft", "shears"),
    ),
    "sqft-sparsepeft": _MethodInfo(
        "SQFT + SparsePEFT",
        "SQFT with SparsePEFT: the adapters are masked with the sparsity pattern of the sparse base model, so "
        "merging them into the base keeps its sparsity. " + _NLS,
        ("sqft", "sparsepeft", "nls"),
        ("sqft", "shears"),
    ),
    "sqft-qa-sparsepeft": _MethodInfo(
        "SQFT + QA-SparsePEFT",
        "SQFT with QA-SparsePEFT: sparsity-preserving adapters trained quantization-aware on a sparse INT4 base "
        "model, so the merged model stays sparse and in the base model's quantized format. " + _NLS,
        ("sqft", "qa-sparsepeft", "nls"),
        ("sqft", "shears"),
    ),
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class CardInfo:
    """What the model card of a published sub-network says beyond what its files already record.

    Fields left `None` are read from the artefact folder when it has them: `elastic_subnet.json` (sub-network config
    and size), `sparsity_report.json` (`total_sparsity`, `pattern`), `quantization_config.json` or the
    `quantization_config` of `config.json` / `openvino_config.json` (`bits`, `group_size`), the search results from
    `search.csv` / `pareto*.csv`, and the base model from `adapter_config.json`. Explicit values win over the files.

    Example:

    ```py
    >>> from huggingface_hub import EvalResult
    >>> info = CardInfo(
    ...     base_model="meta-llama/Llama-3.2-1B",
    ...     method="shears",
    ...     license="apache-2.0",
    ...     datasets=["openai/gsm8k"],
    ...     max_size=supernet.count("max"),
    ...     eval_results=[EvalResult("text-generation", "openai/gsm8k", "GSM8K", "accuracy", 0.41)],
    ... )
    ```
    """

    method: Method = field(metadata=_help(f"The NAS method that produced the sub-network: one of {get_args(Method)}."))
    base_model: str | None = field(
        default=None,
        metadata=_help(
            "Hub id of the base model (e.g. 'meta-llama/Llama-3.2-1B'). Defaults to the adapter's "
            "base_model_name_or_path or the checkpoint's _name_or_path when that is a Hub id."
        ),
    )
    license: str | None = field(default=None, metadata=_help("Hub license id, e.g. 'apache-2.0'."))
    model_name: str | None = field(
        default=None, metadata=_help("Title of the card and model-index name. Defaults to the repository name.")
    )
    repo_id: str | None = field(
        default=None, metadata=_help("Hub id used in the loading snippets. `push_to_hub` fills it in.")
    )
    summary: str | None = field(default=None, metadata=_help("Opening paragraph; a generated one by default."))
    language: str | list[str] | None = field(default=None, metadata=_help("ISO 639 language code(s)."))
    datasets: list[str] = field(default_factory=list, metadata=_help("Hub ids of the training datasets."))
    pipeline_tag: str = field(default="text-generation", metadata=_help("Hub task, e.g. 'text-classification'."))
    tags: list[str] = field(default_factory=list, metadata=_help("Extra Hub tags, added to the generated ones."))
    sparsity: float | None = field(
        default=None, metadata=_help("Fraction of zero weights in the base model's linear layers, in [0, 1].")
    )
    bits: int | None = field(default=None, metadata=_help("Bit width of the quantized weights (e.g. 4)."))
    group_size: int | None = field(
        default=None, metadata=_help("Quantization group size; -1 means one scale per output channel.")
    )
    subnet_config: dict[str, int] | None = field(
        default=None, metadata=_help("The sub-network config ({dimension: value}), e.g. `supernet.active_config`.")
    )
    subnet_size: dict[str, int] | None = field(
        default=None, metadata=_help("`supernet.count(config)` of the sub-network: params, base_params, macs, ...")
    )
    max_size: dict[str, int] | None = field(
        default=None, metadata=_help("`supernet.count('max')`: the maximal sub-network, to compare sizes with.")
    )
    search_space: dict[str, Any] | None = field(
        default=None, metadata=_help("The elastic choices of the super-network, e.g. {'rank_choices': [32, 24, 16]}.")
    )
    search_results: list[dict[str, Any]] | None = field(
        default=None,
        metadata=_help("Rows of the Pareto table (one dict per sub-network). Defaults to the rows of a Pareto CSV."),
    )
    training_data: str | None = field(default=None, metadata=_help("Free-text description of the training data."))
    hyperparameters: dict[str, Any] | None = field(
        default=None, metadata=_help("Training hyper-parameters shown as a table (e.g. learning_rate, epochs).")
    )
    eval_results: list[EvalResult] = field(
        default_factory=list,
        metadata=_help("Evaluation results: `huggingface_hub.EvalResult`s or dicts of its arguments."),
    )
    how_to_load: str | None = field(
        default=None, metadata=_help("Markdown replacing the generated 'How to load' section (e.g. custom formats).")
    )

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"CardInfo.method={self.method!r} is not known; use one of {list(_METHODS)}.")
        if self.base_model is not None:
            _check_base_model(self.base_model, "CardInfo.base_model")
        for name in ("license", "model_name", "summary", "training_data", "how_to_load", "repo_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"CardInfo.{name} must be a non-empty string or None, got {value!r}.")
        if self.repo_id is not None:
            _check_repo_id(self.repo_id)
        self.datasets = _str_list("datasets", self.datasets)
        bad = [d for d in self.datasets if not _is_repo_id(d)]
        if bad:
            raise ValueError(f"CardInfo.datasets must be Hub dataset ids (e.g. 'openai/gsm8k'), got {bad}.")
        self.tags = _str_list("tags", self.tags)
        if self.language is not None and not isinstance(self.language, str):
            self.language = _str_list("language", self.language)
        if not isinstance(self.pipeline_tag, str) or not self.pipeline_tag:
            raise ValueError(f"CardInfo.pipeline_tag must be a Hub task name, got {self.pipeline_tag!r}.")
        if self.sparsity is not None:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, numbers.Real):
                raise ValueError(f"CardInfo.sparsity must be a fraction in [0, 1], got {self.sparsity!r}.")
            if not 0.0 <= self.sparsity <= 1.0:
                raise ValueError(
                    f"CardInfo.sparsity={self.sparsity} is outside [0, 1]; pass a fraction (0.5 for 50%)."
                )
            self.sparsity = float(self.sparsity)
        _check_bits(self.bits, self.group_size, "CardInfo")
        for name in ("subnet_config", "subnet_size", "max_size"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _int_dict(f"CardInfo.{name}", value))
        for name in ("search_space", "hyperparameters"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"CardInfo.{name} must be a dict or None, got {type(value).__name__}.")
        if self.search_results is not None:
            if isinstance(self.search_results, (str, bytes)) or not all(
                isinstance(r, Mapping) for r in self.search_results
            ):
                raise ValueError("CardInfo.search_results must be a list of dicts (one per sub-network).")
            self.search_results = [dict(r) for r in self.search_results]
        self.eval_results = [_to_eval_result(r) for r in (self.eval_results or [])]


def _str_list(name: str, values: Any) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if values is None or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"CardInfo.{name} must be a list of non-empty strings, got {values!r}.")
    return list(dict.fromkeys(values))


def _int_dict(name: str, value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict of name to integer, got {type(value).__name__}.")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or int(v) != v:
            raise ValueError(f"{name}[{k!r}] must be an integer, got {v!r}.")
        out[str(k)] = int(v)
    return out


def _check_bits(bits: Any, group_size: Any, owner: str) -> None:
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32):
        raise ValueError(f"{owner}: bits must be an integer in [1, 32] (e.g. 4), got {bits!r}.")
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size > 0 or group_size == -1)
    ):
        raise ValueError(f"{owner}: group_size must be a positive integer or -1 (per channel), got {group_size!r}.")


def _to_eval_result(value: Any) -> EvalResult:
    if isinstance(value, Mapping):
        try:
            value = EvalResult(**value)
        except TypeError as e:
            raise ValueError(
                f"Cannot build an EvalResult from {dict(value)!r}: {e}. Required keys: task_type, dataset_type, "
                "dataset_name, metric_type, metric_value."
            ) from None
    if not isinstance(value, EvalResult):
        raise ValueError(
            f"CardInfo.eval_results holds {type(value).__name__}; use huggingface_hub.EvalResult or a dict."
        )
    metric = value.metric_value
    if not isinstance(metric, (str, int, float)) and hasattr(metric, "item"):
        value = dataclasses.replace(value, metric_value=metric.item())  # numpy / torch scalars are not YAML
    if isinstance(value.metric_value, float) and not math.isfinite(value.metric_value):
        raise ValueError(f"Evaluation result {value.metric_type} on {value.dataset_name} is {value.metric_value}.")
    return value


def _check_repo_id(repo_id: Any) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"Invalid repo_id {repo_id!r}: {e} Use 'name' or 'namespace/name'.") from None
    if not repo_id:
        raise ValueError("repo_id is empty; use 'name' or 'namespace/name'.")


def _check_base_model(value: str, owner: str) -> None:
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(
            f"{owner}={value!r} is not a Hub model id. The card links the base model on the Hub: pass its id, "
            "e.g. 'meta-llama/Llama-3.2-1B', not a local path."
        ) from None


# ---------------------------------------------------------------------------------------------------- artefact


def detect_artifact_kind(source_dir: str | os.PathLike) -> ArtifactKind:
    """Tell which kind of sub-network artefact a folder holds: `"adapter"`, `"merged"` or `"openvino"`.

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
    else:
        expected = "; ".join(f"{k}: {_describe(req)}" for k, req in _REQUIRED_FILES.items())
        raise ValueError(
            f"{str(source)!r} holds no sub-network artefact (files: {sorted(names) or 'none'}). Expected one of "
            f"{expected}. Write one with SuperNetwork.extract_adapter, extract_model(...).save_pretrained or the "
            "OpenVINO export."
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


@dataclass
class _Facts:
    kind: ArtifactKind
    base_model_hint: str | None = None
    subnet_config: dict[str, int] | None = None
    subnet_size: dict[str, int] | None = None
    max_size: dict[str, int] | None = None
    sparsity: float | None = None
    sparsity_source: str | None = None
    sparsity_pattern: str | None = None
    bits: int | None = None
    group_size: int | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    pareto_csv: Path | None = None
    pareto_plot: Path | None = None


def _read_json(path: Path) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def _collect_facts(source: Path, kind: ArtifactKind) -> _Facts:
    """What the artefact folder records about itself: base model, sub-network, quantization, sparsity, search."""
    facts = _Facts(kind)
    if kind == "adapter":
        facts.base_model_hint = _read_json(source / "adapter_config.json").get("base_model_name_or_path")
    elif (source / "config.json").is_file():
        facts.base_model_hint = _read_json(source / "config.json").get("_name_or_path")

    if (source / SUBNET_CONFIG_NAME).is_file():
        data = _read_json(source / SUBNET_CONFIG_NAME)
        if isinstance(data.get("config"), Mapping):
            facts.subnet_config = _int_dict(SUBNET_CONFIG_NAME + " config", data["config"])
        size = {k: data[k] for k in SIZE_KEYS if k in data}
        facts.subnet_size = _int_dict(SUBNET_CONFIG_NAME, size) if size else None
        if isinstance(data.get("max"), Mapping):
            facts.max_size = _int_dict(SUBNET_CONFIG_NAME + " max", data["max"])

    # hf_elastic's INT4/INT8 format, a transformers quantization_config, or optimum-intel's weight compression
    for name, key in (
        (QUANT_CONFIG_NAME, None),
        ("config.json", "quantization_config"),
        (OV_CONFIG_NAME, "quantization_config"),
    ):
        if not (source / name).is_file():
            continue
        data = _read_json(source / name)
        data = data.get(key) if key else data
        if isinstance(data, Mapping) and data.get("bits") is not None:
            facts.bits, facts.group_size = data.get("bits"), data.get("group_size")
            facts.quantization = {k: data[k] for k in ("format", "method", "symmetric", "sym") if k in data}
            break
    _check_bits(facts.bits, facts.group_size, f"the quantization config in {str(source)!r}")

    report = source / SPARSITY_REPORT_NAME
    if report.is_file():
        data = _read_json(report)
        value = data.get("total_sparsity", data.get("sparsity"))
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            facts.sparsity, facts.sparsity_source = float(value), f"from `{SPARSITY_REPORT_NAME}`"
            pattern = data.get("pattern")
            facts.sparsity_pattern = pattern if isinstance(pattern, str) and pattern != "unstructured" else None
        else:
            logger.warning("%s holds no 'total_sparsity' fraction in [0, 1]; ignoring it.", report)
    if facts.sparsity is None and kind == "merged" and facts.bits is None:
        facts.sparsity = measure_sparsity(source)
        facts.sparsity_source = "measured on the published weights" if facts.sparsity is not None else None

    for p in sorted(source.iterdir()):
        stem, suffix = p.stem.lower(), p.suffix.lower()
        if not p.is_file() or not (stem.startswith("pareto") or stem in _SEARCH_STEMS):
            continue
        if suffix == ".csv" and facts.pareto_csv is None:
            facts.pareto_csv = p
        elif suffix in _PLOT_SUFFIXES and facts.pareto_plot is None:
            facts.pareto_plot = p
    return facts


def measure_sparsity(source_dir: str | os.PathLike) -> float | None:
    """Fraction of exact zeros in the 2-D weights of the linear layers of a safetensors checkpoint folder.

    Embeddings, the output head and normalisation weights are left out. Returns `None` when the folder has no
    safetensors weights to measure.
    """
    from safetensors import safe_open

    zeros = total = 0
    for path in sorted(Path(source_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                low = name.lower()
                if not low.endswith(".weight") or any(s in low for s in ("embed", "lm_head", "wte", "wpe", "norm")):
                    continue
                tensor = f.get_tensor(name)
                if tensor.ndim != 2 or not tensor.is_floating_point():
                    continue
                zeros += int((tensor == 0).sum())
                total += tensor.numel()
    return zeros / total if total else None


# ---------------------------------------------------------------------------------------------------- card


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list, tuple)):
        text = "`" + json.dumps(value, separators=(",", ":"), sort_keys=True) + "`"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _csv_cell(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return _cell(text)
    return _cell(int(number) if number.is_integer() and "." not in text else number)


def _read_pareto_csv(path: Path) -> tuple[list[str], list[list[str]], str]:
    """Header, formatted rows and a note. A `pareto` column (as in `SearchResult.to_csv`, which lists every evaluation
    and then one column per dimension) keeps only the flagged rows and the columns before it."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"Pareto CSV {str(path)!r} is empty; it needs a header row.")
        rows = [row for row in reader if row]
    note = ""
    if "pareto" in header:
        i = header.index("pareto")
        front = [row for row in rows if row[i].strip().lower() in ("1", "true", "yes")]
        note = f"the {len(front)} Pareto-optimal of {len(rows)} evaluated sub-networks, "
        header, rows = header[:i], [row[:i] for row in front]
    return [_cell(h) for h in header], [[_csv_cell(c) for c in row] for row in rows], note


def _dimension_kind(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else name


def _config_rows(config: Mapping[str, int]) -> list[dict[str, str]]:
    by_kind: dict[str, Counter] = {}
    for name, value in config.items():
        by_kind.setdefault(_dimension_kind(name), Counter())[value] += 1
    return [
        {"kind": kind, "chosen": ", ".join(f"{v} ({n})" for v, n in sorted(counts.items(), reverse=True))}
        for kind, counts in by_kind.items()
    ]


def _size_rows(sub: Mapping[str, int] | None, full: Mapping[str, int] | None) -> list[dict[str, str]]:
    if not sub:
        return []
    rows = []
    for key in SIZE_KEYS:
        if key not in sub:
            continue
        big = (full or {}).get(key)
        ratio = f"{sub[key] / big:.1%}" if big else ""
        label = _SIZE_LABELS.get(key, "MACs per token" if key == "macs" else key)
        rows.append({"name": label, "sub": _human(sub[key]), "max": _human(big) if big else "n/a", "ratio": ratio})
    return rows


def _bits_texts(bits: int | None, group_size: int | None, details: Mapping[str, Any]) -> tuple[str, str]:
    if bits is None or bits >= 16:
        return "not quantized", "No weight quantization was recorded: the weights keep their floating-point type."
    if group_size is None:
        groups = "the group size was not recorded"
    elif group_size == -1:
        groups = "one scale per output channel"
    else:
        groups = f"one scale per group of {group_size} weights"
    how = []
    if details.get("method"):
        how.append(str(details["method"]).upper())
    symmetric = details.get("symmetric", details.get("sym"))
    if isinstance(symmetric, bool):
        how.append("symmetric" if symmetric else "asymmetric")
    short = f"INT{bits}" + (f", group size {group_size}" if group_size and group_size > 0 else "")
    how_text = f" ({', '.join(how)})" if how else ""
    return short, f"Weights are stored as {bits}-bit integers{how_text} with {groups}."


def _resolve_base_model(info: CardInfo, hint: str | None, source: Path) -> str:
    hint_is_id = bool(hint) and not Path(hint).exists() and _is_repo_id(hint)
    if info.base_model is None:
        if not hint_is_id:
            raise ValueError(
                f"Cannot tell the base model of {str(source)!r} (recorded: {hint!r}). Pass "
                "CardInfo(base_model='namespace/name') with its Hub id."
            )
        return hint
    if hint_is_id and hint != info.base_model:
        logger.warning("CardInfo.base_model=%r differs from %r recorded in %s.", info.base_model, hint, source)
    return info.base_model


def _pareto_kwargs(info: CardInfo, csv_path: Path | None) -> dict[str, Any]:
    """Template variables of the search-results table, from `CardInfo.search_results` or a Pareto CSV."""
    if info.search_results:
        columns = list(dict.fromkeys(k for row in info.search_results for k in row))
        rows = [[_cell(row.get(c, "")) for c in columns] for row in info.search_results]
        intro, file_name = "Sub-networks on the Pareto front found by the search:", None
    elif csv_path is not None:
        if not csv_path.is_file():
            raise FileNotFoundError(f"Pareto CSV {str(csv_path)!r} does not exist.")
        columns, rows, note = _read_pareto_csv(csv_path)
        file_name = csv_path.name
        intro = f"Sub-networks on the Pareto front found by the search ({note}from `{file_name}`):"
    else:
        columns, rows, intro, file_name = [], [], "", None
    return {
        "pareto_intro": intro,
        "pareto_columns": columns,
        "pareto_rows": rows[:_MAX_PARETO_ROWS],
        "pareto_total": len(rows),
        "pareto_truncated": len(rows) > _MAX_PARETO_ROWS,
        "pareto_file": file_name,
    }


def build_model_card(
    source_dir: str | os.PathLike,
    card_info: CardInfo,
    *,
    pareto_csv: str | os.PathLike | None = None,
    pareto_plot: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card of the sub-network artefact in `source_dir`, without writing anything.

    `pareto_csv` and `pareto_plot` default to `search.csv` / `search.png` (as `SearchResult.save` writes them),
    `pareto*.csv` / `pareto*.png` or LoNAS' `search_progression.*` in the folder. The plot is referenced by file
    name, so it must be uploaded next to the card (as `prepare_upload_folder` does). The card is checked with
    `check_model_card` before it is returned.
    """
    source = Path(source_dir)
    kind = detect_artifact_kind(source)
    facts = _collect_facts(source, kind)
    info, method = card_info, _METHODS[card_info.method]
    base_model = _resolve_base_model(info, facts.base_model_hint, source)

    def pick(name: str) -> Any:
        value = getattr(info, name)
        return value if value is not None else getattr(facts, name)

    sparsity, bits, group_size = pick("sparsity"), pick("bits"), pick("group_size")
    sparsity_source = "as reported by the publisher" if info.sparsity is not None else facts.sparsity_source
    if info.sparsity is None and facts.sparsity_pattern:
        sparsity_source = f"{facts.sparsity_pattern} pattern, {sparsity_source}"
    hf_elastic_int4 = kind == "merged" and facts.quantization.get("format") == QUANT_FORMAT_NAME
    subnet_config = pick("subnet_config")
    size_rows = _size_rows(pick("subnet_size"), pick("max_size"))
    params_row = next((row for row in size_rows if row["name"] == _SIZE_LABELS["params"]), None)
    model_name = info.model_name or (
        info.repo_id.split("/")[-1] if info.repo_id else f"{base_model.split('/')[-1]}-{info.method}-subnet"
    )
    plot_path = Path(pareto_plot) if pareto_plot is not None else facts.pareto_plot
    if plot_path is not None and not plot_path.is_file():
        raise FileNotFoundError(f"Pareto plot {str(plot_path)!r} does not exist.")

    quantized = bits is not None and bits < 16
    tags = ["hf-elastic", "nas", *method.tags, *{"adapter": ["lora"], "openvino": ["openvino"]}.get(kind, [])]
    tags += (["sparse"] if sparsity else []) + ([f"int{bits}"] if quantized else []) + info.tags
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if kind == "adapter" else ("quantized" if quantized else "finetune"),
        # the Hub lists no OpenVINO library, and transformers cannot read hf_elastic's quantized format
        library_name=None if hf_elastic_int4 else {"adapter": "peft", "merged": "transformers"}.get(kind),
        license=info.license,
        language=info.language,
        datasets=info.datasets or None,
        pipeline_tag=info.pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        model_name=model_name if info.eval_results else None,
        eval_results=list(info.eval_results) or None,
    )

    summary = info.summary or (
        f"A {method.title} sub-network of [{base_model}](https://huggingface.co/{base_model}), published as "
        f"{'an' if _KIND_TITLES[kind][0] in 'AEIOU' else 'a'} {_KIND_TITLES[kind]} with hf-elastic."
    )
    if not info.summary and params_row:
        summary += f" It has {params_row['sub']} parameters"
        summary += f" ({params_row['ratio']} of the maximal sub-network)." if params_row["ratio"] else "."
    bits_text, bits_detail = _bits_texts(bits, group_size, facts.quantization)
    auto_class = _AUTO_CLASSES.get(info.pipeline_tag, "AutoModel")
    kwargs = {
        "model_name": model_name,
        "repo_id": info.repo_id or "REPO_ID",
        "summary": summary,
        "kind": kind,
        "kind_title": _KIND_TITLES[kind],
        "base_model": base_model,
        "method_title": method.title,
        "method_description": method.description,
        "search_space_rows": [{"name": _cell(k), "value": _cell(v)} for k, v in (info.search_space or {}).items()],
        "sparsity_text": f"{sparsity:.1%}" if sparsity is not None else "not reported",
        "sparsity_detail": (
            f"{sparsity:.2%} of the weights in the linear layers are zero ({sparsity_source})."
            if sparsity is not None
            else "No sparsity was recorded for this sub-network."
        ),
        "bits_text": bits_text,
        "bits_detail": bits_detail,
        "config_rows": _config_rows(subnet_config) if subnet_config else [],
        "num_dimensions": len(subnet_config or {}),
        "config_json": json.dumps(subnet_config, indent=2, sort_keys=True) if subnet_config else "",
        "size_rows": size_rows,
        "params_row": params_row,
        **_pareto_kwargs(info, Path(pareto_csv) if pareto_csv is not None else facts.pareto_csv),
        "pareto_plot": plot_path.name if plot_path is not None else None,
        "datasets": info.datasets,
        "training_data": info.training_data,
        "hyperparameter_rows": [
            {"name": _cell(k), "value": _cell(v)} for k, v in (info.hyperparameters or {}).items()
        ],
        "eval_rows": [
            {
                "task": _cell(r.task_name or r.task_type),
                "dataset": _cell(r.dataset_name),
                "split": _cell(r.dataset_split or ""),
                "metric": _cell(r.metric_name or r.metric_type),
                "value": _cell(r.metric_value),
            }
            for r in info.eval_results
        ],
        "custom_load": info.how_to_load,
        "auto_class": auto_class,
        "ov_class": "OV" + auto_class.removeprefix("Auto")
        if auto_class != "AutoModel"
        else "OVModelForFeatureExtraction",
        "hf_elastic_int4": hf_elastic_int4,
        "quantization_file": QUANT_CONFIG_NAME,
        "papers": [_PAPERS[p] for p in method.papers],
        "related": [p for key, p in _PAPERS.items() if key not in method.papers],
    }
    card = ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **kwargs)
    check_model_card(card)
    return card


def _is_repo_id(value: str) -> bool:
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_model_card(card: ModelCard | str) -> dict[str, Any]:
    """Validate a model card offline and return its metadata as a dict.

    `ModelCard.validate()` posts the card to the Hub, and `upload_folder` does the same before uploading. This runs
    the checks that need no network: a metadata block the Hub's regex finds, YAML that parses into a dict and
    round-trips, a `model-index` that `huggingface_hub` parses back into `EvalResult`s, Hub ids for `base_model`
    and `datasets`, a known `base_model_relation` and a list of string tags.
    """
    text = str(card)
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        raise ValueError("The model card has no '---' YAML metadata block at the top.")
    raw = yaml.safe_load(match.group(2))
    if not isinstance(raw, dict):
        raise ValueError(f"The model card metadata must be a mapping, got {type(raw).__name__}.")
    parsed = ModelCard(text)  # raises ValueError on a model-index it cannot parse
    data = parsed.data.to_dict()
    if yaml.safe_load(parsed.data.to_yaml()) != data:
        raise ValueError("The model card metadata does not survive a YAML round trip.")
    if "model-index" in raw and not parsed.data.eval_results:
        raise ValueError("The model card's model-index holds no evaluation result.")
    for key in ("base_model", "datasets"):
        values = data.get(key)
        for value in [values] if isinstance(values, str) else values or []:
            if not isinstance(value, str) or not _is_repo_id(value):
                raise ValueError(f"Model card metadata {key}={value!r} is not a Hub id.")
    relation = data.get("base_model_relation")
    if relation is not None and relation not in _BASE_MODEL_RELATIONS:
        raise ValueError(f"base_model_relation={relation!r} is not one of {_BASE_MODEL_RELATIONS}.")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"Model card tags must be a list of strings, got {tags!r}.")
    for result in parsed.data.eval_results or []:
        value = result.metric_value
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Evaluation result {result.metric_type} on {result.dataset_name} is {value}.")
    return data


# ---------------------------------------------------------------------------------------------------- folder


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            dst.symlink_to(src.resolve())
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _normalize_extra_files(
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None,
) -> dict[str, Path]:
    if extra_files is None:
        return {}
    if isinstance(extra_files, (str, os.PathLike)):
        extra_files = [extra_files]
    pairs = extra_files.items() if isinstance(extra_files, Mapping) else ((Path(p).name, p) for p in extra_files)
    out = {}
    for name, path in pairs:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"extra_files name {name!r} must be a relative path inside the repository.")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"extra file {str(path)!r} does not exist.")
        out[rel.as_posix()] = path
    return out


def _fill_folder(
    source: Path,
    dest: Path,
    card: ModelCard,
    extras: Mapping[str, Path],
    link: bool,
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or rel.as_posix() == CARD_NAME:
            continue
        if path.is_file():
            _place(path, dest / rel, link)
            written.append(rel.as_posix())
    for name, path in extras.items():
        if name in written and path.resolve() == (source / name).resolve():
            continue  # already part of the artefact
        if name == CARD_NAME or name in written:
            raise ValueError(f"extra file {name!r} would overwrite a file of the artefact or the model card.")
        _place(path, dest / name, link)
        written.append(name)
    (dest / CARD_NAME).write_text(str(card), encoding="utf-8")


def _check_no_overlap(source: Path, out: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise ValueError(f"Output folder {str(out)!r} must not overlap the artefact folder {str(source)!r}.")


def _card_and_extras(
    source: Path,
    card_info: CardInfo,
    pareto_csv: str | os.PathLike | None,
    pareto_plot: str | os.PathLike | None,
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None,
) -> tuple[ModelCard, dict[str, Path]]:
    card = build_model_card(source, card_info, pareto_csv=pareto_csv, pareto_plot=pareto_plot)
    extras = _normalize_extra_files(extra_files)
    for given in (pareto_csv, pareto_plot):
        if given is not None and Path(given).resolve() != (source / Path(given).name).resolve():
            extras.setdefault(Path(given).name, Path(given))
    return card, extras


def prepare_upload_folder(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    card_info: CardInfo,
    *,
    pareto_csv: str | os.PathLike | None = None,
    pareto_plot: str | os.PathLike | None = None,
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the exact folder `push_to_hub` uploads: the artefact, its model card (`README.md`) and extra files.

    The artefact kind (LoRA adapter, merged checkpoint or OpenVINO IR) is detected from the files of `source_dir`;
    hidden files and an existing `README.md` are left out. `pareto_csv` and `pareto_plot` are copied next to the card
    and shown in it. `extra_files` is a list of paths (placed at the root) or a `{path_in_repo: local_path}` dict.
    The folder is built beside `out_dir` and renamed into place, so `out_dir` is either complete or untouched.
    """
    source, out = Path(source_dir), Path(out_dir)
    _check_no_overlap(source, out)
    check_output_dir(out, overwrite)
    card, extras = _card_and_extras(source, card_info, pareto_csv, pareto_plot, extra_files)
    with atomic_directory(out, overwrite) as tmp:
        _fill_folder(source, tmp, card, extras, link=False)
    return out


def push_to_hub(
    source_dir: str | os.PathLike,
    repo_id: str,
    *,
    card_info: CardInfo,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    create_pr: bool = False,
    local_dir: str | os.PathLike | None = None,
    pareto_csv: str | os.PathLike | None = None,
    pareto_plot: str | os.PathLike | None = None,
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
) -> str | Path:
    """Publish a sub-network artefact with its model card to the Hub repository `repo_id`.

    Creates the repository if needed (`private` applies to a new one), creates the branch `revision` if given, and
    uploads the folder `prepare_upload_folder` builds in one commit (or a pull request with `create_pr=True`).
    Returns the commit (or pull request) URL. With `dry_run=True` nothing is sent: the folder is written to
    `local_dir` (a new temporary folder by default) and its path returned. `token` defaults to the saved login; it is
    only handed to `huggingface_hub` and never logged.

    Example:

    ```py
    >>> supernet.extract_adapter(best, "sub")
    >>> info = CardInfo(base_model="meta-llama/Llama-3.2-1B", method="nls", max_size=supernet.count("max"))
    >>> push_to_hub("sub", "me/llama-nls-sub", card_info=info, dry_run=True)   # inspect, then push for real
    ```
    """
    _check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"create_pr=True opens a pull request against main; do not also set revision={revision!r}.")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string or None (use the saved login).")
    card_info = dataclasses.replace(card_info, repo_id=repo_id)
    source = Path(source_dir)
    kind = detect_artifact_kind(source)
    folder_args = {"pareto_csv": pareto_csv, "pareto_plot": pareto_plot, "extra_files": extra_files}

    if dry_run:
        out = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="hf_elastic_push_"))
        if local_dir is None:
            out = out / repo_id.split("/")[-1]
        folder = prepare_upload_folder(source, out, card_info, **folder_args)
        logger.info("Dry run: the folder for %s is %s; nothing was uploaded.", repo_id, folder)
        return folder

    with tempfile.TemporaryDirectory(prefix="hf_elastic_push_") as tmp:
        if local_dir is not None:
            folder = prepare_upload_folder(source, local_dir, card_info, **folder_args)
        else:
            # Stage with symlinks: the upload reads through them, so large weights are never copied.
            folder = Path(tmp) / "upload"
            _check_no_overlap(source, folder)
            card, extras = _card_and_extras(source, card_info, pareto_csv, pareto_plot, extra_files)
            _fill_folder(source, folder, card, extras, link=True)
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        logger.info("Uploading the %s sub-network in %s to %s.", kind, source, repo_url)
        if revision is not None and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {card_info.method} sub-network ({kind}) with hf-elastic",
            create_pr=create_pr,
        )
    url = commit.pr_url or commit.commit_url
    logger.info("Uploaded to %s.", url)
    return url
