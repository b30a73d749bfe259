"""An `accelerate launch` config for a plan, so it runs on an existing distributed engine.

Keys follow accelerate's `ClusterConfig` (accelerate/commands/config/config_args.py) as
`accelerate config` writes them; DeepSpeed ZeRO plans use accelerate's DeepSpeed plugin keys."""

from __future__ import annotations

from .architecture import ModelArch
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
    ds_comment = ""
    mixed = "no" if job.compute_dtype.value == "fp32" else job.compute_dtype.value
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
    s = job.sharding
    if job.num_gpus == 1 and s == "none":
        cfg["distributed_type"] = "NO"
    elif s in ("none", "ddp"):
        cfg["distributed_type"] = "MULTI_GPU"
    elif s in ("zero1", "zero2", "zero3"):
        cfg["distributed_type"] = "DEEPSPEED"
        ds_comment = _deepspeed_section(job, grad_accum, cfg, deepspeed_config_file)
    else:
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_activation_checkpointing": job.checkpointing,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_forward_prefetch": False,
            "fsdp_offload_params": job.cpu_offload,
            "fsdp_sharding_strategy": {"fsdp_full": "FULL_SHARD", "fsdp_grad_op": "SHARD_GRAD_OP",
                                       "fsdp_hybrid": "HYBRID_SHARD"}[s],
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_sync_module_states": True,
            "fsdp_transformer_layer_cls_to_wrap": arch.decoder_layer,
            "fsdp_use_orig_params": True,
        }
    header = (
        f"# memplan plan: {arch.name} {job.method}, {job.num_gpus} GPU(s), {s}, micro-batch {job.micro_batch}, "
        f"gradient accumulation {grad_accum}, checkpointing {'on' if job.checkpointing else 'off'}\n"
        f"# run: accelerate launch --config_file <this file> your_train.py "
        f"(per-device batch {job.micro_batch}, gradient_accumulation_steps {grad_accum})\n"
    )
    if cfg["num_machines"] > 1:
        header += "# multi-node: on each node set machine_rank (0..num_machines-1) and main_process_ip/port\n"
    return header + ds_comment + _yaml(dict(sorted(cfg.items()))) + "\n"
