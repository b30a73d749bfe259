"""A user's own training config (axolotl, HF TrainingArguments / TRL SFTConfig, litgpt, torchtune,
DeepSpeed) as memplan Job fields: a pure mapping, no I/O (planner/config_files.py reads the files).

Each format is a table of key rules: a (dotted) key -> the Job fields it may set and one converter.
A converter checks its value (a wrong one is one MemplanInputError naming the file, the key, the
value and what is allowed) and sets fields, or stashes a value for the format's one combining step
(precision, method, LoRA targets: the keys that decide together). Every key of the file ends up in
`used` or `ignored` (with the reason); the format's own defaults where the file is silent (HF
Trainer's per_device_train_batch_size 8, litgpt's bf16-mixed) are listed in `defaults`.

Fields the lead is adding to Job (liger, packing, activation_offloading, ...) are set only when
`name in Job.model_fields` and the value validates; otherwise the key is listed as "recognised, not
modelled by this memplan", so the mapping lights up when the field lands. docs/inputs.md ("From your
training config") has the key table per format, with the library sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection

from pydantic import BaseModel, TypeAdapter

from .errors import MemplanInputError
from .job import INFERENCE_ONLY, LORA_ONLY, OPTIMIZERS, TRAINING_ONLY, Job

FORMATS: tuple[str, ...] = ("axolotl", "hf", "litgpt", "torchtune", "deepspeed")
FORMAT_NAMES = {
    "axolotl": "axolotl config",
    "hf": "HF TrainingArguments / TRL SFTConfig",
    "litgpt": "litgpt finetune config",
    "torchtune": "torchtune recipe",
    "deepspeed": "DeepSpeed config",
}

NO_EFFECT = "no effect on per-GPU memory (schedule, data, logging, evaluation or I/O)"
UNKNOWN = "not a key memplan's reader of the {fmt} knows"
NULL = "null: unset"


class FromConfig(BaseModel):
    """What a training config says, as Job fields, and how each of its keys was read."""

    format: str
    source: str
    fields: dict[str, Any]
    # (key, value in the file, Job field, value set)
    used: list[tuple[str, Any, str, Any]]
    # (key, why it sets nothing)
    ignored: list[tuple[str, str]]
    # (Job field, value, why): the format's own default where the file does not say
    defaults: list[tuple[str, Any, str]] = []
    # files the config points to (a DeepSpeed JSON, an FSDP config), as written in it
    references: list[tuple[str, str]] = []  # (kind: "deepspeed" | "fsdp", path)
    notes: list[str] = []
    # set when the file names no model memplan can use: the message if --model is not given either
    model_missing: str | None = None


# ---------------------------------------------------------------------------------------------
# reading state shared by the converters


class _State:
    def __init__(self, fmt: str, source: str, overridden: Collection[str]):
        self.fmt, self.source, self.overridden = fmt, source, frozenset(overridden)
        self.fields: dict[str, Any] = {}
        self.origin: dict[str, str] = {}  # field -> the key that set it
        self.used: list[tuple[str, Any, str, Any]] = []
        self.ignored: list[tuple[str, str]] = []
        self.defaults: list[tuple[str, Any, str]] = []
        self.references: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.stash: dict[str, tuple[str, Any]] = {}  # name -> (key, value), for the combining step
        self.model_missing: str | None = None

    def bad(self, key: str, value: Any, allowed: str) -> MemplanInputError:
        return MemplanInputError(f"{self.source}: {key}: {value!r} is not allowed: {allowed}")

    def set(self, key: str, raw: Any, field: str, value: Any) -> None:
        """Job field `field` = `value`, read from `key`; a field two keys set differently is an error;
        a field this memplan's Job lacks (or a value it does not take) lists the key as not modelled."""
        if field not in Job.model_fields:
            self.ignored.append((key, f"recognised, not modelled by this memplan (Job has no {field!r} field)"))
            return
        if not _allowed(field, value):
            self.ignored.append((key, f"recognised, not modelled by this memplan ({field} {value!r} is not one it estimates)"))
            return
        if field in self.fields and self.fields[field] != value:
            raise MemplanInputError(
                f"{self.source}: {self.origin[field]} and {key} disagree: {field} {self.fields[field]!r} vs {value!r}; "
                "keep one of them"
            )
        self.fields[field] = value
        self.origin[field] = key
        self.used.append((key, raw, field, value))

    def keep(self, name: str, key: str, value: Any) -> None:
        self.stash[name] = (key, value)

    def ignore(self, key: str, why: str) -> None:
        self.ignored.append((key, why))

    def default(self, field: str, value: Any, why: str) -> None:
        """The format's own default for `field`, where no key of the file set it."""
        if field in self.fields or field in self.overridden:
            return
        if field not in Job.model_fields or not _allowed(field, value):
            return
        if value == Job.model_fields[field].default and field not in ("stack",):
            return  # what the Job assumes anyway
        self.fields[field] = value
        self.origin[field] = f"({self.fmt} default)"
        self.defaults.append((field, value, why))


_ADAPTERS: dict[str, TypeAdapter] = {}


def _allowed(field: str, value: Any) -> bool:
    adapter = _ADAPTERS.get(field) or _ADAPTERS.setdefault(field, TypeAdapter(Job.model_fields[field].annotation))
    try:
        adapter.validate_python(value)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# converters: (state, key, value) -> None


Convert = Callable[[_State, str, Any], None]


@dataclass(frozen=True)
class Rule:
    fields: tuple[str, ...]  # the Job fields the key can set (a command-line option for one of them wins)
    convert: Convert
    doc: str = ""


def _int(st: _State, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise st.bad(key, v, "a positive integer")
    return v


def _bool(st: _State, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise st.bad(key, v, "true or false")
    return v


def positive(field: str) -> Rule:
    return Rule((field,), lambda st, k, v: st.set(k, v, field, _int(st, k, v)), f"`{field}`")


def flag(field: str, invert: bool = False) -> Rule:
    return Rule((field,), lambda st, k, v: st.set(k, v, field, _bool(st, k, v) ^ invert),
                f"`{field}`" + (" (negated)" if invert else ""))


def on_only(field: str, value: Any = True) -> Rule:
    """true sets `field` = `value`; false leaves it to the rest of the file (several keys may turn it on)."""
    def convert(st: _State, k: str, v: Any) -> None:
        if _bool(st, k, v):
            st.set(k, v, field, value)
        else:
            st.ignore(k, "false: off")
    return Rule((field,), convert, f"true: `{field}={value}`")


def dropout(field: str = "lora_dropout") -> Rule:
    def convert(st: _State, k: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise st.bad(k, v, "a number from 0 up to (not including) 1")
        st.set(k, v, field, float(v))
    return Rule((field,), convert, f"`{field}`")


def stash(name: str, fields: tuple[str, ...] = (), doc: str = "") -> Rule:
    return Rule(fields, lambda st, k, v: st.keep(name, k, v), doc)


def ignored(why: str = NO_EFFECT) -> Rule:
    return Rule((), lambda st, k, v: st.ignore(k, why), "")


def not_modelled(why: str) -> Rule:
    return Rule((), lambda st, k, v: st.ignore(k, f"recognised, not modelled by this memplan ({why})"), "")


# --- shared vocabularies -----------------------------------------------------------------------

# HF TrainingArguments `optim` (transformers training_args.py OptimizerNames; axolotl takes the same
# names): -> (Job optimizer, foreach). adamw_torch is torch.optim.AdamW with foreach on CUDA (its
# sqrt temporary); adamw_torch_fused (transformers' default with torch >= 2.8) runs the fused kernel,
# which allocates no weights-sized temporary: counted as the per-parameter path (foreach off).
HF_OPTIMIZERS: dict[str, tuple[str, bool]] = {
    "adamw_torch": ("adamw", True),
    "adamw_torch_fused": ("adamw", False),
    "adamw_bnb_8bit": ("adamw_8bit", True),
    "adamw_8bit": ("adamw_8bit", True),
    "paged_adamw_8bit": ("paged_adamw_8bit", True),
    "paged_adamw_32bit": ("paged_adamw", True),
    "sgd": ("sgd", True),
}

# torch / bitsandbytes optimizer classes (litgpt class_path, torchtune _component_)
CLASS_OPTIMIZERS: dict[str, str] = {
    "torch.optim.adamw": "adamw",
    "torch.optim.adam": "adamw",  # the same two states and step
    "adamw": "adamw",
    "adam": "adamw",
    "torch.optim.sgd": "sgd",
    "sgd": "sgd",
    "bitsandbytes.optim.adamw8bit": "adamw_8bit",
    "bitsandbytes.optim.adam8bit": "adamw_8bit",
    "bitsandbytes.optim.pagedadamw8bit": "paged_adamw_8bit",
    "bitsandbytes.optim.pagedadamw": "paged_adamw",
    "bitsandbytes.optim.pagedadamw32bit": "paged_adamw",
}


def _optimizer_refusal(st: _State, key: str, v: Any, allowed: str) -> MemplanInputError:
    return MemplanInputError(
        f"{st.source}: {key}: optimizer {v!r} is not one memplan models (its states differ from AdamW's, so memplan "
        f"will not estimate another in its place); allowed: {allowed}; or give --optimizer to estimate with one of "
        f"{', '.join(OPTIMIZERS)}"
    )


def _hf_optim(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or v.lower() not in HF_OPTIMIZERS:
        raise _optimizer_refusal(st, k, v, ", ".join(HF_OPTIMIZERS))
    opt, foreach = HF_OPTIMIZERS[v.lower()]
    st.set(k, v, "optimizer", opt)
    if not foreach:
        st.set(k, v, "foreach", False)


HF_OPTIM = Rule(("optimizer",), _hf_optim, "`optimizer` (+ `foreach`), table below")

TORCH_DTYPES = {
    "bfloat16": "bf16", "bf16": "bf16", "torch.bfloat16": "bf16",
    "float16": "fp16", "fp16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "float32": "fp32", "fp32": "fp32", "float": "fp32", "torch.float32": "fp32",
}


def _weight_dtype(st: _State, k: str, v: Any) -> None:
    if isinstance(v, str) and v.lower() == "auto":
        st.keep("weight_dtype", k, "auto")
        return
    if not isinstance(v, str) or v.lower() not in TORCH_DTYPES:
        raise st.bad(k, v, "bfloat16, float16, float32 or auto")
    st.keep("weight_dtype", k, v)


WEIGHT_DTYPE = Rule(("weight_dtype",), _weight_dtype, "`weight_dtype` (the dtype the model is loaded in)")

HF_ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash_attention_2",
                "flash_attention_3": "flash_attention_3", "flex_attention": "flex_attention"}


def _attention(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or v.lower() not in HF_ATTENTION:
        raise st.bad(k, v, ", ".join(HF_ATTENTION))
    st.set(k, v, "attention", HF_ATTENTION[v.lower()])


ATTENTION = Rule(("attention",), _attention, "`attention`")


def _targets(st: _State, k: str, v: Any) -> None:
    if isinstance(v, str):
        v2 = [v]
    else:
        v2 = v
    if not isinstance(v2, list) or not v2 or not all(isinstance(t, str) and t for t in v2):
        raise st.bad(k, v, "a list of module names (or all-linear)")
    st.keep("target_modules", k, tuple(v2))


TARGETS = Rule(("lora_targets",), _targets, "`lora_targets`")


def _checkpoint_kwargs_reentrant(st: _State, k: str, v: Any) -> None:
    st.set(k, v, "checkpoint_reentrant", _bool(st, k, v))


def _every_n_layers(st: _State, k: str, v: Any) -> None:
    if _int(st, k, v) != 1:
        raise st.bad(k, v, "1 (memplan checkpoints every decoder layer or none)")
    st.ignore(k, "1: every layer, as memplan counts checkpointing")


def _offload(st: _State, k: str, v: Any) -> None:
    if st.fmt == "axolotl" and v in ("legacy", "disk", "hidden_states"):  # axolotl's offloading variants
        v = True
    if _bool(st, k, v):
        st.set(k, v, "activation_offloading", True)
    else:
        st.ignore(k, "false: off")


# DeepSpeed JSON (deepspeed/runtime/zero/config.py; read inline under `deepspeed.` too)
def _zero_stage(st: _State, k: str, v: Any) -> None:
    stages = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
    if isinstance(v, bool) or v not in stages:
        raise st.bad(k, v, "0, 1, 2 or 3")
    st.set(k, v, "sharding", stages[v])


def _ds_offload(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or v.lower() not in ("cpu", "nvme", "none"):
        raise st.bad(k, v, "cpu, nvme or none")
    if v.lower() == "none":
        st.ignore(k, "none: no offload")
        return
    st.set(k, v, "cpu_offload", True)
    if v.lower() == "nvme":
        st.notes.append(f"{k}: nvme offload is counted as host offload (off the GPU either way)")


def _ds_micro_batch(st: _State, k: str, v: Any) -> None:
    if v == "auto":
        st.ignore(k, "auto: the trainer's per-device batch")
        return
    st.set(k, v, "micro_batch", _int(st, k, v))


def _ds_optimizer(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or v.lower() not in ("adam", "adamw"):
        raise _optimizer_refusal(st, k, v, "Adam, AdamW")
    # DeepSpeed's FusedAdam / CPUAdam: no weights-sized foreach temporary
    st.set(k, v, "optimizer", "adamw")
    st.set(k, v, "foreach", False)


def _ds_precision(st: _State, k: str, v: Any) -> None:
    if v == "auto":
        st.ignore(k, "auto: follows the trainer's bf16 / fp16")
    else:
        st.ignore(k, "recognised, not modelled by this memplan (DeepSpeed's own 16-bit weights with an fp32 master "
                     "copy); the trainer's precision keys decide the estimate")


DEEPSPEED: dict[str, Rule] = {
    "zero_optimization.stage": Rule(("sharding",), _zero_stage, "`sharding` zero1/zero2/zero3 (0: `ddp`)"),
    "zero_optimization.offload_optimizer.device": Rule(("cpu_offload",), _ds_offload, "cpu/nvme: `cpu_offload`"),
    "zero_optimization.offload_param.device": Rule(("cpu_offload",), _ds_offload, "cpu/nvme: `cpu_offload`"),
    "train_micro_batch_size_per_gpu": Rule(("micro_batch",), _ds_micro_batch, "`micro_batch` (auto: the trainer's)"),
    "optimizer.type": Rule(("optimizer",), _ds_optimizer, "Adam/AdamW: `optimizer=adamw`, `foreach=false`"),
    "bf16.enabled": Rule((), _ds_precision),
    "fp16.enabled": Rule((), _ds_precision),
    "activation_checkpointing.partition_activations": not_modelled("activations partitioned over ranks"),
    "activation_checkpointing.cpu_checkpointing": not_modelled("checkpoints kept in host RAM"),
}
DEEPSPEED_PREFIX_IGNORED = {
    "zero_optimization.": "recognised, not modelled by this memplan (bucket sizes, prefetch and persistence thresholds)",
    "optimizer.params.": NO_EFFECT,
    "scheduler.": NO_EFFECT,
    "fp16.": NO_EFFECT,
    "bf16.": NO_EFFECT,
    "activation_checkpointing.": "recognised, not modelled by this memplan",
}

# FSDP settings (transformers fsdp_config without the fsdp_ prefix; accelerate / axolotl with it)
FSDP_STRATEGIES = {
    "full_shard": "fsdp_full", "1": "fsdp_full",
    "shard_grad_op": "fsdp_grad_op", "2": "fsdp_grad_op",
    "no_shard": "ddp", "3": "ddp",
    "hybrid_shard": "fsdp_hybrid", "4": "fsdp_hybrid",
}


def _fsdp_strategy(st: _State, k: str, v: Any) -> None:
    name = str(v).lower()
    if name not in FSDP_STRATEGIES:
        raise st.bad(k, v, "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD (1-4); hybrid_shard_zero2 is not modelled")
    st.set(k, v, "sharding", FSDP_STRATEGIES[name])


def _fsdp_reshard(st: _State, k: str, v: Any) -> None:
    if isinstance(v, str):
        return _fsdp_strategy(st, k, v)
    st.set(k, v, "sharding", "fsdp_full" if _bool(st, k, v) else "fsdp_grad_op")


def _fsdp_offload(st: _State, k: str, v: Any) -> None:
    if _bool(st, k, v):
        st.set(k, v, "cpu_offload", True)
    else:
        st.ignore(k, "false: no offload")


def _fsdp_ckpt(st: _State, k: str, v: Any) -> None:
    if _bool(st, k, v):
        st.set(k, v, "gradient_checkpointing", True)
    else:
        st.ignore(k, "false: the trainer's gradient_checkpointing decides")


FSDP_CONFIG: dict[str, Rule] = {
    "sharding_strategy": Rule(("sharding",), _fsdp_strategy, "`sharding`"),
    "reshard_after_forward": Rule(("sharding",), _fsdp_reshard, "true: `fsdp_full`, false: `fsdp_grad_op`"),
    "offload_params": Rule(("cpu_offload",), _fsdp_offload, "`cpu_offload`"),
    "cpu_offload": Rule(("cpu_offload",), _fsdp_offload, "`cpu_offload`"),
    "activation_checkpointing": Rule(("gradient_checkpointing",), _fsdp_ckpt, "true: `gradient_checkpointing`"),
    "version": Rule(("fsdp_version",), lambda st, k, v: _fsdp_version(st, k, v), "`fsdp_version` (1 or 2)"),
}


def _fsdp_version(st: _State, k: str, v: Any) -> None:
    """FSDP1 and FSDP2 hold different buffers (docs/fsdp.md): the version is read, 1 or 2."""
    n = _int(st, k, v)
    if n not in (1, 2):
        raise st.bad(k, v, "1 (FullyShardedDataParallel) or 2 (fully_shard)")
    st.set(k, v, "fsdp_version", n)


def _fsdp_option(st: _State, k: str, v: Any) -> None:
    """HF / axolotl `fsdp`: "full_shard auto_wrap offload", a list of those, or true (FSDP2 full shard)."""
    if v is True:
        st.set(k, v, "sharding", "fsdp_full")
        return
    if v is False or v in ("", []):
        st.ignore(k, "no FSDP")
        return
    items = v.split() if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise st.bad(k, v, '"full_shard auto_wrap offload"-style options, a list of them, or true')
    for item in items:
        name = item.lower()
        if name in FSDP_STRATEGIES:
            st.set(k, v, "sharding", FSDP_STRATEGIES[name])
        elif name == "offload":
            st.set(k, v, "cpu_offload", True)
        elif name != "auto_wrap":
            raise st.bad(k, v, "full_shard, shard_grad_op, no_shard, hybrid_shard, offload, auto_wrap")
    if "sharding" not in st.fields:
        st.set(k, v, "sharding", "fsdp_full")


FSDP_OPTION = Rule(("sharding",), _fsdp_option, "`sharding` (+ `cpu_offload` for offload)")


def _reference(kind: str) -> Convert:
    def convert(st: _State, k: str, v: Any) -> None:
        if v == {} or v == "":
            st.ignore(k, "empty")
            return
        if not isinstance(v, str) or not v:
            raise st.bad(k, v, f"a path to a {kind} JSON file, or the settings inline")
        st.references.append((kind, v))
        st.ignore(k, f"a {kind} file: read below, key by key")
    return convert


# ---------------------------------------------------------------------------------------------
# axolotl (src/axolotl/utils/schemas/config.py; the trainer keys it forwards to TrainingArguments)


def _axolotl_gc(st: _State, k: str, v: Any) -> None:
    if isinstance(v, bool):
        st.set(k, v, "gradient_checkpointing", v)
    elif isinstance(v, str) and v.lower() in ("offload", "offload_disk", "unsloth"):
        st.set(k, v, "gradient_checkpointing", True)
        st.set(k, v, "activation_offloading", True)
    else:
        raise st.bad(k, v, "true, false, offload or offload_disk")


def _axolotl_adapter(st: _State, k: str, v: Any) -> None:
    if v not in ("lora", "qlora"):
        raise st.bad(k, v, "lora or qlora (memplan models LoRA adapters only)")
    st.keep("adapter", k, v)


def _quant_type(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or v.lower() not in ("nf4", "fp4"):
        raise st.bad(k, v, "nf4 or fp4")
    st.keep("quant_type", k, v.lower())


LIGER = on_only("liger")

AXOLOTL: dict[str, Rule] = {
    "base_model": Rule(("model",), lambda st, k, v: st.set(k, v, "model", _str(st, k, v)), "`model` (hub id or alias)"),
    "micro_batch_size": positive("micro_batch"),
    "sequence_len": positive("seq_len"),
    "sample_packing": on_only("packing"),
    "gradient_checkpointing": Rule(("gradient_checkpointing",), _axolotl_gc,
                                   "`gradient_checkpointing` (offload/unsloth: + `activation_offloading`)"),
    "gradient_checkpointing_kwargs.use_reentrant": Rule(("checkpoint_reentrant",), _checkpoint_kwargs_reentrant,
                                                        "`checkpoint_reentrant`"),
    "activation_offloading": Rule(("activation_offloading",), _offload, "`activation_offloading`"),
    "load_in_8bit": stash("load_in_8bit", ("weight_dtype", "method"), "true: `weight_dtype=int8`"),
    "load_in_4bit": stash("load_in_4bit", ("weight_dtype", "method"), "true: `weight_dtype=nf4` (or fp4)"),
    "adapter": Rule(("method",), _axolotl_adapter, "lora: `method=lora`; qlora (or lora over 4-bit): `method=qlora`"),
    "bnb_config_kwargs.bnb_4bit_quant_type": Rule(("weight_dtype",), _quant_type, "`weight_dtype` nf4/fp4"),
    "bnb_config_kwargs.bnb_4bit_use_double_quant": flag("double_quant"),
    "bnb_config_kwargs.llm_int8_has_fp16_weight": ignored("int8 training keeps int8 weights either way"),
    "lora_r": positive("lora_rank"),
    "lora_alpha": positive("lora_alpha"),
    "lora_dropout": dropout(),
    "lora_target_modules": TARGETS,
    "lora_target_linear": stash("target_linear", ("lora_targets",), "true: `lora_targets=all-linear`"),
    "lora_modules_to_save": not_modelled("modules_to_save trains full copies of those modules"),
    "lora_fan_in_fan_out": ignored("a layout flag"),
    "peft_use_dora": on_only("dora"),
    "peft_use_rslora": ignored("rank-stabilised scaling only"),
    "optimizer": HF_OPTIM,
    "bf16": stash("bf16", ("compute_dtype", "autocast"), "true/auto: bf16 compute under autocast; full: pure bf16"),
    "fp16": stash("fp16", ("compute_dtype", "autocast"), "true: fp16 compute under autocast"),
    "bfloat16": stash("bfloat16", ("compute_dtype", "autocast"), "true: bf16 (axolotl 0.21 passes it on as the Trainer's bf16)"),
    "float16": stash("float16", ("compute_dtype", "autocast"), "true: pure fp16 (no autocast)"),
    "tf32": ignored("tf32 matmuls: no effect on memory"),
    "flash_attention": on_only("attention", "flash_attention_2"),
    "sdp_attention": on_only("attention", "sdpa"),
    "eager_attention": on_only("attention", "eager"),
    "xformers_attention": on_only("attention", "xformers"),
    "flex_attention": on_only("attention", "flex_attention"),
    "s2_attention": not_modelled("shifted sparse attention"),
    "liger_rope": LIGER,
    "liger_rms_norm": LIGER,
    "liger_glu_activation": LIGER,
    "liger_layer_norm": LIGER,
    "liger_swiglu": LIGER,
    "liger_rms_norm_gated": LIGER,
    "liger_cross_entropy": LIGER,
    "liger_fused_linear_cross_entropy": LIGER,
    "cut_cross_entropy": not_modelled("Apple's cut cross-entropy (no logits tensor)"),
    "deepspeed": Rule(("sharding", "cpu_offload"), _reference("deepspeed"), "a DeepSpeed JSON, read key by key"),
    "fsdp": FSDP_OPTION,
    "fsdp_config": Rule(("sharding", "cpu_offload"), _reference("fsdp"), "inline (or a JSON path): the FSDP table below"),
    "fsdp_version": Rule(("fsdp_version",), lambda st, k, v: _fsdp_version(st, k, v), "`fsdp_version` (1 or 2)"),
    "torch_compile": Rule(("compile",), lambda st, k, v: st.ignore(k, "auto: decided at run time") if v == "auto"
                          else st.set(k, v, "compile", _bool(st, k, v)), "`compile`"),
    "unfrozen_parameters": not_modelled("a partly frozen full fine-tune"),
    "peft_autocast_adapter_dtype": stash("autocast_adapter", ("adapter_dtype",),
                                         "false: `adapter_dtype` = the compute dtype (peft keeps fp32 otherwise)"),
    **{k: not_modelled(why) for k, why in {
        "chunked_cross_entropy": "axolotl's chunked cross-entropy", "chunked_cross_entropy_num_chunks": "its chunks",
        "sequence_parallel_degree": "sequence parallelism", "context_parallel_size": "context parallelism",
        "tensor_parallel_size": "tensor parallelism", "dp_shard_size": "an explicit FSDP mesh",
        "dp_replicate_size": "an explicit FSDP mesh", "layer_offloading": "decoder layers offloaded to the host",
        "selective_checkpointing": "selective checkpointing", "tiled_mlp_num_shards": "tiled MLP",
        "fp8": "fp8 training", "fp8_config": "fp8 training", "gptq": "a GPTQ-quantized base",
        "quantize_moe_experts": "quantized MoE experts", "lora_mlp_kernel": "axolotl's fused LoRA kernels",
        "lora_qkv_kernel": "axolotl's fused LoRA kernels", "lora_o_kernel": "axolotl's fused LoRA kernels",
        "lora_embedding_kernel": "axolotl's fused LoRA kernels", "lora_rank_pattern": "per-module ranks",
        "lora_alpha_pattern": "per-module alphas", "peft_layers_to_transform": "LoRA on some layers only",
        "batch_flattening": "padding-free batches", "use_kernels": "hub kernels",
        "flash_attn_cross_entropy": "flash-attn's cross-entropy", "relora": "ReLoRA",
    }.items()},
}
AXOLOTL_IGNORED = {
    "base_model_config", "model_type", "tokenizer_type", "tokenizer_config", "trust_remote_code", "is_llama_derived_model",
    "datasets", "test_datasets", "dataset_prepared_path", "val_set_size", "output_dir", "chat_template",
    "train_on_inputs", "group_by_length", "pad_to_sequence_len", "eval_sample_packing", "eval_batch_size",
    "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps",
    "warmup_ratio", "weight_decay", "max_grad_norm", "evals_per_epoch", "eval_steps", "saves_per_epoch", "save_steps",
    "save_total_limit", "logging_steps", "wandb_project", "wandb_entity", "wandb_watch", "wandb_name",
    "wandb_log_model", "hub_model_id", "resume_from_checkpoint", "local_rank", "early_stopping_patience", "seed",
    "strict", "debug", "special_tokens", "tokens", "plugins", "lora_model_dir", "save_safetensors",
    "auto_resume_from_checkpoints", "xformers_attention_enabled", "loss_watchdog_threshold", "loss_watchdog_patience",
    "shuffle_merged_datasets", "dataset_processes", "adam_beta1", "adam_beta2",
    "adam_epsilon", "lr_scheduler_kwargs", "cosine_min_lr_ratio", "save_strategy", "eval_strategy", "bf16_full_eval",
    "chat_template_jinja", "default_system_message", "seed", "gptq", "hub_strategy", "eval_table_size",
    "max_packed_sequence_len", "sample_packing_eff_est", "total_num_tokens", "pretraining_dataset",
}


def _str(st: _State, k: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise st.bad(k, v, "a model name (hub id, alias or path)")
    return v.strip()


def _stashed_bool(st: _State, name: str, also: tuple = ()) -> Any:
    """A stashed precision flag, checked: true / false (or one of `also`); None when the file lacks it."""
    if name not in st.stash:
        return None
    key, v = st.stash[name]
    if v in also:
        return v
    if not isinstance(v, bool):
        raise st.bad(key, v, "true or false" + "".join(f" or {a}" for a in also))
    return v


def _precision_axolotl(st: _State) -> None:
    """axolotl's resolve_dtype (src/axolotl/utils/config/__init__.py) on a GPU with bf16, then the
    Trainer flags it passes (core/builders/base.py _configure_precision_settings): the model is loaded
    in torch_dtype, and TrainingArguments bf16 / fp16 run the forward under autocast."""
    s = st.stash
    bf16 = _stashed_bool(st, "bf16", ("auto", "full"))
    fp16 = _stashed_bool(st, "fp16")
    bfloat16, float16 = _stashed_bool(st, "bfloat16"), _stashed_bool(st, "float16")
    eight = s.get("load_in_8bit", (None, False))[1] is True
    if bf16 is None:
        bf16 = "auto"  # the schema's default (utils/schemas/config.py)
    if not fp16 and bf16 == "auto":
        bf16 = True
        st.notes.append(("bf16: auto" if "bf16" in s else "bf16 (not set: axolotl's default auto)")
                        + " is bf16 on GPUs that have it (fp16 on older ones): counted as bf16")
    if fp16 and bf16 == "auto":
        bf16 = False
    if bf16:
        fp16 = False
    if bf16 or bfloat16:
        dtype = "bf16"
    elif eight or fp16 or float16:
        dtype = "fp16"
    else:
        dtype = "fp32"
    autocast = bool((bf16 and bf16 != "full") or bfloat16 or fp16)
    deciding = [n for n, v in (("bf16", bf16), ("bfloat16", bfloat16), ("fp16", fp16), ("float16", float16),
                               ("load_in_8bit", eight)) if v and n in s]
    for n in ("bf16", "fp16", "bfloat16", "float16"):
        if n in s and n not in deciding:
            st.ignore(s[n][0], "off" if s[n][1] in (False, "auto") else f"{s[n][1]!r}: overridden by the other precision keys")
    if "bnb_compute" in s and s["bnb_compute"][1] != dtype:
        raise MemplanInputError(f"{st.source}: {s['bnb_compute'][0]} {s['bnb_compute'][1]} and the precision keys "
                                f"({dtype}) disagree; keep one compute dtype")
    if deciding:
        key, raw = s[deciding[0]]
        st.set(key, raw, "compute_dtype", dtype)
        if autocast:  # (off is the Job's own rule for weights in the compute dtype)
            st.set(key, raw, "autocast", True)
        for n in deciding[1:]:
            st.used.append((s[n][0], s[n][1], "compute_dtype", dtype))
    else:
        why = "axolotl's default bf16: auto" if dtype == "bf16" else "bf16 and fp16 are off: axolotl loads and trains in fp32"
        st.default("compute_dtype", dtype, why)
        if autocast:
            st.default("autocast", True, why + " (the Trainer's bf16=True: autocast)")
    if "bnb_compute" in s:
        st.used.append((s["bnb_compute"][0], s["bnb_compute"][1], "compute_dtype", dtype))


def _precision_hf(st: _State) -> None:
    """TrainingArguments bf16 / fp16: the forward under autocast in that dtype (accelerate's
    mixed_precision); neither: fp32, no autocast (transformers training_args.py defaults False)."""
    s = st.stash
    on = [n for n in ("bf16", "fp16") if _stashed_bool(st, n)]
    if len(on) > 1:
        raise MemplanInputError(f"{st.source}: bf16 and fp16 are both true: keep one (TrainingArguments refuses both)")
    for n in ("bf16", "fp16"):
        if n in s and n not in on:
            st.ignore(s[n][0], "false: off")
    if on:
        key, raw = s[on[0]]
        st.set(key, raw, "compute_dtype", on[0])
        st.set(key, raw, "autocast", True)
    else:
        st.default("compute_dtype", "fp32", "bf16 and fp16 are off (TrainingArguments' defaults): fp32 training")


def _method(st: _State, peft_on: bool | None, peft_key: str | None) -> None:
    """adapter / use_peft with load_in_4bit / load_in_8bit -> method and base weight dtype."""
    s = st.stash
    four = s.get("load_in_4bit", (None, False))
    eight = s.get("load_in_8bit", (None, False))
    for name, (key, v) in (("load_in_4bit", four), ("load_in_8bit", eight)):
        if key is not None and not _bool(st, key, v):
            st.ignore(key, "false: off")
    if four[1] and eight[1]:
        raise MemplanInputError(f"{st.source}: {four[0]} and {eight[0]} are both true: keep one")
    qtype = s.get("quant_type", (None, "nf4"))
    adapter = s.get("adapter", (None, None))
    lora = peft_on if peft_on is not None else adapter[1] is not None
    if "method" in st.overridden:
        # --method decides; the file's quantized base is kept for it (job_fields drops one that does not fit)
        if four[1]:
            st.set(four[0], True, "weight_dtype", qtype[1])
            if qtype[0]:
                st.used.append((qtype[0], qtype[1], "weight_dtype", qtype[1]))
        elif eight[1]:
            st.set(eight[0], True, "weight_dtype", "int8")
        return
    src_key = peft_key or adapter[0]
    if four[1]:
        if not lora:
            raise MemplanInputError(f"{st.source}: {four[0]}: a 4-bit base trains only adapters: set "
                                    f"{'adapter: qlora' if st.fmt == 'axolotl' else 'use_peft: true'} (memplan models QLoRA)")
        st.set(four[0], True, "weight_dtype", qtype[1])
        if qtype[0]:
            st.used.append((qtype[0], qtype[1], "weight_dtype", qtype[1]))
        st.set(src_key, adapter[1] or True, "method", "qlora")
        return
    if qtype[0]:
        st.ignore(qtype[0], "no 4-bit base (load_in_4bit is not set)")
    if eight[1]:
        if not lora:
            raise MemplanInputError(f"{st.source}: {eight[0]}: an 8-bit base trains only adapters: set "
                                    f"{'adapter: lora' if st.fmt == 'axolotl' else 'use_peft: true'}")
        st.set(eight[0], True, "weight_dtype", "int8")
    if adapter[1] == "qlora" and not four[1]:
        raise MemplanInputError(f"{st.source}: {adapter[0]}: qlora needs load_in_4bit: true")
    if lora:
        st.set(src_key, adapter[1] or True, "method", "lora")


def _lora_targets(st: _State) -> None:
    s = st.stash
    lin = s.get("target_linear")
    mods = s.get("target_modules")
    if lin is not None and _bool(st, lin[0], lin[1]):
        st.set(lin[0], True, "lora_targets", "all-linear")
        if mods:
            st.ignore(mods[0], "lora_target_linear: true targets every linear (these included)")
        return
    if lin is not None:
        st.ignore(lin[0], "false: the listed modules")
    if mods:
        names = mods[1]
        value = "all-linear" if names in (("all-linear",), ("all_linear",)) else names
        st.set(mods[0], list(names) if len(names) > 1 else names[0], "lora_targets", value)


def _drop_unused_lora(st: _State) -> None:
    """LoRA keys of a full fine-tune configure nothing the run uses: listed, not passed on (the Job
    refuses LoRA options with method full)."""
    if st.fields.get("method", "full") != "full" or "method" in st.overridden:
        return  # (with --method given, job_fields decides against the command line's method)
    for field in LORA_ONLY + ("dora",):
        if field in st.fields and not st.origin[field].startswith("("):
            key = st.origin[field]
            del st.fields[field]
            st.used = [u for u in st.used if not (u[0] == key and u[2] == field)]
            st.ignore(key, "full fine-tuning (no adapter in the config): the LoRA settings are unused")


def _post_axolotl(st: _State) -> None:
    _lora_targets(st)
    _method(st, None, None)
    _precision_axolotl(st)
    _drop_unused_lora(st)
    # the schema's defaults (utils/schemas/training.py): optimizer adamw_torch_fused; micro_batch_size 1,
    # sequence_len 512 and lora_dropout 0.0 are memplan's own
    if "optimizer" not in st.fields:
        st.default("foreach", False, "axolotl's default optimizer adamw_torch_fused: no foreach temporary")
    if "autocast_adapter" in st.stash:
        key, v = st.stash["autocast_adapter"]
        if _bool(st, key, v) or st.fields.get("method", "full") == "full":
            st.ignore(key, "true: peft's fp32 adapters, memplan's default" if v else "full fine-tuning: unused")
        elif st.fields.get("method") == "qlora":
            st.ignore(key, "recognised, not modelled by this memplan (the adapters' dtype over a 4-bit base)")
        else:  # peft get_peft_model(autocast_adapter_dtype=False): the adapters stay in the base's dtype
            st.set(key, v, "adapter_dtype", st.fields.get("compute_dtype", "bf16"))
    if any(entry[0].startswith("fsdp_config.") for entry in st.used + st.ignored):
        # axolotl 0.21: an fsdp_config runs FSDP2, resharding after forward unless told not to
        st.default("sharding", "fsdp_full", "axolotl: an fsdp_config runs FSDP (full shard unless "
                                            "reshard_after_forward: false)")


# ---------------------------------------------------------------------------------------------
# HF TrainingArguments (transformers training_args.py), TRL SFTConfig and TRL ModelConfig (the keys
# `trl sft --config` reads from the same YAML)


def _use_peft(st: _State, k: str, v: Any) -> None:
    st.keep("use_peft", k, _bool(st, k, v))


def _seq(st: _State, k: str, v: Any) -> None:
    if v is None:
        st.ignore(k, NULL)
        return
    st.set(k, v, "seq_len", _int(st, k, v))


HF: dict[str, Rule] = {
    "model_name_or_path": Rule(("model",), lambda st, k, v: st.set(k, v, "model", _str(st, k, v)), "`model`"),
    "per_device_train_batch_size": positive("micro_batch"),
    "max_seq_length": Rule(("seq_len",), _seq, "`seq_len` (TRL, older name)"),
    "max_length": Rule(("seq_len",), _seq, "`seq_len` (TRL)"),
    "packing": on_only("packing"),
    "padding_free": on_only("packing"),
    "gradient_checkpointing": flag("gradient_checkpointing"),
    "activation_checkpointing": flag("gradient_checkpointing"),
    "gradient_checkpointing_kwargs.use_reentrant": Rule(("checkpoint_reentrant",), _checkpoint_kwargs_reentrant,
                                                        "`checkpoint_reentrant`"),
    "activation_checkpointing_kwargs.use_reentrant": Rule(("checkpoint_reentrant",), _checkpoint_kwargs_reentrant,
                                                          "`checkpoint_reentrant`"),
    "activation_checkpointing_kwargs.offload": Rule(("activation_offloading",), _offload, "`activation_offloading`"),
    "activation_checkpointing_kwargs.every_n_layers": Rule((), _every_n_layers, "1 only"),
    "gradient_checkpointing_kwargs.every_n_layers": Rule((), _every_n_layers, "1 only"),
    "activation_offloading": Rule(("activation_offloading",), _offload, "`activation_offloading`"),
    "optim": HF_OPTIM,
    "bf16": stash("bf16", ("compute_dtype", "autocast"), "true: bf16 compute under autocast"),
    "fp16": stash("fp16", ("compute_dtype", "autocast"), "true: fp16 compute under autocast"),
    "tf32": ignored("tf32 matmuls: no effect on memory"),
    "use_liger_kernel": flag("liger"),
    "torch_compile": flag("compile"),
    "deepspeed": Rule(("sharding", "cpu_offload"), _reference("deepspeed"), "a DeepSpeed JSON path (or inline)"),
    "fsdp": FSDP_OPTION,
    "fsdp_config": Rule(("sharding", "cpu_offload"), _reference("fsdp"), "a JSON path (or inline), below"),
    # TRL ModelConfig
    "torch_dtype": WEIGHT_DTYPE,
    "dtype": WEIGHT_DTYPE,
    "model_init_kwargs.torch_dtype": WEIGHT_DTYPE,
    "model_init_kwargs.dtype": WEIGHT_DTYPE,
    "attn_implementation": ATTENTION,
    "model_init_kwargs.attn_implementation": ATTENTION,
    "use_peft": stash("use_peft", ("method",), "true: `method=lora` (qlora with load_in_4bit)"),
    "load_in_4bit": stash("load_in_4bit", ("weight_dtype", "method"), "true: `weight_dtype=nf4` (or fp4)"),
    "load_in_8bit": stash("load_in_8bit", ("weight_dtype", "method"), "true: `weight_dtype=int8`"),
    "bnb_4bit_quant_type": Rule(("weight_dtype",), _quant_type, "`weight_dtype` nf4/fp4"),
    "use_bnb_nested_quant": flag("double_quant"),
    "lora_r": positive("lora_rank"),
    "lora_alpha": positive("lora_alpha"),
    "lora_dropout": dropout(),
    "lora_target_modules": TARGETS,
    "lora_modules_to_save": not_modelled("modules_to_save trains full copies of those modules"),
    "use_dora": on_only("dora"),
    "use_rslora": ignored("rank-stabilised scaling only"),
    "lora_task_type": ignored("CAUSAL_LM: the head memplan counts"),
    "liger_kernel_config": not_modelled("a partial set of Liger kernels"),
    "lora_target_parameters": not_modelled("LoRA on parameters (MoE expert tensors)"),
    "bnb_4bit_quant_storage": ignored("the storage dtype packs the same 4-bit bytes"),
    "optim_target_modules": not_modelled("GaLore / APOLLO projected optimizer states"),
    "torch_empty_cache_steps": not_modelled("emptying the allocator's cache lowers reserved, not allocated, memory"),
    "auto_find_batch_size": not_modelled("the Trainer halves the batch after an out-of-memory error"),
    "ddp_bucket_cap_mb": not_modelled("DDP bucket size"),
    "parallelism_config": not_modelled("tensor, context or sequence parallelism"),
    "use_cache": ignored("the KV cache is off in training with checkpointing; memplan counts none in training"),
}
HF_IGNORED = {
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "eval_strategy", "evaluation_strategy",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "eval_accumulation_steps", "learning_rate",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "logging_dir", "logging_strategy",
    "logging_first_step", "logging_steps", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "seed", "data_seed", "eval_steps", "dataloader_num_workers", "dataloader_pin_memory", "run_name",
    "remove_unused_columns", "label_names", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "report_to", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "gradient_checkpointing_kwargs",
    "group_by_length", "resume_from_checkpoint", "ddp_find_unused_parameters", "ddp_timeout", "bf16_full_eval",
    "fp16_full_eval", "optim_args", "dataset_text_field", "dataset_kwargs", "dataset_num_proc",
    "completion_only_loss", "assistant_only_loss", "eos_token", "pad_token", "chat_template_path",
    "model_revision", "trust_remote_code", "dataset_name", "dataset_train_split", "dataset_test_split",
    "dataset_config", "include_tokens_per_second", "local_rank", "log_level", "disable_tqdm", "use_cpu",
    "full_determinism", "torch_compile_backend", "torch_compile_mode", "neftune_noise_alpha", "label_smoothing_factor",
    "skip_memory_metrics", "model_init_kwargs", "gradient_checkpointing_kwargs", "dataset_text_field",
    "shuffle_dataset", "packing_strategy", "pad_to_multiple_of", "loss_type", "average_tokens_across_devices",
    "activation_checkpointing_kwargs", "log_on_each_node", "logging_nan_inf_filter", "include_num_input_tokens_seen",
    "log_level_replica", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_delay",
    "prediction_loss_only", "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "include_for_metrics",
    "batch_eval_metrics", "save_on_each_node", "enable_jit_checkpoint", "hub_token", "hub_always_push", "hub_revision",
    "ignore_data_skip", "restore_callback_states_from_checkpoint", "accelerator_config", "dataloader_drop_last",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order", "train_sampling_strategy", "length_column_name", "ddp_broadcast_buffers",
    "ddp_static_graph", "ddp_backend", "debug", "do_predict", "truncation_mode", "eval_packing",
    "router_aux_loss_coef", "script_args", "model_revision",
}


# keys only TRL's SFTConfig / ModelConfig have: the file configures SFTTrainer, which loads the model itself
TRL_KEYS = frozenset({
    "max_length", "max_seq_length", "packing", "padding_free", "dataset_text_field", "completion_only_loss",
    "assistant_only_loss", "activation_offloading", "model_init_kwargs", "dataset_num_proc", "loss_type",
    "packing_strategy", "eos_token", "chat_template_path", "dataset_kwargs", "shuffle_dataset", "pad_to_multiple_of",
    "use_peft", "model_name_or_path", "lora_r", "load_in_4bit", "load_in_8bit",
})


def _post_hf(st: _State) -> None:
    peft = st.stash.get("use_peft")
    use_peft = _stashed_bool(st, "use_peft")
    _lora_targets(st)
    _method(st, use_peft or False, peft[0] if peft else None)
    _precision_hf(st)
    _drop_unused_lora(st)
    trl = st.stash.get("_trl") is not None
    method = st.fields.get("method", "full")
    if "weight_dtype" in st.stash:
        key, raw = st.stash["weight_dtype"]
        if method == "qlora" or st.fields.get("weight_dtype") == "int8":
            st.ignore(key, "the quantized base's other parameters: counted by memplan's k-bit rules")
        elif raw.lower() == "auto":
            st.ignore(key, "auto: the checkpoint's own dtype, not resolved here")
            st.notes.append(f"{key}: auto loads the checkpoint's dtype: the weights are counted in the compute dtype "
                            "(give --weight-dtype for another)")
        else:
            st.set(key, raw, "weight_dtype", TORCH_DTYPES[raw.lower()])
    elif trl and method != "qlora" and st.fields.get("weight_dtype") != "int8":
        # trl/trainer/utils.py create_model_from_path: dtype = kwargs.get("dtype", "float32")
        st.default("weight_dtype", "fp32", "TRL's SFTTrainer loads the model in float32 unless model_init_kwargs "
                                           "(or ModelConfig) sets dtype")
    elif st.fields.get("compute_dtype") in ("bf16", "fp16"):
        st.notes.append("TrainingArguments do not say the dtype the model is loaded in: the weights are counted in "
                        "the compute dtype; give --weight-dtype fp32 for fp32 weights under autocast")
    if trl and method in ("lora", "qlora"):
        # trl/trainer/model_config.py ModelConfig: lora_dropout 0.05, use_bnb_nested_quant False
        st.default("lora_dropout", 0.05, "TRL ModelConfig lora_dropout defaults to 0.05")
        if method == "qlora":
            st.default("double_quant", False, "TRL ModelConfig use_bnb_nested_quant defaults to false")
    st.default("micro_batch", 8, "TrainingArguments per_device_train_batch_size defaults to 8")
    if "optimizer" not in st.fields:
        st.default("foreach", False, "TrainingArguments optim defaults to adamw_torch_fused (torch >= 2.8): "
                                     "no foreach temporary")
    if trl:
        st.default("seq_len", 1024, "TRL SFTConfig max_length defaults to 1024")
        st.notes.append("TRL's SFTTrainer computes the loss through a fused LM head in chunks "
                        "(trl/trainer/sft_trainer.py add_fused_lm_head), without the full logits: memplan counts "
                        "transformers' own loss, so its logits and loss rows overstate this run")
    elif "seq_len" not in st.fields:
        st.notes.append("TrainingArguments have no sequence length: memplan's default applies (give --seq-len)")


# ---------------------------------------------------------------------------------------------
# litgpt finetune configs (config_hub/finetune/*/lora.yaml, qlora.yaml, full.yaml; litgpt/args.py)

LITGPT_PRECISION = {
    # precision -> (weight dtype, compute dtype): *-true stores the weights in the dtype, *-mixed keeps fp32
    # weights under autocast (lightning fabric precision plugins)
    "bf16-true": ("bf16", "bf16"),
    "bf16-mixed": ("fp32", "bf16"),
    "16-true": ("fp16", "fp16"),
    "16-mixed": ("fp32", "fp16"),
    "32-true": ("fp32", "fp32"),
    "32": ("fp32", "fp32"),
}
LITGPT_QUANTIZE = {
    "bnb.nf4": ("nf4", False), "bnb.nf4-dq": ("nf4", True), "bnb.fp4": ("fp4", False), "bnb.fp4-dq": ("fp4", True),
    "bnb.int8-training": ("int8", False),
    "nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False), "fp4-dq": ("fp4", True),
}
LITGPT_LORA_ROLES = {  # lora_* switch -> the llama-layout module names memplan's LoRA targets use
    "lora_query": ("q_proj",), "lora_key": ("k_proj",), "lora_value": ("v_proj",), "lora_projection": ("o_proj",),
    "lora_mlp": ("gate_proj", "up_proj", "down_proj"),
}


def _litgpt_model(st: _State, k: str, v: Any) -> None:
    path = _str(st, k, str(v))
    parts = path.replace("\\", "/").rstrip("/").split("/")
    if "checkpoints" in parts:
        parts = parts[parts.index("checkpoints") + 1:]
    name = "/".join(parts[-2:]) if len(parts) >= 2 else parts[-1]
    st.set(k, v, "model", name)


def _litgpt_precision(st: _State, k: str, v: Any) -> None:
    if v is None:
        st.ignore(k, NULL + ": litgpt's default, below")
        return
    if not isinstance(v, str) or v.lower() not in LITGPT_PRECISION:
        raise st.bad(k, v, ", ".join(LITGPT_PRECISION))
    st.keep("precision", k, v.lower())


def _litgpt_quantize(st: _State, k: str, v: Any) -> None:
    if v is None:
        st.ignore(k, NULL + ": no quantization")
        return
    if not isinstance(v, str) or v.lower() not in LITGPT_QUANTIZE:
        raise st.bad(k, v, ", ".join(q for q in LITGPT_QUANTIZE if q.startswith("bnb.")))
    st.keep("quantize", k, v.lower())


def _litgpt_devices(st: _State, k: str, v: Any) -> None:
    if isinstance(v, str) and v in ("auto", "-1"):
        st.notes.append(f"{k}: {v} means every visible GPU: give --num-gpus")
        st.ignore(k, f"{v}: not a count")
        return
    if v == -1:
        st.notes.append(f"{k}: -1 means every visible GPU: give --num-gpus")
        st.ignore(k, "-1: not a count")
        return
    st.keep("devices", k, _int(st, k, v))


def _litgpt_role(st: _State, k: str, v: Any) -> None:
    st.keep(k, k, _bool(st, k, v))


def _litgpt_optimizer(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or v.lower() not in CLASS_OPTIMIZERS:
        raise _optimizer_refusal(st, k, v, "AdamW, Adam, SGD, bitsandbytes.optim.AdamW8bit, PagedAdamW, PagedAdamW8bit")
    st.set(k, v, "optimizer", CLASS_OPTIMIZERS[v.lower()])


def _momentum(st: _State, k: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise st.bad(k, v, "a number >= 0")
    st.keep("momentum", k, v)


LITGPT: dict[str, Rule] = {
    "checkpoint_dir": Rule(("model",), _litgpt_model, "`model`: the hub id after checkpoints/"),
    "precision": Rule(("weight_dtype", "compute_dtype"), _litgpt_precision, "table below"),
    "quantize": Rule(("weight_dtype", "double_quant", "method"), _litgpt_quantize, "bnb.nf4[-dq] / fp4[-dq]: `method=qlora`"),
    "devices": Rule(("num_gpus",), _litgpt_devices, "`num_gpus` (x num_nodes); > 1: FSDP, below"),
    "num_nodes": Rule(("num_gpus",), lambda st, k, v: st.keep("num_nodes", k, _int(st, k, v)), "`num_gpus` = devices x num_nodes"),
    "lora_r": positive("lora_rank"),
    "lora_alpha": positive("lora_alpha"),
    "lora_dropout": dropout(),
    **{role: Rule(("lora_targets",), _litgpt_role, f"true: {', '.join(names)}") for role, names in LITGPT_LORA_ROLES.items()},
    "lora_head": Rule((), lambda st, k, v: st.keep("lora_head", k, _bool(st, k, v)), "not modelled (memplan's LoRA is on block linears)"),
    "train.micro_batch_size": positive("micro_batch"),
    "train.max_seq_length": Rule(("seq_len",), _seq, "`seq_len`"),
    "optimizer": Rule(("optimizer",), _litgpt_optimizer, "`optimizer`"),
    "optimizer.class_path": Rule(("optimizer",), _litgpt_optimizer, "`optimizer`"),
    "optimizer.init_args.momentum": Rule(("optimizer",), _momentum, "SGD momentum > 0: `sgd_momentum`"),
    "optimizer.init_args.fused": flag("foreach", invert=True),
    "optimizer.init_args.foreach": flag("foreach"),
}
LITGPT_IGNORED_PREFIX = ("data.", "eval.", "optimizer.init_args.", "logger", "train.", "out_dir", "seed",
                         "resume", "access_token")
LITGPT_IGNORED = {"out_dir", "logger_name", "seed", "resume", "access_token", "data", "eval", "train"}


def _post_litgpt(st: _State) -> None:
    """litgpt/finetune/lora.py and full.py `setup` (litgpt 0.5.13): the method from the config's keys
    (lora_* or quantize: finetune lora; neither: finetune full), precision, quantization, devices."""
    s = st.stash
    lora = bool(st.origin.keys() & {"lora_rank", "lora_alpha", "lora_dropout"}) or any(
        k.startswith("lora_") for k in s) or "quantize" in s
    prec_key, prec = s.get("precision", (None, None))
    if prec is None:
        # `precision or get_default_supported_precision(training=True)`: bf16-mixed on GPUs with bf16
        prec = "bf16-mixed"
    weights, compute = LITGPT_PRECISION[prec]
    quant = s.get("quantize")
    devices = s.get("devices", (None, 1))[1] * s.get("num_nodes", (None, 1))[1]
    if quant and "mixed" in prec:
        raise MemplanInputError(f"{st.source}: {quant[0]}: {quant[1]} with precision {prec}"
                                f"{'' if prec_key else ' (the default)'}: litgpt refuses quantization with mixed "
                                "precision; use precision: bf16-true")
    if quant and devices > 1:
        raise MemplanInputError(f"{st.source}: {quant[0]}: litgpt does not quantize for multi-GPU training "
                                f"({devices} devices): set devices: 1, or drop quantize")
    if prec_key:
        st.set(prec_key, prec, "compute_dtype", compute)
    else:
        st.default("compute_dtype", compute, "litgpt's default precision bf16-mixed")
    if quant:
        qtype, dq = LITGPT_QUANTIZE[quant[1]]
        st.set(quant[0], quant[1], "weight_dtype", qtype)
        if qtype != "int8":
            st.set(quant[0], quant[1], "double_quant", dq)
        st.set(quant[0], quant[1], "method", "qlora" if qtype != "int8" else "lora")
        # the base's other weights are in the precision's dtype (BitsandbytesPrecision(mode, dtype)); no
        # peft prepare_model_for_kbit_training, so no fp32 upcast and no automatic checkpointing
        st.default("kbit_prepare", False, "litgpt does not run peft's prepare_model_for_kbit_training")
    elif prec_key:
        # stated always: the litgpt stack's own default weight dtype is bf16-mixed's fp32
        st.set(prec_key, prec, "weight_dtype", weights)
    elif weights != compute:
        st.default("weight_dtype", weights, "litgpt's default precision bf16-mixed keeps fp32 weights")
    if lora and not quant:
        key = next((k for k in ("lora_r", "lora_alpha", "lora_dropout", *LITGPT_LORA_ROLES) if k in st.origin.values()
                    or k in s), "lora_r")
        raw = s[key][1] if key in s else next(u[1] for u in st.used if u[0] == key)
        st.set(key, raw, "method", "lora")
    if lora:
        # litgpt/finetune/lora.py setup defaults: lora_r 8, lora_alpha 16, lora_dropout 0.05, lora_query and
        # lora_value true, the rest false; LoRA weights live in the model's dtype (the whole model is cast)
        st.default("lora_rank", 8, "litgpt finetune lora's lora_r defaults to 8")
        st.default("lora_alpha", 16, "litgpt finetune lora's lora_alpha defaults to 16")
        st.default("lora_dropout", 0.05, "litgpt finetune lora's lora_dropout defaults to 0.05")
        st.default("adapter_dtype", weights, f"litgpt keeps LoRA weights in the model's dtype ({prec})")
        roles = [r for r in LITGPT_LORA_ROLES if r in s]
        on = {r: s[r][1] if r in s else r in ("lora_query", "lora_value") for r in LITGPT_LORA_ROLES}
        names = tuple(n for r, v in on.items() if v for n in LITGPT_LORA_ROLES[r])
        if not names:
            raise MemplanInputError(f"{st.source}: lora_query, lora_key, lora_value, lora_projection and lora_mlp "
                                    "are all false: no LoRA target")
        if roles:
            st.set(roles[0], s[roles[0]][1], "lora_targets", names)
            for r in roles[1:]:
                st.used.append((r, s[r][1], "lora_targets", names))
        else:
            st.default("lora_targets", names, "litgpt: lora_query and lora_value default to true")
        if s.get("lora_head", (None, False))[1]:
            st.ignore(s["lora_head"][0], "recognised, not modelled by this memplan (LoRA on the output head)")
        elif "lora_head" in s:
            st.ignore(s["lora_head"][0], "false: off")
        if quant:
            # lora.py: a BitsandbytesPrecision run replaces the optimizer by bnb.optim.PagedAdamW
            # (instantiate_bnb_optimizer; any other class is refused)
            if st.fields.get("optimizer", "adamw") != "adamw":
                raise MemplanInputError(f"{st.source}: {st.origin['optimizer']}: litgpt's quantized LoRA "
                                        "supports only AdamW (it runs bitsandbytes' PagedAdamW)")
            if "optimizer" in st.fields:
                st.fields["optimizer"] = "paged_adamw"
                st.used.append((st.origin["optimizer"], "AdamW", "optimizer", "paged_adamw"))
            else:
                st.default("optimizer", "paged_adamw", "litgpt's quantized LoRA runs bitsandbytes' PagedAdamW")
    else:
        for r in (*LITGPT_LORA_ROLES, "lora_head"):
            if r in s:
                st.ignore(s[r][0], "full fine-tuning: unused")
    if "momentum" in s:
        key, m = s["momentum"]
        if st.fields.get("optimizer") == "sgd" and m > 0:
            st.fields["optimizer"] = "sgd_momentum"
            st.used.append((key, m, "optimizer", "sgd_momentum"))
        else:
            st.ignore(key, "no momentum state" if m == 0 else "not SGD")
    if "devices" in s:
        st.set(s["devices"][0], s["devices"][1], "num_gpus", devices)
        if "num_nodes" in s:
            st.used.append((s["num_nodes"][0], s["num_nodes"][1], "num_gpus", devices))
        if s.get("num_nodes", (None, 1))[1] > 1:
            st.set(s["devices"][0], s["devices"][1], "gpus_per_node", s["devices"][1])
    elif "num_nodes" in s:
        st.set(s["num_nodes"][0], s["num_nodes"][1], "num_gpus", devices)
    if devices > 1:
        # lora.py: ModelParallelStrategy(parallelize_fn) - fully_shard of every Block, checkpoint_wrapper around
        # each; full.py: FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block})
        st.default("sharding", "fsdp_full", "litgpt finetune on more than one GPU shards every Block (full shard)")
        st.default("gradient_checkpointing", True, "litgpt's multi-GPU strategy checkpoints every Block")
    else:
        st.default("gradient_checkpointing", False, "litgpt checkpoints only under its multi-GPU strategy")
    if "seq_len" not in st.fields:
        st.notes.append("train.max_seq_length is not set: litgpt trains on the dataset's longest sample "
                        "(give --seq-len)")
    _stack(st, "litgpt", "a litgpt config runs on litgpt")
    _drop_unused_lora(st)


# ---------------------------------------------------------------------------------------------
# torchtune recipes (recipes/configs/*/…_lora_single_device.yaml; torchtune/models/*/_model_builders.py)

# builder name (without the lora_ / qlora_ prefix) -> shipped model
TORCHTUNE_BUILDERS = {
    "llama2_7b": "meta-llama/Llama-2-7b-hf",
    "llama2_13b": "meta-llama/Llama-2-13b-hf",
    "llama2_70b": "meta-llama/Llama-2-70b-hf",
    "llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "mistral_7b": "mistralai/Mistral-7B-v0.1",
    "gemma_2b": "google/gemma-2b",
    "gemma_7b": "google/gemma-7b",
    "qwen2_5_7b_base": "Qwen/Qwen2.5-7B",
    "qwen2_5_7b_instruct": "Qwen/Qwen2.5-7B",  # the same architecture as the base model
}
TORCHTUNE_LORA_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
TORCHTUNE_MLP = ("gate_proj", "up_proj", "down_proj")  # torchtune w1, w3, w2


def _torchtune_builder(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or not v.startswith("torchtune.models."):
        raise st.bad(k, v, "a torchtune.models builder, e.g. torchtune.models.llama2.lora_llama2_7b")
    name = v.rsplit(".", 1)[-1]
    method = "full"
    for prefix, m in (("qlora_", "qlora"), ("lora_", "lora")):
        if name.startswith(prefix):
            name, method = name[len(prefix):], m
    st.keep("method", k, method)
    st.keep("builder", k, v)
    if name in TORCHTUNE_BUILDERS:
        st.set(k, v, "model", TORCHTUNE_BUILDERS[name])
    else:
        st.model_missing = (
            f"{st.source}: {k}: builder {v!r} has no shipped model memplan knows; shipped builders: "
            f"{', '.join(TORCHTUNE_BUILDERS)} (each with lora_ / qlora_ forms); give --model with its config.json"
        )
        st.ignore(k, "builder without a shipped model (give --model)")


def _torchtune_attn(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, list) or not all(isinstance(m, str) and m in TORCHTUNE_LORA_ATTN for m in v):
        raise st.bad(k, v, f"a list of {', '.join(TORCHTUNE_LORA_ATTN)}")
    st.keep("attn", k, v)


def _torchtune_dtype(st: _State, k: str, v: Any) -> None:
    table = {"bf16": "bf16", "fp32": "fp32"}
    if not isinstance(v, str) or v.lower() not in table:
        raise st.bad(k, v, "bf16 or fp32 (torchtune refuses fp16 training)")
    st.set(k, v, "compute_dtype", table[v.lower()])


def _torchtune_optimizer(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str) or v.lower() not in CLASS_OPTIMIZERS:
        raise _optimizer_refusal(st, k, v, "torch.optim.AdamW, torch.optim.SGD, bitsandbytes.optim.AdamW8bit, "
                                           "bitsandbytes.optim.PagedAdamW, bitsandbytes.optim.PagedAdamW8bit")
    st.set(k, v, "optimizer", CLASS_OPTIMIZERS[v.lower()])


def _torchtune_loss(st: _State, k: str, v: Any) -> None:
    if not isinstance(v, str):
        raise st.bad(k, v, "a loss _component_")
    name = v.rsplit(".", 1)[-1]
    if name == "CEWithChunkedOutputLoss":
        st.keep("chunked", k, v)
    elif name in ("CrossEntropyLoss",):
        st.ignore(k, "plain cross-entropy over the whole logits tensor")
    else:
        st.ignore(k, f"recognised, not modelled by this memplan (loss {name})")


def _torchtune_seq(st: _State, k: str, v: Any) -> None:
    if v is None:
        st.ignore(k, NULL + ": the dataset's longest sample (give --seq-len)")
        st.notes.append(f"{k} is null: torchtune pads each batch to its longest sample; give --seq-len")
        return
    st.set(k, v, "seq_len", _int(st, k, v))


def _fsdp_cpu_offload(st: _State, k: str, v: Any) -> None:
    st.keep("fsdp", k, v)
    if _bool(st, k, v):
        st.set(k, v, "cpu_offload", True)
    else:
        st.ignore(k, "false: no offload")


TORCHTUNE: dict[str, Rule] = {
    "model._component_": Rule(("model", "method"), _torchtune_builder, "`model` (table below), lora_/qlora_: `method`"),
    "model.lora_attn_modules": Rule(("lora_targets",), _torchtune_attn, "`lora_targets` (output_proj: o_proj)"),
    "model.apply_lora_to_mlp": Rule(("lora_targets",), lambda st, k, v: st.keep("mlp", k, _bool(st, k, v)),
                                    "true: + gate_proj, up_proj, down_proj"),
    "model.apply_lora_to_output": Rule((), lambda st, k, v: st.keep("output", k, _bool(st, k, v)),
                                       "not modelled (LoRA on the output head)"),
    "model.lora_rank": positive("lora_rank"),
    "model.lora_alpha": Rule(("lora_alpha",), lambda st, k, v: st.set(k, v, "lora_alpha", _alpha(st, k, v)), "`lora_alpha`"),
    "model.lora_dropout": dropout(),
    "model.use_dora": on_only("dora"),
    "model.quantize_base": Rule(("method",), lambda st, k, v: st.keep("quantize_base", k, _bool(st, k, v)), "true: `method=qlora`"),
    "tokenizer.max_seq_len": Rule(("seq_len",), _torchtune_seq, "`seq_len`"),
    "dataset.packed": on_only("packing"),
    "batch_size": positive("micro_batch"),
    "dtype": Rule(("compute_dtype",), _torchtune_dtype, "`compute_dtype` (weights in it: no autocast)"),
    "enable_activation_checkpointing": flag("gradient_checkpointing"),
    "enable_activation_offloading": Rule(("activation_offloading",), _offload, "`activation_offloading`"),
    "optimizer._component_": Rule(("optimizer",), _torchtune_optimizer, "`optimizer`"),
    "optimizer.fused": flag("foreach", invert=True),
    "optimizer.foreach": flag("foreach"),
    "optimizer.momentum": Rule(("optimizer",), _momentum, "SGD momentum > 0: `sgd_momentum`"),
    "optimizer_in_bwd": flag("optimizer_in_backward"),
    "loss._component_": Rule(("chunked_loss",), _torchtune_loss, "CEWithChunkedOutputLoss: `chunked_loss=8`"),
    "compile": flag("compile"),
    "fsdp_cpu_offload": Rule(("cpu_offload", "sharding"), _fsdp_cpu_offload, "`cpu_offload`; the key marks FSDP: `fsdp_full`"),
    "fsdp_reshard_after_forward": Rule(("sharding",), lambda st, k, v: st.keep("reshard", k, _bool(st, k, v)),
                                       "true: `fsdp_full`, false: `fsdp_grad_op`"),
    "device": Rule((), lambda st, k, v: _torchtune_device(st, k, v), ""),
}
TORCHTUNE_IGNORED_PREFIX = ("tokenizer.", "checkpointer.", "dataset.", "lr_scheduler.", "metric_logger.", "profiler.",
                            "optimizer.", "loss.", "model.")
TORCHTUNE_IGNORED = {
    "output_dir", "resume_from_checkpoint", "save_adapter_weights_only", "seed", "shuffle", "epochs",
    "max_steps_per_epoch", "gradient_accumulation_steps", "clip_grad_norm", "log_every_n_steps",
    "log_peak_memory_stats", "log_level", "custom_sharded_layers", "run_val_every_n_steps", "dataset_val",
}


def _torchtune_device(st: _State, k: str, v: Any) -> None:
    if v != "cuda":
        raise st.bad(k, v, "cuda (memplan estimates GPU memory)")
    st.ignore(k, "cuda: the GPU memplan estimates")


def _alpha(st: _State, k: str, v: Any) -> int:
    if isinstance(v, float) and v.is_integer() and v > 0:
        return int(v)
    return _int(st, k, v)


def _post_torchtune(st: _State) -> None:
    s = st.stash
    key, method = s.get("method", ("(builder)", "full"))
    if "quantize_base" in s:
        qk, q = s["quantize_base"]
        if q and method == "full":
            raise MemplanInputError(f"{st.source}: {qk}: a quantized base needs a lora_ builder")
        if q:
            method = "qlora"
            st.used.append((qk, True, "method", "qlora"))
        else:
            st.ignore(qk, "false: off")
    if "builder" in s:
        st.set(s["builder"][0], s["builder"][1], "method", method)
    dtype = st.fields.get("compute_dtype")
    if dtype is None:
        st.default("compute_dtype", "bf16", "torchtune recipes default to dtype bf16")
        dtype = "bf16"
    if method == "qlora":
        # torchtune modules/low_precision/nf4_linear.py: torchao `to_nf4` (defaults: 4-bit values in blocks of 64,
        # 8-bit block scales in groups of 256), counted as bitsandbytes nf4 with double quantization (the
        # per-group constants may differ by a few bytes); double_quant is the Job's default already
        st.default("kbit_prepare", False, "torchtune does not run peft's prepare_model_for_kbit_training")
    if method in ("lora", "qlora"):
        names: list[str] = [TORCHTUNE_LORA_ATTN[m] for m in s.get("attn", (None, []))[1]]
        if s.get("mlp", (None, False))[1]:
            names += TORCHTUNE_MLP
        if not names:
            raise MemplanInputError(f"{st.source}: model.lora_attn_modules is empty and apply_lora_to_mlp is false: "
                                    "no LoRA target")
        src = s.get("attn", s.get("mlp"))
        st.set(src[0], src[1], "lora_targets", tuple(names))
        if "mlp" in s and "attn" in s:
            st.used.append((s["mlp"][0], s["mlp"][1], "lora_targets", tuple(names)))
        # torchtune builders: lora_rank 8, lora_alpha 16, lora_dropout 0.0; adapters in the model's dtype
        st.default("lora_rank", 8, "torchtune LoRA builders default lora_rank to 8")
        st.default("lora_alpha", 16, "torchtune LoRA builders default lora_alpha to 16")
        st.default("adapter_dtype", dtype, "torchtune builds the adapters in the recipe dtype")
    else:
        for name in ("attn", "mlp"):
            if name in s:
                st.ignore(s[name][0], "full fine-tuning builder: unused")
        _drop_unused_lora(st)
    if "output" in s:
        st.ignore(s["output"][0], "recognised, not modelled by this memplan (LoRA on the output head)"
                  if s["output"][1] else "false: off")
    if "chunked" in s:
        # CEWithChunkedOutputLoss(num_output_chunks=8): the recipe calls model.set_num_output_chunks(8)
        st.set(s["chunked"][0], s["chunked"][1], "chunked_loss", 8)
    if "momentum" in s:
        mk, m = s["momentum"]
        if st.fields.get("optimizer") == "sgd" and m > 0:
            st.fields["optimizer"] = "sgd_momentum"
            st.used.append((mk, m, "optimizer", "sgd_momentum"))
        else:
            st.ignore(mk, "no momentum state" if m == 0 else "not SGD")
    if "fsdp" in s or "reshard" in s:
        reshard = s.get("reshard", (None, True))
        st.set(reshard[0] or s["fsdp"][0], reshard[1], "sharding", "fsdp_full" if reshard[1] else "fsdp_grad_op")
        st.notes.append("an FSDP recipe: give --num-gpus (the recipe's GPUs come from tune run --nproc_per_node)")
    st.default("gradient_checkpointing", False, "torchtune recipes default enable_activation_checkpointing to false")
    st.default("micro_batch", 1, "")
    _stack(st, "torchtune", "a torchtune recipe runs on torchtune")


def stack_available(name: str) -> bool:
    """Whether this memplan has the rules of stack `name` (planner/stacks registers each one)."""
    from . import stacks

    try:
        stacks.get(name)
    except MemplanInputError:
        return False
    return True


def _stack(st: _State, name: str, why: str) -> None:
    """`stack` = the format's own, once this memplan has its rules; until then the installed
    transformers' rules apply, and the notes say so."""
    if stack_available(name):
        st.default("stack", name, why)
    elif "stack" not in st.overridden:
        st.notes.append(f"this memplan has no {name} stack yet: the job is estimated with the installed "
                        f"transformers' rules (the {name} settings above still apply)")


def _post_deepspeed(st: _State) -> None:
    if "sharding" in st.fields:
        st.notes.append("DeepSpeed divides the model state over the data-parallel GPUs: give --num-gpus")


def _offload_notes(st: _State) -> None:
    """DeepSpeed offloads optimizer states and parameters separately; memplan's cpu offload moves the
    optimizer states and whatever is sharded (parameters under ZeRO-3, gradients from ZeRO-2)."""
    keys = [u[0] for u in st.used if u[2] == "cpu_offload"]
    opt = any(k.endswith("offload_optimizer.device") for k in keys)
    par = any(k.endswith("offload_param.device") for k in keys)
    if opt and not par and st.fields.get("sharding") == "zero3":
        st.notes.append("offload_optimizer without offload_param: memplan's cpu offload moves the ZeRO-3 parameter "
                        "shards to the host too, so each GPU's 1/N of the weights is not counted")
    if par and not opt:
        st.notes.append("offload_param without offload_optimizer: memplan's cpu offload moves the optimizer states "
                        "to the host too, so each GPU's share of them is not counted")


# ---------------------------------------------------------------------------------------------
# the formats


@dataclass(frozen=True)
class Format:
    rules: dict[str, Rule]
    known_ignored: frozenset[str]
    ignored_prefixes: dict[str, str]  # key prefix -> why its keys set nothing
    post: Callable[[_State], None]
    sub_tables: dict[str, dict[str, Rule]]  # key prefix -> the table its sub-keys are read with


def _no_effect(*prefixes: str) -> dict[str, str]:
    return {p: NO_EFFECT for p in prefixes}


_FSDP_SUB = {**FSDP_CONFIG, **{"fsdp_" + k: r for k, r in FSDP_CONFIG.items()}}
FORMAT_TABLES: dict[str, Format] = {
    "axolotl": Format(AXOLOTL, frozenset(AXOLOTL_IGNORED), _no_effect("datasets.", "special_tokens.",
                                                                        "lr_scheduler_kwargs."), _post_axolotl, {"fsdp_config.": _FSDP_SUB, "deepspeed.": DEEPSPEED}),
    "hf": Format(HF, frozenset(HF_IGNORED), _no_effect("dataset_kwargs.", "lr_scheduler_kwargs.", "model_init_kwargs.",
                                                       "gradient_checkpointing_kwargs.", "activation_checkpointing_kwargs."),
                 _post_hf, {"fsdp_config.": _FSDP_SUB, "deepspeed.": DEEPSPEED}),
    "litgpt": Format(LITGPT, frozenset(LITGPT_IGNORED), _no_effect(*LITGPT_IGNORED_PREFIX), _post_litgpt, {}),
    "torchtune": Format(TORCHTUNE, frozenset(TORCHTUNE_IGNORED), _no_effect(*TORCHTUNE_IGNORED_PREFIX), _post_torchtune, {}),
    "deepspeed": Format(DEEPSPEED, frozenset({"gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
                                              "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer"}),
                        DEEPSPEED_PREFIX_IGNORED, _post_deepspeed, {}),
}
_READS_NULL = (_litgpt_precision, _litgpt_quantize, _seq, _torchtune_seq)


def flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted keys (lists and scalars are values)."""
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def detect_format(data: dict, source: str) -> str:
    """The format a config's keys say; one line naming the file when none or several fit."""
    keys = set(data)
    hits = []
    model = data.get("model")
    if isinstance(model, dict) and str(model.get("_component_", "")).startswith("torchtune.") or any(
            isinstance(v, dict) and str(v.get("_component_", "")).startswith("torchtune.") for v in data.values()):
        hits.append("torchtune")
    if "checkpoint_dir" in keys or (isinstance(data.get("train"), dict) and "micro_batch_size" in data["train"]):
        hits.append("litgpt")
    if keys & {"base_model", "micro_batch_size", "sequence_len", "adapter", "lora_target_linear", "sample_packing"}:
        hits.append("axolotl")
    if keys & {"per_device_train_batch_size", "optim", "model_name_or_path", "max_seq_length", "max_length",
               "use_liger_kernel", "num_train_epochs", "use_peft"}:
        hits.append("hf")
    if not hits and "zero_optimization" in keys:
        hits.append("deepspeed")
    if len(hits) == 1:
        return hits[0]
    what = f"it has keys of {' and '.join(hits)}" if hits else "no key of a format memplan reads"
    raise MemplanInputError(f"{source}: cannot tell the config's format ({what}); give --from-format "
                            f"{' | '.join(FORMATS)}")


def read_training_config(data: dict, fmt: str | None, source: str, overridden: Collection[str] = ()) -> FromConfig:
    """A training config's dict (`source`: its name in messages) as Job fields. `fmt`: one of FORMATS,
    or None to tell it from the keys. `overridden`: Job fields the command line sets; keys that only
    set those are listed as overridden, and their values are not checked."""
    if not isinstance(data, dict):
        raise MemplanInputError(f"{source}: a training config is a mapping of keys, got {type(data).__name__}")
    if fmt is None:
        fmt = detect_format(data, source)
    if fmt not in FORMAT_TABLES:
        raise MemplanInputError(f"unknown config format {fmt!r}: allowed: {', '.join(FORMATS)}")
    spec = FORMAT_TABLES[fmt]
    st = _State(fmt, source, overridden)
    _read_keys(st, spec, flatten(data))
    spec.post(st)
    st.used = _unique(st.used)
    _offload_notes(st)
    return _result(st)


def merge_reference(fc: FromConfig, kind: str, data: dict, source: str, overridden: Collection[str] = ()) -> FromConfig:
    """A referenced DeepSpeed or FSDP config's keys, added to `fc` (its keys under `kind:` in used / ignored)."""
    if not isinstance(data, dict):
        raise MemplanInputError(f"{source}: a {kind} config is a JSON object of keys, got {type(data).__name__}")
    table = DEEPSPEED if kind == "deepspeed" else _FSDP_SUB
    spec = Format(table, FORMAT_TABLES["deepspeed"].known_ignored if kind == "deepspeed" else frozenset(),
                  DEEPSPEED_PREFIX_IGNORED if kind == "deepspeed" else {}, lambda st: None, {})
    st = _State(fc.format, source, overridden)
    st.fields = dict(fc.fields)
    defaults = {d[0] for d in fc.defaults}
    st.origin = {f: f"{fc.source} ({fc.format}'s default)" if f in defaults else fc.source for f in fc.fields}
    st.used = list(fc.used)
    _read_keys(st, spec, flatten(data), prefix=f"{source.replace(chr(92), '/').rsplit('/', 1)[-1]}:")
    if kind == "deepspeed" and "sharding" in st.fields and "sharding" not in fc.fields:
        st.notes.append("DeepSpeed divides the model state over the data-parallel GPUs: give --num-gpus")
    _offload_notes(st)
    return fc.model_copy(update=dict(
        fields=st.fields, used=_unique(st.used), ignored=fc.ignored + st.ignored, notes=fc.notes + st.notes))


def _read_keys(st: _State, spec: Format, items: list[tuple[str, Any]], prefix: str = "") -> None:
    for key, value in items:
        shown = prefix + key
        if st.fmt == "hf" and not prefix and key.split(".")[0] in TRL_KEYS:
            st.stash.setdefault("_trl", (key, True))
        rule = _rule(spec, key)
        if rule is None:
            st.ignore(shown, UNKNOWN.format(fmt=FORMAT_NAMES[st.fmt]))
            continue
        if rule.fields and set(rule.fields) <= st.overridden:
            st.ignore(shown, "overridden on the command line "
                             f"({', '.join('--' + f.replace('_', '-') for f in rule.fields)})")
            continue
        if value is None and rule.convert not in _READS_NULL:
            st.ignore(shown, NULL)
            continue
        rule.convert(st, shown, value)


def _rule(spec: Format, key: str) -> Rule | None:
    """The rule for `key`: its own, a sub-table's (fsdp_config.*, deepspeed.*), or an ignore rule for
    the keys and key prefixes the format documents as having no effect on memory."""
    if key in spec.rules:
        return spec.rules[key]
    for sub, table in spec.sub_tables.items():
        if key.startswith(sub):
            return _rule(Format(table, frozenset(), DEEPSPEED_PREFIX_IGNORED if table is DEEPSPEED else {},
                                lambda st: None, {}), key[len(sub):]) or ignored("not a key memplan reads in this section")
    if key in spec.known_ignored or key.split(".")[0] in spec.known_ignored:
        return ignored()
    for pre, why in spec.ignored_prefixes.items():
        if key.startswith(pre):
            return ignored(why)
    return None


def _unique(used: list) -> list:
    seen, out = set(), []
    for u in used:
        k = repr(u)
        if k not in seen:
            seen.add(k)
            out.append(u)
    return out


def _result(st: _State) -> FromConfig:
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in st.fields.items()}
    return FromConfig(format=st.fmt, source=st.source, fields=fields, used=st.used, ignored=st.ignored,
                      defaults=st.defaults, references=st.references, notes=st.notes,
                      model_missing=None if "model" in fields else (
                          st.model_missing or f"{st.source} names no model (the {FORMAT_NAMES[st.fmt]} has no "
                                              f"{_MODEL_KEY[st.fmt]}): give --model"))


_MODEL_KEY = {"axolotl": "base_model", "hf": "model_name_or_path", "litgpt": "checkpoint_dir",
              "torchtune": "model._component_", "deepspeed": "model key"}


# ---------------------------------------------------------------------------------------------
# the command line over the file


def job_fields(fc: FromConfig, cli: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The Job fields of the file with the command line's on top, and the file's fields that the
    command line's task or method makes unread (the Job would refuse them): dropped, with the reason."""
    fields = {**fc.fields, **cli}
    dropped: list[tuple[str, str]] = []
    task = fields.get("task", "train")
    method = fields.get("method", "full")

    def drop(field: str, why: str) -> None:
        if field in fields and field not in cli:
            dropped.append((field, why))
            del fields[field]

    if task == "infer":
        for f in (*TRAINING_ONLY, "method", *LORA_ONLY, "dora", "liger", "packing", "activation_offloading",
                  "optimizer_in_backward", "chunked_loss", "checkpoint_reentrant"):
            drop(f, "--task infer: a training setting")
        method = "full"
    else:
        for f in INFERENCE_ONLY:
            drop(f, "a training job")
    if method == "full":
        for f in (*LORA_ONLY, "dora"):
            drop(f, "--method full: a LoRA setting")
    if str(fields.get("sharding", "")).startswith("fsdp") and fields.get("num_gpus", 1) > 1 \
            and "autocast" in fields and "autocast" not in cli:
        # under FSDP the file's bf16/fp16 is accelerate's mixed precision, FSDP's own recipe (docs/fsdp.md):
        # the trainable parameters are upcast to fp32 (accelerate fsdp_utils.py, accelerator.py), and the
        # Job derives FSDP1's autocast itself
        upcast = method == "full" and fields.get("weight_dtype") in (None, "bf16", "fp16") and "weight_dtype" not in cli
        drop("autocast", "under FSDP it is accelerate's mixed precision, FSDP's own recipe (param and reduce dtype)"
             + ("; the trainable parameters are upcast to fp32, so weight_dtype=fp32 is estimated" if upcast else ""))
        if upcast:
            fields["weight_dtype"] = "fp32"
    if "method" in cli and "weight_dtype" not in cli and "weight_dtype" in fields:
        w = fields["weight_dtype"]
        four = w in ("nf4", "fp4")
        if (method == "qlora") != four or (method == "full" and w == "int8"):
            drop("weight_dtype", f"--method {method}: the file's {w} base does not apply")
    return fields, dropped
