"""What the estimator returns."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel

from .allocator import AllocatorStats
from .job import Job
from .layer_split import Placement
from .phases import PhaseName
from .params import ParamCounts


class Category(str, Enum):
    """What a row of the breakdown is, in the terms a trace and a GPU run can also attribute bytes
    to (the CPU trace reports parameters, gradients and optimizer states by these names)."""

    weights = "weights"  # parameters and buffers, gathered ones included
    gradients = "gradients"
    optimizer = "optimizer"  # optimizer states and the step's temporaries
    activations = "activations"  # saved for backward (or, in inference, one layer's intermediates)
    kv_cache = "kv cache"
    transients = "transients"  # short-lived: logits and loss, per-layer backward, dequantized weights
    overhead = "overhead"  # workspaces, allocator slack, CUDA context

    def __str__(self) -> str:
        return self.value


class Component(BaseModel):
    """One line of the breakdown: bytes per GPU, how they were computed, when they are live.

    `phase_bytes` holds what the component occupies at the high point of each phase it is live in;
    a phase's allocated total is the sum of its torch-pool components there, to the byte, so the
    rows live at the peak add up to the peak. `bytes` is the largest of them."""

    name: str
    category: Category
    bytes: int
    formula: str
    phases: list[str]
    phase_bytes: dict[str, int] = {}
    # Where the bytes sit: "torch" (caching allocator), "unified" (paged, cudaMallocManaged),
    # "driver" (outside torch: CUDA context) or "reserved" (allocator slack).
    pool: str = "torch"


class Phase(BaseModel):
    """torch-allocated bytes at the high point of one phase of the step."""

    name: PhaseName
    allocated_bytes: int
    detail: str


class Estimate(BaseModel):
    job: Job
    stack: str = ""  # the software modelled (Stack.label)
    model_name: str
    params: ParamCounts
    trainable_params: int
    components: list[Component]
    phases: list[Phase]
    peak_phase: PhaseName
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_used_bytes: int
    # the least device memory the job runs in: torch's allocator releases cached segments and
    # retries before an OOM, so on a smaller card it reserves less than device_used_bytes shows on
    # a card with room to spare (planner/allocator.py AllocatorStats.required_bytes). 0: not computed
    required_bytes: int = 0
    # the caching-allocator replay behind the reserved figure (None: no allocation sequence)
    allocator: AllocatorStats | None = None
    gpu: str | None = None
    gpu_memory_bytes: int | None = None
    weights_label: str | None = None  # a pre-quantized checkpoint's storage ('gptq 4-bit (group 128)')
    gpu_card: str | None = None  # which card the profile is ('NVIDIA H100 SXM'), for the header
    fits: bool | None = None
    host_bytes: int = 0
    notes: list[str] = []
    # --sharding device_map: where accelerate puts each module and every GPU's figures (this estimate is the busiest's)
    placement: Placement | None = None

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def bytes_of(self, name: str) -> int:
        """A component's bytes, 0 when the job has none (zero-byte rows are not listed)."""
        return next((c.bytes for c in self.components if c.name == name), 0)

    def measured_phases(self) -> dict[str, int]:
        """Allocated bytes per phase under the names a trace or a GPU run measures (planner/phases.py)."""
        from .phases import measured_view

        return measured_view({p.name: p.allocated_bytes for p in self.phases})

    def at_phase(self, phase: str) -> list[tuple[Component, int]]:
        """The torch-pool components live at the high point of `phase`, with their bytes there:
        they sum to that phase's allocated bytes."""
        return [(c, c.phase_bytes[phase]) for c in self.components if c.pool == "torch" and c.phase_bytes.get(phase)]
