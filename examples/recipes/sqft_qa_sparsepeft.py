"""SQFT + QA-SparsePEFT: sparse GPTQ INT4 base, adapter trained through the INT4 grid and merged onto it exactly.

Published settings (Llama-3-8B, GSM8K, 50 % Wanda, GPTQ INT4 group 128): as SQFT + SparsePEFT but 4 epochs. The
merged heuristic sub-network is INT4 again (same scales and zero points) and keeps every zero. LoRA dropout is 0:
the adapter acts on the weights through the grid, not on the inputs.
"""

from recipe import Recipe, run

SQFT_QA_SPARSEPEFT = Recipe(
    name="sqft-qa-sparsepeft",
    paper="SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models",
    sparsity=0.5,
    gptq_bits=4,
    sparse_adapter=True,
    quantization_aware=True,
    lora_dropout=0.0,  # hf-elastic computes Q(W + M*sBA) in one pass, which has no place for input dropout
    epochs=4,
)

if __name__ == "__main__":
    run(SQFT_QA_SPARSEPEFT)
