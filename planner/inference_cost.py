"""Time and cost of generation: a first-order roofline model for ranking inference plans, not a benchmark.

Decode is memory-bound (Williams, Waterman and Patterson 2009, roofline; Pope et al. 2022, "Efficiently
Scaling Transformer Inference", section 2): each decode step reads every weight a GPU holds once, for
all the sequences decoded together, and each sequence's KV cache; a step's time is
    max(bytes read per GPU / memory bandwidth, FLOPs per GPU / (16-bit peak x utilisation)).
A mixture of experts reads only the experts its tokens are routed to: of E experts, at most
min(E, k x sequences) per layer.
Prefill is compute-bound: 2 FLOPs per active parameter per prompt token, plus attention's
2 x 2 x layers x (prompt / 2) x q_width per token (QK^T and AV under the causal mask), spread over
the GPUs at the given utilisation.
Cost per million generated tokens = GPUs x price per hour x (prefill + new tokens x step time)
/ (sequences x new tokens). Not modelled: tensor-parallel all-reduce time, scheduling, sampling,
CUDA-graph launch savings; the datasheet bandwidth is an upper bound on what a kernel reaches.
Pure.
"""

from __future__ import annotations

from .architecture import ModelArch
from .gpu import GpuProfile
from .params import count_params


def active_params(arch: ModelArch, sequences: int = 1) -> tuple[int, int]:
    """(all parameters, those one decode step over `sequences` sequences reads)."""
    n = count_params(arch).total
    if not arch.experts:
        return n, n
    expert = sum(lin.params for lin in arch.linears if lin.copies > 1) * arch.layers
    touched = min(arch.experts, arch.experts_per_token * sequences)
    return n, n - expert + expert * touched // arch.experts


def decode_step_seconds(arch: ModelArch, gpu: GpuProfile, *, weight_bytes_per_gpu: int, kv_bytes_per_gpu: int,
                        sequences: int, num_gpus: int, utilisation: float) -> float:
    """One decode step: every sequence's next token. `weight_bytes_per_gpu` is the estimate's weights
    row; `kv_bytes_per_gpu` the cache the step attends over (its mean size over the generation)."""
    total, active = active_params(arch, sequences)
    read = weight_bytes_per_gpu * active / total + kv_bytes_per_gpu
    flops = 2 * active * sequences / num_gpus
    return max(read / gpu.memory_bandwidth_bytes_per_s, flops / (gpu.peak_tflops_16bit * 1e12 * utilisation))


def prefill_seconds(arch: ModelArch, gpu: GpuProfile, *, prompt: int, sequences: int, num_gpus: int,
                    utilisation: float) -> float:
    _, active = active_params(arch, sequences * prompt)
    per_token = 2 * active + 2 * arch.layers * prompt * arch.q_width  # 2 x 2 x layers x prompt/2 x q_width
    return per_token * prompt * sequences / (num_gpus * gpu.peak_tflops_16bit * 1e12 * utilisation)


def usd_per_million_generated(price_per_gpu_hour: float, num_gpus: int, prefill: float, step: float, new_tokens: int,
                              sequences: int) -> float:
    seconds = prefill + new_tokens * step
    return price_per_gpu_hour * num_gpus * seconds / 3600 / (sequences * new_tokens) * 1e6
