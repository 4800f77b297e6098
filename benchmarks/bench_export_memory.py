"""Peak host RAM of every export path, at three random Llama sizes, with slopes and the Llama-3-8B extrapolation.

Each measurement runs in a fresh subprocess: it imports the libraries, warms the path up on a one-layer model (so
that lazily loaded converter libraries are not counted), resets the process's peak RSS (`/proc/self/clear_refs`)
and reports the rise of the peak RSS (VmHWM) over the RSS before the work. Paths:

- `load_quantized`: an hf_elastic INT4 folder (RTN, group 128) back into a model;
- `export_subnetwork`: the median sub-network of a LoNAS super-network (elastic FFN widths 1/0.75/0.5, rank 32 on
  q/k/v/up/down) merged, sliced and written (the super-network is built, and its weights read once so that the
  pages `from_pretrained` maps from the file are in memory, before the peak is reset);
- `openvino_fp32`, `openvino_int8`: `export_openvino` of the float folder (NNCF int8 per channel for int8);
- `openvino_int4_exact`: `export_openvino` of the INT4 folder (the codes exactly, embedding and LM head int8);
- `optimum_fp32`, `optimum_int8`, `optimum_int4`: optimum-intel's own export of the float folder, as
  `optimum-cli export openvino --weight-format ...` runs it (`main_export`, then `_main_quantize`; int4 group 128).

`--before SRC` also runs the hf_elastic paths on another checkout's `src` (the code before a change). The slope of
each path (RSS bytes per byte of the model's float32 size, least squares over the sizes) gives the 8B extrapolation.
Writes benchmarks/results/<machine>/export_memory.json. Random weights, built locally; nothing from the Hub.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {
    "30m": {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 4},
    "100m": {"vocab_size": 16000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 4},
    "250m": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
             "num_attention_heads": 16, "num_key_value_heads": 8},
}  # fmt: skip
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8}  # fmt: skip
HF_ELASTIC_PATHS = ("load_quantized", "export_subnetwork", "openvino_fp32", "openvino_int8", "openvino_int4_exact")
OPTIMUM_PATHS = ("optimum_fp32", "optimum_int8", "optimum_int4")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
GROUP_SIZE = 128
WARM = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def build_folders(config: dict, root: Path) -> dict[str, Path]:
    """The float32 checkpoint and its INT4 (RTN) hf_elastic folder of a random Llama of `config`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import quantize, save_quantized

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=512)).eval()
    model.save_pretrained(root / "float")
    quantize(model, bits=4, group_size=GROUP_SIZE, show_progress=False)
    save_quantized(model, root / "int4")
    return {"float": root / "float", "int4": root / "int4"}


def _supernet(folder: Path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_elastic import ElasticLoraConfig, get_supernet

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    config = ElasticLoraConfig(
        target_modules=TARGETS, rank_choices=[32, 16], ffn_width_choices=[1.0, 0.75, 0.5], init_lora_weights=False
    )
    return get_supernet(get_peft_model(model, config))


def _optimum(folder: Path, out: Path, weight_format: str) -> None:
    """What `optimum-cli export openvino --task text-generation-with-past --weight-format ...` runs."""
    from optimum.exporters.openvino.__main__ import _main_quantize, main_export
    from optimum.intel import OVConfig, OVWeightQuantizationConfig

    task = "text-generation-with-past"
    if weight_format == "fp32":
        main_export(model_name_or_path=str(folder), output=out, task=task, ov_config=OVConfig(dtype="fp32"))
        return
    bits = 8 if weight_format == "int8" else 4
    quant = OVWeightQuantizationConfig(bits=bits, sym=False, group_size=-1 if bits == 8 else GROUP_SIZE, ratio=1.0)
    main_export(model_name_or_path=str(folder), output=out, task=task, ov_config=OVConfig(quantization_config=quant))
    _main_quantize(str(folder), task, "transformers", quant, out, cache_dir=None)


def run_path(path: str, folders: dict[str, Path], out: Path) -> None:
    import shutil

    from hf_elastic import load_quantized

    shutil.rmtree(out, ignore_errors=True)
    from hf_elastic.export import export_openvino

    if path == "load_quantized":
        load_quantized(folders["int4"])
    elif path == "openvino_fp32":
        export_openvino(folders["float"], out)
    elif path == "openvino_int8":
        export_openvino(folders["float"], out, weight_format="int8")
    elif path == "openvino_int4_exact":
        export_openvino(folders["int4"], out)
    elif path.startswith("optimum_"):
        _optimum(folders["float"], out, path.removeprefix("optimum_"))
    else:
        raise ValueError(path)


def worker(path: str, root: Path) -> dict:
    """Warm `path` up on a one-layer model, then measure it on the folders in `root`."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        warm = build_folders(WARM, Path(tmp))
        if path == "export_subnetwork":
            from hf_elastic import export_subnetwork

            export_subnetwork(_supernet(warm["float"]), "median", Path(tmp) / "warm-out")
            supernet = _supernet(root / "float")
            for tensor in [*supernet.model.parameters(), *supernet.model.buffers()]:
                tensor.sum()  # page in the weights that `from_pretrained` mapped from the file, as after training
            Path("/proc/self/clear_refs").write_text("5")
            base = _status("VmRSS")
            export_subnetwork(supernet, "median", root / f"out-{path}", overwrite=True)
        else:
            run_path(path, warm, Path(tmp) / "warm-out")
            Path("/proc/self/clear_refs").write_text("5")
            base = _status("VmRSS")
            run_path(path, {"float": root / "float", "int4": root / "int4"}, root / f"out-{path}")
    return {"rise": _status("VmHWM") - base, "baseline_rss": base}


def measure(path: str, root: Path, src: Path | None) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", path, str(root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{path} failed:\n{stderr.decode()[-4000:]}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


def model_sizes(config: dict) -> dict[str, int]:
    """Parameters, float32 bytes of the model, of the super-network (+ rank-32 adapters) and of the INT4 folder
    (codes one per byte, float32 scales and uint8 zero points per group, the rest float32)."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    d = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    linear = n * (2 * h * q + 2 * h * kv + 3 * h * i)
    params = linear + 2 * config["vocab_size"] * h + (2 * n + 1) * h
    adapters = n * 32 * (2 * h + 2 * q + 2 * (h + kv) + 2 * (h + i))
    return {"params": params, "fp32_bytes": 4 * params, "supernet_bytes": 4 * (params + adapters),
            "int4_folder_bytes": int(linear * (1 + 5 / GROUP_SIZE) + 4 * (params - linear))}  # fmt: skip


def _commit(src: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mx


# the model size each path is compared with: the folder it reads, the super-network, or the exported float32 model
REFERENCE = {"load_quantized": "int4_folder_bytes", "export_subnetwork": "supernet_bytes"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--paths", nargs="+", default=list(HF_ELASTIC_PATHS + OPTIMUM_PATHS))
    parser.add_argument("--before", type=Path, help="the src folder of the code before the change, also measured")
    parser.add_argument("--output", default=str(HERE / "results" / "export_memory.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from common import write_result

    variants = {"after": None} | ({"before": args.before} if args.before else {})
    rows, sizes = [], {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build_folders(SIZES[size], root)
            sizes[size] = model_sizes(SIZES[size])
            sizes[size]["int4_folder_bytes"] = sum(f.stat().st_size for f in (root / "int4").iterdir())
            for path in args.paths:
                for variant, src in variants.items():
                    if variant == "before" and path in OPTIMUM_PATHS:
                        continue
                    result = measure(path, root, src)
                    ref = sizes[size][REFERENCE.get(path, "fp32_bytes")]
                    row = {"size": size, "path": path, "code": variant, "peak_rise_bytes": result["rise"],
                           "reference_bytes": ref, "ratio": round(result["rise"] / ref, 3)}  # fmt: skip
                    rows.append(row)
                    print(f"{size:<5} {path:<20} {variant:<6} peak rise {result['rise'] / 2**20:8.1f} MiB  "
                          f"x{row['ratio']:.2f} of {REFERENCE.get(path, 'fp32_bytes')}", flush=True)  # fmt: skip
    slopes = {}
    for path in args.paths:
        for variant in variants:
            points = [r for r in rows if r["path"] == path and r["code"] == variant]
            if len(points) < 2:
                continue
            key = REFERENCE.get(path, "fp32_bytes")
            slope, intercept = fit([sizes[r["size"]][key] for r in points], [r["peak_rise_bytes"] for r in points])
            llama8b = slope * model_sizes(LLAMA3_8B)[key] + intercept
            slopes[f"{path}/{variant}"] = {
                "slope_per_reference_byte": round(slope, 3),
                "intercept_bytes": round(intercept),
                "reference": key,
                "llama3_8b_gib": round(llama8b / 2**30, 1),
            }
            print(f"{path:<20} {variant:<6} slope {slope:5.2f} x {key}, 8B: {llama8b / 2**30:6.1f} GiB")
    result = {
        "benchmark": "export_memory",
        "what": "peak RSS rise of each export path in a fresh process (after imports and a warm-up), float32 CPU",
        "sizes": {k: {"config": SIZES[k], **sizes[k]} for k in sizes},
        "llama3_8b": {**model_sizes(LLAMA3_8B), "note": "slope x the 8B reference size + intercept; reference sizes "
                      "as the measured models': float32 weights, INT4 codes one per byte, LoRA rank 32"},
        "before": str(args.before) if args.before else None,
        "before_commit": _commit(args.before) if args.before else None,
        "rows": rows,
        "slopes": slopes,
    }  # fmt: skip
    write_result(args.output, result)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], Path(sys.argv[3]))))
    else:
        main()
