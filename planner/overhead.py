"""Memory beside the model's own tensors: cuBLAS workspaces, allocator slack, CUDA context.

PyTorch docs, "CUDA semantics / memory management": the caching allocator rounds requests to
512 B, serves large ones from 2 MiB-aligned segments and keeps freed blocks reserved, so
reserved >= allocated; the CUDA context is created by the driver and shows in nvidia-smi/pynvml
but not in torch.cuda.memory_reserved().
"""

from __future__ import annotations

from .gpu import GpuProfile

# Share of the peak the caching allocator holds beyond it, for the jobs with no allocation sequence
# to replay (sharded training: FSDP and ZeRO hold flat buffers on their own streams, not modelled
# tensor by tensor yet). The median of peak reserved / peak allocated - 1 over the 30 H100 rows in
# validate/results is 8.2%; every other job replays its sequence (planner/allocator.py).
FRAGMENTATION = 0.08
DEFAULT_CONTEXT_BYTES = 512 * 1024**2
DEFAULT_WORKSPACE_BYTES = 32 * 1024**2


def allocator_slack(peak_allocated: int) -> int:
    return int(peak_allocated * FRAGMENTATION)


def slack_formula(stats, events: int, expandable: bool) -> str:
    """The allocator row's 'how': what the replay found."""
    from .units import human

    how = "expandable segments" if expandable else f"{stats.peak_segments} segments"
    text = (f"caching allocator replayed over {events:,} allocation events of the step: {how} at the peak, "
            f"{human(stats.inactive_split_bytes_at_peak)} free inside segments in use")
    if stats.num_alloc_retries:
        text += f"; {stats.num_alloc_retries} cudaMalloc retries after releasing cached segments (the card is full)"
    return text


def cublas_handles(task: str) -> int:
    """torch keeps one cuBLAS handle, and one workspace, per (thread, stream): a training step uses
    two threads (the forward's and the autograd engine's device thread), inference one."""
    return 2 if task == "train" else 1


def cublas_workspaces(gpu: GpuProfile | None, task: str) -> int:
    """Workspaces torch allocates through its caching allocator (so they count as allocated), held
    from the first matmul on: 64 MiB after one training step on the H100 (validate/results)."""
    return cublas_handles(task) * (gpu.workspace_bytes if gpu else DEFAULT_WORKSPACE_BYTES)

