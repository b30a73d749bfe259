"""Search GPU kinds x counts x micro-batch x gradient accumulation x checkpointing x sharding for
plans that fit, and rank them by cost per million tokens."""

from __future__ import annotations

from pydantic import BaseModel

from .architecture import ModelArch
from .dtypes import DType
from .estimate import estimate_memory
from .fit import DEFAULT_SAFETY_MARGIN, check_safety_margin, fits_with_margin
from .gpu import GpuProfile
from .job import Job
from .throughput import default_mfu, step_seconds, usd_per_million_tokens

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
MULTI_GPU_SHARDINGS = ("ddp", "zero2", "fsdp_full")
# at equal cost the simpler setup wins: fewer moving parts, less communication
SIMPLICITY = {"none": 0, "ddp": 1, "zero2": 2, "fsdp_full": 3}


class Plan(BaseModel):
    gpu: str
    num_gpus: int
    sharding: str
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    compute_dtype: str
    device_used_bytes: int
    gpu_memory_bytes: int
    peak_phase: str
    step_seconds: float
    usd_per_million_tokens: float
    usd_per_hour: float
    job: Job


class Search(BaseModel):
    plans: list[Plan]
    searched: int
    safety_margin: float
    mfu: float
    global_batch: int
    seq_len: int


def _counts(max_gpus: int) -> list[int]:
    return [n for n in GPU_COUNTS if n <= max_gpus]


def recommend(
    base: Job,
    arch: ModelArch,
    gpus: list[GpuProfile],
    global_batch: int,
    max_gpus: int = 8,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    mfu: float | None = None,
    prices: dict[str, float] | None = None,
    budget_usd_per_hour: float | None = None,
    fsdp_version: int = 2,
) -> Search:
    """Every (GPU, count, sharding, checkpointing) gets the largest micro-batch that fits, since
    memory never falls as the micro-batch grows; the rest of the global batch is accumulation.
    `mfu=None` takes the utilisation measured for the job's kind of training; FSDP plans run
    `fsdp_version` (accelerate's: 2 = fully_shard, 1 = FullyShardedDataParallel)."""
    if fsdp_version not in (1, 2):
        from .errors import MemplanInputError

        raise MemplanInputError(f"fsdp-version must be 1 or 2, got {fsdp_version}")
    check_safety_margin(safety_margin)
    check_rankable(gpus)
    mfu = default_mfu(base) if mfu is None else mfu
    plans: list[Plan] = []
    searched = 0
    for gpu in gpus:
        price = (prices or {}).get(gpu.name, gpu.price_per_hour_usd)
        compute = compute_dtype_on(gpu, base.compute_dtype)
        for n in _counts(max_gpus):
            if global_batch % n or (budget_usd_per_hour is not None and price * n > budget_usd_per_hour):
                continue
            for sharding in (("none",) if n == 1 else MULTI_GPU_SHARDINGS):
                for ckpt in (False, True):
                    best = None
                    for mb in MICRO_BATCHES:
                        if (global_batch // n) % mb:
                            continue
                        version = {"fsdp_version": fsdp_version} if sharding.startswith("fsdp") else {}
                        job = base.model_copy(update=dict(
                            num_gpus=n, sharding=sharding, micro_batch=mb, gradient_checkpointing=ckpt,
                            compute_dtype=compute, gpu=gpu.name, **version))
                        searched += 1
                        # screened with the constant allocator slack: the replay per candidate is too slow
                        est = estimate_memory(job, arch, gpu, replay_allocator=False)
                        if not fits_with_margin(est.device_used_bytes, gpu, safety_margin):
                            break
                        best = (job, est)
                    if best is None:
                        continue
                    job, est = best
                    tokens = global_batch * job.seq_len
                    plans.append(Plan(
                        gpu=gpu.name, num_gpus=n, sharding=sharding, micro_batch=job.micro_batch,
                        grad_accum=global_batch // (n * job.micro_batch), gradient_checkpointing=ckpt,
                        compute_dtype=compute.value, device_used_bytes=est.device_used_bytes,
                        gpu_memory_bytes=gpu.memory_bytes, peak_phase=est.peak_phase,
                        step_seconds=step_seconds(job, arch, gpu, tokens, mfu),
                        usd_per_million_tokens=usd_per_million_tokens(job, arch, gpu, price, mfu),
                        usd_per_hour=price * n, job=job))
    plans = _best_per_gpu_count(plans)
    plans.sort(key=lambda p: (round(p.usd_per_million_tokens, 6), p.step_seconds, SIMPLICITY[p.sharding]))
    return Search(plans=plans, searched=searched, safety_margin=safety_margin, mfu=mfu,
                  global_batch=global_batch, seq_len=base.seq_len)


def check_rankable(gpus: list[GpuProfile]) -> None:
    """A search ranks by price and speed: a card named by its memory alone has neither."""
    for gpu in gpus:
        if gpu.by_memory:
            from .errors import MemplanInputError

            raise MemplanInputError(f"recommend ranks GPU kinds by cost and speed, and {gpu.name!r} is named by its memory "
                                    "alone (no price, no throughput): use memplan fit or estimate --gpu for it, "
                                    "or name a profile (memplan gpus)")


def compute_dtype_on(gpu: GpuProfile, dtype: DType) -> DType:
    """bf16 on a card without bf16 (T4, V100) runs in fp16, as the Trainer's --fp16 would."""
    return DType.fp16 if dtype is DType.bf16 and not gpu.supports_bf16 else dtype


def _best_per_gpu_count(plans: list[Plan]) -> list[Plan]:
    """One plan per (GPU kind, count): the cheapest, then the simplest sharding, then no recompute."""
    best: dict[tuple[str, int], Plan] = {}
    for p in plans:
        key = (p.gpu, p.num_gpus)
        rank = (round(p.usd_per_million_tokens, 6), SIMPLICITY[p.sharding], p.gradient_checkpointing)
        cur = best.get(key)
        if cur is None or rank < (round(cur.usd_per_million_tokens, 6), SIMPLICITY[cur.sharding], cur.gradient_checkpointing):
            best[key] = p
    return list(best.values())
