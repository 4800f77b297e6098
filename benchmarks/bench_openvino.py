"""Greedy decode speed and size on disk: PyTorch fp32 against OpenVINO fp32 and INT4 (hf_elastic exact codes, NNCF).

The benchmark model (random weights) is exported once: an fp32 IR, an INT4 IR holding the codes of hf_elastic's RTN
INT4 quantization (asymmetric, group 32) exactly (with its fp32 embeddings and LM head, and with those compressed to
int8 by NNCF: `compress_float_weights=True`), and an NNCF INT4 IR (INT4_ASYM, group 32, ratio 1.0; NNCF also
compresses the embeddings and LM head to int8, hf_elastic keeps them fp32). Each (variant, round) runs in a fresh
subprocess: it warms up, times prefill (generate 1 token) and a greedy generate of `--new-tokens` tokens from a
`--prompt-len` prompt (PyTorch: the fp32 model, and the hf_elastic INT4 model whose `QuantLinear` dequantizes on
every forward), and reports decode tokens/s = (new_tokens - 1) / (generate time - prefill time). Rounds
interleave the variants; figures are medians over rounds. Prints a table and writes benchmarks/results/openvino.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, rss_mb, write_result

# variant: (folder under the work dir, OpenVINO properties; None for PyTorch)
VARIANTS = {
    "torch_fp32": ("hf_fp32", None),
    "torch_int4": ("hf_elastic_int4", None),
    "ov_fp32": ("ov_fp32", "fp32"),
    "ov_fp32_default": ("ov_fp32", "default"),
    "ov_int4_exact": ("ov_int4_exact", "default"),
    "ov_int4_exact_f32": ("ov_int4_exact", "fp32"),
    "ov_int4_exact_int8_head": ("ov_int4_exact_int8_head", "default"),
    "ov_int4_nncf": ("ov_int4_nncf", "default"),
}
CONFIG_TEXT = {
    "fp32": "FP32_CPU_CONFIG: INFERENCE_PRECISION_HINT=f32, KV_CACHE_PRECISION=f32, DYNAMIC_QUANTIZATION_GROUP_SIZE=0",
    "default": "OpenVINO CPU defaults (bf16 inference where the CPU has it, u8 KV cache, int8 dynamic quantization of "
    "activations for compressed weights)",
}
# greedy tokens are compared with PyTorch running the same weights (the hf_elastic INT4 model for the exact path)
EXACT = ("torch_int4", "ov_int4_exact", "ov_int4_exact_f32", "ov_int4_exact_int8_head")
REFERENCE = dict.fromkeys(EXACT, "torch_int4")
GROUP_SIZE = 32  # intermediate 1376 = 32 * 43


def prepare(work: Path) -> dict:
    """Build the random benchmark model and write the PyTorch, hf_elastic INT4 and the four OpenVINO folders."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import quantize, save_quantized
    from hf_elastic.export import export_openvino

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS)).eval()
    model.save_pretrained(work / "hf_fp32")
    seconds = {}
    start = time.perf_counter()
    export_openvino(model, work / "ov_fp32")
    seconds["ov_fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    export_openvino(model, work / "ov_int4_nncf", weight_format="int4", group_size=GROUP_SIZE)
    seconds["ov_int4_nncf"] = time.perf_counter() - start
    quantize(model, bits=4, group_size=GROUP_SIZE, show_progress=False)
    save_quantized(model, work / "hf_elastic_int4")
    start = time.perf_counter()
    export_openvino(work / "hf_elastic_int4", work / "ov_int4_exact")
    seconds["ov_int4_exact"] = time.perf_counter() - start
    export_openvino(work / "hf_elastic_int4", work / "ov_int4_exact_int8_head", compress_float_weights=True)

    def size(folder: str, pattern: str) -> float:
        return sum(p.stat().st_size for p in (work / folder).glob(pattern)) / 2**20

    sizes = {
        "hf_fp32 (model.safetensors)": size("hf_fp32", "*.safetensors"),
        "hf_elastic_int4 (model.safetensors, one uint8 code per weight)": size("hf_elastic_int4", "*.safetensors"),
        "ov_fp32 (openvino_model.xml/.bin)": size("ov_fp32", "openvino_model.*"),
        "ov_int4_exact (openvino_model.xml/.bin)": size("ov_int4_exact", "openvino_model.*"),
        "ov_int4_exact_int8_head (openvino_model.xml/.bin)": size("ov_int4_exact_int8_head", "openvino_model.*"),
        "ov_int4_nncf (openvino_model.xml/.bin)": size("ov_int4_nncf", "openvino_model.*"),
    }
    return {"size_mb": sizes, "export_s": seconds}


def environment() -> dict:
    """CPU model and ISA extensions that matter to OpenVINO, and the package versions."""
    from importlib.metadata import version

    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in info:
                info[key.strip()] = value.strip()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name"),
        "isa": sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512f", "amx", "avx2"))),
        **{name: version(name) for name in ("openvino", "optimum-intel", "nncf", "transformers")},
    }


def run_variant(variant: str, work: Path, prompt_len: int, new_tokens: int) -> dict:
    import resource

    import torch

    folder, properties = VARIANTS[variant]
    rss_before = rss_mb()
    if variant == "torch_int4":
        from hf_elastic import load_quantized

        model = load_quantized(work / folder)
    elif properties is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(work / folder).eval()
    else:
        from hf_elastic.export import FP32_CPU_CONFIG, load_openvino

        model = load_openvino(work / folder, **(FP32_CPU_CONFIG if properties == "fp32" else {}))
    ids = torch.randint(3, MODEL_KWARGS["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def generate(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        return time.perf_counter() - start, out

    generate(8)
    prefill = min(generate(1)[0] for _ in range(3))
    total, out = generate(new_tokens)
    decode = (total - prefill) / (new_tokens - 1)
    return {
        "step_s": decode,
        "decode_tokens_per_s": 1 / decode,
        "prefill_s": prefill,
        "generate_s": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_rss_mb": rss_mb() - rss_before,
        "load_1min": os.getloadavg()[0],
        "tokens": out[0, prompt_len:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work-dir", help="Folder for the exported models (default: a temporary folder, removed).")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "openvino.json"))
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    if args.worker:
        result = run_variant(args.worker, Path(args.work_dir), args.prompt_len, args.new_tokens)
        print(json.dumps(result))
        return

    load_before = os.getloadavg()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_openvino."))
    try:
        prepared = prepare(work) if not (work / "ov_int4_exact").exists() else {}
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--worker", variant, "--work-dir", str(work), *shape]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
                runs[variant].append(json.loads(out))
                last = runs[variant][-1]
                print(
                    f"round {r + 1}/{args.rounds} {variant:<24} decode {last['decode_tokens_per_s']:7.1f} tok/s  "
                    f"prefill {last['prefill_s'] * 1000:6.1f} ms",
                    flush=True,
                )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    keys = ("decode_tokens_per_s", "step_s", "prefill_s", "generate_s", "peak_rss_mb", "model_rss_mb", "load_1min")
    summary = {v: {k: statistics.median(x[k] for x in rs) for k in keys} for v, rs in runs.items()}
    for v, rs in runs.items():
        summary[v]["reference"] = REFERENCE.get(v, "torch_fp32")
        pairs = zip(rs[0]["tokens"], runs[summary[v]["reference"]][0]["tokens"], strict=True)
        first_diff = next((i for i, (a, b) in enumerate(pairs) if a != b), args.new_tokens)
        summary[v]["tokens_equal_to_reference"] = first_diff  # greedy tokens before the first difference
    base = summary["torch_fp32"]["decode_tokens_per_s"]
    print(f"\n{'variant':<25}{'decode tok/s':>13}{'x torch':>9}{'prefill ms':>12}{'greedy tokens = reference':>38}")
    for v, s in summary.items():
        print(
            f"{v:<25}{s['decode_tokens_per_s']:>13.1f}{s['decode_tokens_per_s'] / base:>9.2f}"
            f"{s['prefill_s'] * 1000:>12.1f}{s['tokens_equal_to_reference']:>13}/{args.new_tokens} ({s['reference']})"
        )
    for name, mb in prepared.get("size_mb", {}).items():
        print(f"{name:<66}{mb:>8.1f} MB")
    result = {
        "benchmark": "openvino",
        "model": MODEL_TEXT,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "quantization": f"INT4 asymmetric, group {GROUP_SIZE}: hf_elastic RTN (exact codes in the IR) vs NNCF",
        "variants": {v: {"folder": f, "ov_config": CONFIG_TEXT.get(c, "PyTorch")} for v, (f, c) in VARIANTS.items()},
        "environment": environment(),
        **prepared,
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "median": summary,
        "runs": {v: [{k: x[k] for k in keys} for x in rs] for v, rs in runs.items()},
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
