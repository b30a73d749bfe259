"""Step time from FLOPs: a first-order model for ranking plans, not a benchmark.

Training FLOPs per token: 2 x params forward, 2 x params for activation gradients and, when the
base weights train, 2 x params for weight gradients (Kaplan et al. 2020, 6N per token; Chinchilla
appendix F); attention adds 2 x 2 x layers x seq x q_width per token forward (QK^T and AV, halved
by the causal mask); gradient checkpointing runs the forward twice. LoRA/QLoRA skip the frozen
weights' gradients. Time = FLOPs / (GPUs x datasheet dense 16-bit peak x utilisation), where the
utilisation (MFU) is an assumption the user can set; QLoRA's dequantisation and communication
are not modelled.
"""

from __future__ import annotations

from .architecture import ModelArch
from .gpu import GpuProfile
from .job import Job
from .params import count_params

DEFAULT_MFU = 0.40


def flops_per_token(job: Job, arch: ModelArch) -> float:
    n = count_params(arch).total
    if arch.experts:
        # only k of E experts run per token
        expert = sum(lin.params for lin in arch.linears if lin.copies > 1) * arch.layers
        n = n - expert + expert * arch.experts_per_token / arch.experts
    forward = 2 * n + 2 * arch.layers * job.seq_len * arch.q_width
    backward = 2 * forward if job.method == "full" else forward
    recompute = forward if job.checkpointing else 0
    return forward + backward + recompute


def step_seconds(job: Job, arch: ModelArch, gpu: GpuProfile, tokens_per_step: int, mfu: float = DEFAULT_MFU) -> float:
    return flops_per_token(job, arch) * tokens_per_step / (job.num_gpus * gpu.peak_tflops_16bit * 1e12 * mfu)


def usd_per_million_tokens(job: Job, arch: ModelArch, gpu: GpuProfile, price: float, mfu: float = DEFAULT_MFU) -> float:
    tokens_per_second = job.num_gpus * gpu.peak_tflops_16bit * 1e12 * mfu / flops_per_token(job, arch)
    return price * job.num_gpus / 3600 / tokens_per_second * 1e6
