"""Data-parallel sharding: what each GPU holds under DDP, ZeRO 1/2/3 and FSDP.

Sources: Rajbhandari et al. 2020 (ZeRO stages: optimizer states, + gradients, + parameters
partitioned over N data-parallel ranks); PyTorch FSDP docs (ShardingStrategy FULL_SHARD,
SHARD_GRAD_OP, HYBRID_SHARD; the root unit is not resharded after forward; BACKWARD_PRE prefetch
keeps a second unit gathered); DDP docs (gradient buckets are a separate copy unless
`gradient_as_bucket_view=True`).
"""

from __future__ import annotations

from typing import Literal

from dataclasses import dataclass

# tp and device_map split inference (planner/tensor_parallel.py, planner/device_map.py); the rest training
Sharding = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp_full", "fsdp_grad_op", "fsdp_hybrid", "tp",
                   "device_map"]
SHARDINGS: tuple[str, ...] = Sharding.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardPlan:
    """Internal to the estimate (a dataclass: no pydantic schema to build on the CLI's cold path)."""

    strategy: str
    world: int
    group: int  # ranks one copy of the model state is split over
    params_div: int
    grads_div: int
    states_div: int
    gathers_units: bool  # parameters are all-gathered one unit (decoder layer) at a time
    ddp_buckets: bool
    offload: bool

    @property
    def describe(self) -> str:
        return f"{self.strategy} over {self.group} of {self.world} GPUs"


def shard_plan(sharding: str, num_gpus: int, gpus_per_node: int, cpu_offload: bool) -> ShardPlan:
    n = num_gpus
    group = min(n, gpus_per_node) if sharding == "fsdp_hybrid" else n
    divs = {
        "none": (1, 1, 1),
        "ddp": (1, 1, 1),
        "zero1": (1, 1, group),
        "zero2": (1, group, group),
        "fsdp_grad_op": (1, group, group),  # parameters stay gathered between forward and backward
        "zero3": (group, group, group),
        "fsdp_full": (group, group, group),
        "fsdp_hybrid": (group, group, group),
    }[sharding]
    return ShardPlan(
        strategy=sharding,
        world=n,
        group=group,
        params_div=divs[0],
        grads_div=divs[1],
        states_div=divs[2],
        gathers_units=divs[0] > 1,
        ddp_buckets=sharding in ("none", "ddp") and n > 1,
        offload=cpu_offload,
    )


def shard(nbytes: int, div: int) -> int:
    """Each rank's share, rounded up (the last rank pads its flat shard)."""
    return -(-nbytes // div)
