"""Validation results: one JSON line per job, appended as each finishes, so a crash loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from memplan.job import Job

from .worker import Measurement


class Predicted(BaseModel):
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_used_bytes: int
    peak_phase: str


class ResultRow(BaseModel):
    job: Job
    predicted: Predicted
    measured: Measurement
    environment: dict
    command: str  # the worker process that measured this row
    invocation: str = ""  # the memplan validate command that ran the matrix
    timestamp: str


def append(path: Path, row: ResultRow) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(row.model_dump_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[ResultRow]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(ResultRow.model_validate(json.loads(line)))
    return rows
