"""SparsePEFT on every architecture: masked deltas keep the base's zeros through training, merging and extraction."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHS, fresh
from peft import PeftModel, get_peft_model
from test_supernet import METHODS, _train, make_config, subnets

from hf_elastic import get_supernet, load_super_network, merge_subnet_adapter
from hf_elastic.elastic_lora.arch import base_layer, find_width_layers, weight_out_in
from hf_elastic.nls.layer import ElasticLoraLinear


def pruned(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of `base` with half of every row of every linear layer inside the transformer layers set to zero."""
    model = fresh(base)
    _, layers = find_width_layers(model)
    with torch.no_grad():
        for layer in layers:
            for module in layer.module.modules():
                if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                    w = weight_out_in(module)
                    drop = w.abs().argsort(dim=1)[:, : w.shape[1] // 2]
                    w.scatter_(1, drop, 0.0)
    return model


def zero_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: weight_out_in(m) == 0
        for name, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and "lora_" not in name
    }


@pytest.mark.parametrize("method", METHODS)
def test_merge_keeps_every_zero_and_the_output(arch, base, method):
    sparse = pruned(base)
    before = {k.removesuffix(".base_layer"): v for k, v in zero_masks(sparse).items()}
    model = get_peft_model(fresh(sparse), make_config(method, arch, sparse_adapter=True, init_lora_weights=False))
    sn = get_supernet(model)
    for config in subnets(sn)[:3]:
        sn.activate(config)
        _train(model, arch, steps=2)
    batch = arch.batch(7)
    for config in subnets(sn):
        sn.activate(config)
        with torch.no_grad():
            expected = model(**batch).logits
        full = copy.deepcopy(model)
        get_supernet(full).remove_hooks()
        after = zero_masks(full.merge_and_unload())
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], before[name]) for name in before)
        with torch.no_grad():
            assert (sn.extract_model(config)(**batch).logits - expected).abs().max() <= 1e-5


def test_in_place_merge_and_unmerge_are_exact(arch, base):
    model = get_peft_model(pruned(base), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False))
    _train(model, arch, steps=2)
    sn = get_supernet(model)
    sn.activate("min")
    batch = arch.batch(3)
    weights = {k: base_layer(m).weight.detach().clone() for k, m in sn.lora_modules.items()}
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge_adapter()
        assert (model(**batch).logits - expected).abs().max() <= 1e-5
        for key, module in sn.lora_modules.items():
            w = base_layer(module).weight
            assert torch.equal(w == 0, weights[key] == 0), key
            assert not torch.equal(w, weights[key]), key
        model.unmerge_adapter()
    assert all((base_layer(m).weight - weights[k]).abs().max() <= 1e-6 for k, m in sn.lora_modules.items())


def test_fused_gradients_match_autograd(arch, base):
    model = get_peft_model(pruned(base), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False))
    sn = get_supernet(model)
    sn.activate("median")
    model.train()
    model(**arch.batch()).loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # reference: the same masked delta through plain autograd, as a dense weight
    for module in sn.lora_modules.values():
        module.forward = _reference_forward(module)
    model(**arch.batch()).loss.backward()
    assert fused.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fused.items():
        assert (grad - dict(model.named_parameters())[name].grad).abs().max() <= 1e-5, name


def _reference_forward(module: ElasticLoraLinear):
    def forward(x, *args, **kwargs):
        a, b = module.lora_weights("default")
        delta = (b @ a) * module.scaling["default"] * module.base_mask()
        return module.base_layer(x) + torch.nn.functional.linear(x, delta)

    return forward


def test_dropout_path_keeps_the_mask(arch, base):
    model = get_peft_model(
        pruned(base), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False, lora_dropout=0.1)
    )
    model.train()
    model(**arch.batch()).loss.backward()
    for module in get_supernet(model).lora_modules.values():
        a = module.lora_A["default"].weight
        assert a.grad is not None and torch.isfinite(a.grad).all()


def test_dense_base_warns(base, arch):
    with pytest.warns(UserWarning, match="sparse_adapter=True, but a targeted base weight has no zeros"):
        get_peft_model(fresh(base), make_config("nls", arch, sparse_adapter=True))


def test_saved_adapter_checks_the_base_and_subadapters_merge_masked(tmp_path):
    arch = ARCHS["llama"]
    sparse = pruned(arch.build())
    model = get_peft_model(fresh(sparse), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False))
    _train(model, arch, steps=2)
    sn = get_supernet(model)
    record = model.peft_config["default"].base_sparsity
    assert sum(record["zeros"].values()) == sum(int(m.sum()) for m in zero_masks(sparse).values() if m.any())
    model.save_pretrained(tmp_path / "super")
    assert json.loads((tmp_path / "super" / "elastic_config.json").read_text())["base_sparsity"] == record
    load_super_network(fresh(sparse), tmp_path / "super")  # same base: accepted

    other = pruned(arch.build())
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, :2] = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"trained on a base with another zero pattern: .*(zeros here|positions)"):
        load_super_network(other, tmp_path / "super")
    with pytest.raises(ValueError, match=r"module 'model.layers.0.mlp.down_proj' has 0 zeros here but 768 in"):
        load_super_network(arch.build(), tmp_path / "super")

    sn.activate("min")
    batch = arch.batch(5)
    with torch.no_grad():
        expected = model(**batch).logits
    sn.extract_adapter("min", tmp_path / "sub")
    info = json.loads((tmp_path / "sub" / "elastic_subnet.json").read_text())
    assert info["sparse_adapter"] is True and info["quantization_aware"] is False
    merged = merge_subnet_adapter(fresh(sparse), tmp_path / "sub")
    assert all(torch.equal(zero_masks(merged)[k], m) for k, m in zero_masks(sparse).items())
    with torch.no_grad():
        assert (merged(**batch).logits - expected).abs().max() <= 1e-5
    # stock peft's merge does not mask: the documented caveat
    stock = PeftModel.from_pretrained(fresh(sparse), str(tmp_path / "sub")).merge_and_unload()
    q = stock.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).sum() < (sparse.model.layers[0].self_attn.q_proj.weight == 0).sum()
