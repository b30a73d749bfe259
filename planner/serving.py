"""vLLM's KV-cache sizing at start-up, reproduced from the vllm 0.33.0 source (memplan issue 14, part C).

vLLM does not size its KV cache from a formula: at start-up each worker measures what the model holds
and what one dummy step allocates, then gives the rest of its share of the card to KV blocks. memplan
reproduces the same arithmetic with the measured terms replaced by figures it derives or is given:

    requested  = ceil(total x gpu_memory_utilization)                    v1/worker/utils.py request_memory
    non_kv     = weights + non-torch growth + activation peak            utils/mem_utils.py memory_profiling
    kv_budget  = requested - non_kv - CUDA-graph estimate                v1/worker/gpu_worker.py determine_available_memory
    num_blocks = kv_budget // bytes_per_block                            v1/core/kv_cache_planning.py get_kv_cache_config_from_groups

Every rule below names its vllm 0.33.0 file, function and line (paths relative to the wheel's `vllm/`).
docs/serving.md walks through them with a worked example. Pure: no torch, no vllm, no I/O.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .architecture import ModelArch
from .errors import MemplanInputError, input_error

VLLM_VERSION = "0.33.0"
GiB = 2**30

# --- defaults (vllm/config/*.py, vllm/engine/arg_utils.py) -------------------------------------------
# config/cache.py:215 CacheConfig.gpu_memory_utilization: Field(default=0.92, gt=0, le=1)
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# config/cache.py:185 CacheConfig.DEFAULT_BLOCK_SIZE = 16 (the FLASH_ATTN backend keeps it for head sizes
# other than 256/512: v1/attention/backends/flash_attn.py:372 get_preferred_block_size)
DEFAULT_BLOCK_SIZE = 16
# engine/arg_utils.py:2940 get_batch_defaults: (max_num_batched_tokens, max_num_seqs) per usage context
# ("llm": UsageContext.LLM_CLASS, offline `LLM(...)`; "server": OPENAI_API_SERVER, `vllm serve`), by the
# card's total memory in GiB (2**30) and name. TPU and CPU tables are left out (GPU planner).
_BATCH_DEFAULTS = {
    "large": {"llm": (16384, 1024), "server": (16384, 1024)},    # >= 160 GiB (B200/B300)
    "hopper": {"llm": (16384, 1024), "server": (8192, 1024)},    # >= 70 GiB, not A100, not GB10
    "other": {"llm": (8192, 256), "server": (2048, 256)},       # "TODO(woosuk): Tune ... other hardware"
}
# config/vllm.py:588 max_concurrent_batches: async scheduling (on by default, config/vllm.py:1719) with
# the V2 model runner (the default, config/vllm.py:731 use_v2_model_runner) keeps pp_size + 1 batches in
# flight; without async scheduling, pp_size. memplan plans pipeline size 1.
# config/cache.py: fp8 KV is stored as uint8 (utils/torch_utils.py:46 STR_DTYPE_TO_TORCH_DTYPE["fp8"]).
KV_ELEMENT_BYTES = {"fp8": 1}
MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# model_executor/layers/vocab_parallel_embedding.py:36 DEFAULT_VOCAB_PADDING_SIZE: lm_head rows are padded
# to a multiple of 64 (pad_vocab_size, :95), then split over the tensor-parallel ranks (:304).
VOCAB_PADDING = 64
# v1/worker/gpu/cudagraph_utils.py:918 _MIN_PER_GRAPH_BYTES: the floor vLLM's own extrapolation puts on
# each FULL graph after the first (_extrapolate_full_graph_memory).
MIN_PER_GRAPH_BYTES = 1 << 20
# config/vllm.py:2463 _set_cudagraph_sizes: the default capture ceiling (1024 on data-center Blackwell).
DEFAULT_MAX_CAPTURE_SIZE = 512


class ServingConfig(BaseModel):
    """What a `vllm serve` / `LLM(...)` command line sets, with vLLM 0.33's defaults where it sets nothing.

    None means "vLLM's default", which depends on the model (max_model_len) or the card (the batch limits)
    and is resolved by `resolve`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    block_size: int = DEFAULT_BLOCK_SIZE
    tensor_parallel_size: int = 1
    # --enforce-eager: no torch.compile, no CUDA graphs (config/vllm.py:2449 _set_cudagraph_sizes)
    enforce_eager: bool = False
    # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS (envs.py:2219, default 1): whether the CUDA-graph estimate
    # is taken off the KV budget (gpu_worker.py:720-724)
    estimate_cudagraphs: bool = True
    usage_context: Literal["server", "llm"] = "server"
    enable_chunked_prefill: bool = True
    async_scheduling: bool = True

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _utilization(cls, v: float) -> float:
        if not (0 < v <= 1):  # config/cache.py:215 Field(gt=0, le=1); NaN fails too
            raise ValueError(f"gpu-memory-utilization must be in (0, 1], got {v!r}")
        return v

    @field_validator("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size")
    @classmethod
    def _positive(cls, v: int | None, info) -> int | None:
        if v is not None and v < 1:  # config/scheduler.py:48,62 Field(ge=1); config/cache.py:187 gt=0
            raise ValueError(f"{info.field_name.replace('_', '-')} must be a positive integer, got {v!r}")
        return v

    @classmethod
    def build(cls, **kwargs) -> "ServingConfig":
        """Construct, turning pydantic's ValidationError into the one-line MemplanInputError."""
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            raise input_error(exc) from None


class ResolvedServing(BaseModel):
    """The configuration after vLLM's defaults and checks: every limit an int."""

    model_config = ConfigDict(frozen=True)

    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    tensor_parallel_size: int
    kv_element_bytes: int
    model_dtype_bytes: int
    cudagraphs: bool
    estimate_cudagraphs: bool
    max_in_flight_tokens: int
    capture_sizes: tuple[int, ...]


class KVGroup(BaseModel):
    """One KV-cache group (v1/core/kv_cache_planning.py:416 _get_kv_cache_groups_uniform_page_size)."""

    model_config = ConfigDict(frozen=True)

    layers: int
    sliding_window: int | None
    blocks_per_max_len_request: int


class ServingEstimate(BaseModel):
    """vLLM's start-up memory accounting for one GPU (tensor-parallel rank) of a serving job."""

    model_config = ConfigDict(frozen=True)

    config: ResolvedServing
    total_bytes: int
    requested_bytes: int  # ceil(total x utilization)
    weights_bytes: int
    activation_peak_bytes: int  # profile_run's transient peak (derived, not measured)
    forward_peak_bytes: int  # of which: the dummy forward at max_num_batched_tokens
    sampler_peak_bytes: int  # of which: the dummy sampler at min(max_num_batched_tokens, max_num_seqs)
    activation_derived: bool  # False: the architecture is not the Llama-like decoder the formula follows
    cudagraph_bytes: int  # approximated, not measured (vLLM measures it by capturing)
    cudagraph_applied_bytes: int  # what comes off the budget (0 when eager or the env flag is 0)
    non_torch_bytes: int
    kv_budget_bytes: int
    page_bytes_per_layer: int
    bytes_per_block: int  # one block id across the widest group's layers
    groups: tuple[KVGroup, ...]
    num_blocks: int
    kv_capacity_tokens: int  # vLLM's "GPU KV cache size: N tokens"
    max_concurrency: float  # vLLM's "Maximum concurrency for max_model_len tokens per request"
    fits: bool
    error: str | None  # vLLM's start-up ValueError, when it would raise one
    notes: tuple[str, ...]

    def concurrent_sequences(self, seq_len: int) -> int:
        """How many sequences of `seq_len` tokens the blocks hold at once, capped by max_num_seqs."""
        return concurrent_sequences(self, seq_len)


# --- configuration -----------------------------------------------------------------------------------

def batch_defaults(total_bytes: int, gpu_name: str, usage_context: str) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) as engine/arg_utils.py:2940 get_batch_defaults picks them:
    by `current_platform.get_device_total_memory()` against 160 and 70 GiB, and "a100" in the device name.
    (GB10, cc 12.1, stays on the small tier; memplan has no GB10 profile.)"""
    if total_bytes >= 160 * GiB:
        tier = "large"
    elif total_bytes >= 70 * GiB and "a100" not in gpu_name.lower():
        tier = "hopper"
    else:
        tier = "other"
    return _BATCH_DEFAULTS[tier][usage_context]


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> tuple[int, ...]:
    """The default CUDA-graph capture sizes (config/vllm.py:2398 _set_cudagraph_sizes, no speculative
    decoding: decode query length 1): [1, 2, 4] + 8..248 step 8 + 256..max step 16, the max being
    min(max_num_seqs x 2, 512) and then min(max_num_batched_tokens, that); max_num_batched_tokens is
    appended when it fits, and max_num_seqs as a uniform-decode size when <= the ceiling."""
    ceiling = min(max_num_seqs * 2, DEFAULT_MAX_CAPTURE_SIZE)
    uniform = [max_num_seqs] if max_num_seqs <= ceiling else []
    top = min(max_num_batched_tokens, ceiling)
    sizes = [i for i in (1, 2, 4) if i <= top]
    if top >= 8:
        sizes += list(range(8, min(top + 1, 256), 8))
    if top >= 256:
        sizes += list(range(256, top + 1, 16))
    if max_num_batched_tokens <= top and max_num_batched_tokens not in sizes:
        sizes.append(max_num_batched_tokens)
    sizes += [s for s in uniform if s <= max_num_batched_tokens]
    return tuple(sorted(set(sizes)))


def resolve(config: ServingConfig, arch: ModelArch, total_bytes: int, gpu_name: str = "") -> ResolvedServing:
    """vLLM's defaults and start-up checks applied to `config` for `arch` on a card of `total_bytes`."""
    tp = config.tensor_parallel_size
    if arch.heads % tp:
        # model_executor/models/llama.py LlamaAttention: num_heads // tp_size after `assert total % tp == 0`
        raise MemplanInputError(f"tensor-parallel-size {tp} must divide the model's {arch.heads} attention heads")
    # config/model.py: max_model_len defaults to the config's max_position_embeddings; a longer one is an
    # error unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is set (not modelled)
    max_model_len = config.max_model_len or arch.max_positions
    if max_model_len > arch.max_positions:
        raise MemplanInputError(f"max-model-len {max_model_len} must be at most the model's "
                                f"max_position_embeddings ({arch.max_positions})")
    default_tokens, default_seqs = batch_defaults(total_bytes, gpu_name, config.usage_context)
    max_num_seqs = config.max_num_seqs or default_seqs
    if config.max_num_batched_tokens is not None:
        tokens = config.max_num_batched_tokens
    else:
        # engine/arg_utils.py:3166-3224 _set_default_max_num_seqs_and_batched_tokens_args
        tokens = default_tokens
        if not config.enable_chunked_prefill:
            tokens = max(max_model_len, tokens)
        tokens = min(max_num_seqs * max_model_len, tokens)
    # config/scheduler.py:317 verify_max_model_len
    if tokens < max_model_len and not config.enable_chunked_prefill:
        raise MemplanInputError(f"max-num-batched-tokens ({tokens}) must be at least max-model-len ({max_model_len}) "
                                "without chunked prefill")
    if tokens < max_num_seqs:
        raise MemplanInputError(f"max-num-batched-tokens ({tokens}) must be greater than or equal to "
                                f"max-num-seqs ({max_num_seqs})")
    kv_bytes = KV_ELEMENT_BYTES.get(config.kv_cache_dtype, MODEL_DTYPE_BYTES[config.dtype])
    cudagraphs = not config.enforce_eager
    return ResolvedServing(
        gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=tokens, block_size=config.block_size,
        tensor_parallel_size=tp, kv_element_bytes=kv_bytes, model_dtype_bytes=MODEL_DTYPE_BYTES[config.dtype],
        cudagraphs=cudagraphs, estimate_cudagraphs=config.estimate_cudagraphs,
        max_in_flight_tokens=(2 if config.async_scheduling else 1) * tokens,
        capture_sizes=capture_sizes(max_num_seqs, tokens) if cudagraphs else ())


# --- KV pages and groups -----------------------------------------------------------------------------

def page_bytes(arch: ModelArch, kv_heads_per_gpu: int, block_size: int, kv_element_bytes: int) -> int:
    """One layer's page: `block_size` tokens of K and V.

    v1/kv_cache_interface.py:597 AttentionSpec.page_size_bytes = num_kv_heads x num_states (block_size)
    x (head_size + head_size_v) x dtype size (:590). MLA (:729 MLAAttentionSpec, head_size_v 0) caches one
    latent of kv_lora_rank + qk_rope_head_dim per token with num_kv_heads = 1 on every rank
    (model_executor/layers/attention/mla_attention.py:1371 get_kv_cache_spec, max_tp_shards=1)."""
    if arch.latent_cache_width is not None:
        return block_size * arch.latent_cache_width * kv_element_bytes
    return kv_heads_per_gpu * block_size * 2 * arch.head_dim * kv_element_bytes


def _blocks_per_request(window: int | None, seq_len: int, r: ResolvedServing) -> int:
    """Blocks one request of `seq_len` tokens holds in a group.
    Full attention: cdiv(len, block) (kv_cache_interface.py:643 FullAttentionSpec.max_memory_usage_bytes).
    Sliding window: cdiv(min(window - 1 + in-flight tokens, len), block) + 1 (:918
    SlidingWindowSpec.max_admission_blocks_per_request; in-flight = max_concurrent_batches x
    max_num_batched_tokens, config/vllm.py:601)."""
    if window is None:
        return -(-seq_len // r.block_size)
    tokens = min(window - 1 + r.max_in_flight_tokens, seq_len)
    return -(-tokens // r.block_size) + 1


def kv_groups(arch: ModelArch, r: ResolvedServing) -> tuple[tuple[KVGroup, ...], int]:
    """The KV-cache groups and the layers one block id spans in the widest of them.

    One spec for every layer (is_kv_cache_spec_uniform, kv_cache_planning.py:218): one group of all layers.
    Mixed full and sliding layers with one page size (the hybrid manager is on by default on GPUs,
    config/vllm.py:2292): buckets per attention type, group size = the smallest bucket (or the largest when
    it is under 1.5x the smallest), each bucket split into cdiv(n, group size) groups of layers[i::groups]
    (kv_cache_planning.py:480-556). A block id spans one page of each layer of its group; the pool's
    bytes per block are the widest group's (:574 _get_kv_cache_bytes_per_block)."""
    windows = [arch.window_of(i) if arch.latent_cache_width is None else None for i in range(arch.layers)]
    buckets: dict[int | None, int] = {}
    for w in windows:
        buckets[w] = buckets.get(w, 0) + 1
    if len(buckets) == 1:
        (w, n), = buckets.items()
        return (KVGroup(layers=n, sliding_window=w, blocks_per_max_len_request=_blocks_per_request(w, r.max_model_len, r)),), n
    smallest, largest = min(buckets.values()), max(buckets.values())
    size = largest if largest < smallest * 1.5 else smallest
    groups, widest = [], 0
    for w, n in buckets.items():
        count = -(-n // size)
        for i in range(count):
            members = len(range(i, n, count))  # layers[i::count]
            widest = max(widest, members)
            groups.append(KVGroup(layers=members, sliding_window=w,
                                  blocks_per_max_len_request=_blocks_per_request(w, r.max_model_len, r)))
    return tuple(groups), widest


# --- what profile_run allocates -------------------------------------------------------------------------

def forward_peak(arch: ModelArch, tokens: int, tp: int, kv_heads_per_gpu: int, e: int) -> int:
    """The dummy forward's transient peak over `tokens` tokens for a Llama-like decoder, as the eager module
    code holds its tensors (model_executor/models/llama.py, vllm 0.33.0):

    - between layers: `hidden_states` and `residual`, [T, hidden] each (LlamaDecoderLayer.forward :313;
      the fused add-RMSNorm writes both in place, layers/layernorm.py:93 fused_add_rms_norm.maybe_inplace);
    - attention (LlamaAttention.forward :224): the fused qkv_proj output [T, (q + 2 kv)/tp] (q, k, v are
      views; rotary in place), the attention output [T, q/tp] (layers/attention/attention.py:533
      torch.empty, allocated even with skip_attn), o_proj's output [T, hidden], with the layer's input still
      held by the decoder layer's frame;
    - MLP (LlamaMLP.forward :118): gate_up_proj's [T, 2 x intermediate/tp] and SiluAndMul's
      [T, intermediate/tp] at once, then down_proj's [T, hidden] beside the activation.
    Plain (non-gated) MLPs hold [T, intermediate/tp] twice. Peak = the largest of the three moments."""
    h = arch.hidden
    q = arch.heads // tp * arch.head_dim
    kv = kv_heads_per_gpu * arch.head_dim
    inter = arch.intermediate // tp
    up = 2 * inter if arch.gated_mlp else inter
    attention = 2 * h + (q + 2 * kv) + q + h
    mlp = 2 * h + up + inter
    down = 2 * h + inter + h
    return tokens * max(attention, mlp, down) * e


def sampler_peak(arch: ModelArch, tokens: int, reqs: int, e: int) -> int:
    """The dummy sampler's peak (v1/worker/gpu/model_runner.py:993 _dummy_sampler_run; profile_run :1022
    keeps `hidden_states` [T, hidden] and `sample_hidden_states` [R, hidden] alive across it):
    compute_logits' [R, padded vocab] in the model dtype (gathered over tp, layers/logits_processor.py:180),
    and the warm-up pass's fp32 copy [R, vocab] (v1/worker/gpu/sample/sampler.py:242
    `torch.empty_like(logits, dtype=torch.float32).copy_(logits)`). The Triton top-k/top-p and Gumbel
    kernels' own scratch is not counted."""
    padded = -(-arch.vocab // VOCAB_PADDING) * VOCAB_PADDING  # each rank's [R, padded/tp], gathered
    return (tokens * arch.hidden + reqs * arch.hidden + reqs * padded) * e + reqs * arch.vocab * 4


def _llama_like(arch: ModelArch) -> bool:
    return not (arch.experts or arch.mla or arch.parallel_attn)


# --- the estimate --------------------------------------------------------------------------------------

def estimate_serving(arch: ModelArch, config: ServingConfig, *, total_bytes: int, weight_bytes: int,
                     kv_heads_per_gpu: int, non_torch_bytes: int, gpu_name: str = "",
                     baseline_bytes: int = 0) -> ServingEstimate:
    """vLLM 0.33's KV-cache sizing for one GPU.

    total_bytes: the card's memory (cudaMemGetInfo total); weight_bytes: this rank's weights;
    kv_heads_per_gpu: KV heads this rank caches (kv_heads // tp, or 1 when replicated);
    non_torch_bytes: device memory outside torch's allocator that appears *after* vLLM's start-up
    snapshot (lazily loaded kernels, library workspaces); baseline_bytes: what is in use *before* it
    (CUDA context, NCCL buffers, cuBLAS handles: gpu_worker.py:496-541 creates them before the
    snapshot), which vLLM does not subtract from the budget but which must leave `requested` free."""
    for name, value in (("total_bytes", total_bytes), ("weight_bytes", weight_bytes),
                        ("non_torch_bytes", non_torch_bytes), ("baseline_bytes", baseline_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MemplanInputError(f"{name} must be a non-negative integer of bytes, got {value!r}")
    if total_bytes == 0:
        raise MemplanInputError("total_bytes must be positive, got 0")
    if isinstance(kv_heads_per_gpu, bool) or not isinstance(kv_heads_per_gpu, int) or not 1 <= kv_heads_per_gpu <= arch.kv_heads:
        raise MemplanInputError(f"kv_heads_per_gpu must be an integer from 1 to {arch.kv_heads}, got {kv_heads_per_gpu!r}")
    r = resolve(config, arch, total_bytes, gpu_name)
    notes: list[str] = []
    e, tp = r.model_dtype_bytes, r.tensor_parallel_size

    # v1/worker/utils.py:716 request_memory: ceil(total x utilization); it raises when less is free
    requested = math.ceil(total_bytes * r.gpu_memory_utilization)
    error = None
    if total_bytes - baseline_bytes < requested:
        error = (f"Free memory on device ({(total_bytes - baseline_bytes) / GiB:.2f}/{total_bytes / GiB:.2f} GiB) on "
                 f"startup is less than desired GPU memory utilization ({r.gpu_memory_utilization}, "
                 f"{requested / GiB:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.")

    # profile_run (v1/worker/gpu/model_runner.py:1022): _dummy_run(max_num_batched_tokens) over
    # min(tokens, max_num_seqs) requests (:862), then the sampler over one row per request
    reqs = min(r.max_num_batched_tokens, r.max_num_seqs)
    fwd = forward_peak(arch, r.max_num_batched_tokens, tp, kv_heads_per_gpu, e)
    smp = sampler_peak(arch, r.max_num_batched_tokens, reqs, e)
    derived = _llama_like(arch)
    if not derived:
        notes.append("activation peak: the Llama-like dense formula applied to a model with experts, MLA or a "
                     "parallel block; vLLM's fused-MoE workspaces and MLA projections are not derived")
    activation = max(fwd, smp)

    # CUDA graphs: vLLM captures them once before sizing the KV cache and measures the free-memory drop
    # (gpu_worker.py:707-724, v1/worker/gpu/cudagraph_utils.py:922 profile_cudagraph_memory); applied by
    # default (envs.py:2219). memplan approximates: the largest capture's forward intermediates (the pool
    # every smaller graph reuses) + 1 MiB per further graph (cudagraph_utils.py:918, vLLM's own floor).
    graphs = 0
    if r.cudagraphs and r.capture_sizes:
        graphs = forward_peak(arch, max(r.capture_sizes), tp, kv_heads_per_gpu, e) + \
            (len(r.capture_sizes) - 1) * MIN_PER_GRAPH_BYTES
        notes.append(f"CUDA graphs: approximated, not measured ({len(r.capture_sizes)} capture sizes up to "
                     f"{max(r.capture_sizes)} tokens); vLLM measures them at start-up")
    applied = graphs if r.estimate_cudagraphs else 0

    # gpu_worker.py:753 available = requested - non_kv_cache_memory - cudagraph estimate, where
    # non_kv_cache_memory = total_consumed + transient_peak_headroom (utils/mem_utils.py:312-321):
    # weights and non-torch growth since the snapshot, and the profile's torch peak over what stays allocated
    budget = requested - weight_bytes - non_torch_bytes - activation - applied

    page = page_bytes(arch, kv_heads_per_gpu, r.block_size, r.kv_element_bytes)
    groups, widest = kv_groups(arch, r)
    per_block = widest * page
    num_blocks = max(budget, 0) // per_block
    per_request = sum(g.blocks_per_max_len_request for g in groups)
    # v1/core/kv_cache_utils.py:1061 get_max_concurrency_for_kv_cache_config and :1120 get_kv_cache_capacity
    concurrency = num_blocks / per_request
    capacity = int(concurrency * r.max_model_len)

    fits = error is None
    if error is None:
        error = _check(arch, r, budget, per_block, per_request, groups)
        fits = error is None
    return ServingEstimate(
        config=r, total_bytes=total_bytes, requested_bytes=requested, weights_bytes=weight_bytes,
        activation_peak_bytes=activation, forward_peak_bytes=fwd, sampler_peak_bytes=smp,
        activation_derived=derived, cudagraph_bytes=graphs, cudagraph_applied_bytes=applied,
        non_torch_bytes=non_torch_bytes, kv_budget_bytes=budget, page_bytes_per_layer=page,
        bytes_per_block=per_block, groups=groups, num_blocks=num_blocks, kv_capacity_tokens=capacity,
        max_concurrency=concurrency, fits=fits, error=error, notes=tuple(notes))


def _check(arch: ModelArch, r: ResolvedServing, budget: int, per_block: int, per_request: int,
           groups: tuple[KVGroup, ...]) -> str | None:
    """v1/core/kv_cache_planning.py:1461 get_kv_cache_configs -> :1554 _check_enough_kv_cache_memory (:50):
    the check plans against the budget less the null block the BlockPool keeps (:1536 check_memory), and needs one
    max_model_len request's blocks across every group (:1253 _max_memory_usage_bytes_from_groups)."""
    if budget <= 0:
        return ("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
                "initializing the engine.")
    check = budget - per_block
    needed = per_block * per_request
    if needed <= check:
        return None

    def fits(length: int) -> bool:
        return per_block * sum(_blocks_per_request(g.sliding_window, length, r) for g in groups) <= check

    # :1288 _estimate_max_model_len_from_groups: binary search over 1..max_model_len
    best = 0
    if fits(1):
        lo, hi = 1, r.max_model_len
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
    estimated = f"Based on the available memory, the estimated maximum model length is {best}. " if best else ""
    return (f"To serve at least one request with the model's max seq len ({r.max_model_len}), "
            f"({round(needed / GiB, 2)} GiB KV cache is needed, which is larger than the available KV cache "
            f"memory ({round(check / GiB, 2)} GiB). {estimated}Try increasing `gpu_memory_utilization` or "
            f"decreasing `max_model_len` when initializing the engine.")


def concurrent_sequences(est: ServingEstimate, seq_len: int) -> int:
    """Sequences of `seq_len` tokens (prompt and output) whose blocks fit at once, capped by max_num_seqs.

    Blocks per sequence summed over the groups as vLLM counts a max_model_len request (kv_cache_utils.py:1061);
    the BlockPool's null block is not usable (v1/core/block_pool.py:191), so num_blocks - 1 are shared out."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= est.config.max_model_len:
        raise MemplanInputError(f"seq_len must be an integer from 1 to max-model-len ({est.config.max_model_len}), got {seq_len!r}")
    if not est.fits:
        return 0
    per_seq = sum(_blocks_per_request(g.sliding_window, seq_len, est.config) for g in est.groups)
    return min((est.num_blocks - 1) // per_seq, est.config.max_num_seqs)
