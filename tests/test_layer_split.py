"""--sharding device_map wired into the estimate (planner/layer_split.py over planner/device_map.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memplan.device_map import MaxMemory, place
from memplan.errors import MemplanInputError
from memplan.estimate import estimate_memory
from memplan.job import Job
from memplan.profiles import load_gpu, load_model

GiB = 2**30
PROMPT, NEW = 2048, 256


def _est(**kw):
    job = Job(model="llama-2-70b", task="infer", seq_len=PROMPT, new_tokens=NEW, sharding="device_map", **kw)
    return estimate_memory(job, load_model("llama-2-70b"), load_gpu(job.gpu) if job.gpu else None)


def test_each_gpu_holds_its_layers_cache_and_the_placements_weights():
    est = _est(num_gpus=2, max_memory=(70 * GiB, 70 * GiB), device_map="sequential")
    plan = place(load_model("llama-2-70b"), MaxMemory(gpus=(70 * GiB, 70 * GiB)), "sequential")
    shares = {s.device: s for s in est.placement.shares}
    for p in plan.devices:
        s = shares[str(p.device)]
        assert s.weights_bytes == p.weight_bytes and s.layers == p.layers
        # DynamicCache keeps each layer's K and V on its device: 2 x 8 KV heads x 128 x positions x 2 B per layer
        assert s.kv_cache_bytes == len(p.layers) * 2 * 8 * 128 * (PROMPT + NEW) * 2
    busiest = max(est.placement.shares, key=lambda s: s.device_used_bytes)
    assert est.device_used_bytes == busiest.device_used_bytes and est.placement.busiest == busiest.device
    assert est.bytes_of("weights") == busiest.weights_bytes


def test_spilling_to_disk_does_not_fit():
    est = _est(num_gpus=2, max_memory=(40 * GiB, 40 * GiB), gpu="A100-80GB")
    assert est.placement.offloaded_bytes > 0 and est.fits is False
    assert any("cpu or disk" in n for n in est.notes)


def test_four_a100s_derive_max_memory_from_the_card():
    est = _est(num_gpus=4, gpu="A100-80GB")
    assert est.placement.max_memory_derived and est.fits
    assert sum(len(s.layers) for s in est.placement.shares) == 80
    assert est.placement.offloaded_bytes == 0


@pytest.mark.parametrize("kw, message", [
    (dict(num_gpus=2), "give --gpu, or --max-memory"),
    (dict(num_gpus=2, max_memory=(GiB,)), "gives 1 GPU"),
])
def test_bad_device_map_input(kw, message):
    with pytest.raises(MemplanInputError, match=message):
        _est(**kw)


def test_cli_prints_the_placement_table():
    r = subprocess.run([sys.executable, "-m", "memplan", "estimate", "-m", "llama-2-70b", "--task", "infer", "-n", "4",
                        "--sharding", "device_map", "-g", "A100-80GB"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "device_map=auto placement" in r.stdout and "GPU 3" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "memplan", "estimate", "-m", "llama-2-70b", "--task", "infer", "-n",
                          "2", "--sharding", "device_map", "--max-memory", "40 parsecs"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--max-memory" in bad.stderr
