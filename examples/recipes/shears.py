"""Shears (Muñoz et al., NAACL 2024 industry): Wanda-sparsified base plus an elastic-rank (NLS) adapter.

Published settings (LLaMA-7B, unified math, 50 % unstructured Wanda): LoRA r=32 with rank choices 32/24/16, alpha 64,
dropout 0.1 on q/k/v/up/gate/down, lr 3e-4, 3 epochs, batch 4 x 4, 100 warm-up steps. The adapter is not masked, so
it ships unmerged beside the sparse base (SQFT's SparsePEFT is the mergeable variant).
"""

from recipe import run

from hf_elastic.tuners.methods import METHODS

SHEARS = METHODS["shears"]  # settings, flags and card text: the registry

if __name__ == "__main__":
    run(SHEARS)
