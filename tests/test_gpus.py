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
    "NVIDIA H100 PCIe": "H100-PCIe",  # was H100-80GB: same memory, lower peak; its own profile now
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200",
    "NVIDIA H100 NVL": "H100-NVL",  # 94 GB: not the 80 GB profile
    "NVIDIA L40": "L40",  # not L40S
    "NVIDIA A10": "A10",  # not A10G, nor A100
    "NVIDIA B200": "B200",
    "NVIDIA H20": "H20",  # not H200
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA RTX A6000": "RTX-A6000",
    "NVIDIA RTX 6000 Ada Generation": "RTX-6000-Ada",  # not the RTX A6000
    "NVIDIA GeForce RTX 5090": "RTX-5090",
    "Tesla V100-SXM2-16GB": "V100-16GB",
    "Tesla V100-SXM2-32GB": "V100-32GB",
    "AMD Instinct MI300X": "MI300X",
    "AMD Instinct MI325X": "MI325X",
    # other cards whose names contain a profile's
    "NVIDIA GH200 144G HBM3e": None,  # 144 GB, not the 96 GB GH200
    "AMD Instinct MI300A": None,  # the APU, 128 GB shared
    "NVIDIA GeForce RTX 3090 Ti": None,
    "NVIDIA A100-SXM4-40GB MIG 3g.20gb": None,  # a slice: 20 GB, not 40
    "NVIDIA B300": None,
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


# The memory each card's vendor datasheet states, in GB as printed there, written out here by hand
# (not read from gpus.json): a profile's driver-reported total must be that many GiB less what ECC
# and the driver reserve (at most 7%: GDDR cards with ECC on report 15,360 MiB of 16 GiB).
DATASHEET_GB = {
    "T4": 16, "A10G": 24, "A10": 24, "L4": 24, "RTX-3090": 24, "RTX-4090": 24, "RTX-5090": 32,
    "V100-16GB": 16, "V100-32GB": 32, "A100-40GB": 40, "A100-80GB": 80, "A40": 48, "RTX-A6000": 48,
    "L40": 48, "L40S": 48, "RTX-6000-Ada": 48, "H100-80GB": 80, "H100-PCIe": 80, "H100-NVL": 94,
    "H20": 96, "GH200": 96, "H200": 141, "B200": 180, "MI300X": 192, "MI325X": 256,
}


def test_every_profile_has_its_datasheet_memory():
    profiles = {g.name: g for g in gpu_profiles()}
    assert set(profiles) == set(DATASHEET_GB)
    for name, gb in DATASHEET_GB.items():
        g = profiles[name]
        assert f"{gb} GB" in g.datasheet, (name, g.datasheet)
        assert 0.93 * gb * 2**30 <= g.memory_bytes <= gb * 2**30, name


def test_every_profile_says_where_its_figures_come_from():
    for g in gpu_profiles():
        assert g.memory_source and g.tflops_source and g.bandwidth_source and g.price_source, g.name
        assert g.peak_tflops_16bit > 0 and g.memory_bandwidth_bytes_per_s > 0, g.name
        # a figure not measured here says so (no network: datasheets are recalled)
        if not g.memory_source.startswith("measured"):
            assert "memory" in g.memory_source and ("not measured" in g.memory_source or "from memory" in g.memory_source), g.name


def test_aliases_name_the_cards_they_say():
    assert load_gpu("a10").name == "A10" and load_gpu("a10g").name == "A10G"
    assert load_gpu("h100").name == "H100-80GB" and "SXM" in load_gpu("h100").datasheet
    assert load_gpu("h100-pcie").name == "H100-PCIe" and load_gpu("h100-nvl").name == "H100-NVL"
    assert load_gpu("mi300x").vendor == "amd" and load_gpu("b200").name == "B200"
    with pytest.raises(MemplanInputError, match="^GPU 'v100' is ambiguous: V100-16GB or V100-32GB$"):
        load_gpu("v100")


@pytest.mark.parametrize("name, total", [("48GiB", 48 * 2**30), ("80GB", 80 * 10**9), ("24576 MiB", 24 * 2**30),
                                         ("1.5TiB", 3 * 2**39), ("48gib", 48 * 2**30)])
def test_any_card_by_its_memory(name, total):
    g = load_gpu(name)
    assert g.memory_bytes == total and g.by_memory and g.peak_tflops_16bit == 0


@pytest.mark.parametrize("name, words", [("512MiB", "under 1 GiB"), ("48XB", "unknown GPU '48XB'")])
def test_bad_memory_sizes_are_one_line(name, words):
    with pytest.raises(MemplanInputError, match=words):
        load_gpu(name)


def test_cli_any_card_by_memory_fits_and_recommend_refuses_it():
    out = subprocess.run([sys.executable, "-m", "memplan.cli", "estimate", "-m", "llama-2-7b", "--method", "lora",
                          "--gpu", "16GiB"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "16 GiB card (16.00 GiB): does not fit" in out.stdout
    out = subprocess.run([sys.executable, "-m", "memplan.cli", "fit", "-m", "llama-2-7b", "--method", "qlora",
                          "--gpu", "24GB"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "22.35 GiB card" in out.stdout and " GB" not in out.stdout
    out = subprocess.run([sys.executable, "-m", "memplan.cli", "recommend", "-m", "llama-2-7b", "--gpus", "48GiB"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "named by its memory" in out.stderr and len(out.stderr.strip().splitlines()) == 1
