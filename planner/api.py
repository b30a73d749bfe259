"""The library entry point: names in, Estimate out (profiles resolved here, the core stays pure)."""

from __future__ import annotations

from typing import Any

from .estimate import estimate_memory
from .job import Job
from .results import Estimate


def estimate(model: str | None = None, *, job: Job | None = None, **fields: Any) -> Estimate:
    """`memplan.estimate("falcon-7b", method="qlora", micro_batch=4)` or `memplan.estimate(job=Job(...))`."""
    from memplan.profiles import load_gpu, load_model

    if job is None:
        if model is None:
            raise TypeError("estimate() needs a model name or a Job")
        job = Job(model=model, **fields)
    arch = load_model(job.model)
    gpu = load_gpu(job.gpu) if job.gpu else None
    return estimate_memory(job, arch, gpu)
