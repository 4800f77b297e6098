"""Shared pieces of the benchmarks: the benchmark model, interleaved subprocess rounds and the summary table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_KWARGS = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
MODEL_TEXT = "Llama config: hidden 512, 4 layers, intermediate 1376, 8 heads, vocab 8192 (random weights)"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def time_training(
    model, steps: int, warmup: int, seq_len: int, batch_size: int, before_step: Callable[[], None] | None = None
) -> dict:
    """Median AdamW step time of `model` on a fixed random batch, peak RSS and its growth during training."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    model.train()
    rss_before = rss_mb()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        if before_step is not None:
            before_step()
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times), "peak_rss_mb": peak, "train_rss_mb": peak - rss_before}


def step_timer() -> Any:
    """A `TrainerCallback` that records the wall time of each optimizer step in its `times` list."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def run_interleaved(
    script: str, variants: tuple[str, ...], rounds: int, extra: list[str], sources: Mapping[str, Path] | None = None
) -> dict[str, list[dict]]:
    """Run `script --worker VARIANT *extra` in a fresh process per (round, variant); each prints one JSON line.

    `sources` maps a label to another checkout's `src` folder: every variant also runs with that checkout's
    hf_elastic first on the path, as `VARIANT@label`, in the same rounds."""
    sources = dict(sources or {})
    runs: dict[str, list[dict]] = {f"{v}@{label}" if label else v: [] for label in ["", *sources] for v in variants}
    for r in range(rounds):
        for key in runs:
            variant, _, label = key.partition("@")
            env = None
            if label:
                env = os.environ | {"PYTHONPATH": os.pathsep.join([str(sources[label]), str(Path(script).parent)])}
            cmd = [sys.executable, script, "--worker", variant, *extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1]
            result = json.loads(out)
            if label and not result.pop("hf_elastic", "").startswith(str(sources[label])):
                raise RuntimeError(f"the {key} worker did not import hf_elastic from {sources[label]}")
            runs[key].append(result)
            print(
                f"round {r + 1}/{rounds} {key:<14} step {runs[key][-1]['step_s'] * 1000:7.1f} ms  "
                f"peak RSS {runs[key][-1]['peak_rss_mb']:7.1f} MB",
                flush=True,
            )
    return runs


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A temporary git worktree of this repository at `ref` (removed afterwards); yields its folder."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkout"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(folder), ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            yield folder
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(folder)], check=False)


def commit_of(ref: str) -> str:
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", ref], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _median(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else statistics.median(values)


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def summarize(
    runs: dict[str, list[dict]], baseline: str, memory_key: str = "peak_rss_mb", memory_label: str = "peak RSS MB"
) -> tuple[dict, dict]:
    """Medians per variant and their ratios to `baseline` (step time and `memory_key`, None where not measured);
    prints the table."""
    summary = {v: {k: _median(x[k] for x in rs) for k in rs[0]} for v, rs in runs.items()}
    base = summary[baseline]
    memory_ratio = memory_key.removesuffix("_mb")
    ratios = {
        v: {
            "step_time": _ratio(s["step_s"], base["step_s"]),
            memory_ratio: _ratio(s[memory_key], base[memory_key]),
        }
        for v, s in summary.items()
    }

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    width = len(memory_label) + 2
    print(f"\n{'variant':<16}{'step ms':>10}{'x base':>9}{memory_label:>{width}}{'x base':>9}")
    for v, s in summary.items():
        print(
            f"{v:<16}{s['step_s'] * 1000:>10.1f}{ratios[v]['step_time']:>9.3f}"
            f"{fmt(s[memory_key], '.1f'):>{width}}{fmt(ratios[v][memory_ratio], '.3f'):>9}"
        )
    return summary, ratios


def accuracy_over_seeds(runs: Mapping[str, dict]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation (0 for one seed) and standard error over the seeds (`runs`, keyed by seed) of each
    entry that every run's `accuracy` has."""
    summary = {}
    common = set.intersection(*(set(r["accuracy"]) for r in runs.values()))
    for key in [k for k in next(iter(runs.values()))["accuracy"] if k in common]:
        values = [r["accuracy"][key] for r in runs.values()]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = {"mean": statistics.fmean(values), "std": std, "sem": std / len(values) ** 0.5}
    return summary


def cpu_info() -> dict:
    """The CPU model and whether it has AVX2, AVX-512F and AMX, from /proc/cpuinfo (None where it is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or None, "cpu_flags": None}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name"),
        "cpu_flags": {
            "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags,
            "amx": any(f.startswith("amx") for f in flags),
        },
    }


RESULTS_DIR = Path(__file__).parent / "results"
UNRECORDED_MACHINE = "unrecorded-cpu"
_ISA_NAMES = (("amx", "amx"), ("avx512f", "avx512"), ("avx2", "avx2"))  # cpu_flags key, folder suffix


def machine_slug(result: Mapping[str, Any]) -> str:
    """The folder of `benchmarks/results/` a result belongs in: its CPU model and widest vector ISA, e.g.
    "amd-epyc-avx512" (`"unrecorded-cpu"` when the result names no CPU). Reads `machine` as `write_result` records
    it, or the `environment` block of older `bench_openvino.py` results."""
    machine, env = result.get("machine") or {}, result.get("environment") or {}
    model = machine.get("cpu_model") or env.get("cpu_model") or env.get("cpu")
    if not model:
        return UNRECORDED_MACHINE
    flags = machine.get("cpu_flags") or env.get("cpu_flags")
    if flags is None and isinstance(env.get("isa"), list):  # older bench_openvino.py: the CPU's ISA flag names
        isa = set(env["isa"])
        flags = {"avx2": "avx2" in isa, "avx512f": "avx512f" in isa, "amx": any(f.startswith("amx") for f in isa)}
    flags = flags or {}
    words = re.sub(r"\((r|tm)\)", " ", model.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", words) if w and w not in ("processor", "cpu")]
    isa = next((name for key, name in _ISA_NAMES if flags.get(key)), None)
    return "-".join(words + ([isa] if isa else []))


def result_path(output: str | Path, result: Mapping[str, Any]) -> Path:
    """Where `write_result` writes: a file named directly in `benchmarks/results/` (every benchmark's default) goes
    to the folder of the machine that measured it, `benchmarks/results/<machine_slug>/`; any other path is kept."""
    output = Path(output)
    if output.parent.resolve() == RESULTS_DIR.resolve():
        return RESULTS_DIR / machine_slug(result) / output.name
    return output


def this_machine_path(output: str | Path) -> Path:
    """`result_path` for a result measured on this machine, for files a benchmark reads or writes besides its JSON."""
    return result_path(output, {"machine": cpu_info()})


def write_result(output: str | Path, result: dict) -> Path:
    """Add the machine description (CPU model and ISA included: figures from different machines do not compare) to
    `result`, write it as JSON (see `result_path` for where), say where and return the path."""
    import torch

    result["machine"] = {
        **cpu_info(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    } | result.get("machine", {})
    from hf_elastic.utils import atomic_open

    path = result_path(output, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")
    return path


@dataclass
class DemoTask:
    """The demo's SmolLM2 and fine-food rows, tokenized for `Trainer`: what the quality benchmarks train and score."""

    model_dir: Path
    tokenizer: Any
    train: Any
    test: Any
    features: Any
    test_features: Any
    collator: Any

    @classmethod
    def load(cls, train_rows: int, test_rows: int, seq_len: int = 128) -> DemoTask:
        """The first `train_rows` / `test_rows` rows, long reviews cut so that each prompt and answer fit `seq_len`."""
        from transformers import AutoTokenizer

        from hf_elastic.data import FINE_FOODS_FORMAT, completion_collator, fit_rows, load_fine_foods, tokenize_rows
        from hf_elastic.models.offline import smollm2_dir

        model_dir = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data = load_fine_foods({"train": train_rows, "test": test_rows})
        train, test = (fit_rows(data[s], tokenizer, seq_len, FINE_FOODS_FORMAT) for s in ("train", "test"))
        return cls(
            model_dir,
            tokenizer,
            train,
            test,
            tokenize_rows(train, tokenizer, seq_len, FINE_FOODS_FORMAT),
            tokenize_rows(test, tokenizer, seq_len, FINE_FOODS_FORMAT),
            completion_collator(tokenizer),
        )

    @property
    def description(self) -> str:
        rows = f"{len(self.train)} train rows, {len(self.test)} held-out test rows"
        return f"fine-food reviews, {rows}, answer-token loss"

    def evaluate(self, model, args) -> dict[str, float]:
        """Answer-token loss and accuracy on the test rows; `args` are the `TrainingArguments` of the evaluation."""
        from transformers import Trainer

        from hf_elastic.data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT
        from hf_elastic.search import LabelWordEvaluator

        loss = Trainer(model=model, args=args, data_collator=self.collator).evaluate(self.test_features)["eval_loss"]
        scorer = LabelWordEvaluator.from_rows(self.test, FINE_FOODS_ANSWERS, self.tokenizer, FINE_FOODS_FORMAT)
        return {"eval_loss": loss, "accuracy": scorer.accuracy(model)}


def step_benchmark_main(
    doc: str,
    script: str,
    variants: tuple[str, ...],
    run_variant: Callable[..., dict],
    output_name: str,
    baseline: str,
    info: dict,
    rounds: int = 3,
    steps: int = 6,
) -> None:
    """Command line of a step-time benchmark: a `--worker VARIANT` run measures one variant in its own process;
    otherwise all variants run in interleaved rounds and the medians and ratios to `baseline` go to JSON."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default=str(Path(script).parent / "results" / output_name))
    parser.add_argument("--worker", choices=variants, help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline-ref", default="", help="a git commit whose hf_elastic also runs every variant, in the same rounds"
    )
    args = parser.parse_args()
    sizes = {"steps": args.steps, "warmup": args.warmup, "seq_len": args.seq_len, "batch_size": args.batch_size}
    if args.worker:
        import hf_elastic

        print(json.dumps(run_variant(args.worker, **sizes) | {"hf_elastic": hf_elastic.__file__}))
        return
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    with contextlib.ExitStack() as stack:
        sources = {"baseline": stack.enter_context(checkout(args.baseline_ref)) / "src"} if args.baseline_ref else {}
        runs = run_interleaved(script, variants, args.rounds, extra, sources)
    summary, ratios = summarize(runs, baseline)
    if args.baseline_ref:
        base = summary[f"{baseline}@baseline"]
        for key in [k for k in summary if k.endswith("@baseline")]:
            ratios[key] = {
                "step_time": _ratio(summary[key]["step_s"], base["step_s"]),
                "peak_rss": _ratio(summary[key]["peak_rss_mb"], base["peak_rss_mb"]),
            }
    result = {
        "benchmark": Path(output_name).stem,
        "model": MODEL_TEXT,
        "batch": [args.batch_size, args.seq_len],
        **info,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "baseline_ref": args.baseline_ref or None,
        "baseline_commit": commit_of(args.baseline_ref) if args.baseline_ref else None,
        "median": summary,
        f"ratio_vs_{baseline}": ratios,
        "runs": runs,
    }
    write_result(args.output, result)
