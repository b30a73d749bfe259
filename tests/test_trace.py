"""The analytic estimate against the CPU trace of the real transformers training step.

Tolerance: the step's peak allocated bytes within 3% of the trace on every row, and each phase's
peak (forward, backward, optimizer step) within 5%, so a drifting activation formula fails even
where the optimizer step is the overall peak. The estimate runs on the stack's CPU kernels (cpu_trace_stack), which follow
the CPU kernels the trace takes (docs/activations.md says where they differ from CUDA).
"""

import itertools

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan import Job, estimate_memory  # noqa: E402
from memplan.stacks import cpu_trace_stack  # noqa: E402
from memplan.profiles import load_model  # noqa: E402
from memplan.validate.trace import trace_training  # noqa: E402

from .conftest import DATA  # noqa: E402

PEAK_TOLERANCE = 0.03
PHASE_TOLERANCE = 0.05

REAL = ["llama-2-7b", "mistral-7b", "falcon-7b", "gemma-2b", "phi-2", "qwen2.5-7b", "qwen3-8b"]
TINY = sorted(str(p) for p in DATA.glob("tiny-*.json"))


def tiny(family: str) -> str:
    return str(DATA / f"tiny-{family}.json")

# (checkpointing, attention): eager matters only where activations are kept
MODES = [(False, "sdpa"), (False, "eager"), (True, "sdpa")]
rows = [
    dict(model=m, method=method, gradient_checkpointing=ck, attention=attn, micro_batch=2, seq_len=256)
    for m, method, (ck, attn) in itertools.product(REAL, ["full", "lora"], MODES)
] + [
    dict(model=m, method=method, gradient_checkpointing=ck, attention=attn, micro_batch=b, seq_len=s)
    for m, method, (ck, attn), (b, s) in itertools.product(TINY, ["full", "lora"], MODES, [(1, 128), (3, 384)])
    # GPT-BigCode's own eager attention (fp32 upcast, scaling options) is not modelled: docs/activations.md
    if not (m.endswith("tiny-starcoder.json") and attn == "eager")
] + [
    # LoRA variants: all linear layers, dropout (peft keeps the dropped copy and its mask), rank
    dict(model="llama-2-7b", method="lora", lora_targets="all-linear", micro_batch=2, seq_len=512),
    dict(model="llama-2-7b", method="lora", lora_dropout=0.1, micro_batch=2, seq_len=512),
    dict(model=tiny("falcon"), method="lora", lora_rank=64, lora_targets="all-linear", micro_batch=4, seq_len=256),
    # StarCoder at its real size (15.5B, GPT-BigCode, multi-query, dropout), batch 1
    dict(model="starcoder", method="lora", micro_batch=1, seq_len=512),
    # mixed precision (HF Trainer bf16=True): fp32 weights under bf16 autocast
    *[dict(model=tiny(f), method="full", weight_dtype="fp32", compute_dtype="bf16", gradient_checkpointing=ck,
           micro_batch=2, seq_len=256) for f in ("llama", "gemma", "falcon", "phi", "starcoder") for ck in (False, True)],
    dict(model="llama-2-7b", method="full", weight_dtype="fp32", compute_dtype="bf16", micro_batch=1, seq_len=512),
    # fp32 everything, and SGD with momentum
    dict(model=tiny("llama"), method="full", weight_dtype="fp32", compute_dtype="fp32", micro_batch=2, seq_len=256),
    dict(model=tiny("llama"), method="full", optimizer="sgd_momentum", micro_batch=2, seq_len=256),
]


def _id(row):
    name = row["model"].rsplit("/", 1)[-1].removesuffix(".json")
    rest = "-".join(f"{k}={v}" for k, v in row.items() if k != "model")
    return f"{name}-{rest}"


# Known gaps, kept visible: checkpointed layers whose attention goes through the math kernel
# (multi-query Falcon and GPT-BigCode on the CPU) hold transients during recomputation that the
# model does not yet follow to 5% per phase (docs/activations.md). strict: a fix makes them fail.
KNOWN_GAPS = {
    "tiny-starcoder-method=full-gradient_checkpointing=True-attention=sdpa-micro_batch=1-seq_len=128",
    "tiny-starcoder-method=lora-gradient_checkpointing=True-attention=sdpa-micro_batch=3-seq_len=384",
    "tiny-falcon-method=full-weight_dtype=fp32-compute_dtype=bf16-gradient_checkpointing=True-micro_batch=2-seq_len=256",
    "tiny-starcoder-method=full-weight_dtype=fp32-compute_dtype=bf16-gradient_checkpointing=True-micro_batch=2-seq_len=256",
}
params = [
    pytest.param(r, id=_id(r), marks=pytest.mark.xfail(strict=True, reason="known gap")) if _id(r) in KNOWN_GAPS
    else pytest.param(r, id=_id(r))
    for r in rows
]


@pytest.mark.parametrize("row", params)
def test_estimate_matches_trace(row):
    job = Job(**row)
    traced = trace_training(job)
    est = estimate_memory(job, load_model(job.model), stack=cpu_trace_stack(job))
    err = (est.peak_allocated_bytes - traced.peak_allocated_bytes) / traced.peak_allocated_bytes
    assert abs(err) <= PEAK_TOLERANCE, f"peak {err:+.2%}"
    by_phase = est.measured_phases()
    for snap in traced.timeline:
        if snap.iteration == 1:
            e = by_phase[snap.phase]
            phase_err = (e - snap.peak_bytes) / snap.peak_bytes
            assert abs(phase_err) <= PHASE_TOLERANCE, f"{snap.phase} {phase_err:+.2%}"


def test_trace_sees_optimizer_state_in_second_iteration():
    traced = trace_training(Job(model=tiny("llama"), method="full", micro_batch=1, seq_len=64))
    first, second = traced.timeline[0], traced.timeline[3]
    assert first.phase == second.phase == "forward"
    assert first.optimizer_bytes == 0
    # torch AdamW: two states per parameter in the parameter dtype
    assert second.optimizer_bytes == pytest.approx(2 * second.params_bytes, rel=0.01)


def test_trace_refuses_quantized_bases():
    with pytest.raises(ValueError, match="Params4bit"):
        trace_training(Job(model=tiny("llama"), method="qlora"))
