"""Sub-network search: NSGA-II against random search at the same number of evaluations, on a trained super-network.

A small random-init Llama is first trained on synthetic Markov-chain text (so that narrowing it costs loss), then
trained as an ElasticLoraConfig super-network (elastic ranks, FFN width and heads) with NASTrainer. Random and NSGA-II
then search (loss, params) with the same budget of distinct evaluations, for several seeds, and `strategy="predictor"`
with half that budget (issue 25's goal: at least NSGA-II's hypervolume with half the evaluations).

Hypervolume: objectives are normalized with the ideal point (best loss and params seen in any run) and the reference
point (worst loss and params seen in any run, times 1.1), both pooled over every run of both strategies, so the
normalized hypervolume is in [0, 1] and comparable across runs. The heuristic sub-networks (max, min, median,
loss_based, activation_based) are evaluated separately and are not part of either strategy's hypervolume.
Prints a table and writes benchmarks/results/<machine>/search.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import TARGETS, write_result

MODEL_KWARGS = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}
MODEL_TEXT = "Llama config: hidden 64, 4 layers, intermediate 176, 4 heads, vocab 256 (trained on Markov-chain text)"
SEQ_LEN = 32


def markov_data(n: int, seed: int, vocab: int = 256, successors: int = 4) -> torch.Tensor:
    """Token sequences from a fixed sparse Markov chain: every token has `successors` likely next tokens."""
    g = torch.Generator().manual_seed(1234)
    nexts = torch.randint(0, vocab, (vocab, successors), generator=g)
    probs = torch.softmax(torch.randn(vocab, successors, generator=g) * 2, -1)
    g = torch.Generator().manual_seed(seed)
    seqs = torch.empty(n, SEQ_LEN, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, SEQ_LEN):
        prev = seqs[:, t - 1]
        pick = torch.multinomial(probs[prev], 1, generator=g).squeeze(1)
        seqs[:, t] = nexts[prev, pick]
    return seqs


def build_supernet(pretrain_steps: int, nas_steps: int):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import ElasticLoraConfig, NASTrainer, NASTrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS))
    train = markov_data(2048, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    start = time.perf_counter()
    for step in range(pretrain_steps):
        ids = train[(step * 16) % len(train) :][:16]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pre-trained base: {pretrain_steps} steps, loss {loss.item():.3f}, {time.perf_counter() - start:.1f} s")

    config = ElasticLoraConfig(
        rank_choices=[16, 12, 8],
        lora_alpha=32,
        target_modules=TARGETS,
        rank_groups=[["q_proj", "k_proj", "v_proj"], ["o_proj"], ["up_proj", "gate_proj"], ["down_proj"]],
        ffn_width_choices=[1.0, 0.75, 0.5],
        head_choices=[1.0, 0.75, 0.5],
    )
    args = NASTrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        max_steps=nas_steps,
        learning_rate=3e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=10_000,
        sampling="uniform",
        seed=0,
    )
    data = Dataset.from_dict({"input_ids": train.tolist(), "labels": train.tolist()})
    start = time.perf_counter()
    trainer = NASTrainer(model=model, peft_config=config, args=args, train_dataset=data)
    trainer.supernet.reorder_channels("magnitude")
    trainer.train()
    print(
        f"NAS-trained super-network: {nas_steps} steps, {time.perf_counter() - start:.1f} s, {trainer.supernet.space}"
    )
    return trainer


def main() -> None:
    from hf_elastic import LossEvaluator, search_subnetworks
    from hf_elastic.search import hypervolume_2d

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--populations", type=int, nargs="+", default=[10, 20], help="the first is the headline")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--nas-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2-core machine is shared)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "search.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    trainer = build_supernet(args.pretrain_steps, args.nas_steps)
    supernet = trainer.supernet
    held_out = markov_data(32, seed=1)
    evaluator = LossEvaluator([{"input_ids": b, "labels": b} for b in held_out.split(16)])
    objectives = ("loss", "params")
    common = {"objectives": objectives, "progress": False}

    heuristics = search_subnetworks(
        supernet,
        evaluator,
        "activation_based",
        nas_stats=trainer.sampler.stats(),
        reference_subnets=("max", "min", "median", "loss_based"),
        **common,
    )

    half = args.budget // 2
    variants = {"random": {"strategy": "random", "budget": args.budget}}
    variants |= {
        f"nsga2_pop{p}": {"strategy": "nsga2", "population": p, "budget": args.budget} for p in args.populations
    }
    headline = f"nsga2_pop{args.populations[0]}"
    predicted = f"predictor_pop{args.populations[0]}_budget{half}"
    variants[predicted] = {"strategy": "predictor", "population": args.populations[0], "budget": half}
    runs: dict[str, list] = {v: [] for v in variants}
    for seed in range(args.seeds):
        for name, kwargs in variants.items():  # interleaved, so that machine load affects every variant alike
            result = search_subnetworks(supernet, evaluator, seed=seed, reference_subnets=(), **kwargs, **common)
            runs[name].append(result)
            print(
                f"seed {seed} {name:<12} {result.info['evaluations']} evaluations, {result.info['trials']} trials, "
                f"{result.info['wall_time_s']:.2f} s, front {len(result.front)}"
            )

    every = [e for results in runs.values() for r in results for e in r.valid]
    worst = [max(e.values[o] for e in every) for o in objectives]
    ideal = [min(e.values[o] for e in every) for o in objectives]

    def hypervolume(result, rule: str) -> float:
        if rule == "normalized":  # ideal -> 0, worst -> 1, reference point at 1.1
            points = [
                [(e.values[o] - lo) / (hi - lo) for o, lo, hi in zip(objectives, ideal, worst, strict=True)]
                for e in result.valid
            ]
            return hypervolume_2d(points, [1.1, 1.1])
        points = [[e.values[o] for o in objectives] for e in result.valid]  # raw units, reference 1.1 x worst
        return hypervolume_2d(points, [1.1 * w for w in worst])

    hv, ratios = {}, {}
    for rule in ("normalized", "raw_1.1x_worst"):
        hv[rule] = {name: [hypervolume(r, rule) for r in results] for name, results in runs.items()}
        ratios[rule] = {
            name: [a / b for a, b in zip(values, hv[rule]["random"], strict=True)]
            for name, values in hv[rule].items()
            if name != "random"
        }
    per_eval = {
        name: statistics.median(r.info["wall_time_s"] / r.info["evaluations"] for r in results)
        for name, results in runs.items()
    }

    def loss_under_70(result) -> float:
        try:
            return result.best_under("loss", "params", 0.7 * heuristics.reference_value("params")).values["loss"]
        except ValueError:  # no sub-network that small was evaluated
            return float("nan")

    under_70 = {name: statistics.median(loss_under_70(r) for r in results) for name, results in runs.items()}
    pooled_front = [e for r in runs[headline] for e in r.front]
    heuristic_rows = {}
    for e in heuristics.evaluations:
        dominated = any(
            all(f.values[o] <= e.values[o] for o in objectives) and any(f.values[o] < e.values[o] for o in objectives)
            for f in pooled_front
        )
        heuristic_rows["+".join(e.sources)] = {
            "loss": e.values["loss"],
            "params": e.values["params"],
            "dominated_by_nsga2": dominated,
        }

    print(
        f"\n{'variant':<14}{'HV median':>11}{'HV min':>9}{'HV max':>9}{'ratio med':>11}{'ms/eval':>9}{'loss@70%':>10}"
    )
    for name in runs:
        values = hv["normalized"][name]
        ratio = statistics.median(ratios["normalized"][name]) if name != "random" else 1.0
        print(
            f"{name:<14}{statistics.median(values):>11.4f}{min(values):>9.4f}{max(values):>9.4f}{ratio:>11.3f}"
            f"{per_eval[name] * 1000:>9.1f}{under_70[name]:>10.4f}"
        )
    for rule in ratios:
        print(
            f"{rule} hypervolume ratio {headline} / random per seed: {[round(r, 3) for r in ratios[rule][headline]]}"
        )
    print(f"headline median ratio: {statistics.median(ratios['normalized'][headline]):.3f} (goal >= 1.1)")
    vs_nsga2 = {rule: [a / b for a, b in zip(by[predicted], by[headline], strict=True)] for rule, by in hv.items()}
    predictors = [r.info.get("predictor", {}) for r in runs[predicted]]
    print(
        f"{predicted} / {headline} hypervolume per seed (half the evaluations; goal >= 1): "
        f"{[round(r, 3) for r in vs_nsga2['normalized']]}"
    )
    print("\nheuristics: loss, params, dominated by a point of the NSGA-II fronts")
    for name, row in heuristic_rows.items():
        print(f"  {name:<28}{row['loss']:>8.4f}{row['params']:>10.0f}  {row['dominated_by_nsga2']}")

    result = {
        "benchmark": "search",
        "model": MODEL_TEXT,
        "super_network": (
            f"ElasticLoraConfig rank [16, 12, 8] in 4 groups/layer, FFN [1.0, 0.75, 0.5], heads [1.0, 0.75, 0.5]; "
            f"{len(supernet.space)} dimensions, {supernet.space.num_configs} sub-networks; "
            f"{args.pretrain_steps} pre-training + {args.nas_steps} NASTrainer steps (uniform)"
        ),
        "evaluation": "mean loss on 2 held-out batches of 16 x 32 tokens",
        "objectives": list(objectives),
        "budget": args.budget,
        "seeds": args.seeds,
        "headline": headline,
        "hypervolume_rules": {
            "normalized": "objectives mapped ideal -> 0 and worst -> 1 (pooled over all runs), reference (1.1, 1.1)",
            "raw_1.1x_worst": "raw objectives, reference = 1.1 x worst value seen in any run",
            "ideal": ideal,
            "worst": worst,
        },
        "hypervolume": hv,
        "hypervolume_median": {rule: {n: statistics.median(v) for n, v in by.items()} for rule, by in hv.items()},
        "hypervolume_ratio_vs_random": ratios,
        "hypervolume_ratio_median": {
            rule: {n: statistics.median(v) for n, v in by.items()} for rule, by in ratios.items()
        },
        "goal_ratio": 1.1,
        "wall_time_per_evaluation_s": per_eval,
        "front_sizes": {name: [len(r.front) for r in results] for name, results in runs.items()},
        "best_loss_under_70pct_max_params_median": under_70,
        "heuristics": heuristic_rows,
        "predictor_half_budget": {
            "variant": predicted,
            "budget": half,
            "hypervolume_ratio_vs_nsga2": vs_nsga2,
            "hypervolume_ratio_vs_nsga2_median": {rule: statistics.median(v) for rule, v in vs_nsga2.items()},
            "goal": f"{predicted} reaches {headline}'s hypervolume with half the evaluations (ratio >= 1)",
            "predictor_info": predictors,
        },
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
