"""KV cache options (planner/inference.py): dynamic vs static vs sliding vs quantized bytes by hand, and
trace rows where the cache runs under fake tensors (StaticCache, QuantizedCache(backend="fp8")).

Hand numbers on tiny-llama (3 layers, 2 kv heads x head dim 32: 128 elements per position for K and V
together) and a sliding-window copy of tiny-mistral (window 64)."""

import json
from pathlib import Path

import pytest

from memplan import Job, estimate_memory
from memplan.errors import MemplanInputError
from memplan.inference import kv_cache_bytes, cache_append_bytes
from memplan.profiles import load_model
from memplan.stacks import get


TINY = str(Path(__file__).resolve().parents[1] / "profiles" / "tiny" / "tiny-llama.json")


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    cfg = json.load(open(TINY.replace("tiny-llama", "tiny-mistral")))
    cfg["sliding_window"] = 64
    path = tmp_path_factory.mktemp("kv") / "tiny-mistral-w64.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _job(model, **kw):
    return Job(model=model, task="infer", **{"seq_len": 100, "new_tokens": 20, "micro_batch": 2, **kw})


def test_dynamic_and_static_by_hand():
    arch = load_model(TINY)
    assert arch.cache_width == 2 * 2 * 32
    dyn, st = _job(TINY), _job(TINY, cache_implementation="static")
    # dynamic: the prompt during the prefill, prompt + new at the end: 3 layers x 128 x positions x 2 x 2 B
    assert kv_cache_bytes(dyn, arch, generated=False) == 3 * 128 * 100 * 2 * 2
    assert kv_cache_bytes(dyn, arch) == 3 * 128 * 120 * 2 * 2
    # static: max_cache_len = 120 preallocated at the first update, so the prefill holds it already
    assert kv_cache_bytes(st, arch, generated=False) == kv_cache_bytes(st, arch) == 3 * 128 * 120 * 2 * 2
    # dynamic append: one layer's K (old and new alive across the cat); static writes in place
    assert cache_append_bytes(dyn, arch) == 128 * 120 * 2 * 2 // 2
    assert cache_append_bytes(st, arch) == 0


def test_sliding_by_hand(sliding):
    arch = load_model(sliding)
    assert arch.window_of(0) == 64 and arch.cache_width == 2 * 4 * 32
    dyn, st = _job(sliding), _job(sliding, cache_implementation="static")
    # the prefill: DynamicSlidingWindowLayer keeps a view of the prompt's cat, whose storage is all 100 positions,
    # and the decode starts from it (each layer drops it at its first update, down to the window)
    assert kv_cache_bytes(dyn, arch, generated=False) == 3 * 256 * 100 * 2 * 2
    assert kv_cache_bytes(dyn, arch) == 3 * 256 * 100 * 2 * 2
    short = _job(sliding, seq_len=50)  # 50 + 20 > 64: the window at the end, the prompt's 50 before
    assert kv_cache_bytes(short, arch) == 3 * 256 * 64 * 2 * 2
    # StaticSlidingWindowLayer: min(window, max_cache_len) = 64 positions from the first update
    assert kv_cache_bytes(st, arch, generated=False) == 3 * 256 * 64 * 2 * 2
    # a full static sliding layer rolls K and V into new tensors: one layer's K and V
    assert cache_append_bytes(st, arch) == 256 * 64 * 2 * 2


def test_quantized_by_hand():
    arch = load_model(TINY)
    # int4, 20 new tokens: 20 residual positions (20 mod 128) in bf16, 100 quantized; per K or V tensor
    # n = 2 x 100 x 64 values: n/2 bytes packed + (n/64 groups) x (scale + zero) x 2 B
    n = 2 * 100 * 64
    layer = 2 * (n // 2 + 2 * (n // 64) * 2) + 2 * 20 * 128 * 2
    assert kv_cache_bytes(_job(TINY, kv_cache_dtype="int4"), arch) == 3 * layer
    n8 = 2 * 100 * 64
    assert kv_cache_bytes(_job(TINY, kv_cache_dtype="int8"), arch) == 3 * (
        2 * (n8 + 2 * (n8 // 64) * 2) + 2 * 20 * 128 * 2)
    # 200 new tokens: the end holds 200 mod 128 = 72 residual; just before the flush at m = 127 the cache
    # held 100 quantized + 127 residual, which is more: that moment counts
    n_end, n_pre = 2 * 228 * 64, 2 * 100 * 64
    end = 2 * (n_end // 2 + 2 * (n_end // 64) * 2) + 2 * 72 * 128 * 2
    pre = 2 * (n_pre // 2 + 2 * (n_pre // 64) * 2) + 2 * 127 * 128 * 2
    assert kv_cache_bytes(_job(TINY, kv_cache_dtype="int4", new_tokens=200), arch) == 3 * max(end, pre)
    # fp8: 1 B a value and one fp32 scale per K and V tensor, no residual
    assert kv_cache_bytes(_job(TINY, kv_cache_dtype="fp8"), arch) == 3 * 2 * (2 * 120 * 64 + 4)
    # fp8 update: the returned keys (bf16) beside the values' fp32 copy and fp32 product
    assert cache_append_bytes(_job(TINY, kv_cache_dtype="fp8"), arch) == 2 * 120 * 64 * (2 + 8)
    # int4 update: the dequantized K and V and their cat: two bf16 copies of one layer's K and V
    assert cache_append_bytes(_job(TINY, kv_cache_dtype="int4"), arch) == 2 * 2 * 2 * 120 * 64 * 2


def test_quantized_refusals(sliding):
    with pytest.raises(MemplanInputError, match="only models whose layers all attend globally"):
        estimate_memory(_job(sliding, kv_cache_dtype="int4"), load_model(sliding))
    with pytest.raises(MemplanInputError, match="QuantizedCache, a dynamic cache"):
        _job(TINY, kv_cache_dtype="fp8", cache_implementation="static")
    with pytest.raises(MemplanInputError, match="applies to inference"):
        Job(model=TINY, kv_cache_dtype="int8")


pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("model,kw", [
    (TINY, {"cache_implementation": "static"}),
    (TINY, {"kv_cache_dtype": "fp8"}),
    ("sliding", {"cache_implementation": "static"}),
    ("sliding", {}),
])
def test_against_trace(model, kw, sliding):
    from memplan.validate.trace import trace_inference

    model = sliding if model == "sliding" else model
    job = Job(model=model, task="infer", seq_len=160, new_tokens=8, micro_batch=4, **kw)
    est = {p.name.value: p.allocated_bytes
           for p in estimate_memory(job, load_model(model), None, get(job.stack).on_cpu()).phases}
    for snap in trace_inference(job).timeline:
        assert est[snap.phase.value] == pytest.approx(snap.peak_bytes, rel=0.03), snap.phase


@pytest.mark.parametrize("fields", [
    # (whole Llama-2-7B with the fp8 cache, b2 256 + 8, is within 0.03% too: left out for CI time)
    # a prompt past Mistral's 4,096 window: the dynamic sliding layers hold the prompt's cat after the prefill
    dict(model="mistral-7b", seq_len=4400, new_tokens=4, micro_batch=1),
])
def test_whole_models_against_trace(fields):
    from memplan.validate.trace import trace_inference

    job = Job(task="infer", **fields)
    est = {p.name.value: p.allocated_bytes
           for p in estimate_memory(job, load_model(job.model), None, get(job.stack).on_cpu()).phases}
    for snap in trace_inference(job).timeline:
        assert est[snap.phase.value] == pytest.approx(snap.peak_bytes, rel=0.01), snap.phase
