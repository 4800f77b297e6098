"""Bytes a training step keeps for backward, counted with `saved_tensors_hooks`, and the results of the lean paths
against the same maths written densely (what the layers computed before they were made lean)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model

from hf_elastic import NLSConfig, QuantLinear
from hf_elastic.tuners.nls.layer import ElasticLoraLinear, _moved_codes, pack_mask, unpack_mask

OUT, IN, TOKENS = 96, 160, 6  # IN not a multiple of 8: the packed mask has a padded last byte


class _Proj(nn.Module):
    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _sparse_linear() -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.scatter_(1, linear.weight.abs().argsort(1)[:, : IN // 2], 0.0)
    return linear


def _adapted(qa: bool = False, dropout: float = 0.0) -> tuple[nn.Module, ElasticLoraLinear]:
    base = QuantLinear.from_linear(_sparse_linear(), 4, 32, residual=True) if qa else _sparse_linear()
    config = NLSConfig(
        rank_choices=[8], target_modules=["proj"], lora_alpha=16, lora_dropout=dropout, sparse_adapter=True,
        quantization_aware=qa, init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(1)
    model = get_peft_model(_Proj(base), config)
    layer = model.base_model.model.proj
    with torch.no_grad():  # big enough that some codes leave the INT4 range, so the gate cuts
        layer.lora_B["default"].weight.normal_(0, 0.5)
    return model.train(), layer


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, TOKENS // 2, IN, generator=g), torch.randn(2, TOKENS // 2, OUT, generator=g)


def _step(forward, model: nn.Module, x: torch.Tensor, grad: torch.Tensor, seed: int = 3):
    """Output, gradients (input, then every trainable tensor) and the bytes autograd kept that are not the model's
    own storage (parameters, buffers, the layers' cached masks)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    own |= {m._mask_cache[1].untyped_storage().data_ptr() for m in model.modules() if getattr(m, "_mask_cache", None)}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x)
    y.backward(grad)
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return y.detach(), grads, sum(kept.values())


def _assert_same(new, ref) -> None:
    assert (new[0] - ref[0]).abs().max() <= 1e-5
    assert len(new[1]) == len(ref[1])
    for a, b in zip(new[1], ref[1], strict=True):
        assert (a - b).abs().max() <= 1e-5


def _dense_delta(layer: ElasticLoraLinear) -> torch.Tensor:
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (b @ a) * layer.scaling["default"] * (layer.get_base_layer().weight != 0)


def test_sparsepeft_dropout_stays_fused_and_keeps_only_the_dropped_input():
    x, grad = _inputs()
    plain, plain_layer = _adapted()
    dropped, layer = _adapted(dropout=0.25)
    base = layer.get_base_layer()

    def dense(x):  # the former dropout branch: a dense masked delta per layer, kept for backward with the mask
        return base(x) + F.linear(layer.lora_dropout["default"](x), _dense_delta(layer))

    ref = _step(dense, dropped, x, grad)
    new = _step(dropped, dropped, x, grad)
    _assert_same(new, ref)
    fused = _step(plain, plain, x, grad)[2]
    weights, dropped_input = OUT * IN, x.numel() * x.element_size()
    assert fused == dropped_input  # without dropout: the input alone
    # the dropped input and dropout's own mask (bool on CUDA, float on the CPU) instead of the input
    assert new[2] <= fused + dropped_input
    assert ref[2] >= new[2] + 4 * weights  # the float32 delta, per weight
    # the dropout really acts: without it the output differs
    undropped = _step(lambda x: base(x) + F.linear(x, _dense_delta(layer)), dropped, x, grad)[0]
    assert (new[0] - undropped).abs().max() > 0.1


def _dense_qa(layer: ElasticLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """QA-SparsePEFT in plain autograd: codes moved by round(r + M ⊙ sBA / s), straight-through round, clamp."""
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mask = base.nonzero_mask()
    delta = ((b @ a) * layer.scaling["default"] * mask).view(OUT, -1, 32)
    s, z = base.scales[..., None], base.zeros.float()[..., None]
    steps = delta / s + base.residual.view(OUT, -1, 32).float() / 254
    moved = base.qweight.view(OUT, -1, 32).float() + steps + (torch.round(steps) - steps).detach()
    weight = ((moved.clamp(0, 15) - z) * s).view(OUT, IN)
    return F.linear(x, weight, base.bias)


def test_qa_keeps_two_bytes_per_adapted_weight():
    x, grad = _inputs()
    model, layer = _adapted(qa=True)
    ref = _step(lambda x: _dense_qa(layer, x), model, x, grad)
    new = _step(model, model, x, grad)
    _assert_same(new, ref)
    a, b = (w.detach() for w in layer.lora_weights("default"))
    codes = _moved_codes(layer.base_grid(), (b @ a) * layer.scaling["default"] * layer.base_mask())
    assert ((codes < 0) | (codes > 15)).float().mean() > 0.01  # the gate cuts, so the comparison means something
    per_weight = (new[2] - x.numel() * x.element_size()) / (OUT * IN)
    assert per_weight <= 2
    assert per_weight == 2  # moved codes (uint8) and the gate (bool), which holds the base's mask
    assert (ref[2] - x.numel() * x.element_size()) / (OUT * IN) >= 8


def test_the_frozen_mask_is_computed_once_and_rebuilt_when_the_base_changes(monkeypatch):
    x, grad = _inputs()
    model, layer = _adapted()
    base = layer.get_base_layer()
    packed = layer.packed_base_mask()
    assert packed.dtype == torch.uint8 and packed.shape == (OUT, (IN + 7) // 8)  # 1/8 byte per weight
    assert torch.equal(unpack_mask(packed, IN), base.weight != 0)
    calls = []
    monkeypatch.setattr(ElasticLoraLinear, "base_weight", lambda self: calls.append(1) or base.weight)
    new = _step(model, model, x, grad)
    _step(model, model, x, grad)
    assert layer.packed_base_mask() is packed and len(calls) == 2  # the forwards read W, never rebuild the mask
    monkeypatch.undo()
    # the fused path keeps nothing per weight: the mask comes from the cache
    assert new[2] == x.numel() * x.element_size()
    ref = _step(lambda x: base(x) + F.linear(x, _dense_delta(layer)), model, x, grad)
    _assert_same(new, ref)
    assert ref[2] >= new[2] + 4 * OUT * IN

    with torch.no_grad():  # an in-place edit of the base weight is seen
        base.weight[:3] = 0
    assert layer.packed_base_mask() is not packed
    assert torch.equal(layer.base_mask(), base.weight != 0) and not layer.base_mask()[:3].any()
    before = layer.base_mask().clone()
    layer.merge()  # peft writes W + delta through `.data`
    assert torch.equal(layer.base_mask(), layer.get_base_layer().weight != 0)
    assert torch.equal(layer.base_mask(), before)  # the masked merge keeps every zero
    layer.unmerge()
    assert torch.equal(layer.base_mask(), base.weight != 0)


def test_qa_merge_and_unmerge_restore_the_cached_mask():
    model, layer = _adapted(qa=True)
    base = layer.get_base_layer()
    packed = layer.packed_base_mask()
    layer.merge()
    merged = layer.base_mask()
    assert torch.equal(merged, base.nonzero_mask())
    assert not torch.equal(merged, unpack_mask(packed, IN))  # the merge moved codes onto and off zero points
    layer.unmerge()
    assert layer.packed_base_mask() is packed
    assert torch.equal(layer.base_mask(), base.nonzero_mask())


def test_pack_mask_round_trips():
    mask = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.shape == (5, 2) and torch.equal(unpack_mask(packed, 13), mask)
    assert int(pack_mask(torch.tensor([[True] + [False] * 7 + [True]]))[0, 0]) == 1


@pytest.mark.parametrize("bias", [True, False])
def test_a_plain_int4_layer_keeps_its_codes_not_a_dequantized_copy(bias):
    torch.manual_seed(0)
    linear = _sparse_linear() if bias else nn.Linear(IN, OUT, bias=False)
    model = _Proj(QuantLinear.from_linear(linear, 4, 32))
    x, grad = _inputs()
    layer = model.proj
    ref = _step(lambda x: F.linear(x, layer.dequantize(), layer.bias), model, x, grad)
    new = _step(model, model, x, grad)
    _assert_same(new, ref)
    assert new[2] / (OUT * IN) <= 0.6
    assert new[2] == 0  # the codes are the layer's own buffers, and a frozen weight needs no input
    assert ref[2] / (OUT * IN) == 4  # the float32 dequantized weight


def test_quant_linear_backward_refuses_codes_changed_after_forward():
    model = _Proj(QuantLinear.from_linear(_sparse_linear(), 4, 32))
    x = torch.randn(2, IN, requires_grad=True)
    y = model(x)
    with torch.no_grad():
        model.proj.qweight[0, 0] ^= 1
    with pytest.raises(RuntimeError, match="codes of a QuantLinear changed between its forward and backward"):
        y.sum().backward()
