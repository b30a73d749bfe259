"""Step time from FLOPs: a first-order model for ranking plans, not a benchmark.

Training FLOPs per token: 2 x params forward, 2 x params for activation gradients and, when the
base weights train, 2 x params for weight gradients (Kaplan et al. 2020, 6N per token; Chinchilla
appendix F); attention adds 2 x 2 x layers x seq x q_width per token forward (QK^T and AV, halved
by the causal mask); gradient checkpointing runs the forward twice. LoRA/QLoRA skip the frozen
weights' gradients. Time = FLOPs / (GPUs x datasheet dense 16-bit peak x utilisation), where the
utilisation (MFU) defaults to what the GPU rows measured for the job's kind of training and the
user can set it; communication is not modelled.

The memory side of the roofline (Williams, Waterman and Patterson 2009) bounds it from below: each
micro-batch reads every weight from device memory in the forward and again in the backward (and
writes a gradient per weight when the weights train), at the datasheet bandwidth. It decides only
below a few dozen tokens per micro-batch (a 16-bit weight read once serves 2 FLOPs per token):
under 14 on the H20 at 38% MFU.
"""

from __future__ import annotations

from .architecture import ModelArch
from .dtypes import float_bytes, linear_weight_bytes
from .gpu import GpuProfile
from .job import Job
from .params import count_params

# Median MFU of the committed H100/H200 rows (validate/results, step_seconds) with at least 4,096
# tokens per micro-batch, by kind of training; tests/test_gpu_results.py recomputes them. QLoRA
# without autocast runs its fp32 stream and 4-bit dequantisation at 4% (Falcon's math-kernel
# attention) to 25%; under the Trainer's bf16 autocast at 31% to 38%; LoRA and full fine-tuning
# in 16 bits at 20% to 50%.
MEASURED_MFU = {"qlora": 0.16, "qlora_autocast": 0.37, "16bit": 0.38}


def mfu_kind(job: Job) -> str:
    if job.method == "qlora":
        return "qlora_autocast" if job.runs_autocast else "qlora"
    return "16bit"


def default_mfu(job: Job) -> float:
    return MEASURED_MFU[mfu_kind(job)]


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


def weight_traffic_per_micro_batch(job: Job, arch: ModelArch) -> float:
    """Bytes one GPU moves for the weights per micro-batch: every weight read in the forward and in
    the backward (FSDP gathers the whole model, so sharding does not shrink it), plus a gradient
    written per trained weight."""
    params = count_params(arch).total
    # 4/8-bit: the packed weight and its constants per weight, as a 4096 x 4096 linear stores them
    per_weight = linear_weight_bytes(4096, 4096, job.base_weight_dtype, job.double_quant) / 4096**2 \
        if job.quantized else float_bytes(job.base_weight_dtype)
    passes = 3 if job.method == "full" else 2
    return passes * params * per_weight


def step_seconds(job: Job, arch: ModelArch, gpu: GpuProfile, tokens_per_step: int, mfu: float) -> float:
    compute = flops_per_token(job, arch) * tokens_per_step / (job.num_gpus * gpu.peak_tflops_16bit * 1e12 * mfu)
    if not gpu.memory_bandwidth_bytes_per_s:
        return compute
    micro_batches = tokens_per_step / (job.num_gpus * job.micro_batch * job.seq_len)
    memory = micro_batches * weight_traffic_per_micro_batch(job, arch) / gpu.memory_bandwidth_bytes_per_s
    return max(compute, memory)


def usd_per_million_tokens(job: Job, arch: ModelArch, gpu: GpuProfile, price: float, mfu: float) -> float:
    tokens = job.num_gpus * job.micro_batch * job.seq_len  # one micro-batch on every GPU
    return price * job.num_gpus / 3600 * step_seconds(job, arch, gpu, tokens, mfu) / tokens * 1e6
