"""Search space, super-network, NASTrainer, and the errors of configs and sub-network choices."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ARCHS,
    METHODS,
    StopAt,
    args,
    dataset,
    fresh,
    make_config,
    peft_kwargs,
    pruned,
    qa_config,
    quantized,
    record_activations,
    subnets,
    train_steps,
)
from dist_launch import DDP_LAUNCH, FSDP_LAUNCH, run_worker
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_elastic import ElasticLoraConfig, ElasticLoraLinear, NLSConfig, SuperNetwork, get_supernet, load_super_network
from hf_elastic.compression.quantization.format import QuantLinear
from hf_elastic.models.arch import find_width_layers, slice_layer_width, weight_out_in
from hf_elastic.nas.samplers import register_sampler
from hf_elastic.nas.trainer import NAS_STATS_NAME, NASTrainer
from hf_elastic.tuners.elastic_lora.width import WidthMasks, kept_units, width_choices

# ---------------------------------------------------------------------------------------------------- supernet


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
        train_steps(elastic, arch)
        train_steps(lora, arch)
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


def _deepcopy_extract(sn, config):
    """The extraction as it was before it worked layer by layer: a deep copy of the whole peft model, merged."""
    model = copy.deepcopy(sn.model)
    sub = get_supernet(model)
    sub.activate(config)
    sub.remove_hooks()
    merged = model.merge_and_unload()
    for module in merged.modules():
        if isinstance(module, QuantLinear):
            module.residual = None
    if sub.width_layers:
        _, layers = find_width_layers(merged)
        for layer in layers:
            ffn = sub.kept_units(layer, "ffn", config.get(f"{layer.index}.ffn"))
            slice_layer_width(layer, ffn, sub.kept_units(layer, "heads", config.get(f"{layer.index}.heads")))
    return merged


@pytest.mark.parametrize("kind", ["elastic", "sparse", "qa"])
def test_layer_by_layer_extraction_equals_the_deepcopy_one_bit_for_bit(arch, base, kind):
    if kind == "elastic":
        model = get_peft_model(fresh(base), make_config("elastic", arch, init_lora_weights=False))
    elif kind == "sparse":
        model = get_peft_model(pruned(base), make_config("nls", arch, init_lora_weights=False, sparse_adapter=True))
    else:
        model = get_peft_model(quantized(base), qa_config(arch, grouped=False))
    sn = get_supernet(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = sn.space.sample(3)
    reference = _deepcopy_extract(sn, config).state_dict()
    batch = arch.batch()
    for share in (False, True):
        sub = sn.extract_model(config, share_weights=share)
        state = sub.state_dict()
        assert list(state) == list(reference)
        assert all(torch.equal(state[k], reference[k]) for k in state), "the extracted weights differ"
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the super-network changed"
        originals = {t.untyped_storage().data_ptr() for t in model.parameters()}
        embed = sub.get_input_embeddings().weight.untyped_storage().data_ptr()
        assert (embed in originals) is share
        if not share:
            assert not any(t.untyped_storage().data_ptr() in originals for t in [*sub.parameters(), *sub.buffers()])
        with torch.no_grad():
            assert torch.equal(sub(**batch).logits, _deepcopy_extract(sn, config)(**batch).logits)


@pytest.mark.parametrize("method", ["magnitude", "activation", "gradient"])
def test_reorder_keeps_full_output_and_changes_narrow_subnets(arch, base, method):
    model = get_peft_model(fresh(base), make_config("elastic", arch, init_lora_weights=False))
    sn = get_supernet(model)
    batch = arch.batch()
    with torch.no_grad():
        full_before = model(**batch).logits
        sn.activate("min")
        min_before = model(**batch).logits
    sn.reorder_channels(method, batches=[arch.batch(7)] if method != "magnitude" else None)
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


def test_activation_order_puts_a_silent_channel_last():
    """Channel 17 has the largest weights but never fires (its gate and up rows are zero): magnitude keeps it first,
    activation (|W| * ||x||) last."""
    arch = ARCHS["llama"]
    base = arch.build()
    with torch.no_grad():
        mlp = base.model.layers[0].mlp
        mlp.down_proj.weight[:, 17] *= 100
        mlp.gate_proj.weight[17] = 0
        mlp.up_proj.weight[17] = 0
    sn = get_supernet(get_peft_model(base, make_config("elastic", arch)))
    assert sn.reorder_channels("magnitude")["0.ffn"][0] == 17
    assert sn.reorder_channels("activation", batches=[arch.batch(4)])["0.ffn"][-1] == 17


def test_width_masks_on_a_plain_model_compute_the_sliced_model():
    """The LoNAS width machinery of `tuners.elastic_lora.width` works on a model without adapters, and the
    super-network's geometry gives the sliced layers' sizes."""
    arch = ARCHS["llama"]
    model, sliced = arch.build(), arch.build()
    _, layers = find_width_layers(model)
    config = ElasticLoraConfig(target_modules=["q_proj"], ffn_width_choices=[1.0, 0.5, 12], head_choices=[1.0, 0.5])
    assert width_choices(config, layers[0]) == {"ffn": (48, 24, 12), "heads": (4, 2)}
    with pytest.raises(ValueError, match=r"head_choices=\[3\] gives head counts \[3\] that are not whole key/value"):
        width_choices(ElasticLoraConfig(target_modules=["q_proj"], head_choices=[3]), layers[0])
    ffn = kept_units(layers[0], "ffn", 12, torch.arange(48).flip(0))
    heads = kept_units(layers[1], "heads", 2, torch.tensor([1, 0]))
    assert ffn.tolist() == list(range(36, 48)) and heads.tolist() == [1]
    assert kept_units(layers[0], "ffn", 48, None) is None and kept_units(layers[0], "heads", None, None) is None
    masks = WidthMasks(model, layers)
    masks.keep(layers[0], "ffn", ffn)
    masks.keep(layers[1], "heads", heads)
    _, cut = find_width_layers(sliced)
    slice_layer_width(cut[0], ffn, None)
    slice_layer_width(cut[1], None, heads)
    batch = arch.batch()
    with torch.no_grad():
        assert (model(**batch).logits - sliced(**batch).logits).abs().max().item() <= 1e-5
        masks.remove()
        assert torch.equal(model(**batch).logits, arch.build()(**batch).logits)

    sn = get_supernet(get_peft_model(arch.build(), make_config("elastic", arch)))
    sn.geometry.set_channel_order({"0.ffn": list(range(47, -1, -1))})
    subnet = sn.space.max_config() | {"0.ffn": 24, "1.heads": 2}
    assert sn.geometry.kept_indices(subnet)["model.layers.0.mlp.down_proj"][1].tolist() == list(range(24, 48))
    sizes = sn.geometry.sizes(subnet)
    shapes = {n: tuple(weight_out_in(m).shape) for n, m in sn.extract_model(subnet).named_modules() if n in sizes}
    assert shapes == sizes and sizes["model.layers.1.self_attn.o_proj"] == (32, 16)


# ---------------------------------------------------------------------------------------------------- trainer
LLAMA = ARCHS["llama"]


@pytest.fixture(scope="module")
def llama():
    return LLAMA.build()


def nls_model(base):
    torch.manual_seed(0)
    return get_peft_model(fresh(base), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 6, 4])))


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_one_subnet_per_optimizer_step_and_stats(llama, tmp_path):
    model = nls_model(llama)
    trainer = NASTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=dataset())
    seen = record_activations(trainer)
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 6 and len(trainer.sampler.history) == 6
    # each optimizer step: activation at step begin, then per micro-batch (2) activate + restore
    # exactly one activation per optimizer step, none per micro-batch
    assert seen == [trainer.sampler.draw(step)[0] for step in range(6)]
    assert len({json.dumps(b, sort_keys=True) for b in seen}) > 1
    trainer.save_model(tmp_path / "final")
    stats = json.loads((tmp_path / "final" / NAS_STATS_NAME).read_text())
    assert sum(stats["choice_counts"]["0.rank.self_attn.q_proj"].values()) == 6
    assert sum(v["count"] for v in stats["config_losses"].values()) == 12
    assert (tmp_path / "final" / "elastic_config.json").is_file()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("subnet_params" in h for h in logged)


def test_sandwich_and_custom_sampler(llama, tmp_path):
    trainer = NASTrainer(
        model=llama.__class__(llama.config),
        args=args(tmp_path, sampling="sandwich", sandwich_k=1, max_steps=2),
        peft_config=ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])),
        train_dataset=dataset(),
    )
    trainer.train()
    assert sum(v["count"] for v in trainer.sampler.stats()["config_losses"].values()) == 2 * 3
    space = trainer.supernet.space
    assert trainer.sampler.draw(0)[:2] == [space.max_config(), space.min_config()]

    register_sampler("always_min", lambda space, rng, k: [space.min_config()])
    trainer = NASTrainer(
        model=nls_model(llama), args=args(tmp_path, sampling="always_min", max_steps=2), train_dataset=dataset()
    )
    trainer.train()
    assert set(trainer.sampler.history) == {".".join(["2"] * len(trainer.supernet.space))}


def test_evaluate_names_each_subnet(llama, tmp_path):
    trainer = NASTrainer(
        model=nls_model(llama), args=args(tmp_path, eval_subnets=["median", "max", "min"]), eval_dataset=dataset(8)
    )
    before = trainer.supernet.active_config
    metrics = trainer.evaluate()
    assert {"eval_median_loss", "eval_max_loss", "eval_min_loss", "eval_loss"} <= set(metrics)
    assert metrics["eval_loss"] == metrics["eval_median_loss"]
    assert trainer.supernet.active_config == before


def test_resume_continues_the_same_sequence(llama, tmp_path):
    full = NASTrainer(model=nls_model(llama), args=args(tmp_path / "full"), train_dataset=dataset())
    full.train()

    run = args(tmp_path / "part", save_strategy="steps", save_steps=3)
    part = NASTrainer(model=nls_model(llama), args=run, train_dataset=dataset())
    part.add_callback(StopAt(3))
    part.train()
    assert part.state.global_step == 3

    resumed = NASTrainer(model=nls_model(llama), args=run, train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert resumed.sampler.history == full.sampler.history
    assert resumed.sampler.choice_counts == full.sampler.choice_counts
    expected, got = adapter_weights(full.model), adapter_weights(resumed.model)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6


def test_trainer_errors(llama, tmp_path):
    with pytest.raises(ValueError, match=r"sampling='nope' is unknown; use one of \["):
        args(tmp_path, sampling="nope")
    with pytest.raises(ValueError, match=r"eval_subnets=\['best'\] must be a non-empty list"):
        args(tmp_path, eval_subnets=["best"])
    with pytest.raises(ValueError, match=r"sandwich_k=-1 must be >= 0"):
        args(tmp_path, sandwich_k=-1)
    single = get_peft_model(fresh(llama), NLSConfig(**peft_kwargs(LLAMA, target_modules=["q_proj"], rank_choices=[8])))
    with pytest.raises(ValueError, match=r"sampling='sandwich' needs at least two sub-networks"):
        NASTrainer(model=single, args=args(tmp_path, sampling="sandwich"), train_dataset=dataset())

    run = args(tmp_path / "a", save_strategy="steps", save_steps=2, max_steps=2)
    NASTrainer(model=nls_model(llama), args=run, train_dataset=dataset()).train()
    other = get_peft_model(fresh(llama), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 2])))
    trainer = NASTrainer(model=other, args=args(tmp_path / "a", max_steps=4), train_dataset=dataset())
    settings = r"checkpoint-2: it was trained with other elastic settings \(rank_choices: checkpoint \[8, 6, 4\]"
    with pytest.raises(ValueError, match=settings + r", this run \[8, 2\]\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert get_supernet(other) is trainer.supernet


def test_save_model_warns_when_fsdp_saves_no_adapter(llama, tmp_path, monkeypatch):
    trainer = NASTrainer(model=nls_model(llama), args=args(tmp_path, max_steps=1), train_dataset=dataset())
    sharded = SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT")
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", sharded, raising=False)
    trainer.is_fsdp_enabled = True  # what FSDP with its default SHARDED_STATE_DICT looks like to save_model
    with pytest.warns(UserWarning, match=r"wrote no super-adapter.*--fsdp_state_dict_type FULL_STATE_DICT"):
        trainer.save_model(tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == [NAS_STATS_NAME]


def _run_worker(out, *worker_args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_worker("train_worker.py", out, *worker_args, launcher=launcher)


def _ranks(out) -> list[dict]:
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    proc = _run_worker(out, "3", launcher=DDP_LAUNCH)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _ranks(out)


def test_two_processes_sample_the_same_subnets(ddp_run):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: two gloo processes draw the same sub-networks."""
    assert ddp_run[0]["world"] == ddp_run[1]["world"] == 2
    assert ddp_run[0]["history"] == ddp_run[1]["history"] and len(ddp_run[0]["history"]) == 3
    assert len(set(ddp_run[0]["history"])) > 1
    assert ddp_run[0]["weights"] == ddp_run[1]["weights"]


def test_fsdp2_on_cpu_shards_and_saves_a_loadable_super_adapter(ddp_run, tmp_path):
    """accelerate's FSDP2 path on two gloo processes (its CPU gate lifted in the worker) trains like DDP."""
    proc = _run_worker(tmp_path, "3", "fsdp", launcher=FSDP_LAUNCH)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = _ranks(tmp_path)
    # accelerate itself would have fallen back to DDP on CPU; FSDP2 wrapped the model and halved every LoRA matrix
    assert [r["accelerate_chose"] for r in ranks] == ["MULTI_CPU", "MULTI_CPU"]
    assert [r["wrapped"] for r in ranks] == ["FSDPPeftModel", "FSDPPeftModel"]
    for rank in ranks:
        assert len(rank["shards"]) == 28
        assert all(local[0] * 2 == full[0] and local[1:] == full[1:] for local, full in rank["shards"].values())
    assert ranks[0]["history"] == ranks[1]["history"] == ddp_run[0]["history"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["loaded"] == ranks[1]["loaded"]
    for name, full in ranks[0]["weights"].items():
        loaded = torch.tensor(ranks[0]["loaded"][name])
        assert torch.isfinite(loaded).all() and torch.equal(loaded, torch.tensor(full)), name
        assert (loaded - torch.tensor(ddp_run[0]["weights"][name])).abs().max().item() <= 1e-5, name
    assert json.loads((tmp_path / "final" / NAS_STATS_NAME).read_text())["history"] == ranks[0]["history"]


def test_resume_after_the_process_is_killed(tmp_path):
    """A run SIGKILLed after step 5 resumes from checkpoint-4 and ends exactly like an uninterrupted run."""
    full = _run_worker(tmp_path / "full", "6")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run_worker(tmp_path / "killed", "6", "5")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "rank0.json").exists()
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _run_worker(tmp_path / "killed", "6", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.loads((tmp_path / "full" / "rank0.json").read_text())
    got = json.loads((tmp_path / "killed" / "rank0.json").read_text())
    assert got["first_step"] == 4 and expected["first_step"] == 0
    assert got["history"] == expected["history"] and len(got["history"]) == 6
    diff = max(
        (torch.tensor(got["weights"][k]) - torch.tensor(expected["weights"][k])).abs().max().item()
        for k in expected["weights"]
    )
    assert diff <= 1e-6


def test_bf16_autocast_trains_like_fp32(llama, tmp_path):
    runs = {}
    for bf16 in (False, True):
        model = nls_model(llama)
        trainer = NASTrainer(
            model=model, args=args(tmp_path / str(bf16), max_steps=3, bf16=bf16), train_dataset=dataset()
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[bf16] = (trainer.sampler.history, losses, adapter_weights(model))
    assert runs[True][0] == runs[False][0]
    loss_diff = [abs(a - b) for a, b in zip(runs[True][1], runs[False][1], strict=True)]
    assert 0 < max(loss_diff) < 0.05  # autocast really ran in bf16, and stayed close to fp32
    assert all(w.dtype == torch.float32 for w in runs[True][2].values())
    assert max((runs[True][2][k] - runs[False][2][k]).abs().max().item() for k in runs[False][2]) < 0.05


def test_torch_compile_matches_eager(llama, tmp_path):
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
        trainer = NASTrainer(
            model=model,
            args=args(tmp_path / str(compile_), max_steps=2, torch_compile=compile_),
            train_dataset=dataset(),
        )
        trainer.train()
        runs.append((trainer.sampler.history, adapter_weights(model)))
    assert runs[0][0] == runs[1][0] and len(set(runs[0][0])) == 2
    assert max((runs[0][1][k] - runs[1][1][k]).abs().max().item() for k in runs[0][1]) <= 1e-5


def test_gradient_checkpointing_matches_plain_training(llama, tmp_path):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
        run = args(tmp_path / str(checkpointing), max_steps=3, gradient_checkpointing=checkpointing)
        trainer = NASTrainer(model=model, args=run, train_dataset=dataset())
        trainer.train()
        results.append((trainer.sampler.history, adapter_weights(model)))
    assert results[0][0] == results[1][0]
    assert max((results[0][1][k] - results[1][1][k]).abs().max().item() for k in results[0][1]) <= 1e-5


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_choices": []}, r"NLSConfig.rank_choices must be a non-empty list, got \[\]"),
        ({"rank_choices": [8, 0]}, r"rank_choices must hold positive integers, got 0 in \[8, 0\]"),
        ({"rank_choices": [8, 2.5]}, r"rank_choices must hold positive integers, got 2.5"),
        ({"r": 4, "rank_choices": [8, 4]}, r"rank_choices contains 8, above r=4. Raise r to 8"),
        ({"use_dora": True}, r"NLSConfig.use_dora=True is not supported"),
        ({"lora_bias": True}, r"NLSConfig.lora_bias=True is not supported"),
        ({"rank_pattern": {"q_proj": 4}}, r"NLSConfig.rank_pattern=\{'q_proj': 4\} is not supported"),
        ({"rank_groups": [["q_proj"], []]}, r"rank_groups must be a non-empty list of non-empty lists"),
        ({"nls_target_modules": []}, r"nls_target_modules is empty"),
    ],
)
def test_nls_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NLSConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ffn_width_choices": [1.0, 1.5]}, r"ffn_width_choices holds 1.5, outside \(0, 1\]"),
        ({"head_choices": [0.0]}, r"head_choices holds 0.0, outside \(0, 1\]"),
        ({"ffn_width_choices": [0]}, r"ffn_width_choices holds 0; absolute sizes must be >= 1"),
        ({"ffn_width_choices": []}, r"ffn_width_choices must be a non-empty list or None"),
        ({"head_choices": ["half"]}, r"head_choices holds 'half'; use fractions"),
        ({"channel_order": [1, 2]}, r"channel_order must be a dict or None, got list"),
        ({"rank_choices": [16], "r": 8}, r"ElasticLoraConfig.rank_choices contains 16, above r=8"),
    ],
)
def test_elastic_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticLoraConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_choices": [1.0, 0.25]}, r"head counts \[1\] that are not whole key/value groups: layer 0 has 4 heads"),
        ({"head_choices": [3]}, r"Use multiples of 2 up to 4"),
        ({"ffn_width_choices": [1.0, 0.3]}, r"ffn_width_choices value 0.3 gives 14.4 of 48, not a whole number"),
        ({"ffn_width_choices": [100]}, r"gives widths \[100\] outside \[1, 48\] for layer 0"),
        ({"nls_target_modules": ["nope"]}, r"nls_target_modules=\['nope'\] matches none of the adapted modules"),
        ({"rank_groups": [["q_proj"], ["nope"]]}, r"rank_groups entries \[\['nope'\]\] match no elastic adapter"),
    ],
)
def test_space_errors(llama, kwargs, message):
    model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4]) | kwargs))
    with pytest.raises(ValueError, match=message):
        get_supernet(model)


def test_target_modules_matching_nothing(llama):
    with pytest.raises(ValueError, match=r"Target modules \{'nope'\} not found in the base model"):
        get_peft_model(fresh(llama), NLSConfig(target_modules=["nope"]))


def test_unsupported_module(llama):
    model = get_peft_model(fresh(llama), NLSConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(
        ValueError, match=r"Module 'model.embed_tokens' is of type Embedding; an elastic rank supports"
    ):
        get_supernet(model)
    fixed = get_peft_model(
        fresh(llama), NLSConfig(target_modules=["q_proj", "embed_tokens"], nls_target_modules=["q_proj"])
    )
    counts = get_supernet(fixed).count("max")
    assert counts["adapter_params"] == sum(p.numel() for n, p in fixed.named_parameters() if "lora_" in n)


def test_subnet_config_errors(llama, tmp_path):
    model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
    sn = get_supernet(model)
    full = sn.space.max_config()
    with pytest.raises(ValueError, match=r"names unknown dimensions \['bogus'\]"):
        sn.activate(full | {"bogus": 1})
    with pytest.raises(ValueError, match=r"misses dimensions \['0.ffn'\]. Start from space.max_config\(\)"):
        sn.activate({k: v for k, v in full.items() if k != "0.ffn"})
    with pytest.raises(ValueError, match=r"sets 0.ffn=47, which is not among its choices \[48, 42, 36, 30, 24\]"):
        sn.activate(full | {"0.ffn": 47})
    with pytest.raises(ValueError, match=r"Unknown named sub-network 'huge'"):
        sn.activate("huge")
    with pytest.raises(ValueError, match=r"must be a dict of dimension name to value, got \[1, 2\]"):
        sn.activate([1, 2])
    with pytest.raises(ValueError, match=r"Expected \d+ choice indices, got 1"):
        sn.space.decode([0])
    with pytest.raises(ValueError, match=r"a plain LoRA adapter cannot express that. Use SuperNetwork.extract_model"):
        sn.extract_adapter("min", tmp_path)
    with pytest.raises(ValueError, match=r"Unknown importance method 'random'"):
        sn.reorder_channels("random")
    with pytest.raises(ValueError, match=r"reorder_channels\(method='gradient'\) needs `batches` of model inputs"):
        sn.reorder_channels("gradient")
    with pytest.raises(ValueError, match=r"reorder_channels\(method='activation'\) got no batches"):
        sn.reorder_channels("activation", batches=[])
    with pytest.raises(ValueError, match=r"got no batches"):
        sn.reorder_channels("gradient", batches=[])


def test_model_errors(llama, tmp_path):
    with pytest.raises(ValueError, match=r"SuperNetwork needs a peft.PeftModel, got LlamaForCausalLM"):
        SuperNetwork(fresh(llama))
    lora = get_peft_model(fresh(llama), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"Adapter 'default' uses LoraConfig, not an elastic config"):
        get_supernet(lora)
    nls = get_peft_model(fresh(llama), NLSConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"reorder_channels needs an ElasticLoraConfig"):
        get_supernet(nls).reorder_channels()
    lora.save_pretrained(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"No elastic_config.json in .*: this is not an hf_elastic super-adapter"
    ):
        load_super_network(fresh(llama), tmp_path)


def test_conv1d_without_fan_in_fan_out_warns_and_fixes():
    gpt2 = ARCHS["gpt2"]
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=False does not fit Conv1D; setting fan_in_fan_out=True"):
        model = get_peft_model(gpt2.build(), NLSConfig(target_modules=["c_attn"], rank_choices=[4, 2]))
    assert model.peft_config["default"].fan_in_fan_out is True
    assert torch.isfinite(model(**gpt2.batch()).loss)


# ---------------------------------------------------------------------------------------------------- reliability
class _PoisonStep(TrainerCallback):
    """Makes the loss of one optimizer step NaN by scaling a base weight by NaN for that step only."""

    def __init__(self, model, step: int) -> None:
        self.weight, self.step, self.saved = model.get_base_model().model.norm.weight, step, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.saved = self.weight.detach().clone()
            self.weight.data.fill_(float("nan"))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.saved is not None:
            self.weight.data.copy_(self.saved)
            self.saved = None


def _trainer(tmp_path, **kwargs) -> NASTrainer:
    model = get_peft_model(ARCHS["llama"].build(), NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 4])))
    return NASTrainer(model=model, args=args(tmp_path, **kwargs), train_dataset=dataset())


def test_a_nan_step_is_skipped_named_and_kept_out_of_the_saved_adapter(tmp_path, caplog):
    trainer = _trainer(tmp_path / "run")
    trainer.add_callback(_PoisonStep(trainer.model, step=3))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with caplog.at_level("WARNING", logger="hf_elastic.nas.trainer"):
        trainer.train()
    assert any("Skipped the update of step 3, sub-network" in r.message for r in caplog.records)
    assert trainer.sampler.skipped_steps == [{"step": 3, "subnets": [trainer.sampler.history[2]]}]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.save_model(str(tmp_path / "super"))
    stats = json.loads((tmp_path / "super" / NAS_STATS_NAME).read_text(), parse_constant=lambda c: 1 / 0)
    assert sum(v["count"] for v in stats["config_losses"].values()) == 5 and stats["skipped_steps"][0]["step"] == 3


def test_on_nonfinite_stop_raises_and_nan_weights_are_never_saved(tmp_path):
    trainer = _trainer(tmp_path / "run", on_nonfinite="stop")
    trainer.add_callback(_PoisonStep(trainer.model, step=2))
    with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient at step 2, sub-network"):
        trainer.train()
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="Refusing to save to .*hold NaN or inf"):
        trainer.save_model(str(tmp_path / "super"))
    assert not (tmp_path / "super").exists()
    with pytest.raises(ValueError, match=r"on_nonfinite='never' is unknown; use 'skip' or 'stop'"):
        args(tmp_path, on_nonfinite="never")


def test_training_seed_sets_the_lora_initialisation(tmp_path):
    def lora_a(seed: int) -> torch.Tensor:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        config = NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 4]))
        trainer = NASTrainer(model=ARCHS["llama"].build(), peft_config=config, args=args(tmp_path, seed=seed))
        return next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(lora_a(5), lora_a(5)) and not torch.equal(lora_a(5), lora_a(6))


def test_resume_skips_an_incomplete_last_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    _trainer(out, save_strategy="steps", save_steps=2, max_steps=4).train()
    os.remove(out / "checkpoint-4" / "trainer_state.json")  # as if killed while checkpoint-4 was written
    resumed = _trainer(out, save_strategy="steps", save_steps=2, max_steps=4)
    with caplog.at_level("WARNING", logger="hf_elastic.nas.trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert any("Skipping" in r.message and "checkpoint-4" in r.message for r in caplog.records)
    assert resumed.state.global_step == 4
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-4: .*Pass an earlier checkpoint"):
        os.remove(out / "checkpoint-4" / "trainer_state.json")
        _trainer(out, max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-4"))


def test_malicious_pickle_in_a_checkpoint_is_named(tmp_path):
    out = tmp_path / "run"
    _trainer(out, save_strategy="steps", save_steps=2, max_steps=2).train()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, out / "checkpoint-2" / "rng_state.pth")
    with pytest.raises(ValueError, match=r"Refused to load a pickled file of .*checkpoint-2"):
        _trainer(out, max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-2"))


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapter") / "super"
    trainer = _trainer(path.parent / "run", max_steps=2)
    trainer.train()
    trainer.save_model(str(path))
    return path


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(change(data)))

    return edit


def _without(key: str):
    return lambda d: {k: v for k, v in d.items() if k != key}


ADAPTER_DAMAGE = {
    "elastic invalid json": (lambda f: (f / "elastic_config.json").write_text("{oops"), r"is not valid JSON"),
    "elastic is a list": (lambda f: (f / "elastic_config.json").write_text("[]"), r"holds a JSON list"),
    "unknown key": (_edit_json("elastic_config.json", lambda d: d | {"ranks": [1]}), r"keys \['ranks'\] that"),
    "no rank_choices": (_edit_json("elastic_config.json", _without("rank_choices")), r"has no 'rank_choices'"),
    "choices edited": (_edit_json("elastic_config.json", lambda d: d | {"rank_choices": [4, 2]}), r"was edited"),
    "method changed": (_edit_json("elastic_config.json", lambda d: d | {"method": "elastic_lora"}), r"was edited"),
    "r mismatch": (_edit_json("adapter_config.json", lambda d: d | {"r": 16}), r"has r=16, but .* rank_choices"),
    "weights missing": (lambda f: (f / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors"),
    "weights truncated": (
        lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:99]),
        r"come from different saves|not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("case", list(ADAPTER_DAMAGE))
def test_damaged_super_adapter_gives_a_clear_error(saved_adapter, tmp_path, case):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(saved_adapter, folder)
    damage, message = ADAPTER_DAMAGE[case]
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_super_network(ARCHS["llama"].build(), folder)


def test_adapter_on_another_base(saved_adapter):
    other = ARCHS["llama"].build()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.warns(UserWarning, match="was trained on another base model"):
        load_super_network(other, saved_adapter)
    with pytest.raises(ValueError, match="was trained on another base model"):
        load_super_network(other, saved_adapter, strict=True)
    config = ARCHS["llama"].build().config.to_dict()
    config.pop("head_dim", None)
    wider = type(other)(type(other.config)(**(config | {"hidden_size": 2 * config["hidden_size"]})))
    with pytest.raises(ValueError, match="does not fit this base model"):
        load_super_network(wider, saved_adapter)


def test_channel_order_is_checked():
    config = ElasticLoraConfig(
        **peft_kwargs(ARCHS["llama"]), rank_choices=[4], ffn_width_choices=[1.0, 0.5], channel_order={"0.ffn": [0, 0]}
    )
    with pytest.raises(ValueError, match=r"channel_order\['0.ffn'\] must be a permutation of 0..\d+"):
        get_supernet(get_peft_model(ARCHS["llama"].build(), config))
