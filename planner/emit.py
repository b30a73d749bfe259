"""An `accelerate launch` config for a plan, so it runs on an existing distributed engine.

Keys follow accelerate's `ClusterConfig` (accelerate/commands/config/config_args.py) as
`accelerate config` writes them; DeepSpeed ZeRO plans use accelerate's DeepSpeed plugin keys. FSDP plans
write the keys of their fsdp_version as accelerate 1.15 reads them (docs/accelerate.md); the file reads
back into the same Job fields with planner/accelerate_config.py."""

from __future__ import annotations

from .architecture import ModelArch
from .errors import MemplanInputError
from .job import Job


def _yaml(value, indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for key, v in value.items():
        if isinstance(v, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(v, indent + 1))
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(lines)


# YAML 1.1 (PyYAML, which accelerate reads with) takes these bare words for booleans
_YAML_BOOL_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false"}


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and v.lower() in _YAML_BOOL_WORDS:
        return f"'{v}'"
    return str(v)


def _precision(job: Job) -> tuple[str, str]:
    """accelerate's top-level mixed_precision for a non-DeepSpeed plan, and the comment naming the
    precision recipe the estimate assumed.

    accelerate's `mixed_precision: bf16|fp16` with FSDP gathers parameters and reduces gradients in
    that dtype (state.py:1014-1015, dataclasses.py:2131-2143) and upcasts the trainable parameters to
    fp32 (FSDP2 fsdp_utils.py:815-820, FSDP1 accelerator.py:1998-2038). Autocast wraps the forward in
    `prepare_model` (accelerator.py:1824-1835), which FSDP1, DDP and one GPU go through and FSDP2 does
    not (accelerator.py:1553-1554, `_prepare_fsdp2`). A plan of 16-bit weights computing in their own
    dtype writes `no`."""
    c = job.compute_dtype.value
    w = job.base_weight_dtype.value
    fsdp = job.sharding.startswith("fsdp")
    v2 = fsdp and job.fsdp_version == 2
    amp = "no autocast (accelerate prepares FSDP2 without prepare_model's autocast)" if v2 else \
        f"forward under {c} autocast"
    if job.fsdp_policy:
        cls = "MixedPrecisionPolicy" if job.fsdp_version == 2 else "MixedPrecision"
        param = {"bf16": "bfloat16", "fp16": "float16"}[c]
        return c, (
            f"# precision: the estimate assumes fp32 weights under an explicit {cls}(param_dtype=torch.{param}, "
            f"reduce_dtype=torch.float32) with no autocast, which an accelerate YAML cannot say: this file writes "
            f"accelerate's form (mixed_precision: {c} = param and reduce dtype {c}, {amp}). For the estimated run "
            f"set mixed_precision: no and pass FullyShardedDataParallelPlugin(mixed_precision_policy={cls}(...)) "
            f"to Accelerator in your script\n")
    if fsdp and job.mixed_precision:
        return c, (f"# precision: accelerate's FSDP mixed precision, as the estimate assumes: fp32 sharded weights, "
                   f"gathered and reduced in {c}, {amp}\n")
    if fsdp and c == "fp32":
        return "no", f"# precision: {w} weights computing in fp32 (mixed_precision: no)\n"
    if fsdp:
        note = ""
        if job.autocast:
            note = (f"; the estimate runs the forward under {c} autocast: wrap it in accelerator.autocast() in your "
                    f"script (mixed_precision: {c} here would also upcast the trainable parameters to fp32)")
        return "no", (f"# precision: {w} weights computing in {c} (mixed_precision: no: {c} would upcast the "
                      f"trainable parameters to fp32); load the model in {w}{note}\n")
    if job.runs_autocast:
        return c, f"# precision: {w} weights, forward under {c} autocast (accelerate mixed_precision: {c})\n"
    return "no", (f"# precision: {w} weights computing in {c}, no autocast (mixed_precision: no); load the model "
                  f"in {w}\n")


def _fsdp_config(job: Job, arch: ModelArch) -> tuple[dict, dict]:
    """fsdp_config (and parallelism_config) with the keys of the job's fsdp_version, as accelerate 1.15
    reads them (docs/accelerate.md)."""
    s = job.sharding
    fsdp: dict = {
        "fsdp_activation_checkpointing": job.checkpointing,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": job.cpu_offload,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_transformer_layer_cls_to_wrap": arch.decoder_layer,
        "fsdp_version": job.fsdp_version,
    }
    parallelism: dict = {}
    if job.fsdp_version == 1:
        strategy = {"fsdp_full": "FULL_SHARD", "fsdp_grad_op": "SHARD_GRAD_OP", "fsdp_hybrid": "HYBRID_SHARD"}[s]
        if s == "fsdp_hybrid" and job.num_gpus > job.gpus_per_node and job.num_gpus % job.gpus_per_node:
            raise MemplanInputError(
                f"fsdp_hybrid over {job.num_gpus} GPUs with {job.gpus_per_node} per node: HYBRID_SHARD shards within "
                f"whole nodes, so the GPU count must be a multiple of {job.gpus_per_node}")
        fsdp.update({
            # launch exports fsdp_sharding_strategy (default FULL_SHARD) and FSDP1 shards by it
            # (accelerator.py:1947); `accelerate config` writes the same name under fsdp_reshard_after_forward
            "fsdp_sharding_strategy": strategy,
            "fsdp_reshard_after_forward": strategy,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_sync_module_states": True,
            "fsdp_use_orig_params": True,
        })
    else:
        fsdp["fsdp_reshard_after_forward"] = s != "fsdp_grad_op"
        if s == "fsdp_hybrid":
            shard = min(job.num_gpus, job.gpus_per_node)
            if job.num_gpus % shard:
                raise MemplanInputError(
                    f"fsdp_hybrid over {job.num_gpus} GPUs with {job.gpus_per_node} per node: "
                    f"dp_replicate_size x dp_shard_size must be {job.num_gpus}, and {shard} does not divide it")
            # HSDP in accelerate 1.15: a 2-D (dp_replicate, dp_shard) mesh (parallelism_config.py:61-66),
            # keys as `accelerate config` writes them (commands/config/cluster.py:521-549)
            parallelism = {
                "parallelism_config_cp_size": 1,
                "parallelism_config_dp_replicate_size": job.num_gpus // shard,
                "parallelism_config_dp_shard_size": shard,
                "parallelism_config_tp_size": 1,
            }
    return dict(sorted(fsdp.items())), parallelism


DS_CONFIG_FILE = "ds_config.json"


def _plugin_holds(job: Job) -> bool:
    """Whether accelerate's DeepSpeed plugin keys can say everything the estimate assumed: the plugin
    writes the stage and the offload devices only (accelerate utils/dataclasses.py `DeepSpeedPlugin`),
    so every other knob must be DeepSpeed's default, with offload pinned (offload_config.py default)."""
    from .zero import ZeroConfig

    stage = int(job.sharding[-1])
    cfg = (job.deepspeed or ZeroConfig()).resolved(stage, job.cpu_offload)
    plain = ZeroConfig().resolved(stage, job.cpu_offload)
    if job.optimizer == "adamw" and not job.foreach:  # DeepSpeed's own optimizer: needs an `optimizer` section
        return False
    return cfg.model_copy(update={"offload_optimizer_device": None, "offload_param_device": None}) == \
        plain.model_copy(update={"offload_optimizer_device": None, "offload_param_device": None})


def deepspeed_config(job: Job, grad_accum: int) -> dict:
    """The DeepSpeed config (JSON) whose values the estimate used (planner/zero.py): the ZeRO knobs,
    bf16/fp16 mode, the micro-batch; an `optimizer` section (DeepSpeed's FusedAdam, or its CPU Adam
    under offload) when the job says foreach=False, as the --from DeepSpeed reader maps it back."""
    from .zero import ZeroConfig

    stage = int(job.sharding[-1])
    c = job.compute_dtype.value
    out: dict = {
        "train_micro_batch_size_per_gpu": job.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "bf16": {"enabled": c == "bf16"},
        "fp16": {"enabled": c == "fp16"},
        "zero_optimization": (job.deepspeed or ZeroConfig()).zero_optimization(stage, job.cpu_offload),
    }
    if job.optimizer == "adamw" and not job.foreach:
        out["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}}
    return out


def _deepspeed_section(job: Job, grad_accum: int, cfg: dict, config_file: str | None) -> str:
    """accelerate's DeepSpeed keys for the plan (inline plugin keys when they can hold every value the
    estimate assumed, else `deepspeed_config_file`), and the YAML comment saying what was assumed."""
    import json

    s = job.sharding
    stage = int(s[-1])
    zo = deepspeed_config(job, grad_accum)["zero_optimization"]
    if config_file is None and _plugin_holds(job):
        cfg["deepspeed_config"] = {
            "gradient_accumulation_steps": grad_accum,
            "offload_optimizer_device": zo["offload_optimizer"]["device"],
            "offload_param_device": zo.get("offload_param", {}).get("device", "none"),
            "zero3_init_flag": stage == 3,
            "zero_stage": stage,
        }
        where = "accelerate writes only the stage and offload devices; DeepSpeed's defaults give the rest"
    else:
        cfg["deepspeed_config"] = {"deepspeed_config_file": config_file or DS_CONFIG_FILE, "zero3_init_flag": stage == 3}
        where = (f"write memplan.emit.deepspeed_config(job, {grad_accum}) as {config_file or DS_CONFIG_FILE} beside this "
                 "file (accelerate_files does)")
    return (f"# DeepSpeed values the estimate assumed (DeepSpeed 0.19.8 runtime/zero/config.py; {where}):\n"
            f"#   zero_optimization: {json.dumps(zo, separators=(', ', ': '))}\n")


def accelerate_files(job: Job, arch: ModelArch, grad_accum: int, yaml_name: str = "accelerate_config.yaml") -> dict[str, str]:
    """The files `--emit accelerate` writes: the YAML, and for a ZeRO plan whose knobs accelerate's
    plugin keys cannot hold, the DeepSpeed JSON it names (file name -> text)."""
    import json

    if job.sharding in ("zero1", "zero2", "zero3") and not _plugin_holds(job):
        return {yaml_name: accelerate_config(job, arch, grad_accum, DS_CONFIG_FILE),
                DS_CONFIG_FILE: json.dumps(deepspeed_config(job, grad_accum), indent=2) + "\n"}
    return {yaml_name: accelerate_config(job, arch, grad_accum)}


def accelerate_config(job: Job, arch: ModelArch, grad_accum: int, deepspeed_config_file: str | None = None) -> str:
    """YAML for `accelerate launch --config_file`. A ZeRO plan names `deepspeed_config_file` when given
    one (or when its knobs need one: see `accelerate_files`)."""
    s = job.sharding
    ds_comment = ""
    if s in ("zero1", "zero2", "zero3"):
        mixed = "no" if job.compute_dtype.value == "fp32" else job.compute_dtype.value
        precision = ""
    else:
        mixed, precision = _precision(job)
    cfg: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": mixed,
        "num_machines": max(1, -(-job.num_gpus // job.gpus_per_node)),
        "num_processes": job.num_gpus,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if job.num_gpus == 1 and s == "none":
        cfg["distributed_type"] = "NO"
    elif s in ("none", "ddp"):
        cfg["distributed_type"] = "MULTI_GPU"
    elif s in ("zero1", "zero2", "zero3"):
        cfg["distributed_type"] = "DEEPSPEED"
        ds_comment = _deepspeed_section(job, grad_accum, cfg, deepspeed_config_file)
    else:
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"], parallelism = _fsdp_config(job, arch)
        if parallelism:
            cfg["parallelism_config"] = parallelism
    header = (
        f"# memplan plan: {arch.name} {job.method}, {job.num_gpus} GPU(s), {s}, micro-batch {job.micro_batch}, "
        f"gradient accumulation {grad_accum}, checkpointing {'on' if job.checkpointing else 'off'}\n"
        f"# run: accelerate launch --config_file <this file> your_train.py "
        f"(per-device batch {job.micro_batch}, gradient_accumulation_steps {grad_accum})\n"
    )
    if cfg["distributed_type"] == "FSDP":
        header += f"# FSDP{job.fsdp_version} ({'fully_shard' if job.fsdp_version == 2 else 'FullyShardedDataParallel'})" \
                  f", one unit per {arch.decoder_layer}\n"
    header += precision
    if cfg["distributed_type"] == "FSDP" and job.fsdp_version == 1 and job.uses_lora \
            and job.lora_dtype is not job.base_weight_dtype and job.base_weight_dtype.is_float:
        header += (f"# FSDP1 flattens each unit's tensors into one flat parameter of one dtype (torch "
                   f"fsdp/_flat_param.py:812-816): under accelerate's TRANSFORMER_BASED_WRAP alone (your own loop) "
                   f"{job.base_weight_dtype.value} base weights with {job.lora_dtype.value} adapters in one layer do "
                   f"not wrap (adapters in {job.base_weight_dtype.value}, or fsdp_version 2); HF Trainer wraps each "
                   f"LoRA leaf as its own unit (transformers distributed/fsdp.py:267-279, peft "
                   f"utils/other.py:1271-1308), so they do\n")
    if cfg["num_machines"] > 1:
        header += "# multi-node: on each node set machine_rank (0..num_machines-1) and main_process_ip/port\n"
    return header + ds_comment + _yaml(dict(sorted(cfg.items()))) + "\n"


def vllm_serve_command(job, arch, safety_margin: float) -> str:
    """The `vllm serve` command line an inference plan assumes (vLLM 0.33 engine arguments,
    vllm/engine/arg_utils.py): the model, the tensor-parallel size, the context it must hold and the
    sequences it decodes together, the memory share it may take (the card less the margin kept)."""
    parts = ["vllm serve", arch.name, f"--tensor-parallel-size {job.num_gpus}",
             f"--max-model-len {job.seq_len + job.new_tokens}", f"--max-num-seqs {job.micro_batch}",
             f"--gpu-memory-utilization {job.gpu_memory_utilization or (0.92 if job.engine == 'vllm' else 1 - safety_margin):.2f}",
             f"--dtype {'bfloat16' if job.compute_dtype.value == 'bf16' else 'float16' if job.compute_dtype.value == 'fp16' else 'float32'}"]
    if job.kv_cache_dtype == "fp8":
        parts.append("--kv-cache-dtype fp8")
    return " ".join(parts)
