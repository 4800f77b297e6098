"""PyTorch latency of a LoNAS sub-network at 60 % FFN width (physically sliced) against the dense model.

ElasticLoraConfig on the benchmark Llama, FFN width choices [1376, 826] channels (826 = 60 %), heads kept;
`extract_model` merges and slices. Forward of a 4 x 128 batch and greedy decoding of 32 tokens, interleaved rounds,
medians. Writes benchmarks/results/width_latency.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, TARGETS, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "width_latency.json"))
    args = parser.parse_args()

    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import ElasticLoraConfig, get_supernet

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS)).eval()
    narrow = round(0.6 * MODEL_KWARGS["intermediate_size"])
    model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS)),
        ElasticLoraConfig(
            rank_choices=[16], ffn_width_choices=[MODEL_KWARGS["intermediate_size"], narrow], target_modules=TARGETS
        ),
    )
    supernet = get_supernet(model)
    supernet.reorder_channels("magnitude")
    small = supernet.extract_model("min").eval()
    models = {"dense": dense, "ffn_60": small}
    ids = torch.randint(0, MODEL_KWARGS["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :32]
    times: dict[str, dict[str, list[float]]] = {k: {"forward_s": [], "decode_s": []} for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(input_ids=ids)
            m.generate(prompt, max_new_tokens=4, do_sample=False)
        for _ in range(args.rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(input_ids=ids)
                times[name]["forward_s"].append(time.perf_counter() - start)
                start = time.perf_counter()
                m.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                times[name]["decode_s"].append(time.perf_counter() - start)
    median = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    speedup = {m: median["dense"][m] / median["ffn_60"][m] for m in ("forward_s", "decode_s")}
    for k in models:
        print(
            f"{k:<8} params {params[k] / 1e6:6.1f} M  forward {median[k]['forward_s'] * 1000:7.1f} ms  "
            f"decode 32 tokens {median[k]['decode_s'] * 1000:7.1f} ms"
        )
    print(f"speed-up: forward {speedup['forward_s']:.2f}x, decode {speedup['decode_s']:.2f}x")
    write_result(
        args.output,
        {
            "benchmark": "width_latency",
            "model": MODEL_TEXT,
            "ffn_width": f"{narrow} of {MODEL_KWARGS['intermediate_size']} channels in every layer",
            "params": params,
            "median": median,
            "speedup": speedup,
            "rounds": args.rounds,
        },
    )


if __name__ == "__main__":
    main()
