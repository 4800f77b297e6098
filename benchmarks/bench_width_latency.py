"""What elastic width buys at inference: latency of physically sliced LoNAS sub-networks, with the physical limit.

`--model smollm2` (SmolLM2-135M-Instruct, the demo model: 30 layers, hidden 576, FFN 1536, 9 heads in 3 key/value
groups, tied 49,152-token embedding) or `--model random-llama` (the benchmark Llama of `common.py`, 8 heads, 8 groups).
Sub-networks with every layer at 100/75/60/50 % FFN width (rounded to multiples of the INT4 group size: SmolLM2's
60 % is 896 of 1536 channels, 58 %), at 2/3 and 1/3 of the heads (SmolLM2: whole groups; the
random Llama: 75/50 %) and the smallest (50 % FFN + the first head cut) are merged and sliced (`extract_model`), then
timed in PyTorch fp32 and as OpenVINO fp32 and INT4 (NNCF, group 64 or 32) IRs: a forward pass of a 4 x 128 batch
(all logits) and greedy decoding (32-token prompt, 32 new tokens; tokens/s = 31 / (generate 32 - generate 1)).
Models load once and warm up; rounds interleave every (runtime, sub-network); medians. `speedup_*` = full latency /
sub-network latency in the same runtime. Beside each, `bound_*`: the largest speed-up the removed work allows, from
the multiply-accumulates per token (forward) and from the weight bytes read per token (decoding; INT4 IRs hold layer
weights at about 0.56 byte and the embedding / LM head at 1 byte, as NNCF writes them).

Also the latency model: `LatencyTable.measure` (PyTorch, per-layer hooks) checked with `validate` on random per-layer
sub-networks (Spearman rank correlation, mean relative error), and an OpenVINO table built from the uniform-width
IRs (each layer's share of the whole-model difference) checked on `--ov-validate` random sub-networks exported to IR.
Writes benchmarks/results/<machine>/width_latency_<model>.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, this_machine_path, write_result

RUNTIMES = ("torch_fp32", "ov_fp32", "ov_int4")


def load_base(name: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        from hf_elastic.models.offline import smollm2_dir

        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32), "SmolLM2-135M-Instruct"
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS)), MODEL_TEXT


def widths(config, supernet) -> dict[str, int]:
    """Per-layer FFN channels and heads of a sub-network config."""
    return {d.name: config[d.name] for d in supernet.space if d.kind in ("ffn", "heads")}


def layer_weights(cfg, ffn: list[int], heads: list[int]) -> tuple[int, int]:
    """Weights of the elastic layers at per-layer FFN channels and heads: FFN (gate, up, down), attention (q,k,v,o)."""
    hidden, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    attention = sum(2 * hidden * h * head_dim + 2 * hidden * (h // group) * head_dim for h in heads)
    return sum(3 * hidden * i for i in ffn), attention


def macs_per_token(cfg, ffn: list[int], heads: list[int], context: int) -> dict[str, float]:
    """Multiply-accumulates per token: the elastic part (FFN, attention with its scores and values over `context`
    tokens) and the rest (LM head)."""
    ffn_w, attention_w = layer_weights(cfg, ffn, heads)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    scores = sum(2 * context * h * head_dim for h in heads)
    return {"ffn": ffn_w, "attention": attention_w + scores, "lm_head": cfg.hidden_size * cfg.vocab_size}


def weight_bytes(cfg, ffn: list[int], heads: list[int], layer_bytes: float, head_bytes: float) -> dict[str, float]:
    """Weight bytes read per decoded token: layer weights at `layer_bytes` per weight, the LM head at `head_bytes`."""
    ffn_w, attention_w = layer_weights(cfg, ffn, heads)
    return {
        "ffn": ffn_w * layer_bytes,
        "attention": attention_w * layer_bytes,
        "lm_head": cfg.hidden_size * cfg.vocab_size * head_bytes,
    }


def timers(model, vocab: int):
    import torch

    batch = torch.randint(3, vocab, (4, 128), generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(3, vocab, (1, 32), generator=torch.Generator().manual_seed(0))

    def forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
        return time.perf_counter() - start

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    return forward, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "random-llama"), default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--validate", type=int, default=8, help="random sub-networks to check the PyTorch table on")
    parser.add_argument("--ov-validate", type=int, default=3, help="random sub-networks to check the OpenVINO table")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    output = this_machine_path(
        args.output or Path(__file__).parent / "results" / f"width_latency_{args.model.replace('-', '_')}.json"
    )

    from peft import get_peft_model

    from hf_elastic import ElasticLoraConfig, get_supernet
    from hf_elastic.export import export_openvino, int4_group_size, load_openvino
    from hf_elastic.search import LatencyTable, spearman

    base, model_text = load_base(args.model)
    cfg = base.config
    full_ffn, heads, groups = cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    group = heads // groups
    group_size = int4_group_size(base)  # narrower FFN widths stay multiples of it, so INT4 groups still fit
    ffn_choices = sorted({full_ffn, *(group_size * round(f * full_ffn / group_size) for f in (0.75, 0.6, 0.5))})[::-1]
    head_choices = sorted({g * group for g in (groups, round(groups * 2 / 3) or 1, max(1, groups // 3))}, reverse=True)
    if groups >= 4:
        head_choices = sorted({g * group for g in (groups, round(groups * 0.75), groups // 2)}, reverse=True)
    peft_model = get_peft_model(
        base,
        ElasticLoraConfig(
            rank_choices=[8],
            ffn_width_choices=ffn_choices,
            head_choices=head_choices,
            target_modules=["q_proj", "v_proj"],
        ),
    )
    supernet = get_supernet(peft_model)
    layers = cfg.num_hidden_layers
    configs = {f"ffn_{round(100 * c / full_ffn)}": {"ffn": c, "heads": heads} for c in ffn_choices}
    configs |= {f"heads_{h}_of_{heads}": {"ffn": full_ffn, "heads": h} for h in head_choices[1:]}
    configs[f"ffn_50_heads_{head_choices[1]}"] = {"ffn": ffn_choices[-1], "heads": head_choices[1]}

    def subnet(ffn: int, h: int) -> dict[str, int]:
        config = supernet.space.max_config()
        for d in supernet.space:
            if d.kind in ("ffn", "heads"):
                config[d.name] = ffn if d.kind == "ffn" else h
        return config

    work = Path(tempfile.mkdtemp(prefix="width_latency_"))
    models: dict[tuple[str, str], object] = {}
    export_s = {}
    for name, w in configs.items():
        sliced = supernet.extract_model(subnet(w["ffn"], w["heads"])).eval()
        if "torch_fp32" in args.runtimes:
            models[("torch_fp32", name)] = sliced
        for runtime, fmt in (("ov_fp32", "fp32"), ("ov_int4", "int4")):
            if runtime in args.runtimes:
                start = time.perf_counter()
                kwargs = {"group_size": group_size} if fmt == "int4" else {}
                folder = export_openvino(sliced, work / f"{runtime}-{name}", weight_format=fmt, **kwargs)
                export_s[f"{runtime}-{name}"] = time.perf_counter() - start
                models[(runtime, name)] = load_openvino(folder)
        print(f"prepared {name}", flush=True)

    vocab = cfg.vocab_size
    fns = {key: timers(m, vocab) for key, m in models.items()}
    for forward, generate in fns.values():  # first inference of each shape, untimed
        forward()
        generate(2)
    samples = {key: {"forward_s": [], "decode_tok_s": []} for key in models}
    for r in range(args.rounds):
        for key, (forward, generate) in fns.items():
            samples[key]["forward_s"].append(forward())
            one, many = generate(1), generate(32)
            samples[key]["decode_tok_s"].append(31 / (many - one))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    median = {f"{rt}/{n}": {k: statistics.median(v) for k, v in s.items()} for (rt, n), s in samples.items()}

    results: dict[str, dict] = {}
    full_name = next(iter(configs))
    int4_layer_bytes = 0.5 + 4 / group_size  # 4-bit code + an f16 scale and zero point per group
    for name, w in configs.items():
        ffn_l, heads_l = [w["ffn"]] * layers, [w["heads"]] * layers
        macs = macs_per_token(cfg, ffn_l, heads_l, context=64)
        full_macs = macs_per_token(cfg, [full_ffn] * layers, [heads] * layers, context=64)
        entry = {
            "ffn_channels": w["ffn"],
            "heads": w["heads"],
            "params": sum(p.numel() for p in models[("torch_fp32", name)].parameters())
            if ("torch_fp32", name) in models
            else None,
            "bound_forward": sum(full_macs.values()) / sum(macs.values()),
        }
        for runtime in args.runtimes:
            key, ref = f"{runtime}/{name}", f"{runtime}/{full_name}"
            layer_b, head_b = (4.0, 4.0) if runtime != "ov_int4" else (int4_layer_bytes, 1.0)
            full_bytes = weight_bytes(cfg, [full_ffn] * layers, [heads] * layers, layer_b, head_b)
            sub_bytes = weight_bytes(cfg, ffn_l, heads_l, layer_b, head_b)
            entry[runtime] = {
                "forward_ms": 1000 * median[key]["forward_s"],
                "decode_tok_s": median[key]["decode_tok_s"],
                "speedup_forward": median[ref]["forward_s"] / median[key]["forward_s"],
                "speedup_decode": median[key]["decode_tok_s"] / median[ref]["decode_tok_s"],
                "bound_decode": sum(full_bytes.values()) / sum(sub_bytes.values()),
            }
        results[name] = entry
    full_macs = macs_per_token(cfg, [full_ffn] * layers, [heads] * layers, context=64)
    share = {k: v / sum(full_macs.values()) for k, v in full_macs.items()}

    print(
        f"\n{model_text}: per-token MACs share ffn {share['ffn']:.1%}, attention {share['attention']:.1%}, "
        f"LM head {share['lm_head']:.1%} (elastic: {share['ffn'] + share['attention']:.1%})"
    )
    print(
        f"{'sub-network':<22}{'bound fwd':>10}"
        + "".join(f"{rt + ' fwd':>16}{'dec':>7}{'bound':>7}" for rt in args.runtimes)
    )
    for name, e in results.items():
        cells = "".join(
            f"{e[rt]['speedup_forward']:>15.2f}x{e[rt]['speedup_decode']:>6.2f}x{e[rt]['bound_decode']:>6.2f}x"
            for rt in args.runtimes
        )
        print(f"{name:<22}{e['bound_forward']:>9.2f}x{cells}")

    latency_model = {}
    rng = random.Random(0)
    if args.validate:
        table = LatencyTable.measure(supernet, batch_size=4, seq_len=128, repeats=5)
        table.save(output.with_name(f"latency_table_{args.model.replace('-', '_')}.json"))
        sample = [supernet.space.sample(rng) for _ in range(args.validate)]
        check = table.validate(supernet, sample)
        latency_model["pytorch"] = check | {"sub_networks": len(sample)}
        print(
            f"PyTorch table: Spearman {check['spearman']:.3f}, mean relative error {check['mean_relative_error']:.1%}"
        )
    if args.ov_validate and "ov_fp32" in args.runtimes:
        t_full = median[f"ov_fp32/{full_name}"]["forward_s"] * 1000
        layers_table: dict[str, dict[str, float]] = {}
        for d in supernet.space:
            if d.kind not in ("ffn", "heads"):
                continue
            for c in d.choices:
                w = {"ffn": c, "heads": heads} if d.kind == "ffn" else {"ffn": full_ffn, "heads": c}
                name = next((n for n, v in configs.items() if v == w), None)
                if name is not None:
                    layers_table.setdefault(d.name, {})[str(c)] = (
                        median[f"ov_fp32/{name}"]["forward_s"] * 1000 - t_full
                    ) / layers
        ov_table = LatencyTable(t_full, layers_table, 4, 128, backend="openvino-fp32")
        predicted, measured = [], []
        for i in range(args.ov_validate):
            config = supernet.space.sample(rng)
            config |= {d.name: rng.choice([c for c in d.choices if str(c) in layers_table[d.name]])
                       for d in supernet.space if d.kind in ("ffn", "heads")}  # fmt: skip
            folder = export_openvino(supernet.extract_model(config).eval(), work / f"check-{i}")
            forward, generate = timers(load_openvino(folder), vocab)
            forward()
            measured.append(1000 * statistics.median(forward() for _ in range(args.rounds)))
            predicted.append(ov_table.predict(config))
        latency_model["openvino_fp32"] = {
            "spearman": spearman(predicted, measured) if len(measured) > 1 else None,
            "mean_relative_error": statistics.fmean(abs(p - m) / m for p, m in zip(predicted, measured, strict=True)),
            "predicted": predicted,
            "measured": measured,
            "sub_networks": len(measured),
        }
        print(f"OpenVINO table: {latency_model['openvino_fp32']}")

    write_result(
        output,
        {
            "benchmark": "width_latency",
            "model": model_text,
            "workload": "forward: batch 4 x 128 tokens, all logits; decode: 32-token prompt, greedy, 32 new tokens",
            "int4_group_size": group_size,
            "macs_share": share,
            "results": results,
            "latency_model": latency_model,
            "rounds": args.rounds,
            "export_s": export_s,
        },
    )


if __name__ == "__main__":
    main()
