"""Validation results: one JSON line per job, appended as each finishes, so a crash loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from memplan.job import Job
from memplan.phases import PhaseName

from .worker import Measurement


class Predicted(BaseModel):
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_used_bytes: int
    peak_phase: PhaseName


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
    """The rows of a results file; a line that is not JSON, or not a result row, is bad input named
    by its line number (MemplanInputError)."""
    from pydantic import ValidationError

    from memplan.errors import MemplanInputError, validation_message

    rows = []
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise MemplanInputError(f"results file {str(path)!r} is not text: give a .jsonl file written by memplan validate") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemplanInputError(
                f"results file {str(path)!r} line {n} is not JSON ({exc.msg}): give a .jsonl file written by memplan validate"
            ) from None
        try:
            rows.append(ResultRow.model_validate(data))
        except ValidationError as exc:
            raise MemplanInputError(
                f"results file {str(path)!r} line {n} is not a result row ({validation_message(exc)}): "
                "give a .jsonl file written by memplan validate"
            ) from None
    return rows
