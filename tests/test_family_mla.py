"""DeepSeek-V2 / V3 (planner/families/deepseek_v2.py, deepseek_v3.py): multi-head latent attention,
dense first layers, shared and routed experts. Real-size DeepSeek-V2-Lite rows held to the CPU trace
within 3% per phase (training full, LoRA, checkpointed; inference prefill and decode), the KV cache
derived by hand for DeepSeek-V2-Lite and DeepSeek-V3, and the cache transformers really holds."""

import pytest

from memplan import Job, count_params, estimate_memory
from memplan.inference import kv_cache_bytes
from memplan.profiles import load_model

from .conftest import DATA

TOLERANCE = 0.03


def test_v2_lite_count_by_hand():
    """DeepSeek-V2-Lite: 27 layers of hidden 2048, 16 heads; q_proj (no q_lora_rank) 2048 -> 16 x 192,
    kv_a_proj_with_mqa 2048 -> 512 + 64, kv_b_proj 512 -> 16 x (128 + 128), o_proj 16 x 128 -> 2048,
    kv_a_layernorm 512; layer 0 dense (10944), the rest 64 routed experts of 1408 beside 2 shared
    ones (one MLP of 2816) and a 64-way router. Published: 15.7B total."""
    h, a, layers, v = 2048, 16, 27, 102400
    attention = h * a * 192 + h * 576 + 512 * a * 256 + a * 128 * h + 512
    dense = 3 * h * 10944
    routed = 64 * 3 * h * 1408 + 3 * h * 2816 + 64 * h
    total = 2 * v * h + layers * (attention + 2 * h) + dense + (layers - 1) * routed + h
    assert count_params(load_model("deepseek-v2-lite")).total == total == 15_706_484_224


def test_v3_count_is_the_published_671b():
    """DeepSeek-V3 without its multi-token-prediction layer (not built by transformers): 671B."""
    arch = load_model("deepseek-v3")
    assert count_params(arch).total == 671_026_404_352
    est = estimate_memory(Job(model="deepseek-v3", task="infer", micro_batch=1, seq_len=128), arch)
    assert any("multi-token-prediction" in n for n in est.notes)


@pytest.mark.parametrize("model, layers, per_token", [
    # (kv_lora_rank 512 + qk_rope_head_dim 64) elements per position per layer, bf16
    ("deepseek-v2-lite", 27, 27 * 576 * 2),  # 31,104 B per token
    ("deepseek-v3", 61, 61 * 576 * 2),  # 70,272 B per token
])
def test_latent_kv_cache_by_hand(model, layers, per_token):
    arch = load_model(model)
    assert arch.kv_cache_width == arch.latent_cache_width == 512 + 64
    job = Job(model=model, task="infer", micro_batch=2, seq_len=4000, new_tokens=96)
    assert kv_cache_bytes(job, arch) == 2 * 4096 * per_token
    est = estimate_memory(job, arch)
    assert est.bytes_of("KV cache") == 2 * 4096 * per_token
    note = next(n for n in est.notes if n.startswith("transformers caches"))
    assert f"{per_token:,} B per token" in note and "MLA-aware engine" in note
    # decompressed per-head keys (192 wide) and values (128 wide) would be this many times larger
    decompressed = arch.heads * (192 + 128)
    assert decompressed // arch.kv_cache_width == {16: 8, 128: 71}[arch.heads]


def test_transformers_caches_the_latent():
    """The cache transformers' DeepseekV2/V3 attention fills holds the latent (keys kv_lora_rank
    wide, values qk_rope_head_dim wide, one head), not per-head keys and values."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.validate.models import hf_config, meta_model

    for family in ("deepseek_v2", "deepseek_v3"):
        path = str(DATA / f"tiny-{family}.json")
        arch = load_model(path)
        cfg = hf_config(path, "sdpa")
        cfg.use_cache = True
        model = meta_model(cfg, torch.bfloat16)
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            model = model.to_empty(device="cpu").eval()
            out = model(torch.randint(0, arch.vocab, (2, 40)), use_cache=True)
            layers = out.past_key_values.layers
            cached = sum(layer.keys.numel() + layer.values.numel() for layer in layers)
            keys = sum(layer.keys.numel() for layer in layers)
        assert cached == arch.layers * 2 * 40 * arch.cache_width
        assert keys == arch.layers * 2 * 40 * arch.kv_cache_key_width


ROWS = [
    dict(model="deepseek-v2-lite", method="full", micro_batch=2, seq_len=2048),
    dict(model="deepseek-v2-lite", method="lora", micro_batch=4, seq_len=2048),
    dict(model="deepseek-v2-lite", method="lora", micro_batch=4, seq_len=2048, gradient_checkpointing=True),
    dict(model="deepseek-v2-lite", task="infer", micro_batch=4, seq_len=2048, new_tokens=2),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if k != "model"))
def test_v2_lite_matches_trace(row):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from memplan.stacks import cpu_trace_stack
    from memplan.validate.trace import trace_inference, trace_training

    job = Job(**row)
    traced = trace_inference(job) if job.task == "infer" else trace_training(job)
    est = estimate_memory(job, load_model(job.model), stack=cpu_trace_stack(job))
    by_phase = est.measured_phases()
    for snap in traced.timeline:
        if job.task == "infer" or snap.iteration == 1:
            err = (by_phase[snap.phase] - snap.peak_bytes) / snap.peak_bytes
            assert abs(err) <= TOLERANCE, f"{snap.phase} {err:+.2%}"
