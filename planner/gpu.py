"""GPU profile: capacity and the per-GPU overheads torch cannot see."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

# Share of each GPU's memory kept free by `fit` and `recommend`: the estimate is within a few percent
# of measured device memory, not exact, and other processes and allocator growth need room.
DEFAULT_SAFETY_MARGIN = 0.05


Architecture = Literal["volta", "turing", "ampere", "ada", "hopper", "blackwell", "cdna3", "unknown"]


class GpuProfile(BaseModel):
    # built on first use: an estimate without --gpu never validates one
    model_config = ConfigDict(frozen=True, defer_build=True)

    name: str
    # Names a user may type for this profile alone (matched ignoring case, '-', '_' and spaces).
    aliases: tuple[str, ...] = ()
    # Names that also name other profiles ('A100': 40 GB or 80 GB): typed alone they are refused
    # as ambiguous, listing every profile that shares them.
    shared_names: tuple[str, ...] = ()
    # What torch.cuda.get_device_name() and pynvml report for this card.
    device_names: tuple[str, ...] = ()
    # Device names that contain this profile's names but are other cards: name -> why no profile.
    similar_devices: dict[str, str] = {}
    # Why each alias and device name points here rather than at a sibling variant.
    alias_notes: str = ""
    # Total device memory as the driver reports it (nvidia-smi memory.total, MiB -> bytes).
    memory_bytes: int
    memory_source: str
    datasheet: str
    # GPU generation, which decides the context's make-up (planner/device_memory.py): "unknown" only
    # for a card named by its memory
    architecture: Architecture = "unknown"
    # CUDA compute capability ("9.0"; gfx target on AMD): resident threads per SM follow from it
    compute_capability: str = ""
    # streaming multiprocessors (compute units on AMD): the driver reserves each resident thread's
    # stack for all of them (docs/device-memory.md)
    sm_count: int = 0
    sm_source: str = ""
    # Memory the CUDA context (driver, kernels loaded lazily, cuBLAS handles) takes before any
    # tensor: seen by pynvml, invisible to torch.cuda.memory_allocated.
    cuda_context_bytes: int
    cuda_context_source: str
    # One cuBLAS/cuBLASLt workspace, which torch allocates through its caching allocator (so it
    # counts as allocated) per (thread, stream) on the first matmul. torch CublasHandlePool.cpp
    # default: 32 MiB on Hopper, 4096 KiB x 2 + 16 KiB x 8 elsewhere. Measured: 64 MiB held after
    # one training step (two threads) on the H100 and the H200.
    workspace_bytes: int
    # dense 16-bit tensor-core peak, for step-time estimates
    peak_tflops_16bit: float
    supports_bf16: bool
    tflops_source: str
    price_per_hour_usd: float
    price_source: str
    price_date: str
    # ROCm's PyTorch runs the same caching allocator (HIPified from CUDACachingAllocator.cpp) and
    # reports through torch.cuda; what differs is in docs/gpus.md
    vendor: Literal["nvidia", "amd"] = "nvidia"
    # datasheet peak memory bandwidth: the roofline's memory side in throughput.py (0: unknown)
    memory_bandwidth_bytes_per_s: int = 0
    bandwidth_source: str = ""
    # a card named by its memory (--gpu 48GiB): no datasheet, throughput or price behind it
    by_memory: bool = False

    @property
    def card(self) -> str:
        """The product the profile is, as its datasheet line names it ('NVIDIA H100 SXM'), for headers
        that must say which card an alias meant without quoting the datasheet's GB."""
        name = self.datasheet.split(":", 1)[0]
        for word in (" datasheet", " specifications"):
            name = name.replace(word, "")
        return name


# --gpu 48GiB / 80GB / 24576MiB: any card by its memory. Binary and decimal units are kept apart,
# since a "48 GB" datasheet card and 48 GiB differ by 7%.
_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b)\s*$", re.I)


def looks_like_memory(name: str) -> bool:
    """A GPU name that is a memory size (a number and a unit) rather than a profile name."""
    return bool(_MEMORY.match(name))


def gpu_by_memory(name: str, context_bytes: int, workspace_bytes: int) -> GpuProfile:
    """A card named by its memory: `name` is '<number><unit>' (GiB, GB, MiB, MB, TiB, TB). The CUDA
    context and cuBLAS workspace take the defaults an estimate without --gpu uses; it has no
    throughput or price, so recommend ranks it only with --price and --mfu-free rules (docs/gpus.md)."""
    from .errors import MemplanInputError

    m = _MEMORY.match(name)
    if not m:
        raise MemplanInputError(f"GPU memory {name!r} must be a number and a unit (GiB, GB, MiB, MB, TiB or TB), e.g. 48GiB")
    number, unit = m.group(1), m.group(2).lower()
    total = int(float(number) * _UNITS[unit])
    if total < 1 << 30:
        raise MemplanInputError(f"GPU memory {name!r} is under 1 GiB; give the card's total memory, e.g. 48GiB")
    # named in GiB whatever unit was typed, as every memory figure memplan prints
    gib = total / (1 << 30)
    return GpuProfile(
        name=f"{gib:g} GiB card" if gib == round(gib, 2) else f"{gib:,.2f} GiB card", memory_bytes=total, by_memory=True,
        memory_source=f"given as --gpu {name.strip()}: {total:,} B, taken as what the driver reports (use the card's "
                      "nvidia-smi memory.total, which is below its datasheet size)",
        datasheet=f"named by its memory: {total:,} B", cuda_context_bytes=context_bytes,
        cuda_context_source="default (a card named by its memory)", workspace_bytes=workspace_bytes,
        peak_tflops_16bit=0, supports_bf16=True, tflops_source="unknown (a card named by its memory)",
        price_per_hour_usd=0, price_source="unknown (a card named by its memory): pass --price", price_date="")
