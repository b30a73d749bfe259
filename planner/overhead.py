"""Memory outside torch's allocated figure: allocator slack, cuBLAS workspaces, CUDA context.

PyTorch docs, "CUDA semantics / memory management": the caching allocator rounds requests to
512 B, serves large ones from 2 MiB-aligned segments and keeps freed blocks reserved, so
reserved >= allocated; the CUDA context is created by the driver and shows in nvidia-smi/pynvml
but not in torch.cuda.memory_reserved().
"""

from __future__ import annotations

from .gpu import GpuProfile

# Share of the peak that the caching allocator holds beyond it (fragmentation, segment rounding).
# Default until validate/results calibrates it per GPU.
FRAGMENTATION = 0.05
DEFAULT_CONTEXT_BYTES = 512 * 1024**2
DEFAULT_WORKSPACE_BYTES = 32 * 1024**2


def allocator_slack(peak_allocated: int) -> int:
    return int(peak_allocated * FRAGMENTATION)


def workspace(gpu: GpuProfile | None) -> int:
    return gpu.workspace_bytes if gpu else DEFAULT_WORKSPACE_BYTES


def cuda_context(gpu: GpuProfile | None) -> int:
    return gpu.cuda_context_bytes if gpu else DEFAULT_CONTEXT_BYTES
