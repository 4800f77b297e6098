"""`hf-elastic`: the pipeline from the command line (sparsify, quantize, train, search, export, push, demo)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

_SUBNETS = ("max", "min", "median")


def _model_and_tokenizer(path: str, device: str = "cpu") -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from .export.subnetwork import load_exported

    if not Path(path, "config.json").is_file():
        raise SystemExit(f"error: {path} is not a model folder (no config.json).")
    return load_exported(path).to(device), AutoTokenizer.from_pretrained(path)


def _read_texts(path: str, template: str, limit: int | None = None) -> list[str]:
    """Rows of a .jsonl/.json/.csv file formatted with `template` (columns in braces), or the lines of a .txt file."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: data file {path} does not exist.")
    if file.suffix == ".txt":
        texts = [line for line in file.read_text().splitlines() if line.strip()]
    else:
        from datasets import load_dataset

        kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(file.suffix)
        if kind is None:
            raise SystemExit(f"error: {path}: use a .jsonl, .json, .csv or .txt file.")
        rows = load_dataset(kind, data_files=str(file), split="train")
        try:
            texts = [template.format(**row) for row in rows]
        except KeyError as err:
            raise SystemExit(f"error: --template uses column {err}, but {path} has {rows.column_names}.") from None
    if not texts:
        raise SystemExit(f"error: {path} holds no rows.")
    return texts[:limit]


def _lm_dataset(texts: list[str], tokenizer: Any, seq_len: int) -> Any:
    from datasets import Dataset

    encoded = tokenizer(texts, truncation=True, max_length=seq_len)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})


def _lm_collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def _subnet_config(value: str) -> Any:
    """`max`/`min`/`median`, a JSON object, a JSON file with a config, or a search result plus `:best`/`:<index>`."""
    if value in _SUBNETS:
        return value
    if value.lstrip().startswith("{"):
        return json.loads(value)
    path, _, pick = value.partition(":")
    if not Path(path).is_file():
        raise SystemExit(f"error: --config {value!r} is neither max/min/median, a JSON object nor a file.")
    data = json.loads(Path(path).read_text())
    if "evaluations" in data:
        from .search.result import SearchResult

        result = SearchResult.from_dict(data)
        chosen = result.best() if pick in ("", "best") else result.evaluations[int(pick)]
        return chosen.config
    return data.get("config", data)


def _transform_and_save(args: argparse.Namespace, transform: Any, **options: Any) -> None:
    """Load `args.model`, run `sparsify`/`quantize` on it with the calibration file, save model + report."""
    from .compression.quantization.format import QuantLinear
    from .compression.quantization.serialization import save_quantized

    model, tokenizer = _model_and_tokenizer(args.model, args.device)
    texts = _read_texts(args.calibration, args.template, args.num_samples) if args.calibration else None
    report = transform(
        model, calibration=texts, tokenizer=tokenizer, seq_len=args.seq_len, num_samples=args.num_samples, **options
    )
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        save_quantized(model, args.output)
    else:
        model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    report.save(args.output)
    print(report)
    print(f"wrote {args.output}")


def cmd_sparsify(args: argparse.Namespace) -> None:
    from .compression.sparsity import sparsify

    _transform_and_save(args, sparsify, method=args.method, sparsity=args.sparsity, pattern=args.pattern)


def cmd_quantize(args: argparse.Namespace) -> None:
    from .compression.quantization.quantize import quantize

    options = {"bits": args.bits, "group_size": args.group_size, "symmetric": args.symmetric, "method": args.method}
    options["keep_residual"] = args.keep_residual
    _transform_and_save(args, quantize, **options)


def cmd_train(args: argparse.Namespace) -> None:
    from . import ElasticLoraConfig, NASTrainer, NASTrainingArguments, NLSConfig

    model, tokenizer = _model_and_tokenizer(args.model)
    config_cls = ElasticLoraConfig if args.method == "elastic_lora" else NLSConfig
    peft_config = config_cls(
        rank_choices=args.rank_choices,
        target_modules=args.target_modules,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        sparse_adapter=args.sparse_adapter,
        quantization_aware=args.quantization_aware,
        task_type="CAUSAL_LM",
    )
    train = _lm_dataset(_read_texts(args.data, args.template), tokenizer, args.seq_len)
    training_args = NASTrainingArguments(
        output_dir=args.output,
        sampling=args.sampling,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=max(1, args.max_steps // 20),
        save_strategy="steps",
        save_steps=args.save_steps,
        report_to="none",
        seed=args.seed,
        use_cpu=not args.gpu,
    )
    trainer = NASTrainer(
        model=model,
        args=training_args,
        peft_config=peft_config,
        train_dataset=train,
        data_collator=_lm_collator(tokenizer),
    )
    trainer.train(resume_from_checkpoint=args.resume or None)
    trainer.save_model(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote the super-adapter to {args.output}")


def _load_supernet(adapter: str, base: str, device: str) -> tuple[Any, Any]:
    from . import get_supernet, load_super_network

    model, tokenizer = _model_and_tokenizer(base, device)
    if not Path(adapter, "elastic_config.json").is_file():
        raise SystemExit(f"error: {adapter} is not an hf_elastic super-adapter (no elastic_config.json).")
    return get_supernet(load_super_network(model, adapter)), tokenizer


def cmd_search(args: argparse.Namespace) -> None:
    from .search.evaluators import LossEvaluator
    from .search.searcher import search

    supernet, tokenizer = _load_supernet(args.adapter, args.base, args.device)
    data = _lm_dataset(_read_texts(args.data, args.template, args.num_samples), tokenizer, args.seq_len)
    stats = Path(args.adapter, "nas_stats.json")
    result = search(
        supernet,
        LossEvaluator(data, data_collator=_lm_collator(tokenizer), batch_size=args.batch_size),
        args.strategy,
        objectives=("loss", args.cost),
        budget=args.budget,
        population=args.population,
        seed=args.seed,
        nas_stats=stats if stats.is_file() else None,
        output_dir=args.output,
    )
    print(f"{len(result.evaluations)} sub-networks evaluated, {len(result.front)} on the Pareto front")
    print(f"wrote {args.output}/search.json, search.csv and search.png")


def cmd_export(args: argparse.Namespace) -> None:
    from .export.subnetwork import export_subnetwork

    supernet, tokenizer = _load_supernet(args.adapter, args.base, args.device)
    out = export_subnetwork(
        supernet, _subnet_config(args.config), args.output, tokenizer=tokenizer, overwrite=args.overwrite
    )
    print(f"wrote {out}")
    if args.openvino:
        from .export.openvino import export_openvino
        from .export.subnetwork import load_exported

        ov_dir = export_openvino(
            load_exported(out), Path(f"{out}-openvino"), tokenizer=tokenizer, weight_format=args.weight_format
        )
        print(f"wrote {ov_dir}")


def cmd_push(args: argparse.Namespace) -> None:
    from .export.card_info import CardInfo
    from .export.hub import push_to_hub

    info = CardInfo(method=args.method, base_model=args.base_model, license=args.license)
    token = os.environ.get("HF_TOKEN") if not args.dry_run else None
    where = push_to_hub(
        args.folder,
        args.repo_id,
        card_info=info,
        token=token,
        private=args.private,
        dry_run=args.dry_run,
        local_dir=args.local_dir,
    )
    print(f"{'wrote' if args.dry_run else 'pushed'} {where}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo.run import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            output_dir=args.output,
            model_dir=args.model_dir,
            quick=args.quick,
            quantization_aware=args.qa,
            seed=args.seed,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-elastic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p: argparse.ArgumentParser, required: bool, what: str) -> None:
        p.add_argument("--" + what, required=required, help=".jsonl/.json/.csv rows (see --template) or .txt lines")
        p.add_argument("--template", default="{text}", help="how a row becomes text, e.g. '{title}: {body}'")
        p.add_argument("--seq-len", type=int, default=256, help="tokens per sample")

    def device_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="cpu", help="where the model runs, e.g. cpu, cuda or cuda:1")

    p = sub.add_parser("sparsify", help="prune a model with Wanda or magnitude (unstructured or N:M)")
    p.add_argument("model", help="model folder")
    p.add_argument("output", help="where to write the sparse model and sparsity_report.json")
    p.add_argument("--method", choices=("wanda", "magnitude"), default="wanda")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros per row (unstructured)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured', '2:4' or '4:8'")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples")
    data_args(p, False, "calibration")
    device_arg(p)
    p.set_defaults(func=cmd_sparsify)

    p = sub.add_parser("quantize", help="INT4/INT8 group-wise quantization (RTN or GPTQ), in hf_elastic's format")
    p.add_argument("model", help="model folder (may be sparse: zeros stay zero)")
    p.add_argument("output")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    p.add_argument("--keep-residual", action="store_true", help="keep the rounding residuals (QA-SparsePEFT training)")
    p.add_argument("--num-samples", type=int, default=128)
    data_args(p, False, "calibration")
    device_arg(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("train", help="train an NLS / LoNAS super-network with NASTrainer (causal LM)")
    p.add_argument("model", help="base model folder (dense, sparse or hf_elastic INT4)")
    p.add_argument("output", help="where to write checkpoints and the super-adapter")
    p.add_argument("--method", choices=("nls", "elastic_lora"), default="nls")
    p.add_argument("--rank-choices", type=int, nargs="+", default=[16, 12, 8])
    p.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--sparse-adapter", action="store_true", help="SparsePEFT: keep the base's zeros when merging")
    p.add_argument("--quantization-aware", action="store_true", help="QA-SparsePEFT on an hf_elastic INT4 base")
    p.add_argument("--sampling", default="uniform", help="uniform, sandwich, max or a registered sampler")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gpu", action="store_true", help="use an accelerator when one is present")
    data_args(p, True, "data")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="search sub-networks of a super-adapter (loss vs size)")
    p.add_argument("adapter", help="super-adapter folder (from train)")
    p.add_argument("--base", required=True, help="the base model folder it was trained on")
    p.add_argument("--output", required=True, help="folder for search.json/.csv/.png")
    p.add_argument("--strategy", default="nsga2", help="nsga2, random, median, max, min, loss_based")
    p.add_argument("--cost", choices=("params", "macs", "latency"), default="params")
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--population", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=64, help="evaluation rows")
    p.add_argument("--seed", type=int, default=0)
    data_args(p, True, "data")
    device_arg(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="merge and slice a sub-network; optionally to OpenVINO IR")
    p.add_argument("adapter", help="super-adapter folder")
    p.add_argument("--base", required=True, help="the base model folder")
    p.add_argument("--output", required=True)
    p.add_argument("--config", default="median", help="max/min/median, a JSON object, or search.json[:best|:<i>]")
    p.add_argument("--openvino", action="store_true", help="also write <output>-openvino (OpenVINO IR)")
    p.add_argument("--weight-format", choices=("fp32", "fp16", "int8", "int4"), default="fp32")
    p.add_argument("--overwrite", action="store_true")
    device_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="publish an adapter, merged model or OpenVINO folder with a model card")
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument("--method", default="sqft-sparsepeft", help="lonas, nls, shears, sqft, sqft-sparsepeft, ...")
    p.add_argument("--base-model", required=True, help="Hub id of the base model, for the card")
    p.add_argument("--license", default=None)
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded; no network")
    p.add_argument("--local-dir", default=None, help="where --dry-run writes the folder")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("demo", help="the whole pipeline offline on SmolLM2-135M and fine-food reviews")
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--quick", action="store_true", help="fewer steps and evaluations (a smoke run)")
    p.add_argument("--qa", action="store_true", help="QA-SparsePEFT on an INT4 base instead of SparsePEFT")
    p.add_argument("--model-dir", default=None, help="a local causal LM folder to use instead of SmolLM2-135M")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
