"""The offline end-to-end demo: SmolLM2-135M-Instruct on Amazon fine-food reviews, through the whole pipeline.

`method="lonas"` (the default; `hf_elastic.demo.lonas`): elastic FFN width (heads and ranks on request), NSGA-II on
accuracy against latency, and the front's sub-networks sliced and measured in PyTorch and OpenVINO. `"shears"`,
`"sqft"`, `"sqft-qa"`: Wanda 50 % → NLS (+ SparsePEFT, or QA-SparsePEFT on an INT4 base) with `NASTrainer` →
NSGA-II → merged sparse (INT4) sub-network → OpenVINO IR. Every mode ends with a dry-run Hub folder (model card,
Pareto plot). Run it with `hf-elastic demo`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT
from ..models.offline import SMOLLM2_ID
from ..search.tasks import LabelWordEvaluator
from ..utils import atomic_open, quiet_library_output
from .config import DemoConfig
from .measure import decode_tokens_per_s, latency_ms, layer_sparsity, print_table, size_mb, zeros_kept
from .progress import quiet_progress


@dataclass
class DemoContext:
    """What every demo mode shares: the loaded model and splits, the result rows and the stopwatch."""

    cfg: DemoConfig
    out: Path
    model_dir: Path
    model: Any
    tokenizer: Any
    train: Any
    val: Any
    test: Any
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    _clock: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 1)
        self._clock = now
        print(f"[demo] {name}: {self.seconds[name]} s", flush=True)

    def evaluator(self, rows: Any) -> LabelWordEvaluator:
        """Label-word accuracy on fine-food `rows`, 16 prompts a batch: a search objective, or `.accuracy(model)`."""
        return LabelWordEvaluator.from_rows(rows, FINE_FOODS_ANSWERS, self.tokenizer, FINE_FOODS_FORMAT, batch_size=16)

    @cached_property
    def test_eval(self) -> LabelWordEvaluator:
        return self.evaluator(self.test)

    @cached_property
    def timed_eval(self) -> LabelWordEvaluator:
        return self.evaluator(self.test.select(range(min(16, len(self.test)))))

    def measure(self, model: Any, folder: Path, timed: bool = True) -> dict[str, float]:
        """Test accuracy and size on disk; with `timed`, also batch latency and decoding speed."""
        row = {"accuracy": self.test_eval.accuracy(model)}
        if timed:
            row["latency_ms"] = latency_ms(model, self.timed_eval)
            row["decode_tok_s"] = decode_tokens_per_s(model, self.tokenizer)
        return row | {"size_mb": size_mb(folder)}


def run_demo(config: DemoConfig | None = None, verbose: bool | None = None) -> dict[str, Any]:
    """Run the pipeline, print the table and return (and write to `demo_results.json`) every figure.

    The libraries' known-harmless warnings and notices are hidden unless `verbose` (see `quiet_library_output`).
    """
    with quiet_library_output(verbose):
        return _run_demo(config or DemoConfig())


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import fit_rows, load_fine_foods
    from ..export.card_info import CardInfo
    from ..export.hub import push_to_hub
    from ..models.offline import smollm2_dir

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model_dir) if cfg.model_dir else smollm2_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"DemoConfig.model_dir={str(model_dir)!r} holds no config.json: pass a model folder.")
    data = load_fine_foods()
    train_rows = cfg.train_steps * cfg.batch_size
    if train_rows + cfg.val_rows > len(data["train"]):
        raise ValueError(f"train_steps * batch_size + val_rows = {train_rows + cfg.val_rows} rows exceed the split.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def rows(split: str, start: int, stop: int) -> Any:  # long reviews cut so that prompt and answer fit
        return fit_rows(data[split].select(range(start, stop)), tokenizer, cfg.max_length, FINE_FOODS_FORMAT)

    ctx = DemoContext(
        cfg=cfg,
        out=out,
        model_dir=model_dir,
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        tokenizer=tokenizer,
        train=rows("train", 0, train_rows),
        val=rows("train", train_rows, train_rows + cfg.val_rows),
        test=rows("test", 0, min(cfg.test_rows, len(data["test"]))),
    )
    ctx.lap("load model and data")
    # LoNAS times its max sub-network, which has the dense architecture; the other modes compare against the dense one
    ctx.rows["dense (zero-shot)"] = ctx.measure(ctx.model, model_dir, timed=cfg.method != "lonas") | {
        "params_m": sum(p.numel() for p in ctx.model.parameters()) / 1e6
    }
    ctx.lap("dense baseline")

    if cfg.method == "lonas":
        from .lonas import run_lonas

        extra = run_lonas(ctx)
    else:
        extra = _run_sparse(ctx)

    card = CardInfo(
        method=cfg.method_info.name,
        base_model=SMOLLM2_ID if cfg.model_dir is None else model_dir.name,
        license="apache-2.0",
        training_data="Amazon fine-food reviews (small_fine_foods, R package modeldata), great/other labels",
        hyperparameters={k: v for k, v in asdict(cfg).items() if k != "output_dir"},
        eval_results=[
            {
                "task_type": "text-classification",
                "dataset_type": "small_fine_foods",
                "dataset_name": "Amazon fine-food reviews (held-out test)",
                "metric_type": "accuracy",
                "metric_value": extra.pop("card_accuracy"),
            }
        ],
    )
    shutil.rmtree(out / "hub", ignore_errors=True)  # a dry run refuses to overwrite an earlier one
    search_dir = extra.pop("search_dir")
    hub_dir = push_to_hub(
        extra.pop("hub_source"),
        f"hf-elastic/{model_dir.name}-{cfg.method}-demo",
        card_info=card,
        dry_run=True,
        local_dir=out / "hub",
        pareto_csv=search_dir / "search.csv",
        pareto_plot=search_dir / "search.png",
    )
    ctx.lap("model card (dry run)")

    total = round(time.perf_counter() - start, 1)
    summary = {"config": asdict(cfg), "rows": ctx.rows, **extra}
    summary |= {"seconds": ctx.seconds, "total_seconds": total, "hub_folder": str(hub_dir)}
    with atomic_open(out / "demo_results.json") as f:  # a crash never leaves half a results file
        json.dump(summary, f, indent=2, default=str)
    print_table(ctx.rows, total)
    if "goal" in extra:
        print(extra["goal"]["text"])
    return summary


def nls_setup(
    cfg: DemoConfig, output_dir: str | Path, sparse_adapter: bool, quantization_aware: bool, **training: Any
) -> tuple[Any, Any]:
    """The `NLSConfig` and `NASTrainingArguments` of the demo's Shears / SQFT training (`training` overrides
    arguments, e.g. `distillation="teacher"`)."""
    from .. import NASTrainingArguments, NLSConfig
    from .lonas import RANK_GROUPS, TARGETS

    peft_config = NLSConfig(
        rank_choices=cfg.rank_choices,
        target_modules=TARGETS,
        rank_groups=RANK_GROUPS,
        lora_alpha=2 * cfg.rank_choices[0],
        lora_dropout=0.0,
        sparse_adapter=sparse_adapter,
        quantization_aware=quantization_aware,
        task_type="CAUSAL_LM",
    )
    args = NASTrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.train_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        logging_steps=max(1, cfg.train_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=cfg.seed,
        **training,
    )
    return peft_config, args


def _run_sparse(ctx: DemoContext) -> dict[str, Any]:
    """Shears / SQFT / SQFT-QA: Wanda (+ INT4), NLS training, search on parameters, one merged sub-network."""
    from .. import NASTrainer
    from ..compression.quantization.quantize import QuantizationConfig, quantize
    from ..compression.sparsity import sparsify, sparsity_of, weight_masks
    from ..data import completion_collator, prompts_and_answers, tokenize_rows
    from ..export.openvino import export_openvino, load_openvino
    from ..export.openvino_ir import ir_weight_sparsity
    from ..export.subnetwork import export_subnetwork, load_exported
    from ..search.searcher import SearchConfig, search_subnetworks

    cfg, model, tokenizer, out, rows = ctx.cfg, ctx.model, ctx.tokenizer, ctx.out, ctx.rows
    calibration_rows = ctx.train.select(range(min(4 * cfg.calibration_samples, len(ctx.train))))
    calibration = prompts_and_answers(calibration_rows, FINE_FOODS_FORMAT)[0]
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
        quantize(
            model, QuantizationConfig(bits=cfg.method_info.base_bits, group_size=cfg.group_size, keep_residual=True)
        )
    rows["sparse base (zero-shot)"] = {
        "accuracy": ctx.test_eval.accuracy(model),
        "sparsity": report.total_sparsity,
    }
    ctx.lap("wanda" + (" + int4" if cfg.quantization_aware else ""))

    peft_config, args = nls_setup(cfg, out / "train", cfg.method_info.sparse_adapter, cfg.quantization_aware)
    features = tokenize_rows(ctx.train, tokenizer, cfg.max_length, FINE_FOODS_FORMAT)
    trainer = NASTrainer(
        model=model,
        args=args,
        peft_config=peft_config,
        train_dataset=features,
        data_collator=completion_collator(tokenizer),
    )
    quiet_progress(trainer).train()
    trainer.save_model(str(out / "super-adapter"))
    supernet = trainer.supernet
    ctx.lap("NAS training")

    result = search_subnetworks(
        supernet,
        ctx.evaluator(ctx.val),
        SearchConfig(
            objectives=("accuracy", "params"),
            budget=cfg.search_budget,
            population=cfg.population,
            seed=cfg.seed,
            strategy=cfg.search_strategy,
        ),
        nas_stats=trainer.sampler.stats(),
        output_dir=out / "search",
    )
    best = max(result.front, key=lambda e: (e.values["accuracy"], -e.values["params"]))
    ctx.lap("search")

    sub_dir = export_subnetwork(supernet, best.config, out / "subnet", tokenizer=tokenizer, overwrite=True)
    sub = load_exported(sub_dir)
    rows["sub-network (PyTorch)"] = ctx.measure(sub, sub_dir) | {
        "sparsity": sparsity_of(sub).total_sparsity,
        "zeros_kept": zeros_kept(base_masks, sub),
    }
    ctx.lap("export merged sub-network")

    if cfg.quantization_aware:  # the sub-network holds its INT4 codes: the IR takes them as they are
        compression = {"weight_format": "fp32"}
    else:
        compression = {"weight_format": "int4", "group_size": cfg.group_size}
    source = sub_dir if cfg.quantization_aware else sub
    ov_dir = export_openvino(source, out / "openvino", tokenizer=tokenizer, overwrite=True, **compression)
    ir = ir_weight_sparsity(ov_dir)
    ov_row = ctx.measure(load_openvino(ov_dir), ov_dir) | {"sparsity": layer_sparsity(ir["weights"])}
    rows["sub-network (OpenVINO INT4)"] = ov_row
    ctx.lap("OpenVINO export")
    return {
        "best_subnet": best.config,
        "search": {"evaluated": len(result.evaluations), "front": len(result.front)},
        "search_dir": out / "search",
        "hub_source": ov_dir,
        "card_accuracy": ov_row["accuracy"],
    }
