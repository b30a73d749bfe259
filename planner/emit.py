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


def accelerate_config(job: Job, arch: ModelArch, grad_accum: int) -> str:
    """YAML for `accelerate launch --config_file`."""
    s = job.sharding
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
        cfg["deepspeed_config"] = {
            "gradient_accumulation_steps": grad_accum,
            "offload_optimizer_device": "cpu" if job.cpu_offload else "none",
            "offload_param_device": "cpu" if job.cpu_offload and s == "zero3" else "none",
            "zero3_init_flag": s == "zero3",
            "zero_stage": int(s[-1]),
        }
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
    return header + _yaml(dict(sorted(cfg.items()))) + "\n"
