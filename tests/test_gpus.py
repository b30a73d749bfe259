"""GPU names: what users type (names, aliases, ambiguous names) and what devices report (the names
torch.cuda.get_device_name() and pynvml give), through one table in profiles/gpus.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memplan.cli import _gpu_for
from memplan.errors import MemplanInputError
from memplan.profiles import gpu_profiles, load_gpu, match_device
from memplan.validate.results import read

RESULTS = Path(__file__).resolve().parent.parent / "validate" / "results"

DEVICES = {
    # name as torch / pynvml report it -> profile (None: a card no profile describes)
    "Tesla T4": "T4",
    "NVIDIA A10G": "A10G",
    "NVIDIA L4": "L4",
    "NVIDIA L40S": "L40S",  # was L4: 'l4' is a prefix of 'l40s'
    "NVIDIA GeForce RTX 3090": "RTX-3090",
    "NVIDIA GeForce RTX 4090": "RTX-4090",  # was RTX-3090: both start with 'RTX'
    "NVIDIA A100-SXM4-40GB": "A100-40GB",
    "NVIDIA A100-PCIE-40GB": "A100-40GB",
    "NVIDIA A100-SXM4-80GB": "A100-80GB",  # was A100-40GB: the first profile starting with 'A100'
    "NVIDIA A100 80GB PCIe": "A100-80GB",
    "NVIDIA H100 80GB HBM3": "H100-80GB",
    "NVIDIA H100 PCIe": "H100-80GB",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200",
    # other cards whose names contain a profile's
    "NVIDIA H100 NVL": None,  # 94 GB
    "NVIDIA L40": None,
    "NVIDIA A10": None,
    "NVIDIA GeForce RTX 3090 Ti": None,
    "NVIDIA A100-SXM4-40GB MIG 3g.20gb": None,  # a slice: 20 GB, not 40
    "NVIDIA B200": None,
    "": None,
}


@pytest.mark.parametrize("device, profile", DEVICES.items())
def test_device_names_match_their_profile(device, profile):
    gpu = match_device(device)
    assert (gpu.name if gpu else None) == profile
    assert _gpu_for(device, load_gpu) is gpu  # the CLI's helper is the same matcher


def test_every_recorded_device_name_maps_to_its_profile():
    for gpu in gpu_profiles():
        assert gpu.device_names, gpu.name
        for device in gpu.device_names:
            assert match_device(device) is gpu, device
            assert load_gpu(device) is gpu  # a user may type it too
        for other in gpu.similar_devices:
            assert match_device(other) is None, other


def test_devices_in_committed_results_map_to_their_profile():
    seen = {row.environment["gpu"] for path in RESULTS.glob("H*.jsonl") for row in read(path)}
    assert {match_device(name).name for name in seen} == {"H100-80GB", "H200"}
    assert match_device("NVIDIA H100 80GB HBM3").name == "H100-80GB" and "NVIDIA H100 80GB HBM3" in seen


def test_names_ignore_case_and_separators():
    assert load_gpu("rtx 3090") is load_gpu("RTX-3090") is load_gpu("rtx_3090") is load_gpu("3090")
    assert load_gpu("h100").name == "H100-80GB"  # both H100 variants with a profile have 80 GB (gpus.json alias_notes)


@pytest.mark.parametrize("name", ["A100", "a100"])
def test_ambiguous_name_is_refused(name):
    with pytest.raises(MemplanInputError, match=rf"^GPU '{name}' is ambiguous: A100-40GB or A100-80GB$"):
        load_gpu(name)


@pytest.mark.parametrize("args", [["estimate", "-m", "llama-2-7b", "-g", "A100"],
                                  ["fit", "-m", "llama-2-7b", "-g", "A100"],
                                  ["recommend", "-m", "llama-2-7b", "--gpus", "A100,H100"]])
def test_ambiguous_name_is_one_line_through_the_cli(args):
    out = subprocess.run([sys.executable, "-m", "memplan.cli", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == ["memplan: error: GPU 'A100' is ambiguous: A100-40GB or A100-80GB"]


def test_every_alias_note_is_written():
    # each profile says why its aliases and device names point at it rather than at a sibling
    assert all(gpu.alias_notes for gpu in gpu_profiles())
