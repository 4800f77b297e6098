"""`CardInfo`: what a model card says about a sub-network beyond its files (the methods and papers are in
`hf_elastic.tuners.methods`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from huggingface_hub import EvalResult
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..tuners.methods import METHODS

ArtifactKind = Literal["adapter", "merged", "openvino", "gguf"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class CardInfo:
    """What the model card of a published sub-network says beyond what its files already record.

    Fields left `None` are read from the artefact folder when it has them: `elastic_subnet.json` (method, sub-network
    config and size; `elastic_config.json` for a super-adapter), `sparsity_report.json` (`total_sparsity`,
    `pattern`), `quantization_config.json` or the `quantization_config` of `config.json` / `openvino_config.json`
    (`bits`, `group_size`), the search results from `search.csv` / `pareto*.csv`, and the base model from
    `adapter_config.json`. Explicit values win over the files.

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

    method: str | None = field(
        default=None,
        metadata=_help(
            f"The NAS method that produced the sub-network: one of {list(METHODS)}. None infers it from the "
            "folder's elastic_subnet.json / elastic_config.json (ElasticLoraConfig: lonas; NLSConfig: nls, with "
            "sparse_adapter: sqft-sparsepeft, with quantization_aware: sqft-qa-sparsepeft); set it to override, e.g. "
            "'shears' for NLS on a Wanda-pruned base."
        ),
    )
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
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"CardInfo.method={self.method!r} is not known; use one of {list(METHODS)}.")
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


def _is_repo_id(value: str) -> bool:
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True
