"""Regenerate the README's result tables from the JSON in `benchmarks/results/<machine>/`.

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in README.md; this script rewrites what lies
between the markers from the table's JSON, so no figure is copied by hand. `--check` changes nothing and exits 1
when a table differs from what its JSON gives (the tests run it).

    python scripts/readme_tables.py           # rewrite the tables in README.md
    python scripts/readme_tables.py --check   # fail if README.md is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from build_model_cards import ROOT
from readme_tables_lonas import (
    demo_runs,
    lonas_ablation,
    lonas_demo_repeat,
    lonas_demo_searches,
    lonas_front,
    lonas_order_trained,
    lonas_order_zero_shot,
    lonas_ranks,
    lonas_sandwich_k,
)
from table_helpers import AMD, DASH, UNRECORDED, load, markdown, num, pct, seed_rows

MARKER = re.compile(r"(<!-- table:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)

# --------------------------------------------------------------------------------------------------- helpers


def step_table(path: str, baseline: str, labels: Mapping[str, str]) -> str:
    """Step time and peak RSS per variant with their ratios to `baseline` (`common.step_benchmark_main` results)."""
    data = load(path)
    median, ratio = data["median"], data[f"ratio_vs_{baseline}"]
    rows = [
        [
            label,
            num(median[key]["step_s"] * 1000, ".1f"),
            num(ratio[key]["step_time"], ".3f"),
            num(median[key]["peak_rss_mb"], ".0f"),
            num(ratio[key]["peak_rss"], ".3f"),
        ]
        for key, label in labels.items()
    ]
    return markdown(["variant", "step time (ms)", "× LoRA", "peak RSS (MB)", "× LoRA"], rows)


# --------------------------------------------------------------------------------------------------- tables


def sparse_quality() -> str:
    """SparsePEFT on Wanda 50 % against dense LoRA, same steps and data: test accuracy, mean ± std over the seeds."""
    results = load(f"{AMD}/sparse_quality.json")["results"]
    labels = {
        "lora": "LoRA + NLS on the dense base",
        "sparsepeft": "SparsePEFT + NLS on Wanda 50 %",
        "sparsepeft+teacher": "the same, dense base as teacher",
    }
    rows = seed_rows(results, labels, ("max", "median", "min"), "lora", ("median",))
    return markdown(["super-network", "seeds", "max", "median", "min", "median vs LoRA (points)"], rows)


def nls_step() -> str:
    labels = {
        "lora": "peft LoRA r=32",
        "nls_max": "NLS, max sub-network",
        "nls_uniform": "NLS, uniform sampling per step",
    }
    return step_table(f"{UNRECORDED}/nls_step.json", "lora", labels)


def nas_trainer() -> str:
    labels = {
        "trainer_lora": "stock Trainer + peft LoRA r=32",
        "nas_uniform": "NASTrainer, uniform",
        "nas_sandwich2": "NASTrainer, sandwich k=2 (4 passes/step)",
    }
    return step_table(f"{UNRECORDED}/nas_trainer.json", "trainer_lora", labels)


def sparse_peft() -> str:
    labels = {
        "lora": "peft LoRA r=32 (sparse fp32 base)",
        "sparsepeft": "SparsePEFT, one rank",
        "sparsepeft_nls": "SparsePEFT + NLS, random rank per step",
        "qa_sparsepeft": "QA-SparsePEFT (INT4 base + residual, g32)",
        "lora_dequant": "peft LoRA on the dequantized INT4 base",
    }
    data = load(f"{AMD}/sparse_peft.json")
    median, ratio = data["median"], data["ratio_vs_lora"]
    rows = [
        [
            label,
            num(median[key]["step_s"] * 1000, ".1f"),
            num(ratio[key]["step_time"], ".3f"),
            num(median[f"{key}@baseline"]["step_s"] * 1000, ".1f"),
            num(ratio[f"{key}@baseline"]["step_time"], ".3f"),
            num(median[key]["step_s"] / median[f"{key}@baseline"]["step_s"], ".3f"),
            num(median[key]["peak_rss_mb"], ".0f"),
            num(ratio[key]["peak_rss"], ".3f"),
        ]
        for key, label in labels.items()
    ]
    header = ["variant", "step (ms)", "× LoRA", "step, issue-22 code (ms)", "× LoRA", "now / then", "peak RSS (MB)"]
    return markdown(header + ["× LoRA"], rows)


def peers() -> str:
    data = load(f"{AMD}/peers.json")
    labels = {
        "lora": "peft LoRA r=32 (sparse fp32 base)",
        "sparsepeft": "hf_elastic SparsePEFT (`sparse_adapter=True`)",
        "upstream_sparse": "upstream SQFT SparsePEFT formulation",
        "qa_sparsepeft": "hf_elastic QA-SparsePEFT (INT4 + residual)",
        "upstream_qa": "upstream SQFT QA formulation (fp32 copy)",
        "nncf_fq_lora_nls": "NNCF FQ_LORA_NLS (INT4 asym g32, fp32 copy)",
    }
    rows = [
        [
            label,
            str(data["dense_gemms_per_layer"][key]),
            num(data["median"][key]["step_s"] * 1000, ".1f"),
            num(data["ratio_vs_lora"][key]["step_time"], ".3f"),
            num(data["median"][key]["peak_rss_mb"], ".0f"),
            num(data["median"][key]["train_rss_mb"], ".0f"),
        ]
        for key, label in labels.items()
    ]
    header = ["variant", "dense GEMMs per adapted layer", "step time (ms)", "× LoRA", "peak RSS (MB)"]
    return markdown([*header, "training RSS growth (MB)"], rows)


def nncf_quality() -> str:
    results = load(f"{AMD}/nncf_quality.json")["results"]
    labels = {
        "hf_elastic": "hf-elastic QA NLS (RTN INT4 + residual, merged exact codes)",
        "nncf": "NNCF FQ_LORA_NLS (INT4 asym g64 fake quantizers + LoRA)",
    }
    rows = [
        [label]
        + [num(results[key][s][m], ".3f") for s in ("zero_shot_int4", "trained") for m in ("eval_loss", "accuracy")]
        for key, label in labels.items()
    ]
    header = ["variant", "INT4 zero-shot: eval loss", "accuracy", "after 80 steps: eval loss", "accuracy"]
    return markdown(header, rows)


def openvino_random_llama() -> str:
    median = load("intel-xeon-amx/openvino.json")["median"]
    labels = {
        "torch_fp32": "PyTorch fp32",
        "torch_int4": "PyTorch, hf-elastic INT4 (dequantized per call)",
        "ov_fp32": "OpenVINO fp32 IR, fp32 inference",
        "ov_fp32_default": "OpenVINO fp32 IR, CPU defaults (bf16)",
        "ov_int4_exact": "OpenVINO INT4, exact hf-elastic codes",
        "ov_int4_exact_f32": "OpenVINO INT4, exact codes, fp32 inference",
        "ov_int4_nncf": "OpenVINO INT4, NNCF",
    }
    base = median["torch_fp32"]["decode_tokens_per_s"]
    rows = [
        [label, num(median[k]["decode_tokens_per_s"], ".0f"), num(median[k]["decode_tokens_per_s"] / base, ".2f")]
        for k, label in labels.items()
    ]
    return markdown(["variant", "decode tokens/s", "× PyTorch fp32"], rows)


def _smollm2_rows(data: Mapping[str, Any], labels: Mapping[str, str], sizes: bool) -> list[list[str]]:
    rows = []
    for key, label in labels.items():
        m = data["median"][key]
        row = [label]
        if sizes:
            folder = data["variants"][key]["folder"]
            size = next(v for k, v in data["size_mb"].items() if k.split(" (")[0] == folder)
            row.append(f"{size:.1f} MB")
        row += [num(m["decode_tokens_per_s"], ".1f"), num(m["decode_x_torch_fp32"], ".2f")]
        row += [num(m["batch_prefill_s"] * 1000, ".1f"), num(m["batch_prefill_x_torch_fp32"], ".2f")]
        rows.append(row)
    return rows


def openvino_smollm2() -> str:
    labels = {
        "torch_fp32": "PyTorch fp32",
        "ov_int4_exact": "OpenVINO INT4, exact hf-elastic codes",
        "ov_int4_nncf": "OpenVINO INT4, NNCF",
    }
    rows = _smollm2_rows(load(f"{AMD}/openvino_smollm2.json"), labels, sizes=True)
    header = ["variant", "size on disk", "decode tokens/s", "× PyTorch fp32", "batch prefill ×16 (ms)"]
    return markdown([*header, "× PyTorch fp32"], rows)


def openvino_smollm2_avx2() -> str:
    labels = {
        "torch_fp32": "PyTorch fp32 (ATen AVX2, MKL capped to AVX2)",
        "ov_int4_exact": "OpenVINO INT4, exact codes (AVX2, f32, no dynamic quantization)",
        "ov_int4_nncf": "OpenVINO INT4, NNCF (same)",
    }
    rows = _smollm2_rows(load(f"{AMD}/openvino_smollm2_avx2.json"), labels, sizes=False)
    header = ["variant", "decode tokens/s", "× PyTorch fp32", "batch prefill ×16 (ms)", "× PyTorch fp32"]
    return markdown(header, rows)


def openvino_smollm2_settings() -> str:
    runs = {
        "openvino_smollm2.json": "CPU defaults (bf16 on this CPU)",
        "openvino_smollm2_f32.json": ("f32, dynamic int8 activations (group 32, VNNI, in the probe's oneDNN log)"),
        "openvino_smollm2_f32_nodq.json": "f32, no dynamic quantization",
        "openvino_smollm2_avx2.json": "f32, no dynamic quantization, ISA capped to AVX2",
    }
    rows = []
    for name, label in runs.items():
        data = load(f"{AMD}/{name}")
        exact = data["median"]["ov_int4_exact"]
        kernel = next(k.split(": ")[1] for k in data["kernels"]["ov_int4_exact"] if k.startswith("FullyConnected"))
        rows.append([label, f"`{kernel}`", num(exact["decode_x_torch_fp32"], ".2f")])
        rows[-1].append(num(exact["batch_prefill_x_torch_fp32"], ".2f"))
    header = ["OpenVINO INT4 (exact codes) settings", "INT4 kernel", "decode × PyTorch", "batch prefill × PyTorch"]
    return markdown(header, rows)


def qa_quality() -> str:
    runs = [load(f"{UNRECORDED}/{name}.json")["results"] for name in ("qa_quality", "qa_quality_40_steps")]
    labels = {
        "fp_sparsepeft_merged": ("SparsePEFT on the fp32 sparse base, merged (no INT4)", False),
        "a_lora_then_ptq_int4": ("(a) the same, then post-training INT4 (RTN)", False),
        "int4_sparse_base_untrained": ("INT4 sparse base, untrained", False),
        "b_qa_sparsepeft_int4": ("(b) QA-SparsePEFT on the INT4 base (residual kept), merged INT4", True),
        "b_codes_only_qa_sparsepeft_int4": ("(b') QA-SparsePEFT on a codes-only INT4 base", False),
    }
    rows = []
    for key, (label, bold) in labels.items():
        cells = [num(run[key][m], ".3f") for run in runs for m in ("eval_loss", "accuracy")]
        if bold:  # the demo's setting: 80 steps of QA-SparsePEFT
            label, cells[:2] = f"**{label}**", [f"**{c}**" for c in cells[:2]]
        rows.append([label, *cells])
    return markdown(["variant", "80 steps: eval loss", "accuracy", "40 steps: eval loss", "accuracy"], rows)


def qa_hub_bases() -> str:
    hub = load("amd-epyc-avx512/qa_quality_hub_bases.json")["results"]
    rtn = load(f"{UNRECORDED}/qa_quality.json")["results"]
    same = "rebuilt, equal to the kept one bit for bit" if hub["ct_rtn_rebuilt_residual_equals_kept"] else "rebuilt"
    rows = [
        ("GPTQ checkpoint, untrained", DASH, hub["gptq_int4_base_untrained"]),
        ("(c') QA-SparsePEFT on the GPTQ checkpoint, codes only", "none", hub["c_codes_only_gptq_hub"]),
        ("**(c) the same with `--float-model`**", "rebuilt", hub["c_gptq_hub_residual_rebuilt"]),
        ("(b') QA-SparsePEFT on the RTN base, codes only", "none", rtn["b_codes_only_qa_sparsepeft_int4"]),
        ("(b) QA-SparsePEFT on the RTN base; its compressed-tensors checkpoint with `--float-model`", same,
         rtn["b_qa_sparsepeft_int4"]),
    ]  # fmt: skip
    cells = [[label, residual, num(r["eval_loss"], ".3f"), num(r["accuracy"], ".3f")] for label, residual, r in rows]
    return markdown(["INT4 base (SmolLM2, Wanda 50 %, group 64)", "rounding residual", "eval loss", "accuracy"], cells)


def _width_label(entry: Mapping[str, Any], full: Mapping[str, Any]) -> str:
    parts = []
    if entry["ffn_channels"] != full["ffn_channels"]:
        parts.append(f"FFN {pct(entry['ffn_channels'] / full['ffn_channels'])}")
    if entry["heads"] != full["heads"]:
        parts.append(f"heads {entry['heads']} of {full['heads']}")
    return " + ".join(parts)


def _width_rows(path: str, with_full: bool, with_params: bool) -> list[list[str]]:
    results = load(path)["results"]
    full = results["ffn_100"]
    rows = []
    for key, entry in results.items():
        if key == "ffn_100" and not with_full:
            continue
        if key == "ffn_100":
            ms = " / ".join(f"{full[r]['forward_ms']:.0f}" for r in ("torch_fp32", "ov_fp32", "ov_int4"))
            tok = " / ".join(f"{full[r]['decode_tok_s']:.1f}" for r in ("torch_fp32", "ov_fp32", "ov_int4"))
            label = f"full ({ms} ms; {tok} tok/s)"
        else:
            label = _width_label(entry, full)
        row = [label] + ([f"{entry['params'] / 1e6:.1f} M"] if with_params else [])
        row.append(num(entry["bound_forward"], ".2f"))
        for runtime in ("torch_fp32", "ov_fp32", "ov_int4"):
            row += [num(entry[runtime]["speedup_forward"], ".2f"), num(entry[runtime]["speedup_decode"], ".2f")]
        rows.append([*row, num(entry["ov_int4"]["bound_decode"], ".2f")])
    return rows


WIDTH_HEADER = [
    "bound (forward)",
    "PyTorch fwd",
    "PyTorch decode",
    "OV fp32 fwd",
    "OV fp32 decode",
    "OV INT4 fwd",
    "OV INT4 decode",
    "bound (INT4 decode)",
]


def width_latency_smollm2() -> str:
    rows = _width_rows(f"{AMD}/width_latency_smollm2.json", with_full=True, with_params=True)
    return markdown(["sub-network", "params", *WIDTH_HEADER], rows)


def width_latency_random_llama() -> str:
    rows = _width_rows(f"{AMD}/width_latency_random_llama.json", with_full=False, with_params=False)
    return markdown(["sub-network", *WIDTH_HEADER], rows)


MEMORY = "amd-epyc-avx512/memory_model.json"


def memory_plans() -> str:
    """The planner's peak GPU memory per recipe for the 7-8B configs at seq_len 512, and the settings it picks."""
    rows = []
    for key, plan in load(MEMORY)["plans_seq512"].items():
        model, method = key.split("/")
        shipped = re.search(r"recipe as shipped: ([0-9.]+) GiB", plan["table"])
        cards = [plan["train"][size] for size in ("80GB", "48GB", "24GB")]
        rows.append(
            [model, f"`{method}`", f"{shipped.group(1)} GiB" if shipped else DASH]
            + [
                f"{c['micro_batch']}×{c['accumulation']}{' ckpt' if c['checkpointing'] else ''}: {c['gib']:.1f}"
                for c in cards
            ]
            + [f"{plan['stages_gib']['export']['gpu']:.1f}", f"{plan['stages_gib']['openvino']['host']:.1f}"]
        )
    header = ["model", "method", "train, recipe as shipped", "train on 80 GB", "on 48 GB", "on 24 GB"]
    return markdown([*header, "export GPU GiB", "OpenVINO host GiB"], rows)


def memory_errors() -> str:
    """Planner against measured peaks (CPU, float32): the largest relative error per stage and model size."""
    worst: dict[str, dict[str, float]] = {}
    sizes: list[str] = []
    for row in load(MEMORY)["rows"]:
        sizes += [row["size"]] if row["size"] not in sizes else []
        cell = worst.setdefault(row["stage"], {})
        if abs(row["relative_error"]) > abs(cell.get(row["size"], 0.0)):
            cell[row["size"]] = row["relative_error"]
    rows = [[stage] + [num(errors.get(size), "+.1%") for size in sizes] for stage, errors in worst.items()]
    return markdown(["stage", *(f"{size}: worst error" for size in sizes)], rows)


def export_memory() -> str:
    """Peak RSS slopes of each export path, before and after issue 23, with optimum-intel's own export beside."""
    slopes = load(f"{AMD}/export_memory.json")["slopes"]
    paths = {
        "load_quantized": ("`load_quantized`", "INT4 folder", None),
        "export_subnetwork": ("`export_subnetwork` (LoNAS median)", "super-network", None),
        "openvino_fp32": ("OpenVINO fp32", "fp32 model", "optimum_fp32"),
        "openvino_int8": ("OpenVINO INT8 (NNCF)", "fp32 model", "optimum_int8"),
        "openvino_int4_exact": ("OpenVINO exact INT4", "fp32 model", "optimum_int4"),
    }
    rows = []
    for path, (label, reference, optimum) in paths.items():
        after = slopes[f"{path}/after"]
        peer = DASH if optimum is None else f"{slopes[f'{optimum}/after']['slope_per_reference_byte']:.2f}×"
        if optimum == "optimum_int4":
            peer += " (NNCF INT4)"
        rows.append([
            label, reference, f"{slopes[f'{path}/before']['slope_per_reference_byte']:.2f}×",
            f"**{after['slope_per_reference_byte']:.2f}×**", f"{after['llama3_8b_gib']:.1f} GiB", peer,
        ])  # fmt: skip
    header = ["path", "reference", "slope before", "slope after", "Llama-3-8B after", "optimum-intel"]
    return markdown(header, rows)


TABLES: dict[str, Callable[[], str]] = {
    f.__name__: f
    for f in (
        lonas_order_zero_shot,
        lonas_order_trained,
        lonas_ablation,
        lonas_sandwich_k,
        sparse_quality,
        nls_step,
        nas_trainer,
        sparse_peft,
        export_memory,
        peers,
        nncf_quality,
        openvino_random_llama,
        openvino_smollm2,
        openvino_smollm2_avx2,
        openvino_smollm2_settings,
        qa_quality,
        qa_hub_bases,
        width_latency_smollm2,
        width_latency_random_llama,
        lonas_front,
        demo_runs,
        lonas_demo_repeat,
        lonas_ranks,
        lonas_demo_searches,
        memory_plans,
        memory_errors,
    )
}

# --------------------------------------------------------------------------------------------------- README


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every marked table regenerated, and the names of the tables that changed."""
    found = [m.group("name") for m in MARKER.finditer(text)]
    unknown = sorted(set(found) - set(TABLES))
    if unknown:
        raise ValueError(f"README.md marks tables {unknown} that scripts/readme_tables.py does not know.")
    missing = sorted(set(TABLES) - set(found))
    if missing:
        raise ValueError(
            f"README.md lacks the markers of tables {missing}: <!-- table:NAME --> ... <!-- /table:NAME -->."
        )
    changed = []

    def replace(m: re.Match) -> str:
        body = TABLES[m.group("name")]()
        if body != m.group("body"):
            changed.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    return MARKER.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new, changed = render(text)
    if args.check:
        if changed:
            print(f"stale README tables (run scripts/readme_tables.py): {', '.join(changed)}", file=sys.stderr)
            return 1
        print(f"{len(TABLES)} README tables match their JSON")
        return 0
    if changed:
        args.readme.write_text(new, encoding="utf-8")
    print(f"rewrote {len(changed)} of {len(TABLES)} tables: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
