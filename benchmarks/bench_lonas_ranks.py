"""Rank against width in a trained LoNAS super-network: which sub-networks did its sampling actually train?

Loads the super-adapter that `hf-elastic demo` saved (`<output>/super-adapter`) onto SmolLM2-135M-Instruct and scores
the uniform sub-networks of every LoRA rank choice × every FFN width choice (all heads) on the fine-food test rows:
the demo's 200 and the 200 after them. Sandwich sampling with `sandwich_k=0` trains only the max and min
sub-networks, so a middle rank is trained only through the ranks it shares with them; the demo's "median" pick
(middle rank, middle width) shows whether that is enough. Writes benchmarks/results/<machine>/lonas_ranks.json.

    python bench_lonas_ranks.py --run outputs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the --output folder of a finished LoNAS demo run")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "lonas_ranks.json"))
    args = parser.parse_args()
    summary_file, adapter = args.run / "demo_results.json", args.run / "super-adapter"
    if not summary_file.is_file() or not adapter.is_dir():
        raise SystemExit(f"{args.run} has no demo_results.json or super-adapter/: pass a finished demo's --output.")
    demo = json.loads(summary_file.read_text())
    if demo["config"]["method"] != "lonas" or demo["config"].get("quick") or demo["config"].get("model_dir"):
        raise SystemExit(f"{summary_file} is not a default-size LoNAS demo run.")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_elastic.data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT, fit_rows, load_fine_foods
    from hf_elastic.demo.lonas import uniform_width_config
    from hf_elastic.models.offline import smollm2_dir
    from hf_elastic.nas import get_supernet, load_super_network
    from hf_elastic.search import LabelWordEvaluator

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_fine_foods()
    demo_rows, max_length = demo["config"]["test_rows"], demo["config"]["max_length"]

    def evaluator(start: int, stop: int) -> LabelWordEvaluator:
        rows = fit_rows(data["test"].select(range(start, stop)), tokenizer, max_length, FINE_FOODS_FORMAT)
        return LabelWordEvaluator.from_rows(rows, FINE_FOODS_ANSWERS, tokenizer, FINE_FOODS_FORMAT, batch_size=16)

    first, rest = evaluator(0, demo_rows), evaluator(demo_rows, len(data["test"]))
    n_a, n_b = len(first.prompts), len(rest.prompts)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    supernet = get_supernet(load_super_network(model, adapter, strict=True))

    def config(ffn: float, rank: int) -> dict[str, int]:
        c = uniform_width_config(supernet, ffn)
        return c | {d.name: rank for d in supernet.space if d.kind == "rank"}

    picks = {json.dumps(p["config"], sort_keys=True): name for name, p in demo["subnets"].items()}
    scores = {}
    with torch.inference_mode():
        for rank in demo["config"]["rank_choices"]:
            for ffn in demo["config"]["ffn_width_choices"]:
                start, c = time.perf_counter(), config(ffn, rank)
                supernet.activate(c)
                a, b = first(supernet, c), rest(supernet, c)
                key = f"r{rank}_ffn{round(100 * ffn)}"
                scores[key] = {
                    "rank": rank,
                    "ffn": ffn,
                    "demo_pick": picks.get(json.dumps(c, sort_keys=True)),
                    "accuracy_demo_rows": a,
                    "accuracy_all_rows": (a * n_a + b * n_b) / (n_a + n_b),
                }
                print(
                    f"rank {rank:>2} FFN {ffn:>4.0%}: {a:.3f} on the demo's {n_a} rows, "
                    f"{scores[key]['accuracy_all_rows']:.3f} on all {n_a + n_b} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    write_result(
        args.output,
        {
            "benchmark": "lonas_ranks",
            "run": {k: demo["config"][k] for k in ("sampling", "distillation", "seed", "train_steps", "reorder")},
            "rows": {"demo": n_a, "all": n_a + n_b},
            "scores": scores,
        },
    )


if __name__ == "__main__":
    main()
