"""Device memory outside torch's allocator (planner/device_memory.py), held to the committed GPU rows:
each row's pynvml device used minus its own measured peak reserved isolates what torch cannot see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.cli import _gpu_for
from memplan.device_memory import (
    HOPPER_INIT_CONTEXT,
    NCCL_CHANNELS,
    NCCL_CONNECTION,
    RING_PEERS,
    THREADS_PER_SM,
    TREE_PEERS,
    outside_torch,
    uses_cudnn_attention,
)
from memplan.estimate import estimate_memory
from memplan.job import Job
from memplan.profiles import gpu_profiles, load_gpu, load_model
from memplan.validate.results import read

RESULTS = Path(__file__).resolve().parent.parent / "validate" / "results"
ROWS = [row for path in sorted(RESULTS.glob("H*.jsonl")) for row in read(path)]
MiB = 1024**2
TOLERANCE = 2 * MiB  # the driver maps device memory in 2 MiB pages


def _gpu(row):
    return _gpu_for(row.environment["gpu"], load_gpu)


def _outside(row) -> int:
    return row.measured.device_used_bytes - row.measured.peak_reserved_bytes


def _paged(row) -> int:
    """Optimizer states the estimate places in unified memory for this row (estimate.py adds them)."""
    return estimate_memory(row.job, load_model(row.job.model), _gpu(row)).bytes_of("paged optimizer states")


def _id(row) -> str:
    j = row.job
    return (f"{row.environment['gpu'].split()[1]}-{j.model}-{j.method}-b{j.micro_batch}-s{j.seq_len}-{j.optimizer}"
            f"-{j.lora_targets}-ac{j.autocast}-{j.attention}")


UNPAGED = [row for row in ROWS if not _paged(row)]
PAGED = [row for row in ROWS if _paged(row)]


def test_rows_cover_both_kinds_of_attention():
    assert len(UNPAGED) >= 35 and len(PAGED) >= 5
    cudnn = [uses_cudnn_attention(r.job, load_model(r.job.model), _gpu(r)) for r in UNPAGED]
    assert 10 <= sum(cudnn) <= len(cudnn) - 10


@pytest.mark.parametrize("row", UNPAGED, ids=_id)
def test_terms_add_up_to_what_torch_cannot_see(row):
    terms = outside_torch(row.job, load_model(row.job.model), _gpu(row))
    assert all(t.measured for t in terms), [t.name for t in terms if not t.measured]
    assert abs(sum(t.bytes for t in terms) - _outside(row)) <= TOLERANCE, (
        f"{[(t.name, t.bytes / MiB) for t in terms]} vs {_outside(row) / MiB:.2f} MiB")


@pytest.mark.parametrize("row", PAGED, ids=_id)
def test_paged_rows_hold_the_terms_and_unified_memory_on_top(row):
    # unified memory comes on top of the terms (docs/device-memory.md: its residency does not follow
    # the paged bytes), so the terms are a lower bound here
    terms = outside_torch(row.job, load_model(row.job.model), _gpu(row))
    assert _outside(row) >= sum(t.bytes for t in terms) - TOLERANCE


def test_init_context_is_the_measured_one_on_both_hopper_cards():
    for row in ROWS:
        assert row.measured.cuda_context_bytes == HOPPER_INIT_CONTEXT
        init = outside_torch(row.job, load_model(row.job.model), _gpu(row))[0]
        assert init.name == "CUDA context at init" and init.bytes == HOPPER_INIT_CONTEXT and init.measured


def _probe_job(probe) -> Job:
    # the hidden states' dtype the probe fed SDPA: bf16 from a bf16 LoRA model; fp32 from QLoRA's
    # kbit upcast, with or without autocast
    if probe["dtype"] == "bf16":
        return Job(model=probe["model"], method="lora")
    return Job(model=probe["model"], method="qlora", autocast=probe["autocast"])


PROBES = [json.loads(line) for line in (RESULTS / "probes-H100-80GB-2026-11-24.jsonl").read_text().splitlines()]
SDPA_PROBES = [p for p in PROBES if p["check"] == "sdpa_kernel" and p["device"] == "cuda"]


@pytest.mark.parametrize("probe", SDPA_PROBES, ids=lambda p: f"{p['model']}-{p['dtype']}-ac{p['autocast']}")
def test_cudnn_attention_where_the_probes_saw_it(probe):
    job = _probe_job(probe)
    assert uses_cudnn_attention(job, load_model(job.model), load_gpu("H100-80GB")) is (probe["kernel"] == "cudnn")


def test_cudnn_attention_only_on_hopper():
    job = Job(model="llama-2-7b", method="lora")
    arch = load_model("llama-2-7b")
    assert uses_cudnn_attention(job, arch, load_gpu("H100-80GB"))
    assert not uses_cudnn_attention(job, arch, load_gpu("A100-80GB"))
    assert not uses_cudnn_attention(job.model_copy(update={"attention": "eager"}), arch, load_gpu("H100-80GB"))


@pytest.mark.parametrize("gpu", gpu_profiles(), ids=lambda g: g.name)
def test_every_profile_has_an_architecture_and_a_context(gpu):
    assert gpu.architecture != "unknown" and gpu.sm_count > 0 and gpu.sm_source
    terms = outside_torch(Job(model="llama-2-7b", method="lora"), load_model("llama-2-7b"), gpu)
    assert terms[0].bytes > 256 * MiB and "context" in terms[0].name
    if gpu.vendor == "nvidia":
        assert gpu.compute_capability in THREADS_PER_SM
        # only the cards a committed row ran on say measured
        assert all(t.measured is (gpu.name in ("H100-80GB", "H200")) for t in terms), [t.name for t in terms]
    else:
        assert len(terms) == 1 and not terms[0].measured


def test_context_grows_with_the_threads_the_card_holds():
    job, arch = Job(model="llama-2-7b", method="lora"), load_model("llama-2-7b")
    sxm, pcie = (outside_torch(job, arch, load_gpu(n))[0].bytes for n in ("H100-80GB", "H100-PCIe"))
    # 132 against 114 SMs, 2,048 resident threads each, 1 KiB stack per thread
    assert sxm - pcie == (132 - 114) * 2048 * 1024
    t4 = outside_torch(job, arch, load_gpu("T4"))[0].bytes
    assert sxm - t4 == 132 * 2048 * 1024 - 40 * 1024 * 1024


def _nccl(job: Job, gpu: str = "H100-80GB") -> list:
    return [t for t in outside_torch(job, load_model(job.model), load_gpu(gpu)) if "NCCL" in t.name or "RCCL" in t.name]


def test_single_gpu_has_no_nccl_term():
    assert _nccl(Job(model="llama-2-7b", method="lora")) == []
    assert _nccl(Job(model="llama-2-7b", task="infer", new_tokens=8)) == []


def test_nccl_term_follows_the_formula_as_gpus_grow():
    def total(n: int, sharding: str = "ddp") -> int:
        return sum(t.bytes for t in _nccl(Job(model="llama-2-7b", method="full", num_gpus=n, sharding=sharding)))

    ring = NCCL_CHANNELS * RING_PEERS * NCCL_CONNECTION
    # one node: the ring alone, the same buffers per GPU whatever the ring's length
    assert total(2) == total(8) == total(8, "fsdp_full") == ring
    # across nodes the tree connects too, and stays at its three peers as nodes are added
    tree = NCCL_CHANNELS * TREE_PEERS * NCCL_CONNECTION
    assert total(16) == total(64) == ring + tree
    assert total(2) < total(16)
    # HSDP over nodes: the world group plus its shard (one node) and replicate (across nodes) groups
    hybrid = _nccl(Job(model="llama-2-7b", method="full", num_gpus=16, sharding="fsdp_hybrid"))
    assert [t.bytes for t in hybrid] == [ring + tree, ring, ring + tree]
    assert not any(t.measured for t in hybrid)


def test_rocm_names_its_runtime_and_rccl():
    job = Job(model="llama-2-7b", method="full", num_gpus=8, sharding="ddp")
    terms = outside_torch(job, load_model(job.model), load_gpu("MI300X"))
    assert [t.name.split(" (")[0] for t in terms] == ["HIP runtime context", "RCCL buffers"]


def test_no_gpu_takes_the_default_context_whole():
    terms = outside_torch(Job(model="llama-2-7b", method="lora"), load_model("llama-2-7b"), None)
    assert len(terms) == 1 and terms[0].bytes == 512 * MiB and not terms[0].measured


def test_inference_is_not_measured():
    job = Job(model="llama-2-7b", task="infer", new_tokens=8)
    terms = outside_torch(job, load_model(job.model), load_gpu("H100-80GB"))
    assert terms[0].measured  # the init context is the task's alike
    assert not any(t.measured for t in terms[1:])


def test_every_term_name_is_a_known_one():
    from memplan.device_memory import TERM_NAMES

    jobs = [Job(model="llama-2-7b", method="lora"), Job(model="llama-2-7b", task="infer", new_tokens=8),
            Job(model="llama-2-7b", method="full", num_gpus=16, sharding="fsdp_hybrid")]
    gpus = [None, *gpu_profiles()]
    seen = {t.name for job in jobs for gpu in gpus for t in outside_torch(job, load_model(job.model), gpu)}
    assert seen <= set(TERM_NAMES)
    assert len(seen) >= 8


def test_generation_picks_its_kernel_without_gradients():
    # Falcon's SDPA runs the math kernel whatever the task (planner/attention.py); a bf16 Llama
    # generates through the fused kernel, cuDNN's on Hopper
    h100 = load_gpu("H100-80GB")
    assert uses_cudnn_attention(Job(model="llama-2-7b", task="infer", new_tokens=8), load_model("llama-2-7b"), h100)
    assert not uses_cudnn_attention(Job(model="falcon-7b", task="infer", new_tokens=8), load_model("falcon-7b"), h100)
