"""Costs that see compression: non-zero parameters and bytes at the stored precision, as counts and objectives."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, VOCAB, fresh, peft_kwargs
from peft import get_peft_model

from hf_elastic import (
    CountEvaluator,
    ElasticLoraConfig,
    FunctionEvaluator,
    NLSConfig,
    get_supernet,
    quantize,
    search_subnetworks,
)
from hf_elastic.compression import QuantLinear, sparsify
from hf_elastic.nas import compression_costs

LLAMA = ARCHS["llama"]
# (out, in) of the seven linears of each of the two layers: q, k, v, o (4 heads, 2 key/value heads, head_dim 8),
# gate, up, down (hidden 32, intermediate 48); the embedding and the LM head (96 x 32) are not compressed.
LAYER_LINEARS = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)]
TARGETED = 2 * sum(o * i for o, i in LAYER_LINEARS)  # 15360 weights that sparsify/quantize touch


@pytest.fixture(scope="module")
def dense():
    return LLAMA.build()


@pytest.fixture(scope="module")
def sparse(dense):
    model = fresh(dense)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(1, VOCAB, (40,), generator=g) for _ in range(4)]
    sparsify(model, "wanda", 0.5, calibration=calibration, seq_len=16, num_samples=8, show_progress=False)
    return model


def nls(model, **extra):
    config = NLSConfig(rank_choices=[8, 4], **peft_kwargs(LLAMA, **extra))
    return get_supernet(get_peft_model(fresh(model), config))


def test_nonzero_params_halve_for_the_sparse_linears(dense, sparse):
    assert TARGETED == 15360
    d, s = nls(dense).count("max"), nls(sparse).count("max")
    assert d["params"] == s["params"]  # params cannot see the sparsity ...
    assert d["nonzero_params"] == d["params"]  # a random dense model has no zero weight
    assert d["nonzero_params"] - s["nonzero_params"] == TARGETED // 2  # ... nonzero_params can: exactly half gone
    assert d["bytes"] == s["bytes"] == 4 * d["params"]  # float32, pruned weights stored dense
    merged = nls(sparse, sparse_adapter=True)  # a sparse adapter merges into the base's zeros and adds nothing
    for name in ("max", "min"):
        c = merged.count(name)
        assert c["nonzero_params"] == d["base_params"] - TARGETED // 2
        assert c["bytes"] == 4 * c["base_params"]
    small = nls(sparse).count("min")  # rank 4 instead of 8 removes adapter parameters, zero or not
    assert s["nonzero_params"] - small["nonzero_params"] == s["adapter_params"] - small["adapter_params"] > 0


def test_int4_bytes_by_hand(dense):
    model = fresh(dense)
    quantize(model, bits=4, group_size=16, show_progress=False)
    sn = nls(model)
    c = sn.count("max")
    # each quantized linear: half a byte per code, and per group of 16 inputs of a row a float32 scale (4 bytes)
    # and a 4-bit zero point (half a byte)
    int4 = 2 * sum(o * i // 2 + o * (i // 16) * 4 + o * (i // 16) // 2 for o, i in LAYER_LINEARS)
    assert int4 == 2 * (7680 // 2 + 480 * 4 + 480 // 2) == 12000
    assert c["params"] == nls(dense).count("max")["params"]
    assert c["bytes"] == 4 * (c["params"] - TARGETED) + int4  # embedding, norms, LM head, adapter at float32
    assert c["nonzero_params"] <= c["params"]  # codes equal to their zero point dequantize to 0


def test_quantized_nonzero_mask_counts_the_weights_that_dequantize_to_nonzero(sparse):
    model = fresh(sparse)
    quantize(model, bits=4, group_size=16, show_progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for q in layers:
        assert torch.equal(q.nonzero_mask(), q.dequantize() != 0)
    nonzero = sum(int(q.nonzero_mask().sum()) for q in layers)
    assert nonzero <= TARGETED // 2  # the pruned half stays zero; a few more weights round to their zero point
    c = nls(model).count("max")
    assert c["nonzero_params"] == c["params"] - TARGETED + nonzero  # every other weight of the random model counts
    assert compression_costs(nls(model), "max") == {"nonzero_params": c["nonzero_params"], "bytes": c["bytes"]}


@pytest.mark.parametrize("quantized", [False, True])
def test_costs_match_the_extracted_model(sparse, quantized):
    """The merged sub-network holds exactly `nonzero_params` non-zero weights in exactly `bytes` bytes."""
    base = fresh(sparse)
    kwargs = {"sparse_adapter": True, "init_lora_weights": False}
    if quantized:  # width cuts need a float base (extract_model slices float weights), so INT4 searches ranks
        quantize(base, bits=4, group_size=16, show_progress=False)
        config = NLSConfig(rank_choices=[8, 4], **peft_kwargs(LLAMA, quantization_aware=True, **kwargs))
        configs = ["max", "min"]
    else:
        widths = {"ffn_width_choices": [1.0, 0.5], "head_choices": [1.0, 0.5]}
        config = ElasticLoraConfig(rank_choices=[8, 4], **widths, **peft_kwargs(LLAMA, **kwargs))
        configs = ["max", "min", {"0.ffn": 24, "1.heads": 2}]
    sn = get_supernet(get_peft_model(base, config))
    counts = []
    for name in configs:
        full = sn.space.max_config() | name if isinstance(name, dict) else name
        c = sn.count(full)
        merged = sn.extract_model(full)
        nonzero, nbytes = 0, 0
        for module in merged.modules():
            codes = hasattr(module, "qweight")  # its codes, scales and zero points are counted below
            for p in [module.bias] if codes else module.parameters(recurse=False):
                if p is None:
                    continue
                nonzero += int((p != 0).sum())
                nbytes += p.numel() * p.element_size()
            if codes:
                nonzero += int((module.qweight != module.zeros.repeat_interleave(16, dim=1)).sum())
                nbytes += module.qweight.numel() // 2 + module.scales.numel() * 4 + module.zeros.numel() // 2
        assert c["bytes"] == nbytes
        if quantized:  # merging re-rounds the codes: a few weights may land on their zero point
            assert nbytes > 0 and 0.98 * c["nonzero_params"] <= nonzero <= c["nonzero_params"]
        else:
            assert c["nonzero_params"] == nonzero
        counts.append(c)
    if quantized:  # ranks do not change a merged sparse adapter's costs
        assert counts[0]["bytes"] == counts[1]["bytes"] == 4 * (counts[0]["base_params"] - TARGETED) + 12000
    else:
        assert counts[0]["bytes"] > counts[2]["bytes"] > counts[1]["bytes"]
        assert counts[0]["nonzero_params"] > counts[2]["nonzero_params"] > counts[1]["nonzero_params"]


def test_bytes_and_nonzero_params_are_search_objectives(sparse):
    sn = nls(sparse)
    loss = FunctionEvaluator(lambda c: float(-sum(c.values())), "loss")
    result = search_subnetworks(sn, loss, "random", objectives=("loss", "bytes"), budget=5, seed=0, progress=False)
    assert result.objectives == ["loss", "bytes"]
    for e in result.evaluations:
        assert e.values["bytes"] == sn.count(e.config)["bytes"]
    config = sn.space.min_config()
    assert CountEvaluator("nonzero_params")(sn, config) == sn.count(config)["nonzero_params"]
    with pytest.raises(ValueError, match=r"key='size' is unknown.*'nonzero_params', 'bytes'"):
        CountEvaluator("size")
