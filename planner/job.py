"""The job description: one pydantic model shared by the estimator, the CPU trace and the GPU harness,
so that a prediction and its measurement always describe the same run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .dtypes import DType
from .errors import MemplanInputError, input_error
from .parallel import Sharding
from .zero import ZeroConfig

Method = Literal["full", "lora", "qlora"]
Task = Literal["train", "infer"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd", "sgd_momentum"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
# The software the job runs on (planner/stacks): each owns the rules that depend on it. The core never
# guesses it from the environment: the CLI and memplan.estimate resolve the installed one.
StackName = Literal["transformers-5", "transformers-4", "litgpt", "torchtune"]
STACK_NAMES: tuple[str, ...] = StackName.__args__  # type: ignore[attr-defined]

OPTIMIZERS: tuple[str, ...] = Optimizer.__args__  # type: ignore[attr-defined]

# Fields that only a training step reads: given with task="infer" they would be silently ignored.
TRAINING_ONLY: tuple[str, ...] = (
    "optimizer", "foreach", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "adapter_dtype",
    "kbit_prepare", "gradient_checkpointing", "autocast", "cpu_offload", "gpus_per_node",
    "packing", "liger", "activation_offloading", "checkpoint_reentrant", "optimizer_in_backward", "chunked_loss",
    "dora", "fsdp_version", "fsdp_mixed_precision", "deepspeed",
)
# Fields that only LoRA and QLoRA read: given with method="full" they would be silently ignored.
LORA_ONLY: tuple[str, ...] = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "adapter_dtype", "dora")
# Fields that only inference reads.
# Fields only `--engine vllm` reads (planner/serve.py).
VLLM_ONLY: tuple[str, ...] = ("gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                              "block_size", "enforce_eager")
INFERENCE_ONLY: tuple[str, ...] = ("new_tokens", "kv_cache_dtype", "cache_implementation", "engine", "device_map",
                                   "max_memory", *VLLM_ONLY)
# How inference spreads over several GPUs (--sharding): tensor parallelism (planner/tensor_parallel.py)
# or accelerate's layer split (planner/device_map.py); "none" is one GPU
INFERENCE_SHARDINGS: tuple[str, ...] = ("none", "tp", "device_map")
DeviceMapStrategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]


def _flag(field: str, value) -> str:
    """The CLI option that sets `field` to `value`, as the user would have typed it."""
    name = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, tuple):
        value = ",".join(value)
    return f"--{name} {getattr(value, 'value', value)}"


class Job(BaseModel):
    """One training or inference job on one GPU (or one data-parallel rank).

    Bad fields raise `MemplanInputError` (a ValueError) with the one-line message the CLI prints,
    and so does an option the job's task or method never reads (see `_nothing_ignored`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    stack: StackName = "transformers-5"
    task: Task = "train"
    method: Method = "full"
    # Storage dtype of the base weights. Default: nf4 for qlora, the compute dtype otherwise.
    # fp32 weights with a 16-bit compute dtype mean mixed precision (autocast, fp32 master).
    weight_dtype: DType | None = None
    compute_dtype: DType = DType.bf16
    double_quant: bool = True
    optimizer: Optimizer = "adamw"
    # torch.optim's default on CUDA: one fused multi-tensor update, which allocates a
    # temporary as large as the trainable parameters (optim/adamw.py `_multi_tensor_adamw`).
    foreach: bool = True
    micro_batch: int = 1
    seq_len: int = 512
    new_tokens: int = 0
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # "default" = peft's per-family default, "all-linear" = every linear in the blocks, or names.
    lora_targets: str | tuple[str, ...] = "default"
    # LoRA weights' dtype. None: the stack's (Stack.default_adapter_dtype): peft keeps adapters in
    # fp32 over 16-bit bases (autocast_adapter_dtype=True); litgpt and torchtune in the model's dtype.
    adapter_dtype: DType | None = None
    # peft LoraConfig(use_dora=True): a trainable magnitude vector per targeted linear, and the
    # weight's norm recomputed every forward (peft tuners/lora/dora.py)
    dora: bool = False
    # peft.prepare_model_for_kbit_training: casts every non-4/8-bit parameter to fp32 and turns
    # gradient checkpointing on. Applies to quantized bases only.
    kbit_prepare: bool = True
    # None: on for qlora (prepare_model_for_kbit_training enables it), off otherwise.
    gradient_checkpointing: bool | None = None
    # gradient_checkpointing_kwargs={"use_reentrant": ...}; None: the stack's default
    # (Stack.default_reentrant). The same bytes either way, as traced (docs/stacks/transformers.md).
    checkpoint_reentrant: bool | None = None
    # attn_implementation: "sdpa" (torch's scaled_dot_product_attention), "eager" (the model's own),
    # "flash_attention_2" (the flash-attn package: fp16/bf16 only)
    attention: Attention = "sdpa"
    # Sequences packed into each row (TRL packing / padding_free, axolotl sample_packing): several
    # documents share a row of seq_len tokens, told apart by position_ids. flash_attention_2 runs them
    # varlen (no mask); SDPA and eager need a block-diagonal causal mask.
    packing: bool = False
    # Liger kernels (TrainingArguments/TRL use_liger_kernel=True): fused linear cross-entropy, RMSNorm,
    # SwiGLU/GeGLU and RoPE replace the model's (planner/liger.py)
    liger: bool = False
    # TRL activation_offloading / torchtune enable_activation_offloading: saved activations in pinned
    # host memory (planner/offload.py)
    activation_offloading: bool = False
    # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: the caching allocator grows one range per
    # pool and stream instead of a segment per cudaMalloc (planner/allocator.py)
    expandable_segments: bool = False
    # HF Trainer's bf16=True / fp16=True: the forward runs under torch.autocast in the compute
    # dtype. None: on for mixed precision (fp32 weights, 16-bit compute), off otherwise.
    autocast: bool | None = None
    gpu: str | None = None
    # data parallelism: GPUs in the job, how model state is split over them, and host offload
    num_gpus: int = 1
    sharding: Sharding = "none"
    cpu_offload: bool = False
    gpus_per_node: int = 8
    # FSDP's implementation, as accelerate's `fsdp_version` names it: 2 = `fully_shard` (per-parameter
    # DTensor shards, torch.distributed.fsdp._fully_shard), 1 = `FullyShardedDataParallel` (flat parameters)
    fsdp_version: Literal[1, 2] = 2
    # FSDP mixed precision over fp32 weights with 16-bit compute (fp32 sharded master weights and states):
    # "accelerate": accelerate's `mixed_precision: bf16|fp16` with FSDP: param_dtype = reduce_dtype = the
    #   compute dtype, the forward also under autocast, outputs converted to fp32 (accelerate
    #   dataclasses.py `set_mixed_precision`, accelerator.py `prepare_model`);
    # "policy": an explicit `MixedPrecisionPolicy(param_dtype=<compute>, reduce_dtype=fp32)` as torchtitan
    #   and torchtune set it: no autocast
    fsdp_mixed_precision: Literal["accelerate", "policy"] = "accelerate"
    # torchtune's optimizer_in_bwd: one optimizer per parameter, stepped by a post-accumulate-grad
    # hook as soon as that parameter's gradient is ready (training/memory.py register_optim_in_bwd_hooks)
    optimizer_in_backward: bool = False
    # torchtune's CEWithChunkedOutputLoss: the output projection and the loss run over this many
    # chunks of the sequence (its recipes use 8); 0 = one unchunked loss
    chunked_loss: int = 0
    # [zero] DeepSpeed's zero_optimization knobs for --sharding zero1/zero2/zero3 (planner/zero.py); None:
    # what accelerate's DeepSpeed plugin writes (stage and offload devices only: DeepSpeed's defaults)
    deepspeed: ZeroConfig | None = None
    # generate()'s cache (inference only; planner/inference.py): None = the compute dtype; int4/int8 =
    # transformers' QuantizedCache (cache_utils.py QuantizedLayer: quanto or HQQ, groups of 64, the last <128
    # positions kept in the compute dtype); fp8 = QuantizedCache(backend="fp8") (Fp8QuantizedLayer, per-tensor scale)
    kv_cache_dtype: Literal["int4", "int8", "fp8"] | None = None
    # generate(cache_implementation=...): "dynamic" = DynamicCache (grows by torch.cat), "static" = StaticCache
    # (StaticLayer preallocates prompt + new tokens for every layer at the first update)
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    # what runs the model (inference): "transformers" = generate(); "vllm" = vLLM 0.33's engine, whose
    # tensor-parallel split replicates KV heads when the GPUs outnumber them (planner/tensor_parallel.py)
    engine: Literal["transformers", "vllm"] = "transformers"
    # --sharding device_map: from_pretrained(device_map=...)'s strategy (None: auto) and accelerate's
    # max_memory per GPU in bytes (None: derived from each card's memory, planner/device_map.py)
    device_map: DeviceMapStrategy | None = None
    max_memory: tuple[int, ...] | None = None
    # --engine vllm: the `vllm serve` arguments that size its KV cache (planner/serving.py ServingConfig;
    # None: vLLM 0.33's default for the model and card)
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    enforce_eager: bool = False

    def __init__(self, **fields) -> None:
        # One exception type for bad input in the library (MemplanInputError, a ValueError), with the
        # message the CLI prints; model_validate / model_validate_json (results files) keep pydantic's.
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise input_error(exc) from exc

    @field_validator("micro_batch", "seq_len", "lora_rank", "lora_alpha", "num_gpus", "gpus_per_node")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v <= 0:
            raise MemplanInputError(f"{info.field_name.replace('_', '-')} must be a positive integer, got {v}")
        return v

    @field_validator("max_memory", mode="before")
    @classmethod
    def _sizes(cls, v):
        """--max-memory '40GiB,80GiB' (one figure per GPU) or a sequence of byte counts."""
        if not isinstance(v, str):
            return v
        from .units import parse_size

        try:
            return tuple(parse_size(part) for part in v.split(","))
        except ValueError as exc:
            raise MemplanInputError(f"--max-memory {v!r}: {exc}; one figure per GPU, comma-separated") from None

    @field_validator("new_tokens", "chunked_loss")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise MemplanInputError(f"{info.field_name.replace('_', '-')} must be zero or a positive integer, got {v}")
        return v

    @field_validator("compute_dtype")
    @classmethod
    def _float_compute(cls, v: DType) -> DType:
        if not v.is_float:
            raise MemplanInputError(f"compute dtype {v.value!r} is not allowed: use fp32, fp16 or bf16")
        return v

    @model_validator(mode="after")
    def _method_fits_dtype(self) -> "Job":
        w = self.base_weight_dtype
        if self.task == "train":
            if self.method == "qlora" and not w.is_4bit:
                raise MemplanInputError(f"qlora needs a 4-bit weight dtype (nf4 or fp4), got {w.value}")
            if self.method == "full" and not w.is_float:
                raise MemplanInputError(
                    f"full fine-tuning cannot train {w.value} weights: use fp32, fp16 or bf16, or --method lora/qlora"
                )
            if self.method == "lora" and w.is_4bit:
                raise MemplanInputError(f"lora over {w.value} weights is qlora: use --method qlora")
        if self.task == "infer":
            self._check_inference_sharding()
        elif self.sharding in ("tp", "device_map"):
            raise MemplanInputError(
                f"--sharding {self.sharding} is modelled for inference (--task infer); for training use none, ddp, "
                "zero1, zero2, zero3, fsdp_full, fsdp_grad_op or fsdp_hybrid")
        if self.cpu_offload and self.sharding not in ("zero1", "zero2", "zero3", "fsdp_full", "fsdp_hybrid"):
            raise MemplanInputError(
                f"cpu offload needs a sharded strategy (zero1, zero2, zero3, fsdp_full, fsdp_hybrid), got {self.sharding}"
            )
        fsdp = self.sharding.startswith("fsdp")
        if self.fsdp_version != 2 and not fsdp:
            raise MemplanInputError(
                f"--fsdp-version {self.fsdp_version} applies to FSDP sharding (fsdp_full, fsdp_grad_op, fsdp_hybrid), "
                f"not to --sharding {self.sharding}: drop it"
            )
        if self.fsdp_mixed_precision != "accelerate" and not (fsdp and self.mixed_precision):
            raise MemplanInputError(
                f"--fsdp-mixed-precision {self.fsdp_mixed_precision} applies to FSDP sharding over fp32 weights with "
                "16-bit compute (--weight-dtype fp32 --compute-dtype bf16|fp16 --sharding fsdp_*): drop it"
            )
        if fsdp and self.num_gpus > 1 and self.autocast is not None:
            raise MemplanInputError(
                f"--{'no-' if not self.autocast else ''}autocast is not read under FSDP: its mixed precision is FSDP's "
                "own (--weight-dtype fp32 with a 16-bit --compute-dtype; --fsdp-mixed-precision accelerate autocasts "
                "FSDP1's forward as accelerate does, policy does not): drop it"
            )
        if self.autocast is False and self.mixed_precision:
            raise MemplanInputError(
                f"fp32 weights with {self.compute_dtype.value} compute run under autocast: drop autocast=False, "
                "or use compute dtype fp32"
            )
        if self.autocast and self.compute_dtype is DType.fp32:
            raise MemplanInputError("autocast needs a 16-bit compute dtype (bf16 or fp16), got fp32")
        if self.attention == "flash_attention_2" and self.compute_dtype is DType.fp32:
            raise MemplanInputError(
                "--attention flash_attention_2 runs in fp16 or bf16 only (flash-attn has no fp32 kernel): "
                "use --compute-dtype bf16, or --attention sdpa"
            )
        if self.adapter_dtype is not None and not self.adapter_dtype.is_float:
            raise MemplanInputError(f"adapter dtype {self.adapter_dtype.value!r} is not allowed: use fp32, fp16 or bf16")
        if self.kv_cache_dtype is not None and self.cache_implementation == "static":
            raise MemplanInputError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is transformers' QuantizedCache, a dynamic cache: drop "
                "--cache-implementation static, or the quantized cache")
        if self.deepspeed is not None:  # [zero]
            if self.sharding not in ("zero1", "zero2", "zero3"):
                raise MemplanInputError(f"DeepSpeed ZeRO settings apply to --sharding zero1, zero2 or zero3, not to "
                                        f"--sharding {self.sharding}: drop them")
            self.deepspeed.check(int(self.sharding[-1]), self.cpu_offload)
        return self

    def _check_inference_sharding(self) -> None:
        if self.sharding not in INFERENCE_SHARDINGS:
            raise MemplanInputError(
                f"--sharding {self.sharding} shards training state; inference takes --sharding tp (tensor parallel) "
                "or device_map (accelerate's layer split)")
        if self.num_gpus > 1 and self.sharding == "none":
            raise MemplanInputError(
                f"inference over {self.num_gpus} GPUs: say how the model is split, --sharding tp (tensor parallel) or "
                "--sharding device_map (accelerate's layer split)")
        if self.sharding == "tp" and self.num_gpus == 1:
            raise MemplanInputError("--sharding tp over 1 GPU splits nothing: give --num-gpus 2 or more")
        if (self.device_map is not None or self.max_memory is not None) and self.sharding != "device_map":
            raise MemplanInputError("--device-map and --max-memory apply to --sharding device_map: add it, or drop them")
        if self.max_memory is not None:
            if len(self.max_memory) != self.num_gpus:
                raise MemplanInputError(f"--max-memory gives {len(self.max_memory)} GPU(s), --num-gpus {self.num_gpus}: "
                                        "give one figure per GPU")
            if any(m <= 0 for m in self.max_memory):
                raise MemplanInputError(f"--max-memory figures must be positive, got {list(self.max_memory)}")
        if self.sharding == "device_map" and self.engine == "vllm":
            raise MemplanInputError("--sharding device_map is accelerate's (transformers); vLLM splits a model with "
                                    "--sharding tp")
        if self.engine == "vllm" and self.kv_cache_dtype not in (None, "fp8"):
            raise MemplanInputError(f"--kv-cache-dtype {self.kv_cache_dtype} is transformers' QuantizedCache; vLLM "
                                    "takes fp8 (or none: the model's dtype)")
        if self.engine != "vllm":
            for field in VLLM_ONLY:
                if getattr(self, field) not in (None, False):
                    raise MemplanInputError(f"{_flag(field, getattr(self, field))} is a vLLM setting: add --engine vllm, "
                                            "or drop it")
        if self.engine == "vllm" and self.cache_implementation != "dynamic":
            raise MemplanInputError("--cache-implementation is generate()'s; vLLM pages its cache in blocks: drop it")

    @model_validator(mode="after")
    def _nothing_ignored(self) -> "Job":
        """An option the job's task or method never reads is refused, not silently dropped. "Given"
        means "differs from the default": a Job read back from JSON has every field set, and the
        default is what an unread field holds anyway."""
        def given(field: str) -> bool:
            value = getattr(self, field)
            if field == "adapter_dtype" and value is not None:
                # a Job read back from JSON names the dtype its stack would have chosen anyway
                from .stacks import get

                return value is not get(self.stack).default_adapter_dtype(self)
            return value != type(self).model_fields[field].default

        if self.task == "infer":
            if self.method != "full":
                raise MemplanInputError(
                    f"inference has no training method: drop --method {self.method} (merged adapters cost nothing "
                    "extra; use --weight-dtype nf4 for a 4-bit base)"
                )
            for field in TRAINING_ONLY:
                if given(field):
                    raise MemplanInputError(
                        f"{_flag(field, getattr(self, field))} applies to training, not to --task infer: drop it"
                    )
        else:
            for field in INFERENCE_ONLY:
                if given(field):
                    raise MemplanInputError(
                        f"{_flag(field, getattr(self, field))} applies to inference (--task infer), not to training: drop it"
                    )
            if self.method == "full":
                for field in LORA_ONLY:
                    if given(field):
                        raise MemplanInputError(
                            f"{_flag(field, getattr(self, field))} applies to lora and qlora, not to --method full: "
                            "drop it or use --method lora"
                        )
        return self

    @model_validator(mode="after")
    def _compute_follows_weights(self) -> "Job":
        """The compute dtype must be one the model can really run in. A model computes in its
        weights' dtype unless autocast casts the matmuls; autocast's weight cache keeps only fp32
        casts (torch autocast `cached_cast`: `arg.scalar_type() == kFloat`), so the one autocast
        recipe is fp32 weights (HF Trainer bf16=True / fp16=True); and autocast is a training
        recipe here: generation loads weights in the dtype it computes in."""
        w, c = self.base_weight_dtype, self.compute_dtype
        if not w.is_float or w is c:
            return self
        if self.task == "infer":
            raise MemplanInputError(
                f"inference computes in its weights' dtype: {w.value} weights with {c.value} compute is not a run "
                f"memplan models; use --weight-dtype {c.value} or --compute-dtype {w.value}"
            )
        if w is not DType.fp32 and c is DType.fp32:
            raise MemplanInputError(
                f"{w.value} weights compute in {w.value}, not fp32: use --compute-dtype {w.value}, or --weight-dtype fp32"
            )
        if w is not DType.fp32:
            raise MemplanInputError(
                f"{w.value} weights compute in {w.value}, not {c.value} (autocast over the other 16-bit dtype mixes both "
                f"in the residual stream): use --compute-dtype {w.value}, or fp32 weights for {c.value} mixed precision"
            )
        return self

    def notes(self) -> list[str]:
        """What the job asks for that does not do what its name suggests, for Estimate.notes."""
        notes = []
        if self.task == "train" and self.num_gpus == 1 and self.sharding != "none":
            notes.append(
                f"{self.sharding} on 1 GPU divides nothing: parameters, gradients and optimizer states are counted "
                "whole, as without sharding (give the data-parallel size with --num-gpus)"
            )
        if self.deepspeed_mp:
            c = self.compute_dtype.value
            notes.append(
                f"DeepSpeed's {c} mode casts every parameter to {c} and runs no autocast (engine.py "
                f"_cast_module_mixed_precision; accelerate turns native amp off under DeepSpeed): the ZeRO rows count "
                f"{c} weights and the fp32 master, and the step computes as a {c} model's, with no autocast weight "
                "copies (docs/deepspeed.md)"
            )
        return notes

    @property
    def base_weight_dtype(self) -> DType:
        if self.weight_dtype is not None:
            return self.weight_dtype
        from .stacks import get  # the stack's precision recipe (planner/stacks)

        return get(self.stack).default_weight_dtype(self)

    @property
    def quantized(self) -> bool:
        return not self.base_weight_dtype.is_float

    @property
    def uses_lora(self) -> bool:
        return self.task == "train" and self.method in ("lora", "qlora")

    @property
    def mixed_precision(self) -> bool:
        """fp32 weights updated by an optimizer while compute runs in 16-bit (autocast)."""
        return self.base_weight_dtype is DType.fp32 and self.compute_dtype is not DType.fp32

    @property
    def fsdp(self) -> bool:
        return self.task == "train" and self.sharding.startswith("fsdp") and self.num_gpus > 1

    @property
    def fsdp_mp(self) -> bool:
        """FSDP's own mixed precision: fp32 sharded weights gathered in the compute dtype."""
        return self.fsdp and self.mixed_precision

    @property
    def deepspeed_mp(self) -> bool:
        """DeepSpeed's bf16/fp16 mode over fp32 weights: the engine casts the module to the 16-bit
        dtype and keeps fp32 masters in its optimizer (engine.py `_cast_module_mixed_precision`);
        accelerate turns native amp off under DeepSpeed, so there is no autocast."""
        return self.task == "train" and self.sharding in ("zero1", "zero2", "zero3") and self.mixed_precision

    @property
    def fsdp_policy(self) -> bool:
        """An explicit MixedPrecisionPolicy: the forward runs in param_dtype with no autocast."""
        return self.sharding.startswith("fsdp") and self.mixed_precision and self.fsdp_mixed_precision == "policy"

    @property
    def runs_autocast(self) -> bool:
        if self.autocast is not None:
            return self.autocast
        if self.fsdp_mp:
            # accelerate wraps the forward in autocast in `prepare_model`, which FSDP1 models go
            # through and FSDP2 models do not (`_prepare_fsdp2`); an explicit policy runs without it
            return self.fsdp_mixed_precision == "accelerate" and self.fsdp_version == 1
        if self.deepspeed_mp:
            return False
        return self.task == "train" and self.mixed_precision

    @property
    def checkpointing(self) -> bool:
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return self.quantized and self.kbit_prepare and self.uses_lora

    @property
    def lora_dtype(self) -> DType:
        """The adapters' dtype: as given, else the stack's default."""
        if self.adapter_dtype is not None:
            return self.adapter_dtype
        from .stacks import get

        return get(self.stack).default_adapter_dtype(self)

    @property
    def reentrant(self) -> bool:
        """Whether checkpointing re-enters autograd (torch.utils.checkpoint use_reentrant)."""
        if self.checkpoint_reentrant is not None:
            return self.checkpoint_reentrant
        from .stacks import get

        return get(self.stack).default_reentrant

    @property
    def kbit_upcast(self) -> bool:
        from .stacks import get

        return self.uses_lora and self.quantized and get(self.stack).kbit_prepares(self)
