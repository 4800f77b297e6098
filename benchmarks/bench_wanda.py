"""One-shot compression time of the base model: Wanda and magnitude pruning, RTN and GPTQ INT4.

Every (round, variant) starts from a copy of the same random benchmark model and the same calibration tokens (random
ids); the figures are medians over rounds. INT4 uses group size 32 (1376 = 43 * 32). Besides the time, each variant
records the relative error of its logits against the dense model on held-out and on calibration tokens. Prints a
table and writes benchmarks/results/<machine>/wanda.json.

It runs on one torch thread by default: GPTQ's column loop and the pruning sorts are long chains of medium-sized ops,
and on a busy 2-core machine OpenMP synchronisation made the 2-thread runs up to 8x slower and very noisy.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, write_result

VARIANTS = {
    "magnitude_50": ("sparsify", {"method": "magnitude", "sparsity": 0.5}),
    "wanda_50": ("sparsify", {"method": "wanda", "sparsity": 0.5}),
    "wanda_2:4": ("sparsify", {"method": "wanda", "pattern": "2:4"}),
    "rtn_int4_g32": ("quantize", {"bits": 4, "group_size": 32, "method": "rtn"}),
    "gptq_int4_g32": ("quantize", {"bits": 4, "group_size": 32, "method": "gptq"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default); see the module docstring"
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "wanda.json"))
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import quantize, sparsify

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_KWARGS)
    base = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, config.vocab_size, (args.num_samples, args.seq_len), generator=g)
    held_out = torch.randint(0, config.vocab_size, (4, args.seq_len), generator=g)
    with torch.no_grad():
        references = {
            "held_out": base(input_ids=held_out).logits,
            "calibration": base(input_ids=calibration[:4]).logits,
        }
    inputs = {"held_out": held_out, "calibration": calibration[:4]}

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant, (fn, kwargs) in VARIANTS.items():
            model = copy.deepcopy(base)
            needs_data = kwargs["method"] in ("wanda", "gptq")
            common = {"calibration": calibration, "seq_len": args.seq_len, "num_samples": args.num_samples}
            common = common if needs_data else {}
            start = time.perf_counter()
            report = (sparsify if fn == "sparsify" else quantize)(model, show_progress=False, **kwargs, **common)
            seconds = time.perf_counter() - start
            run = {"seconds": seconds}
            if fn == "sparsify":
                run["sparsity"] = report.total_sparsity
            elif report.mean_output_error is not None:
                run["mean_module_output_error"] = report.mean_output_error
            with torch.no_grad():
                for key, ids in inputs.items():
                    logits, ref = model(input_ids=ids).logits, references[key]
                    run[f"logits_error_{key}"] = float((logits - ref).norm() / ref.norm())
            runs[variant].append(run)
            print(
                f"round {r + 1}/{args.rounds} {variant:<16} {seconds:7.2f} s  logits error held-out "
                f"{run['logits_error_held_out']:.4f}, calibration {run['logits_error_calibration']:.4f}"
            )

    median = {v: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for v, rs in runs.items()}
    print(f"\n{'variant':<18}{'seconds':>9}{'held-out err':>14}{'calib err':>11}")
    for v, m in median.items():
        print(f"{v:<18}{m['seconds']:>9.2f}{m['logits_error_held_out']:>14.4f}{m['logits_error_calibration']:>11.4f}")
    result = {
        "benchmark": "wanda",
        "model": MODEL_TEXT,
        "calibration": f"{args.num_samples} samples x {args.seq_len} random token ids (magnitude and RTN use none)",
        "metric": "wall-clock seconds of one sparsify/quantize call; relative L2 error of the logits against the "
        "dense model on 4 held-out random sequences and on the first 4 calibration sequences",
        "rounds": args.rounds,
        "load_average_1m_at_end": os.getloadavg()[0],
        "median": median,
        "runs": runs,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
