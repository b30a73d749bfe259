"""Search GPU kinds x counts (tensor parallel) for an inference job that fits, and rank the plans by
cost per million generated tokens (planner/inference_cost.py)."""

from __future__ import annotations

from pydantic import BaseModel

from .architecture import ModelArch
from .errors import MemplanInputError
from .estimate import estimate_memory
from .fit import DEFAULT_SAFETY_MARGIN, check_safety_margin, fits_with_margin
from .gpu import GpuProfile
from .inference_cost import decode_step_seconds, prefill_seconds, usd_per_million_generated
from .job import Job
from .recommend import check_rankable, compute_dtype_on
from .serve import serve
from .throughput import MEASURED_MFU

TP_SIZES = (1, 2, 4, 8, 16)
# prefill's utilisation when none is given: the median measured on the 16-bit training rows
# (planner/throughput.py), whose matmuls are the same shapes; generation itself was not measured
DEFAULT_UTILISATION = MEASURED_MFU["16bit"]


class InferencePlan(BaseModel):
    gpu: str
    num_gpus: int
    sharding: str
    compute_dtype: str
    sequences: int
    device_used_bytes: int
    gpu_memory_bytes: int
    kv_cache_bytes: int  # per GPU, at the end of generation (vLLM: the blocks it allocates)
    prefill_seconds: float
    decode_step_seconds: float
    tokens_per_second: float  # generated, all sequences together
    usd_per_million_tokens: float
    usd_per_hour: float
    job: Job


class InferenceSearch(BaseModel):
    plans: list[InferencePlan]
    searched: int
    refused: dict[str, str]  # "GPU x N" -> why the split is impossible (heads, KV heads, family)
    safety_margin: float
    engine: str = "transformers"
    utilisation: float
    prompt: int
    new_tokens: int
    sequences: int


def recommend_inference(base: Job, arch: ModelArch, gpus: list[GpuProfile], max_gpus: int = 8,
                        safety_margin: float = DEFAULT_SAFETY_MARGIN, utilisation: float | None = None,
                        prices: dict[str, float] | None = None,
                        budget_usd_per_hour: float | None = None) -> InferenceSearch:
    """`base`: the inference job (micro_batch = the sequences decoded together, seq_len the prompt,
    new_tokens the generation). Every GPU kind at every tensor-parallel size up to `max_gpus` is
    estimated; one GPU runs unsplit."""
    if base.task != "infer" or base.new_tokens <= 0:
        raise MemplanInputError("recommend --task infer ranks by generated tokens: give --new-tokens 1 or more")
    check_safety_margin(safety_margin)
    check_rankable(gpus)
    u = DEFAULT_UTILISATION if utilisation is None else utilisation
    plans: list[InferencePlan] = []
    refused: dict[str, str] = {}
    searched = 0
    for gpu in gpus:
        price = (prices or {}).get(gpu.name, gpu.price_per_hour_usd)
        compute = compute_dtype_on(gpu, base.compute_dtype)
        for n in (t for t in TP_SIZES if t <= max_gpus):
            if budget_usd_per_hour is not None and price * n > budget_usd_per_hour:
                continue
            job = base.model_copy(update=dict(num_gpus=n, sharding="tp" if n > 1 else "none", gpu=gpu.name,
                                              compute_dtype=compute, **({"weight_dtype": compute} if base.weight_dtype
                                                                        and base.weight_dtype.is_float else {})))
            searched += 1
            context = job.seq_len + job.new_tokens
            if job.engine == "vllm":  # vLLM must start with this context and hold every sequence's blocks
                job = job.model_copy(update={"max_model_len": base.max_model_len or context,
                                             "max_num_seqs": base.max_num_seqs or job.micro_batch})
            try:
                job = Job(**job.model_dump(exclude_defaults=True))
                est = estimate_memory(job, arch, gpu, replay_allocator=False)
                sv = serve(job, arch, gpu, est) if job.engine == "vllm" else None
            except MemplanInputError as exc:
                refused[f"{gpu.name} x {n}"] = str(exc)
                continue
            kv = next((c for c in est.components if c.name == "KV cache"), None)
            kv_end = kv.bytes if kv else 0
            kv_mean = (min(kv.phase_bytes.values()) + kv_end) // 2 if kv else 0
            if sv is not None:
                if not sv.fits or sv.concurrent_sequences(min(context, sv.config.max_model_len)) < job.micro_batch:
                    continue
                # vLLM takes its share of the card whatever the load; the blocks are what it caches in
                used, kv_end = sv.requested_bytes, sv.num_blocks * sv.bytes_per_block
            elif not fits_with_margin(est.device_used_bytes, gpu, safety_margin):
                continue
            else:
                used = est.device_used_bytes
            pre = prefill_seconds(arch, gpu, prompt=job.seq_len, sequences=job.micro_batch, num_gpus=n, utilisation=u)
            step = decode_step_seconds(arch, gpu, weight_bytes_per_gpu=est.bytes_of("weights"), kv_bytes_per_gpu=kv_mean,
                                       sequences=job.micro_batch, num_gpus=n, utilisation=u)
            usd = usd_per_million_generated(price, n, pre, step, job.new_tokens, job.micro_batch)
            total = pre + job.new_tokens * step
            plans.append(InferencePlan(
                gpu=gpu.name, num_gpus=n, sharding=job.sharding, compute_dtype=compute.value, sequences=job.micro_batch,
                device_used_bytes=used, gpu_memory_bytes=gpu.memory_bytes, kv_cache_bytes=kv_end,
                prefill_seconds=pre, decode_step_seconds=step,
                tokens_per_second=job.micro_batch * job.new_tokens / total, usd_per_million_tokens=usd,
                usd_per_hour=price * n, job=job))
    plans.sort(key=lambda p: (round(p.usd_per_million_tokens, 6), p.num_gpus, -p.tokens_per_second))
    return InferenceSearch(plans=plans, searched=searched, refused=refused, safety_margin=safety_margin,
                           engine=base.engine, utilisation=u,
                           prompt=base.seq_len, new_tokens=base.new_tokens, sequences=base.micro_batch)
