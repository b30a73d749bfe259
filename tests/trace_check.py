"""One check the family tests share: the estimate against the CPU trace of the job's real step."""

from __future__ import annotations

import pytest

from memplan import Job, estimate_memory
from memplan.profiles import load_model
from memplan.stacks import cpu_trace_stack


def trace_errors(job: Job) -> dict[str, float]:
    """Each measured phase's relative error of the estimate against the fake-tensor CPU trace:
    training at its second iteration (optimizer states allocated), generation's prefill and decode."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from memplan.validate.trace import trace_inference, trace_training

    infer = job.task == "infer"
    traced = trace_inference(job) if infer else trace_training(job)
    by_phase = estimate_memory(job, load_model(job.model), stack=cpu_trace_stack(job)).measured_phases()
    steady = 0 if infer else 1
    return {s.phase: (by_phase[s.phase] - s.peak_bytes) / s.peak_bytes for s in traced.timeline if s.iteration == steady}


def assert_matches_trace(job: Job, tolerance: float) -> None:
    errors = trace_errors(job)
    if job.task == "infer":
        assert list(errors) == ["prefill", "decode"][: len(errors)] and "prefill" in errors, list(errors)
    assert errors and all(abs(e) <= tolerance for e in errors.values()), {k: f"{v:+.2%}" for k, v in errors.items()}
