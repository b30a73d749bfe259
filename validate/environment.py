"""The versions and hardware a measurement was taken on, recorded beside every result."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe(device: str) -> dict:
    import torch

    env = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "cuda": torch.version.cuda,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            env["gpu_memory_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        except Exception as exc:  # pynvml missing or no NVML: the torch figures still stand
            env["driver"] = f"unavailable: {exc}"
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env
