"""The phases of a step, one vocabulary for the estimate, the CPU trace and the GPU harness.

The estimate walks five training phases; a trace and a GPU run measure three, because their
backward spans the loss gradient too. `measured_view` maps the one onto the other, the one place
that does.
"""

from __future__ import annotations

from enum import Enum


class PhaseName(str, Enum):
    loaded = "loaded"
    forward = "forward"
    loss_backward = "loss backward"
    backward = "backward"
    optimizer_step = "optimizer step"
    prefill = "prefill"
    decode = "decode"

    def __str__(self) -> str:
        return self.value


# What a trace or a GPU run records, per step
MEASURED_TRAINING = (PhaseName.forward, PhaseName.backward, PhaseName.optimizer_step)
MEASURED_INFERENCE = (PhaseName.prefill, PhaseName.decode)


def measured_view(phases: dict[str, int]) -> dict[str, int]:
    """The estimate's phase bytes under the measured phases' names: the measured backward spans the
    loss backward; inference keeps prefill and decode; the loaded state is not a measured phase."""
    if PhaseName.prefill.value in phases:
        return {p.value: phases[p.value] for p in MEASURED_INFERENCE if p.value in phases}
    return {
        PhaseName.forward.value: phases[PhaseName.forward.value],
        PhaseName.backward.value: max(phases[PhaseName.loss_backward.value], phases[PhaseName.backward.value]),
        PhaseName.optimizer_step.value: phases[PhaseName.optimizer_step.value],
    }


class Moment(Enum):
    """The moments of the training walk at which a sharding strategy adds buffers of its own
    (planner/fsdp.py, planner/zero.py); `shard_rows(moment)` gives its rows then."""

    forward = "forward"  # inside a decoder layer's forward
    forward_copy_out = "forward_copy_out"  # the last layer's all-gather copied out (FSDP2)
    forward_tail_copy_out = "forward_tail_copy_out"  # the final norm and head's all-gather copied out (FSDP2)
    forward_head = "forward_head"  # the head and the loss, inside the model's forward
    loss = "loss"  # the loss's backward
    backward_top = "backward_top"  # the last decoder layer's backward
    backward = "backward"  # the first decoder layer's backward (the bottom)
    backward_post = "backward_post"  # a layer's post-backward: its gradients flattened for the reduce-scatter (FSDP)
    backward_end = "backward_end"  # the embedding's backward, every gradient produced
    backward_root = "backward_root"  # the root unit's gradients reduced, after the embedding's backward
    optimizer = "optimizer"
