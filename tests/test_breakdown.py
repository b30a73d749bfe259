"""The breakdown adds up: the rows live at a phase sum to that phase's allocated bytes, to the
byte, and with the rows outside torch's pool to the device figure; every row lists the phases it
is live in."""

import itertools

import pytest

from memplan.stacks import get

from memplan import Job, estimate_memory
from memplan.errors import MemplanInputError
from memplan.profiles import load_gpu, load_model

MODELS = ["llama-2-7b", "falcon-7b", "gemma-2b", "phi-2", "mixtral-8x7b", "starcoder", "qwen3-8b"]
TRAIN = [
    dict(method="full"), dict(method="lora"), dict(method="qlora"), dict(method="qlora", autocast=True),
    dict(method="full", weight_dtype="fp32"), dict(method="lora", lora_targets="all-linear", optimizer="paged_adamw"),
    dict(method="full", num_gpus=4, sharding="zero3"), dict(method="full", num_gpus=2, sharding="ddp"),
    dict(method="lora", num_gpus=8, sharding="fsdp_full", cpu_offload=True),
    dict(method="full", optimizer="sgd", attention="eager"),
]
SHAPES = [dict(micro_batch=1, seq_len=256), dict(micro_batch=4, seq_len=1024)]
GRID = [dict(model=m, **t, **s, gradient_checkpointing=ck)
        for m, t, s, ck in itertools.product(MODELS, TRAIN, SHAPES, (False, True))]
GRID += [dict(model=m, task="infer", micro_batch=b, seq_len=s, new_tokens=n, weight_dtype=w)
         for m, (b, s), n, w in itertools.product(MODELS, [(1, 128), (8, 1024)], (0, 32), (None, "nf4"))]


def _jobs():
    for fields in GRID:
        try:
            yield Job(**fields)
        except MemplanInputError:
            continue


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_rows_at_every_phase_sum_to_the_phase(platform):
    checked = 0
    gpu = load_gpu("H100-80GB")
    for job in _jobs():
        est = estimate_memory(job, load_model(job.model), gpu, get(job.stack).on_cpu() if platform == "cpu" else None)
        for phase in est.phases:
            rows = est.at_phase(phase.name)
            assert sum(b for _, b in rows) == phase.allocated_bytes, (job, phase.name)
        assert sum(b for _, b in est.at_phase(est.peak_phase)) == est.peak_allocated_bytes
        outside = sum(c.bytes for c in est.components if c.pool != "torch")
        assert est.peak_allocated_bytes + outside == est.device_used_bytes, job
        for c in est.components:
            assert c.bytes > 0 and c.phases, (job, c.name)
            if c.pool == "torch":
                assert list(c.phase_bytes) == c.phases and c.bytes == max(c.phase_bytes.values())
        checked += 1
    assert checked > 200


def test_state_is_live_in_loss_backward():
    """Weights, adapters and optimizer states are live through the loss backward, the peak phase of
    many LoRA jobs with a large vocabulary."""
    est = estimate_memory(Job(model="llama-3-8b", method="lora", micro_batch=4, seq_len=2048),
                          load_model("llama-3-8b"))
    assert est.peak_phase == "loss backward"
    live = {c.name for c, _ in est.at_phase("loss backward")}
    assert {"weights", "adapters", "optimizer states", "activations", "logits and loss"} <= live
    assert "gradients" not in live  # none exist before the first layer's backward


def test_qlora_peak_rows_include_backward_terms():
    """Llama-2-7B QLoRA b4 s2048: the peak is inside backward, where the recomputed layer, its
    backward transients and the dequantized weight are rows of their own (they used to be missing,
    leaving rows that summed to 8.40 GiB under an 11.47 GiB peak)."""
    est = estimate_memory(Job(model="llama-2-7b", method="qlora", micro_batch=4, seq_len=2048), load_model("llama-2-7b"))
    assert est.peak_phase == "backward"
    at_peak = dict((c.name, b) for c, b in est.at_phase("backward"))
    assert {"recomputed layer", "backward transients", "dequantized weight"} <= set(at_peak)
    assert at_peak["dequantized weight"] == 11008 * 4096 * 2  # the largest nf4 linear, in bf16
    assert sum(at_peak.values()) == est.peak_allocated_bytes


def test_autocast_says_what_is_modelled():
    plain = estimate_memory(Job(model="mistral-7b", method="qlora"), load_model("mistral-7b"))
    auto = estimate_memory(Job(model="mistral-7b", method="qlora", autocast=True), load_model("mistral-7b"))
    assert "fp32 logits" in plain.component("logits and loss").formula
    assert "2 B logits" in auto.component("logits and loss").formula
    assert any("the logits are fp32" in n for n in plain.notes)
    assert not any("the logits are fp32" in n for n in auto.notes)
    assert any("bf16 logits" in n for n in auto.notes)
    from memplan.report import _title

    assert "bf16 autocast" in _title(auto) and "bf16 autocast" not in _title(plain)
