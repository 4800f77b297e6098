"""Write `model_cards/<method>.md`, one card per demo method, from the result JSON of a real `hf-elastic demo` run.

The runs' `demo_results.json` are kept in `benchmarks/results/<machine>/` (`RUNS` below); every figure of a card is
read from its JSON, and the template is `model_cards/templates/demo_run_card.md`. `--check` writes nothing and exits
1 when a committed card differs from what its JSON gives (the tests run it).

    python scripts/build_model_cards.py           # (re)write the cards of every run on file
    python scripts/build_model_cards.py --check
    python scripts/build_model_cards.py --add-run outputs/demo   # file a run made on this machine, then write

`--add-run DIR` copies `DIR/demo_results.json` to `benchmarks/results/<this machine>/demo_<method>.json` with the
machine's record added (the demo's results file has none), and the run's own card, `DIR/hub/README.md`, next to it.
With `--name NAME` it files `demo_<method>_<NAME>.json` instead: a run beside the card's, which stays as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CARDS = ROOT / "model_cards"
TEMPLATE = CARDS / "templates" / "demo_run_card.md"
# demo method -> its run under benchmarks/results/
RUNS = {
    "lonas": "amd-epyc-avx512/demo_lonas_ffn5.json",
    "shears": "amd-epyc-avx512/demo_shears.json",
    "sqft": "amd-epyc-avx512/demo_sqft.json",
    "sqft-qa": "amd-epyc-avx512/demo_sqft_qa.json",
}
COLUMNS = (  # row key, header, format
    ("params_m", "params (M)", ".1f"),
    ("accuracy", "test accuracy", ".3f"),
    ("sparsity", "weight sparsity", ".3f"),
    ("zeros_kept", "base zeros kept", ".1%"),
    ("latency_ms", "ms / batch", ".0f"),
    ("speedup", "× faster", ".2f"),
    ("decode_tok_s", "tokens/s", ".1f"),
    ("size_mb", "size on disk (MB)", ".0f"),
)
SETTINGS = (  # config key, label, method filter (None: every method)
    ("train_steps", "NAS training steps", None),
    ("batch_size", "batch size", None),
    ("learning_rate", "learning rate", None),
    ("rank_choices", "LoRA rank choices", None),
    ("ffn_width_choices", "FFN width choices (fractions)", ("lonas",)),
    ("head_choices", "attention heads kept (fractions)", ("lonas",)),
    ("reorder", "channel order", ("lonas",)),
    ("sampling", "sub-network sampling", ("lonas",)),
    ("sparsity", "Wanda sparsity of the base", ("shears", "sqft", "sqft-qa")),
    ("group_size", "INT4 group size", ("shears", "sqft", "sqft-qa")),
    ("openvino_weight_format", "OpenVINO IR weights", ("lonas",)),
    ("search_budget", "NSGA-II evaluations", None),
    ("population", "NSGA-II population", None),
    ("val_rows", "validation rows (from the train split)", None),
    ("test_rows", "held-out test rows", None),
    ("seed", "seed", None),
)


def method_info(method: str) -> tuple[str, str, tuple[str, ...], Any]:
    """Title, description, Hub tags and first paper of a demo method, from the library's method table."""
    from hf_elastic.tuners.methods import PAPERS, demo_method

    info = demo_method(method)
    return info.title, info.description, info.tags, PAPERS[info.papers[0]]


def headline(data: Mapping[str, Any]) -> dict[str, Any]:
    """The run's published sub-network against its reference: LoNAS' "smallest useful" one (or max) against the
    max one in the same runtime; Shears / SQFT's OpenVINO sub-network against the dense model in PyTorch."""
    rows = data["rows"]
    if data["config"]["method"] == "lonas":
        name = next((k for k in data["speedups"] if k.startswith("smallest useful (O")), None)
        name = name or next(k for k in rows if k.startswith("max (O"))
        reference = "max (" + name.split(" (", 1)[1]
        speedup = data["speedups"].get(name, {}).get("speedup_batch", 1.0)
    else:
        name, reference = "sub-network (OpenVINO INT4)", "dense (zero-shot)"
        speedup = rows[reference]["latency_ms"] / rows[name]["latency_ms"]
    return {
        "method": data["config"]["method"],
        "name": name,
        "reference": reference,
        "accuracy": rows[name]["accuracy"],
        "reference_accuracy": rows[reference]["accuracy"],
        "speedup": speedup,
        "decode_speedup": rows[name]["decode_tok_s"] / rows[reference]["decode_tok_s"],
        "size_mb": rows[name]["size_mb"],
        "reference_size_mb": rows[reference]["size_mb"],
        "total_seconds": data["total_seconds"],
    }


def _value(value: Any) -> str:
    if isinstance(value, list):
        return " / ".join(_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _machine(data: Mapping[str, Any]) -> str:
    machine = data.get("machine") or {}
    if not machine.get("cpu_model"):
        return "not recorded (the demo's results file had no machine record then)"
    flags = [k for k, v in (machine.get("cpu_flags") or {}).items() if v]
    return f"{machine['cpu_model']} ({', '.join(flags) or 'no AVX2'}), {machine.get('cpu_count')} cores"


def build_card(method: str, results_path: str) -> ModelCard:
    """The card of the run in `benchmarks/results/<results_path>`."""
    data = json.loads((RESULTS / results_path).read_text())
    from hf_elastic.models.offline import SMOLLM2_ID

    cfg, rows = data["config"], data["rows"]
    if cfg["method"] != method:
        raise ValueError(f"{results_path} is a run of --method {cfg['method']}, not {method}.")
    title, description, tags, paper = method_info(method)
    top = headline(data)
    model_name = f"{SMOLLM2_ID.split('/')[-1]}-{method}-demo"
    card_data = ModelCardData(
        base_model=SMOLLM2_ID,
        license="apache-2.0",
        language="en",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["hf-elastic", "nas", "demo", method, *tags])),
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type="text-classification",
                dataset_type="small_fine_foods",
                dataset_name="Amazon fine-food reviews (held-out test)",
                metric_type="accuracy",
                metric_value=top["accuracy"],
            )
        ],
    )
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    table = [
        [name] + [format(r[key], spec) if r.get(key) is not None else "–" for key, _, spec in columns]
        for name, r in rows.items()
    ]
    if top["method"] == "lonas":
        versus = f"the {top['reference']} sub-network"
    else:
        versus = f"the {top['reference'].removesuffix(' (zero-shot)')} model in PyTorch fp32"
    sentence = (
        f"The sub-network the run published (`{top['name']}`) scores {top['accuracy']:.3f} against "
        f"{top['reference_accuracy']:.3f} for {versus}; it scores a batch {top['speedup']:.2f}× and decodes "
        f"{top['decode_speedup']:.2f}× as fast, in {top['size_mb']:.0f} MB against {top['reference_size_mb']:.0f} MB."
    )
    settings = [{"name": "base model", "value": SMOLLM2_ID}]
    settings += [
        {"name": label, "value": _value(cfg[key])}
        for key, label, only in SETTINGS
        if key in cfg and (only is None or method in only)
    ]
    search = f"{data['search']['evaluated']} / {data['search']['front']}"
    settings.append({"name": "sub-networks evaluated / on the front", "value": search})
    settings.append({"name": "machine", "value": _machine(data)})
    if data.get("latency_model"):
        lm = data["latency_model"]
        value = f"Spearman {lm['spearman']:.2f}, mean relative error {lm['mean_relative_error']:.1%}"
        settings.append({"name": f"latency model on the front ({lm['front_size']} sub-networks)", "value": value})
    hub_card = Path(results_path).with_name(Path(results_path).stem + "_hub_card.md")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=f"{title} on {SMOLLM2_ID.split('/')[-1]}: an hf-elastic demo run",
        summary=f"A {title} sub-network of [{SMOLLM2_ID}](https://huggingface.co/{SMOLLM2_ID}), trained and "
        "searched on Amazon fine-food reviews by hf-elastic's offline demo on a CPU.",
        command=f"hf-elastic demo --method {method}",
        results_path=f"benchmarks/results/{results_path}",
        hub_card=f"benchmarks/results/{hub_card}" if (RESULTS / hub_card).is_file() else None,
        method_description=description,
        paper_title=paper.title,
        paper_url=paper.url,
        settings=settings,
        test_rows=cfg["test_rows"],
        columns=["variant", *(header for _, header, _ in columns)],
        rows=table,
        headline=sentence,
        goal=data.get("goal", {}).get("text"),
        seconds=[{"name": k, "value": _value(v)} for k, v in data["seconds"].items()],
        total_seconds=_value(data["total_seconds"]),
    )


def add_run(output_dir: Path, results: Path = RESULTS, name: str | None = None) -> Path:
    """File the demo run in `output_dir` under this machine's folder of `results` as `demo_<method>.json`, or with
    `name` as `demo_<method>_<name>.json` (a run beside the card's, which it then leaves alone); returns its path."""
    if name is not None and not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"--name {name!r} must be lowercase letters, digits and underscores, e.g. seed1_repeat.")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import cpu_info, machine_slug

    from hf_elastic.utils import atomic_open

    source = output_dir / "demo_results.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; pass the --output folder of a finished demo run.")
    data = json.loads(source.read_text())
    method = data["config"]["method"]
    if data["config"].get("quick") or data["config"].get("model_dir"):
        raise ValueError(f"{source} is a --quick or --model-dir run; a card needs a run at the default sizes.")
    data["machine"] = cpu_info() | {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    stem = f"demo_{method.replace('-', '_')}" + (f"_{name}" if name else "")
    target = results / machine_slug(data) / f"{stem}.json"
    with atomic_open(target) as f:  # a crash never leaves half a results file in place of the last one
        f.write(json.dumps(data, indent=2) + "\n")
    hub_card = output_dir / "hub" / "README.md"
    if hub_card.is_file():
        with atomic_open(target.with_name(target.stem + "_hub_card.md"), "wb") as f:
            f.write(hub_card.read_bytes())
    if target.relative_to(results).as_posix() != RUNS[method]:
        print(f"filed {target}; set RUNS[{method!r}] to it to card this run instead of {RUNS[method]}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a card is stale or missing")
    parser.add_argument("--add-run", type=Path, metavar="DIR", help="file the demo run in DIR first (see above)")
    parser.add_argument("--name", help="with --add-run: file it as demo_<method>_<NAME>.json, beside the card's run")
    args = parser.parse_args(argv)
    if args.name and not args.add_run:
        parser.error("--name names the file of --add-run DIR; pass both")
    if args.add_run:
        print(f"filed {add_run(args.add_run, name=args.name)}")
    stale = []
    for method, results_path in RUNS.items():
        if not (RESULTS / results_path).is_file():
            print(f"{method}: no run on file ({results_path}); card not written", file=sys.stderr)
            continue
        text = str(build_card(method, results_path)) + "\n"
        target = CARDS / f"{method}.md"
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(method)
        if not args.check:
            target.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"stale model cards (run scripts/build_model_cards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{'stale' if args.check else 'wrote'}: {', '.join(stale) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
