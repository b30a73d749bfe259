"""Inference: KV cache, the prefill's largest live intermediates, and the inverse questions."""

from __future__ import annotations

from .architecture import ModelArch
from .dtypes import float_bytes
from .job import Job


def kv_tokens(job: Job, arch: ModelArch) -> int:
    """Positions held per sequence. Sliding-window layers (Mistral) keep only the window."""
    total = job.seq_len + job.new_tokens
    if arch.sliding_window:
        return min(total, arch.sliding_window)
    return total


def kv_cache_bytes(job: Job, arch: ModelArch) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x positions x batch x bytes."""
    return 2 * arch.layers * arch.kv_width * kv_tokens(job, arch) * job.micro_batch * float_bytes(job.compute_dtype)


def prefill_transient_bytes(job: Job, arch: ModelArch) -> int:
    """Intermediates of one layer alive at once during a no-grad prefill. The model's forward keeps
    the embedding output referenced throughout; beside it, the residual stream, the norm output,
    and either the attention's q/k/v and output or the MLP's widest moment (act, up and product
    for a gated MLP), read off `memplan.validate.trace.trace_inference`."""
    t = job.micro_batch * job.seq_len
    ab = float_bytes(job.compute_dtype)
    width = arch.intermediate * max(arch.experts_per_token, 1)
    per_token = 3 * arch.hidden * ab + 4 * arch.hidden + ab * (2 * arch.q_width + 2 * arch.kv_width)
    mlp = (3 if arch.gated_mlp else 2) * width * ab + 2 * arch.hidden * ab
    attn_scores = 0
    if job.attention == "eager" or (arch.family in ("falcon", "gpt_bigcode") and arch.kv_heads != arch.heads):
        attn_scores = arch.heads * job.seq_len * (4 + ab)
    dequant = 0
    if job.quantized:
        # bitsandbytes dequantizes a 4-bit weight to the compute dtype for multi-token matmuls
        dequant = arch.largest_quantizable_linear * ab
    return t * (max(per_token, mlp + 2 * arch.hidden * ab) + attn_scores) + dequant


def logits_bytes(job: Job, arch: ModelArch) -> int:
    """generate() computes logits for the last position only; a plain forward for every position."""
    positions = 1 if job.new_tokens > 0 else job.seq_len
    return job.micro_batch * positions * arch.vocab * (float_bytes(job.compute_dtype) + 4)
