"""The argument parser of `hf-elastic`: one subparser per pipeline step; the options of the configs are generated
from their fields (`hf_elastic.cli.options`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from ..export.openvino import WEIGHT_FORMATS
from ..export.subnetwork import EXPORT_FORMATS
from ..nas.importance import IMPORTANCE_METHODS
from ..search.evaluators import COUNT_OBJECTIVES
from ..tuners.methods import ELASTIC_METHODS, METHODS
from . import commands
from .fields import add_options
from .options import COMMAND_CONFIGS, POSITIVE_INT, group_size
from .plan import add_plan_parser


def _model_args(p: argparse.ArgumentParser, what: str = "model", device: bool = True) -> None:
    p.add_argument("--revision", default=None, help=f"branch, tag or commit of the {what} on the Hub")
    if device:
        p.add_argument("--device", default="auto", help="where the model runs: auto (cuda when present), cpu, cuda:1")
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="weights' dtype when loading (auto: the checkpoint's own)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="run the Hub repo's own modelling code")


def _data_args(p: argparse.ArgumentParser, option: str, required: bool, seq_len: bool = True) -> None:
    p.add_argument(
        "--" + option,
        required=required,
        help="a .jsonl/.json/.csv/.parquet/.txt file, a folder, or a Hub data set id (e.g. openai/gsm8k)",
    )
    p.add_argument("--data-config", default=None, help="configuration of a Hub data set (e.g. 'main' for gsm8k)")
    p.add_argument("--data-revision", default=None, help="branch, tag or commit of a Hub data set")
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument(
        "--template",
        default=None,
        help="how a row reads, with {column} fields, e.g. 'Question: {question}\\nAnswer: {answer}'. Default: the "
        "'messages' (chat template), 'prompt'+'completion' or 'text' column",
    )
    p.add_argument(
        "--response-template", default=None, help="text after which the answer starts in --template (e.g. 'Answer:')"
    )
    p.add_argument("--text-column", default="text", help="column of plain-text rows")
    if seq_len:
        p.add_argument("--seq-len", type=POSITIVE_INT, default=256, help="tokens per row (longer rows are cut)")


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other user error: one `error:` line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message} (see `{self.prog} --help`)\n")


def _subnet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="super-adapter folder")
    p.add_argument("--base", required=True, help="the base model (folder or Hub id)")
    p.add_argument("--output", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--config", default="median", help="max/min/median, a JSON object, or search.json[:best|:<i>]")
    p.add_argument(
        "--select",
        default="best",
        help="with a search.json: 'best' (first objective) or 'best_under:<cost>:<fraction>' of the max's cost",
    )


def _config_options(p: argparse.ArgumentParser, command: str) -> None:
    for cls, options in COMMAND_CONFIGS[command]:
        add_options(p.add_argument_group(f"{cls.__name__} options"), cls, options)


def _transform(sub: Any, name: str, help: str, model: str, output: str) -> argparse.ArgumentParser:
    """sparsify and quantize: the model, the output, the config, calibration rows and the output policy."""
    p = sub.add_parser(name, help=help)
    p.add_argument("model", help=model)
    p.add_argument("output", help=output)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _config_options(p, name)
    _model_args(p)
    _data_args(p, "calibration", False, seq_len=False)
    return p


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as description

    parser = _Parser(prog="hf-elastic", description=description)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show library warnings (tracer, NNCF, deprecation) that are hidden by default",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = _transform(
        sub,
        "sparsify",
        "prune a model with Wanda or magnitude (unstructured or N:M)",
        "model folder or Hub id",
        "where to write the sparse model and sparsity_report.json",
    )
    p.set_defaults(func=commands.cmd_sparsify)
    p = _transform(
        sub,
        "quantize",
        "INT4/INT8 group-wise quantization (RTN or GPTQ), in hf_elastic's format",
        "model folder or Hub id (may be sparse: zeros stay zero)",
        "where to write the quantized model (hf_elastic's INT4/INT8 format)",
    )
    p.set_defaults(func=commands.cmd_quantize)

    p = sub.add_parser("train", help="train an NLS / LoNAS super-network with NASTrainer (causal LM)")
    p.add_argument(
        "model", help="base model folder or Hub id (dense, sparse, hf_elastic INT4, GPTQ or compressed-tensors INT4)"
    )
    p.add_argument("output", help="where to write checkpoints and the super-adapter")
    p.add_argument(
        "--method",
        choices=ELASTIC_METHODS,
        default="nls",
        help="the adapter config: nls (NLSConfig, elastic ranks) or elastic_lora (ElasticLoraConfig: LoNAS, ranks "
        "and widths)",
    )
    p.add_argument(
        "--reorder",
        choices=tuple(IMPORTANCE_METHODS),
        default=None,
        help="LoNAS channel importance: weight magnitude, |W| * ||x|| on training batches, or |W * dL/dW|",
    )
    p.add_argument("--num-samples", type=POSITIVE_INT, default=None, help="use the first N training rows")
    p.add_argument("--eval-data", default=None, help="evaluation rows (same forms as --data)")
    p.add_argument("--eval-split", default=None, help="evaluation split (of --eval-data, else of --data)")
    p.add_argument("--eval-samples", type=POSITIVE_INT, default=None, help="use the first N evaluation rows")
    p.add_argument(
        "--completion-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learn the completion only (prompt tokens get label -100)",
    )
    p.add_argument("--packing", action="store_true", help="concatenate rows into full --seq-len blocks")
    _config_options(p, "train")
    _model_args(p, device=False)
    _data_args(p, "data", True)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("search", help="search sub-networks of a super-adapter (a task metric or loss vs a cost)")
    p.add_argument("adapter", help="super-adapter folder (from train)")
    p.add_argument("--base", required=True, help="the base model (folder or Hub id) it was trained on")
    p.add_argument("--output", required=True, help="folder for search.json/.csv/.png")
    p.add_argument(
        "--metric",
        choices=("loss", "perplexity", "accuracy", "exact-match", "lm-eval"),
        default="loss",
        help="quality objective: loss/perplexity on --data, accuracy of --label-words, exact match of the answer "
        "found by --answer-regex in greedy generations, or lm-eval --tasks",
    )
    p.add_argument("--label-words", nargs="+", default=None, help="one word per class, for --metric accuracy")
    p.add_argument("--answer-regex", default=r"####\s*(-?[\d,]*\.?\d+)", help="final-answer pattern (GSM8K)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, help="generation length for exact-match")
    p.add_argument("--tasks", nargs="+", default=None, help="lm-eval task names, for --metric lm-eval")
    p.add_argument("--include-path", default=None, help="folder of your own lm-eval task YAML files")
    p.add_argument("--lm-eval-metric", default="acc,none", help="lm-eval result key, e.g. acc_norm,none")
    p.add_argument(
        "--cost",
        choices=(*COUNT_OBJECTIVES, "latency"),
        default="params",
        help="second objective: parameters (all, base or adapter), MACs per token, non-zero parameters, bytes at the "
        "stored precision, or latency predicted from a per-layer table measured on this machine",
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="evaluation rows per forward pass")
    p.add_argument("--num-samples", type=POSITIVE_INT, default=64, help="evaluation rows (lm-eval: per task)")
    _config_options(p, "search")
    _model_args(p, "base model")
    _data_args(p, "data", False)
    p.set_defaults(func=commands.cmd_search)

    p = sub.add_parser("export", help="merge and slice a sub-network; optionally to OpenVINO IR")
    _subnet_args(p)
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="hf-elastic",
        help="the output folder's format: hf-elastic (a stock checkpoint where transformers can express the "
        "sub-network, else hf-elastic's own), compressed-tensors (the exact INT4/INT8 codes of a QA sub-network, "
        "for transformers and vLLM; pip install 'hf-elastic[compressed-tensors]') or gguf (model.gguf for "
        "llama.cpp: INT4 as Q4_1, INT8 as Q8_0; Llama models; pip install 'hf-elastic[gguf]') or gptq (the exact "
        "codes as a GPTQ checkpoint, e.g. for a GPTQ base)",
    )
    p.add_argument("--openvino", action="store_true", help="also write <output>-openvino (OpenVINO IR)")
    p.add_argument(
        "--weight-format",
        choices=WEIGHT_FORMATS,
        default="fp32",
        help="--openvino weights: fp32, fp16, or NNCF int8/int4 of a float sub-network (a QA sub-network keeps its "
        "exact codes with fp32)",
    )
    p.add_argument(
        "--group-size",
        type=group_size,
        default=None,
        help="--weight-format int4: input channels per scale (-1: one per output row); default: the largest of "
        "128/64/32 that divides every input size",
    )
    p.add_argument(
        "--fp32-embeddings",
        action="store_true",
        help="--openvino of an INT4/INT8 (QA) sub-network: keep the embedding and LM head fp32 instead of int8",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    _config_options(p, "export")
    _model_args(p, "base model")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("extract", help="write a sub-network's plain LoRA adapter (elastic ranks only; no merge)")
    _subnet_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _config_options(p, "extract")
    _model_args(p, "base model")
    p.set_defaults(func=commands.cmd_extract)

    p = sub.add_parser("push", help="publish an adapter, merged model, OpenVINO or GGUF folder with a model card")
    p.add_argument(
        "folder", help="adapter, merged-model (any --format), OpenVINO or GGUF folder written by hf-elastic"
    )
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument(
        "--method",
        choices=tuple(METHODS),
        default=None,
        help="the method for the card (default: inferred from the folder's elastic_subnet.json / elastic_config.json)",
    )
    p.add_argument("--base-model", required=True, help="Hub id of the base model, for the card")
    p.add_argument("--license", default=None, help="Hub license id for the card, e.g. apache-2.0 (default: none)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded; no network")
    p.add_argument("--local-dir", default=None, help="where --dry-run writes the folder")
    p.set_defaults(func=commands.cmd_push)

    p = sub.add_parser("demo", help="the whole pipeline offline on SmolLM2-135M and fine-food reviews")
    p.add_argument("--qa", action="store_true", help="same as --method sqft-qa")
    _config_options(p, "demo")
    p.set_defaults(func=commands.cmd_demo)

    add_plan_parser(sub)
    return parser
