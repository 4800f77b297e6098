"""SparsePEFT and QA-SparsePEFT training cost against plain peft LoRA on the same 50 %-sparse base.

Variants (fresh subprocess each, rounds interleaved, medians):
- `lora`: peft LoRA on the sparse fp32 base (the baseline);
- `sparsepeft`: NLSConfig with one rank and `sparse_adapter=True` (plain LoRA + SparsePEFT);
- `sparsepeft_nls`: the same with rank choices [32, 24, 16], a random rank per module and step;
- `qa_sparsepeft`: INT4 base (RTN, asymmetric, group 32, rounding residual kept) with `sparse_adapter` and
  `quantization_aware`;
- `lora_dequant`: peft LoRA on the dequantized INT4 base, fp32 (what QA-SparsePEFT replaces).
Writes benchmarks/results/<machine>/sparse_peft.json.
"""

from __future__ import annotations

from common import MODEL_KWARGS, TARGETS, step_benchmark_main, time_training

VARIANTS = ("lora", "sparsepeft", "sparsepeft_nls", "qa_sparsepeft", "lora_dequant")


def run_variant(variant: str, steps: int, warmup: int, seq_len: int, batch_size: int) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import NLSConfig, QuantLinear, get_supernet, quantize, sparsify

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS))
    sparsify(model, method="magnitude", sparsity=0.5, show_progress=False)
    if variant in ("qa_sparsepeft", "lora_dequant"):
        quantize(model, bits=4, group_size=32, keep_residual=variant == "qa_sparsepeft", show_progress=False)
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
    info = {"adapters": "r=32 on q,k,v,o,gate,up,down", "base": "50 % magnitude-pruned"}
    step_benchmark_main(__doc__, __file__, VARIANTS, run_variant, "sparse_peft.json", "lora", info, rounds=3, steps=6)


if __name__ == "__main__":
    main()
