"""bf16/fp16 weights on every device: fused SparsePEFT / QA-SparsePEFT, Wanda + RTN/GPTQ, merges, NASTrainer and
search. Each test runs on CPU and, marked `gpu`, on CUDA when a GPU is present (skipped otherwise)."""

from __future__ import annotations

import copy
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import ARCHS, args, dataset, make_config, pruned, qa_config, quantized
from peft import get_peft_model

from hf_elastic import (
    LatencyEvaluator,
    LossEvaluator,
    NASTrainer,
    NLSConfig,
    QuantLinear,
    export_subnetwork,
    get_supernet,
    load_exported,
    merge_subnet_adapter,
    quantize,
    search_subnetworks,
    sparsify,
)
from hf_elastic.compression.quantization import expand_groups
from hf_elastic.compression.sparsity import weight_masks
from hf_elastic.devices import ieee_fp32_matmul
from hf_elastic.models.arch import weight_out_in
from hf_elastic.tuners.nls.layer import ElasticLoraLinear, _effective_weight

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=(pytest.mark.gpu, needs_cuda))]
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# max |low - float32| / max |float32| of outputs and gradients: a few roundings of the dtype's epsilon
TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
ROOT = Path(__file__).resolve().parents[1]
ARCH = ARCHS["llama"]


def _batch(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in ARCH.batch(seed).items()}


def _relative(low: torch.Tensor, ref: torch.Tensor) -> float:
    low, ref = low.detach().float(), ref.detach()
    return float((low - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------------- fused layer
class _Proj(nn.Module):
    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _adapted_layer(dtype: torch.dtype, qa: bool, device: str) -> tuple[nn.Module, ElasticLoraLinear]:
    """A 128x256 linear layer with half of each row zero, in `dtype` (INT4 with its residual when `qa`), under a
    rank-16 SparsePEFT / QA-SparsePEFT adapter with a non-zero B. The same seed gives the same values in every dtype
    that holds the bf16-rounded weights exactly."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight.scatter_(1, linear.weight.abs().argsort(1)[:, :128], 0.0)
        linear.to(torch.bfloat16).to(dtype)
    base = QuantLinear.from_linear(linear, 4, 32, residual=True) if qa else linear
    config = NLSConfig(
        rank_choices=[16], target_modules=["proj"], lora_alpha=32, lora_dropout=0.0, sparse_adapter=True,
        quantization_aware=qa, init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(1)
    model = get_peft_model(_Proj(base).to(device), config)
    return model, model.base_model.model.proj


@pytest.mark.parametrize("qa", [False, True], ids=["sparsepeft", "qa_sparsepeft"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_adapter_in_low_precision_matches_float32(device, dtype, qa):
    low, low_layer = _adapted_layer(dtype, qa, device)
    ref, ref_layer = _adapted_layer(torch.float32, qa, device)
    if qa:
        assert torch.equal(low_layer.base_layer.qweight, ref_layer.base_layer.qweight)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, 256, generator=g).to(device, dtype)
    x_low, x_ref = x.clone().requires_grad_(), x.float().requires_grad_()
    grad = torch.randn(4, 64, 128, generator=g).to(device)
    y_low = low(x_low)
    y_low.backward(grad.to(dtype))
    with ieee_fp32_matmul():  # a float32 reference even where TF32 was switched on
        y_ref = ref(x_ref)
        y_ref.backward(grad)
    assert y_low.dtype == dtype and x_low.grad.dtype == dtype
    pairs = {"output": (y_low, y_ref), "grad_x": (x_low.grad, x_ref.grad)}
    for name in ("lora_A", "lora_B"):
        p_low, p_ref = getattr(low_layer, name)["default"].weight, getattr(ref_layer, name)["default"].weight
        assert p_low.grad.dtype == torch.float32 and p_low.device.type == device
        pairs[name] = (p_low.grad, p_ref.grad)
    for name, (a, b) in pairs.items():
        assert _relative(a, b) <= TOLERANCE[dtype], name


def _fused_and_merged_weights(model, merged, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, ElasticLoraLinear):
            continue
        a, b = layer.lora_weights("default")
        grid = layer.base_grid() if layer.quantization_aware["default"] else None
        weight = None if grid is not None else layer.base_weight()
        fused, _ = _effective_weight(weight, a, b, layer.scaling["default"], layer._mask("default"), grid)
        out = merged.get_submodule(name)
        merged_weight = out.dequantize(dtype) if isinstance(out, QuantLinear) else out.weight.to(dtype)
        pairs.append((fused.to(dtype), merged_weight))
    return pairs


@pytest.mark.parametrize("mode", ["weights", "autocast"])
@pytest.mark.parametrize("qa", [False, True], ids=["sparsepeft", "qa_sparsepeft"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_forward_equals_the_merged_model_bit_for_bit(device, dtype, qa, mode):
    """The adapted weight is rounded to bf16/fp16 once, as peft's merge rounds it, and built outside autocast: what
    the adapter trains through is the merged model, in `dtype` weights or under mixed precision."""
    base = ARCH.build()
    model = quantized(base) if qa else pruned(base)
    if mode == "weights":
        model = model.to(dtype)
    config = qa_config(ARCH, False) if qa else make_config("nls", ARCH, sparse_adapter=True, init_lora_weights=False)
    model = get_peft_model(model.to(device), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)  # deltas of a trained adapter: far below most weights, near the rounding step
    batch = _batch(device, 3)
    autocast = torch.autocast(device, dtype, enabled=mode == "autocast")
    with torch.no_grad():
        with autocast:
            fused = model(**batch).logits
        merged = get_supernet(model).extract_model("max")
        with autocast:
            out = merged(**batch).logits
    assert fused.dtype == dtype and torch.equal(fused, out)
    pairs = _fused_and_merged_weights(model, merged, dtype)
    assert len(pairs) == 14 and all(torch.equal(f, m) for f, m in pairs)


# ---------------------------------------------------------------------------------------------------- compression
def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("device", DEVICES)
def test_wanda_rtn_and_gptq_on_a_bf16_model(device):
    base = ARCH.build().to(torch.bfloat16)
    ids = torch.randint(1, 96, (16, 32), generator=torch.Generator().manual_seed(0))
    model, ref = copy.deepcopy(base).to(device), copy.deepcopy(base).float()
    calibration = {"calibration": ids, "seq_len": 32, "num_samples": 16, "show_progress": False}
    sparsify(model, "wanda", 0.5, **calibration)
    sparsify(ref, "wanda", 0.5, **calibration)
    masks, ref_masks = weight_masks(model), weight_masks(ref)
    for name, mask in masks.items():
        assert mask.device.type == device and weight_out_in(model.get_submodule(name)).dtype == torch.bfloat16
        assert ((~mask).sum(1) == mask.shape[1] // 2).all(), name
    # bf16 activations against float32 ones: only near-ties may differ
    agree = sum(int((m.cpu() == ref_masks[k]).sum()) for k, m in masks.items())
    assert agree / sum(m.numel() for m in masks.values()) >= 0.99

    errors = {}
    for method in ("rtn", "gptq"):
        q, q_ref = copy.deepcopy(model), copy.deepcopy(model).to("cpu", torch.float32)
        errors[method] = quantize(
            q, bits=4, group_size=16, method=method, keep_residual=True, **calibration
        ).mean_output_error
        quantize(q_ref, bits=4, group_size=16, method=method, keep_residual=True, **calibration)
        layers, ref_layers = _quant_layers(q), _quant_layers(q_ref)
        assert len(layers) == 14
        same = 0
        for name, layer in layers.items():
            codes = layer.qweight
            assert codes.device.type == device and codes.dtype == torch.uint8 and int(codes.max()) <= 15
            assert layer.scales.dtype == torch.float32 and layer.residual.abs().max() <= 127
            pruned_ = ~masks[name]
            assert torch.equal(codes[pruned_], expand_groups(layer.zeros, 16)[pruned_]), name
            assert int((layer.dequantize(torch.bfloat16)[pruned_] != 0).sum()) == 0
            same += int((codes.cpu() == ref_layers[name].qweight).sum())
            if method == "rtn":  # elementwise in float32: bf16 weights on any device give the float32 codes
                assert torch.equal(codes.cpu(), ref_layers[name].qweight)
                assert torch.equal(layer.scales.cpu(), ref_layers[name].scales)
        assert same / sum(layer.qweight.numel() for layer in layers.values()) >= 0.99
    assert errors["gptq"] < errors["rtn"]


def test_ieee_fp32_matmul_turns_tf32_off_and_restores_it():
    # Both TF32 APIs in one fresh process (once the new one is used, the legacy flag refuses to be read), loading
    # hf_elastic/utils.py alone to skip the package's imports.
    path = sys.modules[ieee_fp32_matmul.__module__].__file__
    code = (
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('utils', {path!r})\n"
        "utils = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(utils)\n"
        "ieee_fp32_matmul = utils.ieee_fp32_matmul\n"
        "m = torch.backends.cuda.matmul\n"
        "with ieee_fp32_matmul():\n"
        "    assert m.allow_tf32 is False\n"
        "m.allow_tf32 = True\n"
        "with ieee_fp32_matmul():\n"
        "    assert m.allow_tf32 is False\n"
        "assert m.allow_tf32 is True\n"
        "torch.backends.fp32_precision = 'tf32'\n"
        "with ieee_fp32_matmul():\n"
        "    assert m.fp32_precision == 'ieee'\n"
        "assert m.fp32_precision == 'tf32'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@needs_cuda
def test_gptq_on_cuda_ignores_tf32():
    # A fresh process: transformers' torch_compile/tf32 arguments may have switched TF32 on in this one.
    code = (
        "import torch\n"
        "from hf_elastic.compression.quantization import gptq_quantize\n"
        "torch.manual_seed(0)\n"
        "weight = torch.randn(256, 512, device='cuda', dtype=torch.bfloat16)\n"
        "x = torch.randn(2048, 512, device='cuda')\n"
        "hessian = 2 * x.T @ x / x.shape[0]\n"
        "expected = gptq_quantize(weight, hessian, 4, 128)\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "got = gptq_quantize(weight, hessian, 4, 128)\n"
        "assert torch.backends.cuda.matmul.allow_tf32 is True\n"
        "assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------- merge
def _train(model: nn.Module, device: str, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        model(**_batch(device, step)).loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("qa", [False, True], ids=["sparsepeft", "qa_sparsepeft"])
@pytest.mark.parametrize("device", DEVICES)
def test_merges_keep_every_zero(device, qa, tmp_path):
    base = ARCH.build()
    sparse = (quantized(base) if qa else pruned(base)).to(device, torch.bfloat16)
    zeros = {k: ~m for k, m in weight_masks(sparse).items()}
    config = qa_config(ARCH, False) if qa else make_config("nls", ARCH, sparse_adapter=True)
    model = get_peft_model(copy.deepcopy(sparse), config)
    _train(model, device)
    merged = get_supernet(model).extract_model("max")
    moved = 0
    for name, zero in zeros.items():
        module = merged.get_submodule(name)
        if qa:
            codes, old = module.qweight, sparse.get_submodule(name).qweight
            assert torch.equal(codes[zero], expand_groups(module.zeros, 16)[zero]), name
            moved += int((codes != old).sum())
        else:
            weight = module.weight
            assert weight.dtype == torch.bfloat16 and int((weight[zero] != 0).sum()) == 0, name
            moved += int((weight != sparse.get_submodule(name).weight).sum())
    assert moved > 0
    if not qa:  # the extracted plain LoRA adapter, merged onto the base by merge_subnet_adapter
        get_supernet(model).extract_adapter("max", tmp_path / "adapter")
        again = merge_subnet_adapter(copy.deepcopy(sparse), tmp_path / "adapter")
        for name in zeros:
            assert torch.equal(again.get_submodule(name).weight, merged.get_submodule(name).weight), name


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32_weights", "bf16_weights"])
@pytest.mark.parametrize("qa", [False, True], ids=["sparsepeft", "qa_sparsepeft"])
@pytest.mark.parametrize("device", DEVICES)
def test_nas_trainer_step_with_bf16(device, qa, weights, tmp_path):
    base = ARCH.build()
    sparse = (quantized(base) if qa else pruned(base)).to(weights)
    zeros = {k: ~m for k, m in weight_masks(sparse).items()}
    config = qa_config(ARCH, False, init_lora_weights=True) if qa else make_config("nls", ARCH, sparse_adapter=True)
    model = get_peft_model(sparse, config)
    trainer = NASTrainer(
        model, args(tmp_path, bf16=True, use_cpu=device == "cpu", max_steps=3), train_dataset=dataset()
    )
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    params = dict(model.named_parameters())
    assert all(p.device.type == device for p in params.values())
    assert all(float(p.detach().abs().max()) > 0 for n, p in params.items() if "lora_B" in n)  # B starts at zero
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    recorded = trainer.sampler.stats()["config_losses"].values()
    assert len(logged) == 3 and all(math.isfinite(v) for v in logged)
    assert sum(r["count"] for r in recorded) == 3
    assert sum(r["mean_loss"] * r["count"] for r in recorded) == pytest.approx(sum(logged), rel=1e-6)
    for name, zero in zeros.items():
        assert torch.equal(~model.get_base_model().get_submodule(name).base_mask().cpu(), zero), name


# ---------------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("device", DEVICES)
def test_search_with_latency_and_loss_on_bf16(device, monkeypatch, tmp_path):
    model = get_peft_model(
        ARCH.build().to(device, torch.bfloat16), make_config("elastic", ARCH, init_lora_weights=False)
    )
    supernet = get_supernet(model)
    batches = [ARCH.batch(seed) for seed in range(2)]  # on CPU: every consumer moves them to the model
    order = supernet.reorder_channels("gradient", batches=batches)
    assert sorted(order["0.ffn"]) == list(range(48))
    synced = []
    evaluators = importlib.import_module("hf_elastic.search.evaluators")
    sync = evaluators.synchronize
    monkeypatch.setattr(evaluators, "synchronize", lambda d: synced.append(torch.device(d).type) or sync(d))
    latency = LatencyEvaluator(batch_size=1, seq_len=8, warmup=1, repeats=2)
    result = search_subnetworks(
        supernet, [LossEvaluator(batches), latency], "random", objectives=("loss", "latency"), budget=6, progress=False
    )
    assert len(result.evaluations) == 6  # the budget counts the max/min/median references
    for record in result.evaluations:
        assert math.isfinite(record.values["loss"]) and 0 < record.values["latency"] < math.inf
    assert set(synced) == {device} and len(synced) == 6 * (1 + 1 + 2)
    config = supernet.space.max_config() | {"0.ffn": 24}  # per-layer widths: rebuilt by load_exported itself
    out = export_subnetwork(supernet, config, tmp_path / "sub")
    reloaded, extracted = load_exported(out), supernet.extract_model(config)
    assert reloaded.dtype == torch.bfloat16
    state = {k: v.cpu() for k, v in extracted.state_dict().items()}
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())


# ---------------------------------------------------------------------------------------------------- cli
@pytest.mark.gpu
@needs_cuda
def test_cli_on_cuda_writes_the_cpu_result(tmp_path, tiny_tokenizer):
    from hf_elastic.cli import main

    ARCH.build().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    for device in ("cpu", "cuda"):
        sparse, int4 = tmp_path / f"sparse-{device}", tmp_path / f"int4-{device}"
        main(["sparsify", str(tmp_path / "base"), str(sparse), "--method", "magnitude", "--device", device])
        main(["quantize", str(sparse), str(int4), "--group-size", "16", "--device", device])
    cpu, cuda = load_exported(tmp_path / "int4-cpu"), load_exported(tmp_path / "int4-cuda")
    assert all(torch.equal(v, cuda.state_dict()[k]) for k, v in cpu.state_dict().items())


# ---------------------------------------------------------------------------------------------------- benchmark
def test_gpu_step_benchmark_smoke_run_on_cpu(tmp_path):
    output = tmp_path / "gpu_step.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--tiny"]
    subprocess.run([*cmd, "--output", str(output)], check=True, timeout=120, capture_output=True, text=True)
    result = json.loads(output.read_text())
    assert result["device"] == "cpu" and result["machine"]["gpu"] is None
    assert {"avx2", "avx512f", "amx"} <= set(result["machine"]["cpu_flags"])
    rows = result["median"]
    assert set(rows) == {"lora", "nls", "sparsepeft", "qa_sparsepeft"}
    for row in rows.values():
        assert row["step_s"] > 0 and row["peak_memory_mb"] is None
    assert result["ratio_vs_lora"]["lora"]["step_time"] == 1.0
    assert "qlora" in result["skipped"] and result["skipped"]["qlora"]
