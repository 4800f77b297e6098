"""GPU hygiene and search-time scoring: no per-step host copies or syncs, no silent CPU fall-back, and merged
scoring of quantization-aware sub-networks that gives the unmerged scores."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ARCHS, args, dataset, make_config, peft_kwargs, qa_config, quantized
from peft import get_peft_model
from transformers import TrainerCallback

from hf_elastic import LossEvaluator, NASTrainer, NLSConfig, SearchConfig, get_supernet
from hf_elastic.cli import main
from hf_elastic.cli.inputs import resolve_device
from hf_elastic.search.scoring import merged_subnetwork
from hf_elastic.search.searcher import SubnetSearch

LLAMA = ARCHS["llama"]


def test_width_masks_are_built_once_per_kept_set():
    sn = get_supernet(get_peft_model(LLAMA.build(), make_config("elastic", LLAMA)))
    sn.activate("min")
    first = dict(sn.width_masks._masks)
    sn.activate("max")
    assert sn.width_masks._masks == {}
    sn.activate("median")
    sn.activate("min")
    assert first.keys() == sn.width_masks._masks.keys()
    assert all(sn.width_masks._masks[p] is mask for p, mask in first.items())  # reused, not copied again
    built = {path: len(entries) for path, entries in sn.width_masks._built.items()}
    sn.activate("median")
    sn.activate("min")
    assert built == {path: len(entries) for path, entries in sn.width_masks._built.items()}
    sn.geometry.set_channel_order({"0.ffn": list(range(47, -1, -1))})  # another order: other units, new masks
    sn.activate("min")
    path = "model.layers.0.mlp.down_proj"
    assert sn.width_masks._masks[path] is not first[path]
    assert sn.width_masks._masks[path][24:].tolist() == [1.0] * 24 and not sn.width_masks._masks[path][:24].any()


class _Syncs:
    """Counts host reads of tensors (`item`, `tolist`, `bool`) made from the trainer's code
    (`hf_elastic/nas/trainer.py` and its sampler callback in `hf_elastic/nas/samplers.py`)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("item", "tolist", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def read(tensor, *a, **k):
            if sys._getframe(1).f_code.co_filename.endswith(
                ("hf_elastic/nas/trainer.py", "hf_elastic/nas/samplers.py")
            ):
                self.count += 1
            return original(tensor, *a, **k)

        return read


def test_the_trainer_reads_the_device_once_per_logged_step(tmp_path, monkeypatch):
    model = get_peft_model(LLAMA.build(), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
    trainer = NASTrainer(
        model=model, args=args(tmp_path, max_steps=6, logging_steps=3, sampling="sandwich"), train_dataset=dataset()
    )
    syncs = _Syncs(monkeypatch)
    trainer.train()
    assert syncs.count == 2  # steps 3 and 6
    counts = trainer.sampler.stats()["config_losses"].values()
    assert sum(v["count"] for v in counts) == 6 * 4  # max, min and two random sub-networks per step


class _Poison(TrainerCallback):
    """NaN gradients at one optimizer step; records the adapter and Adam's moments before and after it."""

    def __init__(self, trainer, step: int) -> None:
        self.trainer, self.step, self.seen = trainer, step, {}

    def _snapshot(self):
        opt = self.trainer.optimizer
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        moments = [opt.state[p]["exp_avg"].clone() for p in params if p in opt.state]
        return [p.detach().clone() for p in params], moments

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.seen["before"] = self._snapshot()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # runs after the sampler's check
        pass

    def on_substep_end(self, args, state, control, **kwargs):
        pass

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.seen["after"] = self._snapshot()


def test_a_skipped_step_leaves_the_adapter_and_the_moments_untouched(tmp_path):
    model = get_peft_model(LLAMA.build(), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
    trainer = NASTrainer(model=model, args=args(tmp_path, max_steps=4, logging_steps=10), train_dataset=dataset())
    poison = _Poison(trainer, step=3)
    trainer.add_callback(poison)
    sampler_check = trainer.sampler.on_pre_optimizer_step

    def poisoned(args, state, control, model=None, **kwargs):
        if state.global_step + 1 == poison.step:
            next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("nan")
        return sampler_check(args, state, control, model=model, **kwargs)

    trainer.sampler.on_pre_optimizer_step = poisoned
    trainer.train()
    (p0, m0), (p1, m1) = poison.seen["before"], poison.seen["after"]
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    assert len(m0) == len(p0) and all(torch.equal(a, b) for a, b in zip(m0, m1, strict=True))
    assert trainer.sampler.skipped_steps == [{"step": 3, "subnets": [trainer.sampler.history[2]]}]


def test_device_auto_says_it_runs_on_the_cpu_and_a_missing_gpu_is_an_error(
    monkeypatch, capsys, tmp_path, tiny_tokenizer
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ("note: no CUDA GPU found, running on the CPU (--device cpu hides this line)\n")
    assert resolve_device("cpu") == torch.device("cpu") and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match=r"--device cuda:1: no CUDA device is available here"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"--device 'gpu0' is not a device; use auto, cpu, cuda"):
        resolve_device("gpu0")
    folder = tmp_path / "model"
    LLAMA.build().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(SystemExit) as exit_:
        main(["sparsify", str(folder), str(tmp_path / "out"), "--sparsity", "0.5", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 1 and err.startswith("error: --device cuda: no CUDA device is available here")


def test_qa_candidates_are_scored_merged_with_the_unmerged_scores():
    model = get_peft_model(quantized(LLAMA.build()), qa_config(LLAMA, grouped=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    sn = get_supernet(model)
    codes = {k: (m.get_base_layer().qweight.clone(), m.get_base_layer().residual) for k, m in sn.lora_modules.items()}
    batches = [LLAMA.batch(i) for i in range(2)]
    config = SearchConfig(strategy="random", budget=4, seed=0, reference_subnets=(), progress=False)
    merged = SubnetSearch(sn, [LossEvaluator(batches)], config)
    assert merged._merge
    unmerged = SubnetSearch(sn, [LossEvaluator(batches)], config)
    unmerged._merge = False
    a, b = merged.run(), unmerged.run()
    assert [e.config for e in a.evaluations] == [e.config for e in b.evaluations]
    for x, y in zip(a.evaluations, b.evaluations, strict=True):
        assert abs(x.values["loss"] - y.values["loss"]) <= 1e-5
    for key, module in sn.lora_modules.items():  # the base's codes and residuals are back, bit for bit
        base = module.get_base_layer()
        assert torch.equal(base.qweight, codes[key][0]) and base.residual is codes[key][1]
        assert not module.merged_adapters
    sn.activate("min")
    with torch.no_grad():
        expected = model(**batches[0]).logits
        with merged_subnetwork(sn):
            assert all(m.merged_adapters == ["default"] for m in sn.lora_modules.values())
            moved = sum(int((m.get_base_layer().qweight != codes[k][0]).sum()) for k, m in sn.lora_modules.items())
            for _ in range(2):  # the second forward uses the cached float weights
                assert (model(**batches[0]).logits - expected).abs().max() <= 1e-5
            assert all(len(m.get_base_layer()._weight_cache) == 1 for m in sn.lora_modules.values())
    assert moved > 0 and all(m.get_base_layer()._weight_cache is None for m in sn.lora_modules.values())
