"""FSDP per rank by hand (planner/fsdp.py, docs/fsdp.md): the arithmetic is written out here from
the torch and bitsandbytes sources, not taken from the model. The traces hold the rest
(tests/test_fsdp_trace.py)."""

import math

import pytest

from memplan import Job, estimate, estimate_memory
from memplan.errors import MemplanInputError
from memplan.profiles import load_model

MIB = 2**20


def _r(n: int) -> int:
    """The caching allocator's 512-byte blocks."""
    return -(-n // 512) * 512


def _phase(est, name):
    return next(p.allocated_bytes for p in est.phases if p.name == name)


# Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, vocab 32000, untied; bf16; 8 ranks.
# FSDP2 keeps ceil(dim0 / 8) rows of every parameter (_fsdp_param.py `_init_sharded_param`).
Q = 512 * 4096 * 2  # q, k, v, o: 4096 rows -> 512
GATE = 1376 * 4096 * 2  # gate, up: 11008 rows -> 1376
DOWN = 512 * 11008 * 2  # down: 4096 rows -> 512
NORM = 512 * 2
LAYER = 4 * Q + 2 * GATE + DOWN + 2 * NORM
VOCAB = 4000 * 4096 * 2  # embedding and lm_head: 32000 rows -> 4000
SHARD_7B = 32 * LAYER + 2 * VOCAB + NORM


def test_fsdp2_sharded_state_of_llama_2_7b_by_hand():
    est = estimate("llama-2-7b", num_gpus=8, sharding="fsdp_full")
    assert LAYER == 50_595_840 and SHARD_7B == 1_684_603_904
    assert est.component("weights").bytes == SHARD_7B
    assert est.component("optimizer states").bytes == 2 * SHARD_7B  # AdamW: zeros_like each local shard
    # the step: shards, sharded gradients, states, foreach sqrt temporary, rotary buffers, two cuBLAS workspaces
    assert _phase(est, "optimizer step") == 5 * SHARD_7B + 512 + 2 * 32 * MIB
    # one decoder layer unsharded (8 x its shard, per parameter) and its flat all-gather buffer (the same sum)
    assert est.component("gathered parameters").bytes == 8 * LAYER
    assert est.component("all-gather buffers").bytes == 2 * 8 * LAYER  # two at the last layer's copy-out
    assert est.component("reduce-scatter buffers").bytes == 8 * LAYER  # the layer before's, bf16


def test_fsdp2_pads_dim0_to_the_world_size():
    """Over 3 ranks: 4096 rows -> 1366 (4098 gathered), 11008 -> 3670 (11010), 32000 -> 10667."""
    est = estimate("llama-2-7b", num_gpus=3, sharding="fsdp_full")
    layer = 4 * _r(1366 * 4096 * 2) + 2 * _r(3670 * 4096 * 2) + _r(1366 * 11008 * 2) + 2 * _r(1366 * 2)
    assert est.component("weights").bytes == 32 * layer + 2 * _r(10667 * 4096 * 2) + _r(1366 * 2)
    # each unsharded parameter is its own all-gather output, 3 x its padded shard (`init_all_gather_outputs`)
    gathered = 4 * _r(3 * 1366 * 4096 * 2) + 2 * _r(3 * 3670 * 4096 * 2) + _r(3 * 1366 * 11008 * 2) + 2 * _r(3 * 1366 * 2)
    assert est.component("gathered parameters").bytes == gathered


def test_fused_experts_pad_to_the_world_size():
    """A fused 8-expert stack over 16 ranks: one expert per rank, 16 gathered (twice the real size)."""
    arch = load_model("mixtral-8x7b")
    e8 = estimate_memory(Job(model="mixtral-8x7b", num_gpus=8, sharding="fsdp_full"), arch)
    e16 = estimate_memory(Job(model="mixtral-8x7b", num_gpus=16, sharding="fsdp_full"), arch)
    experts = 8 * (4096 * 2 * 14336 + 14336 * 4096) * 2  # gate_up and down, bf16
    grow = e16.component("gathered parameters").bytes - e8.component("gathered parameters").bytes
    assert experts <= grow < experts * 1.01


def test_fsdp1_flat_shard_by_hand():
    """FSDP1: one flat parameter per unit, each parameter at a 16-byte boundary, padded to the world
    size (_flat_param.py `_get_aligned_numel`, `_init_flat_param_and_metadata`)."""
    est = estimate("llama-2-7b", num_gpus=8, sharding="fsdp_full", fsdp_version=1)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # every size a multiple of 8 bf16 elements
    root = 2 * 32000 * 4096 + 4096
    assert est.component("weights").bytes == 32 * _r(layer // 8 * 2) + _r(root // 8 * 2)
    # forward: the root and one layer unsharded; backward: BACKWARD_PRE adds the next layer
    assert est.component("gathered parameters").bytes == root * 2 + 2 * layer * 2


def test_fsdp_mixed_precision_by_hand():
    """fp32 weights with accelerate's bf16 mixed precision: fp32 shards and AdamW states, layers
    gathered in bf16, no autocast weight copies (FSDP2: no autocast at all)."""
    job = Job(model="llama-2-7b", num_gpus=8, sharding="fsdp_full", weight_dtype="fp32")
    est = estimate_memory(job, load_model("llama-2-7b"))
    assert job.fsdp_mp and not job.runs_autocast
    assert est.component("weights").bytes == 2 * SHARD_7B
    assert est.component("optimizer states").bytes == 4 * SHARD_7B
    assert est.component("gathered parameters").bytes == 8 * LAYER
    assert "autocast weight copies" not in {c.name for c in est.components}
    policy = estimate("llama-2-7b", num_gpus=8, sharding="fsdp_full", weight_dtype="fp32", fsdp_mixed_precision="policy")
    # the policy reduces in fp32: the kept reduce-scatter input is twice the bf16 one
    assert policy.component("reduce-scatter buffers").bytes == 2 * 8 * LAYER
    fsdp1 = Job(model="llama-2-7b", num_gpus=8, sharding="fsdp_full", weight_dtype="fp32", fsdp_version=1)
    assert fsdp1.runs_autocast  # accelerate's prepare_model wraps FSDP1's forward in autocast


def test_lora_over_fp32_weights_on_8_gpus_adds_no_unsharded_copies():
    """Before FSDP's own mixed precision, a 70B LoRA job over fp32 weights on 8 GPUs counted the
    autocast copies of every matmul weight unsharded: 128 GiB per GPU. Gathered in bf16 there are none."""
    arch = load_model("llama-2-70b")
    job = Job(model="llama-2-70b", method="lora", num_gpus=8, sharding="fsdp_full", weight_dtype="fp32",
              gradient_checkpointing=True)
    est = estimate_memory(job, arch)
    assert est.bytes_of("autocast weight copies") == 0
    assert est.component("weights").bytes < 70e9 * 4 / 8 * 1.01
    assert est.peak_allocated_bytes < 45 * 2**30


def test_sharded_qlora_by_hand():
    """QLoRA under FSDP as TRL runs it: bnb_4bit_quant_storage=bf16 (the packed 4-bit data is a flat
    (n/4, 1) bf16 tensor, sharded by rows), no fp32 upcast, bf16 adapters, the quantization
    statistics whole on every rank (QuantState, not parameters). Llama-2-7B, 8 ranks, double quant."""
    est = estimate("llama-2-7b", method="qlora", num_gpus=8, sharding="fsdp_full")
    assert est.job.lora_dtype.value == "bf16" and not est.job.kbit_upcast

    def packed_shard(rows, cols):
        return _r(math.ceil(rows * cols // 4 / 8) * 2)

    def stats(rows, cols):  # absmax uint8 per 64, fp32 per 256 absmax blocks, offset, two code tables
        blocks = math.ceil(rows * cols / 64)
        return blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4

    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    layer = sum(packed_shard(*s) for s in shapes) + 2 * NORM
    want = 32 * layer + 2 * VOCAB + NORM + 32 * sum(stats(*s) for s in shapes)
    assert est.component("weights").bytes == want
    # default targets q, v: lora_A 16 x 4096 (16 rows -> 2 per rank), lora_B 4096 x 16 (512 rows), bf16
    assert est.component("adapters").bytes == 32 * 2 * (_r(2 * 4096 * 2) + _r(512 * 16 * 2))


def test_cpu_offload_moves_the_shards_to_host():
    """CPUOffloadPolicy: shards, sharded gradients and AdamW states in host RAM; the GPU keeps what it
    gathers and the buffers (FSDP2 `_fsdp_param.py` pin_memory, `foreach_reduce` .to("cpu"))."""
    on = estimate("llama-2-7b", num_gpus=8, sharding="fsdp_full")
    off = estimate("llama-2-7b", num_gpus=8, sharding="fsdp_full", cpu_offload=True)
    assert off.bytes_of("weights") == off.bytes_of("optimizer states") == off.bytes_of("gradients") == 0
    assert off.host_bytes == SHARD_7B + SHARD_7B + 2 * SHARD_7B  # weights, gradients, states
    assert off.component("gathered parameters").bytes == on.component("gathered parameters").bytes
    assert _phase(off, "optimizer step") == 512 + 2 * 32 * MIB


def test_hsdp_keeps_reduce_dtype_outputs_until_the_end():
    """FSDP2 over a (replicate, shard) mesh with bf16 reduction of fp32 parameters: each layer's
    all-reduced bf16 output stays in `_all_reduce_state` until finalize_backward."""
    hsdp = estimate("llama-2-7b", num_gpus=16, gpus_per_node=8, sharding="fsdp_hybrid", weight_dtype="fp32")
    full = estimate("llama-2-7b", num_gpus=8, sharding="fsdp_full", weight_dtype="fp32")
    assert hsdp.component("weights").bytes == full.component("weights").bytes
    assert hsdp.component("reduce-scatter buffers").bytes > full.component("reduce-scatter buffers").bytes
    same = estimate("llama-2-7b", num_gpus=16, gpus_per_node=8, sharding="fsdp_hybrid")  # bf16: no copy
    assert same.peak_allocated_bytes == estimate("llama-2-7b", num_gpus=8, sharding="fsdp_full").peak_allocated_bytes


@pytest.mark.parametrize("fields, words", [
    (dict(fsdp_version=1), "applies to FSDP sharding"),
    (dict(sharding="zero3", num_gpus=8, fsdp_version=1), "not to --sharding zero3"),
    (dict(sharding="fsdp_full", num_gpus=8, fsdp_mixed_precision="policy"), "over fp32 weights"),
    (dict(sharding="fsdp_full", num_gpus=8, weight_dtype="fp32", autocast=True), "not read under FSDP"),
])
def test_fsdp_options_refused_where_they_are_not_read(fields, words):
    with pytest.raises(MemplanInputError, match=words):
        Job(model="llama-2-7b", **fields)
