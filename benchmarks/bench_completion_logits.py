"""NASTrainer's training step on the demo's task with the logits at the completion tokens only (the default where the
loss is the model's own) against the logits at every position: step time and peak memory.

SmolLM2-135M (vocabulary 49,152) with the demo's LoNAS super-network on fine-food rows (prompt masked, answer-token
loss), sandwich sampling (max and min each step). Each (variant, round) runs in a fresh subprocess, rounds interleave
the variants, figures are medians. Writes benchmarks/results/<machine>/completion_logits.json.
"""

from __future__ import annotations

from common import DemoTask, step_benchmark_main, step_timer

VARIANTS = ("all_logits", "completion_logits")


def run_variant(variant: str, steps: int, warmup: int, seq_len: int, batch_size: int) -> dict:
    import resource
    import statistics
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from hf_elastic.demo.config import DemoConfig
    from hf_elastic.demo.lonas import lonas_trainer

    total = warmup + steps
    task = DemoTask.load(train_rows=total * batch_size, test_rows=1, seq_len=seq_len)
    cfg = DemoConfig(train_steps=2 * total, batch_size=batch_size, max_length=seq_len, reorder="none")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(task.model_dir, dtype=torch.float32)
    trainer = lonas_trainer(cfg, model, task.tokenizer, task.train, tempfile.mkdtemp())
    if not trainer.completion_logits_only:
        raise RuntimeError("NASTrainer does not compute the completion logits alone on SmolLM2: nothing to compare")
    trainer.completion_logits_only = variant == "completion_logits"
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(timer.times[warmup:]), "peak_rss_mb": peak}


def main() -> None:
    info = {
        "model": "SmolLM2-135M-Instruct (vocabulary 49,152), fp32",
        "adapters": "the demo's LoNAS super-network (rank 16 on q,k,v,up,down; FFN widths 1.0, 0.75, 0.625, 0.5)",
        "sampling": "sandwich (max and min sub-network: two forward-backward passes per step)",
        "data": "fine-food reviews, prompt masked (-100), loss on the answer tokens",
    }
    output = "completion_logits.json"
    step_benchmark_main(__doc__, __file__, VARIANTS, run_variant, output, "all_logits", info, steps=4)


if __name__ == "__main__":
    main()
