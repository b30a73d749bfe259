"""Activation offloading: CUDA streams only, so derived from the source (trl/models/activation_offloading.py,
torchtune/training/_activation_offloading.py: the same OffloadActivations) and checked by hand."""

import pytest

import memplan
from memplan import Job, MemplanInputError

KW = dict(model="llama-3-8b", method="lora", micro_batch=4, seq_len=2048, stack="transformers-5")
T, H, I = 8192, 4096, 14336


def test_offloaded_activations_by_hand():
    """Llama-3-8B LoRA b4 s2048: the largest saved tensor is an MLP output, 8,192 x 14,336 x 2 B =
    224 MiB. Forward: the stash of the last 5 offloaded tensors (1.09 GiB); backward: 2 nodes' more."""
    plain = memplan.estimate(**KW)
    off = memplan.estimate(activation_offloading=True, **KW)
    largest = T * I * 2
    act = off.component("activations").phase_bytes
    assert act["forward"] == act["loss backward"] == 5 * largest
    assert act["backward"] == 7 * largest
    assert off.host_bytes == plain.bytes_of("activations")
    # everything else is unchanged
    assert off.bytes_of("logits and loss") == plain.bytes_of("logits and loss")
    assert any("pinned host RAM" in n for n in off.notes)


def test_with_checkpointing_the_layer_inputs_are_offloaded():
    """Each checkpointed layer input is 8,192 x 4,096 x 2 B = 64 MiB: 5 on the GPU in the forward
    (less than the 32 layers' 2 GiB), the recomputed layer stays."""
    off = memplan.estimate(activation_offloading=True, gradient_checkpointing=True, **KW)
    ck = memplan.estimate(gradient_checkpointing=True, **KW)
    act = off.component("activations").phase_bytes
    assert act["forward"] == 5 * T * H * 2 and act["backward"] == 7 * T * H * 2
    assert off.bytes_of("recomputed layer") == ck.bytes_of("recomputed layer")
    assert off.host_bytes == ck.component("activations").phase_bytes["forward"]


def test_offloading_is_training_only():
    with pytest.raises(MemplanInputError, match="--activation-offloading applies to training"):
        Job(model="llama-2-7b", task="infer", activation_offloading=True)
