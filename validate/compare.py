"""Predicted against measured, and the per-GPU constants the measurements calibrate."""

from __future__ import annotations

import statistics

from pydantic import BaseModel

from .results import Predicted, ResultRow

FIGURES = (
    ("peak_allocated_bytes", "allocated"),
    ("peak_reserved_bytes", "reserved"),
    ("device_used_bytes", "device used"),
)


def relative_error(predicted: int, measured: int | None) -> float | None:
    if not measured:
        return None
    return (predicted - measured) / measured


def describe_job(row: ResultRow) -> str:
    j = row.job
    name = j.model.rsplit("/", 1)[-1].removesuffix(".json")
    extra = " ckpt" if j.checkpointing else ""
    # a results file can hold a job under both allocator settings
    alloc = " expandable-segments" if j.expandable_segments else ""
    dtypes = j.base_weight_dtype.value + ("" if j.base_weight_dtype == j.compute_dtype else f"/{j.compute_dtype.value}")
    if j.task == "infer":
        attention = " eager" if j.attention == "eager" else ""
        return f"{name} infer {dtypes} b{j.micro_batch} s{j.seq_len} +{j.new_tokens}{attention}{alloc}"
    if j.num_gpus > 1:
        v = f" v{j.fsdp_version}" if j.sharding.startswith("fsdp") else ""
        extra += f" {j.sharding}{v} rank 0 of {j.num_gpus}"
    return f"{name} {j.method} {dtypes} b{j.micro_batch} s{j.seq_len} {j.optimizer}{extra}{alloc}"


def table(rows: list[ResultRow], recorded: list[Predicted] | None = None):
    """Predicted against measured; with `recorded` (the predictions the results file holds, row by
    row, when `rows` carry a re-estimate) an extra column shows what was predicted at measuring time."""
    from rich.table import Table

    from memplan.units import human

    t = Table(title="predicted vs measured (error = (predicted - measured) / measured)", title_justify="left")
    t.add_column("job")
    t.add_column("status")
    for _, label in FIGURES:
        t.add_column(f"{label}\npred / meas", justify="right")
        t.add_column("err", justify="right")
    if recorded is not None:
        t.add_column("recorded\nallocated", justify="right")
        t.add_column("err", justify="right")
    for i, row in enumerate(rows):
        cells = [describe_job(row), row.measured.status]
        for key, _ in FIGURES:
            pred = getattr(row.predicted, key)
            meas = getattr(row.measured, key)
            err = relative_error(pred, meas) if row.measured.status == "ok" else None
            cells.append(f"{human(pred)} / {human(meas) if meas else '-'}")
            cells.append(f"{err:+.1%}" if err is not None else "-")
        if recorded is not None:
            then = recorded[i].peak_allocated_bytes
            err = relative_error(then, row.measured.peak_allocated_bytes) if row.measured.status == "ok" else None
            cells.append(human(then))
            cells.append(f"{err:+.1%}" if err is not None else "-")
        t.add_row(*cells)
    return t


class Calibration(BaseModel):
    gpu: str
    rows: int
    cuda_context_bytes: int | None
    fragmentation: float | None
    median_abs_error: dict[str, float]


def calibrate(rows: list[ResultRow]) -> Calibration:
    """CUDA context: the median of what pynvml saw beyond torch's peak reserved (the context itself
    plus library handles and kernels loaded during the steps), over rows without paged optimizer
    states (which pynvml sees too); fragmentation: the median share reserved exceeds allocated at
    the peak; both from successful GPU rows."""
    ok = [r for r in rows if r.measured.status == "ok"]
    contexts = [
        r.measured.device_used_bytes - r.measured.peak_reserved_bytes
        for r in ok
        if r.measured.device_used_bytes and r.measured.peak_reserved_bytes and not r.job.optimizer.startswith("paged")
    ]
    frag = [
        r.measured.peak_reserved_bytes / r.measured.peak_allocated_bytes - 1
        for r in ok
        if r.measured.peak_reserved_bytes and r.measured.peak_allocated_bytes
    ]
    errors = {}
    for key, label in FIGURES:
        errs = [abs(e) for r in ok if (e := relative_error(getattr(r.predicted, key), getattr(r.measured, key))) is not None]
        if errs:
            errors[label] = statistics.median(errs)
    gpus = {r.environment.get("gpu") or r.environment.get("device", "?") for r in rows}
    return Calibration(
        gpu=", ".join(sorted(str(g) for g in gpus)),
        rows=len(ok),
        cuda_context_bytes=int(statistics.median(contexts)) if contexts else None,
        fragmentation=statistics.median(frag) if frag else None,
        median_abs_error=errors,
    )
