"""NASTrainer (uniform and sandwich k=2) against the stock Trainer with plain peft LoRA: step time and peak memory.

Same model, data and steps; each (variant, round) runs in its own subprocess, rounds interleave the variants, figures
are medians. Prints a table and writes benchmarks/results/<machine>/nas_trainer.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, TARGETS, run_interleaved, step_timer, summarize, write_result

VARIANTS = ("trainer_lora", "nas_uniform", "nas_sandwich2")


def run_variant(variant: str, steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_elastic import NASTrainer, NASTrainingArguments, NLSConfig

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_KWARGS)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (64, 128), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    common = {
        "output_dir": tempfile.mkdtemp(),
        "per_device_train_batch_size": 4,
        "max_steps": warmup + steps,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 1000,
    }
    timer = step_timer()
    if variant == "trainer_lora":
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS))
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[timer])
    else:
        sampling = "uniform" if variant == "nas_uniform" else "sandwich"
        peft_config = NLSConfig(rank_choices=[32, 24, 16], lora_alpha=64, target_modules=TARGETS)
        args = NASTrainingArguments(**common, sampling=sampling, sandwich_k=2)
        trainer = NASTrainer(model=model, peft_config=peft_config, args=args, train_dataset=data, callbacks=[timer])
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(timer.times[warmup:]), "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "nas_trainer.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.steps, args.warmup)))
        return

    runs = run_interleaved(__file__, VARIANTS, args.rounds, ["--steps", str(args.steps), "--warmup", str(args.warmup)])
    summary, ratios = summarize(runs, "trainer_lora")
    result = {
        "benchmark": "nas_trainer",
        "model": MODEL_TEXT,
        "batch": [4, 128],
        "adapters": "r=32 on q,k,v,o,gate,up,down; NLS rank_choices [32, 24, 16]",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median": summary,
        "ratio_vs_trainer_lora": ratios,
        "runs": runs,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
