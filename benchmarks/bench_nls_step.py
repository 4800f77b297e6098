"""Training step time and peak memory: NLS (elastic rank) against plain peft LoRA on the same model.

Each (variant, round) runs in a fresh subprocess so peak RSS is per variant; rounds interleave the variants and the
figures are medians over rounds. Prints a table and writes benchmarks/results/<machine>/nls_step.json.
"""

from __future__ import annotations

from common import MODEL_KWARGS, TARGETS, step_benchmark_main, time_training

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
    info = {"adapters": "r=32 on q,k,v,o,gate,up,down; NLS rank_choices [32, 24, 16], one rank per module"}
    step_benchmark_main(__doc__, __file__, VARIANTS, run_variant, "nls_step.json", "lora", info, rounds=5, steps=8)


if __name__ == "__main__":
    main()
