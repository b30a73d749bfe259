"""Behaviour of the estimate: components by method and dtype, phases, fit."""

import pytest

from memplan import Job, estimate, inference
from memplan.profiles import load_model
from memplan.errors import MemplanInputError
from pydantic import ValidationError


def test_json_fields_and_peak_is_max_phase():
    est = estimate("llama-2-7b", method="lora", micro_batch=2, seq_len=1024, gpu="A100-80GB")
    data = est.model_dump()
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "peak_phase", "components"):
        assert key in data
    assert est.peak_allocated_bytes == max(p.allocated_bytes for p in est.phases)
    assert est.peak_reserved_bytes > est.peak_allocated_bytes
    assert est.device_used_bytes > est.peak_reserved_bytes
    assert all(isinstance(c.bytes, int) and c.formula for c in est.components)
    assert est.fits is True


def test_torch_adamw_states_follow_parameter_dtype():
    bf16 = estimate("llama-2-7b", method="full")
    fp32 = estimate("llama-2-7b", method="full", weight_dtype="fp32")
    assert bf16.component("optimizer states").bytes == 2 * 2 * bf16.params.total
    assert fp32.component("optimizer states").bytes == 2 * 4 * fp32.params.total


@pytest.mark.parametrize(
    "opt, per_param",
    [("sgd", 0), ("sgd_momentum", 4), ("paged_adamw", 8)],
)
def test_optimizer_state_sizes(opt, per_param):
    est = estimate("llama-2-7b", method="lora", optimizer=opt)
    assert est.bytes_of("optimizer states") == per_param * est.trainable_params


def test_8bit_adam_is_two_bytes_plus_block_absmax():
    est = estimate("llama-2-7b", method="lora", optimizer="adamw_8bit")
    n = est.trainable_params
    assert est.component("optimizer states").bytes == 2 * (n + 4 * -(-n // 256))


def test_paged_states_split_at_bnb_threshold():
    """bitsandbytes pages only tensors of 1e5 elements or more. Llama-2-7B, r=16:
    q/v adapters (16 x 4096 = 65,536 each) are all under it, so nothing is paged; with all-linear,
    gate/up B (11008 x 16) and down A (16 x 11008) = 176,128 each are paged, the 11 other tensors
    per layer (720,896 params) are not: 32 x 720,896 x 8 B = 184,549,376 B in torch memory (the
    H100 measured 176.0 MiB = 184,549,376 B beyond the model and workspaces, validate/results)."""
    default = estimate("llama-2-7b", method="qlora", optimizer="paged_adamw")
    assert default.component("optimizer states").pool == "torch"
    assert not any(c.name == "paged optimizer states" for c in default.components)
    plain = estimate("llama-2-7b", method="qlora", optimizer="adamw", foreach=False)
    assert default.peak_allocated_bytes == plain.peak_allocated_bytes

    all_lin = estimate("llama-2-7b", method="qlora", optimizer="paged_adamw", lora_targets="all-linear")
    assert all_lin.component("optimizer states").bytes == 32 * 720_896 * 8
    paged = all_lin.component("paged optimizer states")
    assert paged.pool == "unified" and paged.bytes == 32 * 3 * 176_128 * 8
    assert all_lin.device_used_bytes - all_lin.peak_reserved_bytes >= paged.bytes


def test_rank_past_paging_threshold_leaves_torch_pool():
    """Llama-2-7B LoRA on q/v with paged AdamW: at r=24 each adapter tensor is 4096 x 24 = 98,304
    elements, under bitsandbytes' 1e5 threshold, so all 32 x 4 tensors' states (8 B each) sit in
    torch's pool: 32 x 4 x 98,304 x 8 = 100,663,296 B. At r=25 (102,400 elements) every one is
    paged. torch's peak therefore drops by those states less what the larger rank adds, while the
    device total (torch pool + unified memory) grows."""
    r24 = estimate("llama-2-7b", method="lora", optimizer="paged_adamw", lora_rank=24, seq_len=8)
    r25 = estimate("llama-2-7b", method="lora", optimizer="paged_adamw", lora_rank=25, seq_len=8)
    assert r24.component("optimizer states").bytes == 32 * 4 * 98_304 * 8
    assert not any(c.name == "paged optimizer states" for c in r24.components)
    assert r25.bytes_of("optimizer states") == 0
    assert r25.component("paged optimizer states").bytes == 32 * 4 * 102_400 * 8
    assert r25.peak_allocated_bytes < r24.peak_allocated_bytes
    assert r25.device_used_bytes > r24.device_used_bytes


def test_lora_trainable_params_by_hand():
    est = estimate("llama-2-7b", method="lora", lora_rank=8)
    assert est.trainable_params == 32 * 8 * ((4096 + 4096) * 2)  # q_proj and v_proj
    all_lin = estimate("llama-2-7b", method="lora", lora_rank=8, lora_targets="all-linear")
    per_layer = 8 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert all_lin.trainable_params == 32 * per_layer


def test_kbit_prepare_upcasts_unquantized_params_to_fp32():
    on = estimate("llama-3-8b", method="qlora")
    off = estimate("llama-3-8b", method="qlora", kbit_prepare=False)
    unquantized = on.params.unquantized  # 128k-vocab embeddings and lm_head dominate
    assert on.component("weights").bytes - off.component("weights").bytes == unquantized * 2
    assert unquantized * 2 > 2 * 10**9  # "moves gigabytes": 2.1 GB for Llama 3 8B


def test_checkpointing_cuts_activations():
    off = estimate("llama-2-7b", method="lora", micro_batch=4, seq_len=2048, gradient_checkpointing=False)
    on = estimate("llama-2-7b", method="lora", micro_batch=4, seq_len=2048, gradient_checkpointing=True)
    assert on.component("activations").bytes * 10 < off.component("activations").bytes
    assert on.peak_allocated_bytes < off.peak_allocated_bytes


def test_eager_attention_is_quadratic_sdpa_linear():
    def act(attn, s):
        return estimate("llama-2-7b", method="lora", seq_len=s, attention=attn).component("activations").bytes

    assert act("sdpa", 4096) / act("sdpa", 2048) == pytest.approx(2, rel=0.01)
    assert act("eager", 4096) / act("eager", 2048) > 3


def test_qlora_counts_dequantized_weight_and_4bit_storage():
    est = estimate("llama-2-7b", method="qlora")
    assert est.component("weights").bytes < 0.7 * 6.74e9


def test_falcon_quantization_note():
    est = estimate("falcon-7b", method="qlora")
    assert any("FalconLinear" in n or "not plain nn.Linear" in n for n in est.notes)


def test_inference_kv_cache_by_hand():
    est = estimate("llama-3-8b", task="infer", seq_len=1000, new_tokens=24, micro_batch=3)
    # 2 x 32 layers x 8 kv heads x 128 head dim x 1024 positions x batch 3 x 2 bytes
    assert est.component("KV cache").bytes == 2 * 32 * 8 * 128 * 1024 * 3 * 2


def test_mistral_sliding_window_caps_kv_cache():
    est = estimate("mistral-7b", task="infer", seq_len=8000, new_tokens=100)
    kv = est.component("KV cache")
    # the decode's cache keeps the 4,096-position window; after the prefill each layer still holds
    # the whole prompt (DynamicSlidingWindowLayer keeps a view of the prompt's torch.cat)
    assert kv.phase_bytes["prefill"] == 2 * 32 * 8 * 128 * 8000 * 2
    assert est.phases[-1].name == "decode"
    assert inference.kv_cache_bytes(est.job, load_model("mistral-7b"), generated=True) == kv.phase_bytes["decode"]
    assert inference.layer_cache_bytes(est.job, load_model("mistral-7b"), 0) == 2 * 8 * 128 * 4096 * 2


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(micro_batch=0), "micro-batch"),
        (dict(seq_len=-5), "seq-len"),
        (dict(method="qlora", weight_dtype="bf16"), "4-bit"),
        (dict(method="full", weight_dtype="nf4"), "full fine-tuning"),
        (dict(method="lora", weight_dtype="nf4"), "qlora"),
        (dict(lora_targets="nonexistent"), "nonexistent"),
    ],
)
def test_bad_input_names_the_value(fields, words):
    with pytest.raises((MemplanInputError, ValidationError)) as err:
        estimate("llama-2-7b", **{"method": "lora", **fields})
    assert words in str(err.value)


def test_sequence_longer_than_model_allows():
    with pytest.raises(MemplanInputError, match="4096"):
        estimate("llama-2-7b", seq_len=4097)


def test_job_is_shared_model():
    job = Job(model="phi-2", method="lora")
    assert estimate(job=job).job == job
