"""`hf-elastic plan`: the memory each stage of a method needs, from the model's config alone (no weights)."""

from __future__ import annotations

import argparse
from typing import Any


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `plan` command to the `hf-elastic` subparsers."""
    from ..nas.memory import METHODS

    p = subparsers.add_parser(
        "plan",
        help="estimate peak GPU memory and host RAM per stage, and the training settings that fit",
        description="Peak GPU memory and host RAM of each stage (sparsify, quantize, train, search, export, OpenVINO) "
        "of a method, from the model's config alone (built on the meta device), and the training settings (micro-"
        "batch x accumulation, gradient checkpointing) that keep the effective batch and fit --gpu-memory.",
    )
    p.add_argument("model", help="a model folder, its config.json, or a Hub id (only config.json is read)")
    p.add_argument("--method", choices=METHODS, required=True, help="the recipe whose settings are planned")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training row and calibration window")
    p.add_argument("--batch-size", type=int, default=None, help="effective batch (default: the recipe's)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs, each with the whole model")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 48GB, 24GB")
    p.add_argument("--dtype", default="bfloat16", help="the model's dtype (bfloat16 trains under autocast)")
    p.add_argument("--calibration-samples", type=int, default=128, help="Wanda/GPTQ windows of --seq-len tokens")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> None:
    from ..nas.memory import plan_memory

    plan = plan_memory(
        args.model,
        args.method,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        gpus=args.gpus,
        gpu_memory=args.gpu_memory,
        dtype=args.dtype,
        calibration_samples=args.calibration_samples,
    )
    print(plan.table())
