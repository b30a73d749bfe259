"""Activation offloading (TRL `activation_offloading=True`, torchtune `enable_activation_offloading`):
a saved-tensors hook copies every tensor autograd saves to pinned host memory and brings it back in
the backward. Both libraries run the same class (trl/models/activation_offloading.py,
torchtune/training/_activation_offloading.py `OffloadActivations`):

- `pack_tensor`: a saved tensor of at least `min_offload_size` (1,024 B) that is not a Parameter or
  buffer goes to a pinned CPU copy; with streams (the default) the GPU tensor stays referenced in
  `fwd_stash` until `max_fwd_stash_size` (5) newer tensors have been offloaded;
- `unpack_tensor_with_streams`: in the backward each tensor comes back when its autograd node runs;
  the previous node's tensors are released when a new node starts, so about two nodes' tensors are
  on the GPU at once;
- the output head is excluded only where the model names it `output` (torchtune) or a few other
  names; a transformers CausalLM's `lm_head` is offloaded like everything else.

Nothing of it runs on the CPU trace (it needs CUDA streams): docs/offload.md derives it, and
tests/test_offload.py checks a named job by hand.
"""

from __future__ import annotations

MAX_FWD_STASH = 5  # OffloadActivations(max_fwd_stash_size=5)
MIN_OFFLOAD_BYTES = 1024  # OffloadActivations(min_offload_size=1024): smaller tensors stay (negligible)
BACKWARD_NODES = 2  # the node in backward and the previous one, not yet released


def on_gpu(kept: int, largest: int) -> tuple[int, int]:
    """(forward, backward) bytes of saved activations left on the GPU when `kept` bytes are saved
    and the largest saved tensor has `largest` bytes: the forward stash, and in the backward the
    stash still referenced when the backward starts plus two nodes' tensors brought back."""
    forward = min(kept, MAX_FWD_STASH * largest)
    return forward, min(kept, forward + BACKWARD_NODES * largest)
