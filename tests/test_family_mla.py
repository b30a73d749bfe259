"""DeepSeek-V2 / V3 (planner/families/deepseek_v2.py, deepseek_v3.py): multi-head latent attention,
dense first layers, shared and routed experts. Real-size DeepSeek-V2-Lite rows held to the CPU trace
within 3% per phase (training full, LoRA, checkpointed; inference prefill and decode), the KV cache
derived by hand for DeepSeek-V2-Lite and DeepSeek-V3, and the cache transformers really holds."""

import pytest

from memplan import Job, count_params, estimate_memory
from memplan.inference import kv_cache_bytes
from memplan.profiles import load_model

from .conftest import DATA
from .trace_check import assert_matches_trace

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


# A DeepSeek-V2-Lite trace costs 7-30 s on a loaded CI machine (27 layers of 64 fused experts; a
# LoRA one the most): LoRA and checkpointing share one row. Uncheckpointed LoRA (b=4, s=2048) and
# a 16-token decode were held to the trace as well when the family was added (docs/activations.md).
ROWS = [
    dict(model="deepseek-v2-lite", method="full", micro_batch=2, seq_len=2048),
    dict(model="deepseek-v2-lite", method="lora", micro_batch=4, seq_len=2048, gradient_checkpointing=True),
    dict(model="deepseek-v2-lite", task="infer", micro_batch=4, seq_len=2048, new_tokens=2),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if k != "model"))
def test_v2_lite_matches_trace(row):
    assert_matches_trace(Job(**row), TOLERANCE)


def _tiny(family: str, **changes) -> dict:
    import json

    cfg = json.loads((DATA / f"tiny-{family}.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("family, changes, words", [
    ("deepseek_v2", dict(kv_lora_rank="big"), "kv_lora_rank must be a positive integer, got 'big'"),
    ("deepseek_v2", dict(qk_rope_head_dim=0), "qk_rope_head_dim must be a positive integer, got 0"),
    ("deepseek_v2", dict(q_lora_rank=-1), "q_lora_rank must be a positive integer, got -1"),
    ("deepseek_v2", dict(first_k_dense_replace=-1), "first_k_dense_replace must be an integer >= 0, got -1"),
    ("deepseek_v2", dict(n_routed_experts=0), "n_routed_experts must be a positive integer, got 0"),
    ("deepseek_v2", dict(num_experts_per_tok=9), "num_experts_per_tok must be at most n_routed_experts (8), got 9"),
    ("deepseek_v2", dict(moe_layer_freq=2), "moe_layer_freq must be 1"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method must be greedy or group_limited_greedy"),
    ("deepseek_v3", dict(n_group=3), "n_group must divide n_routed_experts (8), got 3"),
    ("deepseek_v3", dict(topk_group=3), "topk_group must be at most n_group (2), got 3"),
    ("deepseek_v3", dict(moe_intermediate_size=0), "moe_intermediate_size must be a positive integer, got 0"),
    ("deepseek_v2", dict(num_experts_per_tok=...), "num_experts_per_tok is missing"),
])
def test_bad_config_is_one_line(tmp_path, family, changes, words):
    import json

    from memplan.errors import MemplanInputError

    path = tmp_path / "config.json"
    path.write_text(json.dumps(_tiny(family, **changes)))
    with pytest.raises(MemplanInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_model(str(path))


@pytest.mark.parametrize("family, changes", [
    ("deepseek_v3", dict(first_k_dense_replace=5)),  # every layer dense
    ("deepseek_v3", dict(q_lora_rank=..., first_k_dense_replace=..., n_group=..., topk_group=...)),  # defaults
    ("deepseek_v2", dict(q_lora_rank=..., n_shared_experts=...)),
])
def test_counts_follow_transformers_defaults(tmp_path, family, changes):
    """Keys left out take the config class's defaults (q_lora_rank 1536 unless written null,
    first_k_dense_replace 3 in V3 and 0 in V2, ...): the count is still the meta model's."""
    import json

    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memplan.validate.models import hf_config, meta_model

    path = tmp_path / "config.json"
    cfg = _tiny(family, **changes)
    if "n_group" in changes:
        cfg["n_routed_experts"] = 16  # V3's default n_group (8) must divide it
    path.write_text(json.dumps(cfg))
    real = meta_model(hf_config(str(path), "sdpa"), torch.bfloat16)
    assert count_params(load_model(str(path))).total == sum(p.numel() for p in real.parameters())
