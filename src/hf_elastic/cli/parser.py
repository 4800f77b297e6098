"""The argument parser of `hf-elastic`: one subparser per pipeline step."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..demo.config import METHODS, REORDERS, SAMPLINGS
from ..export.openvino import WEIGHT_FORMATS
from . import commands

_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup", "polynomial")


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


def _data_args(p: argparse.ArgumentParser, option: str, required: bool) -> None:
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
    p.add_argument("--seq-len", type=_positive(int), default=256, help="tokens per row (longer rows are cut)")


def _calibrated_transform_args(p: argparse.ArgumentParser) -> None:
    """What sparsify and quantize share: calibration rows, the output policy, the model and data options."""
    p.add_argument("--num-samples", type=_positive(int), default=128, help="calibration rows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _model_args(p)
    _data_args(p, "calibration", False)


def _positive(kind: type) -> object:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {kind.__name__}") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value} must be > 0")
        return number

    parse.__name__ = f"positive {kind.__name__}"
    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other user error: one `error:` line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message} (see `{self.prog} --help`)\n")


def _module_group(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a comma-separated list of module names, e.g. q_proj,k_proj"
        )
    return names


def _group_size(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number == 0 or number < -1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive group size or -1 (one group per output row)")
    return number


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


_GROUP_SIZE_HELP = "input channels per scale (-1: one per output row); default: the largest of 128/64/32 that divides"


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as description

    parser = _Parser(prog="hf-elastic", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    positive_int, positive_float = _positive(int), _positive(float)

    p = sub.add_parser("sparsify", help="prune a model with Wanda or magnitude (unstructured or N:M)")
    p.add_argument("model", help="model folder or Hub id")
    p.add_argument("output", help="where to write the sparse model and sparsity_report.json")
    p.add_argument(
        "--method",
        choices=("wanda", "magnitude"),
        default="wanda",
        help="wanda: |W| * ||x|| on calibration rows (default); magnitude: |W|, no data",
    )
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros per row (unstructured)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured', '2:4' or '4:8'")
    _calibrated_transform_args(p)
    p.set_defaults(func=commands.cmd_sparsify)

    p = sub.add_parser("quantize", help="INT4/INT8 group-wise quantization (RTN or GPTQ), in hf_elastic's format")
    p.add_argument("model", help="model folder or Hub id (may be sparse: zeros stay zero)")
    p.add_argument("output", help="where to write the quantized model (hf_elastic's INT4/INT8 format)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=_group_size, default=None, help=f"{_GROUP_SIZE_HELP} every input size")
    p.add_argument("--symmetric", action="store_true", help="no zero points (default: asymmetric)")
    p.add_argument(
        "--method",
        choices=("rtn", "gptq"),
        default="rtn",
        help="rtn: round to nearest (default, no data); gptq: error-compensating, on calibration rows",
    )
    p.add_argument("--keep-residual", action="store_true", help="keep the rounding residuals (QA-SparsePEFT training)")
    _calibrated_transform_args(p)
    p.set_defaults(func=commands.cmd_quantize)

    p = sub.add_parser("train", help="train an NLS / LoNAS super-network with NASTrainer (causal LM)")
    p.add_argument("model", help="base model folder or Hub id (dense, sparse or hf_elastic INT4)")
    p.add_argument("output", help="where to write checkpoints and the super-adapter")
    p.add_argument("--method", choices=("nls", "elastic_lora"), default="nls", help="elastic_lora = LoNAS widths")
    p.add_argument(
        "--rank-choices", type=positive_int, nargs="+", default=[16, 12, 8], help="LoRA ranks to sample, largest first"
    )
    p.add_argument(
        "--target-modules", nargs="+", default=_TARGETS, help=f"module names that get adapters ({' '.join(_TARGETS)})"
    )
    p.add_argument(
        "--rank-groups",
        type=_module_group,
        nargs="+",
        default=None,
        help="modules sharing one rank per layer, comma-separated per group: q_proj,k_proj,v_proj up_proj down_proj "
        "(default: every module its own rank)",
    )
    p.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA scaling numerator (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    p.add_argument(
        "--ffn-width-choices", type=positive_float, nargs="+", default=None, help="LoNAS, e.g. 1.0 0.75 0.5"
    )
    p.add_argument("--head-choices", type=positive_float, nargs="+", default=None, help="LoNAS, e.g. 1.0 0.75")
    p.add_argument(
        "--reorder",
        choices=("magnitude", "activation", "gradient"),
        default=None,
        help="LoNAS channel importance: weight magnitude, |W| * ||x|| on training batches, or |W * dL/dW|",
    )
    p.add_argument("--sparse-adapter", action="store_true", help="SparsePEFT: keep the base's zeros when merging")
    p.add_argument("--quantization-aware", action="store_true", help="QA-SparsePEFT on an hf_elastic INT4 base")
    p.add_argument("--sampling", default="uniform", help="uniform, sandwich, max or a registered sampler")
    p.add_argument("--sandwich-k", type=int, default=2, help="random sub-networks per step with --sampling sandwich")
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (default 200)")
    p.add_argument("--num-train-epochs", type=positive_float, default=None, help="epochs, instead of --max-steps")
    p.add_argument("--learning-rate", type=positive_float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--lr-scheduler", choices=_SCHEDULERS, default="linear", help="learning-rate schedule")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the steps spent warming up")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per device and step (default 8)")
    p.add_argument(
        "--gradient-accumulation-steps",
        type=positive_int,
        default=1,
        help="batches per optimizer step (one sub-network for all of them)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    p.add_argument("--fp16", action="store_true", help="fp16 mixed precision (GPU)")
    p.add_argument("--logging-steps", type=positive_int, default=10, help="log the loss every N steps")
    p.add_argument("--save-steps", type=positive_int, default=50, help="write a resumable checkpoint every N steps")
    p.add_argument("--num-samples", type=positive_int, default=None, help="use the first N training rows")
    p.add_argument("--eval-data", default=None, help="evaluation rows (same forms as --data)")
    p.add_argument("--eval-split", default=None, help="evaluation split (of --eval-data, else of --data)")
    p.add_argument("--eval-samples", type=positive_int, default=None, help="use the first N evaluation rows")
    p.add_argument("--eval-steps", type=positive_int, default=None, help="evaluate every N steps during training")
    p.add_argument(
        "--eval-subnets",
        nargs="+",
        choices=("median", "max", "min"),
        default=["median", "max", "min"],
        help="sub-networks scored at each evaluation (eval_loss is the first)",
    )
    p.add_argument(
        "--completion-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learn the completion only (prompt tokens get label -100)",
    )
    p.add_argument("--packing", action="store_true", help="concatenate rows into full --seq-len blocks")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'last' (newest complete one)")
    p.add_argument("--on-nonfinite", choices=("skip", "stop"), default="skip", help="a NaN/inf step: skip it or stop")
    p.add_argument("--seed", type=int, default=42, help="seed of the model set-up, data order and sampling")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when an accelerator is present")
    _model_args(p, device=False)
    _data_args(p, "data", True)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("search", help="search sub-networks of a super-adapter (a task metric or loss vs a cost)")
    p.add_argument("adapter", help="super-adapter folder (from train)")
    p.add_argument("--base", required=True, help="the base model (folder or Hub id) it was trained on")
    p.add_argument("--output", required=True, help="folder for search.json/.csv/.png")
    p.add_argument("--strategy", default="nsga2", help="nsga2, random, median, max, min, loss_based")
    p.add_argument(
        "--metric",
        choices=("loss", "perplexity", "accuracy", "exact-match", "lm-eval"),
        default="loss",
        help="quality objective: loss/perplexity on --data, accuracy of --label-words, exact match of the answer "
        "found by --answer-regex in greedy generations, or lm-eval --tasks",
    )
    p.add_argument("--label-words", nargs="+", default=None, help="one word per class, for --metric accuracy")
    p.add_argument("--answer-regex", default=r"####\s*(-?[\d,]*\.?\d+)", help="final-answer pattern (GSM8K)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation length for exact-match")
    p.add_argument("--tasks", nargs="+", default=None, help="lm-eval task names, for --metric lm-eval")
    p.add_argument("--include-path", default=None, help="folder of your own lm-eval task YAML files")
    p.add_argument("--lm-eval-metric", default="acc,none", help="lm-eval result key, e.g. acc_norm,none")
    p.add_argument(
        "--cost",
        choices=("params", "nonzero_params", "bytes", "macs", "latency"),
        default="params",
        help="second objective: parameters, non-zero parameters, bytes at the stored precision, MACs per token, or "
        "latency predicted from a per-layer table measured on this machine",
    )
    p.add_argument(
        "--budget",
        type=positive_int,
        default=40,
        help="sub-networks evaluated in all, the max/min/median references included (40: 3 references + 37 searched)",
    )
    p.add_argument("--population", type=positive_int, default=10, help="NSGA-II population size")
    p.add_argument("--batch-size", type=positive_int, default=8, help="evaluation rows per forward pass")
    p.add_argument("--num-samples", type=positive_int, default=64, help="evaluation rows (lm-eval: per task)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search")
    _model_args(p, "base model")
    _data_args(p, "data", False)
    p.set_defaults(func=commands.cmd_search)

    p = sub.add_parser("export", help="merge and slice a sub-network; optionally to OpenVINO IR")
    _subnet_args(p)
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
        type=_group_size,
        default=None,
        help=f"--weight-format int4: {_GROUP_SIZE_HELP} every input size",
    )
    p.add_argument(
        "--fp32-embeddings",
        action="store_true",
        help="--openvino of an INT4/INT8 (QA) sub-network: keep the embedding and LM head fp32 instead of int8",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    _model_args(p, "base model")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("extract", help="write a sub-network's plain LoRA adapter (elastic ranks only; no merge)")
    _subnet_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _model_args(p, "base model")
    p.set_defaults(func=commands.cmd_extract)

    p = sub.add_parser("push", help="publish an adapter, merged model or OpenVINO folder with a model card")
    p.add_argument("folder", help="adapter, merged-model or OpenVINO folder written by hf-elastic")
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument(
        "--method",
        default=None,
        help="lonas, nls, shears, sqft, sqft-sparsepeft or sqft-qa-sparsepeft (default: inferred from the folder's "
        "elastic_subnet.json / elastic_config.json)",
    )
    p.add_argument("--base-model", required=True, help="Hub id of the base model, for the card")
    p.add_argument("--license", default=None, help="Hub license id for the card, e.g. apache-2.0 (default: none)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded; no network")
    p.add_argument("--local-dir", default=None, help="where --dry-run writes the folder")
    p.set_defaults(func=commands.cmd_push)

    p = sub.add_parser("demo", help="the whole pipeline offline on SmolLM2-135M and fine-food reviews")
    p.add_argument("--output", default="outputs/demo", help="folder for results, exports and the card (outputs/demo)")
    p.add_argument("--quick", action="store_true", help="fewer steps and evaluations (a smoke run)")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="lonas",
        help="lonas: elastic FFN width and heads searched against latency (default); shears: Wanda + NLS; sqft: Wanda "
        "+ NLS + SparsePEFT; sqft-qa: QA-SparsePEFT on a Wanda + INT4 base",
    )
    p.add_argument("--qa", action="store_true", help="same as --method sqft-qa")
    p.add_argument("--sampling", choices=SAMPLINGS, default="uniform", help="lonas: NASTrainer sampling")
    p.add_argument("--reorder", choices=REORDERS, default="activation", help="lonas: channel order before training")
    p.add_argument("--model-dir", default=None, help="a local causal LM folder to use instead of SmolLM2-135M")
    p.add_argument("--seed", type=int, default=0, help="seed of training, search and sampling")
    p.set_defaults(func=commands.cmd_demo)
    return parser
