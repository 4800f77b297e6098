"""SQFT + QA-SparsePEFT: sparse GPTQ INT4 base, adapter trained through the INT4 grid and merged onto it exactly.

Published settings (Llama-3-8B, GSM8K, 50 % Wanda, GPTQ INT4 group 128): as SQFT + SparsePEFT but 4 epochs. The
merged heuristic sub-network is INT4 again (same scales and zero points) and keeps every zero. LoRA dropout is 0:
the adapter acts on the weights through the grid, not on the inputs.
"""

from recipe import run

from hf_elastic.tuners.methods import METHODS

SQFT_QA_SPARSEPEFT = METHODS["sqft-qa-sparsepeft"]  # settings, flags and card text: the registry

if __name__ == "__main__":
    run(SQFT_QA_SPARSEPEFT)
