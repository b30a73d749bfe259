"""accelerate configs both ways: planner/emit.py writes the keys of the job's fsdp_version, accelerate's
own loader and launcher accept them and build the plugin the estimate assumes, and
planner/accelerate_config.py reads them back into the same Job fields; refusals and bad values in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memplan import Job, MemplanInputError, estimate_memory
from memplan.accelerate_config import (
    CLUSTER_KEYS, DEEPSPEED_KEYS, FSDP_KEYS, PARALLELISM_KEYS, TRACE_REFUSAL, accelerate_job_fields,
    read_accelerate_config,
)
from memplan.config_files import read_accelerate_file
from memplan.emit import accelerate_config
from memplan.profiles import load_gpu, load_model

MODEL = "mistral-7b"
ARCH = load_model(MODEL)
SHARDING_FIELDS = ("sharding", "fsdp_version", "num_gpus", "cpu_offload")

# every FSDP strategy emit writes (recommend enumerates fsdp_full: planner/recommend.py
# MULTI_GPU_SHARDINGS; estimate takes all three) x both versions, with and without offload and
# checkpointing, on one node and on more (hybrid: two and four nodes of 8)
CASES = [
    dict(sharding=s, fsdp_version=v, num_gpus=n * (2 if s == "fsdp_hybrid" else 1), cpu_offload=off,
         gradient_checkpointing=ck)
    for s in ("fsdp_full", "fsdp_grad_op", "fsdp_hybrid")
    for v in (1, 2)
    for n, off, ck in ((8, False, False), (16, s != "fsdp_grad_op", True))
]


def _job(**kw) -> Job:
    return Job(model=MODEL, method="full", micro_batch=2, **kw)


def _yaml(job: Job) -> dict:
    import yaml

    return yaml.safe_load(accelerate_config(job, ARCH, grad_accum=4))


def _id(case: dict) -> str:
    return f"{case['sharding']}-v{case['fsdp_version']}-n{case['num_gpus']}{'-offload' if case['cpu_offload'] else ''}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_emit_then_read_gives_the_same_job(case):
    job = _job(**case)
    fields = accelerate_job_fields(_yaml(job), ARCH, for_trace=True)
    for name in SHARDING_FIELDS:
        assert fields[name] == getattr(job, name), name
    assert fields["gpus_per_node"] == min(job.num_gpus, job.gpus_per_node)
    assert fields.get("gradient_checkpointing", False) == job.checkpointing
    back = Job(model=MODEL, method="full", micro_batch=2, **fields)
    gpu = load_gpu("H100-80GB")
    assert estimate_memory(back, ARCH, gpu).device_used_bytes == estimate_memory(job, ARCH, gpu).device_used_bytes


@pytest.mark.parametrize("n", [4, 8])
def test_hybrid_within_one_node_reads_back_as_its_estimate(n):
    """fsdp_hybrid over one node or less is one shard group (planner/parallel.py): FSDP2 writes
    dp_replicate_size 1, which reads back as fsdp_full with the same bytes."""
    job = _job(sharding="fsdp_hybrid", num_gpus=n)
    read = read_accelerate_config(_yaml(job), ARCH, for_trace=True)
    assert read.fields["sharding"] == "fsdp_full" and any("dp_replicate_size 1" in n for n in read.notes)
    gpu = load_gpu("H100-80GB")
    back = Job(model=MODEL, method="full", micro_batch=2, **read.fields)
    assert estimate_memory(back, ARCH, gpu).device_used_bytes == estimate_memory(job, ARCH, gpu).device_used_bytes


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("weights, compute, policy, mixed", [
    (None, "bf16", False, "no"),          # bf16 weights in bf16: no autocast, no upcast
    ("fp32", "bf16", False, "bf16"),      # accelerate's FSDP mixed precision
    ("fp32", "fp16", False, "fp16"),
    ("fp32", "bf16", True, "bf16"),       # policy: accelerate's form written, the comment says so
])
def test_mixed_precision_and_its_comment(weights, compute, policy, mixed, version):
    job = _job(sharding="fsdp_full", num_gpus=8, weight_dtype=weights, compute_dtype=compute, fsdp_version=version,
               fsdp_mixed_precision="policy" if policy else "accelerate")
    text = accelerate_config(job, ARCH, grad_accum=1)
    assert _yaml(job)["mixed_precision"] == mixed
    comment = [line for line in text.splitlines() if line.startswith("# precision:")]
    assert len(comment) == 1
    assert (("MixedPrecisionPolicy" if version == 2 else "MixedPrecision(") in comment[0]) == policy
    assert ("no autocast (accelerate prepares FSDP2" in comment[0]) == (version == 2 and mixed != "no")
    fields = accelerate_job_fields(_yaml(job), ARCH, for_trace=True, method="full")
    if mixed == "no":
        assert "compute_dtype" not in fields and "weight_dtype" not in fields
    else:
        # accelerate upcasts the trainable parameters to fp32 (fsdp_utils.py:815-820, accelerator.py:2037);
        # autocast only where the model goes through prepare_model: FSDP1, not FSDP2
        assert fields["compute_dtype"] == compute and fields["weight_dtype"] == "fp32"
        assert "autocast" not in fields  # the Job derives it from the recipe
        back = Job(model=MODEL, method="full", fsdp_version=version, sharding="fsdp_full", num_gpus=8,
                   **{k: v for k, v in fields.items() if k not in ("fsdp_version", "sharding", "num_gpus")})
        assert back.fsdp_mp and back.runs_autocast == (version == 1)


def test_fsdp1_lora_with_fp32_adapters_is_flagged():
    job = Job(model=MODEL, method="lora", sharding="fsdp_full", num_gpus=8, fsdp_version=1)
    assert "do not wrap" in accelerate_config(job, ARCH, grad_accum=1)
    job2 = Job(model=MODEL, method="lora", sharding="fsdp_full", num_gpus=8, fsdp_version=2)
    assert "do not wrap" not in accelerate_config(job2, ARCH, grad_accum=1)


def test_version_keys():
    """FSDP1 keys only under fsdp_version 1; FSDP2 gets a boolean reshard and none of FSDP1's keys."""
    v1 = _yaml(_job(sharding="fsdp_grad_op", num_gpus=8, fsdp_version=1))["fsdp_config"]
    v2 = _yaml(_job(sharding="fsdp_grad_op", num_gpus=8, fsdp_version=2))["fsdp_config"]
    assert v1["fsdp_sharding_strategy"] == v1["fsdp_reshard_after_forward"] == "SHARD_GRAD_OP"
    assert v2["fsdp_reshard_after_forward"] is False and v2["fsdp_version"] == 2
    fsdp1_only = {"fsdp_sharding_strategy", "fsdp_backward_prefetch", "fsdp_forward_prefetch", "fsdp_use_orig_params",
                  "fsdp_sync_module_states"}
    assert fsdp1_only <= set(v1) and not fsdp1_only & set(v2)
    assert set(v1) <= FSDP_KEYS and set(v2) <= FSDP_KEYS


# ---- accelerate's own loader and launcher --------------------------------------------------------

def _launch_env(path: str) -> dict:
    """What `accelerate launch --config_file path` puts in the training process's environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", path, "--main_process_port", "29517", "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_", "PARALLELISM_CONFIG_"))}


def _plugin(env: dict, monkeypatch):
    """FullyShardedDataParallelPlugin() and ParallelismConfig() as Accelerator builds them from that
    environment (accelerator.py:388-391, 459-460; state.py:1014-1015 for mixed precision)."""
    import torch
    import accelerate.utils.dataclasses as dc
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin

    for k in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_", "PARALLELISM_CONFIG_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # sync_module_states asks for the current CUDA device (dataclasses.py:1998-2019); there is none here
    monkeypatch.setattr(dc, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    if env["ACCELERATE_MIXED_PRECISION"] != "no":
        plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    pc = ParallelismConfig() if env.get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true" else None
    return plugin, pc


@pytest.mark.parametrize("case", [c for c in CASES if c["gradient_checkpointing"]] + [CASES[0]], ids=_id)
def test_accelerate_launch_builds_the_plugin_the_estimate_assumes(tmp_path, case, monkeypatch):
    pytest.importorskip("accelerate")
    import torch
    from accelerate.commands.config.config_args import load_config_from_file
    from torch.distributed.fsdp import CPUOffloadPolicy, ShardingStrategy

    job = _job(**case, weight_dtype="fp32", compute_dtype="bf16")
    path = tmp_path / "accelerate.yaml"
    path.write_text(accelerate_config(job, ARCH, grad_accum=4))
    cfg = load_config_from_file(str(path))  # raises on a key ClusterConfig does not have
    assert cfg.distributed_type.value == "FSDP" and cfg.num_processes == job.num_gpus
    plugin, pc = _plugin(_launch_env(str(path)), monkeypatch)
    assert plugin.fsdp_version == job.fsdp_version
    assert plugin.transformer_cls_names_to_wrap == [ARCH.decoder_layer]
    assert plugin.activation_checkpointing == job.checkpointing
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    if job.fsdp_version == 1:
        # FSDP1 shards by `sharding_strategy or reshard_after_forward` (accelerator.py:1947)
        want = {"fsdp_full": "FULL_SHARD", "fsdp_grad_op": "SHARD_GRAD_OP", "fsdp_hybrid": "HYBRID_SHARD"}
        assert (plugin.sharding_strategy or plugin.reshard_after_forward) == ShardingStrategy[want[job.sharding]]
        assert plugin.cpu_offload.offload_params == job.cpu_offload
        assert plugin.backward_prefetch.name == "BACKWARD_PRE" and plugin.use_orig_params
        assert pc is None
    else:
        assert plugin.reshard_after_forward is (job.sharding != "fsdp_grad_op")
        assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == job.cpu_offload
        assert plugin.backward_prefetch is None and plugin.use_orig_params is None
        if job.sharding == "fsdp_hybrid":
            assert (pc.dp_replicate_size, pc.dp_shard_size) == (job.num_gpus // 8, 8) and pc.dp_replicate_size > 1
            assert pc.fsdp_dim_names == ["dp_replicate", "dp_shard_cp"] and pc.total_size == job.num_gpus
        else:
            assert pc is None


def test_accelerate_config_fsdp1_reshard_alone_runs_full_shard(tmp_path, monkeypatch):
    """What `accelerate config` writes for FSDP1 (the strategy under fsdp_reshard_after_forward,
    cluster.py:408-414) runs FULL_SHARD under launch: launch always exports fsdp_sharding_strategy.
    memplan refuses the file rather than guess."""
    pytest.importorskip("accelerate")
    import yaml
    from torch.distributed.fsdp import ShardingStrategy

    cfg = _yaml(_job(sharding="fsdp_grad_op", num_gpus=8, fsdp_version=1))
    del cfg["fsdp_config"]["fsdp_sharding_strategy"]
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    plugin, _ = _plugin(_launch_env(str(path)), monkeypatch)
    assert (plugin.sharding_strategy or plugin.reshard_after_forward) == ShardingStrategy.FULL_SHARD
    with pytest.raises(MemplanInputError, match="set fsdp_sharding_strategy: SHARD_GRAD_OP") as exc:
        accelerate_job_fields(cfg, ARCH, for_trace=True)
    assert "\n" not in str(exc.value)


def test_key_lists_match_accelerate():
    """memplan's lists of keys are accelerate 1.15's: ClusterConfig's fields, launch's FSDP and
    parallelism options."""
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    assert CLUSTER_KEYS - {"fp16", "dynamo_backend"} == set(ClusterConfig.__dataclass_fields__)
    dests = {a.dest for a in launch_command_parser()._actions}
    assert FSDP_KEYS - {"fsdp_ignored_modules"} == {d for d in dests if d.startswith("fsdp_")}
    assert PARALLELISM_KEYS == {d for d in dests if d.startswith("parallelism_config_")}
    assert {"zero_stage", "offload_optimizer_device", "offload_param_device"} <= DEEPSPEED_KEYS


# ---- refusals and bad values, one line each -----------------------------------------------------

def _fsdp_cfg(**fsdp) -> dict:
    cfg = _yaml(_job(sharding="fsdp_full", num_gpus=8, fsdp_version=2))
    cfg["fsdp_config"].update(fsdp)
    return cfg


def _one_line(cfg: dict, words: str, for_trace: bool = True, method: str | None = None) -> None:
    with pytest.raises(MemplanInputError) as exc:
        accelerate_job_fields(cfg, ARCH, for_trace=for_trace, method=method)
    msg = str(exc.value)
    assert words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("sharding, n, kind", [("zero3", 8, "DEEPSPEED"), ("ddp", 8, "MULTI_GPU"), ("none", 1, "NO")])
def test_trace_refuses_deepspeed_ddp_and_single(sharding, n, kind):
    cfg = _yaml(_job(sharding=sharding, num_gpus=n))
    assert cfg["distributed_type"] == kind
    _one_line(cfg, f"distributed_type {kind}: {TRACE_REFUSAL}")


@pytest.mark.parametrize("sharding, n, off, want", [
    ("zero3", 8, True, {"sharding": "zero3", "cpu_offload": True, "num_gpus": 8}),
    ("zero2", 16, False, {"sharding": "zero2", "cpu_offload": False, "num_gpus": 16, "gpus_per_node": 8}),
    ("ddp", 4, False, {"sharding": "ddp", "num_gpus": 4}),
    ("none", 1, False, {"sharding": "none", "num_gpus": 1}),
])
def test_estimate_reads_deepspeed_ddp_and_single(sharding, n, off, want):
    cfg = _yaml(_job(sharding=sharding, num_gpus=n, cpu_offload=off))
    cfg["mixed_precision"] = "bf16"
    fields = accelerate_job_fields(cfg, ARCH, for_trace=False)
    assert {k: fields[k] for k in want} == want
    # accelerate autocasts unless DeepSpeed runs its own bf16 mode (accelerator.py:565-594)
    assert fields["compute_dtype"] == "bf16" and fields.get("autocast", False) == (not sharding.startswith("zero"))


@pytest.mark.parametrize("change, words", [
    (dict(fsdp_version=3), "fsdp_config.fsdp_version 3: allowed 1, 2"),
    (dict(fsdp_reshard_after_forward="FULL_SHARD"), "is FSDP1's form"),
    (dict(fsdp_reshard_after_forward="maybe"), "fsdp_config.fsdp_reshard_after_forward 'maybe' is not a boolean"),
    (dict(fsdp_sharding_strategy="SHARD_GRAD_OP"), "fsdp_sharding_strategy 'SHARD_GRAD_OP' is FSDP1's key"),
    (dict(fsdp_offload_params="sometimes"), "fsdp_config.fsdp_offload_params 'sometimes' is not a boolean"),
    (dict(fsdp_auto_wrap_policy="SIZE_BASED_WRAP"), "fsdp_auto_wrap_policy SIZE_BASED_WRAP: memplan models one"),
    (dict(fsdp_auto_wrap_policy="EVERYTHING"), "fsdp_auto_wrap_policy 'EVERYTHING': allowed TRANSFORMER_BASED_WRAP"),
    (dict(fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer"),
     "'LlamaDecoderLayer' does not match mistralai/Mistral-7B-v0.1's decoder layer class 'MistralDecoderLayer'"),
    (dict(fsdp_transformer_layer_cls_to_wrap=["MistralDecoderLayer"]), "comma-separated string"),
    (dict(fsdp_state_dict_type="LOCAL_STATE_DICT"), "fsdp_state_dict_type 'LOCAL_STATE_DICT': allowed SHARDED"),
    (dict(fsdp_forward_prefetch=True), "fsdp_forward_prefetch true: FSDP2 has none"),
    (dict(fsdp_activation_checkpointing_offload=True), "fsdp_activation_checkpointing_offload true"),
    (dict(fsdp_offload_param=True), "fsdp_config.'fsdp_offload_param' is not a key accelerate 1.15 reads"),
])
def test_bad_fsdp2_values(change, words):
    _one_line(_fsdp_cfg(**change), words)


@pytest.mark.parametrize("change, words", [
    (dict(fsdp_sharding_strategy="NO_SHARD"), "fsdp_sharding_strategy NO_SHARD: memplan models FULL_SHARD"),
    (dict(fsdp_sharding_strategy=True, fsdp_reshard_after_forward=True), "is FSDP2's form (a boolean)"),
    (dict(fsdp_sharding_strategy="SHARD_GRAD_OP"), "fsdp_reshard_after_forward FULL_SHARD is not what"),
    (dict(fsdp_backward_prefetch="SOMETIMES"), "fsdp_backward_prefetch 'SOMETIMES': allowed BACKWARD_PRE"),
    (dict(fsdp_sync_module_states=False), "fsdp_cpu_ram_efficient_loading true needs fsdp_sync_module_states"),
])
def test_bad_fsdp1_values(change, words):
    cfg = _yaml(_job(sharding="fsdp_full", num_gpus=8, fsdp_version=1))
    cfg["fsdp_config"].update(change)
    _one_line(cfg, words)


def test_fsdp1_lora_needs_orig_params():
    cfg = _yaml(_job(sharding="fsdp_full", num_gpus=8, fsdp_version=1))
    cfg["fsdp_config"]["fsdp_use_orig_params"] = False
    _one_line(cfg, "fsdp_use_orig_params false", method="lora")
    assert accelerate_job_fields(cfg, ARCH, for_trace=True, method="full")["sharding"] == "fsdp_full"


@pytest.mark.parametrize("change, words", [
    (dict(mixed_precision="fp8"), "mixed_precision 'fp8': memplan does not model fp8"),
    (dict(mixed_precision="half"), "mixed_precision 'half': allowed no, fp16, bf16"),
    (dict(num_processes=0), "num_processes 0 is not an integer of at least 1"),
    (dict(num_processes=None), "num_processes None"),
    (dict(num_processes=12, num_machines=8), "num_processes 12 over num_machines 8"),
    (dict(distributed_type="XLA"), "distributed_type 'XLA': memplan reads FSDP, MULTI_GPU, NO, DEEPSPEED"),
    (dict(compute_environment="AMAZON_SAGEMAKER"), "compute_environment 'AMAZON_SAGEMAKER': allowed LOCAL_MACHINE"),
    (dict(use_cpu=True), "use_cpu true"),
    (dict(gradient_accumulation_steps=4), "'gradient_accumulation_steps' is not a key accelerate 1.15 reads"),
    (dict(parallelism_config={"dp_shard_size": 8}), "(accelerate launch reads parallelism_config_dp_shard_size)"),
    (dict(parallelism_config={"parallelism_config_dp_replicate_size": 2, "parallelism_config_dp_shard_size": 8}),
     "= 16 is not num_processes 8"),
    (dict(parallelism_config={"parallelism_config_dp_replicate_size": 8, "parallelism_config_dp_shard_size": 1}),
     "parallelism_config_dp_shard_size 1"),
    (dict(parallelism_config={"parallelism_config_tp_size": 2, "parallelism_config_dp_shard_size": 4}),
     "parallelism_config_tp_size 2: memplan models data parallelism only"),
    (dict(deepspeed_config={"zero_stage": 3}), "deepspeed_config is read with distributed_type DEEPSPEED only"),
])
def test_bad_top_level_values(change, words):
    cfg = _fsdp_cfg()
    cfg.update(change)
    if cfg.get("num_processes", 0) is None:
        del cfg["num_processes"]
        words = "num_processes is missing"
    _one_line(cfg, words)


def test_missing_keys_read_as_accelerate_launch_does():
    """No fsdp_version: launch's default 1; no strategy: FULL_SHARD; no auto-wrap policy: NO_WRAP, refused."""
    cfg = {"distributed_type": "FSDP", "num_processes": 8,
           "fsdp_config": {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
    read = read_accelerate_config(cfg, ARCH, for_trace=True)
    assert read.fields["fsdp_version"] == 1 and read.fields["sharding"] == "fsdp_full"
    assert any("_no_split_modules" in n for n in read.notes) and any("prefetches nothing" in n for n in read.notes)
    _one_line({"distributed_type": "FSDP", "num_processes": 8, "fsdp_config": {"fsdp_version": 2}},
              "fsdp_auto_wrap_policy is missing")
    _one_line({"num_processes": 8}, "distributed_type is missing")


@pytest.mark.parametrize("change, words", [
    (dict(zero_stage=0), "deepspeed_config.zero_stage 0: allowed 1, 2, 3"),
    (dict(offload_optimizer_device="nvme"), "offload_optimizer_device 'nvme': memplan models none and cpu"),
    (dict(offload_param_device="none"), "memplan's zero3 cpu offload moves both"),
    (dict(deepspeed_config_file="ds.json"), "deepspeed_config_file 'ds.json'"),
])
def test_bad_deepspeed_values(change, words):
    cfg = _yaml(_job(sharding="zero3", num_gpus=8, cpu_offload=True))
    cfg["deepspeed_config"].update(change)
    _one_line(cfg, words, for_trace=False)


# ---- the file reader ----------------------------------------------------------------------------

def test_file_reader(tmp_path):
    job = _job(sharding="fsdp_hybrid", num_gpus=16, fsdp_version=2)
    path = tmp_path / "accelerate.yaml"
    path.write_text(accelerate_config(job, ARCH, grad_accum=4))
    assert read_accelerate_file(str(path), ARCH, for_trace=True).fields["sharding"] == "fsdp_hybrid"
    js = tmp_path / "accelerate.json"
    js.write_text(json.dumps(_yaml(job)))
    assert read_accelerate_file(str(js), ARCH, for_trace=True).fields["gpus_per_node"] == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: FSDP\nnum_processes: [\n")
    for p, words in ((bad, "accelerate config"), (tmp_path / "none.yaml", "does not exist")):
        with pytest.raises(MemplanInputError, match=words):
            read_accelerate_file(str(p), ARCH, for_trace=True)
    (tmp_path / "ds.yaml").write_text(accelerate_config(_job(sharding="zero2", num_gpus=8), ARCH, grad_accum=1))
    with pytest.raises(MemplanInputError) as exc:
        read_accelerate_file(str(tmp_path / "ds.yaml"), ARCH, for_trace=True)
    assert str(exc.value).startswith(f"accelerate config {str(tmp_path / 'ds.yaml')!r}: distributed_type DEEPSPEED")


# ---- memplan estimate --accelerate-config ------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "memplan.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_estimate_reads_the_file_and_options_override_it(tmp_path):
    job = _job(sharding="fsdp_hybrid", num_gpus=16, fsdp_version=1, weight_dtype="fp32", gradient_checkpointing=True)
    path = tmp_path / "accelerate.yaml"
    path.write_text(accelerate_config(job, ARCH, grad_accum=4))
    out = _cli("estimate", "-m", MODEL, "-b", "2", "--accelerate-config", str(path), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = estimate_memory(job, ARCH).device_used_bytes
    assert got["device_used_bytes"] == want
    assert got["accelerate_config"]["used"]["sharding"] == "fsdp_hybrid"
    over = _cli("estimate", "-m", MODEL, "-b", "2", "--accelerate-config", str(path), "--json", "--sharding", "ddp")
    assert over.returncode == 0, over.stderr
    assert json.loads(over.stdout)["accelerate_config"]["overridden"] == ["sharding"]
    assert json.loads(over.stdout)["device_used_bytes"] > want
    for args, words in (((str(path), "-m", "llama-2-7b"), "does not match"),
                        ((str(tmp_path / "none.yaml"), "-m", MODEL), "does not exist"),
                        ((str(path), "-m", MODEL, "--autocast"), "not read under FSDP")):
        bad = _cli("estimate", "--accelerate-config", *args)
        assert bad.returncode == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# ---- files written by accelerate's own ClusterConfig, read by memplan and by accelerate launch ---

@pytest.mark.parametrize("version, reshard, pc, want", [
    (1, "FULL_SHARD", {}, "fsdp_full"),
    (1, "HYBRID_SHARD", {}, None),  # HYBRID_SHARD under fsdp_reshard_after_forward alone: launch runs FULL_SHARD
    (2, True, {}, "fsdp_full"),
    (2, False, {}, "fsdp_grad_op"),
    (2, True, {"parallelism_config_dp_replicate_size": 2, "parallelism_config_dp_shard_size": 8,
               "parallelism_config_tp_size": 1, "parallelism_config_cp_size": 1}, "fsdp_hybrid"),
])
def test_accelerate_config_files_read_as_launch_runs_them(tmp_path, monkeypatch, version, reshard, pc, want):
    """A file as `accelerate config` writes it (cluster.py:400-510, saved by ClusterConfig.to_yaml_file):
    memplan reads the strategy accelerate launch builds, or refuses where the file does not run what it says."""
    pytest.importorskip("accelerate")
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from torch.distributed.fsdp import ShardingStrategy

    fsdp = {"fsdp_version": version, "fsdp_reshard_after_forward": reshard, "fsdp_offload_params": False,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_transformer_layer_cls_to_wrap": ARCH.decoder_layer,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": False}
    if version == 1:
        fsdp.update(fsdp_backward_prefetch="BACKWARD_PRE", fsdp_forward_prefetch=False, fsdp_use_orig_params=True,
                    fsdp_sync_module_states=True)
    n = 16 if pc else 8
    path = tmp_path / "default_config.yaml"
    ClusterConfig(compute_environment="LOCAL_MACHINE", distributed_type="FSDP", mixed_precision="bf16", use_cpu=False,
                  debug=False, num_processes=n, num_machines=n // 8, machine_rank=0, gpu_ids="all",
                  rdzv_backend="static", same_network=True, main_training_function="main", downcast_bf16="no",
                  fsdp_config=fsdp, parallelism_config=pc).to_yaml_file(str(path))
    cfg = yaml.safe_load(path.read_text())
    plugin, mesh = _plugin(_launch_env(str(path)), monkeypatch)
    if version == 1:
        runs = {ShardingStrategy.FULL_SHARD: "fsdp_full", ShardingStrategy.HYBRID_SHARD: "fsdp_hybrid"}[
            plugin.sharding_strategy or plugin.reshard_after_forward]
    else:
        runs = "fsdp_hybrid" if mesh is not None and mesh.dp_replicate_size > 1 else \
            "fsdp_full" if plugin.reshard_after_forward else "fsdp_grad_op"
    if want is None:
        assert runs == "fsdp_full"
        _one_line(cfg, "is not what accelerate launch 1.15 runs")
    else:
        assert runs == want
        assert accelerate_job_fields(cfg, ARCH, for_trace=True)["sharding"] == want


@pytest.mark.parametrize("version", [1, 2])
def test_emit_refuses_hybrid_over_part_of_a_node(version):
    job = _job(sharding="fsdp_hybrid", num_gpus=12, fsdp_version=version)
    with pytest.raises(MemplanInputError, match="fsdp_hybrid over 12 GPUs with 8 per node") as exc:
        accelerate_config(job, ARCH, grad_accum=1)
    assert "\n" not in str(exc.value)
