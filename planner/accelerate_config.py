"""An `accelerate launch` config (the YAML `accelerate config` writes, or memplan's emitted one) read
back into Job fields: pure, a dict in, Job fields out (the file read is planner/config_files.py).

What a key means is what accelerate 1.15 runs with it, not what its name suggests. `accelerate launch`
copies every `fsdp_config` key onto its argparse namespace (accelerate/commands/launch.py:1265-1279,
adding the `fsdp_` prefix a key lacks), turns the namespace into `FSDP_*` / `PARALLELISM_CONFIG_*`
environment variables (accelerate/utils/launch.py:304-333, 403-425), and the training process builds
`FullyShardedDataParallelPlugin()` and `ParallelismConfig()` from those (accelerate/utils/dataclasses.py
:1823-2028, accelerate/parallelism_config.py:274-289). Defaults are launch's argparse defaults
(commands/launch.py:513-610), not the plugin's. docs/accelerate.md has the table with line numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .architecture import ModelArch
from .errors import MemplanInputError

# accelerate/commands/config/config_args.py:75-217 (BaseConfig + ClusterConfig fields); `fp16` and
# `dynamo_backend` are older names `process_config` converts (config_args.py:113-118). Any other key
# makes `ClusterConfig.from_yaml_file` raise (config_args.py:154-158).
CLUSTER_KEYS = frozenset({
    "compute_environment", "distributed_type", "mixed_precision", "use_cpu", "debug", "num_processes",
    "machine_rank", "num_machines", "gpu_ids", "main_process_ip", "main_process_port", "rdzv_backend",
    "same_network", "main_training_function", "enable_cpu_affinity", "fp8_config", "deepspeed_config",
    "fsdp_config", "parallelism_config", "megatron_lm_config", "mpirun_config", "downcast_bf16", "tpu_name",
    "tpu_zone", "tpu_use_cluster", "tpu_use_sudo", "command_file", "commands", "tpu_vm", "tpu_env",
    "dynamo_config", "fp16", "dynamo_backend",
})
# the `fsdp_config` keys `accelerate launch` has an option for (commands/launch.py:513-610), plus
# `fsdp_ignored_modules` (read with getattr, utils/launch.py:332)
FSDP_KEYS = frozenset({
    "fsdp_version", "fsdp_offload_params", "fsdp_min_num_params", "fsdp_sharding_strategy",
    "fsdp_reshard_after_forward", "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_backward_prefetch", "fsdp_state_dict_type", "fsdp_forward_prefetch", "fsdp_use_orig_params",
    "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states", "fsdp_activation_checkpointing",
    "fsdp_activation_checkpointing_offload", "fsdp_ignored_modules",
})
# what `accelerate config` writes under parallelism_config (commands/config/cluster.py:521-556); launch
# copies these keys as they are (no prefix added), so `dp_shard_size` without it would set nothing
PARALLELISM_KEYS = frozenset({
    "parallelism_config_dp_replicate_size", "parallelism_config_dp_shard_size", "parallelism_config_tp_size",
    "parallelism_config_cp_size", "parallelism_config_cp_backend", "parallelism_config_cp_comm_strategy",
    "parallelism_config_sp_size", "parallelism_config_sp_backend", "parallelism_config_sp_seq_length",
    "parallelism_config_sp_seq_length_is_variable", "parallelism_config_sp_attn_implementation",
})
# commands/config/cluster.py:213-375 (what `accelerate config` writes under deepspeed_config)
DEEPSPEED_KEYS = frozenset({
    "deepspeed_config_file", "deepspeed_exclusion_filter", "deepspeed_hostfile", "deepspeed_inclusion_filter",
    "deepspeed_moe_layer_cls_names", "deepspeed_multinode_launcher", "gradient_accumulation_steps",
    "gradient_clipping", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
    "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "zero_stage",
})

# accelerate/utils/constants.py:38-42
FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
AUTO_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
STATE_DICT_TYPES = ("FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT")
FSDP2_STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
# memplan's FSDP1 strategies (planner/parallel.py); NO_SHARD and HYBRID_SHARD_ZERO2 are not modeled
FSDP1_SHARDING = {"FULL_SHARD": "fsdp_full", "SHARD_GRAD_OP": "fsdp_grad_op", "HYBRID_SHARD": "fsdp_hybrid"}
# accelerate/utils/environment.py:59-71 str_to_bool
_TRUE = ("y", "yes", "t", "true", "on", "1")
_FALSE = ("n", "no", "f", "false", "off", "0")
# accelerate's PrecisionType less fp8 (utils/dataclasses.py:773-786)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DISTRIBUTED_TYPES = ("FSDP", "MULTI_GPU", "NO", "DEEPSPEED")

TRACE_REFUSAL = "no fake-tensor trace for DeepSpeed/DDP: its estimate is held by the hand-derived tests"


@dataclass
class AccelerateRead:
    """Job fields read from an accelerate config, and notes on what they rest on."""

    fields: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _err(msg: str) -> MemplanInputError:
    return MemplanInputError(f"accelerate config: {msg}")


def _bool(where: str, v: Any) -> bool:
    """A boolean as accelerate reads it: YAML's, or a string str_to_bool takes."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (str, int)) and str(v).lower() in _TRUE + _FALSE:
        return str(v).lower() in _TRUE
    raise _err(f"{where} {v!r} is not a boolean: allowed true or false")


def _int(where: str, v: Any, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip().isdigit() or int(v) < low:
        raise _err(f"{where} {v!r} is not an integer of at least {low}")
    return int(v)


def _choice(where: str, v: Any, allowed: tuple[str, ...]) -> str:
    """One of accelerate's upper-case names (it upper-cases the value, dataclasses.py:1848, 1870, 1912)."""
    if isinstance(v, str) and v.upper() in allowed:
        return v.upper()
    raise _err(f"{where} {v!r}: allowed {', '.join(allowed)}")


def _fsdp1_strategy(where: str, v: Any) -> str:
    """FSDP1's strategy as accelerate reads it: a name, or ShardingStrategy's number 1-5 (dataclasses.py:1847-1853)."""
    if isinstance(v, bool):
        raise _err(f"{where} {v!r} is FSDP2's form (a boolean): fsdp_version 1 takes a strategy name, "
                   f"allowed {', '.join(FSDP1_SHARDING)} (or set fsdp_version: 2)")
    if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
        if 1 <= int(v) <= len(FSDP1_STRATEGIES):
            v = FSDP1_STRATEGIES[int(v) - 1]
    name = _choice(where, v, FSDP1_STRATEGIES)
    if name not in FSDP1_SHARDING:
        raise _err(f"{where} {name}: memplan models {', '.join(FSDP1_SHARDING)} (not NO_SHARD or HYBRID_SHARD_ZERO2)")
    return name


def _unknown(table: str, cfg: dict, known: frozenset[str], why: str) -> None:
    for key in cfg:
        if key not in known:
            raise _err(f"{table}{key!r} is not a key accelerate 1.15 reads ({why}): allowed {', '.join(sorted(known))}")


def read_accelerate_config(cfg: Any, arch: ModelArch, for_trace: bool, method: str | None = None) -> AccelerateRead:
    """The Job fields an accelerate config sets: sharding, fsdp_version, num_gpus, gpus_per_node,
    cpu_offload, compute_dtype and autocast (its mixed_precision), gradient_checkpointing (FSDP activation
    checkpointing), and for `method="full"` under FSDP mixed precision weight_dtype fp32 (accelerate
    upcasts the trainable parameters). `for_trace`: a config the CPU trace cannot follow (DeepSpeed,
    DDP, one process without FSDP) is refused."""
    if not isinstance(cfg, dict):
        raise _err(f"must be a mapping of keys, got {type(cfg).__name__}")
    _unknown("", cfg, CLUSTER_KEYS, "ClusterConfig refuses it, config_args.py:154-158")
    env = cfg.get("compute_environment", "LOCAL_MACHINE")
    if env != "LOCAL_MACHINE":
        raise _err(f"compute_environment {env!r}: allowed LOCAL_MACHINE (memplan reads cluster configs, not SageMaker)")
    if "distributed_type" not in cfg:
        raise _err("distributed_type is missing (accelerate refuses a config without it): "
                   f"allowed {', '.join(DISTRIBUTED_TYPES)}")
    kind = cfg["distributed_type"]
    if kind not in DISTRIBUTED_TYPES:
        raise _err(f"distributed_type {kind!r}: memplan reads {', '.join(DISTRIBUTED_TYPES)}")
    if for_trace and kind != "FSDP":
        raise _err(f"distributed_type {kind}: {TRACE_REFUSAL}")
    if cfg.get("use_cpu") not in (None, False):
        if _bool("use_cpu", cfg["use_cpu"]):
            raise _err("use_cpu true trains on the CPU: memplan plans GPU memory (set use_cpu: false)")
    for table in ("fsdp_config", "parallelism_config", "deepspeed_config"):
        sub = cfg.get(table)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise _err(f"{table} must be a mapping of keys, got {type(sub).__name__}")
        owner = {"fsdp_config": "FSDP", "parallelism_config": "FSDP", "deepspeed_config": "DEEPSPEED"}[table]
        if sub and kind != owner:
            raise _err(f"{table} is read with distributed_type {owner} only, not {kind}: drop it")

    notes: list[str] = []
    fields: dict[str, Any] = {}
    mixed = _mixed_precision(cfg)

    if kind == "NO":
        n = _int("num_processes", cfg.get("num_processes", 1))
        if n != 1:
            raise _err(f"num_processes {n} with distributed_type NO: accelerate runs one process; "
                       "use MULTI_GPU, FSDP or DEEPSPEED for more")
        fields.update(num_gpus=1, sharding="none")
    else:
        if "num_processes" not in cfg:
            raise _err(f"num_processes is missing: accelerate launch refuses a {kind} config without it "
                       "(commands/launch.py:1305)")
        n = _int("num_processes", cfg["num_processes"])
        machines = _int("num_machines", cfg.get("num_machines", 1))
        if n % machines:
            raise _err(f"num_processes {n} over num_machines {machines}: launch starts num_processes // num_machines "
                       "per machine (utils/launch.py:217), so it must divide evenly")
        fields.update(num_gpus=n, gpus_per_node=n // machines)
        if kind == "MULTI_GPU":
            fields["sharding"] = "ddp"
        elif kind == "DEEPSPEED":
            fields.update(_deepspeed(cfg.get("deepspeed_config") or {}))
        else:
            fields.update(_fsdp(cfg, arch, n, machines, method, notes))

    if mixed == "no":
        notes.append("mixed_precision no: the model computes in the dtype the script loads it in "
                     "(give --weight-dtype / --compute-dtype)")
    elif kind == "DEEPSPEED":
        # DeepSpeed runs its own bf16/fp16 mode (state.py:959-960, 974-977): no autocast
        # (accelerator.py:565-594 enables native amp for every other distributed type)
        fields["compute_dtype"] = mixed
        notes.append(f"mixed_precision {mixed} with DeepSpeed: DeepSpeed's {mixed} mode (no autocast)")
    else:
        # with FSDP param_dtype = reduce_dtype = that dtype (state.py:1014-1015, dataclasses.py:2131-2143);
        # the forward under autocast where the model goes through prepare_model (accelerator.py:565-594,
        # 1824-1835): one GPU, DDP and FSDP1, not FSDP2 (accelerator.py:1553-1554, `_prepare_fsdp2`)
        fields["compute_dtype"] = mixed
        if kind == "FSDP" and fields.get("fsdp_version") == 2:
            notes.append(f"mixed_precision {mixed} with FSDP2: parameters gathered and reduced in {mixed}, "
                         "no autocast (accelerate prepares FSDP2 without prepare_model's autocast)")
        elif kind == "FSDP":
            # the Job derives FSDP1's autocast from its precision recipe (Job.runs_autocast)
            notes.append(f"mixed_precision {mixed} with FSDP1: parameters gathered and reduced in {mixed}, the "
                         "forward under autocast (prepare_model)")
        else:
            fields["autocast"] = True
        if kind == "FSDP" and method == "full":
            # accelerate upcasts every trainable parameter to fp32 under mixed precision:
            # FSDP2 fsdp_utils.py:815-820, FSDP1 accelerator.py:1998-2038
            fields["weight_dtype"] = "fp32"
        elif kind == "FSDP" and fields.get("fsdp_version") == 1 and method in ("lora", "qlora"):
            notes.append("FSDP1 under mixed precision upcasts each flat parameter holding a trainable tensor to fp32 "
                         "(accelerator.py:2037; a flat parameter requires grad if any of its tensors does, "
                         "torch fsdp/_flat_param.py:832): in your own loop a decoder layer's frozen base weights with "
                         "its adapters; HF Trainer wraps the LoRA leaves as their own units "
                         "(transformers distributed/fsdp.py:267-279), so there only the adapters")
    return AccelerateRead(fields=fields, notes=notes)


def accelerate_job_fields(cfg: Any, arch: ModelArch, for_trace: bool, method: str | None = None) -> dict:
    """The Job fields of `read_accelerate_config` (see there)."""
    return read_accelerate_config(cfg, arch, for_trace, method).fields


def _mixed_precision(cfg: dict) -> str:
    """accelerate's mixed_precision (absent: `fp16: true` of older files, else no: config_args.py:113-114,
    commands/launch.py:1287-1289)."""
    v = cfg.get("mixed_precision")
    if v is None:
        return "fp16" if cfg.get("fp16") and _bool("fp16", cfg["fp16"]) else "no"
    if isinstance(v, str) and v.lower() in MIXED_PRECISIONS:
        return v.lower()
    if v == "fp8":
        raise _err("mixed_precision 'fp8': memplan does not model fp8 training; allowed no, fp16, bf16")
    raise _err(f"mixed_precision {v!r}: allowed {', '.join(MIXED_PRECISIONS)}")


def _deepspeed(ds: dict) -> dict:
    _unknown("deepspeed_config.", ds, DEEPSPEED_KEYS, "commands/config/cluster.py writes these")
    if ds.get("deepspeed_config_file") not in (None, "", "none"):
        raise _err(f"deepspeed_config.deepspeed_config_file {ds['deepspeed_config_file']!r}: memplan reads the inline "
                   "zero_stage and offload keys only; read the DeepSpeed JSON with memplan estimate --from")
    if "zero_stage" not in ds:
        raise _err("deepspeed_config.zero_stage is missing: allowed 1, 2, 3")
    stage = ds["zero_stage"]
    if isinstance(stage, bool) or stage not in (1, 2, 3, "1", "2", "3"):
        raise _err(f"deepspeed_config.zero_stage {stage!r}: allowed 1, 2, 3")
    stage = int(stage)
    opt = ds.get("offload_optimizer_device", "none")
    param = ds.get("offload_param_device", "none")
    for key, v in (("offload_optimizer_device", opt), ("offload_param_device", param)):
        if v not in ("none", "cpu"):
            raise _err(f"deepspeed_config.{key} {v!r}: memplan models none and cpu (not nvme)")
    if stage < 3 and param != "none":
        raise _err(f"deepspeed_config.offload_param_device {param!r} with zero_stage {stage}: parameters are "
                   "partitioned (and offloaded) by stage 3 only; allowed none")
    if stage == 3 and opt != param:
        raise _err(f"deepspeed_config.offload_param_device {param!r} with offload_optimizer_device {opt!r}: "
                   "memplan's zero3 cpu offload moves both; set both to cpu or both to none")
    return {"sharding": f"zero{stage}", "cpu_offload": opt == "cpu"}


def _fsdp(cfg: dict, arch: ModelArch, n: int, machines: int, method: str | None, notes: list[str]) -> dict:
    raw = cfg.get("fsdp_config") or {}
    fc: dict[str, Any] = {}
    for key, v in raw.items():
        name = key if str(key).startswith("fsdp") else f"fsdp_{key}"  # commands/launch.py:1270-1271
        fc[name] = v
    _unknown("fsdp_config.", fc, FSDP_KEYS, "accelerate launch has no option for it")
    w = "fsdp_config."
    version = fc.get("fsdp_version", 1)  # launch's default (commands/launch.py:513-518)
    if isinstance(version, bool) or version not in (1, 2, "1", "2"):
        raise _err(f"{w}fsdp_version {version!r}: allowed 1, 2")
    version = int(version)
    out: dict[str, Any] = {"fsdp_version": version}

    # strategy
    reshard = fc.get("fsdp_reshard_after_forward")
    pc = cfg.get("parallelism_config") or {}
    if version == 1:
        if pc:
            raise _err("parallelism_config applies to fsdp_version 2 (commands/launch.py:1211): drop it, or set "
                       "fsdp_version: 2")
        # launch always exports FSDP_SHARDING_STRATEGY (default FULL_SHARD, commands/launch.py:534-537,
        # utils/launch.py:313); the plugin reads it first (dataclasses.py:1845-1853) and prepare_model uses
        # `sharding_strategy or reshard_after_forward` (accelerator.py:1947)
        strategy = _fsdp1_strategy(f"{w}fsdp_sharding_strategy", fc.get("fsdp_sharding_strategy", "FULL_SHARD"))
        if reshard is not None:
            r = _fsdp1_strategy(f"{w}fsdp_reshard_after_forward", reshard)
            if r != strategy:
                said = "fsdp_sharding_strategy " + strategy if "fsdp_sharding_strategy" in fc else \
                    "fsdp_sharding_strategy, absent: FULL_SHARD"
                raise _err(f"{w}fsdp_reshard_after_forward {r} is not what accelerate launch 1.15 runs with "
                           f"fsdp_version 1: it shards by {said} (accelerator.py:1947); set "
                           f"fsdp_sharding_strategy: {r}")
        out["sharding"] = FSDP1_SHARDING[strategy]
        if strategy == "HYBRID_SHARD":
            notes.append(f"HYBRID_SHARD shards within a node of torch.cuda.device_count() GPUs "
                         f"(torch fsdp/_init_utils.py:161); memplan takes {n // machines} (num_processes / num_machines)")
    else:
        if "fsdp_sharding_strategy" in fc:
            raise _err(f"{w}fsdp_sharding_strategy {fc['fsdp_sharding_strategy']!r} is FSDP1's key: with fsdp_version 2 "
                       "accelerate ignores it (dataclasses.py:1844); use fsdp_reshard_after_forward true (fsdp_full) "
                       "or false (fsdp_grad_op), and parallelism_config for hybrid sharding")
        if isinstance(reshard, str) and reshard.upper() in FSDP1_STRATEGIES:
            raise _err(f"{w}fsdp_reshard_after_forward {reshard!r} is FSDP1's form: fsdp_version 2 takes true or false "
                       "(dataclasses.py:1877)")
        keep_gathered = not _bool(f"{w}fsdp_reshard_after_forward", True if reshard is None else reshard)
        replicate, shard = _parallelism(pc, n)
        if replicate > 1:
            if keep_gathered:
                raise _err("fsdp_reshard_after_forward false with dp_replicate_size > 1 is HSDP without resharding "
                           "(FSDP1's HYBRID_SHARD_ZERO2), which memplan does not model: set it true")
            out.update(sharding="fsdp_hybrid", gpus_per_node=shard)
        else:
            out["sharding"] = "fsdp_grad_op" if keep_gathered else "fsdp_full"
            if pc:
                notes.append(f"parallelism_config dp_replicate_size 1: one shard group over all {n} ranks (fsdp_full)")
        for key in ("fsdp_backward_prefetch", "fsdp_use_orig_params", "fsdp_sync_module_states"):
            if key in fc:
                notes.append(f"{key} is FSDP1's: with fsdp_version 2 accelerate drops it (dataclasses.py:1903, 1940, 1946)")
        if "fsdp_forward_prefetch" in fc and _bool(f"{w}fsdp_forward_prefetch", fc["fsdp_forward_prefetch"]):
            raise _err(f"{w}fsdp_forward_prefetch true: FSDP2 has none (dataclasses.py:1955-1956): drop it")

    # offload
    out["cpu_offload"] = _bool(f"{w}fsdp_offload_params", fc.get("fsdp_offload_params", False))

    # auto wrap: one FSDP unit per decoder layer is what memplan models
    policy = fc.get("fsdp_auto_wrap_policy")
    if policy is None:
        raise _err(f"{w}fsdp_auto_wrap_policy is missing: accelerate then wraps nothing (NO_WRAP, dataclasses.py:1910) "
                   f"and gathers the whole model at once; memplan models TRANSFORMER_BASED_WRAP with "
                   f"fsdp_transformer_layer_cls_to_wrap: {arch.decoder_layer}")
    policy = _choice(f"{w}fsdp_auto_wrap_policy", policy, AUTO_WRAP_POLICIES)
    if policy != "TRANSFORMER_BASED_WRAP":
        raise _err(f"{w}fsdp_auto_wrap_policy {policy}: memplan models one FSDP unit per decoder layer, "
                   f"allowed TRANSFORMER_BASED_WRAP (with fsdp_transformer_layer_cls_to_wrap: {arch.decoder_layer})")
    cls = fc.get("fsdp_transformer_layer_cls_to_wrap")
    if cls is None:
        notes.append(f"no fsdp_transformer_layer_cls_to_wrap: accelerate wraps the model's _no_split_modules "
                     f"(dataclasses.py:2086-2090), taken to be {arch.decoder_layer}")
    else:
        if not isinstance(cls, str):
            raise _err(f"{w}fsdp_transformer_layer_cls_to_wrap {cls!r}: accelerate takes a comma-separated string "
                       f"(dataclasses.py:1925-1926), e.g. {arch.decoder_layer}")
        names = cls.split(",")
        if names != [arch.decoder_layer]:
            raise _err(f"{w}fsdp_transformer_layer_cls_to_wrap {cls!r} does not match {arch.name}'s decoder layer class "
                       f"{arch.decoder_layer!r}: memplan models one FSDP unit per decoder layer")

    if "fsdp_state_dict_type" in fc:
        allowed = STATE_DICT_TYPES if version == 1 else FSDP2_STATE_DICT_TYPES
        _choice(f"{w}fsdp_state_dict_type", fc["fsdp_state_dict_type"], allowed)
    if "fsdp_backward_prefetch" in fc and version == 1:
        bp = _choice(f"{w}fsdp_backward_prefetch", fc["fsdp_backward_prefetch"], BACKWARD_PREFETCH)
        if bp != "BACKWARD_PRE":
            notes.append(f"fsdp_backward_prefetch {bp}: memplan's FSDP1 estimate holds a prefetched second unit "
                         "(BACKWARD_PRE), an upper bound here")
    elif version == 1:
        notes.append("no fsdp_backward_prefetch: accelerate prefetches nothing (dataclasses.py:1893); memplan's FSDP1 "
                     "estimate holds a prefetched second unit (BACKWARD_PRE), an upper bound here")
    for key in ("fsdp_forward_prefetch", "fsdp_use_orig_params", "fsdp_cpu_ram_efficient_loading",
                "fsdp_sync_module_states", "fsdp_activation_checkpointing", "fsdp_activation_checkpointing_offload"):
        if key in fc:
            _bool(w + key, fc[key])
    # launch's defaults: cpu_ram_efficient_loading and sync_module_states true (commands/launch.py:584-597)
    if version == 1 and _bool("", fc.get("fsdp_cpu_ram_efficient_loading", True)) and \
            not _bool("", fc.get("fsdp_sync_module_states", True)):
        raise _err(f"{w}fsdp_cpu_ram_efficient_loading true needs fsdp_sync_module_states true "
                   "(accelerate launch refuses it, utils/launch.py:306-307)")
    if version == 1 and method in ("lora", "qlora") and not _bool("", fc.get("fsdp_use_orig_params", True)):
        raise _err(f"{w}fsdp_use_orig_params false: FSDP1 then flattens frozen and trainable parameters only with "
                   "uniform requires_grad (torch fsdp/_flat_param.py:819-823), which LoRA is not: set it true")
    if _bool("", fc.get("fsdp_activation_checkpointing_offload", False)):
        raise _err(f"{w}fsdp_activation_checkpointing_offload true: memplan does not model offloading the "
                   "checkpointed layers' inputs; drop it")
    if fc.get("fsdp_ignored_modules") not in (None, ""):
        raise _err(f"{w}fsdp_ignored_modules {fc['fsdp_ignored_modules']!r}: memplan shards every module; drop it")
    if _bool("", fc.get("fsdp_activation_checkpointing", False)):
        # checkpoint_wrapper around each wrapped layer, non-reentrant (accelerator.py:1972-1984 FSDP1;
        # FSDP2 fsdp_utils.py:713-722 with checkpoint_wrapper's default NO_REENTRANT, torch
        # distributed/algorithms/_checkpoint/checkpoint_wrapper.py:198)
        out.update(gradient_checkpointing=True, checkpoint_reentrant=False)
    return out


def _parallelism(pc: dict, n: int) -> tuple[int, int]:
    """(dp_replicate_size, dp_shard_size) of FSDP2's parallelism_config; (1, n) without one."""
    if not pc:
        return 1, n
    w = "parallelism_config."
    for key in pc:
        if key not in PARALLELISM_KEYS:
            hint = f" (accelerate launch reads parallelism_config_{key})" if f"parallelism_config_{key}" in PARALLELISM_KEYS else ""
            raise _err(f"{w}{key!r} is not a key accelerate 1.15 reads{hint}: allowed {', '.join(sorted(PARALLELISM_KEYS))}")
    size = {k: _int(w + k, pc.get(f"parallelism_config_{k}", 1)) for k in ("dp_replicate_size", "dp_shard_size",
                                                                          "tp_size", "cp_size", "sp_size")}
    for k in ("tp_size", "cp_size", "sp_size"):
        if size[k] != 1:
            raise _err(f"{w}parallelism_config_{k} {size[k]}: memplan models data parallelism only; allowed 1")
    r, s = size["dp_replicate_size"], size["dp_shard_size"]
    if r * s != n:
        raise _err(f"{w}parallelism_config_dp_replicate_size {r} x parallelism_config_dp_shard_size {s} = {r * s} is not "
                   f"num_processes {n} (accelerate refuses it, parallelism_config.py:372-377)")
    if s == 1 and n > 1:
        raise _err(f"{w}parallelism_config_dp_shard_size 1: FSDP then has no dimension to shard across "
                   "(parallelism_config.py:381-388); allowed a shard size above 1")
    return r, s
