"""Inference over accelerate's layer split (`--sharding device_map`): one estimate per GPU.

planner/device_map.py places whole modules as transformers 5.23's `from_pretrained(device_map=...)`
does. Each GPU then holds its modules' weights, the KV cache of its decoder layers (DynamicCache keeps
each layer's keys and values on that layer's device) and, while its layers run, their intermediates
(accelerate's hooks run one GPU at a time and move the hidden states on with `.to()`: it is not
pipeline parallelism); the GPU holding lm_head makes the logits. Each GPU's figures are the
inference walk (planner/estimate.py `_inference`) over the layers it holds. Pure.
"""

from __future__ import annotations

from pydantic import BaseModel

from .architecture import ModelArch
from .errors import MemplanInputError
from .gpu import GpuProfile
from .job import Job


class GpuShare(BaseModel):
    """What one device holds under the split, and (for a GPU) its own estimate's figures."""

    device: str  # "0", "1", ..., "cpu", "disk"
    layers: tuple[int, ...]
    modules: tuple[str, ...]  # the device map's keys other than decoder layers
    weights_bytes: int
    budget_bytes: int | None  # the max_memory placement used (after balancing)
    kv_cache_bytes: int = 0
    peak_allocated_bytes: int = 0
    device_used_bytes: int = 0
    fits: bool | None = None


class Placement(BaseModel):
    strategy: str
    device_map: dict[str, int | str]
    shares: list[GpuShare]
    busiest: str  # the GPU with the most device memory used
    reserve_bytes: int  # kept on GPU 0 for the largest layer
    offloaded_bytes: int  # weights on the cpu or disk
    refusal: str | None = None
    max_memory_derived: bool = False  # from each card's memory (no --max-memory)


class Share(BaseModel):
    """The inference walk's view of one GPU (estimate._inference)."""

    weights_bytes: int
    layers: int
    holds_head: bool
    first_layer: int


def layer_runs(layers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2, 5'."""
    runs, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            runs.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(runs) or "-"


def placement_plan(job: Job, arch: ModelArch, gpu: GpuProfile | None, context_bytes: int):
    """accelerate's map for `job`: --max-memory as given, else each card's memory less the CUDA
    context (what torch.cuda.mem_get_info reports free when from_pretrained asks), no cpu entry."""
    from .device_map import MaxMemory, derived_max_memory, place

    if job.max_memory is not None:
        mm = MaxMemory(gpus=tuple(job.max_memory))
    elif gpu is not None:
        free = max(gpu.memory_bytes - context_bytes, 0)
        derived = derived_max_memory([free] * job.num_gpus, 0)
        mm = MaxMemory(gpus=derived.gpus, cpu=None, from_user=False)
    else:
        raise MemplanInputError("--sharding device_map places layers by each GPU's memory: give --gpu, or "
                                "--max-memory with one figure per GPU")
    w = job.base_weight_dtype
    quant = None if w.is_float else ("bnb-4bit" if w.is_4bit else "bnb-8bit")
    return place(arch, mm, job.device_map or "auto", job.compute_dtype if quant else w, quant), job.max_memory is None


def shares(plan) -> list[tuple[int, Share]]:
    """Each GPU's share for the walk (a GPU that holds nothing is left out)."""
    head = plan.device_of("lm_head")
    out = []
    for p in plan.devices:
        if not isinstance(p.device, int):
            continue
        out.append((p.device, Share(weights_bytes=p.weight_bytes, layers=len(p.layers), holds_head=head == p.device,
                                    first_layer=p.layers[0] if p.layers else 0)))
    return out


def placement(plan, per_gpu: dict, derived: bool) -> Placement:
    """The plan and every GPU's own estimate (`per_gpu`: device -> Estimate) as the placement table's rows."""
    layer_keys = plan.layers_prefix + "."
    rows = []
    for p in plan.devices:
        est = per_gpu.get(p.device) if isinstance(p.device, int) else None
        rows.append(GpuShare(
            device=str(p.device), layers=p.layers, modules=tuple(m for m in p.modules if not m.startswith(layer_keys)),
            weights_bytes=p.weight_bytes, budget_bytes=p.budget_bytes,
            kv_cache_bytes=est.bytes_of("KV cache") if est else 0,
            peak_allocated_bytes=est.peak_allocated_bytes if est else 0,
            device_used_bytes=est.device_used_bytes if est else 0, fits=est.fits if est else None))
    busiest = max(per_gpu, key=lambda d: (per_gpu[d].device_used_bytes, -d))
    return Placement(strategy=plan.strategy, device_map=dict(plan.device_map), shares=rows, busiest=str(busiest),
                     reserve_bytes=plan.reserve_bytes,
                     offloaded_bytes=sum(p.weight_bytes for p in plan.devices if not isinstance(p.device, int)),
                     refusal=plan.refusal, max_memory_derived=derived)


def share_arch(arch: ModelArch, share: Share) -> ModelArch:
    """`arch` cut to the decoder layers one GPU holds (their sliding windows kept)."""
    update: dict = {"layers": max(share.layers, 1)}
    if arch.layer_windows:
        update["layer_windows"] = arch.layer_windows[share.first_layer:share.first_layer + max(share.layers, 1)]
    return arch.model_copy(update=update)
