"""SparsePEFT and QA-SparsePEFT training cost against plain peft LoRA on the same 50 %-sparse base.

Variants (fresh subprocess each, rounds interleaved, medians):
- `lora`: peft LoRA on the sparse fp32 base (the baseline);
- `sparsepeft`: NLSConfig with one rank and `sparse_adapter=True` (plain LoRA + SparsePEFT);
- `sparsepeft_nls`: the same with rank choices [32, 24, 16], a random rank per module and step;
- `qa_sparsepeft`: INT4 base (RTN, asymmetric, group 32) with `sparse_adapter` and `quantization_aware`;
- `lora_dequant`: peft LoRA on the dequantized INT4 base, fp32 (what QA-SparsePEFT replaces).
Writes benchmarks/results/sparse_peft.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, TARGETS, run_interleaved, summarize, time_training, write_result

VARIANTS = ("lora", "sparsepeft", "sparsepeft_nls", "qa_sparsepeft", "lora_dequant")


def run_variant(variant: str, steps: int, warmup: int, seq_len: int, batch_size: int) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import NLSConfig, get_supernet
    from hf_elastic.quantization import QuantLinear, quantize
    from hf_elastic.sparsity import sparsify

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS))
    sparsify(model, method="magnitude", sparsity=0.5, show_progress=False)
    if variant in ("qa_sparsepeft", "lora_dequant"):
        quantize(model, bits=4, group_size=32, show_progress=False)
    if variant == "lora_dequant":
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight.data = module.dequantize()
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, linear)
    if variant in ("lora", "lora_dequant"):
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS))
        return time_training(model, steps, warmup, seq_len, batch_size)
    choices = [32, 24, 16] if variant == "sparsepeft_nls" else [32]
    qa = variant == "qa_sparsepeft"
    config = NLSConfig(
        rank_choices=choices, lora_alpha=64, target_modules=TARGETS, sparse_adapter=True, quantization_aware=qa
    )
    model = get_peft_model(model, config)
    supernet, rng = get_supernet(model), random.Random(0)
    sample = (lambda: supernet.sample(rng)) if len(choices) > 1 else None
    return time_training(model, steps, warmup, seq_len, batch_size, sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "sparse_peft.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.steps, args.warmup, args.seq_len, args.batch_size)))
        return

    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len)]
    runs = run_interleaved(__file__, VARIANTS, args.rounds, [*extra, "--batch-size", str(args.batch_size)])
    summary, ratios = summarize(runs, "lora")
    result = {
        "benchmark": "sparse_peft",
        "model": MODEL_TEXT + ", 50 % magnitude-pruned",
        "batch": [args.batch_size, args.seq_len],
        "adapters": "r=32 on q,k,v,o,gate,up,down",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median": summary,
        "ratio_vs_lora": ratios,
        "runs": runs,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
