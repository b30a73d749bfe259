"""A serving job (`--engine vllm`) as vLLM sizes it: the Job's settings to planner/serving.py's inputs.

The weights per GPU are the estimate's own row (pre-quantized storage and the tensor-parallel split
included, planner/tensor_parallel.py); device memory outside torch comes from
planner/device_memory.py, split where vLLM's start-up snapshot falls (v1/worker/gpu_worker.py:496-541):
the CUDA context and the NCCL communicators exist before it and only have to leave the requested
share free; kernels and libraries loaded later come off the KV budget. Pure.
"""

from __future__ import annotations

from .architecture import ModelArch
from .device_memory import context_bytes, outside_torch
from .errors import MemplanInputError
from .gpu import GpuProfile
from .job import Job
from .serving import ServingConfig, ServingEstimate, estimate_serving

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def serving_config(job: Job) -> ServingConfig:
    given = {k: getattr(job, k) for k in ("gpu_memory_utilization", "max_model_len", "max_num_seqs",
                                          "max_num_batched_tokens", "block_size") if getattr(job, k) is not None}
    return ServingConfig.build(**given, kv_cache_dtype="fp8" if job.kv_cache_dtype == "fp8" else "auto",
                               dtype=_DTYPES[job.compute_dtype.value], tensor_parallel_size=job.num_gpus,
                               enforce_eager=job.enforce_eager)


def serve(job: Job, arch: ModelArch, gpu: GpuProfile | None, est=None) -> ServingEstimate:
    """vLLM 0.33's KV-cache sizing for one GPU of `job` (engine vllm). `est`: the job's estimate when
    the caller has it (its weights row is what serving reads; vLLM's own settings do not change it)."""
    from .estimate import estimate_memory  # (estimate imports the planner; keep this module light)
    from .tensor_parallel import layout

    if job.engine != "vllm":
        raise MemplanInputError("the serving view is vLLM's: add --engine vllm")
    if gpu is None:
        raise MemplanInputError("--engine vllm sizes its KV cache from the card's memory: give --gpu")
    config = serving_config(job)
    est = est or estimate_memory(job, arch, gpu, replay_allocator=False)
    kv_heads = layout(arch, job.num_gpus, "vllm").kv_heads if job.sharding == "tp" else arch.kv_heads
    terms = outside_torch(job, arch, gpu)
    before = context_bytes(terms) + sum(t.bytes for t in terms if t.name.endswith("communicator)"))
    after = sum(t.bytes for t in terms if t.name == "kernels and libraries the step loads")
    return estimate_serving(arch, config, total_bytes=gpu.memory_bytes,
                            weight_bytes=est.bytes_of("weights") + est.bytes_of("buffers"),
                            kv_heads_per_gpu=kv_heads, non_torch_bytes=after, gpu_name=gpu.name,
                            baseline_bytes=before)


def longest_model_len(job: Job, arch: ModelArch, gpu: GpuProfile) -> int:
    """The longest --max-model-len vLLM starts with (0: none): a binary search over 1 to the model's
    maximum positions, each step vLLM's own start-up check (the budget and one max-length request)."""
    from .estimate import estimate_memory

    est = estimate_memory(job, arch, gpu, replay_allocator=False)  # the weights, whatever the length

    def starts(n: int) -> bool:
        return serve(job.model_copy(update={"max_model_len": n}), arch, gpu, est).fits

    if not starts(1):
        return 0
    lo, hi = 1, arch.max_positions
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if starts(mid) else (lo, mid - 1)
    return lo
