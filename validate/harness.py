"""Run a matrix of jobs, each in its own process, and append each result as it arrives."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from memplan.estimate import estimate_memory
from memplan.gpu import GpuProfile
from memplan.job import Job

from . import results
from .worker import Measurement


def worker_command(job: Job, device: str, steps: int, capacity: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "memplan.validate.worker", "--job", job.model_dump_json(), "--device", device,
           "--steps", str(steps)]
    if capacity is not None:
        cmd += ["--capacity-bytes", str(capacity)]
    return cmd


def run_one(job: Job, device: str, steps: int = 2, timeout_s: float = 900, capacity: int | None = None) -> Measurement:
    """The job in a fresh process: its CUDA context, allocator and any crash stay its own."""
    cmd = worker_command(job, device, steps, capacity)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
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
) -> list[results.ResultRow]:
    """Each job's row is appended to `out` as it finishes; no job starts once `time_budget_s` is spent."""
    rows = []
    started = time.monotonic()
    for job in jobs:
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            break
        measured = run_one(job, device, steps, timeout_s, capacity)
        row = results.ResultRow(
            job=job,
            predicted=predict(job, gpu, device),
            measured=measured,
            environment=environment,
            command=shlex.join(["python"] + worker_command(job, device, steps, capacity)[1:]),
            invocation=invocation,
            timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        results.append(out, row)
        rows.append(row)
        if on_result:
            on_result(row)
    return rows
