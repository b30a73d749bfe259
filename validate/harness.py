"""Run a matrix of jobs, each in its own process, and append each result as it arrives."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from memplan.estimate import estimate_memory
from memplan.gpu import GpuProfile
from memplan.job import Job

from . import results
from .worker import ALLOC_CONF, Measurement


# One name per way `memplan validate --allocator` runs the matrix: the expandable_segments setting of
# each run of a job, in order. "both" runs each job twice, back to back, so a time budget cuts no pair.
ALLOCATORS: dict[str, tuple[bool, ...]] = {"default": (False,), "expandable": (True,), "both": (False, True)}


def conf_items(value: str) -> list[tuple[str, str]]:
    """The key:value pairs of a PYTORCH_CUDA_ALLOC_CONF value, split at the commas outside brackets
    (torch's list values: roundup_power2_divisions:[64:8,256:4,>:1], c10/core/AllocatorConfig.h)."""
    parts, depth, cur = [], 0, ""
    for ch in value:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        key, _, val = part.strip().partition(":")
        if key.strip():
            out.append((key.strip(), val.strip()))
    return out


def user_conf(environ: Mapping[str, str]) -> str:
    """The allocator configuration the user set: PYTORCH_CUDA_ALLOC_CONF, else PYTORCH_ALLOC_CONF (the
    order torch reads them in, c10/cuda/CUDAAllocatorConfig.h `instance()`)."""
    value = environ.get(ALLOC_CONF)
    return value if value is not None else environ.get("PYTORCH_ALLOC_CONF", "")


def expandable_in(environ: Mapping[str, str]) -> bool:
    """Whether the user's configuration turns expandable segments on (torch accepts True/true)."""
    return any(k == "expandable_segments" and v.lower() == "true" for k, v in conf_items(user_conf(environ)))


def merged_conf(user: str, expandable_segments: bool) -> str:
    """The user's configuration with expandable_segments set as the row runs: every other key
    (max_split_size_mb, garbage_collection_threshold, ...) kept as given, in its order."""
    items = [(k, v) for k, v in conf_items(user) if k != "expandable_segments"]
    if expandable_segments:
        items.append(("expandable_segments", "True"))
    return ",".join(f"{k}:{v}" for k, v in items)


def worker_env(environ: Mapping[str, str], expandable_segments: bool) -> dict[str, str]:
    """The environment of a worker measuring a job with this setting: `environ` with the merged
    configuration in PYTORCH_CUDA_ALLOC_CONF (unset when empty) and PYTORCH_ALLOC_CONF folded into it,
    so the one variable the worker records is the one torch reads."""
    env = dict(environ)
    conf = merged_conf(user_conf(environ), expandable_segments)
    env.pop("PYTORCH_ALLOC_CONF", None)
    env.pop(ALLOC_CONF, None)
    if conf:
        env[ALLOC_CONF] = conf
    return env


def with_allocator(job: Job, expandable_segments: bool) -> Job:
    """The job as measured under this setting: the row's estimate reads the same field."""
    return Job.model_validate({**job.model_dump(), "expandable_segments": expandable_segments})


def worker_command(job: Job, device: str, steps: int, capacity: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "memplan.validate.worker", "--job", job.model_dump_json(), "--device", device,
           "--steps", str(steps)]
    if capacity is not None:
        cmd += ["--capacity-bytes", str(capacity)]
    return cmd


def run_one(job: Job, device: str, steps: int = 2, timeout_s: float = 900, capacity: int | None = None) -> Measurement:
    """The job in a fresh process: its CUDA context, allocator and any crash stay its own."""
    cmd = worker_command(job, device, steps, capacity)
    env = worker_env(os.environ, job.expandable_segments)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return Measurement(status="error", device=device, steps=steps, error=f"timed out after {timeout_s:.0f} s")
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        return Measurement.model_validate(json.loads(last))
    except (json.JSONDecodeError, ValueError):
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return Measurement(status="error", device=device, steps=steps, error=f"worker exited {proc.returncode}: {tail[-500:]}")


def predict(job: Job, gpu: GpuProfile | None, device: str) -> results.Predicted:
    from memplan.profiles import load_model

    from memplan.stacks import get

    stack = get(job.stack)
    est = estimate_memory(job, load_model(job.model), gpu, stack.on_cpu() if device == "cpu" else stack)
    return results.Predicted(
        peak_allocated_bytes=est.peak_allocated_bytes,
        peak_reserved_bytes=est.peak_reserved_bytes,
        device_used_bytes=est.device_used_bytes,
        peak_phase=est.peak_phase,
    )


def run_matrix(
    jobs: Iterable[Job],
    out: Path,
    device: str,
    gpu: GpuProfile | None,
    environment: dict,
    steps: int = 2,
    timeout_s: float = 900,
    capacity: int | None = None,
    on_result: Callable[[results.ResultRow], None] | None = None,
    invocation: str = "",
    time_budget_s: float | None = None,
    allocators: Sequence[bool] | None = None,
) -> list[results.ResultRow]:
    """Each job's row is appended to `out` as it finishes; no job starts once `time_budget_s` is spent.
    With `allocators` (expandable_segments settings, ALLOCATORS), each job runs once per setting, back
    to back, the setting in its row's job; None runs each job under its own."""
    rows = []
    started = time.monotonic()
    for base in jobs:
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            break
        for job in [with_allocator(base, s) for s in allocators] if allocators is not None else [base]:
            measured = run_one(job, device, steps, timeout_s, capacity)
            conf = worker_env(os.environ, job.expandable_segments).get(ALLOC_CONF)
            row = results.ResultRow(
                job=job,
                predicted=predict(job, gpu, device),
                measured=measured,
                environment=environment,
                command=shlex.join([*([f"{ALLOC_CONF}={conf}"] if conf else []), "python",
                                    *worker_command(job, device, steps, capacity)[1:]]),
                invocation=invocation,
                timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            results.append(out, row)
            rows.append(row)
            if on_result:
                on_result(row)
    return rows
