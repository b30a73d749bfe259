"""device_map placement (planner/device_map.py) against transformers 5.23's own functions, exactly.

`from_pretrained(device_map=..., max_memory=..., dtype=torch.bfloat16)` builds the model under
`cls.get_init_context(dtype, ...)` (meta device, the dtype as default, weights not yet tied) and calls
`transformers.integrations.accelerate._get_device_map(model, device_map, max_memory, hf_quantizer)`
(modeling_utils.py:4409). The reference here does exactly that on the shipped config; that function
runs transformers' copies of accelerate's `get_balanced_memory` and `infer_auto_device_map` (which
differ from accelerate 1.15's own: see test_accelerate_own_functions_differ_for_tied_models).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import pytest

from memplan import MemplanInputError
from memplan.device_map import (
    MaxMemory,
    derived_max_memory,
    module_sizes,
    module_tree,
    named_modules,
    place,
)
from memplan.profiles import load_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

GiB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# llama-2-70b (80 layers), Llama-3.1-70B, two tied-embedding families (Gemma, Falcon), Phi-2's biased
# head and extra modules, two MoE layouts (Mixtral: gate then experts; Qwen3-MoE: experts then gate)
MODELS = ["llama-2-70b", "llama-3.1-70b", "gemma-2b", "falcon-7b", "falcon-40b", "phi-2", "mixtral-8x7b",
          "qwen3-30b-a3b", "qwen2.5-7b", "qwen3-8b", "mistral-7b"]
STRATEGIES = ["auto", "balanced", "balanced_low_0", "sequential"]
# (GPU bytes, cpu bytes or None: no "cpu" key, so the overflow goes to "disk")
GPU_SETS = {
    "2x24GiB": ([24 * GiB] * 2, None),
    "4x80GiB": ([80 * GiB] * 4, None),
    "10+40GiB": ([10 * GiB, 40 * GiB], None),
    "2x8GiB+cpu64": ([8 * GiB] * 2, 64 * GiB),  # spills to the cpu
    "2x3GiB+cpu10": ([3 * GiB] * 2, 10 * GiB),  # spills to the cpu, then to disk
    "1x20GiB": ([20 * GiB], None),
    "14+2+30GiB+cpu100": ([14 * GiB, 2 * GiB, 30 * GiB], 100 * GiB),
}


@pytest.fixture(autouse=True)
def _quiet():
    # accelerate warns "Device 0 is not available" for every GPU a CPU-only machine lacks
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def _build(name: str, dtype, quantizer=None):
    from transformers import AutoModelForCausalLM
    from transformers.utils.generic import ContextManagers

    from memplan.validate.models import hf_config

    cfg = hf_config(name, "sdpa")
    cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    # as from_pretrained builds it (modeling_utils.py: get_init_context, cls(config), preprocess_model)
    with ContextManagers(cls.get_init_context(dtype, quantizer is not None, False, None)):
        model = cls(cfg)
        if quantizer is not None:
            quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None,
                                       use_kernels=False)
    return model


@lru_cache(maxsize=None)
def meta_model(name: str, dtype: str = "bf16"):
    return _build(name, DTYPES[dtype])


@lru_cache(maxsize=None)
def bnb_model(name: str, quant: str):
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    pytest.importorskip("bitsandbytes")
    qc = BitsAndBytesConfig(load_in_4bit=True) if quant == "bnb-4bit" else BitsAndBytesConfig(load_in_8bit=True)
    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    return _build(name, torch.bfloat16, quantizer), quantizer


def reference(model, strategy, gpus, cpu, quantizer=None):
    from transformers.integrations.accelerate import _get_device_map

    mm = {i: g for i, g in enumerate(gpus)}
    if cpu is not None:
        mm["cpu"] = cpu
    return dict(_get_device_map(model, strategy, mm, quantizer))


# --- the module tree -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_tree_equals_meta_model(name):
    """Every module, parameter and buffer's bytes as transformers' compute_module_sizes counts them,
    the modules in named_modules() order, the no-split class and the tied groups."""
    from transformers.integrations.accelerate import compute_module_sizes

    model, arch = meta_model(name), load_model(name)
    tree = module_tree(arch)
    for only_modules in (False, True):
        real, real_leaves = compute_module_sizes(model, None, only_modules=only_modules)
        mine, leaves = module_sizes(tree, only_modules=only_modules)
        assert mine == dict(real)
        assert leaves == dict(real_leaves)
    assert [n for n, _ in named_modules(tree)] == [n for n, _ in model.named_modules()]
    real_cls = {n: type(m).__name__ for n, m in model.named_modules()}
    assert {n for n, node in named_modules(tree) if node.cls in tree.no_split} == {
        n for n, c in real_cls.items() if c in model._no_split_modules}
    assert set(tree.no_split) == set(model._no_split_modules)
    groups = set(model.all_tied_weights_keys.values())
    assert set(tree.tied) == {tuple(sorted([k for k, v in model.all_tied_weights_keys.items() if v == t] + [t]))
                              for t in groups}


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_tree_in_other_dtypes(dtype):
    from transformers.integrations.accelerate import compute_module_sizes

    for name in ("gemma-2b", "phi-2"):
        real, _ = compute_module_sizes(meta_model(name, dtype), None, only_modules=False)
        assert module_sizes(module_tree(load_model(name), dtype))[0] == dict(real)


# --- placement -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_placement_equals_transformers(name):
    """Every strategy on every GPU set: memplan's map is transformers' map, key for key."""
    model, arch = meta_model(name), load_model(name)
    for label, (gpus, cpu) in GPU_SETS.items():
        for strategy in STRATEGIES:
            expected = reference(model, strategy, gpus, cpu)
            plan = place(arch, MaxMemory(gpus=tuple(gpus), cpu=cpu), strategy)
            assert plan.device_map == expected, (label, strategy)


def test_the_matrix_covers_splits_cpu_and_disk():
    """The GPU sets above do what they are there for: split across GPUs, spill to cpu, to disk."""
    arch = load_model("llama-2-70b")
    values = lambda gpus, cpu, s="auto": set(place(arch, MaxMemory(gpus=tuple(gpus), cpu=cpu), s).device_map.values())  # noqa: E731
    # 138 GB of bf16 weights balanced over four 80 GiB cards: about a quarter on each
    assert values(*GPU_SETS["4x80GiB"]) == {0, 1, 2, 3}
    assert values(*GPU_SETS["2x8GiB+cpu64"]) == {0, 1, "cpu", "disk"}
    assert "cpu" in values(*GPU_SETS["14+2+30GiB+cpu100"])
    assert values(*GPU_SETS["2x3GiB+cpu10"]) >= {"cpu", "disk"}
    gemma = load_model("gemma-2b")
    assert set(place(gemma, MaxMemory(gpus=(3 * GiB,) * 2, cpu=10 * GiB)).device_map.values()) == {0, 1}


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_placement_in_other_dtypes(dtype):
    for name in ("gemma-2b", "phi-2"):
        for label, (gpus, cpu) in GPU_SETS.items():
            for strategy in ("auto", "sequential"):
                expected = reference(meta_model(name, dtype), strategy, gpus, cpu)
                assert place(load_model(name), MaxMemory(gpus=tuple(gpus), cpu=cpu), strategy, dtype).device_map == expected


@pytest.mark.parametrize("quant", ["bnb-4bit", "bnb-8bit"])
@pytest.mark.parametrize("name", ["llama-2-7b", "gemma-2b", "mixtral-8x7b"])
def test_bitsandbytes_placement(name, quant):
    """bitsandbytes sizes converted weights at 0.5 / 1 byte and scales max_memory by 0.90; with
    modules on the cpu or disk its validate_environment raises, which the plan reports."""
    from transformers.integrations.accelerate import compute_module_sizes

    model, quantizer = bnb_model(name, quant)
    arch = load_model(name)
    real, _ = compute_module_sizes(model, quantizer, only_modules=False)
    assert module_sizes(module_tree(arch, "bf16", quant))[0] == dict(real)
    refused = loaded = 0
    for label, (gpus, cpu) in {**GPU_SETS, "2x1.25GiB+cpu10": ([5 * GiB // 4] * 2, 10 * GiB)}.items():
        for strategy in STRATEGIES:
            plan = place(arch, MaxMemory(gpus=tuple(gpus), cpu=cpu), strategy, quantization=quant)
            try:
                expected = reference(model, strategy, gpus, cpu, quantizer)
            except ValueError as exc:
                assert "dispatched on the CPU or the disk" in str(exc)
                assert plan.refusal is not None, (label, strategy)
                refused += 1
                continue
            assert plan.refusal is None and plan.device_map == expected, (label, strategy)
            loaded += 1
    assert refused and loaded


def test_derived_max_memory_equals_transformers(monkeypatch):
    """No max_memory: transformers' get_max_memory over accelerate's get_max_memory(None). accelerate's
    device query (torch.cuda.mem_get_info per GPU, psutil's available RAM) is replaced by the figures
    a machine would report; transformers' own additions (the allocator's reserved-but-unallocated
    bytes, cpu x 0.90) and get_balanced_memory's single-GPU 0.9 run as they are."""
    import transformers.integrations.accelerate as tia
    from accelerate.utils import get_max_memory as accelerate_get_max_memory

    model, arch = meta_model("llama-2-7b"), load_model("llama-2-7b")
    for free, cached, cpu in [([9 * GiB + 12345], [0], 30 * GiB), ([7 * GiB, 5 * GiB], [256 * 2**20, 0], 3 * GiB + 7),
                              ([4 * GiB] * 3, [1, 2, 3], 64 * GiB)]:
        def fake_query(max_memory=None, free=free, cpu=cpu):
            if max_memory is None:
                return {**{i: f for i, f in enumerate(free)}, "cpu": cpu}
            return accelerate_get_max_memory(max_memory)

        monkeypatch.setattr(tia, "accelerate_max_memory", fake_query)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i, c=cached: c[i] + 1000)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 1000)
        derived = derived_max_memory(free, cpu, cached)
        assert derived.as_dict() == tia.get_max_memory(None)
        for strategy in STRATEGIES:
            expected = dict(tia._get_device_map(model, strategy, None, None))
            assert place(arch, derived, strategy).device_map == expected, (free, strategy)
        monkeypatch.undo()


def test_accelerate_own_functions_differ_for_tied_models():
    """Why the reference is transformers' copy: accelerate 1.15's own get_balanced_memory (mean of the
    final modules, not the biggest leaf) and get_module_size_with_ties give another map for Gemma."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    model, arch = meta_model("gemma-2b"), load_model("gemma-2b")
    model.tie_weights()  # accelerate's own functions find ties on a tied model
    gpus = {0: 24 * GiB, 1: 24 * GiB}
    ns = list(model._no_split_modules)
    own = infer_auto_device_map(model, get_balanced_memory(model, dict(gpus), no_split_module_classes=ns,
                                                           dtype=torch.bfloat16),
                                no_split_module_classes=ns, dtype=torch.bfloat16)
    mine = place(arch, [24 * GiB, 24 * GiB], "auto").device_map
    assert mine == reference(meta_model("gemma-2b"), "auto", [24 * GiB] * 2, None)
    assert mine != dict(own)


def test_offloaded_buffers_as_transformers_warns(monkeypatch):
    """infer_auto_device_map warns when the buffers of modules on the cpu or disk fit no GPU beside
    what it holds; the plan's offloaded_buffer_bytes and offloaded_buffers_fit say the same."""
    import transformers.integrations.accelerate as tia

    warned: list[str] = []
    monkeypatch.setattr(tia.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    seen = set()
    for name in ("llama-2-7b", "gemma-2b"):
        model, arch = meta_model(name), load_model(name)
        for label, (gpus, cpu) in {**GPU_SETS, "100B+cpu64": ([100], 64 * GiB), "2x1GiB+cpu64": ([GiB] * 2, 64 * GiB)}.items():
            warned.clear()
            reference(model, "sequential", gpus, cpu)
            plan = place(arch, MaxMemory(gpus=tuple(gpus), cpu=cpu), "sequential")
            msgs = [m for m in warned if "bytes of buffer for offloaded layers" in m]
            assert bool(msgs) == (not plan.offloaded_buffers_fit), (name, label)
            if msgs:
                assert msgs[0].startswith(f"Current model requires {plan.offloaded_buffer_bytes} bytes")
            seen.add((plan.offloaded_buffer_bytes > 0, plan.offloaded_buffers_fit))
    assert seen >= {(True, True), (True, False), (False, True)}


# --- by hand ---------------------------------------------------------------------------------------

def test_llama_2_7b_by_hand():
    """Llama-2-7B in bf16: embed 32000 x 4096 x 2 B; a decoder layer (4 x 4096^2 attention +
    3 x 4096 x 11008 MLP + 2 norms of 4096) x 2 B; final norm 4096 x 2 B; rotary inv_freq and
    original_inv_freq 2 x 64 fp32; lm_head as the embedding."""
    embed = 32000 * 4096 * 2
    layer = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2
    assert (embed, layer) == (262_144_000, 404_766_720)
    total = 2 * embed + 32 * layer + 4096 * 2 + 2 * 64 * 4
    arch = load_model("llama-2-7b")

    # sequential, {0: 4 GiB, 1: 20 GiB}: GPU 0 keeps room for the largest layer (a decoder layer,
    # larger than the embedding), so it holds the embedding and k layers while
    # embed + k x layer <= 4 GiB - layer: k = floor((4 GiB - layer - embed) / layer) = 8
    k = (4 * GiB - layer - embed) // layer
    assert k == 8
    plan = place(arch, [4 * GiB, 20 * GiB], "sequential")
    expected = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 if i < k else 1 for i in range(32)},
                "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    assert plan.device_map == expected
    assert plan.reserve_bytes == layer
    assert plan.layer_devices == tuple([0] * 8 + [1] * 24)
    assert [(d.device, d.weight_bytes) for d in plan.devices] == [
        (0, embed + 8 * layer), (1, 24 * layer + 4096 * 2 + 2 * 64 * 4 + embed)]
    assert plan.busiest_gpu == 1 and plan.total_weight_bytes == total

    # auto on 2 x 24 GiB: get_balanced_memory caps GPU 0 at total // 2 + int(1.25 x max(largest
    # decoder layer, largest leaf = the embedding weight)); GPU 0 then keeps `layer` in reserve
    per_gpu = total // 2 + int(1.25 * layer)
    assert per_gpu == 7_244_374_272
    plan = place(arch, [24 * GiB, 24 * GiB], "auto")
    assert plan.max_memory == {"0": per_gpu, "1": 24 * GiB}
    k = (per_gpu - layer - embed) // layer
    assert k == 16
    assert plan.layer_devices == tuple([0] * k + [1] * (32 - k))

    # balanced_low_0 on 2 x 24 GiB: GPU 0 gets max(0, total - GPU 1's 24 GiB) = 0 bytes: all on GPU 1
    assert place(arch, [24 * GiB, 24 * GiB], "balanced_low_0").device_map == {"": 1}


def test_tied_head_follows_the_embedding():
    """Gemma's lm_head shares the embedding's weight: it is placed with the embedding and adds no bytes."""
    plan = place(load_model("gemma-2b"), [3 * GiB, 3 * GiB], "sequential")
    assert plan.device_of("lm_head") == plan.device_of("model.embed_tokens") == 0
    assert plan.device_of("model.layers.0.mlp.up_proj.weight") == plan.layer_devices[0]


def test_plan_accounting_adds_up():
    for name, gpus, cpu in [("mixtral-8x7b", (24 * GiB,) * 4, 100 * GiB), ("falcon-40b", (20 * GiB, 30 * GiB), None)]:
        plan = place(load_model(name), MaxMemory(gpus=gpus, cpu=cpu), "balanced")
        assert sum(d.weight_bytes for d in plan.devices) == plan.total_weight_bytes
        for i, dev in enumerate(plan.layer_devices):
            assert plan.device_of(f"{'transformer.h' if name.startswith('falcon') else 'model.layers'}.{i}") == dev
        gpu_bytes = {d.device: d.weight_bytes for d in plan.devices if isinstance(d.device, int)}
        assert gpu_bytes[plan.busiest_gpu] == max(gpu_bytes.values())


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: place(load_model("bloom-560m"), [GiB]), "model_type 'bloom' is not supported"),
    (lambda: place(load_model("llama-2-7b-gptq"), [GiB]), "pre-quantized"),
    (lambda: place(load_model("llama-2-7b"), [GiB], "fastest"), "strategy 'fastest'"),
    (lambda: place(load_model("llama-2-7b"), [GiB], dtype="int8"), "dtype 'int8'"),
    (lambda: place(load_model("llama-2-7b"), [-1]), "max_memory"),
    (lambda: place(load_model("llama-2-7b"), []), "max_memory"),
    (lambda: place(load_model("llama-2-7b"), [GiB], quantization="gptq"), "quantization 'gptq'"),
    (lambda: derived_max_memory([GiB], 2 * GiB, [0, 0]), "gpu_cached_free"),
    (lambda: derived_max_memory([], GiB), "gpu_free"),
])
def test_bad_input(call, match):
    with pytest.raises(MemplanInputError, match=match):
        call()
