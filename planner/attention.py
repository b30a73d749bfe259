"""Which attention kernel runs, decided once for training and generation alike.

As far as memory goes there are four: a fused SDPA kernel (flash, memory-efficient or cuDNN: O(s)
state), SDPA's math kernel (scores materialised in fp32), and the models' own eager paths, with the
softmax in the compute dtype ("math": Falcon) or upcast to fp32 beside it ("eager": LlamaAttention's
`softmax(..., dtype=float32)`).

flash_attention_2 (the flash-attn package) is always the fused kind: its forward saves q, k, v, the
output and the fp32 log-sum-exp (flash_attn_interface.py `FlashAttnFunc.forward`,
`ctx.save_for_backward(q, k, v, out_padded, softmax_lse, rng_state)`), grouped keys taken natively.

Read off the probes (validate/probes.py, results in validate/results/probes-*.jsonl):
- Falcon hands SDPA keys broadcast over heads with an explicit mask: the math kernel, in every dtype,
  on the CPU and on CUDA, in training and in generation (`ModelArch.sdpa_always_math`);
- GPT-BigCode hands SDPA broadcast keys too (`sdpa_broadcast_kv`): the math kernel on the CPU in
  training, a fused kernel once no gradient is needed;
- on CUDA, transformers passes enable_gqa=True, which the flash and cuDNN kernels take only in 16
  bits and the memory-efficient kernel not at all: grouped- or multi-query attention in fp32 (QLoRA's
  upcast stream without autocast) runs the math kernel, multi-head attention in fp32 the
  memory-efficient one. The math kernel computes in fp32 on CUDA too (torch's
  allow_fp16_bf16_reduction_math_sdp is off by default: a bf16 Falcon layer's scores are fp32 on
  the H200, validate/results/timelines-*).
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .architecture import ModelArch
    from .job import Job
    from .stacks import Stack


class Kernel(str, Enum):
    fused = "fused"
    math_fp32 = "math_fp32"
    math = "math"  # the model's own matmul-softmax, softmax in the compute dtype
    eager = "eager"  # the model's own matmul-softmax with an fp32 softmax


def attention_kernel(job: "Job", arch: "ModelArch", stack: "Stack", *, grad: bool, sdpa_bytes: int) -> Kernel:
    """`grad`: the forward records for backward (training); `sdpa_bytes`: the dtype SDPA sees."""
    grouped = arch.kv_heads != arch.heads
    if arch.own_attention:
        # BloomAttention has no SDPA path: alibi.baddbmm, then softmax(dtype=float32) and its cast
        # back, under attn_implementation "sdpa" too (models/bloom/modeling_bloom.py BloomAttention.forward)
        return Kernel.eager
    eager = job.attention == "eager" or (job.attention == "sdpa" and not arch.sdpa_supported)
    if job.attention == "flash_attention_2":
        # flash-attn takes grouped keys natively and never materialises scores, in every family
        # (flash_attn_interface.py FlashAttnFunc / FlashAttnVarlenFunc)
        return Kernel.fused
    if eager:
        # a model without an SDPA path runs its eager attention (ModelArch.sdpa_supported);
        # Falcon's eager softmax stays in the compute dtype; GPT-BigCode's training path is counted
        # the same way (docs/activations.md, Known gaps)
        if arch.sdpa_always_math or (grad and arch.sdpa_broadcast_kv) or arch.eager_softmax_compute_dtype:
            return Kernel.math
        return Kernel.eager
    if stack.cpu and job.attention == "sdpa" and arch.sdpa_value_width_differs:
        # the CPU's flash kernel needs one head width for q, k and v (aten
        # sdp_utils_cpp.cpp `check_head_dim_size_cpp`): MLA's narrower values take the math kernel
        # (CPU trace of DeepSeek-V2/V3 layers); on CUDA the memory-efficient kernel takes them
        return Kernel.math_fp32
    if not grad:
        if arch.sdpa_always_math:
            return Kernel.math_fp32
        if not stack.cpu and sdpa_bytes == 4 and grouped:
            return Kernel.math_fp32
        return Kernel.fused
    if stack.cpu:
        return Kernel.math_fp32 if arch.sdpa_broadcast_kv and grouped else Kernel.fused
    return Kernel.math_fp32 if grouped and (arch.sdpa_always_math or sdpa_bytes == 4) else Kernel.fused
