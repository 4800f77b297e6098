"""hf_elastic's SparsePEFT and QA-SparsePEFT training steps against upstream SQFT's formulations of the same maths.

Variants (fresh subprocess each, rounds interleaved, medians), all r=32 on q,k,v,o,gate,up,down, LoRA dropout 0, on
the same 50 %-magnitude-pruned random Llama:
- `lora`: plain peft LoRA on the sparse fp32 base (reference; it does not keep the sparsity when merged);
- `sparsepeft`: hf_elastic `NLSConfig(rank_choices=[32], sparse_adapter=True)`, fused `_MaskedLora`;
- `upstream_sparse`: upstream SQFT's `base(x) + F.linear(x, (B @ A) * scaling * (W != 0))`, plain autograd
  (`upstream_sqft.UpstreamSparseLoraLinear`);
- `qa_sparsepeft`: hf_elastic `quantization_aware=True` on an INT4 base (RTN, asymmetric, group 32) quantized with
  `keep_residual=True` (uint8 codes + int8 residual);
- `upstream_qa`: upstream SQFT's `F.linear(x, DQ(Q(W + M ⊙ sBA)))` with a straight-through round over a float copy of
  the weights, on the same group-32 grid (`upstream_sqft.UpstreamQALoraLinear`);
- `nncf_fq_lora_nls`: NNCF `compress_weights(mode=INT4_ASYM, group_size=32, compression_format=FQ_LORA_NLS)` with
  LoRA rank 32 at its maximum active rank, trained as NNCF's quantizers set it up (`enable_gradients`: LoRA A/B in
  bf16, NNCF's default, plus the quantizers' ranges); NNCF keeps the fp32 weights and fake-quantizes `W + BA` every
  forward, with no sparsity mask, and by default also fake-quantizes the embedding and LM head to INT8. Its torch
  extension compiles on first use (cached in `TORCH_EXTENSIONS_DIR`, default ~/.cache/hf_elastic/torch_extensions;
  `NNCF_EXTENSION_LOAD_TIMEOUT=0`); the warm-up step absorbs it.

Dense GEMMs (those of size tokens x in x out) per adapted layer and training step; the adapter products (rank r) and
elementwise work are not counted:
- `lora`: 2. Forward `x Wᵀ`; backward `g W` (the frozen base needs no weight gradient).
- `sparsepeft`: 3. Forward `x (W + M ⊙ sBA)ᵀ` in one matmul; backward `g W_eff` and the masked `gᵀx` that is
  projected onto A and B.
- `upstream_sparse`: 5. Forward `x Wᵀ` and `x ΔWᵀ`; backward `g W`, `g ΔW` and `gᵀx` for ΔW.
- `qa_sparsepeft`: 3. As `sparsepeft`, on the dequantized adapted grid.
- `upstream_qa`: 3. Forward `x W_dqᵀ`; backward `g W_dq` and `gᵀx` for W_dq. Same GEMM count: the difference is
  what autograd stores (several dense out x in tensors per layer) and the fp32 float copy of the weights.
- `nncf_fq_lora_nls`: 3, as `upstream_qa` (fake-quantized `W + BA`).
Theoretical ratios printed beside the measured ones are these GEMM ratios (upstream_sparse / sparsepeft = 5/3,
upstream_qa / qa_sparsepeft = 1); the measured step ratio is diluted by attention, embeddings, the LM head, the loss
and the optimizer, which every variant shares.

Writes benchmarks/results/<machine>/peers.json (with the CPU model and ISA).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import MODEL_KWARGS, MODEL_TEXT, TARGETS, cpu_info, run_interleaved, summarize, time_training, write_result

VARIANTS = ("lora", "sparsepeft", "upstream_sparse", "qa_sparsepeft", "upstream_qa", "nncf_fq_lora_nls")
GEMMS = {"lora": 2, "sparsepeft": 3, "upstream_sparse": 5, "qa_sparsepeft": 3, "upstream_qa": 3, "nncf_fq_lora_nls": 3}
PAIRS = (
    ("upstream_sparse", "sparsepeft"),
    ("upstream_qa", "qa_sparsepeft"),
    ("nncf_fq_lora_nls", "qa_sparsepeft"),
)
GROUP_SIZE = 32


def run_variant(variant: str, steps: int, warmup: int, seq_len: int, batch_size: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from upstream_sqft import UpstreamQALoraConfig, UpstreamSparseLoraConfig

    from hf_elastic import NLSConfig, quantize, sparsify

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_KWARGS))
    sparsify(model, method="magnitude", sparsity=0.5, show_progress=False)
    if variant == "nncf_fq_lora_nls":
        return _run_nncf(model, steps, warmup, seq_len, batch_size)
    common = {"lora_alpha": 64, "lora_dropout": 0.0, "target_modules": TARGETS}
    if variant == "lora":
        config = LoraConfig(r=32, **common)
    elif variant == "upstream_sparse":
        config = UpstreamSparseLoraConfig(r=32, **common)
    elif variant == "upstream_qa":
        config = UpstreamQALoraConfig(r=32, bits=4, group_size=GROUP_SIZE, **common)
    else:
        qa = variant == "qa_sparsepeft"
        if qa:
            quantize(model, bits=4, group_size=GROUP_SIZE, keep_residual=True, show_progress=False)
        config = NLSConfig(rank_choices=[32], sparse_adapter=True, quantization_aware=qa, **common)
    model = get_peft_model(model, config)
    return time_training(model, steps, warmup, seq_len, batch_size)


def _run_nncf(model, steps: int, warmup: int, seq_len: int, batch_size: int) -> dict:
    """NNCF INT4 QAT with elastic LoRA rank (FQ_LORA_NLS) on `model`, timed like the others."""
    import os

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "hf_elastic" / "torch_extensions"))
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    import nncf
    import torch
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    data = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    model = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=GROUP_SIZE,
        dataset=nncf.Dataset([{"input_ids": data}]),
        compression_format=nncf.CompressionFormat.FQ_LORA_NLS,
        advanced_parameters=AdvancedCompressionParameters(lora_adapter_rank=32),
    )
    model.requires_grad_(False)
    quantizers = [m for m in model.modules() if hasattr(m, "set_active_rank")]
    if not quantizers:
        raise RuntimeError("nncf.compress_weights(FQ_LORA_NLS) inserted no LoRA-NLS quantizers.")
    for quantizer in quantizers:
        quantizer.set_active_rank(32)
        quantizer.enable_gradients()
    return time_training(model, steps, warmup, seq_len, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "peers.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = {
        "steps": args.steps,
        "warmup": args.warmup,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    if args.worker:
        import json

        print(json.dumps(run_variant(args.worker, **sizes)))
        return
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    runs = run_interleaved(__file__, tuple(args.variants), args.rounds, extra)
    summary, ratios = summarize(runs, args.variants[0])
    print(f"\n{'variant':<16}{'dense GEMMs/layer':>18}")
    for v in args.variants:
        print(f"{v:<16}{GEMMS[v]:>18}")
    comparisons = {}
    print(f"\n{'upstream / ours':<32}{'GEMM ratio':>11}{'step ratio':>11}{'peak RSS ratio':>15}")
    for upstream, ours in PAIRS:
        if upstream in summary and ours in summary:
            comparisons[f"{upstream}/{ours}"] = {
                "gemm_ratio": GEMMS[upstream] / GEMMS[ours],
                "step_ratio": summary[upstream]["step_s"] / summary[ours]["step_s"],
                "peak_rss_ratio": summary[upstream]["peak_rss_mb"] / summary[ours]["peak_rss_mb"],
                "train_rss_ratio": summary[upstream]["train_rss_mb"] / summary[ours]["train_rss_mb"],
            }
            c = comparisons[f"{upstream}/{ours}"]
            print(
                f"{upstream + ' / ' + ours:<32}{c['gemm_ratio']:>11.3f}{c['step_ratio']:>11.3f}"
                f"{c['peak_rss_ratio']:>15.3f}"
            )
    result = {
        "benchmark": "peers",
        "model": MODEL_TEXT,
        "batch": [args.batch_size, args.seq_len],
        "adapters": "r=32 on q,k,v,o,gate,up,down, dropout 0",
        "base": f"50 % magnitude-pruned; QA variants INT4 asymmetric group {GROUP_SIZE}",
        "machine": cpu_info(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup": args.warmup,
        "threads_per_worker": args.threads or None,
        "dense_gemms_per_layer": {v: GEMMS[v] for v in args.variants},
        "median": summary,
        f"ratio_vs_{args.variants[0]}": ratios,
        "upstream_vs_ours": comparisons,
        "runs": runs,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
