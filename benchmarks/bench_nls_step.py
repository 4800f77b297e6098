"""Training step time and peak memory: NLS (elastic rank) against plain peft LoRA on the same model.

Each (variant, round) runs in a fresh subprocess so peak RSS is per variant; rounds interleave the variants and the
figures are medians over rounds. Prints a table and writes benchmarks/results/nls_step.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, TARGETS, run_interleaved, summarize, time_training, write_result

VARIANTS = ("lora", "nls_max", "nls_uniform")


def run_variant(variant: str, steps: int, warmup: int, seq_len: int, batch_size: int) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import NLSConfig, get_supernet

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS))
    if variant == "lora":
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS))
        return time_training(model, steps, warmup, seq_len, batch_size)
    model = get_peft_model(model, NLSConfig(rank_choices=[32, 24, 16], lora_alpha=64, target_modules=TARGETS))
    supernet, rng = get_supernet(model), random.Random(0)
    sample = (lambda: supernet.sample(rng)) if variant == "nls_uniform" else None
    return time_training(model, steps, warmup, seq_len, batch_size, sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "nls_step.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.steps, args.warmup, args.seq_len, args.batch_size)))
        return

    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len)]
    runs = run_interleaved(__file__, VARIANTS, args.rounds, [*extra, "--batch-size", str(args.batch_size)])
    summary, ratios = summarize(runs, "lora")
    result = {
        "benchmark": "nls_step",
        "model": MODEL_TEXT,
        "batch": [args.batch_size, args.seq_len],
        "adapters": "r=32 on q,k,v,o,gate,up,down; NLS rank_choices [32, 24, 16], one rank per module",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median": summary,
        "ratio_vs_lora": ratios,
        "runs": runs,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
