"""Search-time scoring of sparse INT4 (QA-SparsePEFT) sub-networks: the unmerged super-network against the merged
sub-network, side by side in one process.

A random search over a 50 %-sparse, INT4 (RTN, group 32, rounding residual) super-network scores each candidate's
eval loss on fixed batches; `unmerged` runs the adapters' grid maths on every forward, `merged` writes each
candidate's codes into the base once (`hf_elastic.search.searcher.merged_subnetwork`) and restores them after.
With `--baseline-ref` (default: the commit before issue 22's fewer-bytes work, i.e. "today" when the issue was filed),
the same search also runs on that commit's hf_elastic, checked out in a temporary git worktree and scored in a
subprocess each round (the same process layout for every mode: a warm-up, then the timed search). Rounds interleave
the modes. Writes benchmarks/results/<machine>/search_scoring.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, TARGETS, checkout, commit_of, write_result

MODES = ("unmerged", "merged")
BASELINE_REF = "ea2ffe2^"  # main before "Fewer bytes per step": unmerged scoring as issue 22 found it


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
    search._merge = merge  # the baseline's SubnetSearch has no such switch and always scores unmerged
    start = time.perf_counter()
    result = search.run()
    return time.perf_counter() - start, [e.values["loss"] for e in result.evaluations]


def make_batches(shape: tuple[int, int], count: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1 + shape[0] * 1000 + shape[1])
    batches = []
    for _ in range(count):
        ids = torch.randint(0, MODEL_KWARGS["vocab_size"], shape, generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def worker(shape: tuple[int, int], count: int, budget: int, seed: int) -> None:
    """One timed unmerged search in this process (the baseline's hf_elastic is first on the path); prints JSON."""
    import hf_elastic

    supernet = build()
    batches = make_batches(shape, count)
    score(supernet, batches[:1], 1, 99, False)  # warm-up
    seconds, losses = score(supernet, batches, budget, seed, False)
    print(json.dumps({"seconds": seconds, "losses": losses, "hf_elastic": hf_elastic.__file__}))


def run_baseline(src: Path, shape: tuple[int, int], count: int, budget: int, seed: int) -> tuple[float, list[float]]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent)])}
    cmd = [sys.executable, __file__, "--worker", f"{shape[0]}x{shape[1]}", "--batches", str(count)]
    cmd += ["--budget", str(budget), "--seed", str(seed)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if not result["hf_elastic"].startswith(str(src)):
        raise RuntimeError(f"the baseline worker imported {result['hf_elastic']}, not the checkout in {src}")
    return result["seconds"], result["losses"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=6, help="candidates per search")
    parser.add_argument("--batches", type=int, default=8, help="eval batches per candidate")
    parser.add_argument(
        "--shapes", default="1x64,4x128", help="eval batch shapes, batch x tokens, comma-separated (each in one run)"
    )
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit scored as 'baseline' ('' to skip it)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "search_scoring.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(tuple(int(n) for n in args.worker.split("x")), args.batches, args.budget, args.seed)
        return
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(checkout(args.baseline_ref)) if args.baseline_ref else None
        results = measure(args, shapes, source)
    modes = list(next(iter(results.values()))["seconds_per_candidate"])
    print(f"\n{'eval batch':<12}" + "".join(f"{m + ' ms':>14}" for m in modes) + f"{'max |dloss|':>13}")
    for shape, r in results.items():
        t = r["seconds_per_candidate"]
        print(f"{shape:<12}" + "".join(f"{t[m] * 1e3:>14.1f}" for m in modes) + f"{r['max_loss_difference']:>13.1e}")
        print("  speed-ups: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedups"].items()))
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
            "baseline_ref": args.baseline_ref or None,
            "baseline_commit": commit_of(args.baseline_ref) if args.baseline_ref else None,
            "by_eval_batch": results,
        },
    )


def measure(args: argparse.Namespace, shapes: list[tuple[int, int]], source: Path | None) -> dict:
    """Seconds per candidate of each mode, interleaved per round, for every eval batch shape."""
    modes = list(MODES) + (["baseline"] if source is not None else [])
    supernet = build()
    results = {}
    for shape in shapes:
        batches = make_batches(shape, args.batches)
        score(supernet, batches[:1], 1, 99, True)  # warm-up
        runs: dict[str, list[float]] = {m: [] for m in modes}
        losses: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for mode in modes:
                if mode == "baseline":
                    seconds, values = run_baseline(source / "src", shape, args.batches, args.budget, r)
                else:
                    seconds, values = score(supernet, batches, args.budget, seed=r, merge=mode == "merged")
                runs[mode].append(seconds / args.budget)
                losses.setdefault(mode, []).extend(values)
                ms = seconds / args.budget * 1e3
                print(f"{shape[0]}x{shape[1]} round {r + 1}/{args.rounds} {mode:<9} {ms:8.1f} ms")
        median = {m: statistics.median(v) for m, v in runs.items()}
        diff = max(abs(a - b) for m in modes for a, b in zip(losses["unmerged"], losses[m], strict=True))
        speedups = {"merged_vs_unmerged": median["unmerged"] / median["merged"]}
        if "baseline" in median:
            speedups |= {
                "merged_vs_baseline": median["baseline"] / median["merged"],
                "unmerged_vs_baseline": median["baseline"] / median["unmerged"],
            }
        results[f"{shape[0]}x{shape[1]}"] = {
            "seconds_per_candidate": median,
            "speedups": speedups,
            "speedup_merged": speedups["merged_vs_unmerged"],
            "max_loss_difference": diff,
            "runs": runs,
        }
    return results


if __name__ == "__main__":
    main()
