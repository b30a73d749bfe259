"""The allocator picture `memplan validate` records: the worker's environment under each
expandable_segments setting, the memory_stats() fold, the Measurement's new fields (old rows still
read), and `--allocator` / `--expandable-segments` on the command line, end to end on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.validate import harness, results
from memplan.validate.worker import AllocatorMeasured, Measurement, allocator_measured, fold_peaks

RESULTS = Path(__file__).resolve().parent.parent / "validate" / "results"


# --- the worker's environment --------------------------------------------------------------------

def test_expandable_is_added_to_an_empty_environment():
    env = harness.worker_env({"PATH": "/bin"}, True)
    assert env == {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def test_default_setting_with_nothing_set_leaves_the_variable_unset():
    assert "PYTORCH_CUDA_ALLOC_CONF" not in harness.worker_env({"PATH": "/bin"}, False)


def test_the_users_other_keys_are_kept_in_order_and_their_setting_replaced():
    user = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:False,garbage_collection_threshold:0.6"}
    on = harness.worker_env(user, True)["PYTORCH_CUDA_ALLOC_CONF"]
    assert on == "max_split_size_mb:128,garbage_collection_threshold:0.6,expandable_segments:True"
    off = harness.worker_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:64"}, False)
    assert off["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    # only expandable segments: the default run drops it and with it the variable
    assert "PYTORCH_CUDA_ALLOC_CONF" not in harness.worker_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, False)


def test_a_bracketed_list_value_is_one_item():
    user = {"PYTORCH_CUDA_ALLOC_CONF": "roundup_power2_divisions:[64:8,256:4,>:1], expandable_segments:True"}
    assert harness.worker_env(user, False)["PYTORCH_CUDA_ALLOC_CONF"] == "roundup_power2_divisions:[64:8,256:4,>:1]"
    assert harness.conf_items("a:1,b:[x,y],,c:2") == [("a", "1"), ("b", "[x,y]"), ("c", "2")]


def test_pytorch_alloc_conf_is_folded_into_the_one_variable():
    env = harness.worker_env({"PYTORCH_ALLOC_CONF": "max_split_size_mb:256"}, True)
    assert "PYTORCH_ALLOC_CONF" not in env
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256,expandable_segments:True"
    # torch reads PYTORCH_CUDA_ALLOC_CONF first: the other is not read when both are set
    both = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64", "PYTORCH_ALLOC_CONF": "max_split_size_mb:256"}
    assert harness.worker_env(both, False) == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}


@pytest.mark.parametrize("conf, on", [("expandable_segments:True", True), ("max_split_size_mb:64,expandable_segments:true", True),
                                      ("expandable_segments:False", False), ("max_split_size_mb:64", False), ("", False)])
def test_the_users_setting_is_read(conf, on):
    assert harness.expandable_in({"PYTORCH_CUDA_ALLOC_CONF": conf}) is on


def test_each_allocator_choice_names_its_settings():
    assert harness.ALLOCATORS == {"default": (False,), "expandable": (True,), "both": (False, True)}


# --- memory_stats() into the row -----------------------------------------------------------------

def test_peaks_are_folded_over_the_phases_and_counts_read_at_the_end():
    forward = {"segment.all.peak": 7, "reserved_bytes.large_pool.peak": 900, "reserved_bytes.small_pool.peak": 40,
               "inactive_split_bytes.all.peak": 50, "active_bytes.all.peak": 800}
    backward = {"segment.all.peak": 9, "reserved_bytes.large_pool.peak": 700, "reserved_bytes.small_pool.peak": 60,
                "inactive_split_bytes.all.peak": 30, "active_bytes.all.peak": 850}
    acc = fold_peaks(fold_peaks({}, forward), backward)
    # after the last phase's reset, the final read's peaks cover almost nothing
    final = {"segment.all.peak": 8, "reserved_bytes.large_pool.peak": 10, "segment.all.current": 8,
             "segment.small_pool.current": 3, "segment.large_pool.current": 5, "num_alloc_retries": 2, "num_ooms": 0,
             "allocated_bytes.all.peak": 10**9}
    m = allocator_measured(acc, final, {"settings": "expandable_segments:True", "backend": "native", "current_allocator": None})
    assert m == AllocatorMeasured(segments=8, peak_segments=9, small_pool_segments=3, large_pool_segments=5,
                                  peak_reserved_small_pool_bytes=60, peak_reserved_large_pool_bytes=900,
                                  peak_inactive_split_bytes=50, peak_active_bytes=850, num_alloc_retries=2, num_ooms=0,
                                  settings="expandable_segments:True", backend="native")
    assert acc["segment.all.peak"] == 9  # the caller's fold is not changed by the final read


def test_a_torch_without_some_keys_leaves_them_none():
    m = allocator_measured({}, {"segment.all.current": 4}, {"settings": None, "backend": None, "current_allocator": None})
    assert m.segments == 4 and m.peak_segments is None and m.num_ooms is None


# --- the Measurement and committed rows ----------------------------------------------------------

def test_measurement_round_trips_with_the_new_fields():
    m = Measurement(status="ok", device="cuda", steps=2, peak_allocated_bytes=10, alloc_conf="expandable_segments:True",
                    allocator=AllocatorMeasured(segments=3, peak_segments=4, num_alloc_retries=0, backend="native"))
    back = Measurement.model_validate_json(m.model_dump_json())
    assert back == m and back.allocator.peak_segments == 4


def test_measurement_without_the_new_fields_reads_with_defaults():
    old = {"status": "ok", "device": "cuda", "steps": 2, "peak_allocated_bytes": 10, "seconds": 1.5}
    m = Measurement.model_validate(old)
    assert m.alloc_conf is None and m.allocator is None
    assert Measurement.model_validate_json(m.model_dump_json()) == m


@pytest.mark.parametrize("name", ["H100-80GB-2026-11-24.jsonl", "H200-2026-11-24-holdout.jsonl"])
def test_committed_rows_still_read_as_the_default_allocator(name):
    rows = results.read(RESULTS / name)
    assert rows and all(not r.job.expandable_segments and r.measured.allocator is None for r in rows)
    lines = [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]
    assert all("expandable_segments" not in line["job"] for line in lines)  # written before the field


# --- the command line ----------------------------------------------------------------------------

def _validate(*args, env_extra=None, timeout=60):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    return subprocess.run([sys.executable, "-m", "memplan.cli", "validate", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, **(env_extra or {})})


@pytest.mark.parametrize("args, says", [(["--allocator", "expandable_segments"], "invalid allocator 'expandable_segments'"),
                                        (["--allocator", "both", "--expandable-segments"], "--expandable-segments means")])
def test_bad_allocator_is_one_line_exit_2(args, says):
    out = _validate("--device", "cpu", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and says in out.stderr


@pytest.fixture(scope="module")
def both_rows(tmp_path_factory):
    """validate/gpu_session.sh in its dry form: the quick matrix's mixed-precision full fine-tune (whose
    estimate depends on the setting) under --allocator both; PYTORCH_ALLOC_CONF is the user's, to be merged."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import os

    out = tmp_path_factory.mktemp("alloc")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env |= {"OUT": str(out), "DEVICE": "cpu", "MATRIX": "quick", "PY": sys.executable, "SESSION_S": "400",
            "PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}
    proc = subprocess.run(["bash", str(RESULTS.parent / "gpu_session.sh"), "1:2"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "gpu_session: validate exit 0" in (out / "session.log").read_text()
    return results.read(out / "results.jsonl")


def test_both_runs_each_job_under_each_setting_with_its_own_estimate(both_rows):
    assert [r.job.expandable_segments for r in both_rows] == [False, True]
    assert both_rows[0].job.model_copy(update={"expandable_segments": True}) == both_rows[1].job
    # what the worker read: the user's key kept, the setting the row's
    assert [r.measured.alloc_conf for r in both_rows] == ["max_split_size_mb:64", "max_split_size_mb:64,expandable_segments:True"]
    assert both_rows[1].command.startswith("PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:64,expandable_segments:True python -m")
    for r in both_rows:
        assert r.measured.status == "ok" and r.measured.peak_allocated_bytes > 0, r.measured.error
        assert r.measured.allocator is None  # memory_stats() is read on cuda only
        assert r.predicted == harness.predict(r.job, None, "cpu")  # the estimate of the job as it ran
    # the job's estimate differs by setting, so the check above tells the two apart
    assert both_rows[0].predicted.peak_reserved_bytes != both_rows[1].predicted.peak_reserved_bytes
    assert "--allocator both" in both_rows[0].invocation


def test_expandable_segments_flag_runs_the_matrix_expandable(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "e.jsonl"
    proc = _validate("--device", "cpu", "--matrix", "quick", "--slice", "4:5", "--expandable-segments", "--out", str(out),
                     timeout=600)
    assert proc.returncode == 0, proc.stderr
    (row,) = results.read(out)
    assert row.job.expandable_segments and row.measured.alloc_conf == "expandable_segments:True"


def test_unnamed_allocator_follows_the_users_variable(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "u.jsonl"
    proc = _validate("--device", "cpu", "--matrix", "quick", "--slice", "4:5", "--out", str(out), timeout=600,
                     env_extra={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:64"})
    assert proc.returncode == 0, proc.stderr
    (row,) = results.read(out)
    assert row.job.expandable_segments and row.measured.alloc_conf == "max_split_size_mb:64,expandable_segments:True"
