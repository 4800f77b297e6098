"""Check `hf_elastic.nas.memory.plan_memory` against measured peaks on CPU models, and print the 7–8B plans.

For each size (a tiny random Llama, a ~100M random Llama, SmolLM2-135M's config with random weights) and method
(lonas, shears, sqft, sqft-qa), one subprocess runs the method's stages as the recipe does, in float32 on the CPU:
sparsify (Wanda), quantize (GPTQ INT4 with the residual), train (one step at the max sub-network after a warm-up
step, with and without gradient checkpointing), search (the loss of one batch at the median sub-network), export
(`export_subnetwork`, or `extract_adapter` for Shears) and the OpenVINO export of the exported folder. The peak of
live tensor bytes of each stage is counted by a `TorchDispatchMode` that follows every storage an op creates until it
is freed (what `torch.cuda.max_memory_allocated` counts on a GPU); the OpenVINO export, which leaves torch, is
measured as the rise of the process's peak RSS (VmHWM) over its RSS before loading the exported folder (after a
warm-up export of a one-layer model, INT4 for SQFT-QA, has loaded the converter's libraries, and the peak is
reset). Each is compared with the planner's prediction for the same settings (`dtype=float32`). Writes
benchmarks/results/<machine>/memory_model.json with the relative errors and the plans of Llama-3-8B, Mistral-7B-v0.3
and Phi-3-mini (config.json fixtures in tests/fixtures/). `--replan` measures nothing: it compares the planner as it
is now with the peaks already measured in that file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
SIZES = {
    "tiny": {
        "config": {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
        "seq_len": 64, "batch": 2, "samples": 8,
    },
    "100m": {
        "config": {"vocab_size": 16000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
                   "num_attention_heads": 12, "num_key_value_heads": 4},
        "seq_len": 128, "batch": 2, "samples": 8,
    },
    "smollm2-135m": {"config": "smollm2", "seq_len": 128, "batch": 2, "samples": 8},
}  # fmt: skip
BIG = ("llama-3-8b", "mistral-7b-v0.3", "phi-3-mini")  # config.json fixtures in tests/fixtures/
TOLERANCE = 0.15


class TensorMemory(TorchDispatchMode):
    """Live bytes of the storages created under it (and of `track`ed tensors), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live or tensor.device.type == "meta":
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def track_module(self, module: torch.nn.Module) -> None:
        for t in [*module.parameters(), *module.buffers()]:
            self.track(t)

    def reset(self) -> None:
        gc.collect()
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def build_config(size: str):
    from transformers import AutoConfig, LlamaConfig

    spec = SIZES[size]["config"]
    if spec == "smollm2":
        from hf_elastic.models.offline import smollm2_dir

        return AutoConfig.from_pretrained(smollm2_dir())
    return LlamaConfig(**spec, max_position_embeddings=512)


def peft_config(method: str, model_type: str):
    from hf_elastic import ElasticLoraConfig, NLSConfig
    from hf_elastic.nas.memory import _TARGETS, RECIPES

    m = RECIPES[method]
    targets = list(_TARGETS.get(model_type, _TARGETS["default"])) + ["down_proj"] + (["gate_proj"] * m.gate_proj)
    common = {
        "target_modules": targets, "rank_choices": [m.rank, m.rank // 2], "lora_alpha": 64, "lora_dropout": m.dropout,
        "sparse_adapter": m.sparse_adapter, "quantization_aware": m.quantization_aware, "task_type": "CAUSAL_LM",
    }  # fmt: skip
    if m.widths:
        return ElasticLoraConfig(ffn_width_choices=[1.0, 0.75, 0.5], head_choices=[1.0], **common)
    return NLSConfig(**common)


def rss_peak() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmHWM"].split()[0]) * 1024


def rss_now() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def measure(size: str, method: str, workdir: Path) -> dict[str, int]:
    """Run the stages of `method` on `size` and return the measured peak bytes per stage."""
    import warnings

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_elastic import QuantizationConfig, export_subnetwork, get_supernet, quantize, sparsify
    from hf_elastic.nas.memory import RECIPES

    warnings.filterwarnings("ignore")
    spec, m = SIZES[size], RECIPES[method]
    seq, batch, samples = spec["seq_len"], spec["batch"], spec["samples"]
    torch.manual_seed(0)
    config = build_config(size)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    calibration = torch.randint(0, config.vocab_size, (samples, seq))
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    tracker = TensorMemory()
    tracker.track_module(model)
    out = {}
    with tracker:
        if m.sparsity:
            tracker.reset()
            sparsify(model, "wanda", m.sparsity, calibration=calibration, seq_len=seq, num_samples=samples,
                     batch_size=8, show_progress=False)  # fmt: skip
            out["sparsify"] = tracker.peak
        if m.bits:
            tracker.reset()
            group = m.group_size if config.hidden_size % m.group_size == 0 else 64
            gptq = QuantizationConfig(bits=m.bits, group_size=group, method="gptq", seq_len=seq, num_samples=samples,
                                      batch_size=8, keep_residual=m.quantization_aware)  # fmt: skip
            quantize(model, gptq, calibration=calibration, show_progress=False)
            out["quantize"] = tracker.peak
        gc.collect()
        peft = get_peft_model(model, peft_config(method, config.model_type))
        supernet = get_supernet(peft)
        for checkpointing in (False, True):
            if checkpointing:
                peft.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
            params = [p for p in peft.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            peft.train()
            supernet.activate("max")
            for step in range(2):
                if step:
                    tracker.reset()
                peft(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out["train_ckpt" if checkpointing else "train"] = tracker.peak
            del optimizer, params
        peft.base_model.model.gradient_checkpointing_disable()
        peft.eval()
        supernet.activate("median")
        tracker.reset()
        with torch.no_grad():
            peft(input_ids=ids, labels=ids)
        out["search"] = tracker.peak
        tracker.reset()
        target = workdir / "export"
        if m.sparse_adapter or m.widths:
            export_subnetwork(supernet, "median", target, overwrite=True)
        else:
            supernet.extract_adapter("median", target)
        out["export"] = tracker.peak
    return out


def measure_openvino(size: str, method: str, workdir: Path) -> int:
    """Peak RSS rise of loading the exported folder and `export_openvino` of it (merged methods only)."""
    import openvino  # noqa: F401
    import openvino_tokenizers  # noqa: F401
    import optimum.exporters.openvino  # noqa: F401  (the libraries are loaded before the baseline)

    from hf_elastic.export.openvino import export_openvino
    from hf_elastic.export.subnetwork import load_exported

    if method in ("sqft-qa",):
        import nncf  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    warm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    if method == "sqft-qa":
        from hf_elastic import quantize

        quantize(warm, bits=4, group_size=32, show_progress=False)
    export_openvino(warm, workdir / "ov-warm", overwrite=True)  # loads the converter's libraries before the baseline
    del warm
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here, not from the warm-up's
    base = rss_now()
    model = load_exported(workdir / "export")
    export_openvino(model, workdir / "ov", overwrite=True)
    return rss_peak() - base


def predicted(size: str, method: str) -> dict[str, int]:
    from hf_elastic.nas.memory import RECIPES, model_shape, plan_memory

    spec = SIZES[size]
    shape = model_shape(build_config(size))
    m = RECIPES[method]
    m = type(m)(**{**m.__dict__, "batch_size": spec["batch"], "accumulation": 1,
                   "group_size": m.group_size if shape.hidden % m.group_size == 0 else 64})  # fmt: skip
    plan = plan_memory(shape, m, spec["seq_len"], dtype="float32", calibration_samples=spec["samples"],
                       calibration_batch=8)  # fmt: skip
    out = {s.stage: s.device for s in plan.stages if s.stage != "openvino"}
    out["openvino"] = plan.stage("openvino").host
    options = {o.checkpointing: o.device for o in plan.train_options if o.micro_batch == spec["batch"]}
    out["train"], out["train_ckpt"] = options[False], options[True]
    return out


def worker(size: str, method: str, openvino: bool) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(size, method, Path(tmp))
        if openvino and (RECIPE_MERGES[method]):
            code = f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import bench_memory_model as b; "
            code += "from pathlib import Path; "
            code += f"print(json.dumps(b.measure_openvino({size!r}, {method!r}, Path({tmp!r}))))"
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            result["openvino"] = int(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result))


RECIPE_MERGES = {"lonas": True, "shears": False, "sqft": True, "sqft-qa": True}


def run_one(size: str, method: str, openvino: bool) -> dict[str, int]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, __file__, "--worker", size, method] + (["--openvino"] if openvino else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{size} {method} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(size: str, method: str, measured: dict[str, int]) -> list[dict]:
    """One row per stage: the planner's prediction for `size` and `method` against the `measured` peak."""
    plan, rows = predicted(size, method), []
    for stage, value in measured.items():
        error = (plan[stage] - value) / value
        rows.append({"size": size, "method": method, "stage": stage, "predicted_bytes": plan[stage],
                     "measured_bytes": value, "relative_error": round(error, 4)})  # fmt: skip
    return rows


def big_plans() -> dict:
    from hf_elastic.nas.memory import METHODS, model_shape, plan_memory

    out = {}
    for name in BIG:
        shape = model_shape(HERE.parent / "tests" / "fixtures" / name)
        for method in METHODS:
            plans = {gb: plan_memory(shape, method, seq_len=512, gpu_memory=f"{gb}GB") for gb in (80, 48, 24)}
            p = plans[80]
            out[f"{name}/{method}"] = {
                "stages_gib": {
                    s.stage: {"gpu": round(s.device / 2**30, 2), "host": round(s.host / 2**30, 2)} for s in p.stages
                },  # fmt: skip
                "train": {
                    f"{gb}GB": None
                    if q.chosen is None
                    else {
                        "micro_batch": q.chosen.micro_batch,
                        "accumulation": q.chosen.accumulation,
                        "checkpointing": q.chosen.checkpointing,
                        "gib": round(q.chosen.device / 2**30, 2),
                    }
                    for gb, q in plans.items()
                },  # fmt: skip
                "table": p.table(),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=["lonas", "shears", "sqft", "sqft-qa"])
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--output", default=str(HERE / "results" / "memory_model.json"))
    parser.add_argument(
        "--replan",
        action="store_true",
        help="measure nothing: compare the planner as it is now with the measured peaks already in the output file",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from common import this_machine_path, write_result

    rows, measured = [], {}
    if args.replan:
        for row in json.loads(this_machine_path(args.output).read_text())["rows"]:
            measured.setdefault((row["size"], row["method"]), {})[row["stage"]] = row["measured_bytes"]
    for size in args.sizes:
        for method in args.methods:
            if args.replan and (size, method) not in measured:
                continue
            found = measured.get((size, method)) or run_one(size, method, not args.no_openvino)
            new = compare(size, method, found)
            for r in new:
                mib = r["predicted_bytes"] / 2**20, r["measured_bytes"] / 2**20
                print(f"{size:<13} {method:<8} {r['stage']:<11} predicted {mib[0]:9.1f} MiB  "
                      f"measured {mib[1]:9.1f} MiB  error {r['relative_error']:+.1%}")  # fmt: skip
            rows += new
    worst = max(abs(r["relative_error"]) for r in rows)
    plans = big_plans()
    for key, p in plans.items():
        print(f"\n{key}\n{p['table']}")
    result = {
        "benchmark": "memory_model",
        "what": "planner prediction vs measured peak (live tensor bytes; OpenVINO: peak RSS rise), float32 on CPU",
        "sizes": {
            k: {**v, "config": v["config"] if isinstance(v["config"], dict) else "SmolLM2-135M config.json"}
            for k, v in SIZES.items()
        },  # fmt: skip
        "tolerance": TOLERANCE,
        "max_abs_relative_error": worst,
        "within_tolerance": worst <= TOLERANCE,
        "rows": rows,
        "plans_seq512": plans,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(HERE))
        worker(sys.argv[2], sys.argv[3], "--openvino" in sys.argv)
    else:
        main()
