"""Training step time and peak GPU memory of NLS, SparsePEFT and QA-SparsePEFT against plain peft LoRA (and QLoRA).

A random 1B-shaped Llama (hidden 2048, 16 layers, intermediate 5632, 32 heads, 4 key/value heads, vocab 32000; built
from a config, nothing downloaded) in bf16, trained under bf16 autocast with AdamW, batch 4 x 512, adapters of rank 16
on every linear layer of the transformer layers. Variants:
- `lora`: peft LoRA on the 50 %-sparse base (the baseline);
- `nls`: NLSConfig with rank choices [16, 12, 8], a random sub-network per step;
- `sparsepeft`: NLSConfig rank 16 with `sparse_adapter=True` on the 50 %-sparse base;
- `qa_sparsepeft`: `quantization_aware=True` on the INT4 base (RTN, group 128, rounding residual kept);
- `qlora`: peft LoRA on a bitsandbytes NF4 base with bf16 compute (the row is skipped, with the reason, when
  bitsandbytes does not import or is not on CUDA).
Each (round, variant) builds its model afresh so that only it is resident; rounds interleave the variants and the
figures are medians. Peak memory is `torch.cuda.max_memory_allocated` over the timed steps, printed next to what the
memory planner (`hf_elastic.nas.memory.plan_memory`) predicts for the same step. Prints a table and writes
benchmarks/results/<machine>/gpu_step.json. `--device cpu --tiny` is a smoke run on a small model (no memory figures).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TARGETS, cpu_info, summarize, write_result

MODEL_1B = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
MODEL_TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
VARIANTS = ("lora", "nls", "sparsepeft", "qa_sparsepeft", "qlora")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def qlora_skip_reason(device: torch.device) -> str | None:
    """Why the QLoRA row cannot run here, or None."""
    if device.type != "cuda":
        return "bitsandbytes 4-bit layers need a CUDA device"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # a broken CUDA setup raises more than ImportError
        return f"bitsandbytes does not import: {err}"
    return None


def sparse_base(model_kwargs: dict, device: torch.device):
    """The random Llama in bf16 on `device`, 50 % magnitude-pruned inside the transformer layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import sparsify

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**model_kwargs)).to(torch.bfloat16)
    sparsify(model, method="magnitude", sparsity=0.5, show_progress=False)
    return model


def qlora_model(model, rank: int, workdir: Path):
    """peft LoRA on the same weights loaded as bitsandbytes NF4 (bf16 compute)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model.save_pretrained(workdir)
    device = model.device.index if model.device.index is not None else torch.cuda.current_device()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = LlamaForCausalLM.from_pretrained(
        workdir, quantization_config=config, dtype=torch.bfloat16, device_map={"": device}
    )
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))


def build(variant: str, model_kwargs: dict, device: torch.device, rank: int, group_size: int, workdir: Path):
    """The model of `variant` and the function to call before each step (a sub-network draw for NLS)."""
    from peft import LoraConfig, get_peft_model

    from hf_elastic import NLSConfig, get_supernet, quantize

    model = sparse_base(model_kwargs, device)
    if variant == "qlora":
        return qlora_model(model, rank, workdir), None
    if variant == "lora":
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)), None
    if variant == "qa_sparsepeft":
        quantize(model, bits=4, group_size=group_size, keep_residual=True, show_progress=False)
    choices = [rank, rank * 3 // 4, rank // 2] if variant == "nls" else [rank]
    config = NLSConfig(
        rank_choices=choices, lora_alpha=2 * rank, target_modules=TARGETS, sparse_adapter=variant != "nls",
        quantization_aware=variant == "qa_sparsepeft",
    )  # fmt: skip
    model = get_peft_model(model, config)
    if variant != "nls":
        return model, None
    supernet, rng = get_supernet(model), random.Random(0)
    return model, lambda: supernet.sample(rng)


def measure(variant: str, args: argparse.Namespace, model_kwargs: dict, device: torch.device) -> dict:
    """Median step time of `variant` (forward + backward + AdamW under bf16 autocast) and its peak memory."""
    with tempfile.TemporaryDirectory() as workdir:
        model, before_step = build(variant, model_kwargs, device, args.rank, args.group_size, Path(workdir))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, model_kwargs["vocab_size"], (args.batch_size, args.seq_len), generator=g).to(device)
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        times = []
        for step in range(args.warmup + args.steps):
            synchronize(device)
            start = time.perf_counter()
            if before_step is not None:
                before_step()
            with torch.autocast(device.type, torch.bfloat16):
                loss = model(input_ids=data, labels=data).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        result = {"step_s": statistics.median(times), "peak_memory_mb": None, "model_memory_mb": None}
        if device.type == "cuda":
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            result["model_memory_mb"] = resident / 2**20
        result["trainable_params"] = sum(p.numel() for p in params)
        del model, optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def planned_memory_mb(variant: str, args: argparse.Namespace, model_kwargs: dict) -> float | None:
    """What `hf_elastic.nas.memory.plan_memory` predicts for the timed steps of `variant` (the GPU peak of training
    at micro-batch `--batch-size`, no accumulation, no checkpointing), so the first GPU run checks the planner."""
    from transformers import LlamaConfig

    from hf_elastic.nas.memory import MethodSettings, plan_memory

    if variant == "qlora":
        return None
    settings = MethodSettings(
        variant,
        sparsity=0.5,
        bits=4 if variant == "qa_sparsepeft" else None,
        group_size=args.group_size,
        sparse_adapter=variant in ("sparsepeft", "qa_sparsepeft"),
        quantization_aware=variant == "qa_sparsepeft",
        rank=args.rank,
        dropout=0.0,
        targets=tuple(TARGETS),
        batch_size=args.batch_size,
    )
    plan = plan_memory(LlamaConfig(**model_kwargs), settings, seq_len=args.seq_len, gpu_memory=1e6)
    step = next(o for o in plan.train_options if o.micro_batch == args.batch_size and not o.checkpointing)
    return step.device / 2**20


def machine(device: torch.device) -> dict:
    import peft
    import transformers

    info = {"transformers": transformers.__version__, "peft": peft.__version__, **cpu_info()}
    info |= {"gpu": None, "cuda": torch.version.cuda, "bitsandbytes": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a small model, one round of two steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per round (default 3, 1 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (2 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (32 with --tiny)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gpu_step.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "gpu_step.py measures CUDA training steps, but torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}). Run it on a machine with an NVIDIA GPU, or smoke-test it with --device cpu --tiny."
        )
    defaults = {"rounds": (3, 1), "steps": (10, 2), "warmup": (3, 1), "batch_size": (4, 2), "seq_len": (512, 32)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    model_kwargs = MODEL_TINY if args.tiny else MODEL_1B
    args.group_size = 32 if args.tiny else 128

    skipped = {}
    reason = qlora_skip_reason(device)
    variants = [v for v in VARIANTS if v != "qlora" or reason is None]
    if reason is not None:
        skipped["qlora"] = reason
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in list(runs):
            try:
                runs[variant].append(measure(variant, args, model_kwargs, device))
            except Exception as err:
                if variant != "qlora":
                    raise
                skipped["qlora"] = f"failed: {type(err).__name__}: {err}"  # bitsandbytes builds vary
                del runs["qlora"]
                continue
            last = runs[variant][-1]
            memory = "" if last["peak_memory_mb"] is None else f"  peak {last['peak_memory_mb']:9.1f} MB"
            step = f"step {last['step_s'] * 1000:8.1f} ms"
            print(f"round {r + 1}/{args.rounds} {variant:<14} {step}{memory}", flush=True)
    for variant, why in skipped.items():
        print(f"skipped {variant}: {why}")
    summary, ratios = summarize(runs, "lora", "peak_memory_mb", "peak GPU MB")
    planned = {v: planned_memory_mb(v, args, model_kwargs) for v in runs}
    for variant, mb in planned.items():
        peak = summary[variant].get("peak_memory_mb")
        if mb is not None and peak:
            print(f"{variant:<14} planned {mb:9.1f} MB, measured {peak:9.1f} MB ({peak / mb - 1:+.1%})")
    result = {
        "benchmark": "gpu_step",
        "model": ", ".join(f"{k} {v}" for k, v in model_kwargs.items()) + " (random Llama, bf16)",
        "device": device.type,
        "dtype": "bfloat16 weights, bf16 autocast",
        "batch": [args.batch_size, args.seq_len],
        "adapters": f"r={args.rank} on {','.join(TARGETS)}; NLS rank choices "
        f"[{args.rank}, {args.rank * 3 // 4}, {args.rank // 2}]; INT4 group {args.group_size}",
        "base": "50 % magnitude-pruned",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup_steps": args.warmup,
        "median": summary,
        "ratio_vs_lora": ratios,
        "planned_memory_mb": planned,
        "skipped": skipped,
        "runs": runs,
        "machine": machine(device),
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
