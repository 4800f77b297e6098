"""LoNAS (Muñoz et al., LREC-COLING 2024): elastic LoRA ranks plus elastic FFN width of the base model.

Published settings (LLaMA-7B, unified math): LoRA r=32 (choices 32/28), alpha 64, dropout 0.1 on q/k/v/up/gate/down,
FFN widths 100/87.5/75/62.5/50 %, lr 3e-4, 8 epochs, batch 4 x 4 accumulation, 100 warm-up steps. Here the data
default is GSM8K and the base Llama-3-8B; `--model` and `--data` change them. `--tiny` runs offline in seconds.
"""

from recipe import run

from hf_elastic.tuners.methods import METHODS

LONAS = METHODS["lonas"]  # settings, flags and card text: the registry

if __name__ == "__main__":
    run(LONAS)
