"""Search-time scoring of sparse INT4 (QA-SparsePEFT) sub-networks: the unmerged super-network against the merged
sub-network, side by side in one process.

A random search over a 50 %-sparse, INT4 (RTN, group 32, rounding residual) super-network scores each candidate's
eval loss on fixed batches; `unmerged` runs the adapters' grid maths on every forward, `merged` writes each
candidate's codes into the base once (`hf_elastic.search.searcher.merged_subnetwork`) and restores them after.
Rounds alternate the two. Writes benchmarks/results/<machine>/search_scoring.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, TARGETS, write_result

MODES = ("unmerged", "merged")


def build(seed: int = 0):
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import NLSConfig, get_supernet, quantize, sparsify

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS))
    sparsify(model, method="magnitude", sparsity=0.5, show_progress=False)
    quantize(model, bits=4, group_size=32, keep_residual=True, show_progress=False)
    config = NLSConfig(
        rank_choices=[32, 24, 16], lora_alpha=64, target_modules=TARGETS, sparse_adapter=True, quantization_aware=True
    )
    model = get_peft_model(model, config)
    with torch.no_grad():  # a trained-looking adapter: B is not zero, so codes move
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return get_supernet(model)


def score(supernet, batches, budget: int, seed: int, merge: bool) -> tuple[float, list[float]]:
    """Seconds of a random search of `budget` candidates scored by eval loss, and the losses."""
    from hf_elastic import LossEvaluator, SearchConfig
    from hf_elastic.search.searcher import SubnetSearch

    config = SearchConfig(strategy="random", budget=budget, seed=seed, reference_subnets=(), progress=False)
    search = SubnetSearch(supernet, [LossEvaluator(batches)], config)
    search._merge = merge
    start = time.perf_counter()
    result = search.run()
    return time.perf_counter() - start, [e.values["loss"] for e in result.evaluations]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=6, help="candidates per search")
    parser.add_argument("--batches", type=int, default=8, help="eval batches per candidate")
    parser.add_argument(
        "--shapes", default="1x64,4x128", help="eval batch shapes, batch x tokens, comma-separated (each in one run)"
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "search_scoring.json"))
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    supernet = build()
    g = torch.Generator().manual_seed(1)
    results = {}
    for batch_size, seq_len in shapes:
        batches = []
        for _ in range(args.batches):
            ids = torch.randint(0, MODEL_KWARGS["vocab_size"], (batch_size, seq_len), generator=g)
            batches.append({"input_ids": ids, "labels": ids})
        score(supernet, batches[:1], 1, 99, True)  # warm-up
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        losses: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for mode in MODES:
                seconds, values = score(supernet, batches, args.budget, seed=r, merge=mode == "merged")
                runs[mode].append(seconds / args.budget)
                losses.setdefault(mode, []).extend(values)
                print(
                    f"{batch_size}x{seq_len} round {r + 1}/{args.rounds} {mode:<9} "
                    f"{seconds / args.budget * 1e3:8.1f} ms"
                )
        median = {m: statistics.median(v) for m, v in runs.items()}
        diff = max(abs(a - b) for a, b in zip(losses["unmerged"], losses["merged"], strict=True))
        results[f"{batch_size}x{seq_len}"] = {
            "seconds_per_candidate": median,
            "speedup_merged": median["unmerged"] / median["merged"],
            "max_loss_difference": diff,
            "runs": runs,
        }
    print(f"\n{'eval batch':<12}{'unmerged ms':>13}{'merged ms':>11}{'speed-up':>10}{'max |dloss|':>13}")
    for shape, r in results.items():
        t = r["seconds_per_candidate"]
        print(
            f"{shape:<12}{t['unmerged'] * 1e3:>13.1f}{t['merged'] * 1e3:>11.1f}{r['speedup_merged']:>10.2f}"
            f"{r['max_loss_difference']:>13.1e}"
        )
    write_result(
        args.output,
        {
            "benchmark": "search_scoring",
            "model": MODEL_TEXT,
            "base": "50 % magnitude-pruned, INT4 RTN group 32 with rounding residual",
            "adapters": "QA-SparsePEFT, rank choices [32, 24, 16] on q,k,v,o,gate,up,down",
            "eval_batches_per_candidate": args.batches,
            "candidates_per_search": args.budget,
            "rounds": args.rounds,
            "by_eval_batch": results,
        },
    )


if __name__ == "__main__":
    main()
