"""Architecture x config matrix: forward/backward, equivalence with LoRA, save/load, extraction."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, Arch, fresh, peft_kwargs
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_elastic import ElasticLoraConfig, NLSConfig, get_supernet, load_super_network
from hf_elastic.nls.layer import ElasticLoraLinear

METHODS = ["nls", "nls_grouped", "elastic"]


def make_config(method: str, arch: Arch, **extra) -> NLSConfig:
    kwargs = peft_kwargs(arch, **extra)
    if method == "nls":
        return NLSConfig(rank_choices=[8, 6, 4], **kwargs)
    if method == "nls_grouped":
        return NLSConfig(
            rank_choices=[8, 4, 2],
            rank_groups=arch.rank_groups,
            nls_target_modules=[m for g in arch.rank_groups for m in g],
            **kwargs,
        )
    return ElasticLoraConfig(
        rank_choices=[8, 4], ffn_width_choices=[1.0, 0.75, 0.5], head_choices=[1.0, 0.5], **kwargs
    )


def subnets(sn) -> list[dict[str, int]]:
    return [
        sn.space.max_config(),
        sn.space.min_config(),
        sn.space.median_config(),
        sn.space.sample(1),
        sn.space.sample(2),
    ]


@pytest.mark.parametrize("method", METHODS)
def test_every_sampled_subnet_trains(arch, base, method):
    model = get_peft_model(fresh(base), make_config(method, arch, init_lora_weights=False))
    sn = get_supernet(model)
    assert get_supernet(model) is sn
    batch = arch.batch()
    losses = []
    for config in subnets(sn):
        sn.activate(config)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        losses.append(loss.item())
        ranks = sn.module_ranks(config)
        for key, module in sn.lora_modules.items():
            grad_a = module.lora_A["default"].weight.grad
            rank = ranks[key]
            assert grad_a[:rank].abs().sum() > 0, key
            assert torch.count_nonzero(grad_a[rank:]) == 0, key
    assert losses[0] != losses[1], "min and max sub-networks gave the same loss"
    counts = [sn.count(c)["params"] for c in subnets(sn)[:2]]
    assert counts[0] > counts[1]


def _train(model, arch, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        model(**arch.batch(step)).loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method", ["nls", "elastic"])
def test_max_subnet_equals_plain_lora(arch, base, method):
    torch.manual_seed(1)
    elastic = get_peft_model(fresh(base), make_config(method, arch))
    get_supernet(elastic).activate("max")
    torch.manual_seed(1)
    lora = get_peft_model(fresh(base), LoraConfig(r=8, **peft_kwargs(arch)))
    elastic.eval()
    lora.eval()
    batch = arch.batch(9)
    for _ in range(2):
        with torch.no_grad():
            diff = (elastic(**batch).logits - lora(**batch).logits).abs().max().item()
        assert diff <= 1e-6
        _train(elastic, arch)
        _train(lora, arch)
    assert any(
        m.lora_B["default"].weight.abs().sum() > 0 for m in elastic.modules() if isinstance(m, ElasticLoraLinear)
    )


@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip(arch, base, method, tmp_path):
    model = get_peft_model(fresh(base), make_config(method, arch, init_lora_weights=False))
    sn = get_supernet(model)
    if method == "elastic":
        sn.reorder_channels()
    config = sn.sample(3)
    batch = arch.batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    elastic_config = json.loads((tmp_path / "elastic_config.json").read_text())
    assert "rank_choices" not in adapter_config and adapter_config["r"] == 8
    assert elastic_config["method"] == ("elastic_lora" if method == "elastic" else "nls")

    loaded = load_super_network(fresh(base), tmp_path)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    sn2 = get_supernet(loaded)
    assert sn2.space == sn.space
    sn2.activate(config)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)

    stock = PeftModel.from_pretrained(fresh(base), tmp_path)
    sn.activate("max")
    with torch.no_grad():
        assert (stock(**batch).logits - model(**batch).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("method", ["nls", "nls_grouped"])
def test_extracted_adapter_loads_in_stock_peft(arch, base, method, tmp_path):
    model = get_peft_model(fresh(base), make_config(method, arch, init_lora_weights=False))
    sn = get_supernet(model)
    batch = arch.batch()
    for i, config in enumerate([sn.space.min_config(), sn.space.sample(4)]):
        sn.activate(config)
        with torch.no_grad():
            expected = model(**batch).logits
        out = sn.extract_adapter(config, tmp_path / str(i))
        saved = json.loads((out / "adapter_config.json").read_text())
        ranks = sn.module_ranks(config)
        assert saved["rank_pattern"] == {k: r for k, r in ranks.items() if r != 8}
        stock = PeftModel.from_pretrained(fresh(base), out)
        with torch.no_grad():
            assert (stock(**batch).logits - expected).abs().max().item() <= 1e-5
        n_adapter = sum(p.numel() for n, p in stock.named_parameters() if "lora_" in n)
        assert n_adapter == sn.count(config)["adapter_params"]
        merged = sn.extract_model(config)
        with torch.no_grad():
            assert (merged(**batch).logits - expected).abs().max().item() <= 1e-5


def test_elastic_width_extraction(arch, base, tmp_path):
    model = get_peft_model(fresh(base), make_config("elastic", arch, init_lora_weights=False))
    sn = get_supernet(model)
    batch = arch.batch()
    uniform = {n: (d.choices[-1] if d.kind != "rank" else d.choices[0]) for n, d in sn.space.dimensions.items()}
    for config in [sn.space.sample(5), sn.space.min_config(), uniform]:
        sn.activate(config)
        with torch.no_grad():
            expected = model(**batch).logits
        sub = sn.extract_model(config)
        with torch.no_grad():
            assert (sub(**batch).logits - expected).abs().max().item() <= 1e-5
        assert sum(p.numel() for p in sub.parameters()) == sn.count(config)["base_params"]
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, expected), "extraction changed the super-network"
    assert sn.count(uniform)["macs"] < sn.count("max")["macs"]
    if arch.uniform_heads_loadable:
        sub.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert reloaded.config.intermediate_size == 24 and reloaded.config.num_attention_heads == 2
        with torch.no_grad():
            assert (reloaded(**batch).logits - expected).abs().max().item() <= 1e-5
    else:
        assert sub.config.elastic_layer_widths == {"0": {"ffn": 24, "heads": 2}, "1": {"ffn": 24, "heads": 2}}


@pytest.mark.parametrize("method", ["magnitude", "gradient"])
def test_reorder_keeps_full_output_and_changes_narrow_subnets(arch, base, method):
    model = get_peft_model(fresh(base), make_config("elastic", arch, init_lora_weights=False))
    sn = get_supernet(model)
    batch = arch.batch()
    with torch.no_grad():
        full_before = model(**batch).logits
        sn.activate("min")
        min_before = model(**batch).logits
    sn.reorder_channels(method, batches=[arch.batch(7)] if method == "gradient" else None)
    order = model.peft_config["default"].channel_order
    assert sorted(order["0.ffn"]) == list(range(48)) and sorted(order["0.heads"]) == list(
        range(sn.width_layers[0].num_kv_heads)
    )
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, min_before)
        sub = sn.extract_model("min")
        assert (sub(**batch).logits - model(**batch).logits).abs().max().item() <= 1e-5
        sn.activate("max")
        assert torch.equal(model(**batch).logits, full_before)


def test_magnitude_order_puts_strongest_channel_first():
    arch = ARCHS["llama"]
    base = arch.build()
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj.weight[:, 17] *= 100
    model = get_peft_model(base, make_config("elastic", arch))
    order = get_supernet(model).reorder_channels()
    assert order["0.ffn"][0] == 17 and order["1.ffn"][0] != 17
