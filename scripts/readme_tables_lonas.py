"""The README's LoNAS tables: channel order, the sampling ablation, the demo's front and runs (`readme_tables.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from build_model_cards import RUNS, headline
from table_helpers import AMD, DASH, RESULTS, UNRECORDED, load, markdown, pct, seed_rows


def _order_table(accuracy: Mapping[str, Mapping[str, float]], labels: Mapping[str, str], columns: Sequence[str],
                 bold: Sequence[str]) -> list[list[str]]:  # fmt: skip
    """Accuracy per channel order (rows) and width (columns); the best of each column in `bold` is bold."""
    best = {c: max(accuracy[k][c] for k in labels) for c in bold}
    rows = []
    for key, label in labels.items():
        cells = [(f"**{accuracy[key][c]:.3f}**" if best.get(c) == accuracy[key][c] else f"{accuracy[key][c]:.3f}")
                 for c in columns]  # fmt: skip
        rows.append([label, *cells])
    return rows


def lonas_order_zero_shot() -> str:
    accuracy = load(f"{AMD}/lonas_training_smollm2.json")["results"]["zero_shot"]
    labels = {
        "none": "none (original order)",
        "magnitude": "magnitude",
        "gradient": "gradient (4 batches of 8)",
        "activation": "**activation** (the same 4 batches)",
    }
    rows = _order_table(accuracy, labels, ("ffn_75", "ffn_50", "ffn_50_heads_6"), bold=("ffn_75", "ffn_50"))
    return markdown(["order", "FFN 75 %", "FFN 50 %", "FFN 50 % + 6 of 9 heads"], rows)


def lonas_order_trained() -> str:
    trained = load(f"{AMD}/lonas_training_smollm2_trained.json")["results"]["trained"]
    accuracy = {k.removeprefix("uniform+"): v["accuracy"] for k, v in trained.items()}
    labels = {
        "none": "none",
        "magnitude": "magnitude",
        "gradient": "gradient",
        "activation": "activation (the demo's)",
    }
    columns = ("ffn_100", "ffn_75", "ffn_50", "ffn_50_heads_6")
    rows = _order_table(accuracy, labels, columns, bold=("ffn_100", "ffn_75"))
    header = ["order before training", "max (100 %)", "FFN 75 %", "FFN 50 %", "FFN 50 % + 6 of 9 heads"]
    return markdown(header, rows)


def lonas_ablation() -> str:
    """Sampling and distillation at equal compute: test accuracy per width, mean ± std over the seeds run so far, and
    each variant's gain over uniform sampling at 58 % (every third layer at 75 % FFN, the others at 50 %) and 50 % FFN
    with its standard error."""
    trained = load(f"{AMD}/lonas_training_ablation.json")["results"]["trained"]
    labels = {
        "uniform": "uniform",
        "sandwich": "sandwich (max + min; the demo's)",
        "sandwich+inplace": "sandwich + in-place distillation",
        "progressive": "progressive shrinking",
        "progressive+inplace": "progressive + in-place distillation",
        "sandwich+ffn-only": "sandwich, FFN width alone elastic (rank 16, 9 heads)",
    }
    columns = ("ffn_100", "ffn_75", "ffn_58_mix", "ffn_50", "ffn_50_heads_6")
    rows = seed_rows(trained, labels, columns, "uniform", ("ffn_58_mix", "ffn_50"))
    header = ["sampling", "seeds", "max (100 %)", "FFN 75 %", "FFN 58 % (mix)", "FFN 50 %", "FFN 50 % + 6 of 9 heads"]
    return markdown([*header, "FFN 58 % over uniform (points)", "FFN 50 % over uniform (points)"], rows)


def lonas_sandwich_k() -> str:
    """Sandwich sampling with 0 or 1 random sub-network per step besides max and min (and with 56.25 % FFN added), at
    equal compute: test accuracy per uniform FFN width, mean ± std over the seeds, and the gain at 62.5 % FFN with
    its standard error."""
    trained = load(f"{AMD}/lonas_training_sandwich_k.json")["results"]["trained"]
    labels = {
        "sandwich+ffn4": "sandwich_k=0: max + min, 40 steps",
        "sandwich+ffn4+k1": "sandwich_k=1: max + min + one random, 27 steps",
        "sandwich+ffn5+k1": "sandwich_k=1 with 56.25 % FFN added (the demo's)",
    }
    columns = ("ffn_100", "ffn_75", "ffn_62.5", "ffn_56.25", "ffn_50")
    rows = seed_rows(trained, labels, columns, "sandwich+ffn4", ("ffn_62.5",))
    header = ["sampling", "seeds", "max (100 %)", "FFN 75 %", "FFN 62.5 %", "FFN 56.25 %", "FFN 50 %"]
    return markdown([*header, "FFN 62.5 % over sandwich_k=0 (points)"], rows)


def lonas_front() -> str:
    data = load(f"{UNRECORDED}/demo_lonas_uniform.json")
    rows, subnets = data["rows"], data["subnets"]
    labels = {
        "max": "max",
        "smallest useful": '"smallest useful": the median, 75 % FFN everywhere (none was within 2 points, so the '
        "most accurate faster one)",
        "next faster": '"next faster": an NSGA-II point with per-layer widths',
    }
    dense = rows["dense (zero-shot)"]
    out = [
        ["dense, zero-shot", "100 %", "100 %", f"{dense['params_m']:.1f} M", f"{dense['accuracy']:.3f} / {DASH}"]
        + [f"{dense['latency_ms']:.0f}", DASH, f"{dense['decode_tok_s']:.1f}", DASH, DASH, DASH]
        + [f"{dense['size_mb']:.0f} MB / {DASH}"]
    ]
    ir = next(k.split("(")[1].rstrip(")") for k in rows if k.startswith("max (") and "PyTorch" not in k)
    for name, label in labels.items():
        pt, ov, widths = rows[f"{name} (PyTorch)"], rows[f"{name} ({ir})"], subnets[name]["widths"]
        out.append(
            [label, pct(widths["ffn_fraction"]), pct(widths["heads_fraction"]), f"{pt['params_m']:.1f} M"]
            + [f"{pt['accuracy']:.3f} / {ov['accuracy']:.3f}", f"{pt['latency_ms']:.0f}"]
            + [f"{pt.get('speedup', 1.0):.2f}", f"{pt['decode_tok_s']:.1f}", f"{ov['latency_ms']:.0f}"]
            + [f"{ov.get('speedup', 1.0):.2f}", f"{ov['decode_tok_s']:.1f}"]
            + [f"{pt['size_mb']:.0f} / {ov['size_mb']:.0f} MB"]
        )
    header = ["sub-network", "FFN kept", "heads kept", "params", "test accuracy PyTorch / IR", "PyTorch ms/batch"]
    header += ["× faster", "tok/s", "OpenVINO ms/batch", "× faster", "tok/s", "size PyTorch / IR"]
    return markdown(header, out)


def demo_runs() -> str:
    """One row per `hf-elastic demo --method` run on file (`build_model_cards.RUNS`): its published sub-network
    against its reference."""
    rows = []
    for method, path in RUNS.items():
        if not (RESULTS / path).is_file():
            continue  # as build_model_cards.py: no run, no card and no row
        h = headline(load(path))
        rows.append(
            [f"`{method}`", h["name"], h["reference"], f"{h['accuracy']:.3f} / {h['reference_accuracy']:.3f}"]
            + [f"{h['speedup']:.2f}", f"{h['decode_speedup']:.2f}"]
            + [f"{h['size_mb']:.0f} / {h['reference_size_mb']:.0f} MB", f"{h['total_seconds']:.0f} s"]
            + [f"[card](model_cards/{method}.md), [JSON](benchmarks/results/{path})"]
        )
    header = ["`--method`", "published sub-network", "against", "test accuracy", "× faster (batch)"]
    return markdown([*header, "× faster (decode)", "size", "run time", "files"], rows)


def _pick_shape(pick: Mapping[str, Any]) -> list[str]:
    """A demo pick's FFN and heads kept and its mean LoRA rank, as table cells."""
    ranks = [v for k, v in pick["config"].items() if ".rank." in k]
    widths = pick["widths"]
    return [pct(widths["ffn_fraction"]), pct(widths["heads_fraction"]), f"{sum(ranks) / len(ranks):.3g}"]


def lonas_demo_repeat() -> str:
    """The default demo (sandwich) run twice with one seed: the picks, their accuracy and speed in each run, next to
    the pick of the same name in the earlier uniform-sampling run."""
    runs = [load(f"{AMD}/demo_lonas_rank_search.json"), load(f"{AMD}/demo_lonas_repeat.json")]
    uniform = load(f"{UNRECORDED}/demo_lonas_uniform.json")
    rows = []
    for name, pick in runs[0]["subnets"].items():
        same = [r["subnets"].get(name, {}).get("config") == pick["config"] for r in runs]
        test = [r["rows"][f"{name} (PyTorch)"] for r in runs]
        old = uniform["rows"].get(f"{name} (PyTorch)")
        rows.append(
            [name, "yes" if all(same) else "**no**", *_pick_shape(pick)]
            + [" / ".join(f"{r['subnets'][name]['val_accuracy']:.3f}" for r in runs)]
            + [" / ".join(f"{t['accuracy']:.3f}" for t in test)]
            + [" / ".join(f"{t.get('speedup', 1.0):.2f}" for t in test)]
            + [DASH if old is None else f"{old['accuracy']:.3f}, {old.get('speedup', 1.0):.2f}×"]
        )
    header = ["pick", "same in both runs", "FFN kept", "heads kept", "mean LoRA rank", "validation accuracy"]
    header += ["test accuracy", "× faster (PyTorch batch)", "uniform run's pick: test accuracy, × faster"]
    return markdown(header, rows)


def lonas_demo_searches() -> str:
    """The demo with seed 0 four ways: its search over ranks and widths, over widths with the ranks held at the max
    (the same super-network), trained and searched with FFN width alone elastic at three widths and at four, run twice
    and three times; then with seed 1; then seeds 0 (twice) and 1 with faster training and scoring, and searched
    by the predictor with seeds 0 and 1; then trained with one random sub-network per step besides max and min and
    searched from the uniform-width ladder, seeds 0 (twice) and 1; then seed 0 searched on sliced copies, timed as
    before and with the test rows scored by the picks in turn (twice, then four times more at the next stop); then
    with a fifth FFN width, 56.25 %, seed 0 twice, seed 1, and seed 0 searched by the predictor: each run's picks with
    their accuracy and speed-ups."""
    runs = {
        "ranks and widths searched": load(f"{AMD}/demo_lonas_rank_search.json"),
        "ranks held at the max": load(f"{AMD}/demo_lonas_fixed_ranks.json"),
        "FFN width alone elastic (rank 16, 9 heads), FFN 100/75/50 %": load(f"{AMD}/demo_lonas_ffn3.json"),
        "the same, run again": load(f"{AMD}/demo_lonas_ffn3_repeat.json"),
        "FFN 100/75/62.5/50 % (the default since)": load(f"{AMD}/demo_lonas_ffn4.json"),
        "the same, run again (OpenVINO timed in interleaved rounds too)": load(f"{AMD}/demo_lonas_ffn4_run2.json"),
        "the same, a third run": load(f"{AMD}/demo_lonas_ffn4_repeat.json"),
        "the same defaults, seed 1": load(f"{AMD}/demo_lonas_seed1.json"),
        "seed 0, faster training and scoring": load(f"{AMD}/demo_lonas_nsga2_faster.json"),
        "seed 0, faster, run again": load(f"{AMD}/demo_lonas_nsga2_faster_repeat.json"),
        "seed 1, faster": load(f"{AMD}/demo_lonas_seed1_faster.json"),
        "seed 0, predictor-guided search": load(f"{AMD}/demo_lonas_predictor.json"),
        "seed 1, predictor-guided search": load(f"{AMD}/demo_lonas_predictor_seed1.json"),
        "seed 0, sandwich_k=1 (one random sub-network per step) and the uniform ladder": load(
            f"{AMD}/demo_lonas_k1.json"
        ),
        "seed 0, sandwich_k=1 and the ladder, run again": load(f"{AMD}/demo_lonas_k1_repeat.json"),
        "seed 1, sandwich_k=1 and the ladder": load(f"{AMD}/demo_lonas_k1_seed1.json"),
        "seed 0, searched on sliced copies (timed as before)": load(f"{AMD}/demo_lonas_sliced_search.json"),
        "seed 0, sliced search, test rows scored in turn": load(f"{AMD}/demo_lonas.json"),
        "seed 0, the same, run again": load(f"{AMD}/demo_lonas_sliced_repeat.json"),
        "seed 0, the same, a third run (next stop)": load(f"{AMD}/demo_lonas_defaults_run3.json"),
        "seed 0, the same, a fourth run (next stop)": load(f"{AMD}/demo_lonas_defaults_run4.json"),
        "seed 0, a fifth run, the goal judged in PyTorch only (next stop)": load(
            f"{AMD}/demo_lonas_defaults_run5.json"
        ),
        "seed 0, a sixth run, the front re-measured in turns (next stop)": load(
            f"{AMD}/demo_lonas_defaults_run6.json"
        ),
        "seed 0, FFN 56.25 % added (the defaults now)": load(RUNS["lonas"]),
        "seed 0, the defaults now, run again": load(f"{AMD}/demo_lonas_ffn5_repeat.json"),
        "seed 1, the defaults now": load(f"{AMD}/demo_lonas_ffn5_seed1.json"),
        "seed 0, the defaults now, predictor-guided search": load(f"{AMD}/demo_lonas_ffn5_predictor.json"),
    }
    rows = []
    for label, run in runs.items():
        for name, pick in run["subnets"].items():
            speed = [run["rows"][f"{name} ({rt})"].get("speedup", 1.0) for rt in ("PyTorch", "OpenVINO INT8")]
            rows.append(
                [label, name, *_pick_shape(pick), f"{pick['val_accuracy']:.3f}"]
                + [f"{run['rows'][f'{name} (PyTorch)']['accuracy']:.3f}", *(f"{x:.2f}" for x in speed)]
            )
    header = ["demo run", "pick", "FFN kept", "heads kept", "mean LoRA rank", "validation accuracy", "test accuracy"]
    return markdown([*header, "× faster (PyTorch batch)", "× faster (OpenVINO INT8 batch)"], rows)


def lonas_ranks() -> str:
    """Test accuracy of the default demo's super-network per LoRA rank (rows) and FFN width (columns), all heads."""
    data = load(f"{AMD}/lonas_ranks.json")
    scores = data["scores"].values()
    widths = sorted({s["ffn"] for s in scores}, reverse=True)
    rows = []
    for rank in sorted({s["rank"] for s in scores}, reverse=True):
        cells = []
        for ffn in widths:
            s = next(s for s in scores if s["rank"] == rank and s["ffn"] == ffn)
            pick = f" (the demo's {s['demo_pick']})" if s["demo_pick"] else ""
            cells.append(f"{s['accuracy_all_rows']:.3f} / {s['accuracy_demo_rows']:.3f}{pick}")
        rows.append([f"rank {rank}", *cells])
    header = [f"all {data['rows']['all']} / the demo's {data['rows']['demo']} test rows"]
    return markdown(header + [f"FFN {pct(w)}" for w in widths], rows)
