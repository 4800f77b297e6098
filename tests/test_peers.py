"""The upstream-SQFT baseline layers in benchmarks/ compute the same outputs and gradients as hf_elastic's layer, so
that bench_peers.py compares equal work."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_elastic import NLSConfig, QuantLinear, quantize, sparsify
from hf_elastic.compression.quantization.rtn import RESIDUAL_STEPS
from hf_elastic.tuners.nls.layer import ElasticLoraLinear, _effective_weight, _masked_delta
from hf_elastic.tuners.nls.layer import _moved_codes as unclamped_codes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from upstream_sqft import (  # noqa: E402
    UpstreamQALoraConfig,
    UpstreamQALoraLinear,
    UpstreamSparseLoraConfig,
    UpstreamSparseLoraLinear,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUP = 16


def _sparse_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    sparsify(model, method="magnitude", sparsity=0.5, show_progress=False)
    return model


def _randomize_adapters(model: torch.nn.Module, seed: int, std: float) -> None:
    """Non-zero A and B (peft starts B at zero), the same values in every model built alike."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * std


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Outputs, input gradient and adapter gradients of one forward/backward through the decoder on embeddings."""
    x = x.clone().requires_grad_(True)
    out = model(inputs_embeds=x).logits
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}
    return out.detach(), x.grad, grads


def _embeds(model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(1))


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(float(b.abs().max()), 1.0)
    assert float((a - b).abs().max()) <= tol * scale


def _assert_same_function(ours, upstream, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs, input gradients and every A/B gradient agree to 1e-5; returns ours."""
    out_o, gx_o, g_o = _run(ours, x)
    out_u, gx_u, g_u = _run(upstream, x)
    _assert_close(out_u, out_o)
    _assert_close(gx_u, gx_o)
    assert g_o.keys() == g_u.keys() and len(g_o) == 4 * len(TARGETS)
    for name in g_o:
        _assert_close(g_u[name], g_o[name])
    return g_o


def test_upstream_sparse_matches_hf_elastic_outputs_and_grads():
    base = _sparse_llama()
    ours = get_peft_model(
        copy.deepcopy(base), NLSConfig(rank_choices=[8], lora_alpha=16, target_modules=TARGETS, sparse_adapter=True)
    )
    upstream = get_peft_model(base, UpstreamSparseLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    layers = [m for m in upstream.modules() if isinstance(m, UpstreamSparseLoraLinear)]
    assert len(layers) == 2 * len(TARGETS)
    _randomize_adapters(ours, 0, 0.1)
    _randomize_adapters(upstream, 0, 0.1)
    x = _embeds(base)
    g_o = _assert_same_function(ours, upstream, x)
    # the mask matters here: the masked gradient differs from plain LoRA's
    b_grad = g_o["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert float(b_grad.abs().max()) > 0


def _qa_pair(float_copy: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """hf_elastic QA-SparsePEFT on an INT4 (+ residual) base, and the upstream QA layer on a float copy that is
    either the original float weights (`"original"`) or the weights the codes and int8 residual stand for
    (`"residual"`: `(q - z + r / 254) * s`)."""
    base = _sparse_llama()
    quantized = copy.deepcopy(base)
    quantize(quantized, bits=4, group_size=GROUP, keep_residual=True, show_progress=False)
    config = NLSConfig(
        rank_choices=[8], lora_alpha=16, target_modules=TARGETS, sparse_adapter=True, quantization_aware=True
    )
    ours = get_peft_model(quantized, config)
    upstream = get_peft_model(base, UpstreamQALoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, group_size=GROUP))
    for name, layer in upstream.named_modules():
        if not isinstance(layer, UpstreamQALoraLinear):
            continue
        q = ours.get_submodule(name).get_base_layer()
        assert isinstance(q, QuantLinear)
        # the same grid: upstream's round-to-nearest scales and zero points are the quantized base's
        assert torch.equal(layer.grid_scales[..., 0], q.scales)
        assert torch.equal(layer.grid_zeros[..., 0], q.zeros.float())
        if float_copy == "residual":
            s, z = q.scales.repeat_interleave(GROUP, 1), q.zeros.float().repeat_interleave(GROUP, 1)
            w = (q.qweight.float() - z + q.residual.float() / RESIDUAL_STEPS) * s
            layer.get_base_layer().weight.data = w
        # the same sparsity mask: pruned weights sit on the zero point, no kept weight rounds onto it
        kept = layer.get_base_layer().weight != 0
        assert torch.equal(kept, ours.get_submodule(name).base_mask())
    return ours, upstream, quantized


def _moved_codes(model: torch.nn.Module) -> torch.Tensor:
    """The codes of the adapted weight `W_eff / s + z` of every QA layer, concatenated."""
    codes = []
    for _, layer in sorted(model.named_modules()):
        if isinstance(layer, UpstreamQALoraLinear):
            w, s, z = layer.adapted_weight("default").detach(), layer.grid_scales, layer.grid_zeros
        elif isinstance(layer, ElasticLoraLinear):
            a, b = layer.lora_weights("default")
            grid = layer.base_grid()
            scaling, mask = layer.scaling["default"], layer._mask("default")
            w, _ = _effective_weight(None, a.detach(), b.detach(), scaling, mask, grid)
            s, z = grid[1], grid[2]
        else:
            continue
        codes.append(torch.round(w.view(s.shape[0], s.shape[1], -1) / s + z).flatten())
    return torch.cat(codes)


def test_upstream_qa_matches_hf_elastic_on_the_same_grid():
    """With the float copy set to what the codes and residual stand for, both put every weight on the same code."""
    ours, upstream, _ = _qa_pair("residual")
    # std 0.3 moves many codes (|sBA| reaches several grid steps) so the grid and the clamp gate are exercised
    _randomize_adapters(ours, 0, 0.3)
    _randomize_adapters(upstream, 0, 0.3)
    codes_o, codes_u = _moved_codes(ours), _moved_codes(upstream)
    assert codes_o.numel() == codes_u.numel() > 0
    assert int((codes_o != codes_u).sum()) == 0
    x = _embeds(ours)
    _assert_same_function(ours, upstream, x)


def test_upstream_qa_on_original_float_weights_differs_in_few_codes():
    """On the original float weights, upstream rounds `W / s + z + d` (`d = M ⊙ sBA / s`) while hf_elastic rounds
    `q + r8 / 254 + d` with the int8 residual `r8 = round(254 r)` of the exact residual `r = W / s + z - q`. The two
    differ only where a rounding boundary lies between `r + d` and `r8 / 254 + d`, which are at most 1/508 step apart:
    at most 1/508 of the kept weights (about 1/1016 on average, half that with 50 % of the weights pruned), and by
    exactly one code. Measured here: 4 of 61,440 codes (0.0065 %)."""
    ours, upstream, _ = _qa_pair("original")
    _randomize_adapters(ours, 0, 0.3)
    _randomize_adapters(upstream, 0, 0.3)
    codes_o, codes_u = _moved_codes(ours), _moved_codes(upstream)
    diff = (codes_o - codes_u).abs()
    share = float((diff > 0).float().mean())
    assert float(diff.max()) <= 1
    # the bound above, 1/508 of the weights, with a margin of two
    assert share < 1 / RESIDUAL_STEPS
    # the adapter does move codes, so this is not trivially zero
    assert float((codes_o != _base_codes(ours)).float().mean()) > 0.05
    out_o, _, _ = _run(ours, _embeds(ours))
    out_u, _, _ = _run(upstream, _embeds(ours))
    rel = float((out_o - out_u).abs().max() / out_o.abs().max())
    assert rel < 1e-3


def _base_codes(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            layer.qweight.float().flatten()
            for name, layer in sorted(model.named_modules())
            if isinstance(layer, QuantLinear)
        ]
    )


def test_upstream_qa_gate_matches_clamp():
    """Where the adapter pushes codes past the range, both give them zero gradient (clamp): a large adapter saturates
    many codes and the gradients still agree."""
    ours, upstream, _ = _qa_pair("residual")
    _randomize_adapters(ours, 2, 1.0)
    _randomize_adapters(upstream, 2, 1.0)
    from hf_elastic.tuners.nls.layer import ElasticLoraLinear

    outside = []
    for layer in ours.modules():
        if isinstance(layer, ElasticLoraLinear):
            a, b = (w.detach() for w in layer.lora_weights("default"))
            delta = _masked_delta(a, b, layer.scaling["default"], layer._mask("default"))
            codes = unclamped_codes(layer.base_grid(), delta)
            outside.append(((codes < 0) | (codes > 15)).flatten())
    assert float(torch.cat(outside).float().mean()) > 0.01
    x = _embeds(ours)
    _, _, g_o = _run(ours, x)
    _, _, g_u = _run(upstream, x)
    for name in g_o:
        _assert_close(g_u[name], g_o[name])


def _saved_bytes_per_weight(model: torch.nn.Module, layer_shape: tuple[int, int]) -> float:
    """Bytes autograd saves for backward in tensors of a weight's shape (or its grouped view), per weight, averaged
    over the adapted layers of that shape."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == layer_shape[0] * layer_shape[1] and t.dim() >= 2 and t.shape[0] == layer_shape[0]:
            saved.append(t.numel() * t.element_size())
        return t

    x = _embeds(model).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=x).logits.sum().backward()
    layers = sum(1 for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    return sum(saved) / (layers * layer_shape[0] * layer_shape[1])


def test_qa_saves_two_bytes_per_weight_where_upstream_saves_floats():
    """hf_elastic's QA layer keeps the moved uint8 codes and the bool gate (which holds the base's mask) for backward:
    2 bytes per weight; the upstream formulation keeps float intermediates of the adapted weight (9 bytes here: two
    float32 tensors and the mask)."""
    ours, upstream, _ = _qa_pair("residual")
    _randomize_adapters(ours, 0, 0.3)
    _randomize_adapters(upstream, 0, 0.3)
    shape = (64, 64)  # q_proj and o_proj of the tiny Llama
    ours_bytes = _saved_bytes_per_weight(ours, shape) / 2
    upstream_bytes = _saved_bytes_per_weight(upstream, shape) / 2
    # codes + gate, 1 byte each
    assert ours_bytes == 2
    assert upstream_bytes >= 3 * ours_bytes
