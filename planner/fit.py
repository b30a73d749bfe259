"""The inverse questions: the largest micro-batch or batch, and the longest sequence or context,
that fit one GPU. Memory never falls as batch or sequence grows (tests/test_properties.py), so a
doubling search followed by bisection finds the boundary."""

from __future__ import annotations

from pydantic import BaseModel

from .architecture import ModelArch
from .errors import MemplanInputError
from .estimate import estimate_memory
from .gpu import DEFAULT_SAFETY_MARGIN, GpuProfile
from .job import Job

MAX_BATCH = 1 << 16


def check_safety_margin(margin: float) -> float:
    if not 0 <= margin < 1:
        raise MemplanInputError(f"safety-margin must be in [0, 1), got {margin}")
    return margin


def fits_with_margin(device_used_bytes: int, gpu: GpuProfile, margin: float) -> bool:
    """The one rule for "fits" when a margin is kept: device used within (1 - margin) of the card."""
    return device_used_bytes <= gpu.memory_bytes * (1 - margin)


class FitAnswer(BaseModel):
    field: str
    largest: int  # 0: not even 1 fits
    limit: int  # the search's upper bound (the model's maximum positions for sequences)
    device_used_bytes: int | None
    gpu_memory_bytes: int
    margin: float  # share of the card the answer leaves free at least

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.device_used_bytes is None else self.gpu_memory_bytes - self.device_used_bytes


def _fits(job: Job, arch: ModelArch, gpu: GpuProfile, margin: float) -> tuple[bool, int]:
    est = estimate_memory(job, arch, gpu)
    return fits_with_margin(est.device_used_bytes, gpu, margin), est.device_used_bytes


def largest(job: Job, arch: ModelArch, gpu: GpuProfile, field: str, margin: float = DEFAULT_SAFETY_MARGIN) -> FitAnswer:
    """Largest value of `field` ("micro_batch" or "seq_len") for which `job` fits `gpu` with `margin` free."""
    check_safety_margin(margin)
    if field == "seq_len":
        limit = arch.max_positions - (job.new_tokens if job.task == "infer" else 0)
    elif field == "micro_batch":
        limit = MAX_BATCH
    else:
        raise MemplanInputError(f"cannot search {field!r}: use micro_batch or seq_len")

    def check(v: int):
        return _fits(job.model_copy(update={field: v}), arch, gpu, margin)

    ok, used = check(1)
    if not ok:
        return FitAnswer(field=field, largest=0, limit=limit, device_used_bytes=None, gpu_memory_bytes=gpu.memory_bytes,
                         margin=margin)
    lo, lo_used, hi = 1, used, 2
    while hi <= limit:
        ok, used = check(hi)
        if not ok:
            break
        lo, lo_used, hi = hi, used, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, used = check(mid)
        lo, lo_used, hi = (mid, used, hi) if ok else (lo, lo_used, mid)
    return FitAnswer(field=field, largest=lo, limit=limit, device_used_bytes=lo_used, gpu_memory_bytes=gpu.memory_bytes,
                     margin=margin)
