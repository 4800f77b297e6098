"""LoNAS (Muñoz et al., LREC-COLING 2024): elastic LoRA ranks plus elastic FFN width of the base model.

Published settings (LLaMA-7B, unified math): LoRA r=32 (choices 32/28), alpha 64, dropout 0.1 on q/k/v/up/gate/down,
FFN widths 100/87.5/75/62.5/50 %, lr 3e-4, 8 epochs, batch 4 x 4 accumulation, 100 warm-up steps. Here the data
default is GSM8K and the base Llama-3-8B; `--model` and `--data` change them. `--tiny` runs offline in seconds.
"""

from recipe import Recipe, run

LONAS = Recipe(
    name="lonas",
    paper="LoNAS: Elastic Low-Rank Adapters for Efficient Large Language Models",
    rank_choices=[32, 28],
    group_qkv=True,
    ffn_width_choices=[1.0, 0.875, 0.75, 0.625, 0.5],
    extra_targets=["gate_proj"],
    epochs=8,
    batch_size=4,
    gradient_accumulation=4,
)

if __name__ == "__main__":
    run(LONAS)
