"""torchtune 0.6.1's own single-device step, traced in its own venv (validate/stacks/torchtune_trace.py
via memplan.validate.stack_envs: built on first use, never skipped), against the torchtune Stack's
estimate on the CPU kernels, per measured phase, within 3%."""

from __future__ import annotations

import pytest

from memplan.job import Job
from memplan.validate.stacks import torchtune_trace as tt

TOLERANCE = 0.03
JOBS = tt.matrix()
# Known outliers, strict xfails: {label: why}.
OUTLIERS: dict[str, str] = {
    "gemma-2b-L2-V8192 full bf16 b1 s512 ck0 k0": (
        "backward +3.4%: the shared walk's bottom-of-backward moment (estimate.py) counts every layer-0 gradient "
        "beside layer 0's activations and transients (1944 MiB); in the trace the backward peak is the tied "
        "gradient sum (aten.add of head and embedding gradients, three vocab x hidden buffers) beside every "
        "gradient but the embedding's (1880 MiB): Gemma's MLP (8 x hidden) makes layer 0's gradients a large "
        "share, and the transformers-5 estimate is +2.8% here too"
    ),
}


@pytest.fixture(scope="module")
def traces() -> list[dict]:
    return tt.trace_jobs(JOBS)  # one venv process for the whole matrix


def test_every_outlier_is_in_the_matrix():
    assert set(OUTLIERS) <= {tt.label(j) for j in JOBS}


@pytest.mark.parametrize("i", range(len(JOBS)), ids=[tt.label(j) for j in JOBS])
def test_estimate_within_3_percent_of_the_trace(i, traces, request):
    why = OUTLIERS.get(tt.label(JOBS[i]))
    if why:
        request.applymarker(pytest.mark.xfail(strict=True, reason=why))
    job, result = JOBS[i], traces[i]
    assert result["versions"]["torchtune"].startswith("0.6.1") and result["versions"]["torchao"].startswith("0.11.0")
    errors = {ph: (e - t) / t for ph, (e, t) in tt.compare(job, result).items()}
    bad = {ph: f"{err:+.2%}" for ph, err in errors.items() if abs(err) > TOLERANCE}
    assert not bad, f"{tt.label(job)}: estimate vs trace {bad}"


def test_the_trace_counts_torchtunes_parameters_as_memplan_does(traces):
    # the trace asserts the base-model count itself; its reply carries it
    from memplan.params import count_params
    from memplan.profiles import load_model

    for job, result in zip(JOBS, traces):
        assert result["params"] == count_params(load_model(job.model)).total


def test_refusals_name_what_torchtune_cannot_run():
    model = "meta-llama/Llama-2-7b-hf"
    cases = [
        (dict(method="lora", adapter_dtype="fp32"), "adapters in the model dtype"),
        (dict(method="lora", adapter_dtype="bf16", lora_targets=("q_proj", "gate_proj")), "whole MLP"),
        (dict(weight_dtype="fp32", compute_dtype="bf16"), "no autocast"),
        (dict(method="qlora"), "NF4Tensor"),
        (dict(model="tiiuae/falcon-7b"), "not falcon"),
    ]
    for kw, words in cases:
        job = Job(**{"model": model, "stack": "torchtune", **kw})
        with pytest.raises(ValueError, match=words):
            tt.request(job)
