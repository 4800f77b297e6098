"""A memory planner: peak GPU memory and host RAM of each stage of a method, from the model's config alone.

`plan_memory` builds the model on the meta device (shapes, no weights) and counts what this code keeps alive at the
peak of each stage: base weights (at their dtype, or INT4 codes + scales + zero points + rounding residual), adapters
with their AdamW states, the tensors autograd saves per layer and token (and per weight for the fused SparsePEFT /
QA-SparsePEFT layers: a bit-packed mask, and moved codes and gate for QA), the logits and the loss's float32 copies,
the calibration activations of Wanda/GPTQ, and the copies that export makes. In the spirit of
`accelerate estimate-memory`, but aware of the method. `benchmarks/bench_memory_model.py` checks it against measured
peaks on CPU models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.arch import decoder_layers
from ..tuners.methods import DEMO_METHODS, Method

METHODS = tuple(DEMO_METHODS)  # lonas, shears, sqft, sqft-qa: the demo names of the registry
STAGES = ("sparsify", "quantize", "train", "search", "export", "openvino")
GiB = 2**30
# What a GPU cannot give to tensors: the CUDA context and the caching allocator's fragmentation.
CUDA_CONTEXT = 1 * GiB
FRAGMENTATION = 0.05
MIN_MICRO_BATCH = 4
# host RAM that tracing and converting to OpenVINO take beyond the weights: a float32 copy of the embedding table (the
# only weight the converter does not view), the graph of each transformer layer and the rest of the graph, and, for
# an INT model, reading the IR back and compressing it; fitted to benchmarks/bench_memory_model.py's measurements
OPENVINO_LAYER = 4 * 2**20
OPENVINO_FIXED = 1 * 2**20
OPENVINO_REWRITE = 20 * 2**20
_GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj", "qkv_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj", "gate_up_proj"),
    "mlp_out": ("down_proj",),
}
_TARGETS = {"phi3": ("qkv_proj", "gate_up_proj", "down_proj"), "default": ("q_proj", "k_proj", "v_proj", "up_proj")}


@dataclass(frozen=True)
class MethodSettings:
    """How a method compresses the base and trains its adapter (the published recipe by default)."""

    name: str = field(metadata={"help": "lonas, shears, sqft or sqft-qa."})
    sparsity: float = field(default=0.0, metadata={"help": "Wanda sparsity of the base (0: dense)."})
    bits: int | None = field(default=None, metadata={"help": "GPTQ bits of the base (None: float base)."})
    group_size: int = field(default=128, metadata={"help": "GPTQ group size."})
    sparse_adapter: bool = field(default=False, metadata={"help": "SparsePEFT: delta masked by the base's zeros."})
    quantization_aware: bool = field(default=False, metadata={"help": "QA-SparsePEFT: adapter through the INT grid."})
    widths: bool = field(default=False, metadata={"help": "Elastic FFN widths (LoNAS)."})
    rank: int = field(default=32, metadata={"help": "Largest LoRA rank."})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    gate_proj: bool = field(default=False, metadata={"help": "gate_proj adapted too."})
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Module names with adapters, instead of the recipe's (then gate_proj is moot)."},
    )
    export_ffn: float = field(default=1.0, metadata={"help": "FFN width kept by the exported (median) sub-network."})
    batch_size: int = field(default=16, metadata={"help": "Per-device micro-batch of the recipe."})
    accumulation: int = field(default=1, metadata={"help": "Gradient accumulation steps of the recipe."})

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation


def method_settings(method: Method) -> MethodSettings:
    """The planner's view of a registry method and its published recipe (`hf_elastic.tuners.methods`)."""
    recipe, widths = method.recipe, method.recipe.ffn_width_choices
    return MethodSettings(
        method.demo_name or method.name,
        sparsity=method.base_sparsity,
        bits=method.base_bits,
        sparse_adapter=method.sparse_adapter,
        quantization_aware=method.quantization_aware,
        widths=widths is not None,
        rank=max(recipe.rank_choices),
        dropout=recipe.lora_dropout,
        gate_proj="gate_proj" in recipe.extra_targets,
        export_ffn=sorted(widths)[len(widths) // 2] if widths else 1.0,  # the median sub-network
        batch_size=recipe.batch_size,
        accumulation=recipe.gradient_accumulation,
    )


RECIPES = {name: method_settings(method) for name, method in DEMO_METHODS.items()}


@dataclass(frozen=True)
class ModelShape:
    """What the planner reads from a config: sizes, and the linear layers of one decoder layer."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    linears: tuple[tuple[str, str, int, int], ...]  # (name, group, in, out) of one layer
    params: int  # all parameters (tied ones once)

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for _, _, i, o in self.linears)

    @property
    def other_params(self) -> int:
        return self.params - self.layers * self.layer_linear_params


@dataclass(frozen=True)
class StageMemory:
    """Peak memory of one stage: on the GPU (the device that holds the model) and in host RAM."""

    stage: str
    device: int
    host: int
    note: str = ""


@dataclass(frozen=True)
class TrainSetting:
    micro_batch: int
    accumulation: int
    checkpointing: bool
    device: int
    fits: bool


@dataclass(frozen=True)
class MemoryPlan:
    """`plan_memory`'s answer: per-stage peaks and the training settings that fit `gpu_memory`."""

    model: str
    method: MethodSettings
    seq_len: int
    gpus: int
    gpu_memory: int
    dtype: str
    weights: int  # the base model as trained: float weights, or codes + scales + zero points (+ residual)
    adapters: int  # the super-adapter's weights (float32)
    stages: tuple[StageMemory, ...]
    train_options: tuple[TrainSetting, ...]
    chosen: TrainSetting | None

    def stage(self, name: str) -> StageMemory:
        return next(s for s in self.stages if s.stage == name)

    def table(self) -> str:
        return format_plan(self)

    def __str__(self) -> str:
        return format_plan(self)


def parse_memory(value: str | int | float) -> int:
    """Bytes of `80GB`, `80GiB`, `24 GB` or a number of GiB (GB and GiB are both read as 2**30 bytes)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * GiB)
    match = re.fullmatch(r"\s*([0-9.]+)\s*(g|gb|gib|m|mb|mib)?\s*", str(value).lower())
    if not match:
        raise ValueError(f"gpu_memory={value!r} is not a size; write e.g. '80GB', '24GiB' or 48.")
    scale = GiB if (match.group(2) or "g").startswith("g") else 2**20
    return int(float(match.group(1)) * scale)


def usable_memory(gpu_memory: int) -> int:
    """What tensors can use of a GPU of `gpu_memory` bytes (minus the CUDA context and fragmentation)."""
    return int(gpu_memory * (1 - FRAGMENTATION)) - CUDA_CONTEXT


def _group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    for group, names in _GROUPS.items():
        if leaf in names:
            return group
    raise ValueError(
        f"The planner knows Llama-family layers (q/k/v/o, gate/up/down, Phi-3's fused qkv/gate_up); {name!r} is "
        "none of them."
    )


def model_shape(config_or_path: Any) -> ModelShape:
    """The `ModelShape` of a transformers config, a model folder or config.json, built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        config, name = config_or_path, getattr(config_or_path, "_name_or_path", "") or config_or_path.model_type
    else:
        path = Path(config_or_path)
        if path.is_file():
            path = path.parent
        if not (path / "config.json").is_file():
            if not path.exists() and str(config_or_path).count("/") == 1:
                config = AutoConfig.from_pretrained(str(config_or_path))  # a Hub id (config.json only)
                return _shape(config, str(config_or_path), AutoModelForCausalLM)
            raise FileNotFoundError(f"No config.json in {path}: pass a model folder, its config.json or a Hub id.")
        config, name = AutoConfig.from_pretrained(path), str(config_or_path)
    return _shape(config, name, AutoModelForCausalLM)


def _shape(config: Any, name: str, auto: Any) -> ModelShape:
    with torch.device("meta"):
        model = auto.from_config(config)
    _, layer = decoder_layers(model)[0]
    linears = tuple(
        (rel, _group(rel), m.in_features, m.out_features)
        for rel, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    return ModelShape(
        name=name,
        model_type=text.model_type,
        vocab=text.vocab_size,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size,
        linears=linears,
        params=params,
    )


@dataclass(frozen=True)
class _Model:
    """Byte counts that every stage shares."""

    shape: ModelShape
    m: MethodSettings
    a: int  # bytes per activation / base weight (the model's dtype)
    ad: int  # bytes per adapter weight (peft keeps adapters in float32)
    autocast: bool  # mixed precision: a bf16/fp16 model trained under autocast

    def adapted(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        if self.m.targets is not None:
            return leaf in self.m.targets
        targets = _TARGETS.get(self.shape.model_type, _TARGETS["default"]) + ("down_proj",)
        return leaf in targets or (self.m.gate_proj and leaf == "gate_proj")

    @property
    def adapter_params(self) -> int:
        per_layer = sum(self.m.rank * (i + o) for n, _, i, o in self.shape.linears if self.adapted(n))
        return self.shape.layers * per_layer

    def quant_bytes_per_weight(self, residual: bool) -> float:
        """`QuantLinear`: uint8 codes, float32 scales and uint8 zeros per group, int8 residual when kept."""
        return 1 + 5 / self.m.group_size + (1 if residual else 0)

    def base_weights(self, quantized: bool | None = None, residual: bool | None = None) -> int:
        quantized = self.m.bits is not None if quantized is None else quantized
        residual = self.m.quantization_aware if residual is None else residual
        per_weight = self.quant_bytes_per_weight(residual) if quantized else self.a
        s = self.shape
        return int(s.layers * s.layer_linear_params * per_weight + s.other_params * self.a)

    def adapters(self) -> int:
        return self.adapter_params * self.ad

    def exported_params(self) -> int:
        """Parameters of the exported sub-network: FFN sliced to `export_ffn`."""
        s = self.shape
        mlp = sum(i * o for _, g, i, o in s.linears if g.startswith("mlp"))
        return int(s.params - s.layers * mlp * (1 - self.m.export_ffn))

    def exported(self) -> int:
        """Bytes of the exported sub-network: merged, FFN sliced, no residual."""
        cut = self.shape.params - self.exported_params()
        per_weight = self.quant_bytes_per_weight(False) if self.m.bits is not None else self.a
        return int(self.base_weights(residual=False) - cut * per_weight)

    def exported_linear_params(self) -> int:
        """Weights of the exported sub-network's linear layers in the transformer layers (FFN sliced)."""
        s = self.shape
        return int(
            s.layers * sum(i * o * (self.m.export_ffn if g.startswith("mlp") else 1) for _, g, i, o in s.linears)
        )

    def changed_bytes(self, ffn: float | None = None) -> int:
        """Bytes of the weights the export merges or slices (the others are shared with the super-network), the FFN
        at fraction `ffn` of its width (default: `export_ffn`); at 1.0, the most a search's extracted copy adds."""
        s, m = self.shape, self.m
        ffn = m.export_ffn if ffn is None else ffn
        per_weight = self.quant_bytes_per_weight(False) if m.bits is not None else self.a
        changed = 0
        for name, group, i, o in s.linears:
            sliced = m.widths and group.startswith("mlp")
            if self.adapted(name) or sliced:
                changed += i * o * (ffn if sliced else 1)
        return int(s.layers * changed * per_weight)

    def max_weight(self) -> int:
        return max(i * o for _, _, i, o in self.shape.linears)

    def group_width(self, group: str) -> int:
        s = self.shape
        return {"attn_in": s.hidden, "attn_out": s.heads * s.head_dim, "mlp_in": s.hidden, "mlp_out": s.intermediate}[
            group
        ]

    # ------------------------------------------------------------------ training activations
    def layer_saved(self) -> tuple[float, float]:
        """Bytes autograd saves for backward in one decoder layer: (per token, per layer independent of tokens)."""
        s, m, a = self.shape, self.m, self.a
        cast = 2 if self.autocast else self.ad  # an adapter input: cast to the adapter dtype, or to bf16 by autocast
        masked = m.sparse_adapter or m.quantization_aware
        # two RMSNorms keep their float32 input; SDPA keeps q, k, v, out (+ float32 log-sum-exp); the MLP keeps
        # gate, act(gate) and up
        tok = 2 * 4 * s.hidden + a * (2 * s.heads + 2 * s.kv_heads) * s.head_dim + 4 * s.heads
        tok += 3 * a * s.intermediate
        const = 0.0
        raw_inputs = set()
        for name, group, fan_in, fan_out in s.linears:
            weights = fan_in * fan_out
            if not self.adapted(name):
                continue  # a frozen layer keeps nothing for backward (a QuantLinear dequantizes again from its codes)
            tok += m.rank * cast  # lora_B's input
            if masked:  # _MaskedLora: the base's mask is kept bit-packed once per layer (1/8 B per weight)
                const += weights / 8 + (weights * 2 + 4 * weights / m.group_size if m.quantization_aware else 0)
                if m.dropout:  # it keeps the dropped input (and dropout its mask) instead of x
                    tok += fan_in * (1 + cast)
                else:
                    raw_inputs.add(group)
            elif m.dropout:
                tok += fan_in * (1 + cast)  # the dropout mask and its output
            elif cast != a or self.autocast:
                tok += fan_in * cast
            else:
                raw_inputs.add(group)
        tok += sum(a * self.group_width(g) for g in raw_inputs)
        return tok, const

    def backward_transient(self, tokens: int) -> float:
        """Gradients in flight inside one layer's backward (+ the dense weight-sized buffers of the fused layers)."""
        s, a = self.shape, self.a
        flight = tokens * a * (3 * s.intermediate + 2 * s.hidden)
        if self.m.sparse_adapter or self.m.quantization_aware:  # W_eff, grad_W (x dtype, then float32), masked grad
            flight += self.max_weight() * (4 + a + 4 + 4)
        return flight

    def logits_train(self, tokens: int) -> float:
        """At the start of backward: the loss's float32 log-softmax, its gradient and the logits' gradient."""
        return tokens * self.shape.vocab * 12 + tokens * 4 * self.shape.hidden

    def logits_eval(self, tokens: int) -> float:
        return tokens * self.shape.vocab * (self.a + (4 if self.a != 4 else 0) + 4)

    def forward_transient(self, tokens: int) -> float:
        """The largest set of tensors alive inside one layer's forward (no grad), and the fused weight buffers."""
        s, a = self.shape, self.a
        flight = tokens * a * (3 * s.intermediate + 2 * s.hidden)  # the MLP's act(gate), up and product; x, residual
        if self.m.quantization_aware:  # mask, delta, steps, residual as float, moved codes, gate, dequantized
            flight = max(flight, self.max_weight() * (1 + 4 + 4 + 4 + 4 + 1 + 4))
        elif self.m.sparse_adapter:  # mask, delta (float32), W + delta, cast
            flight = max(flight, self.max_weight() * (1 + 4 + 4 + (a if a != 4 else 0)))
        return flight


def _train(model: _Model, micro: int, seq_len: int, accumulation: int, checkpointing: bool) -> int:
    s, a = model.shape, model.a
    tokens = micro * seq_len
    static = model.base_weights() + model.adapters() * (3 + (1 if accumulation > 1 else 0))  # + AdamW's 2 states
    tok, const = model.layer_saved()
    layer = tok * tokens + const
    if checkpointing:  # each layer keeps its input; backward redoes one layer at a time
        kept = s.layers * a * s.hidden * tokens
        peak = kept + max(model.logits_train(tokens), layer + model.backward_transient(tokens))
    else:
        peak = s.layers * layer + max(model.logits_train(tokens), model.backward_transient(tokens))
    return int(static + peak)


def _calibration(model: _Model, samples: int, seq_len: int, batch: int) -> float:
    """The captured hidden states of every sample (+ token ids and the rotary tables of each batch)."""
    s = model.shape
    states = (
        samples * seq_len * (model.a * s.hidden + 8) + math.ceil(samples / batch) * batch * seq_len * 8 * s.head_dim
    )
    return states


def plan_memory(
    config_or_path: Any,
    method: str | MethodSettings,
    seq_len: int = 512,
    batch_size: int | None = None,
    gpus: int = 1,
    gpu_memory: str | int | float = "80GB",
    dtype: str | torch.dtype = "bfloat16",
    calibration_samples: int = 128,
    calibration_batch: int = 8,
    eval_batch_size: int | None = None,
) -> MemoryPlan:
    """Plan the memory of every stage of `method` on the model of `config_or_path` (no weights are read).

    Args:
        config_or_path: a transformers config, a model folder, its config.json, or a Hub id.
        method: "lonas", "shears", "sqft", "sqft-qa" (the recipe's settings), or a `MethodSettings`.
        seq_len: tokens per training row and calibration window.
        batch_size: effective batch per GPU (default: the recipe's micro-batch × accumulation), kept by every
            training setting offered.
        gpus: data-parallel GPUs; each holds a whole copy and 1/gpus of the effective batch.
        gpu_memory: memory of one GPU ("80GB", "24GiB" or a number of GiB).
        dtype: the model's dtype ("bfloat16" trains under autocast with float32 adapters; "float32" as on CPU).
    """
    if isinstance(method, str):
        if method not in RECIPES:
            raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
        method = RECIPES[method]
    for option, value in (("seq_len", seq_len), ("gpus", gpus), ("calibration_samples", calibration_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option}={value!r} must be a positive integer.")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a float dtype; use 'bfloat16', 'float16' or 'float32'.")
    shape = config_or_path if isinstance(config_or_path, ModelShape) else model_shape(config_or_path)
    a = dtype.itemsize
    model = _Model(shape, method, a, 4, autocast=a < 4)
    effective = batch_size or method.effective_batch
    per_gpu = max(1, math.ceil(effective / gpus))
    memory = parse_memory(gpu_memory)
    usable = usable_memory(memory)
    loaded = shape.params * a  # host: from_pretrained reads the checkpoint on the CPU before `.to(device)`

    stages = []
    dense = model.base_weights(quantized=False)
    if method.sparsity:
        calib = _calibration(model, calibration_samples, seq_len, calibration_batch)
        # score |W|·‖X‖ in float32, the boolean mask, and the sort's values and int64 indices of the largest layer
        transform = model.max_weight() * (4 + 1 + 4 + 8)
        peak = dense + calib + max(model.forward_transient(calibration_batch * seq_len), transform)
        stages.append(StageMemory("sparsify", int(peak), loaded, "Wanda, one layer at a time"))
    if method.bits is not None:
        calib = _calibration(model, calibration_samples, seq_len, calibration_batch)
        hessians = sum(4 * i * i for _, _, i, _ in shape.linears)
        largest_in = max(i for _, _, i, _ in shape.linears)
        # GPTQ of the largest layer: float32 W, codes and residual, the Cholesky factors; then the error check
        gptq = model.max_weight() * (4 + 4 + 1 + 1 + 4 + 4 + 4) + 4 * 4 * largest_in**2
        # the replaced float layers stay referenced until quantize returns: float and INT4 copies coexist
        both = dense + model.base_weights(quantized=True) - shape.other_params * a
        note = "GPTQ; float layers freed only at the end"
        peak = both + calib + hessians + max(model.forward_transient(calibration_batch * seq_len), gptq)
        stages.append(StageMemory("quantize", int(peak), loaded, note))
    options = []
    for checkpointing in (False, True):
        micro = per_gpu
        while micro >= 1:
            if per_gpu % micro == 0:
                need = _train(model, micro, seq_len, per_gpu // micro, checkpointing)
                options.append(TrainSetting(micro, per_gpu // micro, checkpointing, need, need <= usable))
            micro //= 2
    chosen = _choose([o for o in options if o.fits], per_gpu)
    recipe = next(o for o in options if o.micro_batch == min(per_gpu, method.batch_size) and not o.checkpointing)
    shown = chosen or min(options, key=lambda o: o.device)
    note = f"micro-batch {shown.micro_batch} x {shown.accumulation}, checkpointing "
    note += f"{'on' if shown.checkpointing else 'off'} (recipe as shipped: {recipe.device / GiB:.1f} GiB)"
    stages.append(StageMemory("train", shown.device, loaded, note if chosen else "does not fit: " + note))
    eval_tokens = (eval_batch_size or min(per_gpu, method.batch_size)) * seq_len
    search = (
        model.base_weights()
        + model.adapters()
        + max(model.logits_eval(eval_tokens), model.forward_transient(eval_tokens))
    )
    note = "unmerged super-network, loss on one batch"
    if method.widths:  # with ranks alone, score_extracted="auto" keeps to the super-network
        note += f"; +{_gib(model.changed_bytes(ffn=1.0))} GiB to score extracted copies (score_extracted)"
    stages.append(StageMemory("search", int(search), loaded, note))
    stages.append(_export(model, loaded))
    stages.append(_openvino(model))
    return MemoryPlan(
        model=shape.name,
        method=method,
        seq_len=seq_len,
        gpus=gpus,
        gpu_memory=memory,
        dtype=str(dtype).removeprefix("torch."),
        weights=model.base_weights(),
        adapters=model.adapters(),
        stages=tuple(stages),
        train_options=tuple(options),
        chosen=chosen,
    )


def _choose(fitting: list[TrainSetting], per_gpu: int) -> TrainSetting | None:
    """The largest micro-batch without checkpointing if it keeps `MIN_MICRO_BATCH` rows (or the whole batch), else
    the largest one with it: recomputation costs about one forward pass (a third of a step), while a micro-batch of
    one or two rows leaves a GPU idle for most of each matmul."""
    plain = [o for o in fitting if not o.checkpointing and o.micro_batch >= min(MIN_MICRO_BATCH, per_gpu)]
    return max(plain or fitting, key=lambda o: (o.micro_batch, not o.checkpointing), default=None)


def _export(model: _Model, loaded: int) -> StageMemory:
    m = model.m
    base = model.base_weights() + model.adapters()
    if not (m.sparse_adapter or m.widths):  # Shears ships the adapter unmerged: a copy of the adapter only
        return StageMemory("export", int(base + model.adapters()), loaded, "adapter only (extract_adapter)")
    # extract_model(share_weights=True) shares the unchanged tensors and merges and slices one layer at a time:
    # the changed weights, plus one layer's full-size merged copy, float32 delta and mask
    qa = m.quantization_aware
    per_weight = model.quant_bytes_per_weight(False) if m.bits is not None else model.a
    merge = model.max_weight() * (per_weight + 4 + 1 + (4 + 2 if qa else 0) + 4)
    note = "merged layer by layer, unchanged weights shared"
    return StageMemory("export", int(base + model.changed_bytes() + merge), loaded + model.exported(), note)


def _openvino(model: _Model) -> StageMemory:
    """Host only, exporting the loaded sub-network: the model, the float32 model optimum traces (the model itself when
    it is float32; INT4/INT8 layers dequantized) and the converter's own working set. Codes and NNCF compression go
    into the IR read back from disk once the float32 model is gone, which needs less."""
    if model.a != 4:
        copy = 4 * model.exported_params()
    elif model.m.bits is not None:
        copy = 4 * model.exported_linear_params() + OPENVINO_REWRITE  # the float32 linear layers traced
    else:
        copy = 0  # a float32 model is traced as it is
    note = "CPU only: the model, its float32 copy, the converter"
    shape = model.shape
    converter = 4 * shape.vocab * shape.hidden + shape.layers * OPENVINO_LAYER + OPENVINO_FIXED
    return StageMemory("openvino", 0, int(model.exported() + copy + converter), note)


def _gib(value: int) -> str:
    return f"{value / GiB:.1f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table: one row per stage, then the training settings and whether they fit."""
    m = plan.method
    per_gpu = plan.train_options[0].micro_batch * plan.train_options[0].accumulation
    lines = [
        f"{plan.model}: {m.name}, {plan.dtype}, seq_len {plan.seq_len}, effective batch "
        f"{per_gpu * plan.gpus} on {plan.gpus} x {_gib(plan.gpu_memory)} GiB "
        f"(usable {_gib(usable_memory(plan.gpu_memory))} GiB)",
        f"{'stage':<10} {'GPU GiB':>8} {'host GiB':>9}  note",
    ]
    lines.append(
        f"{'weights':<10} {_gib(plan.weights):>8} {'':>9}  base as trained; adapters {_gib(plan.adapters)} GiB"
    )
    for s in plan.stages:
        lines.append(f"{s.stage:<10} {_gib(s.device) if s.device else '-':>8} {_gib(s.host):>9}  {s.note}")
    lines.append("training settings (micro-batch x accumulation, checkpointing): GPU GiB")
    for o in plan.train_options:
        mark = "*" if o == plan.chosen else ("fits" if o.fits else "")
        ckpt = "on " if o.checkpointing else "off"
        lines.append(f"  {o.micro_batch:>3} x {o.accumulation:<3} ckpt {ckpt}  {_gib(o.device):>7}  {mark}")
    if plan.chosen is None:
        lines.append("no training setting fits; use more GPUs, a shorter seq_len or a GPU with more memory")
    return "\n".join(lines)
