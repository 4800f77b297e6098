"""SQFT + SparsePEFT (Muñoz et al., EMNLP 2024 findings): sparse base, NLS adapter masked by the base's zeros.

Published settings (Llama-3-8B, GSM8K, 50 % Wanda): LoRA r=32, rank choices 32/28/24/20/16 with q/k/v sharing one
rank, alpha 64, dropout 0.1 on q/k/v/up/down, lr 3e-4, 3 epochs, batch 16, 100 warm-up steps. The heuristic
sub-network merges into the base and keeps every zero.
"""

from recipe import run

from hf_elastic.tuners.methods import METHODS

SQFT_SPARSEPEFT = METHODS["sqft-sparsepeft"]  # settings, flags and card text: the registry

if __name__ == "__main__":
    run(SQFT_SPARSEPEFT)
