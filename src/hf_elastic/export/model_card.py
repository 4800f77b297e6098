"""Generate the model card of an exported sub-network from the files of its folder, and check it offline."""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from ..compression.quantization.format import FORMAT_NAME as QUANT_FORMAT_NAME
from ..compression.quantization.format import QUANT_CONFIG_NAME
from ..compression.sparsity import SPARSITY_REPORT_NAME
from ..models.loading import LOADER, hf_elastic_only_reason
from ..tuners.methods import METHODS, PAPERS
from ..tuners.methods import infer_method as method_of_config
from ..tuners.nls.config import is_stock_load_guard
from ..utils import ELASTIC_CONFIG_NAME, SUBNET_CONFIG_NAME
from .artifact import _KIND_TITLES, detect_artifact_kind, gguf_facts, gguf_file, openvino_int4_facts
from .card_info import ArtifactKind, CardInfo, _check_bits, _int_dict, _is_repo_id
from .compressed_tensors import describe_quantization
from .subnetwork import WIDTHS_ATTR

logger = logging.getLogger(__name__)


def _template_path(name: str) -> Path:
    """A card template: the copy a wheel carries in the package (setup.py puts it there), else the repository's
    top-level `model_cards/templates/` (source checkouts and editable installs)."""
    packaged = Path(__file__).parent / "model_cards" / name
    return packaged if packaged.is_file() else Path(__file__).resolve().parents[3] / "model_cards" / "templates" / name


TEMPLATE_PATH = _template_path("hf_elastic_card.md")
OV_CONFIG_NAME = "openvino_config.json"
CARD_NAME = "README.md"

SIZE_KEYS = ("params", "base_params", "adapter_params", "nonzero_params", "bytes", "macs")
_SIZE_LABELS = {
    "params": "parameters",
    "base_params": "base parameters",
    "adapter_params": "adapter parameters",
    "nonzero_params": "non-zero parameters",
    "bytes": "bytes at the stored precision",
}
_PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp")
_SEARCH_STEMS = ("search", "search_progression")  # hf_elastic.search writes search.csv/.png; LoNAS search_progression
_MAX_PARETO_ROWS = 30
# Hub `base_model_relation` values (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_AUTO_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "feature-extraction": "AutoModel",
}


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
    sparse_adapter: bool = False
    quantization_aware: bool = False
    target_modules: list[str] | str | None = None
    stock_guarded: bool = False  # adapter_config.json's target_modules make stock peft refuse the adapter
    hf_elastic_only: str | None = None  # why stock transformers cannot load the merged folder
    gguf: dict[str, Any] = field(default_factory=dict)  # file name and header facts of a GGUF artefact


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
        adapter_config = _read_json(source / "adapter_config.json")
        facts.base_model_hint = adapter_config.get("base_model_name_or_path")
        facts.stock_guarded = is_stock_load_guard(adapter_config.get("target_modules"))
    elif (source / "config.json").is_file():
        facts.base_model_hint = _read_json(source / "config.json").get("_name_or_path")
    if kind == "gguf":
        facts.gguf = {"file": gguf_file(source), **gguf_facts(source / gguf_file(source))}
        facts.bits, facts.group_size = facts.gguf.get("bits"), facts.gguf.get("group_size")
        facts.quantization = {"format": f"gguf/{facts.gguf['block']}"} if "block" in facts.gguf else {}

    if (source / SUBNET_CONFIG_NAME).is_file():
        data = _read_json(source / SUBNET_CONFIG_NAME)
        if isinstance(data.get("config"), Mapping):
            facts.subnet_config = _int_dict(SUBNET_CONFIG_NAME + " config", data["config"])
        size = {k: data[k] for k in SIZE_KEYS if k in data}
        facts.subnet_size = _int_dict(SUBNET_CONFIG_NAME, size) if size else None
        if isinstance(data.get("max"), Mapping):
            facts.max_size = _int_dict(SUBNET_CONFIG_NAME + " max", data["max"])
        facts.sparse_adapter = data.get("sparse_adapter") is True
        facts.quantization_aware = data.get("quantization_aware") is True
        facts.target_modules = data.get("target_modules")
    if kind == "merged":
        facts.hf_elastic_only = hf_elastic_only_reason(source)
        if facts.hf_elastic_only is None and _read_json(source / "config.json").get(WIDTHS_ATTR):
            facts.hf_elastic_only = "per-layer widths"  # written before hf_elastic marked such folders

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
        data = describe_quantization(data) or data
        if isinstance(data, Mapping) and data.get("bits") is not None:
            facts.bits, facts.group_size = data.get("bits"), data.get("group_size")
            facts.quantization = {k: data[k] for k in ("format", "method", "symmetric", "sym") if k in data}
            break
    if kind == "openvino" and facts.bits is None:
        ov_int4 = openvino_int4_facts(source / "openvino_model.xml")
        facts.bits, facts.group_size = ov_int4.get("bits"), ov_int4.get("group_size")
        facts.quantization = {"symmetric": ov_int4["symmetric"]} if ov_int4 else {}
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


def infer_method(source_dir: str | os.PathLike) -> str:
    """The method that produced an artefact folder, from its `elastic_subnet.json` (or a super-adapter's
    `elastic_config.json`), as `hf_elastic.tuners.methods.infer_method` reads the saved config: `ElasticLoraConfig`
    gives "lonas"; `NLSConfig` gives "nls", "sqft-sparsepeft" with `sparse_adapter` or "sqft-qa-sparsepeft" with
    `quantization_aware`."""
    source = Path(source_dir)
    fix = f"Pass CardInfo(method=...) (CLI: --method), one of {list(METHODS)}."
    for name in (SUBNET_CONFIG_NAME, ELASTIC_CONFIG_NAME):
        if not (source / name).is_file():
            continue
        data = _read_json(source / name)
        try:
            method = method_of_config(data.get("method"), data.get("sparse_adapter"), data.get("quantization_aware"))
        except ValueError as error:
            raise ValueError(
                f"{str(source / name)!r}: {error} So the card's method cannot be inferred. {fix}"
            ) from None
        return method.name
    raise ValueError(
        f"Cannot infer the method of {str(source)!r}: it has no {SUBNET_CONFIG_NAME} or {ELASTIC_CONFIG_NAME} "
        f"(hf_elastic writes one with every export). {fix}"
    )


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
    method_key = card_info.method or infer_method(source)
    info, method = card_info, METHODS[method_key]
    base_model = _resolve_base_model(info, facts.base_model_hint, source)

    def pick(name: str) -> Any:
        value = getattr(info, name)
        return value if value is not None else getattr(facts, name)

    sparsity, bits, group_size = pick("sparsity"), pick("bits"), pick("group_size")
    sparsity_source = "as reported by the publisher" if info.sparsity is not None else facts.sparsity_source
    if info.sparsity is None and facts.sparsity_pattern:
        sparsity_source = f"{facts.sparsity_pattern} pattern, {sparsity_source}"
    hf_elastic_int4 = kind == "merged" and facts.quantization.get("format") == QUANT_FORMAT_NAME
    compressed_tensors = kind == "merged" and str(facts.quantization.get("format")).startswith("compressed-tensors/")
    guarded_adapter = kind == "adapter" and facts.stock_guarded
    stock_refuses = hf_elastic_int4 or facts.hf_elastic_only is not None or guarded_adapter
    subnet_config = pick("subnet_config")
    size_rows = _size_rows(pick("subnet_size"), pick("max_size"))
    params_row = next((row for row in size_rows if row["name"] == _SIZE_LABELS["params"]), None)
    model_name = info.model_name or (
        info.repo_id.split("/")[-1] if info.repo_id else f"{base_model.split('/')[-1]}-{method_key}-subnet"
    )
    plot_path = Path(pareto_plot) if pareto_plot is not None else facts.pareto_plot
    if plot_path is not None and not plot_path.is_file():
        raise FileNotFoundError(f"Pareto plot {str(plot_path)!r} does not exist.")

    quantized = bits is not None and bits < 16
    kind_tags = {"adapter": ["lora"], "openvino": ["openvino"], "gguf": ["gguf", "llama.cpp"]}.get(kind, [])
    tags = ["hf-elastic", "nas", *method.tags, *kind_tags]
    tags += (["sparse"] if sparsity else []) + ([f"int{bits}"] if quantized else []) + info.tags
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if kind == "adapter" else ("quantized" if quantized else "finetune"),
        # the Hub lists no OpenVINO library; stock transformers / peft refuse hf_elastic-only folders
        library_name=None if stock_refuses else {"adapter": "peft", "merged": "transformers"}.get(kind),
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
    if kind == "gguf" and info.bits is None and "block_text" in facts.gguf:
        bits_text = f"INT{bits}, ggml {facts.gguf['block']}"
        bits_detail = f"Weights are stored as {bits}-bit integers in {facts.gguf['block_text']}."
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
        "compressed_tensors": compressed_tensors,
        "hf_elastic_only": None if hf_elastic_int4 else facts.hf_elastic_only,
        "loader": LOADER,
        "sparse_adapter": kind == "adapter" and facts.sparse_adapter and not facts.quantization_aware,
        "qa_adapter": kind == "adapter" and facts.quantization_aware,
        "target_modules": json.dumps(facts.target_modules) if facts.target_modules is not None else None,
        "stock_guarded": facts.stock_guarded,
        "quantization_file": QUANT_CONFIG_NAME,
        "gguf_file": facts.gguf.get("file"),
        "gguf_arch": facts.gguf.get("arch"),
        "gguf_block": facts.gguf.get("block"),
        "papers": [PAPERS[p] for p in method.papers],
        "related": [p for key, p in PAPERS.items() if key not in method.papers],
    }
    card = ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **kwargs)
    check_model_card(card)
    return card


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
