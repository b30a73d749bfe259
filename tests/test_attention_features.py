"""flash_attention_2 and packed rows: derived from the libraries' source (flash-attn has no CPU build
and packing is not traced), so the expected bytes are derived by hand here, for named jobs."""

import pytest

import memplan
from memplan import Job, MemplanInputError, estimate_memory
from memplan.attention import Kernel, attention_kernel
from memplan.profiles import load_model
from memplan.stacks import get

TX5 = "transformers-5"


def _layer_bytes(est) -> int:
    """Saved bytes of one (non-first) decoder layer: the activations row / layers, without checkpointing."""
    return est.bytes_of("activations")


def test_flash_attention_2_is_always_the_fused_kernel():
    tx5 = get(TX5)
    for name in ("falcon-7b", "llama-2-7b", "mistral-7b", "starcoder"):
        job = Job(model=name, method="lora", attention="flash_attention_2", stack=TX5)
        for grad in (True, False):
            assert attention_kernel(job, load_model(name), tx5, grad=grad, sdpa_bytes=2) is Kernel.fused


def test_flash_attention_2_removes_falcons_quadratic_scores():
    """Falcon-7B LoRA b1 s2048: SDPA runs the math kernel (fp32 scores, 71 heads x 2048^2 x 4 B =
    1.11 GiB per layer held as probabilities); flash-attn saves q, k, v, out and the fp32 lse."""
    arch = load_model("falcon-7b")
    t, a = 2048, arch.heads
    fa = memplan.estimate("falcon-7b", method="lora", seq_len=t, attention="flash_attention_2", stack=TX5)
    sd = memplan.estimate("falcon-7b", method="lora", seq_len=t, attention="sdpa", stack=TX5)
    # the fp32 probabilities alone are 32 x 1.11 GiB; the rest of what the two kernels save is close
    assert sd.bytes_of("activations") - fa.bytes_of("activations") > 0.99 * arch.layers * t * a * t * 4
    # what flash-attn keeps per layer, by hand: q (71 heads), k and v (1 kv head), out, in bf16; lse fp32
    per_layer_attention = t * (arch.q_width + 2 * arch.kv_width + arch.q_width) * 2 + 4 * t * a
    job = Job(model="falcon-7b", method="lora", seq_len=t, attention="flash_attention_2", stack=TX5)
    from memplan.activations import make_ctx
    from memplan.training import resolve_targets

    ctx = make_ctx(job, arch, resolve_targets(job, arch), get(TX5), grad_in=True)
    saved = get(TX5).layer_saved(arch, ctx)
    assert sum(v for k, v in saved.items() if k.startswith("attn.") and k != "attn.out_contiguous") == per_layer_attention


def test_flash_attention_2_saves_16_bit_casts_of_an_fp32_stream():
    """QLoRA after kbit prepare streams fp32; flash-attn casts q, k, v to bf16 (get_target_dtype),
    SDPA's memory-efficient kernel keeps fp32: 2 B less per element of q, k, v and out per layer.
    Llama-2-7B (multi-head), b1 s512: 4 x 4096 x 512 x 2 B = 16 MiB per layer."""
    kw = dict(method="qlora", seq_len=512, gradient_checkpointing=False, stack=TX5)
    fa = memplan.estimate("llama-2-7b", attention="flash_attention_2", **kw)
    sd = memplan.estimate("llama-2-7b", attention="sdpa", **kw)
    per_layer = 4 * 4096 * 512 * 2
    assert sd.bytes_of("activations") - fa.bytes_of("activations") == 32 * per_layer


def test_flash_attention_2_refuses_fp32():
    with pytest.raises(MemplanInputError, match="fp16 or bf16 only"):
        Job(model="llama-2-7b", compute_dtype="fp32", weight_dtype="fp32", attention="flash_attention_2")


def test_packing_with_flash_attention_costs_nothing_extra():
    """Padding-free varlen: cu_seqlens only, the same tensors as one unpacked batch of the same tokens."""
    kw = dict(method="lora", micro_batch=2, seq_len=4096, attention="flash_attention_2", stack=TX5)
    a = memplan.estimate("llama-3-8b", packing=True, **kw)
    b = memplan.estimate("llama-3-8b", packing=False, **kw)
    assert [p.allocated_bytes for p in a.phases] == [p.allocated_bytes for p in b.phases]


def test_packing_under_sdpa_by_hand():
    """Llama-3-8B LoRA b2 s4096 packed, SDPA: per layer the repeated keys and values (8 kv heads ->
    32 heads: 2 x (4096 - 1024) x 8192 tokens x 2 B = 96 MiB) and the additive bf16 mask SDPA makes of
    the bool one (2 x 4096^2 x 2 B = 64 MiB); once per forward the bool mask (2 x 4096^2 x 1 B)."""
    kw = dict(method="lora", micro_batch=2, seq_len=4096, stack=TX5)
    packed = memplan.estimate("llama-3-8b", packing=True, **kw)
    plain = memplan.estimate("llama-3-8b", **kw)
    t = 2 * 4096
    per_layer = 2 * (4096 - 1024) * t * 2 + 2 * 4096 * 4096 * 2
    assert packed.bytes_of("activations") - plain.bytes_of("activations") == 32 * per_layer + 2 * 4096 * 4096


def test_packing_is_training_only_and_not_traced():
    with pytest.raises(MemplanInputError, match="--packing applies to training"):
        Job(model="llama-2-7b", task="infer", packing=True)
    from memplan.validate.trace import refusal

    assert "packed" in refusal(Job(model="llama-2-7b", packing=True), load_model("llama-2-7b"))
    assert "flash-attn" in refusal(Job(model="llama-2-7b", attention="flash_attention_2"), load_model("llama-2-7b"))
