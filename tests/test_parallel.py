"""Sharding: hand formulas for ZeRO-3, and per-GPU memory never growing with more GPUs."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan import Job, estimate, estimate_memory
from memplan.errors import MemplanInputError
from pydantic import ValidationError
from memplan.profiles import load_model

P7 = 6_738_415_616  # Llama-2-7B parameters


def _phase(est, name):
    return next(p.allocated_bytes for p in est.phases if p.name == name)


def test_zero3_optimizer_step_by_hand():
    # pure bf16, torch AdamW: weights 2P, gradients 2P, states 4P, foreach temporary 2P, each / 8,
    # plus the replicated rotary buffers (inv_freq and its original copy: 2 x 64 fp32 = 512 B)
    # and two 32 MiB cuBLAS workspaces (forward and autograd threads)
    est = estimate("llama-2-7b", method="full", num_gpus=8, sharding="zero3")
    by_hand = 3 * math.ceil(2 * P7 / 8) + math.ceil(4 * P7 / 8) + 512 + 2 * 32 * 2**20
    assert _phase(est, "optimizer step") == by_hand == 8_490_128_896


def test_zero3_gathered_units_by_hand():
    est = estimate("llama-2-7b", method="full", num_gpus=8, sharding="zero3")
    root = (32000 * 4096 * 2 + 4096) * 2  # embeddings, lm_head, final norm in bf16
    layer = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2
    assert est.component("gathered parameters").bytes == root + 2 * layer


@pytest.mark.parametrize(
    "sharding, divided",
    [("zero1", {"optimizer states"}), ("zero2", {"optimizer states", "gradients"}),
     ("fsdp_grad_op", {"optimizer states", "gradients"}), ("zero3", {"optimizer states", "gradients", "weights"})],
)
def test_what_each_stage_divides(sharding, divided):
    one = estimate("llama-2-7b", method="full")
    four = estimate("llama-2-7b", method="full", num_gpus=4, sharding=sharding)
    for name in ("optimizer states", "gradients", "weights"):
        expected = math.ceil(one.component(name).bytes / 4) if name in divided else one.component(name).bytes
        assert four.component(name).bytes == expected, name


def test_hybrid_shards_within_a_node():
    hybrid = estimate("llama-2-7b", method="full", num_gpus=32, sharding="fsdp_hybrid", gpus_per_node=8)
    full8 = estimate("llama-2-7b", method="full", num_gpus=8, sharding="fsdp_full")
    assert hybrid.peak_allocated_bytes == full8.peak_allocated_bytes


def test_offload_moves_state_to_host():
    on_gpu = estimate("llama-2-13b", method="full", num_gpus=4, sharding="zero3")
    off = estimate("llama-2-13b", method="full", num_gpus=4, sharding="zero3", cpu_offload=True)
    assert off.peak_allocated_bytes < on_gpu.peak_allocated_bytes
    assert off.component("optimizer states").bytes == 0
    n = 13_015_864_320
    assert off.host_bytes == math.ceil(2 * n / 4) + math.ceil(4 * n / 4) + math.ceil(2 * n / 4)


def test_ddp_replicas_hold_everything_plus_buckets():
    one = estimate("phi-2", method="full")
    ddp = estimate("phi-2", method="full", num_gpus=4, sharding="ddp")
    assert ddp.component("DDP gradient buckets").bytes == one.component("gradients").bytes


def test_qlora_with_fsdp_shards_the_quantized_base():
    one = estimate("llama-2-70b", method="qlora")
    fsdp = estimate("llama-2-70b", method="qlora", num_gpus=2, sharding="fsdp_full")
    assert fsdp.component("weights").bytes == math.ceil(one.component("weights").bytes / 2)
    assert fsdp.peak_allocated_bytes < one.peak_allocated_bytes


def test_bad_parallel_input():
    with pytest.raises((MemplanInputError, ValidationError), match="offload"):
        estimate("phi-2", cpu_offload=True)
    with pytest.raises((MemplanInputError, ValidationError), match="tensor or pipeline"):
        estimate("phi-2", task="infer", num_gpus=2)


SHARDED = ["zero1", "zero2", "zero3", "fsdp_full", "fsdp_grad_op", "fsdp_hybrid"]


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["llama-2-7b", "llama-3-8b", "gemma-7b", "falcon-7b", "mixtral-8x7b"]),
    st.sampled_from(["full", "lora", "qlora"]),
    st.sampled_from(SHARDED),
    st.integers(1, 32),
    st.integers(1, 32),
    st.booleans(),
)
def test_more_shards_never_need_more_per_gpu(model, method, sharding, n, extra, offload):
    arch = load_model(model)

    def peak(gpus):
        job = Job(model=model, method=method, sharding=sharding, num_gpus=gpus, seq_len=256,
                  cpu_offload=offload and sharding != "fsdp_grad_op")
        est = estimate_memory(job, arch)
        return est.peak_allocated_bytes, est.device_used_bytes

    assert peak(n + extra) <= peak(n)
