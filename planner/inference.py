"""Inference: the KV cache, the prefill's largest live intermediates, the head and the decode step."""

from __future__ import annotations

from . import prequantized
from .architecture import ModelArch
from .activations import mask_kinds
from .attention import Kernel, attention_kernel
from .dtypes import float_bytes
from .families import family_of
from .job import Job
from .stacks import Stack


def kv_tokens(job: Job, arch: ModelArch, generated: bool = True, layer: int = 0) -> int:
    """Positions decoder layer `layer` holds per sequence: the prompt, plus the new tokens once they
    are generated; a sliding-window layer keeps only its window. A static cache (StaticCache,
    cache_utils.py StaticLayer.lazy_initialization) allocates max_cache_len = prompt + new tokens at
    its first update, so the prefill already holds them all; StaticSlidingWindowLayer holds
    min(window, max_cache_len)."""
    static = job.cache_implementation == "static"
    total = job.seq_len + (job.new_tokens if generated or static else 0)
    window = arch.window_of(layer)
    if window and not static and not generated:
        # DynamicSlidingWindowLayer.update keeps `full_key_states[:, :, -window + 1:, :]`, a view: after the
        # prefill the whole prompt's cat stays allocated until the layer's first decode update replaces it
        return total
    return min(total, window) if window else total


def layer_cache_bytes(job: Job, arch: ModelArch, layer: int, generated: bool = True) -> int:
    """One layer's cache: (K + V width) x positions x batch x bytes; a quantized cache
    (--kv-cache-dtype) holds `quantized_cache_bytes` instead."""
    if job.kv_cache_dtype is not None:
        return quantized_layer_cache_bytes(job, arch, layer, generated)
    return arch.cache_width * kv_tokens(job, arch, generated, layer) * job.micro_batch * float_bytes(job.compute_dtype)


def kv_cache_bytes(job: Job, arch: ModelArch, generated: bool = True) -> int:
    """Every layer's cache: 2 (K and V) x kv_heads x head_dim x positions x batch x bytes, summed
    over the layers (sliding-window layers hold fewer positions)."""
    held = sum(layer_cache_bytes(job, arch, i, generated) for i in range(arch.layers))
    if generated and job.new_tokens and not (arch.layer_windows and job.cache_implementation == "dynamic"):
        # the decode starts from the prefill's cache, which a dynamic sliding layer holds larger than its
        # window until its first update (kv_tokens); every other cache only grows. Models that mix
        # sliding and global layers walk that first step layer by layer instead (cache_append_bytes,
        # windowed_decode_cache_bytes), so their row is what the cache holds after the last step
        return max(held, kv_cache_bytes(job, arch, generated=False))
    return held


def kv_cache_formula(job: Job, arch: ModelArch) -> str:
    """The KV cache row's formula: one product when every layer holds the same positions, else the
    layers grouped by the positions they hold."""
    if job.kv_cache_dtype is not None:
        q, r = max(quantized_positions(job, True), key=lambda qr: _quantized_bytes(job, arch, *qr))
        what = ("1 B (float8_e4m3fn) + one fp32 scale per tensor" if job.kv_cache_dtype == "fp8" else
                f"{KV_BITS[job.kv_cache_dtype]} bits + a scale and a zero point per {KV_QUANT_GROUP} values")
        return (f"{arch.layers} layers x {arch.cache_width:,} cached elements (K and V) per position x batch "
                f"{job.micro_batch}: {q:,} positions at {what}, {r:,} residual positions x "
                f"{float_bytes(job.compute_dtype)} B")
    # the decode's cache is the prefill's when that is larger (dynamic sliding layers, kv_cache_bytes)
    generated = not (job.new_tokens and kv_cache_bytes(job, arch) > sum(
        layer_cache_bytes(job, arch, i) for i in range(arch.layers)))
    by_positions: dict[int, int] = {}
    for i in range(arch.layers):
        p = kv_tokens(job, arch, generated, layer=i)
        by_positions[p] = by_positions.get(p, 0) + 1
    tail = f"batch {job.micro_batch} x {float_bytes(job.compute_dtype)} B (the prompt's positions during the prefill)"
    if arch.kv_cache_width is None and len(by_positions) == 1:
        return (f"2 x {arch.layers} layers x {arch.kv_heads} kv heads x {arch.head_dim} head dim x "
                f"{next(iter(by_positions)):,} positions x {tail}")
    layers = " + ".join(f"{n} layers x {p:,} positions" for p, n in by_positions.items())
    return f"{arch.cache_width:,} cached elements (K and V) per position x ({layers}) x {tail}"


def cache_append_bytes(job: Job, arch: ModelArch, stack: Stack | None = None) -> int:
    """transformers' DynamicCache appends a decode step's keys and values with `torch.cat`: for a
    moment one layer's old and new key (then value) tensors are both alive, one layer's K extra
    (the largest layer's). A static cache writes in place (StaticLayer.update `index_copy_`), except a
    full StaticSlidingWindowLayer, which rolls its keys and values into new tensors before copying them
    back (`self.keys.roll(-1, dims=-2)`): one layer's K and V. A quantized cache: `quantized_update_bytes`."""
    if not job.new_tokens:
        return 0
    if job.kv_cache_dtype is not None:
        return quantized_update_bytes(job, arch)
    if job.cache_implementation == "static":
        rolled = [layer_cache_bytes(job, arch, i) for i in range(arch.layers)
                  if arch.window_of(i) and job.seq_len + job.new_tokens > arch.window_of(i)]
        return max(rolled, default=0)
    if arch.layer_windows:
        return max(windowed_decode_cache_bytes(job, arch, stack) - kv_cache_bytes(job, arch), 0)
    if arch.kv_cache_key_width is not None:  # keys and values of different widths
        return max(layer_cache_bytes(job, arch, i) for i in range(arch.layers)) * arch.kv_cache_key_width // arch.cache_width
    return max(layer_cache_bytes(job, arch, i) for i in range(arch.layers)) // 2


def cache_append_formula(job: Job) -> str:
    if job.kv_cache_dtype == "fp8":
        return ("Fp8QuantizedLayer.update: one layer's keys returned in the compute dtype beside its values' "
                "dequantization (fp32 copy and fp32 product)")
    if job.kv_cache_dtype is not None:
        return ("QuantizedLayer.update: one layer's dequantized K and V and their cat with the residual "
                "(derived: quanto/HQQ not installed)")
    if job.cache_implementation == "static":
        return "StaticCache writes in place; a full sliding layer rolls its K and V into new tensors"
    return "DynamicCache torch.cat: one layer's old and new keys alive at once"


# transformers cache_utils.py QuantizedLayer defaults (QuantizedCache passes none by default)
KV_QUANT_GROUP = 64  # q_group_size: one scale and one zero point per 64 values
KV_RESIDUAL = 128  # residual_length: positions kept in the compute dtype until they are flushed
KV_BITS = {"int4": 4, "int8": 8}


def quantized_positions(job: Job, generated: bool) -> list[tuple[int, int]]:
    """(quantized, residual) positions a QuantizedLayer holds: the prefill quantizes the whole prompt
    (QuantizedLayer.update's first call); each decode update appends to the residual, and once residual +
    new reaches residual_length the whole cache is re-quantized and the residual emptied. So after m
    updates the residual holds m mod 128 positions. Candidates: the end, and the last moment before a flush
    (127 residual positions), whichever holds more. Fp8QuantizedLayer has no residual."""
    s, m = job.seq_len, job.new_tokens if generated else 0
    if job.kv_cache_dtype == "fp8" or m == 0:
        return [(s + m, 0)]
    out = [(s + m - m % KV_RESIDUAL, m % KV_RESIDUAL)]
    last_full = m - (m + 1) % KV_RESIDUAL  # the largest m' <= m with m' % 128 == 127
    if 0 < last_full <= m:
        out.append((s + last_full - (KV_RESIDUAL - 1), KV_RESIDUAL - 1))
    return out


def quantized_layer_cache_bytes(job: Job, arch: ModelArch, layer: int, generated: bool = True) -> int:
    """One layer's quantized cache. int4/int8 (QuantizedLayer: quanto nbits 2/4, HQQ 1/2/3/4/8): per key
    and value tensor, the values packed to nbits, and per group of 64 one scale and one zero point in the
    compute dtype (HQQ `meta["scale"]`, `meta["zero"]` cast to compute_dtype; quanto's scale and shift in the
    input's dtype: from memory, neither is installed), plus the residual positions in the compute dtype.
    fp8 (Fp8QuantizedLayer): one float8_e4m3fn byte per value and one fp32 scale per tensor."""
    return max(_quantized_bytes(job, arch, q, r) for q, r in quantized_positions(job, generated))


def _quantized_bytes(job: Job, arch: ModelArch, q: int, r: int) -> int:
    ab, b = float_bytes(job.compute_dtype), job.micro_batch
    n = b * q * arch.cache_width // 2  # values of one of K or V
    if job.kv_cache_dtype == "fp8":
        stored = 2 * (n + 4)
    else:
        groups = -(-n // KV_QUANT_GROUP)
        stored = 2 * (-(-n * KV_BITS[job.kv_cache_dtype] // 8) + 2 * groups * ab)
    return stored + b * r * arch.cache_width * ab


def quantized_update_bytes(job: Job, arch: ModelArch) -> int:
    """A decode update of the quantized cache, for one layer (derived from cache_utils.py, the largest layer):
    - QuantizedLayer.update: `dequant_keys`, `dequant_values` (the quantized positions in the compute dtype)
      and `keys_to_return`, `values_to_return` (their cat with the residual and the new position) are alive
      together: two copies of the layer's full K and V in the compute dtype;
    - Fp8QuantizedLayer.update: `keys_to_return` (compute dtype) is held while the values are dequantized as
      `(quant_tensor.float() * scale).to(dtype)`: an fp32 copy and the fp32 product, 8 B per value."""
    ab, b = float_bytes(job.compute_dtype), job.micro_batch
    n = b * (job.seq_len + job.new_tokens) * arch.cache_width // 2
    if job.kv_cache_dtype == "fp8":
        return n * ab + 8 * n
    return 2 * 2 * n * ab


def check_cache(job: Job, arch: ModelArch) -> None:
    """transformers' QuantizedCache refuses models with sliding-window layers (cache_utils.py
    QuantizedCache.__init__: 'only supported for models with only full attention layers')."""
    if job.kv_cache_dtype is None:
        return
    if any(arch.window_of(i) for i in range(arch.layers)):
        from .errors import MemplanInputError

        raise MemplanInputError(
            f"--kv-cache-dtype {job.kv_cache_dtype}: transformers' QuantizedCache supports only models whose layers "
            f"all attend globally, and {arch.name} has sliding-window layers; drop --kv-cache-dtype")


def windowed_decode_cache_bytes(job: Job, arch: ModelArch, stack: Stack | None = None) -> int:
    """The cache's high point during decode for a model of sliding and global layers (ModelArch.
    layer_windows), walked layer by layer through the first and the last decode step, as
    transformers 5's DynamicCache runs them (cache_utils.py):
    - a global layer (DynamicLayer.update) reassigns `self.keys = cat([keys, k])` before it
      concatenates the values: its old keys live beside the new keys and the old values;
    - a sliding layer (DynamicSlidingWindowLayer.update) concatenates keys and values, then keeps
      views of their last window - 1 positions: old and new keys and values are alive together,
      and the concatenation (at most `window` positions) replaces the prompt's storage, so the first
      step shrinks a sliding layer from the prompt's length to the window;
    - eager attention over grouped keys (repeat_kv) copies the layer's keys and values to every
      query head while it attends.
    Before a layer updates it holds its positions of the previous step. Later steps only grow, so
    the first and the last step bound the phase."""
    from .stacks import get

    s, n, layers = job.seq_len, job.new_tokens, arch.layers
    kernel = attention_kernel(job, arch, stack or get(job.stack), grad=False, sdpa_bytes=float_bytes(job.compute_dtype))
    rep = arch.heads // arch.kv_heads if kernel in (Kernel.eager, Kernel.math) and arch.kv_heads != arch.heads else 0

    def held(i: int, step: int) -> int:  # positions (storage) layer i holds after decode step `step`
        w = arch.window_of(i)
        return s + step if step == 0 or not w else min(w, s + step)

    peak = 0  # in half positions (one K or one V of a position is 1)
    for step in sorted({1, n}):
        before = [2 * held(i, step - 1) for i in range(layers)]
        after = [2 * held(i, step) for i in range(layers)]
        done, waiting = 0, sum(before)
        for i in range(layers):
            waiting -= before[i]
            update = after[i] + (before[i] if arch.window_of(i) else before[i] // 2)
            attend = after[i] * (1 + rep)
            peak = max(peak, done + waiting + max(update, attend))
            done += after[i]
    return peak * arch.cache_width // 2 * job.micro_batch * float_bytes(job.compute_dtype)


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
    if mask and kernel is Kernel.eager:
        mask *= mask_kinds(arch)  # one per attention kind the layers mix (full and sliding)
    if kernel is Kernel.fused and arch.sdpa_explicit_mask:
        # Falcon's bool mask, and SDPA's additive copy of it (convert_boolean_attn_mask)
        mask = b * s * s * (ab + 1)
    if own:
        # keys and values repeated to every head (repeat_kv, or Falcon's broadcast) are copies
        repeat_kv = 2 * arch.q_width * ab if arch.kv_heads != arch.heads else 0
        # Falcon's softmax stays in the compute dtype: scores (scaled in place), their masked sum
        # and the probabilities, and the previous layer's probabilities, which FalconModel's loop
        # still holds in that layer's outputs; eager adds an fp32 copy and an fp32 softmax
        per_score = 4 * ab if kernel is Kernel.math else ab + 4 + 4
        if arch.attention_sinks:
            # gpt-oss's eager attention (modeling_gpt_oss.py `eager_attention_forward`) stays in the
            # compute dtype: the masked scores (still named by `attn_weights`), the sink-extended
            # logits less their max, and their softmax
            per_score = 3 * ab
        elif arch.own_attention:
            # BloomAttention: the baddbmm scores stay referenced (`attention_scores`) beside their
            # masked sum, the fp32 copy and fp32 softmax; BloomModel's loop still holds the previous
            # layer's probabilities in `outputs` (models/bloom/modeling_bloom.py BloomModel.forward)
            # (in fp32 the softmax's input cast is a no-op: no fp32 copy)
            per_score = 3 * ab + 4 + (4 if ab != 4 else 0)
            # and q, k and v reshaped to (b x heads, s, head_dim): copies of the head-interleaved
            # fused output, which is still alive (BloomAttention._reshape, then .reshape)
            repeat_kv += 3 * h * ab
            if ab == 4:
                # in fp32 the softmax moment holds no extra copy, so the attention's end, where the
                # same scores are still referenced, is higher: there the bmm context, its merged copy
                # for dense and dense's output are alive too (three more hidden-wide tensors)
                repeat_kv += 3 * h * ab
        attention = t * (4 * h * ab + repeat_kv) + t * a * s * per_score + mask
        if arch.rotary_fraction < 1:
            # partial rotary (Phi): the rotated slices of q and k live beside the concatenated q and k
            # (rotary_dim channels of every query and key head): whole bytes, as the tensors are
            rotated = (arch.heads + arch.kv_heads) * arch.rotary_dim
            attention += t * (arch.q_width + arch.kv_width + rotated) * ab
    else:
        attention = t * (3 * h * ab + 4 * h + ab * (2 * arch.q_width + 2 * arch.kv_width))
    if arch.mla is not None:
        # eager: transformers' explicit additive mask as well
        attention = mla_prefill_attention(job, arch, kernel, stack) + (mask if kernel is Kernel.eager else 0)
    elif kernel is Kernel.math_fp32:
        # CUDA's _safe_softmax also builds a bool mask of the -inf scores inside one op (allocator
        # trace of a training layer, H200): the CPU's dispatch mode cannot see it
        inside = 0 if stack.cpu else 1
        upcast_q = t * arch.q_width * 4 if ab != 4 else 0
        attention += t * a * s * (8 + inside) + upcast_q + mask
    mlp = t * family_of(arch).prefill_mlp_per_token(arch, ab) + 4 * t * h * ab
    if arch.mlp_norm_before_attention:
        # Falcon's ln_mlp output, computed before the attention, alive through it and beside the
        # MLP's input; and the bool mask FalconModel built for every layer
        attention += t * h * ab
        mlp += t * h * ab + (b * s * s if arch.sdpa_explicit_mask else 0)
    if own:
        mlp += t * a * s * ab + mask
        if arch.own_attention:  # and the previous layer's, held by BloomModel's loop
            mlp += t * a * s * ab
    if arch.learned_positions:  # the token embeddings, and the position embeddings of one sequence
        mlp += (t + s) * h * ab
    # a materialised sliding-window mask no layer needs, alive through the forward (one s x s storage)
    unused_mask = s * s if arch.sliding_mask_always and kernel is Kernel.fused else 0
    return max(attention, mlp) + unused_mask + dequant_bytes(job, arch, stack, t)


def all_reduce_bytes(job: Job, arch: ModelArch, layer_high: int) -> int:
    """Tensor parallel (`arch` one rank's): what o_proj's all-reduce adds to the prefill's high point.
    RowwiseParallel's output is a Partial DTensor that `redistribute` all-reduces into a new tensor, so
    the partial sums and their reduced copy are alive together beside the attention's stream and norm
    tensors (3 hidden-wide in the compute dtype and one in fp32), q, k and v gone: read off the CPU trace
    of transformers' own tensor parallelism under a fake process group (tests/test_tensor_parallel.py).
    It decides where the split heads and MLP width make the layer's other moments smaller. `layer_high`:
    the prefill's high point without the dequantized weight (prefill_transient_bytes less it)."""
    t, ab, h = job.micro_batch * job.seq_len, float_bytes(job.compute_dtype), arch.hidden
    moment = t * (3 * h * ab + 4 * h) + 2 * t * h * ab
    return max(moment - layer_high, 0)


# bitsandbytes backends/cuda/ops.py: at most this many rows always take the fused 4-bit kernel
BNB_FUSED_MAX_ROWS = 4


def dequant_bytes(job: Job, arch: ModelArch, stack: Stack, rows: int, into_bytes: int | None = None) -> int:
    """The one dequantized 4/8-bit weight. A 4-bit matmul over more than a few rows dequantizes its
    weight into the compute dtype first (bitsandbytes `_dequant_linear_fallback`, and
    MatMul4Bit.backward for the input gradient), one linear at a time: the largest one counts.
    Up to 4 rows always run the fused kernel; between 5 and 1,536 rows bitsandbytes picks per GPU
    architecture, and the estimate assumes the dequantizing path (the larger). `into_bytes`: the
    dtype it is dequantized into, when not the compute dtype (the CPU trace's activation dtype)."""
    if not job.quantized:  # a pre-quantized checkpoint's kernels (planner/prequantized.py)
        return prequantized.dequant_transient(job, arch, rows, job.task == "train",
                                              into_bytes or float_bytes(job.compute_dtype))
    if rows <= BNB_FUSED_MAX_ROWS:
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


# --- multi-head latent attention (models/deepseek_v2/modeling_deepseek_v2.py) ---------


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
