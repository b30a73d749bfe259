"""The GPU harness's logic on the CPU: matrix, one process per job, JSONL as produced, OOM and
crashes recorded, comparison and calibration. Real steps on tiny models, QLoRA through real
bitsandbytes 4-bit layers on the CPU."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan import Job, estimate_memory  # noqa: E402
from memplan.profiles import load_model  # noqa: E402
from memplan.validate import compare, harness, results  # noqa: E402
from memplan.validate.matrix import default_matrix, quick_matrix  # noqa: E402
from memplan.validate.worker import Measurement  # noqa: E402

from .conftest import DATA  # noqa: E402

TINY = str(DATA / "tiny-llama.json")
# Real CPU steps against the estimate's the CPU trace stack figure.
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "quick.jsonl"
    seen_on_disk = []

    def check_written(row):
        seen_on_disk.append(len(out.read_text().splitlines()))

    rows = harness.run_matrix(quick_matrix(), out, "cpu", None, {"device": "cpu"}, on_result=check_written)
    return out, rows, seen_on_disk


def test_each_result_is_on_disk_when_it_arrives(quick_rows):
    out, rows, seen = quick_rows
    assert seen == [1, 2, 3, 4, 5]
    assert [r.job for r in results.read(out)] == [r.job for r in rows]


def test_quick_matrix_measures_every_method_within_tolerance(quick_rows):
    _, rows, _ = quick_rows
    assert {r.job.method for r in rows if r.job.task == "train"} == {"full", "lora", "qlora"}
    assert any(r.job.task == "infer" and r.job.new_tokens for r in rows)  # a generation, prefill and decode
    assert any(r.job.mixed_precision for r in rows)  # fp32 weights under bf16 autocast
    for row in rows:
        assert row.measured.status == "ok", row.measured.error
        err = compare.relative_error(row.predicted.peak_allocated_bytes, row.measured.peak_allocated_bytes)
        assert abs(err) <= TOLERANCE, f"{compare.describe_job(row)}: {err:+.1%}"
        assert row.command.startswith("python -m memplan.validate.worker")


def test_qlora_model_bytes_equal_estimated_weights_and_adapters():
    from memplan.validate.build import build
    from memplan.validate.worker import model_bytes

    job = Job(model=TINY, method="qlora", lora_targets="all-linear")
    arch = load_model(TINY)
    est = estimate_memory(job, arch)
    built = model_bytes(build(job, arch, "cpu"))
    expected = est.component("weights").bytes + est.component("adapters").bytes
    assert abs(built - expected) / expected < 1e-4


def test_oom_is_a_result_and_the_matrix_goes_on(tmp_path):
    out = tmp_path / "r.jsonl"
    jobs = [Job(model=TINY, method="full", micro_batch=4, seq_len=512), Job(model=TINY, method="lora", micro_batch=1, seq_len=64)]
    rows = harness.run_matrix(jobs, out, "cpu", None, {}, capacity=20_000_000)
    assert [r.measured.status for r in rows] == ["oom", "ok"]
    assert "capacity" in rows[0].measured.error
    assert len(out.read_text().splitlines()) == 2


def test_a_crashing_worker_is_recorded(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text((DATA / "tiny-llama.json").read_text())
    job = Job(model=str(cfg), method="lora", micro_batch=1, seq_len=32)
    cfg.unlink()  # the worker cannot load it: it exits non-zero
    m = harness.run_one(job, "cpu")
    assert m.status == "error" and "exited" in m.error


def test_worker_prints_one_measurement_line():
    job = Job(model=TINY, method="lora", micro_batch=1, seq_len=32)
    out = subprocess.run(
        [sys.executable, "-m", "memplan.validate.worker", "--device", "cpu", "--job", job.model_dump_json()],
        capture_output=True, text=True, timeout=300,
    )
    m = Measurement.model_validate(json.loads(out.stdout.strip().splitlines()[-1]))
    assert m.status == "ok" and m.peak_allocated_bytes > 0


def test_default_matrix_covers_what_users_run():
    jobs = default_matrix()
    qlora = [j for j in jobs if j.method == "qlora"]
    assert all(j.base_weight_dtype.value == "nf4" and j.double_quant and j.checkpointing for j in qlora)
    assert {j.optimizer for j in qlora} >= {"paged_adamw", "paged_adamw_8bit"}
    assert {j.lora_targets for j in qlora} == {"default", "all-linear"}
    assert {j.method for j in jobs} == {"full", "lora", "qlora"}
    for j in jobs:  # every job is a valid estimate
        estimate_memory(j, load_model(j.model))


def _row(ctx, alloc, reserved, used, status="ok", optimizer="adamw"):
    job = Job(model="llama-2-7b", optimizer=optimizer)
    return results.ResultRow(
        job=job,
        predicted=results.Predicted(peak_allocated_bytes=100, peak_reserved_bytes=110, device_used_bytes=120, peak_phase="backward"),
        measured=Measurement(status=status, device="cuda", steps=2, peak_allocated_bytes=alloc, peak_reserved_bytes=reserved,
                             device_used_bytes=used, cuda_context_bytes=ctx),
        environment={"gpu": "NVIDIA H100 80GB HBM3"},
        command="python -m memplan.validate.worker",
        timestamp="2026-11-24T00:00:00+00:00",
    )


def test_calibration_by_hand():
    rows = [_row(500, 100, 110, 625), _row(520, 100, 120, 640), _row(510, 80, 100, 610), _row(None, None, None, None, "oom"),
            _row(500, 100, 110, 9000, optimizer="paged_adamw")]
    cal = compare.calibrate(rows[:4])
    assert cal.rows == 3
    # what pynvml sees beyond peak reserved: 515, 520, 510
    assert cal.cuda_context_bytes == 515
    # a paged optimizer's unified memory is not context
    assert compare.calibrate(rows).cuda_context_bytes == 515
    assert cal.fragmentation == pytest.approx(0.2)  # reserved/allocated - 1: 0.1, 0.2, 0.25
    assert cal.median_abs_error["allocated"] == pytest.approx(0.0)  # 100 vs 100, 100, 80 -> 0, 0, 0.25


def test_compare_table_renders(quick_rows):
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(compare.table(quick_rows[1]))
    text = console.export_text()
    assert "tiny-llama qlora nf4/bf16" in text and "MiB" in text


def test_validate_without_gpu_is_one_line_exit_2():
    out = subprocess.run([sys.executable, "-m", "memplan.cli", "validate"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "GPU" in out.stderr


def test_alloc_trace_replays_the_peak():
    """The allocator-trace replay finds the moment of peak and what was live then; frees of blocks
    allocated before the record started are ignored."""
    from memplan.validate.alloc_trace import live_at_peak

    events = [
        {"action": "alloc", "addr": 1, "size": 10},
        {"action": "alloc", "addr": 2, "size": 5},
        {"action": "free_requested", "addr": 1, "size": 10},
        {"action": "alloc", "addr": 3, "size": 7},
        {"action": "free_requested", "addr": 99, "size": 3},
    ]
    peak, live = live_at_peak(events)
    assert peak == 15
    assert sorted(b["addr"] for b in live) == [1, 2]


def test_op_timeline_on_a_tiny_layer():
    """One layer's op-by-op record runs on the CPU: the backward of a tiny Llama layer peaks above
    its forward, and the record names the ops around each peak."""
    from memplan.validate.probes import op_timeline

    rep = op_timeline(TINY, "cpu", "fp32", 2, 64)
    assert rep["backward_peak_bytes"] > rep["forward_peak_bytes"] > 0
    assert any(op.startswith("mm:") for op in rep["forward_ops"])
