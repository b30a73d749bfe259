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


def accelerate_config(job: Job, arch: ModelArch, grad_accum: int) -> str:
    """YAML for `accelerate launch --config_file`."""
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
        cfg["deepspeed_config"] = {
            "gradient_accumulation_steps": grad_accum,
            "offload_optimizer_device": "cpu" if job.cpu_offload else "none",
            "offload_param_device": "cpu" if job.cpu_offload and s == "zero3" else "none",
            "zero3_init_flag": s == "zero3",
            "zero_stage": int(s[-1]),
        }
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
    return header + _yaml(dict(sorted(cfg.items()))) + "\n"
