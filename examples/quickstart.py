"""Train a small elastic-LoRA super-network for a few steps, then pick, measure and extract sub-networks.

Runs offline on CPU in seconds with a small random Llama model; the full pipeline on a real model arrives with the
`hf-elastic demo` command.
"""

from __future__ import annotations

import argparse
import copy
import random
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_elastic import ElasticLoraConfig, get_supernet, load_super_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output_dir)
    torch.manual_seed(args.seed)

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base = LlamaForCausalLM(config)
    pristine = copy.deepcopy(base)
    peft_config = ElasticLoraConfig(
        rank_choices=[16, 12, 8],
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "down_proj"],
        rank_groups=[["q_proj", "k_proj", "v_proj"], ["up_proj", "gate_proj"], ["down_proj"]],
        ffn_width_choices=[1.0, 0.75, 0.5],
        head_choices=[1.0, 0.5],
        lora_alpha=32,
    )
    model = get_peft_model(base, peft_config)
    supernet = get_supernet(model)
    supernet.reorder_channels("magnitude")
    print(f"search space: {supernet.space}")

    # A toy task: continue a repeating pattern of tokens.
    data = torch.arange(16).repeat(8, 4) % config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rng = random.Random(args.seed)
    model.train()
    for step in range(args.steps):
        supernet.sample(rng)
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(out / "super-adapter")

    print(f"\n{'sub-network':<12}{'loss':>10}{'params':>12}{'MACs/token':>12}")
    for name in ("max", "median", "min"):
        supernet.activate(name)
        with torch.no_grad():
            loss = model(input_ids=data, labels=data).loss.item()
        counts = supernet.count()
        print(f"{name:<12}{loss:>10.4f}{counts['params']:>12,}{counts['macs']:>12,}")

    sliced = supernet.extract_model("min")
    sliced.save_pretrained(out / "min-merged")
    print(
        f"\nmin sub-network, merged and sliced: {sum(p.numel() for p in sliced.parameters()):,} parameters "
        f"(super-network base: {supernet.count('max')['base_params']:,}) -> {out / 'min-merged'}"
    )

    rank_only = supernet.space.max_config() | {
        name: dim.median for name, dim in supernet.space.dimensions.items() if dim.kind == "rank"
    }
    supernet.extract_adapter(rank_only, out / "median-rank-adapter")
    supernet.activate(rank_only)
    stock = PeftModel.from_pretrained(copy.deepcopy(pristine), out / "median-rank-adapter").eval()
    with torch.no_grad():
        diff = (stock(input_ids=data).logits - model(input_ids=data).logits).abs().max().item()
    print(f"median-rank plain LoRA adapter -> {out / 'median-rank-adapter'}; stock peft vs super-network: {diff:.1e}")

    reloaded = load_super_network(copy.deepcopy(pristine), out / "super-adapter")
    get_supernet(reloaded).activate(rank_only)
    with torch.no_grad():
        diff = (reloaded(input_ids=data).logits - model(input_ids=data).logits).abs().max().item()
    print(f"reloaded super-network: {get_supernet(reloaded).space}; max abs diff {diff:.1e}")


if __name__ == "__main__":
    main()
