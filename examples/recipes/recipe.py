"""The shared runner of the papers' recipes: compress the base, train the super-adapter, evaluate, export.

Each recipe script (`lonas.py`, `shears.py`, `sqft_sparsepeft.py`, `sqft_qa_sparsepeft.py`) names a method of
`hf_elastic.tuners.methods.METHODS`, which holds its base compression, config flags and published hyper-parameters.
On a GPU machine with the Hub they run as they are (GSM8K from the Hub, lm-eval `gsm8k` for the heuristic
sub-network). `--tiny` swaps in a tiny random Llama and synthetic GSM8K-style rows, offline, in seconds: the test suite
runs it so the scripts cannot rot.

Under several processes (`accelerate launch`, DDP or FSDP2) rank 0 loads the model, compresses the base once and saves
it to `<output-dir>/base`, which the other ranks load instead of the original model; after training, rank 0 alone
evaluates and exports from the saved super-adapter on a reloaded base (the sharded training model is never copied)
while the other ranks exit.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
from pathlib import Path
from typing import Any

import torch

from hf_elastic import (
    ElasticLoraConfig,
    NASTrainer,
    NASTrainingArguments,
    NLSConfig,
    QuantizationConfig,
    export_subnetwork,
    get_supernet,
    load_exported,
    load_super_network,
    quantize,
    save_quantized,
    sparsify,
)
from hf_elastic.data import InstructionFormat, completion_collator, load_rows, prompts_and_answers, tokenize_rows
from hf_elastic.nas.memory import plan_memory
from hf_elastic.search import ExactMatchEvaluator, LMEvalEvaluator
from hf_elastic.tuners.methods import Method

GSM8K = InstructionFormat(template="Question: {question}\nAnswer: {answer}", response_template="Answer:")
# Modules each architecture exposes to LoRA (Phi-3 fuses q/k/v and gate/up).
TARGETS = {
    "phi3": ["qkv_proj", "gate_up_proj", "down_proj"],
    "default": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
}


def parse_args(method: Method, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"{method.name}: {method.paper.title}")
    parser.add_argument("--model", default=method.recipe.base_model, help="Hub id or folder of the base model")
    parser.add_argument("--data", default="openai/gsm8k", help="training data (Hub id or file)")
    parser.add_argument("--data-config", default="main")
    parser.add_argument("--template", default=GSM8K.template, help="how a row reads, with {column} fields")
    parser.add_argument("--response-template", default=GSM8K.response_template, help="text before the answer")
    parser.add_argument("--output-dir", default=f"outputs/{method.name}")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=128, help="calibration windows of --seq-len tokens")
    parser.add_argument("--eval-limit", type=int, default=None, help="GSM8K test rows for lm-eval (default: all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--gpu-memory",
        default=None,
        help="memory of one GPU, e.g. 24GB (default: the GPU's own); hf_elastic.nas.memory.plan_memory picks the "
        "micro-batch, accumulation and gradient checkpointing that fit it at the recipe's effective batch",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random model and synthetic rows, offline, CPU")
    return parser.parse_args(argv)


def synthetic_rows(n: int, seed: int) -> list[dict[str, str]]:
    """GSM8K-shaped rows: a question and a worked answer ending in `#### <number>`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"})
    return rows


def tiny_model_and_tokenizer(rows: list[dict[str, str]]) -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([f"{r['question']} {r['answer']}" for r in rows], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def peft_config(method: Method, model_type: str) -> NLSConfig:
    recipe = method.recipe
    targets = TARGETS.get(model_type, TARGETS["default"]) + list(recipe.extra_targets)
    groups = [["q_proj", "k_proj", "v_proj"]] if recipe.group_qkv and "q_proj" in targets else None
    common = {
        "rank_choices": list(recipe.rank_choices),
        "rank_groups": groups,
        "target_modules": targets,
        "lora_alpha": recipe.lora_alpha,
        "lora_dropout": recipe.lora_dropout,
        "sparse_adapter": method.sparse_adapter,
        "quantization_aware": method.quantization_aware,
        "task_type": "CAUSAL_LM",
    }
    if method.elastic_method == "elastic_lora":
        return ElasticLoraConfig(ffn_width_choices=list(recipe.ffn_width_choices), head_choices=[1.0], **common)
    return NLSConfig(**common)


def compress(
    method: Method, model: Any, tokenizer: Any, train_rows: Any, fmt: InstructionFormat, args: Any, group_size: int
) -> dict[str, Any]:
    """Sparsify and quantize `model` in place as `method` asks; returns what the summary records of it."""
    # rows are read until --calibration-samples windows of --seq-len tokens are full
    calibration = train_rows.map(
        lambda row: {"text": fmt.template.format(**row)}, remove_columns=train_rows.column_names
    )
    summary: dict[str, Any] = {}
    if method.base_sparsity:
        report = sparsify(
            model,
            sparsity=method.base_sparsity,
            calibration=calibration,
            tokenizer=tokenizer,
            seq_len=args.seq_len,
            num_samples=args.calibration_samples,
        )
        summary["base_sparsity"] = report.total_sparsity
    if method.base_bits:
        gptq = QuantizationConfig(
            bits=method.base_bits,
            group_size=group_size,
            method="gptq",
            seq_len=args.seq_len,
            num_samples=args.calibration_samples,
            keep_residual=method.quantization_aware,
        )
        quantize(model, gptq, calibration=calibration, tokenizer=tokenizer)
        summary["base_bits"] = method.base_bits
    return summary


def run(method: Method, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe of `method` end to end and return (and write) a summary of what it produced."""
    from datasets import Dataset

    from hf_elastic.models.loading import load_causal_lm, load_tokenizer

    args = parse_args(method, argv)
    recipe = method.recipe
    fmt = InstructionFormat(template=args.template, response_template=args.response_template)
    out = Path(args.output_dir)
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available() and not args.tiny
    checkpointing = False
    if args.tiny:
        train_rows, test_rows = Dataset.from_list(synthetic_rows(64, 0)), Dataset.from_list(synthetic_rows(8, 1))
        model, tokenizer = tiny_model_and_tokenizer(list(train_rows))
        args.seq_len, group_size, epochs, batch, accumulation, warmup = 48, 16, 1.0, 8, 1, 0
        args.calibration_samples = min(args.calibration_samples, 32)  # the synthetic rows hold 42 windows
    else:
        train_rows = load_rows(args.data, config=args.data_config, split="train")
        test_rows = None
        model = None  # loaded below, once the ranks are known: with a compressed base only rank 0 needs it
        tokenizer = load_tokenizer(args.model)
        group_size, epochs = 128, recipe.epochs
        batch, accumulation, warmup = recipe.batch_size, recipe.gradient_accumulation, recipe.warmup_steps
        if cuda:
            memory = args.gpu_memory or torch.cuda.get_device_properties(0).total_memory / 2**30
            plan = plan_memory(args.model, method.demo_name, seq_len=args.seq_len, gpu_memory=memory)
            if plan.chosen is None:
                raise SystemExit(f"{method.name} does not fit {memory} GiB at any setting:\n{plan}")
            batch, accumulation = plan.chosen.micro_batch, plan.chosen.accumulation
            checkpointing = plan.chosen.checkpointing
            print(plan)
    training = NASTrainingArguments(
        output_dir=str(out / "super-adapter"),
        num_train_epochs=epochs,
        learning_rate=recipe.learning_rate,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        gradient_checkpointing=checkpointing,
        warmup_steps=warmup,
        lr_scheduler_type="linear",
        bf16=cuda,
        logging_steps=20,
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        seed=args.seed,
        use_cpu=not cuda,
        disable_tqdm=args.tiny,
    )
    summary: dict[str, Any] = {
        "recipe": method.name,
        "paper": method.paper.title,
        "model": "tiny" if args.tiny else args.model,
    }
    saved_base = out / "base" if method.base_sparsity or method.base_bits or args.tiny else None
    device, dtype = training.device, torch.bfloat16 if cuda else torch.float32
    if model is None and (training.process_index == 0 or saved_base is None or training.world_size == 1):
        model = load_causal_lm(args.model, dtype=dtype).to(device)

    def load_base() -> Any:
        if saved_base is None:
            return load_causal_lm(args.model, dtype=dtype).to(device)
        return load_exported(saved_base, dtype=None if method.base_bits else dtype).to(device)

    if training.world_size == 1:
        summary |= compress(method, model, tokenizer, train_rows, fmt, args, group_size)
    elif saved_base is not None:  # compressed once, on rank 0; the others wait and load what it saved
        with training.main_process_first(local=False, desc="compress the base"):
            if training.process_index == 0:
                summary |= compress(method, model, tokenizer, train_rows, fmt, args, group_size)
                if method.base_bits:
                    save_quantized(model, saved_base, tokenizer=tokenizer)
                else:
                    model.save_pretrained(saved_base)
            else:
                model = load_base()
    config = peft_config(method, model.config.model_type)
    from peft import get_peft_model

    model = get_peft_model(model, config)
    supernet = get_supernet(model)
    if recipe.ffn_width_choices:
        supernet.reorder_channels("magnitude")
    train = tokenize_rows(train_rows, tokenizer, args.seq_len, fmt)
    trainer = NASTrainer(model=model, args=training, train_dataset=train, data_collator=completion_collator(tokenizer))
    summary["train_loss"] = trainer.train().training_loss
    trainer.save_model(str(out / "super-adapter"))
    if training.world_size > 1:
        # the trained weights are split over the ranks (FSDP2): rank 0 goes on from the saved super-adapter
        if training.process_index != 0:
            return summary
        del trainer, model, supernet
        gc.collect()
        supernet = get_supernet(load_super_network(load_base(), out / "super-adapter", strict=True))
    tokenizer.save_pretrained(out / "super-adapter")

    supernet.activate("median")  # the Shears/SQFT heuristic sub-network
    if args.tiny:
        prompts, answers = prompts_and_answers(test_rows, fmt, tokenizer)
        evaluator = ExactMatchEvaluator(prompts, answers, tokenizer, max_new_tokens=12)
    else:
        metric = "exact_match,strict-match"
        evaluator = LMEvalEvaluator(["gsm8k"], tokenizer, metric, limit=args.eval_limit, batch_size=8)
    heuristic = supernet.active_config
    summary["heuristic"] = {"config": heuristic, evaluator.name: evaluator(supernet, heuristic)}
    summary["heuristic"]["params"] = supernet.count(heuristic)["params"]
    if method.sparse_adapter or recipe.ffn_width_choices:
        merged = export_subnetwork(supernet, "median", out / "merged", tokenizer=tokenizer, overwrite=True)
        summary["export"] = str(merged)
    else:  # a dense adapter does not merge into a sparse or INT4 base exactly: ship base + plain LoRA adapter
        summary["export"] = str(supernet.extract_adapter("median", out / "heuristic-adapter"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return summary
