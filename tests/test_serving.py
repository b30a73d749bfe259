"""vLLM 0.33.0's KV-cache sizing (planner/serving.py), held to figures derived by hand from vLLM's source.

Every expected number is written as the arithmetic of vLLM's rule (docs/serving.md cites each one):
budget = ceil(total x utilization) - weights - non-torch growth - profile peak - CUDA-graph estimate,
num_blocks = budget // (layers in the widest group x page), page = 2 x block x kv heads x head dim x bytes.
No torch, no vllm: the file runs in a second."""

import math

import pytest

from memplan.errors import MemplanInputError
from memplan.profiles import load_gpu, load_model
from memplan.serving import (ServingConfig, batch_defaults, capture_sizes, concurrent_sequences,
                             estimate_serving, page_bytes)

MiB = 2**20
GiB = 2**30
H100 = load_gpu("H100-80GB").memory_bytes
# memplan's figure for what the first step loads outside torch (planner/device_memory.py STEP_LOADED,
# 224 MiB), passed explicitly as the non-torch growth after vLLM's snapshot
NON_TORCH = 224 * MiB

# Llama-3-8B (profiles/models/meta-llama--Meta-Llama-3-8B.json): hidden 4096, 32 layers, 32 heads,
# 8 KV heads x 128, intermediate 14336, vocab 128256, untied lm_head
H, L, HEADS, KVH, D, I, V = 4096, 32, 32, 8, 128, 14336, 128256
LLAMA3_8B_PARAMS = (V * H                                          # embed_tokens
                    + L * (H * HEADS * D + 2 * H * KVH * D + HEADS * D * H  # q, k, v, o
                           + 3 * H * I                              # gate, up, down
                           + 2 * H)                                 # two RMSNorms
                    + H                                             # final norm
                    + V * H)                                        # lm_head
WEIGHTS_BF16 = LLAMA3_8B_PARAMS * 2


@pytest.fixture(scope="module")
def llama():
    return load_model("llama-3-8b")


def _estimate(arch, kv_heads=KVH, weights=WEIGHTS_BF16, total=H100, gpu="H100-80GB", non_torch=NON_TORCH, **cfg):
    cfg = {"gpu_memory_utilization": 0.9, "max_model_len": 8192, "block_size": 16, **cfg}
    return estimate_serving(arch, ServingConfig.build(**cfg), total_bytes=total, weight_bytes=weights,
                            kv_heads_per_gpu=kv_heads, non_torch_bytes=non_torch, gpu_name=gpu)


def _llama_terms(tp=1, kvh=KVH, tokens=8192, reqs=1024):
    """The profile-run peak for Llama-3-8B, tensor by tensor (docs/serving.md)."""
    # the forward's MLP moment: hidden + residual [T, 4096], gate_up [T, 2 x 14336/tp], SiluAndMul [T, 14336/tp]
    mlp = tokens * (2 * H + 2 * I // tp + I // tp) * 2
    attention = tokens * (2 * H + (HEADS // tp * D + 2 * kvh * D) + HEADS // tp * D + H) * 2
    forward = max(mlp, attention)
    # the sampler: final hidden [T, 4096] and the sampled rows [R, 4096] still held, logits [R, 128256]
    # in bf16 (128256 is already a multiple of 64) and the sampler's fp32 copy [R, 128256]
    sampler = (tokens * H + reqs * H + reqs * V) * 2 + reqs * V * 4
    # CUDA graphs: 51 capture sizes (1, 2, 4, 8..248 by 8, 256..512 by 16), the 512-token forward + 1 MiB each
    graphs = 512 * (2 * H + 2 * I // tp + I // tp) * 2 + 50 * MiB
    return forward, sampler, graphs


@pytest.mark.parametrize("kv_dtype, kv_bytes", [("auto", 2), ("fp8", 1)])
def test_llama3_8b_h100_block_count_by_hand(llama, kv_dtype, kv_bytes):
    """The issue's criterion: Llama-3-8B on one H100-80GB, utilization 0.9, max-model-len 8192, block 16."""
    est = _estimate(llama, kv_cache_dtype=kv_dtype)
    assert LLAMA3_8B_PARAMS == 8_030_261_248
    forward, sampler, graphs = _llama_terms()
    assert forward == 8192 * 51200 * 2 == 838_860_800
    assert sampler == 863_502_336  # the sampler's moment is the larger here (1024 rows of a 128k vocab)
    requested = math.ceil(H100 * 0.9)
    budget = requested - WEIGHTS_BF16 - NON_TORCH - max(forward, sampler) - graphs
    page = 2 * 16 * 8 * 128 * kv_bytes  # K and V x block x kv heads x head dim x bytes
    per_block = page * 32  # one group of all 32 layers
    assert est.requested_bytes == requested == 76_968_728_986
    assert est.weights_bytes == WEIGHTS_BF16 and est.non_torch_bytes == NON_TORCH
    assert est.activation_peak_bytes == max(forward, sampler)
    assert est.cudagraph_bytes == est.cudagraph_applied_bytes == graphs
    assert est.kv_budget_bytes == budget == 59_704_965_530
    assert est.page_bytes_per_layer == page and est.bytes_per_block == per_block
    assert est.num_blocks == budget // per_block == {2: 28_469, 1: 56_939}[kv_bytes]
    # kv_cache_utils.py get_max_concurrency_for_kv_cache_config: num_blocks / cdiv(8192, 16)
    assert est.max_concurrency == est.num_blocks / 512
    assert est.kv_capacity_tokens == int(est.num_blocks / 512 * 8192) == est.num_blocks * 16
    assert est.fits and est.error is None
    assert est.concurrent_sequences(8192) == (est.num_blocks - 1) // 512
    assert est.concurrent_sequences(100) == 1024  # capped by max_num_seqs
    assert concurrent_sequences(est, 2000) == (est.num_blocks - 1) // 125


def test_fp8_halves_the_page(llama):
    bf16, fp8 = _estimate(llama), _estimate(llama, kv_cache_dtype="fp8")
    assert fp8.page_bytes_per_layer * 2 == bf16.page_bytes_per_layer
    assert fp8.kv_budget_bytes == bf16.kv_budget_bytes  # the cache dtype changes no other term
    assert fp8.num_blocks in (2 * bf16.num_blocks, 2 * bf16.num_blocks + 1)
    assert page_bytes(llama, 8, 16, 1) == 16 * 8 * 2 * 128


def test_defaults_follow_vllm_033(llama):
    cfg = ServingConfig()
    assert cfg.gpu_memory_utilization == 0.92 and cfg.block_size == 16 and cfg.kv_cache_dtype == "auto"
    # get_batch_defaults: >= 70 GiB and not an A100: serve 8192 tokens, LLM class 16384, 1024 sequences
    assert batch_defaults(H100, "NVIDIA H100 80GB HBM3", "server") == (8192, 1024)
    assert batch_defaults(H100, "NVIDIA H100 80GB HBM3", "llm") == (16384, 1024)
    a100 = load_gpu("A100-80GB").memory_bytes
    assert batch_defaults(a100, "NVIDIA A100-SXM4-80GB", "server") == (2048, 256)
    assert batch_defaults(200 * GiB, "NVIDIA B200", "server") == (16384, 1024)
    est = estimate_serving(llama, cfg, total_bytes=H100, weight_bytes=WEIGHTS_BF16, kv_heads_per_gpu=8,
                           non_torch_bytes=0, gpu_name="H100-80GB")
    r = est.config
    assert (r.max_model_len, r.max_num_batched_tokens, r.max_num_seqs) == (8192, 8192, 1024)
    assert r.max_in_flight_tokens == 2 * 8192  # async scheduling, V2 runner: pp + 1 batches in flight
    assert len(r.capture_sizes) == 3 + 31 + 17 and r.capture_sizes[-1] == 512
    assert est.requested_bytes == math.ceil(H100 * 0.92)


def test_capture_sizes_small_batches():
    # max_num_seqs 16: ceiling min(32, 512) = 32, uniform decode size 16 already on the grid
    assert capture_sizes(16, 2048) == (1, 2, 4, 8, 16, 24, 32)
    # max_num_batched_tokens 20 under the ceiling: appended
    assert capture_sizes(16, 20) == (1, 2, 4, 8, 16, 20)


def test_enforce_eager_and_env_flag(llama):
    eager = _estimate(llama, enforce_eager=True)
    assert eager.cudagraph_bytes == 0 and eager.config.capture_sizes == ()
    off = _estimate(llama, estimate_cudagraphs=False)  # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=0
    base = _estimate(llama)
    assert off.cudagraph_bytes == base.cudagraph_bytes and off.cudagraph_applied_bytes == 0
    assert off.kv_budget_bytes == base.kv_budget_bytes + base.cudagraph_bytes == eager.kv_budget_bytes


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_splits_kv_heads(llama, tp):
    kvh = 8 // tp
    weights = WEIGHTS_BF16 // tp  # the caller's per-rank figure; any int serves the arithmetic
    est = _estimate(llama, kv_heads=kvh, weights=weights, tensor_parallel_size=tp)
    forward, sampler, graphs = _llama_terms(tp=tp, kvh=kvh)
    assert est.forward_peak_bytes == forward == 8192 * (2 * H + 3 * I // tp) * 2
    assert est.sampler_peak_bytes == sampler  # logits are gathered to the full vocab on every rank
    budget = math.ceil(H100 * 0.9) - weights - NON_TORCH - max(forward, sampler) - graphs
    page = 2 * 16 * kvh * 128 * 2
    assert est.page_bytes_per_layer == page
    assert est.num_blocks == budget // (32 * page)


def test_mistral_sliding_window_one_group():
    arch = load_model("mistral-7b")  # sliding_window 4096 on every layer: one SlidingWindowSpec group
    est = _estimate(arch, weights=14 * GiB, max_model_len=32768, max_num_batched_tokens=2048)
    assert [(g.layers, g.sliding_window) for g in est.groups] == [(32, 4096)]
    # SlidingWindowSpec.max_admission_blocks_per_request: cdiv(min(4095 + 2 x 2048, 32768), 16) + 1
    assert est.groups[0].blocks_per_max_len_request == -(-(4095 + 2 * 2048) // 16) + 1 == 513
    assert est.bytes_per_block == 32 * 2 * 16 * 8 * 128 * 2
    assert est.max_concurrency == est.num_blocks / 513
    assert est.kv_capacity_tokens == int(est.num_blocks / 513 * 32768)
    # a 1000-token sequence holds cdiv(1000, 16) + 1 blocks
    assert est.concurrent_sequences(1000) == min((est.num_blocks - 1) // 64, est.config.max_num_seqs)


def test_gemma2_hybrid_groups():
    arch = load_model("gemma-2-9b")  # 42 layers alternating sliding (4096) and global
    est = _estimate(arch, weights=18 * GiB, kv_heads=8)
    # 21 sliding + 21 full: group size 21, one group each; a block id spans 21 layers' pages
    assert sorted((g.layers, g.sliding_window or 0) for g in est.groups) == [(21, 0), (21, 4096)]
    page = 2 * 16 * 8 * 256 * 2
    assert est.bytes_per_block == 21 * page
    # max_model_len 8192 (the model's), in-flight 2 x 8192: the window caps at the length, + 1 block
    full, sliding = 8192 // 16, 8192 // 16 + 1
    assert est.max_concurrency == est.num_blocks / (full + sliding)


def test_gemma3_padded_groups():
    arch = load_model("gemma-3-1b")  # 26 layers: 22 sliding (512) + 4 global, one KV head x 256
    est = _estimate(arch, weights=2 * GiB, kv_heads=1, max_model_len=8192)
    # group size 4 (22 >= 1.5 x 4): the sliding bucket splits into cdiv(22, 4) = 6 groups of layers[i::6]
    assert sorted(g.layers for g in est.groups if g.sliding_window) == [3, 3, 4, 4, 4, 4]
    assert [g.layers for g in est.groups if not g.sliding_window] == [4]
    assert est.bytes_per_block == 4 * 2 * 16 * 1 * 256 * 2
    sliding = -(-min(511 + 2 * 8192, 8192) // 16) + 1
    assert sum(g.blocks_per_max_len_request for g in est.groups) == 512 + 6 * sliding


def test_mla_latent_page():
    arch = load_model("deepseek-v2-lite")  # kv_lora_rank 512 + rope 64 = 576 per token, one "head"
    assert page_bytes(arch, 1, 16, 2) == 16 * 576 * 2
    est = _estimate(arch, kv_heads=1, weights=30 * GiB, max_model_len=8192)
    assert not est.activation_derived and est.notes


def test_budget_too_small_for_one_request(llama):
    forward, sampler, graphs = _llama_terms()
    requested = math.ceil(H100 * 0.9)
    # weights chosen so that 600 MiB are left for the cache
    weights = requested - NON_TORCH - max(forward, sampler) - graphs - 600 * MiB
    est = _estimate(llama, weights=weights)
    assert est.kv_budget_bytes == 600 * MiB and not est.fits
    # the check plans against 600 MiB less the null block (2 MiB) and needs 512 blocks x 2 MiB = 1 GiB;
    # the longest length that fits: 299 blocks x 16 tokens
    assert "max seq len (8192), (1.0 GiB KV cache is needed" in est.error
    assert f"available KV cache memory ({round(598 * MiB / GiB, 2)} GiB)" in est.error
    assert "estimated maximum model length is 4784." in est.error
    assert est.concurrent_sequences(100) == 0


def test_no_memory_left(llama):
    est = _estimate(llama, gpu_memory_utilization=0.2)  # 17.1 GB requested for 16.06 GB weights + the rest
    assert est.kv_budget_bytes < 0 and est.num_blocks == 0 and not est.fits
    assert est.error.startswith("No available memory for the cache blocks.")


def test_startup_free_memory_check(llama):
    est = estimate_serving(llama, ServingConfig.build(gpu_memory_utilization=0.99, max_model_len=8192),
                           total_bytes=H100, weight_bytes=WEIGHTS_BF16, kv_heads_per_gpu=8,
                           non_torch_bytes=NON_TORCH, gpu_name="H100-80GB", baseline_bytes=2 * GiB)
    assert not est.fits and "is less than desired GPU memory utilization (0.99" in est.error


@pytest.mark.parametrize("kwargs, message", [
    ({"gpu_memory_utilization": 0}, "gpu-memory-utilization must be in (0, 1], got 0"),
    ({"gpu_memory_utilization": 1.5}, "gpu-memory-utilization must be in (0, 1], got 1.5"),
    ({"block_size": 0}, "block-size must be a positive integer, got 0"),
    ({"max_num_seqs": -1}, "max-num-seqs must be a positive integer, got -1"),
    ({"kv_cache_dtype": "int8"}, "invalid kv-cache-dtype 'int8'"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(MemplanInputError) as err:
        ServingConfig.build(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor_parallel_size": 3}, "tensor-parallel-size 3 must divide the model's 32 attention heads"),
    ({"max_model_len": 100_000}, "max-model-len 100000 must be at most the model's max_position_embeddings (8192)"),
    ({"max_num_batched_tokens": 512, "max_num_seqs": 1024},
     "max-num-batched-tokens (512) must be greater than or equal to max-num-seqs (1024)"),
    ({"max_num_batched_tokens": 4096, "enable_chunked_prefill": False},
     "max-num-batched-tokens (4096) must be at least max-model-len (8192) without chunked prefill"),
])
def test_resolve_validation(llama, kwargs, message):
    with pytest.raises(MemplanInputError, match=None) as err:
        _estimate(llama, **kwargs)
    assert str(err.value) == message


def test_input_validation(llama):
    with pytest.raises(MemplanInputError, match="kv_heads_per_gpu must be an integer from 1 to 8, got 0"):
        _estimate(llama, kv_heads=0)
    with pytest.raises(MemplanInputError, match="weight_bytes must be a non-negative integer of bytes"):
        _estimate(llama, weights=-1)
    est = _estimate(llama)
    with pytest.raises(MemplanInputError, match=r"seq_len must be an integer from 1 to max-model-len \(8192\)"):
        est.concurrent_sequences(9000)
