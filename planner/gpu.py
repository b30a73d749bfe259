"""GPU profile: capacity and the per-GPU overheads torch cannot see."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Share of each GPU's memory kept free by `fit` and `recommend`: the estimate is within a few percent
# of measured device memory, not exact, and other processes and allocator growth need room.
DEFAULT_SAFETY_MARGIN = 0.05


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
