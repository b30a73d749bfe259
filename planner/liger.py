"""Liger kernels (liger-kernel 0.8.5), as `use_liger_kernel=True` applies them to a transformers
model (liger_kernel/transformers/monkey_patch.py `_apply_liger_kernel_to_instance`): RoPE, RMSNorm,
SwiGLU (GeGLU for Gemma) and the fused linear cross-entropy. Triton only (no CPU path), so derived
from the source (docs/liger.md); what each kernel saves is in activations.py (`ctx.liger`), the loss
here.
"""

from __future__ import annotations

from .architecture import ModelArch
from .errors import MemplanInputError
from .job import Job
from .stacks.base import LossTerms

# monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN, the families memplan models with Liger. Mixtral is
# patched too, but its experts kernel (LigerExperts) is not modelled.
LIGER_MODEL_TYPES = ("llama", "mistral", "gemma", "qwen2", "qwen3")


def check(job: Job, arch: ModelArch) -> None:
    if job.liger and job.task == "train" and arch.family not in LIGER_MODEL_TYPES:
        raise MemplanInputError(
            f"--liger on {arch.name} ({arch.family}): memplan models Liger's kernels for "
            f"{', '.join(LIGER_MODEL_TYPES)} (Liger has none for falcon, phi or gpt_bigcode; its Mixtral experts "
            "kernel is not modelled)"
        )


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """ops/fused_linear_cross_entropy.py:103-105 (chunk_mem_const 1): the rows of logits one chunk
    materialises, bounding them to about tokens x hidden."""
    inc_factor = -(-vocab // hidden)
    return min(next_pow2(-(-tokens // inc_factor)), tokens)


def fused_linear_cross_entropy(arch: ModelArch, tokens: int, input_bytes: int, logit_bytes: int, head_bytes: int,
                               head_trains: bool) -> LossTerms:
    """`fused_linear_cross_entropy_forward`: the logits are never materialised whole. It allocates the
    input's gradient (tokens x hidden, the input's dtype, `zeros_like(_input)`), the head weight's
    gradient when it trains (`zeros_like(weight)`, the weight's dtype), one fp32 loss per token, and
    one reused chunk x vocab logits buffer (`logits_storage`, overwritten by its own gradient); all
    of them but the chunk live until the backward returns the gradients."""
    v, h = arch.vocab, arch.hidden
    c = chunk_tokens(tokens, v, h)
    kept = tokens * h * input_bytes + tokens * 4 + (v * h * head_bytes if head_trains else 0)
    chunk = c * v * logit_bytes
    gw = f" + head gradient {v:,} x {h:,} x {head_bytes} B" if head_trains else ""
    return LossTerms(
        forward=kept + chunk,
        backward=kept,
        held=0,
        formula=(f"Liger fused linear cross-entropy: one {c:,}-token chunk x {v:,} vocab x {logit_bytes} B in forward, "
                 f"input gradient {tokens:,} x {h:,} x {input_bytes} B + fp32 loss per token{gw} until backward"),
    )
