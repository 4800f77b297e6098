"""Which config fields each subcommand exposes, under which spelling, and which it hides on purpose (one place)."""

from __future__ import annotations

import argparse

from peft import LoraConfig
from transformers import TrainingArguments

from ..compression.quantization.hub_loading import QuantizedBaseConfig
from ..compression.quantization.quantize import QuantizationConfig
from ..compression.sparsity import SparsityConfig
from ..demo.config import DemoConfig
from ..nas.samplers import SAMPLERS
from ..nas.search_space import DIMENSION_KINDS
from ..nas.trainer import NASTrainingArguments
from ..search.heuristics import HEURISTICS
from ..search.searcher import STRATEGIES, SearchConfig
from ..tuners import ElasticLoraConfig
from .fields import Option


def positive(kind: type) -> object:
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


def module_group(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a comma-separated list of module names, e.g. q_proj,k_proj"
        )
    return names


def group_size(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number == 0 or number < -1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive group size or -1 (one group per output row)")
    return number


POSITIVE_INT, POSITIVE_FLOAT = positive(int), positive(float)
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

# The command line's own defaults differ from the fields' only where an option says `default=`.
_CALIBRATION = (
    Option("seq_len", type=POSITIVE_INT, default=256),
    Option("num_samples", type=POSITIVE_INT),
    Option("batch_size", type=POSITIVE_INT),
)
SPARSIFY = (Option("method"), Option("sparsity"), Option("pattern"), Option("modules"), *_CALIBRATION)
QUANTIZE = (
    Option("bits", type=int),
    Option("group_size", type=group_size),
    Option("symmetric"),
    Option("method"),
    Option("damp_percent"),
    Option("act_order"),
    Option("block_size", type=POSITIVE_INT),
    Option("modules"),
    Option("keep_residual"),
    *_CALIBRATION,
)
BASE = (Option("float_model"), Option("float_model_tolerance", type=POSITIVE_FLOAT))
WIDTH_OPTIONS = ("ffn_width_choices", "head_choices")
TRAIN_ADAPTER = (
    Option("rank_choices", type=POSITIVE_INT, default=[16, 12, 8]),
    Option("target_modules", default=TARGETS),
    Option("rank_groups", type=module_group, note="On the command line: comma-separated per group."),
    Option("nls_target_modules"),
    Option("lora_alpha", type=POSITIVE_INT, default=32),
    Option("lora_dropout"),
    Option("sparse_adapter"),
    Option("quantization_aware"),
    *(Option(name, type=POSITIVE_FLOAT, unset=True, note="With --method elastic_lora.") for name in WIDTH_OPTIONS),
)
TRAIN_ARGUMENTS = (
    Option("sampling", choices=tuple(SAMPLERS)),
    Option("sandwich_k"),
    Option("progressive_stages"),
    Option("distillation", choices=("none", "inplace"), note="'teacher' needs teacher_model= in Python."),
    Option("distillation_alpha"),
    Option("distillation_temperature", type=POSITIVE_FLOAT),
    Option("eval_subnets", default=["median", "max", "min"]),
    Option("on_nonfinite"),
    Option("max_steps", type=POSITIVE_INT, default=None, note="Without it or --num-train-epochs: 200 steps."),
    Option("num_train_epochs", type=POSITIVE_FLOAT, default=None),
    Option("learning_rate", type=POSITIVE_FLOAT, default=3e-4),
    Option("lr_scheduler_type", flags=("--lr-scheduler",)),
    Option("warmup_steps", flags=("--warmup-steps", "--warmup-ratio")),
    Option("weight_decay"),
    Option("max_grad_norm"),
    Option("per_device_train_batch_size", flags=("--batch-size",), type=POSITIVE_INT),
    Option("per_device_eval_batch_size", flags=("--eval-batch-size",), type=POSITIVE_INT),
    Option("gradient_accumulation_steps", type=POSITIVE_INT),
    Option("gradient_checkpointing"),
    Option("bf16"),
    Option("fp16"),
    Option("logging_steps", type=POSITIVE_INT, default=10),
    Option("save_steps", type=POSITIVE_INT, default=50),
    Option("save_total_limit", type=POSITIVE_INT),
    Option("eval_steps", type=POSITIVE_INT),
    Option("resume_from_checkpoint", flags=("--resume",), note="'last': the newest complete one in the output."),
    Option("seed"),
    Option("use_cpu", flags=("--cpu",), note="Without an accelerator the CPU is used anyway."),
)
SEARCH = (
    Option("strategy", choices=STRATEGIES),
    Option("budget", type=POSITIVE_INT, default=40),
    Option("population", type=POSITIVE_INT),
    Option("seed"),
    Option("reference_subnets", choices=HEURISTICS),
    Option("fixed_kinds", choices=DIMENSION_KINDS),
    Option("predictor_candidates", type=POSITIVE_INT),
    Option("predictor_alpha", type=POSITIVE_FLOAT),
    Option("crossover_prob"),
    Option("mutation_prob"),
    Option("loss_tolerance"),
    Option("activation_threshold"),
    Option("calibration_batches", type=POSITIVE_INT),
    Option("score_extracted"),
    Option("progress"),
)
DEMO = tuple(
    Option(f.name, flags=("--output",)) if f.name == "output_dir" else Option(f.name)
    for f in DemoConfig.__dataclass_fields__.values()
)

# Every field of these configs is an option above or listed here: the subcommand sets it itself, or it is not a
# command-line matter. Upstream classes hide all their fields but the ones exposed above.
HIDDEN: dict[type, dict[str, str]] = {
    ElasticLoraConfig: {
        "r": "max(--rank-choices)",
        "base_sparsity": "written by hf_elastic when the adapter is saved",
        "base_fingerprint": "written by hf_elastic when the adapter is saved",
        "channel_order": "written by --reorder",
    },
    NASTrainingArguments: {
        "output_dir": "the output argument",
        "report_to": "'none'",
        "save_strategy": "'steps' (--save-steps)",
        "eval_strategy": "'steps' with --eval-steps",
        "warmup_ratio": "deprecated by transformers: --warmup-ratio sets warmup_steps, which takes a fraction too",
    },
    SearchConfig: {"objectives": "--metric, then --cost"},
}
HIDDEN_UPSTREAM: dict[type, str] = {
    LoraConfig: "peft's other LoRA settings (task_type is CAUSAL_LM); use NLSConfig in Python for them",
    TrainingArguments: "Trainer's ~100 other settings; use NASTrainingArguments in Python for them",
}
# The options of each subcommand that generate its configs (the adapter options build NLSConfig too).
COMMAND_CONFIGS: dict[str, tuple[tuple[type, tuple[Option, ...]], ...]] = {
    "sparsify": ((SparsityConfig, SPARSIFY),),
    "quantize": ((QuantizationConfig, QUANTIZE),),
    "train": (
        (ElasticLoraConfig, TRAIN_ADAPTER),
        (NASTrainingArguments, TRAIN_ARGUMENTS),
        (QuantizedBaseConfig, BASE),
    ),
    "search": ((SearchConfig, SEARCH), (QuantizedBaseConfig, BASE)),
    "export": ((QuantizedBaseConfig, BASE),),
    "extract": ((QuantizedBaseConfig, BASE),),
    "demo": ((DemoConfig, DEMO),),
}
