"""The `hf-elastic` subcommands; each takes the parsed arguments of its parser in `hf_elastic.cli.parser`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .fields import config_kwargs
from .inputs import (
    calibration_texts,
    instruction_format,
    load_model_and_tokenizer,
    read_rows,
    subnet_config,
    token_dataset,
)
from .options import DEMO, QUANTIZE, SEARCH, SPARSIFY, TRAIN_ADAPTER, TRAIN_ARGUMENTS, WIDTH_OPTIONS


def _check_output(output: str, inputs: list[str], overwrite: bool, option: str = "output") -> Path:
    """Refuse an output that is an input, lies inside one or holds one, or exists without --overwrite."""
    from ..utils import check_output_dir, overlaps

    for source in inputs:
        if Path(source).exists() and overlaps(output, source):
            raise ValueError(f"The {option} {output} overlaps the input {source}; write to a new folder.")
    if Path(output).exists() and not Path(output).is_dir():
        raise FileExistsError(f"The {option} {output} is a file; pass a folder.")
    if Path(output).is_dir() and any(Path(output).iterdir()) and not overwrite:
        raise FileExistsError(f"The {option} {output} exists and is not empty; pass --overwrite to replace it.")
    parent = next((p for p in Path(output).absolute().parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"The {option} {output} cannot be written: {parent} is not writable.")
    return check_output_dir(output, overwrite=True)


def _transform_and_save(args: argparse.Namespace, transform: Any) -> Any:
    """Load `args.model`, run `transform(model, calibration_texts, tokenizer)` (sparsify or quantize), save the model
    and its report atomically."""
    from ..compression.quantization.format import QuantLinear
    from ..compression.quantization.serialization import write_quantized
    from ..utils import atomic_directory

    _check_output(args.output, [args.model], args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args)
    report = transform(model, calibration_texts(args, tokenizer), tokenizer)
    with atomic_directory(args.output, overwrite=True) as tmp:
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            write_quantized(model, tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report.save(tmp)
    print(report)
    print(f"wrote {args.output}")
    return report


def cmd_sparsify(args: argparse.Namespace) -> None:
    from ..compression.sparsity import SparsityConfig, sparsify

    options = config_kwargs(args, SparsityConfig, SPARSIFY)
    SparsityConfig(**options)  # a wrong setting fails before the model loads
    _transform_and_save(
        args, lambda model, texts, tokenizer: sparsify(model, calibration=texts, tokenizer=tokenizer, **options)
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from ..compression.quantization.format import group_size_note
    from ..compression.quantization.quantize import QuantizationConfig, quantize

    config = QuantizationConfig(**config_kwargs(args, QuantizationConfig, QUANTIZE))
    report = _transform_and_save(
        args, lambda model, texts, tokenizer: quantize(model, config, calibration=texts, tokenizer=tokenizer)
    )
    if config.group_size is None:
        print(f"{group_size_note(report.config.group_size)} (pass --group-size to choose another)")


def _peft_config(args: argparse.Namespace) -> Any:
    from ..tuners import ElasticLoraConfig, NLSConfig

    options = config_kwargs(args, ElasticLoraConfig, TRAIN_ADAPTER) | {"task_type": "CAUSAL_LM"}
    if args.method == "elastic_lora":
        return ElasticLoraConfig(**options)
    widths = [o for o in (*WIDTH_OPTIONS, "reorder") if getattr(args, o) is not None]
    if widths:
        flags = ", ".join("--" + o.replace("_", "-") for o in widths)
        raise ValueError(f"{flags} need --method elastic_lora (LoNAS); --method nls trains elastic ranks only.")
    return NLSConfig(**{k: v for k, v in options.items() if k not in WIDTH_OPTIONS})


def _training_arguments(args: argparse.Namespace, has_eval: bool) -> Any:
    import torch

    from ..nas.trainer import NASTrainingArguments

    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 exclude each other; pick one.")
    if args.eval_steps is not None and not has_eval:
        raise ValueError("--eval-steps needs evaluation data: pass --eval-data (or --eval-split of --data).")
    options = config_kwargs(args, NASTrainingArguments, TRAIN_ARGUMENTS)
    if args.num_train_epochs is None and args.max_steps is None:
        options["max_steps"] = 200
    if args.eval_steps:
        options["eval_strategy"] = "steps"
    options["use_cpu"] = args.use_cpu or not torch.accelerator.is_available()
    return NASTrainingArguments(output_dir=args.output, save_strategy="steps", report_to="none", **options)


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    from peft import get_peft_model

    from ..data import completion_collator
    from ..nas import NASTrainer, get_supernet

    peft_config = _peft_config(args)
    eval_source = args.eval_data or (args.data if args.eval_split else None)
    training_args = _training_arguments(args, eval_source is not None)
    train_rows = read_rows(args, args.data, args.split, args.num_samples, "--data")
    eval_rows = None
    if eval_source:
        eval_rows = read_rows(args, eval_source, args.eval_split or args.split, args.eval_samples, "--eval-data")
    model, tokenizer = load_model_and_tokenizer(args)
    train = token_dataset(args, train_rows, tokenizer, model)
    evaluation = token_dataset(args, eval_rows, tokenizer, model) if eval_rows is not None else None
    torch.manual_seed(args.seed)  # the LoRA initialisation follows the training seed
    model = get_peft_model(model, peft_config)
    collator = completion_collator(tokenizer)
    if args.reorder:
        batches = [collator([train[i] for i in range(min(len(train), args.per_device_train_batch_size))])]
        get_supernet(model).reorder_channels(args.reorder, None if args.reorder == "magnitude" else batches)
    trainer = NASTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        processing_class=tokenizer,  # saved with the super-adapter, in one commit
    )
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.save_model(args.output)
    if evaluation is not None:
        metrics = trainer.evaluate()
        print(" ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.endswith("_loss")))
    print(f"wrote the super-adapter to {args.output}")


def _check_adapter(args: argparse.Namespace) -> None:
    from ..utils import ELASTIC_CONFIG_NAME

    if not Path(args.adapter, ELASTIC_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{args.adapter} is not an hf_elastic super-adapter (no {ELASTIC_CONFIG_NAME}).")


def _load_supernet(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..nas import get_supernet, load_super_network

    _check_adapter(args)
    model, tokenizer = load_model_and_tokenizer(args, args.base)
    return get_supernet(load_super_network(model, args.adapter)), tokenizer


def _quality_evaluator(args: argparse.Namespace, tokenizer: Any, model: Any) -> Any:
    from ..data import completion_collator, prompts_and_answers
    from ..search import ExactMatchEvaluator, LabelWordEvaluator, LMEvalEvaluator, LossEvaluator, PerplexityEvaluator

    if args.metric == "lm-eval":
        if not args.tasks:
            raise ValueError("--metric lm-eval needs --tasks, e.g. --tasks arc_easy hellaswag.")
        return LMEvalEvaluator(
            args.tasks, tokenizer, args.lm_eval_metric, limit=args.num_samples, include_path=args.include_path
        )
    if not args.data:
        raise ValueError(f"--metric {args.metric} needs --data (evaluation rows).")
    rows = read_rows(args, args.data, args.split, args.num_samples, "--data")
    if args.metric in ("loss", "perplexity"):
        data = token_dataset(args, rows, tokenizer, model)
        cls = LossEvaluator if args.metric == "loss" else PerplexityEvaluator
        return cls(data, data_collator=completion_collator(tokenizer), batch_size=args.batch_size)
    prompts, answers = prompts_and_answers(rows, instruction_format(args), tokenizer)
    if args.metric == "accuracy":
        if not args.label_words:
            raise ValueError("--metric accuracy needs --label-words, e.g. --label-words ' negative' ' positive'.")
        return LabelWordEvaluator.from_answers(
            prompts, answers, args.label_words, tokenizer, batch_size=args.batch_size
        )
    return ExactMatchEvaluator(
        prompts, answers, tokenizer, args.answer_regex, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )


def cmd_search(args: argparse.Namespace) -> None:
    from ..nas.trainer import NAS_STATS_NAME
    from ..search.searcher import SearchConfig, search_subnetworks

    options = config_kwargs(args, SearchConfig, SEARCH)
    SearchConfig(**options)  # a wrong setting fails before the model loads
    supernet, tokenizer = _load_supernet(args)
    evaluator = _quality_evaluator(args, tokenizer, supernet.model)
    config = SearchConfig(objectives=(evaluator.name, args.cost), **options)
    stats = Path(args.adapter, NAS_STATS_NAME)
    result = search_subnetworks(
        supernet,
        evaluator,
        config,
        nas_stats=stats if stats.is_file() and config.strategy == "loss_based" else None,
        output_dir=args.output,
    )
    print(f"{len(result.evaluations)} sub-networks evaluated, {len(result.front)} on the Pareto front")
    print(f"wrote {args.output}/search.json, search.csv and search.png")


def cmd_export(args: argparse.Namespace) -> None:
    from ..compression.quantization.format import group_size_note
    from ..export.openvino import export_openvino, int4_group_size, openvino_export_problem
    from ..export.subnetwork import export_subnetwork, load_exported
    from ..utils import SUBNET_CONFIG_NAME

    if args.weight_format != "fp32" and not args.openvino:
        raise ValueError(f"--weight-format {args.weight_format} applies to the OpenVINO IR; add --openvino.")
    if args.fp32_embeddings and not args.openvino:
        raise ValueError("--fp32-embeddings applies to the OpenVINO IR; add --openvino.")
    if args.openvino and args.format != "hf-elastic":
        raise ValueError(
            f"--openvino reads the hf-elastic folder; with --format {args.format} run hf-elastic export twice "
            "(once with --openvino and no --format)."
        )
    _check_adapter(args)
    if args.group_size is not None and args.weight_format != "int4":
        raise ValueError(
            f"--group-size {args.group_size} applies to --weight-format int4 (got {args.weight_format}); drop it."
        )
    config = subnet_config(args.config, args.select)
    ov_dir = Path(f"{args.output}-openvino")
    inputs = [args.adapter, args.base]
    for folder in (args.output, *([ov_dir] if args.openvino else [])):  # check every output before writing any
        _check_output(str(folder), inputs, args.overwrite, "--output")
    supernet, tokenizer = _load_supernet(args)
    model_type = supernet.model.get_base_model().config.model_type
    problem = openvino_export_problem(model_type) if args.openvino else None
    if problem:
        raise ValueError(f"--openvino: {problem}. Nothing was written; export without --openvino, or fix that first.")
    out = export_subnetwork(supernet, config, args.output, tokenizer=tokenizer, overwrite=True, format=args.format)
    print(f"wrote {out}")
    if args.openvino:
        try:
            model = load_exported(out)
            group_size = args.group_size
            if args.weight_format == "int4" and group_size is None:
                group_size = int4_group_size(model)
                print(f"OpenVINO INT4 {group_size_note(group_size)} (pass --group-size to choose another)")
            export_openvino(
                model,
                ov_dir,
                tokenizer=tokenizer,
                weight_format=args.weight_format,
                group_size=group_size,
                compress_float_weights=False if args.fp32_embeddings else None,
                extra_files=[out / SUBNET_CONFIG_NAME],
                overwrite=True,
            )
        except Exception as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise ValueError(
                f"The OpenVINO export failed ({type(error).__name__}: {first}). {out} holds the complete sub-network; "
                f"{ov_dir} was not written. Fix the cause and run the same command with --overwrite, or convert the "
                f"written folder with hf_elastic.export_openvino({str(out)!r}, {str(ov_dir)!r})."
            ) from error
        print(f"wrote {ov_dir}")


def cmd_extract(args: argparse.Namespace) -> None:
    from ..utils import atomic_directory

    _check_adapter(args)
    config = subnet_config(args.config, args.select)
    _check_output(args.output, [args.adapter, args.base], args.overwrite, "--output")
    supernet, tokenizer = _load_supernet(args)
    with atomic_directory(args.output, overwrite=True) as tmp:
        supernet.extract_adapter(config, tmp)
        tokenizer.save_pretrained(tmp)
    if supernet.config.quantization_aware:
        print("note: a quantization-aware adapter; stock peft refuses it on purpose. Merge it with hf-elastic export")
    elif supernet.config.sparse_adapter:
        print(
            "note: a sparse adapter; stock peft refuses it on purpose. Merge it with hf_elastic.merge_subnet_adapter."
        )
    print(f"wrote {args.output}")


def cmd_push(args: argparse.Namespace) -> None:
    from ..export.card_info import CardInfo
    from ..export.hub import push_to_hub

    info = CardInfo(method=args.method, base_model=args.base_model, license=args.license)  # None: inferred
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
    from ..demo.run import DemoConfig, run_demo

    options = config_kwargs(args, DemoConfig, DEMO)
    if args.qa:
        options["method"] = "sqft-qa"
    run_demo(DemoConfig(**options))
