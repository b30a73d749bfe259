"""Liger kernels: Triton only, so the expected bytes are derived by hand here from liger-kernel
0.8.5's source (docs/liger.md), for named jobs."""

import pytest

import memplan
from memplan import Job, MemplanInputError
from memplan.liger import chunk_tokens
from memplan.profiles import load_model

KW = dict(model="llama-3-8b", method="lora", micro_batch=4, seq_len=2048, stack="transformers-5")


def test_chunk_size_follows_the_source():
    # ops/fused_linear_cross_entropy.py: inc_factor = cdiv(V, H); chunk = next_pow2(cdiv(BT, inc_factor))
    assert chunk_tokens(8192, 128_256, 4096) == 256  # inc_factor 32
    assert chunk_tokens(16384, 32_000, 4096) == 2048  # the source's own example: BT 4096*4, V 32000, H 4096
    assert chunk_tokens(100, 32_000, 4096) == 16  # 100 / 8 -> 13 -> 16
    assert chunk_tokens(3, 1000, 4096) == 3  # never more than the tokens


def test_fused_linear_cross_entropy_by_hand():
    """Llama-3-8B LoRA b4 s2048 (8,192 tokens, vocab 128,256, hidden 4096, bf16): no logits. Forward:
    a 256-token x 128,256 bf16 chunk (62.6 MiB) + the input's gradient 8,192 x 4096 x 2 B (64 MiB) +
    an fp32 loss per token; the loss backward keeps the gradient and the losses."""
    est = memplan.estimate(liger=True, **KW)
    row = est.component("logits and loss")
    t, h, v = 8192, 4096, 128_256
    assert row.phase_bytes["forward"] == 256 * v * 2 + t * h * 2 + t * 4
    assert row.phase_bytes["loss backward"] == t * h * 2 + t * 4
    plain = memplan.estimate(**KW).component("logits and loss")
    # HF: bf16 logits + fp32 copy + fp32 log-softmax = 10 B per token x vocab
    assert plain.phase_bytes["forward"] == t * v * 10


def test_full_fine_tuning_keeps_the_head_gradient_from_the_forward():
    est = memplan.estimate(liger=True, **{**KW, "method": "full"})
    t, h, v = 8192, 4096, 128_256
    assert est.component("logits and loss").phase_bytes["loss backward"] == t * h * 2 + t * 4 + v * h * 2


def test_rms_norm_and_swiglu_save_less_by_hand():
    """Per decoder layer (gradients flowing in, bf16 stream): each LigerRMSNorm keeps its bf16 input
    and an fp32 rstd instead of LlamaRMSNorm's fp32 copy (2 x 2 B x tokens x hidden less), and
    LigerSiLUMulFunction keeps gate and up but not act(gate) (2 B x tokens x intermediate less).
    Layer 0 of frozen-embedding LoRA saves no norm input either way, only the MLP's difference; the
    final norm saves 2 B x tokens x hidden less too."""
    arch = load_model("llama-3-8b")
    t, h, i = 8192, arch.hidden, arch.intermediate
    per_layer = 2 * (4 * t * h - 2 * t * h) + t * i * 2
    layer0 = t * i * 2
    plain, lig = memplan.estimate(**KW), memplan.estimate(liger=True, **KW)
    final_norm = 4 * t * h - 2 * t * h
    assert plain.bytes_of("activations") - lig.bytes_of("activations") == (arch.layers - 1) * per_layer + layer0 + final_norm


def test_liger_is_refused_where_it_has_no_kernels():
    for name in ("falcon-7b", "phi-2", "starcoder", "mixtral-8x7b"):
        with pytest.raises(MemplanInputError, match="--liger on"):
            memplan.estimate(name, method="lora", liger=True, stack="transformers-5")
    with pytest.raises(MemplanInputError, match="--liger applies to training"):
        Job(model="llama-2-7b", task="infer", liger=True)
