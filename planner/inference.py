"""Inference: the KV cache, the prefill's largest live intermediates, the head and the decode step."""

from __future__ import annotations

from .architecture import ModelArch
from .attention import Kernel, attention_kernel
from .dtypes import float_bytes
from .families import family_of
from .job import Job
from .stacks import Stack


def kv_tokens(job: Job, arch: ModelArch, generated: bool = True, layer: int = 0) -> int:
    """Positions decoder layer `layer` holds per sequence: the prompt, plus the new tokens once they
    are generated; a sliding-window layer keeps only its window."""
    total = job.seq_len + (job.new_tokens if generated else 0)
    window = arch.window_of(layer)
    return min(total, window) if window else total


def layer_cache_bytes(job: Job, arch: ModelArch, layer: int, generated: bool = True) -> int:
    """One layer's cache: (K + V width) x positions x batch x bytes."""
    return arch.cache_width * kv_tokens(job, arch, generated, layer) * job.micro_batch * float_bytes(job.compute_dtype)


def kv_cache_bytes(job: Job, arch: ModelArch, generated: bool = True) -> int:
    """Every layer's cache: 2 (K and V) x kv_heads x head_dim x positions x batch x bytes, summed
    over the layers (sliding-window layers hold fewer positions)."""
    return sum(layer_cache_bytes(job, arch, i, generated) for i in range(arch.layers))


def kv_cache_formula(job: Job, arch: ModelArch) -> str:
    """The KV cache row's formula: one product when every layer holds the same positions, else the
    layers grouped by the positions they hold."""
    by_positions: dict[int, int] = {}
    for i in range(arch.layers):
        p = kv_tokens(job, arch, layer=i)
        by_positions[p] = by_positions.get(p, 0) + 1
    tail = f"batch {job.micro_batch} x {float_bytes(job.compute_dtype)} B (the prompt's positions during the prefill)"
    if arch.kv_cache_width is None and len(by_positions) == 1:
        return (f"2 x {arch.layers} layers x {arch.kv_heads} kv heads x {arch.head_dim} head dim x "
                f"{next(iter(by_positions)):,} positions x {tail}")
    layers = " + ".join(f"{n} layers x {p:,} positions" for p, n in by_positions.items())
    return f"{arch.cache_width:,} cached elements (K and V) per position x ({layers}) x {tail}"


def cache_append_bytes(job: Job, arch: ModelArch) -> int:
    """transformers' DynamicCache appends a decode step's keys and values with `torch.cat`: for a
    moment one layer's old and new key (then value) tensors are both alive, one layer's K extra
    (the largest layer's)."""
    if not job.new_tokens:
        return 0
    if arch.kv_cache_key_width is not None:  # [fam-mla] keys and values of different widths
        return max(layer_cache_bytes(job, arch, i) for i in range(arch.layers)) * arch.kv_cache_key_width // arch.cache_width
    return max(layer_cache_bytes(job, arch, i) for i in range(arch.layers)) // 2


def prefill_transient_bytes(job: Job, arch: ModelArch, stack: Stack) -> int:
    """Intermediates alive at the high point of one layer's no-grad forward during the prefill,
    read op by op off `memplan.validate.trace.trace_inference` (docs/activations.md). The larger of
    two moments:
    - attention: the stream, norm output and q/k/v of the layer, plus what the kernel materialises
      per score (eager: the scores in the compute dtype, their fp32 copy and the fp32 softmax;
      Falcon's eager "math" path: scores, their masked sum and the probabilities in the compute
      dtype; the math kernel: the fp32 scores and their masked copy, with fp32 q and the explicit
      mask);
    - MLP: four hidden-sized tensors (embedding output, residual, norm output, and the attention
      output or sum) beside the MLP's widest moment: act, up and product for a gated MLP; the
      input, 0.5x, x^3 and its scaled copy for Phi's gelu_new; the routed inputs and the fused
      gate-up, act and product for k routed experts. Eager attention's probabilities and mask are
      still referenced there (the layer keeps the attention module's second output until it
      returns); learned positions keep the token embeddings and one sequence's position embeddings."""
    t, s, b = job.micro_batch * job.seq_len, job.seq_len, job.micro_batch
    ab = float_bytes(job.compute_dtype)
    h, i, a = arch.hidden, arch.intermediate, arch.heads
    kernel = attention_kernel(job, arch, stack, grad=False, sdpa_bytes=ab)
    own = kernel in (Kernel.eager, Kernel.math)  # the model's own matmul-softmax
    mask = b * s * s * ab if kernel is not Kernel.fused else 0  # explicit additive (b, 1, s, s) mask
    if own:
        # keys and values repeated to every head (repeat_kv, or Falcon's broadcast) are copies
        repeat_kv = 2 * arch.q_width * ab if arch.kv_heads != arch.heads else 0
        # Falcon's softmax stays in the compute dtype: scores (scaled in place), their masked sum
        # and the probabilities, and the previous layer's probabilities, which FalconModel's loop
        # still holds in that layer's outputs; eager adds an fp32 copy and an fp32 softmax
        per_score = 4 * ab if kernel is Kernel.math else ab + 4 + 4
        attention = t * (4 * h * ab + repeat_kv) + t * a * s * per_score + mask
        if arch.rotary_fraction < 1:
            # partial rotary (Phi): the rotated slices of q and k live beside the concatenated q and k
            # (rotary_dim channels of every query and key head): whole bytes, as the tensors are
            rotated = (arch.heads + arch.kv_heads) * arch.rotary_dim
            attention += t * (arch.q_width + arch.kv_width + rotated) * ab
    else:
        attention = t * (3 * h * ab + 4 * h + ab * (2 * arch.q_width + 2 * arch.kv_width))
    if arch.mla is not None:  # [fam-mla]
        # eager: transformers' explicit additive mask as well
        attention = mla_prefill_attention(job, arch, kernel, stack) + (mask if kernel is Kernel.eager else 0)
    elif kernel is Kernel.math_fp32:
        # CUDA's _safe_softmax also builds a bool mask of the -inf scores inside one op (allocator
        # trace of a training layer, H200): the CPU's dispatch mode cannot see it
        inside = 0 if stack.cpu else 1
        upcast_q = t * arch.q_width * 4 if ab != 4 else 0
        attention += t * a * s * (8 + inside) + upcast_q + mask
    mlp = t * family_of(arch).prefill_mlp_per_token(arch, ab) + 4 * t * h * ab
    if own:
        mlp += t * a * s * ab + mask
    if arch.learned_positions:  # the token embeddings, and the position embeddings of one sequence
        mlp += (t + s) * h * ab
    return max(attention, mlp) + dequant_bytes(job, arch, stack, t)


# bitsandbytes backends/cuda/ops.py: at most this many rows always take the fused 4-bit kernel
BNB_FUSED_MAX_ROWS = 4


def dequant_bytes(job: Job, arch: ModelArch, stack: Stack, rows: int, into_bytes: int | None = None) -> int:
    """The one dequantized 4/8-bit weight. A 4-bit matmul over more than a few rows dequantizes its
    weight into the compute dtype first (bitsandbytes `_dequant_linear_fallback`, and
    MatMul4Bit.backward for the input gradient), one linear at a time: the largest one counts.
    Up to 4 rows always run the fused kernel; between 5 and 1,536 rows bitsandbytes picks per GPU
    architecture, and the estimate assumes the dequantizing path (the larger). `into_bytes`: the
    dtype it is dequantized into, when not the compute dtype (the CPU trace's activation dtype)."""
    if not job.quantized or rows <= BNB_FUSED_MAX_ROWS:
        return 0
    largest = max((d_in * d_out for d_in, d_out, _ in stack.quantized_linears(arch)), default=0)
    return largest * (into_bytes or float_bytes(job.compute_dtype))


def logits_bytes(job: Job, arch: ModelArch) -> int:
    """generate() keeps the logits of the last position only (`logits_to_keep=1`) and copies them to
    fp32 to pick the token (generation/utils.py `_sample`); a plain forward (no new tokens) returns
    logits for every position, in the compute dtype (transformers 5 does not upcast them)."""
    if job.new_tokens:
        return job.micro_batch * arch.vocab * (float_bytes(job.compute_dtype) + 4)
    return job.micro_batch * job.seq_len * arch.vocab * float_bytes(job.compute_dtype)


def head_bytes(job: Job, arch: ModelArch) -> int:
    """Live at the head of the prefill, beside weights and cache: the final norm's output for every
    position (the norm runs before the positions are sliced) and the logits."""
    return job.micro_batch * job.seq_len * arch.hidden * float_bytes(job.compute_dtype) + logits_bytes(job, arch)


# --- [fam-mla] multi-head latent attention (models/deepseek_v2/modeling_deepseek_v2.py) ---------


def _mla_expanded(job: Job, arch: ModelArch, kernel: Kernel, queries: int, positions: int) -> int:
    """What DeepseekV2Attention holds while it attends, `queries` new tokens per sequence over
    `positions` cached ones (no grad): `expand_kv` decompresses every cached latent each call,
    kv_b_proj's output (the values are a view of it) and the new key (`new_empty` + `copy_`),
    beside the query (q_proj's or q_b_proj's output, its rotated q_pe and the concatenated query)
    and the new tokens' latent projection. The math kernel (the CPU's, narrower values) adds fp32
    copies of q (and its scaled copy), k and v, and the scores with their masked copy in fp32;
    flash_attention_2 pads the values to the query width (integrations/flash_attention.py)."""
    m, a, b = arch.mla, arch.heads, job.micro_batch
    ab = float_bytes(job.compute_dtype)
    qk, kv_b = a * m.qk_head_dim, a * (m.qk_nope_head_dim + m.v_head_dim)
    q_side = b * queries * (2 * qk + a * m.qk_rope_head_dim + m.latent_width) * ab
    kv_side = b * positions * (kv_b + qk) * ab
    kernel_bytes = 0
    if kernel is Kernel.math_fp32:
        fp32_q = 2 * b * queries * qk * 4 if ab != 4 else b * queries * qk * 4
        # the key's fp32 copy and the values' (and in decode, where the query is one position,
        # the scaled key beside its copy: CPU trace; in the prefill the query's copies are larger)
        k_copies = qk * (2 if queries == 1 else 1)
        kernel_bytes = fp32_q + b * positions * (k_copies + a * m.v_head_dim) * (4 if ab != 4 else 0)
        # the scores and their masked copy, and the causal mask SDPA builds from is_causal: one
        # (queries, positions) fp32 tensor broadcast over the batch (`where`, CPU trace)
        kernel_bytes += 2 * b * a * queries * positions * 4 + (queries * positions * 4 if queries > 1 else 0)
    elif kernel is Kernel.eager:
        # eager_attention_forward: the masked scores, their fp32 copy and the fp32 softmax; then
        # `matmul(attn_weights, value_states)` copies the strided value (a view of kv_b_proj's
        # output) beside the probabilities: the larger of the two moments (CPU trace)
        scores = b * a * queries * positions
        kernel_bytes = max(scores * (ab + 8), scores * ab + b * positions * a * m.v_head_dim * ab)
    elif job.attention == "flash_attention_2":
        kernel_bytes = b * positions * qk * ab + b * queries * qk * ab
    return q_side + kv_side + kernel_bytes


def mla_prefill_attention(job: Job, arch: ModelArch, kernel: Kernel, stack: Stack) -> int:
    """The prefill's attention moment for MLA: the stream (embedding output, residual, norm output)
    and `_mla_expanded` over the prompt (CPU trace of DeepSeek-V2/V3 prefills)."""
    t = job.micro_batch * job.seq_len
    ab = float_bytes(job.compute_dtype)
    return 3 * t * arch.hidden * ab + _mla_expanded(job, arch, kernel, job.seq_len, job.seq_len)


def mla_decode_bytes(job: Job, arch: ModelArch, stack: Stack) -> int:
    """A decode step's attention over the whole cache: every cached latent decompressed to per-head
    keys and values for one layer at a time (`_mla_expanded`, one query per sequence)."""
    if arch.mla is None or not job.new_tokens:
        return 0
    kernel = attention_kernel(job, arch, stack, grad=False, sdpa_bytes=float_bytes(job.compute_dtype))
    return _mla_expanded(job, arch, kernel, 1, job.seq_len + job.new_tokens)


def mla_cache_note(job: Job, arch: ModelArch) -> str | None:
    """What the KV cache holds for MLA: transformers' and an MLA-aware engine's."""
    if arch.latent_cache_width is None:
        return None
    ab = float_bytes(job.compute_dtype)
    per_token = arch.layers * ab
    return (f"transformers caches {arch.cache_width:,} elements per position per layer (the compressed latent, "
            f"kv_lora_rank + qk_rope_head_dim: {arch.cache_width * per_token:,} B per token over {arch.layers} layers; "
            f"DeepseekV2Attention updates the cache before expand_kv); an MLA-aware engine (vLLM, SGLang) caches "
            f"{arch.latent_cache_width:,} ({arch.latent_cache_width * per_token:,} B per token); decompressed per-head "
            f"keys and values would be {arch.heads * (arch.mla.qk_head_dim + arch.mla.v_head_dim):,} "
            f"({arch.heads * (arch.mla.qk_head_dim + arch.mla.v_head_dim) * per_token:,} B per token)")
