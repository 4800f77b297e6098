"""Search-time scoring of LoNAS width sub-networks: the masked super-network against the extracted, physically sliced
copy (`SearchConfig(score_extracted=True)`), side by side in one process.

The demo's super-network (SmolLM2-135M-Instruct, elastic FFN width 100/75/62.5/50 %, LoRA rank 16 on q, k, v, up,
down; adapters trained for `--train-steps` uniform steps so that they are not zero) is scored by `SubnetSearch` on the
demo's validation rows (label-word accuracy, batches of 16) at every rung of the uniform-width ladder. Rounds
interleave the two modes; each candidate's time includes the extraction. Writes
benchmarks/results/<machine>/extracted_scoring.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import write_result

MODES = ("masked", "extracted")


def build(train_steps: int, val_rows: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_elastic.data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT, fit_rows, load_fine_foods
    from hf_elastic.demo.config import DemoConfig
    from hf_elastic.demo.lonas import lonas_trainer
    from hf_elastic.models.offline import smollm2_dir
    from hf_elastic.search.tasks import LabelWordEvaluator

    cfg = DemoConfig(output_dir=tempfile.mkdtemp(), train_steps=train_steps, sampling="uniform", reorder="none")
    torch.manual_seed(0)
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_fine_foods()
    rows = train_steps * cfg.batch_size
    train = fit_rows(data["train"].select(range(rows)), tokenizer, cfg.max_length, FINE_FOODS_FORMAT)
    val = fit_rows(data["train"].select(range(rows, rows + val_rows)), tokenizer, cfg.max_length, FINE_FOODS_FORMAT)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = lonas_trainer(cfg, model, tokenizer, train, Path(cfg.output_dir) / "train")
    trainer.train()
    evaluator = LabelWordEvaluator.from_rows(val, FINE_FOODS_ANSWERS, tokenizer, FINE_FOODS_FORMAT, batch_size=16)
    return trainer.supernet, evaluator


def score(supernet, evaluator, config: dict[str, int], extracted: bool) -> tuple[float, float]:
    """Seconds to score `config` in a one-candidate search, and its accuracy."""
    from hf_elastic import SearchConfig
    from hf_elastic.search.searcher import SubnetSearch

    search_config = SearchConfig(
        objectives=("accuracy", "params"), strategy="max", score_extracted=extracted, progress=False
    )
    search = SubnetSearch(supernet, [evaluator], search_config)
    start = time.perf_counter()
    evaluation, _ = search.evaluate(config, "benchmark")
    return time.perf_counter() - start, evaluation.values["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--val-rows", type=int, default=128)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "extracted_scoring.json"))
    args = parser.parse_args()
    supernet, evaluator = build(args.train_steps, args.val_rows)
    ladder = supernet.space.uniform_configs()
    ffn = [d for d in supernet.space if d.kind == "ffn"]
    names = [f"ffn_{100 * c[ffn[0].name] / max(ffn[0].choices):g}" for c in ladder]
    score(supernet, evaluator, ladder[-1], True)  # warm-up
    seconds: dict[str, dict[str, list[float]]] = {n: {m: [] for m in MODES} for n in names}
    accuracy: dict[str, dict[str, float]] = {n: {} for n in names}
    for r in range(args.rounds):
        for name, config in zip(names, ladder, strict=True):
            for mode in MODES:
                t, acc = score(supernet, evaluator, config, mode == "extracted")
                seconds[name][mode].append(t)
                accuracy[name][mode] = acc
                print(f"round {r + 1}/{args.rounds} {name:<10} {mode:<10} {t:6.1f} s  accuracy {acc:.3f}", flush=True)
    rows = {}
    for name in names:
        median = {m: statistics.median(seconds[name][m]) for m in MODES}
        rows[name] = {
            "seconds_per_candidate": median,
            "speedup": median["masked"] / median["extracted"],
            "accuracy": accuracy[name],
            "runs": seconds[name],
        }
    print(f"\n{'sub-network':<12}{'masked s':>10}{'extracted s':>13}{'speed-up':>10}{'accuracy':>18}")
    for name, row in rows.items():
        t, acc = row["seconds_per_candidate"], row["accuracy"]
        print(
            f"{name:<12}{t['masked']:>10.1f}{t['extracted']:>13.1f}{row['speedup']:>9.2f}x"
            f"{acc['masked']:>9.3f} /{acc['extracted']:.3f}"
        )
    write_result(
        args.output,
        {
            "benchmark": "extracted_scoring",
            "model": "SmolLM2-135M-Instruct, LoNAS FFN 100/75/62.5/50 %, LoRA rank 16 on q,k,v,up,down",
            "train_steps": args.train_steps,
            "val_rows": args.val_rows,
            "eval_batch": 16,
            "rounds": args.rounds,
            "by_subnetwork": rows,
        },
    )


if __name__ == "__main__":
    main()
