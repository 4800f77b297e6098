"""The offline end-to-end demo: SmolLM2-135M-Instruct on Amazon fine-food reviews, through the whole pipeline.

Wanda 50 % → NLS + SparsePEFT (or QA-SparsePEFT on an INT4 base) with `NASTrainer` → heuristics + NSGA-II search →
merged sparse (INT4) sub-network → OpenVINO IR → accuracy, sparsity, size and latency against the dense model, and a
dry-run Hub folder with model card and Pareto plot. Run it with `hf-elastic demo`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..search.evaluators import Evaluator

DEMO_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults fit in about 15 minutes on 2 CPU cores."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where every artefact of the demo goes."})
    model_dir: str | None = field(
        default=None,
        metadata={
            "help": "A local causal LM folder (weights and tokenizer) to use instead of SmolLM2-135M-Instruct, e.g. "
            "for a smoke test. Its widths must be multiples of group_size."
        },
    )
    quick: bool = field(default=False, metadata={"help": "A smoke run: a few steps and evaluations only."})
    quantization_aware: bool = field(
        default=False, metadata={"help": "QA-SparsePEFT on an INT4 base (exact INT4 export) instead of SparsePEFT."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of training and search."})
    sparsity: float = field(default=0.5, metadata={"help": "Wanda sparsity of the base model."})
    rank_choices: list[int] = field(default_factory=lambda: [16, 12, 8], metadata={"help": "NLS rank choices."})
    train_steps: int = field(default=80, metadata={"help": "Optimizer steps of NAS training."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Training learning rate (both modes)."})
    calibration_samples: int = field(default=32, metadata={"help": "Wanda calibration prompts."})
    val_rows: int = field(default=128, metadata={"help": "Rows of the search's validation split (from train)."})
    test_rows: int = field(default=200, metadata={"help": "Held-out test rows (never trained or searched on)."})
    search_budget: int = field(
        default=10, metadata={"help": "Sub-networks the search evaluates, max/min/median included."}
    )
    population: int = field(default=5, metadata={"help": "NSGA-II population."})
    group_size: int = field(default=64, metadata={"help": "INT4 group size (576 and 1536 are multiples of 64)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per prompt."})

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"DemoConfig.sparsity={self.sparsity} must be in [0, 1); e.g. 0.5.")
        if self.quick:
            self.train_steps, self.calibration_samples = 4, 8
            self.val_rows, self.test_rows, self.search_budget, self.population = 16, 32, 5, 2


class _Accuracy(Evaluator):
    """Label-word accuracy of the active sub-network on a split."""

    name, direction = "accuracy", "maximize"

    def __init__(self, tokenizer: Any, data: Any, max_length: int) -> None:
        self.tokenizer, self.data, self.max_length = tokenizer, data, max_length

    def __call__(self, supernet: Any, config: Any) -> float:
        from .assets import accuracy

        return accuracy(supernet.model, self.tokenizer, self.data, max_length=self.max_length)


def _latency_ms(model: Any, tokenizer: Any, texts: list[str], max_length: int, repeats: int = 3) -> float:
    """Median time to score one batch of 16 prompts."""
    from .assets import classify_logits

    classify_logits(model, tokenizer, texts[:16], max_length=max_length)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        classify_logits(model, tokenizer, texts[:16], max_length=max_length)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _decode_tokens_per_s(model: Any, tokenizer: Any, new_tokens: int = 32) -> float:
    from .assets import _model_device

    inputs = tokenizer("The best snack I ever bought was", return_tensors="pt").to(_model_device(model))
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    model.generate(**inputs, **kwargs)
    start = time.perf_counter()
    model.generate(**inputs, **kwargs)
    return new_tokens / (time.perf_counter() - start)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "tokenizer" not in f.name) / 2**20


def _layer_sparsity(weights: dict[str, dict[str, Any]]) -> float:
    """Zeros among the IR weights inside the transformer layers (the embedding / LM head stay dense)."""
    inside = [w for name, w in weights.items() if ".layers." in name]
    sizes = [torch.Size(w["shape"]).numel() for w in inside]
    return sum(w["sparsity"] * n for w, n in zip(inside, sizes, strict=True)) / max(sum(sizes), 1)


def _zeros_kept(base_masks: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    from ..compression.sparsity import weight_masks

    after = weight_masks(model)
    kept = sum(int((~after[k] & ~m).sum()) for k, m in base_masks.items())
    return kept / max(sum(int((~m).sum()) for m in base_masks.values()), 1)


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the pipeline, print the table and return (and write to `demo_results.json`) every figure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import NASTrainer, NASTrainingArguments, NLSConfig
    from ..compression.quantization.quantize import quantize
    from ..compression.sparsity import sparsify, sparsity_of, weight_masks
    from ..data import completion_collator
    from ..export.card_info import CardInfo
    from ..export.hub import push_to_hub
    from ..export.openvino import export_openvino, load_openvino
    from ..export.openvino_ir import ir_weight_sparsity
    from ..export.subnetwork import export_subnetwork, load_exported
    from ..search.searcher import search
    from .assets import accuracy, build_training_features, demo_model_dir, load_demo_dataset

    cfg = config or DemoConfig()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock, steps = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        steps[name] = round(now - clock, 1)
        clock = now
        print(f"[demo] {name}: {steps[name]} s", flush=True)

    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model_dir) if cfg.model_dir else demo_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"DemoConfig.model_dir={str(model_dir)!r} holds no config.json: pass a model folder.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_demo_dataset()
    train_rows = cfg.train_steps * cfg.batch_size
    if train_rows + cfg.val_rows > len(data["train"]):
        raise ValueError(f"train_steps * batch_size + val_rows = {train_rows + cfg.val_rows} rows exceed the split.")
    train = data["train"].select(range(train_rows))
    val = data["train"].select(range(train_rows, train_rows + cfg.val_rows))
    test = data["test"].select(range(min(cfg.test_rows, len(data["test"]))))
    test_texts = test["text"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lap("load model and data")

    def measure(m: Any, folder: Path) -> dict[str, float]:
        """Test accuracy, batch latency, decoding speed and size on disk."""
        return {
            "accuracy": accuracy(m, tokenizer, test, max_length=cfg.max_length),
            "latency_ms": _latency_ms(m, tokenizer, test_texts, cfg.max_length),
            "decode_tok_s": _decode_tokens_per_s(m, tokenizer),
            "size_mb": _size_mb(folder),
        }

    rows: dict[str, dict[str, Any]] = {}
    rows["dense (zero-shot)"] = measure(model, model_dir) | {"sparsity": 0.0}
    lap("dense baseline")

    from .assets import DEFAULT_TEMPLATE

    calibration = [DEFAULT_TEMPLATE.format(t) for t in train["text"][: 4 * cfg.calibration_samples]]
    report = sparsify(
        model,
        "wanda",
        cfg.sparsity,
        calibration=calibration,
        tokenizer=tokenizer,
        seq_len=cfg.max_length,
        num_samples=cfg.calibration_samples,
    )
    base_masks = weight_masks(model)
    if cfg.quantization_aware:
        quantize(model, bits=4, group_size=cfg.group_size, keep_residual=True)
    rows["sparse base (zero-shot)"] = {
        "accuracy": accuracy(model, tokenizer, test, max_length=cfg.max_length),
        "sparsity": report.total_sparsity,
    }
    lap("wanda" + (" + int4" if cfg.quantization_aware else ""))

    peft_config = NLSConfig(
        rank_choices=cfg.rank_choices,
        target_modules=TARGETS,
        rank_groups=[["q_proj", "k_proj", "v_proj"], ["up_proj"], ["down_proj"]],
        lora_alpha=2 * cfg.rank_choices[0],
        lora_dropout=0.0,
        sparse_adapter=True,
        quantization_aware=cfg.quantization_aware,
        task_type="CAUSAL_LM",
    )
    args = NASTrainingArguments(
        output_dir=str(out / "train"),
        max_steps=cfg.train_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        logging_steps=max(1, cfg.train_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=cfg.seed,
    )
    features = build_training_features(tokenizer, train, max_length=cfg.max_length)
    trainer = NASTrainer(
        model=model,
        args=args,
        peft_config=peft_config,
        train_dataset=features,
        data_collator=completion_collator(tokenizer),
    )
    trainer.train()
    trainer.save_model(str(out / "super-adapter"))
    supernet = trainer.supernet
    lap("NAS training")

    result = search(
        supernet,
        _Accuracy(tokenizer, val, cfg.max_length),
        "nsga2",
        objectives=("accuracy", "params"),
        budget=cfg.search_budget,
        population=cfg.population,
        seed=cfg.seed,
        nas_stats=trainer.sampler.stats(),
        output_dir=out / "search",
    )
    best = max(result.front, key=lambda e: (e.values["accuracy"], -e.values["params"]))
    lap("search")

    sub_dir = export_subnetwork(supernet, best.config, out / "subnet", tokenizer=tokenizer, overwrite=True)
    sub = load_exported(sub_dir)
    rows["sub-network (PyTorch)"] = measure(sub, sub_dir) | {
        "sparsity": sparsity_of(sub).total_sparsity,
        "zeros_kept": _zeros_kept(base_masks, sub),
    }
    lap("export merged sub-network")

    if cfg.quantization_aware:  # the sub-network holds its INT4 codes: the IR takes them as they are
        compression = {"weight_format": "fp32"}
    else:
        compression = {"weight_format": "int4", "group_size": cfg.group_size}
    source = sub_dir if cfg.quantization_aware else sub
    ov_dir = export_openvino(source, out / "openvino", tokenizer=tokenizer, overwrite=True, **compression)
    ov_model = load_openvino(ov_dir)
    ir = ir_weight_sparsity(ov_dir)
    rows["sub-network (OpenVINO INT4)"] = measure(ov_model, ov_dir) | {"sparsity": _layer_sparsity(ir["weights"])}
    lap("OpenVINO export")

    method = "sqft-qa-sparsepeft" if cfg.quantization_aware else "sqft-sparsepeft"
    card = CardInfo(
        method=method,
        base_model=DEMO_BASE_ID if cfg.model_dir is None else model_dir.name,
        license="apache-2.0",
        training_data="Amazon fine-food reviews (small_fine_foods, R package modeldata), great/other labels",
        hyperparameters={k: v for k, v in asdict(cfg).items() if k != "output_dir"},
        eval_results=[
            {
                "task_type": "text-classification",
                "dataset_type": "small_fine_foods",
                "dataset_name": "Amazon fine-food reviews (held-out test)",
                "metric_type": "accuracy",
                "metric_value": rows["sub-network (OpenVINO INT4)"]["accuracy"],
            }
        ],
    )
    shutil.rmtree(out / "hub", ignore_errors=True)  # a dry run refuses to overwrite an earlier one
    hub_dir = push_to_hub(
        ov_dir,
        f"hf-elastic/{model_dir.name}-sqft-demo",
        card_info=card,
        dry_run=True,
        local_dir=out / "hub",
        pareto_csv=out / "search" / "search.csv",
        pareto_plot=out / "search" / "search.png",
    )
    lap("model card (dry run)")

    summary = {
        "config": asdict(cfg),
        "rows": rows,
        "best_subnet": best.config,
        "search": {"evaluated": len(result.evaluations), "front": len(result.front)},
        "seconds": steps,
        "total_seconds": round(sum(steps.values()), 1),
        "hub_folder": str(hub_dir),
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    _print_table(rows, summary["total_seconds"])
    return summary


def _print_table(rows: dict[str, dict[str, Any]], seconds: float) -> None:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(
        f"\n{'variant':<30}{'accuracy':>9}{'sparsity':>10}{'zeros kept':>11}{'size MB':>9}{'ms/batch':>10}{'tok/s':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:<30}{fmt(r.get('accuracy'), '.3f'):>9}{fmt(r.get('sparsity'), '.3f'):>10}"
            f"{fmt(r.get('zeros_kept'), '.2%'):>11}{fmt(r.get('size_mb'), '.1f'):>9}"
            f"{fmt(r.get('latency_ms'), '.0f'):>10}{fmt(r.get('decode_tok_s'), '.1f'):>8}"
        )
    print(f"total {seconds:.0f} s")
