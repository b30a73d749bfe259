"""The MoE families of transformers 5 (Qwen2-MoE, Qwen3-MoE, gpt-oss): counts against the published
sizes and by hand, the config checks, gpt-oss's KV cache by hand, and real-size rows against the
CPU trace (fake tensors) within 3% per phase.

Real-size rows come in two kinds: whole models (Qwen3-30B-A3B, gpt-oss-20b with bf16 experts), whose
phases the weights dominate, and two-layer cuts of the same layers with the vocabulary cut to 3,000,
where the layers' activations decide every phase (memplan.validate.models.cut_config).
"""

import json
import os
import tempfile

import pytest

from memplan import Job, count_params, estimate_memory
from memplan.errors import MemplanInputError
from memplan.profiles import MODELS_DIR, load_model

from .trace_check import assert_matches_trace

TOLERANCE = 0.03


# --- parameter counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, published", [
    ("qwen1.5-moe-a2.7b", 14.3e9),  # "14.3B parameters in total and 2.7B activated"
    ("qwen3-30b-a3b", 30.5e9),  # "30.5B in total, 3.3B activated"
    ("qwen3-235b-a22b", 235e9),
    ("gpt-oss-20b", 20.9e9),  # model card: 21B (20.9B) total, 3.6B active
    ("gpt-oss-120b", 116.8e9),  # 117B (116.8B) total, 5.1B active
])
def test_counts_match_published_sizes(name, published):
    assert count_params(load_model(name)).total == pytest.approx(published, rel=0.005)


def test_qwen3_30b_a3b_by_hand():
    """48 layers: q (32 x 128) and o, k and v (4 x 128), q/k norms over the head (128 each), two
    RMSNorms, a router (128 x 2048) and 128 fused experts of 3 x 2048 x 768; untied 151,936 vocab."""
    h, v, layers, e, i, q, kv, hd = 2048, 151936, 48, 128, 768, 4096, 512, 128
    per_layer = 2 * h * q + 2 * h * kv + 2 * hd + 2 * h + e * h + e * 3 * h * i
    assert count_params(load_model("qwen3-30b-a3b")).total == 2 * v * h + layers * per_layer + h


def test_qwen1_5_moe_by_hand():
    """24 layers: biased q/k/v (16 heads of 128), o unbiased, 60 experts of 3 x 2048 x 1408, the
    shared expert (3 x 2048 x 5632) and its gate (2048 -> 1), the router (60 x 2048)."""
    h, v, layers, e, i, s = 2048, 151936, 24, 60, 1408, 5632
    attention = 4 * h * h + 3 * h
    per_layer = attention + 2 * h + e * h + e * 3 * h * i + 3 * h * s + h
    assert count_params(load_model("qwen1.5-moe-a2.7b")).total == 2 * v * h + layers * per_layer + h


def test_gpt_oss_20b_by_hand():
    """24 layers: biased q (64 x 64), k and v (8 x 64) and o; 64 sinks; a biased router (32 x 2880);
    32 experts with biases: gate_up 2880 x 5760 (+5760), down 2880 x 2880 (+2880)."""
    h, v, layers, e, i, q, kv, heads = 2880, 201088, 24, 32, 2880, 4096, 512, 64
    attention = 2 * (h * q + q) - q + h + 2 * (h * kv + kv)
    experts = e * (h * 2 * i + 2 * i) + e * (i * h + h)
    per_layer = attention + heads + e * h + e + experts + 2 * h
    assert count_params(load_model("gpt-oss-20b")).total == 2 * v * h + layers * per_layer + h


def test_gpt_oss_expert_specs_name_the_fused_parameters():
    """The fused-experts LinearSpecs carry the parameter names and copies a reader of the
    checkpoint's quantization_config (MXFP4) finds them by; the shipped configs keep theirs."""
    arch = load_model("gpt-oss-20b")
    experts = {lin.name: lin for lin in arch.linears if lin.module == "fused experts"}
    assert set(experts) == {"experts.gate_up_proj", "experts.down_proj"}
    assert {lin.copies for lin in experts.values()} == {32}
    for name in ("openai--gpt-oss-20b", "openai--gpt-oss-120b"):
        q = json.loads((MODELS_DIR / f"{name}.json").read_text())["quantization_config"]
        assert q["quant_method"] == "mxfp4" and "model.layers.*.mlp.router" in q["modules_to_not_convert"]


def test_gpt_oss_meta_model_builds_bf16_experts():
    """from_config ignores quantization_config: the meta model (counts, trace) has bf16 3-D experts."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memplan.validate.models import hf_config, meta_model

    cfg = hf_config("gpt-oss-20b", "sdpa")
    assert cfg._attn_implementation == "eager"  # no SDPA path: transformers' default there
    experts = meta_model(cfg, torch.bfloat16).model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and tuple(experts.gate_up_proj.shape) == (32, 2880, 5760)


# --- config checks --------------------------------------------------------------------------------

def _variant(tmp_path, base: str, **changes) -> str:
    cfg = json.loads((MODELS_DIR / f"{base}.json").read_text())
    cfg.update(changes)
    path = tmp_path / f"{base}-variant.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("base, changes, message", [
    ("Qwen--Qwen3-30B-A3B", dict(mlp_only_layers=[0, 1]), "some layers dense"),
    ("Qwen--Qwen1.5-MoE-A2.7B", dict(decoder_sparse_step=2), "some layers dense"),
    ("Qwen--Qwen3-30B-A3B", dict(num_experts_per_tok=200), "num_experts_per_tok must be at most num_experts"),
    ("Qwen--Qwen3-30B-A3B", dict(mlp_only_layers="none"), "mlp_only_layers must be a list"),
    ("openai--gpt-oss-20b", dict(layer_types=["full_attention"] * 3), "layer_types must list"),
    ("openai--gpt-oss-20b", dict(num_local_experts=0), "num_local_experts must be a positive integer"),
])
def test_config_errors(tmp_path, base, changes, message):
    with pytest.raises(MemplanInputError, match=message):
        load_model(_variant(tmp_path, base, **changes))


def test_qwen2_moe_sliding_layers_follow_transformers(tmp_path):
    """use_sliding_window: the even layers below max_window_layers slide (Qwen2MoeConfig.layer_types)."""
    path = _variant(tmp_path, "Qwen--Qwen1.5-MoE-A2.7B", use_sliding_window=True, max_window_layers=6, sliding_window=4096)
    arch = load_model(path)
    transformers = pytest.importorskip("transformers")
    cfg = json.loads(open(path).read())
    types = transformers.Qwen2MoeConfig(**cfg).layer_types
    assert [w is not None for w in arch.layer_windows] == [t == "sliding_attention" for t in types]
    assert set(arch.layer_windows) == {4096, None}
    assert load_model("qwen1.5-moe-a2.7b").layer_windows == ()


# --- gpt-oss's KV cache by hand -------------------------------------------------------------------

@pytest.mark.parametrize("seq, new", [(100, 20), (1024, 8), (4096, 64)])
def test_gpt_oss_kv_cache_by_hand(seq, new):
    """12 full layers hold every position; 12 sliding layers (window 128) hold at most 128 (the
    DynamicSlidingWindowLayer cat of its last 127 and the new one) once decoding, but after the prefill
    the whole prompt (its kept slice is a view of the prompt's cat); 8 kv heads x 64, K and V, bf16."""
    job = Job(model="gpt-oss-20b", task="infer", micro_batch=2, seq_len=seq, new_tokens=new)
    per_position = 2 * 8 * 64 * 2 * job.micro_batch
    decoding = 12 * (seq + new) * per_position + 12 * min(seq + new, 128) * per_position
    by_hand = max(decoding, 24 * seq * per_position)
    est = estimate_memory(job, load_model("gpt-oss-20b"))
    assert next(c for c in est.components if c.name == "KV cache").bytes == by_hand


# --- real-size rows against the CPU trace ---------------------------------------------------------

def _bf16_experts(model: str) -> str:
    """gpt-oss with bf16 experts: its config without the MXFP4 quantization_config, which the trace
    cannot run (from_config builds bf16 experts either way); the estimate then counts the same model."""
    from memplan.profiles import load_hf_config

    _, cfg = load_hf_config(model)
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    path = os.path.join(tempfile.mkdtemp(), f"{model}-bf16-experts.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def test_gpt_oss_mxfp4_weights_by_hand():
    """transformers integrations/mxfp4.py: each expert weight in blocks of 32 values, 16 B of packed
    4-bit values and a 1 B E8M0 scale per block, fp32 biases; the rest (attention, router, sinks,
    embeddings, norms) bf16. gpt-oss-20b: 24 layers x 32 experts, hidden 2880, expert width 2880."""
    arch = load_model("gpt-oss-20b")
    gate_up = 32 * (5760 * 2880 // 2 + 5760 * 2880 // 32 + 4 * 5760)
    down = 32 * (2880 * 2880 // 2 + 2880 * 2880 // 32 + 4 * 2880)
    expert_params = 24 * 32 * (2880 * 5760 + 5760 + 2880 * 2880 + 2880)
    rest = count_params(arch).total - expert_params
    est = estimate_memory(Job(model="gpt-oss-20b", task="infer"), arch)
    assert est.component("weights").bytes == 24 * (gate_up + down) + 2 * rest


def _cut(model: str) -> str:
    from memplan.validate.models import cut_config

    path = cut_config(_bf16_experts(model) if model.startswith("gpt-oss") else model, 2, vocab=3000)
    cfg = json.loads(open(path).read())
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:2]
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        cfg.pop(key, None)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


WHOLE = [
    dict(model="qwen3-30b-a3b", method="full", gradient_checkpointing=True, micro_batch=1, seq_len=512),
    dict(model="qwen3-30b-a3b", task="infer", micro_batch=2, seq_len=1024, new_tokens=4),
    dict(model="gpt-oss-20b", method="lora", gradient_checkpointing=True, micro_batch=2, seq_len=512),
    dict(model="gpt-oss-20b", task="infer", micro_batch=2, seq_len=512, new_tokens=4),
]
CUT = [
    dict(method="full", micro_batch=2, seq_len=512),
    dict(method="lora", micro_batch=2, seq_len=512),
    dict(method="lora", gradient_checkpointing=True, micro_batch=2, seq_len=512),
    dict(task="infer", micro_batch=2, seq_len=512, new_tokens=4),
]
CUT_MODELS = ["qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "gpt-oss-20b"]


def _check(job: Job) -> None:
    assert_matches_trace(job, TOLERANCE)


def _id(row: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in row.items())


@pytest.mark.parametrize("row", WHOLE, ids=[_id(r) for r in WHOLE])
def test_whole_model_matches_trace(row):
    if row["model"].startswith("gpt-oss"):
        row = {**row, "model": _bf16_experts(row["model"])}
    _check(Job(**row))


@pytest.mark.parametrize("model, row", [(m, r) for m in CUT_MODELS for r in CUT],
                         ids=[f"{m}-cut-{_id(r)}" for m in CUT_MODELS for r in CUT])
def test_cut_layers_match_trace(model, row):
    _check(Job(model=_cut(model), **row))
