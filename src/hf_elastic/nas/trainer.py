"""`NASTrainer` and `NASTrainerMixin`: Trainers that train a weight-sharing super-network, one sub-network per step."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

from ..data import check_token_rows
from ..devices import any_rank, local_tensor
from ..utils import (
    ELASTIC_CONFIG_NAME,
    atomic_write_json,
    commit_files,
    explain_full_disk,
    recover_files,
    staging_folder,
    typed_fields,
)
from .distillation import DISTILLATIONS, Teacher, completion_logits, completion_only, distillation_kl
from .samplers import SAMPLERS, SubnetSampler
from .supernet import SuperNetwork, get_supernet

NAS_STATS_NAME = "nas_stats.json"
logger = logging.getLogger(__name__)


@dataclass
class NASArgumentsMixin:
    """The super-network training settings, to mix into any `TrainingArguments` subclass.

    `NASTrainingArguments` is `TrainingArguments` with them; for another trainer's config write
    `@dataclass class MyConfig(NASArgumentsMixin, ItsConfig): pass` (e.g. `NASSFTConfig` for trl's `SFTConfig`).
    """

    sampling: str = field(
        default="uniform",
        metadata={
            "help": "How sub-networks are drawn each optimizer step: 'uniform' (random per dimension), 'sandwich' "
            "(max, min and sandwich_k random ones, losses averaged), 'progressive' (the max one first, then "
            "sandwiches over the rank, then also FFN width, then also head choices; see progressive_stages), 'max' "
            "(plain LoRA training), or a name added with hf_elastic.register_sampler.",
        },
    )
    sandwich_k: int = field(
        default=2, metadata={"help": "Random sub-networks per step for sampling='sandwich' and 'progressive'."}
    )
    progressive_stages: list[float] = field(
        default_factory=lambda: [0.25, 0.25, 0.25, 0.25],
        metadata={
            "help": "sampling='progressive': lengths, as fractions of max_steps, of its four stages: the max "
            "sub-network only, then rank choices open, then FFN widths too, then head counts too. Four numbers >= 0 "
            "that sum to 1."
        },
    )
    distillation: str = field(
        default="none",
        metadata={
            "help": "'inplace': the max sub-network's logits (detached) are the soft target of the other "
            "sub-networks of the same step, with no extra forward (needs a sampler that trains max first: "
            "'sandwich' or 'progressive'). 'teacher': the logits of a frozen teacher_model passed to the trainer "
            "(e.g. the dense base of a sparse or INT4 one), one extra forward without gradients per micro-batch. "
            "'none': the label loss only.",
            "choices": DISTILLATIONS,
        },
    )
    distillation_alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the distillation loss: (1 - alpha) * label loss + alpha * T^2 * KL(target || "
            "sub-network) on the completion tokens (labels != -100). 0 is the label loss alone."
        },
    )
    distillation_temperature: float = field(
        default=1.0, metadata={"help": "Temperature T of both distributions in the distillation loss (> 0)."}
    )
    eval_subnets: list[str] = field(
        default_factory=lambda: ["median"],
        metadata={
            "help": "Sub-networks that evaluate() scores, among 'max', 'min' and 'median'. Metrics are named "
            "eval_<name>_<metric>; eval_<metric> repeats the first one."
        },
    )
    on_nonfinite: str = field(
        default="skip",
        metadata={
            "help": "What a non-finite loss or gradient does to an optimizer step: 'skip' (no update, a warning "
            "naming the step and sub-network at the next logging step; decided on the device, without waiting for "
            "it) or 'stop' (raise at once; reads a flag from the device every optimizer step)."
        },
    )

    @typed_fields(owner="NASArgumentsMixin")
    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.sampling not in SAMPLERS:
            raise ValueError(
                f"{name}.sampling={self.sampling!r} is unknown; use one of {sorted(SAMPLERS)} "
                "or register your own with hf_elastic.register_sampler."
            )
        if self.sandwich_k < 0:
            raise ValueError(f"{name}.sandwich_k={self.sandwich_k} must be >= 0.")
        stages = self.progressive_stages
        if (
            not isinstance(stages, (list, tuple))
            or len(stages) != 4
            or not all(isinstance(x, (int, float)) and x >= 0 for x in stages)
            or not math.isclose(sum(stages), 1.0, abs_tol=1e-6)
        ):
            raise ValueError(
                f"{name}.progressive_stages={stages!r} must be four fractions >= 0 summing to 1 (max only, + rank, "
                "+ FFN width, + heads), e.g. [0.25, 0.25, 0.25, 0.25]."
            )
        self.progressive_stages = [float(x) for x in stages]
        if self.distillation not in DISTILLATIONS:
            raise ValueError(
                f"{name}.distillation={self.distillation!r} is unknown; use one of {list(DISTILLATIONS)}."
            )
        if self.distillation == "inplace" and self.sampling in ("uniform", "max"):
            raise ValueError(
                f"{name}.distillation='inplace' needs the max sub-network trained in every step as the target, which "
                f"sampling={self.sampling!r} does not do; use sampling='sandwich' or 'progressive'."
            )
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"{name}.distillation_alpha={self.distillation_alpha} must be in [0, 1], e.g. 0.5.")
        if not self.distillation_temperature > 0:
            raise ValueError(f"{name}.distillation_temperature={self.distillation_temperature} must be > 0, e.g. 1.0.")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"{name}.on_nonfinite={self.on_nonfinite!r} is unknown; use 'skip' or 'stop'.")
        bad = [n for n in self.eval_subnets if n not in ("max", "min", "median")]
        if not self.eval_subnets or bad:
            raise ValueError(
                f"{name}.eval_subnets={self.eval_subnets!r} must be a non-empty list of 'max', 'min' and 'median'."
            )


@dataclass
class NASTrainingArguments(NASArgumentsMixin, TrainingArguments):
    """`TrainingArguments` plus the super-network training settings."""


class NASTrainerMixin:
    """Makes a `transformers.Trainer` subclass train a super-network: one sampled sub-network per optimizer step.

    Put it first among the bases, e.g. `class NASSFTTrainer(NASTrainerMixin, SFTTrainer)`; `NASTrainer` is
    `NASTrainerMixin` on `Trainer`. It adds the `SubnetSampler` callback (same draws for the same seed on every
    trainer and rank, resumable), trains each config of a sandwich step on every micro-batch with the losses averaged,
    scores `eval_subnets` in `evaluate`, logs `subnet_params` and writes `nas_stats.json` beside the super-adapter.

    The NAS settings are read from `args` (fields of `NASArgumentsMixin`; plain arguments get its defaults).
    `peft_config` is applied with `get_peft_model` here, or handed to the trainer when its `__init__` takes one
    (trl's trainers do). `teacher_model` is the frozen teacher of `distillation="teacher"`.

    Where the loss is the causal LM's own, training computes the logits at the completion tokens only
    (`completion_logits_only`; the loss and gradients are unchanged).
    """

    supernet: SuperNetwork
    sampler: SubnetSampler
    completion_logits_only: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(NASTrainerMixin):
            base = next((b for b in cls.__bases__ if issubclass(b, Trainer)), Trainer).__name__
            raise TypeError(
                f"{cls.__name__} lists NASTrainerMixin after {base}, so the Trainer's methods would hide the "
                f"sampler's; put it first: `class {cls.__name__}(NASTrainerMixin, {base})`."
            )

    def __init__(
        self,
        model: Any = None,
        args: TrainingArguments | None = None,
        *rest: Any,
        peft_config: PeftConfig | None = None,
        teacher_model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{type(self).__name__} needs a transformers.Trainer among its bases, after NASTrainerMixin."
            )
        if peft_config is not None:
            set_seed(args.seed if args is not None else 42)  # the LoRA initialisation follows the training seed
            if "peft_config" in inspect.signature(super().__init__).parameters:
                kwargs["peft_config"] = peft_config
            else:
                model = get_peft_model(model, peft_config)
        try:
            super().__init__(model, args, *rest, **kwargs)
        except TypeError as error:
            field_names = [f.name for f in fields(NASArgumentsMixin) if f"'{f.name}'" in str(error)]
            if not field_names:
                raise
            raise TypeError(
                f"{type(self).__name__}: its trainer rebuilt `args` as its own config class, which has no "
                f"{field_names[0]!r} field ({error}). Pass args of a config class that mixes in the NAS settings, "
                "e.g. `@dataclass class MyConfig(NASArgumentsMixin, ItsConfig): pass` (hf_elastic.NASSFTConfig for "
                "trl's SFTConfig)."
            ) from error
        self._setup_sampler()
        self._setup_distillation(teacher_model)
        self.completion_logits_only = self._loss_reads_completion_logits_only()

    def _setup_distillation(self, teacher: torch.nn.Module | None) -> None:
        self.distillation = getattr(self.args, "distillation", "none")
        self.distillation_alpha = getattr(self.args, "distillation_alpha", 0.5)
        self.distillation_temperature = getattr(self.args, "distillation_temperature", 1.0)
        if self.distillation == "teacher" and teacher is None:
            raise ValueError(
                "distillation='teacher' needs the frozen teacher: pass teacher_model=... to the trainer (for a sparse "
                "or INT4 base, the dense base model it was compressed from)."
            )
        if teacher is not None and self.distillation != "teacher":
            raise ValueError(
                f"teacher_model was given but distillation={self.distillation!r}; pass distillation='teacher' in the "
                "training arguments to train against it, or leave teacher_model out."
            )
        self.teacher = Teacher(teacher, self.args.device) if teacher is not None else None
        self._distill_target: torch.Tensor | None = None

    def _loss_reads_completion_logits_only(self) -> bool:
        """Whether training may compute the logits at the completion tokens only (`completion_only`): the loss is
        the model's own causal-LM loss (no label smoother or `compute_loss_func`, and no `compute_loss` of the trainer
        under the mixin, e.g. trl's, which reads every position's logits), and the model takes `logits_to_keep` and
        `shift_labels`."""
        mro = type(self).__mro__
        owner = next(c for c in mro[mro.index(NASTrainerMixin) + 1 :] if "compute_loss" in vars(c))
        if owner is not Trainer or self.label_smoother is not None or self.compute_loss_func is not None:
            return False
        model = self.supernet.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return False
        loss_function = getattr(base, "loss_function", None)  # read only now: it warns on a model without a loss type
        return callable(loss_function) and "shift_labels" in inspect.signature(loss_function).parameters

    def _setup_sampler(self) -> None:
        self.supernet = get_supernet(self.model)
        _ = self.supernet.costs  # built now: it reads every base weight, which FSDP2 shards once training starts
        self.sampling = getattr(self.args, "sampling", "uniform")
        self.eval_subnets = getattr(self.args, "eval_subnets", ["median"])
        if self.sampling == "sandwich" and self.supernet.space.num_configs < 2:
            raise ValueError("sampling='sandwich' needs at least two sub-networks, but the search space has one.")
        self.sampler = SubnetSampler(
            self.supernet,
            self.sampling,
            self.args.seed,
            getattr(self.args, "sandwich_k", 2),
            getattr(self.args, "on_nonfinite", "skip"),
            getattr(self.args, "progressive_stages", None),
        )
        self._subnet, self._subnet_weight = self.sampler.current[0], 1.0
        self.add_callback(self.sampler)

    def training_step(self, model, inputs, num_items_in_batch=None):
        configs = self.sampler.current
        if self.distillation == "inplace" and len(configs) > 1 and configs[0] != self.supernet.space.max_config():
            raise ValueError(
                f"distillation='inplace' takes the first sub-network of a step as the target, but sampling="
                f"{self.sampling!r} drew {self.sampler.key(configs[0])} first, not the max one. Use sampling="
                "'sandwich' or 'progressive', or a sampler that returns the max config first."
            )
        self._distill_target = self.teacher(self._prepare_inputs(inputs)) if self.teacher else None
        try:
            if len(configs) == 1:  # already active since on_step_begin
                self._subnet, self._subnet_weight = configs[0], 1.0
                return super().training_step(model, inputs, num_items_in_batch)
            total = None
            for config in configs:
                self.supernet.activate(config)
                self._subnet, self._subnet_weight = config, 1.0 / len(configs)
                loss = super().training_step(model, inputs, num_items_in_batch)
                total = loss if total is None else total + loss
            self.supernet.activate(configs[0])
            return total
        finally:
            self._distill_target = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.completion_logits_only:
            inputs = inputs | completion_only(inputs.get("labels"))
        if self.distillation != "none" and model.training:
            loss, outputs = self._distillation_loss(model, inputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = (result[0], result[1]) if return_outputs else (result, None)
            if model.training:
                self.sampler.record_loss(self._subnet, loss)
        if model.training:
            loss = loss * self._subnet_weight
        return (loss, outputs) if return_outputs else loss

    def _distillation_loss(self, model, inputs, num_items_in_batch) -> tuple[torch.Tensor, Any]:
        """`(1 - alpha) * label loss + alpha * T^2 * KL(target || sub-network)`, normalized as the label loss is.

        The label loss and the logits come from `Trainer.compute_loss` (a trainer's own, e.g. trl's fused loss,
        builds no logits); with in-place distillation the max sub-network's logits become the step's target.
        """
        labels = inputs.get("labels")
        label_loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        self.sampler.record_loss(self._subnet, label_loss)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        student = completion_logits(logits, labels, inputs.get("shift_labels"))
        if self.distillation == "inplace" and self._distill_target is None:
            if self._subnet == self.supernet.space.max_config():  # the target of the step's other sub-networks
                self._distill_target = student.detach()
            return label_loss, outputs
        kl = distillation_kl(student, self._distill_target, self.distillation_temperature)
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:  # as the label loss: GA- and DDP-exact
            kl = kl / num_items_in_batch
            if self.args.average_tokens_across_devices:
                kl = kl * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        else:
            kl = kl / max(1, student.shape[0])
        alpha = self.distillation_alpha
        return (1.0 - alpha) * label_loss + alpha * kl.to(label_loss.dtype), outputs

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs["subnet_params"] = self.supernet.count(self.sampler.current[0])["params"]
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score each sub-network in `eval_subnets`; metrics are `<prefix>_<subnet>_<name>`."""
        previous = self.supernet.active_config
        metrics: dict[str, float] = {}
        plain = f"{metric_key_prefix}_"
        try:
            for name in self.eval_subnets:
                self.supernet.activate(name)
                own = f"{plain}{name}_"
                for key, value in super().evaluate(eval_dataset, ignore_keys, own[:-1]).items():
                    if key.startswith(plain) and not key.startswith(own):  # logged with the plain prefix (trl)
                        key = own + key.removeprefix(plain)
                    metrics[key] = value
                    if name == self.eval_subnets[0] and key.startswith(own):
                        metrics[plain + key.removeprefix(own)] = value
        finally:
            self.supernet.activate(previous)
        return metrics

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest complete checkpoint, skipping one that an
        interrupted save left half-written (with a warning). The training rows are checked against the model's
        positions and vocabulary first (`check_token_rows`)."""
        config = getattr(self.model, "config", None)
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        check_token_rows(self.train_dataset, "train_dataset", positions, getattr(config, "vocab_size", None))
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint-<step> folder in {self.args.output_dir} to resume from.")
        elif resume_from_checkpoint:
            problem = checkpoint_problem(Path(resume_from_checkpoint))
            if problem:
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint}: {problem}. Pass an earlier checkpoint, or "
                    "resume_from_checkpoint=True for the newest complete one."
                )
        if resume_from_checkpoint:
            self._check_resumed_space(Path(resume_from_checkpoint))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"Refused to load a pickled file of {resume_from_checkpoint} (optimizer.pt, scheduler.pt, "
                f"rng_state*.pth): it holds more than tensors ({error}). Resume only from checkpoints you wrote."
            ) from None
        except RuntimeError as error:
            if not resume_from_checkpoint or "size mismatch" not in str(error):
                raise
            raise ValueError(
                f"Cannot resume from {resume_from_checkpoint}: its adapter weights have other shapes than this "
                "model's (another rank_choices, target_modules or base model). Resume with the settings it was "
                "trained with, or start a new output folder."
            ) from None

    def _check_resumed_space(self, path: Path) -> None:
        """Refuse, before any weight is loaded, a checkpoint trained with other elastic settings than this run's."""
        elastic = path / ELASTIC_CONFIG_NAME
        try:
            saved = json.loads(elastic.read_text())
        except (OSError, ValueError):
            return  # not written by NASTrainer.save_model: the sampler's fingerprint check still applies
        ours = json.loads(json.dumps(self.supernet.config.elastic_dict(), default=list))
        fields_ = [
            k for k in type(self.supernet.config).elastic_fields if k not in ("base_fingerprint", "base_sparsity")
        ]
        differ = [k for k in fields_ if k in saved and saved[k] != ours.get(k)]
        if differ:
            what = "; ".join(f"{k}: checkpoint {saved[k]!r}, this run {ours.get(k)!r}" for k in differ)
            option = " / ".join("--" + k.replace("_", "-") for k in differ)
            raise ValueError(
                f"Cannot resume from {path}: it was trained with other elastic settings ({what}). Resume with the "
                f"same {option} (NLSConfig/ElasticLoraConfig), or start a new output folder."
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the super-adapter (plain LoRA + `elastic_config.json`), the sampling statistics and what `Trainer`
        saves beside them (training arguments, tokenizer).

        Everything is written to a hidden staging folder first and moved in with `commit_files`: a run killed at any
        point leaves the previous save or the whole new one (finished by the next load or save). A write that fails
        for lack of space names the file and leaves the previous save untouched. `elastic_config.json` records the
        adapter's SHA-256, so `load_super_network` detects weights and configs of different saves. Adapter weights
        that are not finite are never saved.
        """
        out = Path(output_dir or self.args.output_dir)
        bad = self._nonfinite_trainable()
        if bad:
            raise FloatingPointError(
                f"Refusing to save to {out}: {len(bad)} adapter tensors hold NaN or inf (first: {bad[0]}). Resume "
                "from the last checkpoint with a lower learning rate, or train with on_nonfinite='stop' to find the "
                "step."
            )
        staging = staging_folder(out)
        if self.args.should_save:
            recover_files(out)
            shutil.rmtree(staging, ignore_errors=True)
        try:
            with explain_full_disk(out, staging):
                self._save_staged(staging, _internal_call)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.args.should_save:
            commit_files(out)

    def _nonfinite_trainable(self) -> list[str]:
        """Names of the trainable tensors that hold NaN or inf. Under FSDP2 each rank sees its shard, so the ranks
        agree (one all-reduce) before any of them raises: none is left waiting in the gather of the save."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            return []
        flags = torch.stack([~torch.isfinite(local_tensor(p.detach())).all() for _, p in named])
        if any(hasattr(p, "to_local") for _, p in named):
            flags = any_rank(flags, self.args.device)
        return [n for (n, _), bad in zip(named, flags.tolist(), strict=True) if bad]

    def _save_staged(self, staging: Path, _internal_call: bool) -> None:
        super().save_model(str(staging), _internal_call)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type) and not _internal_call:
            warnings.warn(
                "save_model wrote no super-adapter: FSDP's state_dict_type is "
                f"{plugin.state_dict_type}, which Trainer saves only in checkpoints. Launch with "
                "`--fsdp_state_dict_type FULL_STATE_DICT` (or set it in the FSDP plugin) to save a loadable adapter.",
                stacklevel=3,
            )
        if self.args.should_save:
            elastic = staging / ELASTIC_CONFIG_NAME
            save_id = json.loads(elastic.read_text()).get("save_id") if elastic.is_file() else None
            atomic_write_json(staging / NAS_STATS_NAME, self.sampler.stats() | {"save_id": save_id})


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete Trainer checkpoint, or None. Trainer writes `trainer_state.json` last."""
    from safetensors import SafetensorError, safe_open

    if not path.is_dir():
        return "it is not a folder"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (its save was interrupted)"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its trainer_state.json is not valid JSON (its save was interrupted)"
    for weights in path.glob("*.safetensors"):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{weights.name} is damaged ({error})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-<step>` folder of `output_dir` that is complete; incomplete newer ones are skipped."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("Skipping %s: %s.", path, problem)
    return None


class NASTrainer(NASTrainerMixin, Trainer):
    """Trains an `NLSConfig`/`ElasticLoraConfig` super-network: one sampled sub-network per optimizer step.

    Accepts a peft model, or a base model plus `peft_config` (then `get_peft_model` is called here). With plain
    `TrainingArguments` the defaults of `NASTrainingArguments` apply. `NASTrainerMixin` brings the same behaviour to
    other `Trainer` subclasses (`NASSFTTrainer` for trl).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        peft_config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> None:
        args = args or NASTrainingArguments(output_dir="tmp_trainer")
        super().__init__(model, args, peft_config=peft_config, **kwargs)
