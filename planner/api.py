"""The library entry point: names in, Estimate out (profiles resolved here, the core stays pure)."""

from __future__ import annotations

from typing import Any

from .errors import MemplanInputError
from .estimate import estimate_memory
from .job import Job
from .results import Estimate


def estimate(model: str | None = None, *, job: Job | None = None, **fields: Any) -> Estimate:
    """`memplan.estimate("falcon-7b", method="qlora", micro_batch=4)` or `memplan.estimate(job=Job(...))`.

    Give either a model name with Job fields, or a Job alone: a model or fields beside a Job would
    be silently dropped, so they are refused. Without a `stack` field the installed transformers'
    major version is modelled (a Job keeps its own `stack`, default transformers-5). Bad input of any kind (an unknown model or GPU, a field
    out of range, an option the job never reads) raises `memplan.MemplanInputError`, a ValueError
    whose message is the line the CLI prints.
    """
    from memplan.profiles import load_gpu, load_model

    if job is None:
        if model is None:
            raise MemplanInputError("estimate() needs a model name or a Job (job=memplan.Job(model=...))")
        if fields.get("stack") is None:
            from .stacks.installed import default_stack  # the installed transformers, read from its metadata

            fields["stack"] = default_stack()
        job = Job(model=model, **fields)
    elif model is not None or fields:
        given = ", ".join([*(["model"] if model is not None else []), *fields])
        raise MemplanInputError(
            f"estimate() takes a Job or a model with fields, not both: got job=Job(model={job.model!r}) and {given}; "
            "put them in the Job"
        )
    arch = load_model(job.model)
    gpu = load_gpu(job.gpu) if job.gpu else None
    return estimate_memory(job, arch, gpu)


def kv_budget(model: str | None = None, *, job: Job | None = None, **fields: Any):
    """vLLM's KV-cache budget for a serving job: `memplan.kv_budget("llama-3-8b", gpu="H100-80GB",
    max_model_len=8192)` (task infer and engine vllm are implied) -> ServingEstimate
    (planner/serving.py): blocks, tokens, concurrency."""
    from memplan.profiles import load_gpu, load_model

    from .serve import serve

    if job is None:
        if model is None:
            raise MemplanInputError("kv_budget() needs a model name or a Job (job=memplan.Job(model=..., engine='vllm'))")
        job = Job(model=model, **{"task": "infer", "engine": "vllm", **fields})
    elif model is not None or fields:
        raise MemplanInputError("kv_budget() takes a Job or a model with fields, not both: put them in the Job")
    return serve(job, load_model(job.model), load_gpu(job.gpu) if job.gpu else None)
