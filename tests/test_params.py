"""Parameter counts from the config alone equal the real transformers model on the meta device."""

import pytest

from memplan import count_params
from memplan.profiles import ALIASES, load_model, shipped_models

from .conftest import DATA


def test_every_alias_points_at_a_shipped_profile():
    assert set(ALIASES.values()) == set(shipped_models())


@pytest.mark.parametrize(
    "name, expected",
    [
        # published counts, independent of transformers
        ("falcon-7b", 6_921_720_704),
        ("llama-2-7b", 6_738_415_616),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen3-8b", 8_190_735_360),
        # Llama 3.1/3.2/3.3 (the model cards' 8.03B, 70.6B, 405.9B, 1.24B, 3.21B), derived by hand from
        # the config: embed + layers x (attention + MLP + 2 norms) + norm (+ lm_head unless tied)
        ("llama-3.1-8b", 128256 * 4096 * 2 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096),
        ("llama-3.1-70b", 128256 * 8192 * 2 + 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 8192),
        # Meta-Llama-3-70B: the model card's 70.6B, the same shapes as 3.1 with 8,192 positions
        ("llama-3-70b", 128256 * 8192 * 2 + 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 8192),
        ("llama-3.1-405b", 128256 * 16384 * 2 + 126 * (2 * 16384**2 + 2 * 16384 * 1024 + 3 * 16384 * 53248 + 2 * 16384) + 16384),
        ("llama-3.2-1b", 128256 * 2048 + 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048) + 2048),
        ("llama-3.2-3b", 128256 * 3072 + 28 * (2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072) + 3072),
    ],
)
def test_golden_counts(name, expected):
    assert count_params(load_model(name)).total == expected


def test_llama_2_7b_by_hand():
    # embed 32000*4096, 32 x (4 x 4096^2 attention + 3 x 4096*11008 MLP + 2 norms), final norm, lm_head
    h, i, v, layers = 4096, 11008, 32000, 32
    by_hand = v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h + v * h
    assert count_params(load_model("llama-2-7b")).total == by_hand


def test_qwen2_by_hand():
    """Qwen2.5-7B: q, k and v carry a bias, o does not; 4 kv heads of 128; untied head."""
    h, i, v, layers, kv = 3584, 18944, 152064, 28, 512
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h
    by_hand = v * h + layers * (attention + 3 * h * i + 2 * h) + h + v * h
    assert count_params(load_model("qwen2.5-7b")).total == by_hand


def test_qwen3_by_hand():
    """Qwen3-8B: no attention biases, head_dim 128 given explicitly, and an RMSNorm weight over
    each head of q and of k (q_norm, k_norm: 128 each) per layer. Non-embedding 6.95B, as published."""
    h, i, v, layers, kv, hd = 4096, 12288, 151936, 36, 1024, 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h + 2 * hd
    assert layers * per_layer + h == 6_946_075_648
    assert count_params(load_model("qwen3-8b")).total == v * h + layers * per_layer + h + v * h


@pytest.mark.parametrize(
    "use_sliding_window, max_window_layers, window",
    [(False, 28, None), (True, 0, 4096), (True, 14, None)],  # partly sliding: counted in full (an upper bound)
)
def test_qwen2_sliding_window_follows_layer_types(tmp_path, use_sliding_window, max_window_layers, window):
    import json

    from memplan.profiles import MODELS_DIR

    cfg = json.loads((MODELS_DIR / "Qwen--Qwen2.5-7B.json").read_text())
    cfg.update(use_sliding_window=use_sliding_window, max_window_layers=max_window_layers, sliding_window=4096)
    path = tmp_path / f"qwen-{use_sliding_window}-{max_window_layers}.json"
    path.write_text(json.dumps(cfg))
    assert load_model(str(path)).sliding_window == window
    transformers = pytest.importorskip("transformers")
    layer_types = transformers.Qwen2Config(**cfg).layer_types
    assert (set(layer_types) == {"sliding_attention"}) == (window is not None)


@pytest.mark.parametrize("model", shipped_models() + [str(p) for p in sorted(DATA.glob("tiny-*.json"))])
def test_count_equals_meta_model(model):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memplan.validate.models import hf_config, meta_model

    real = meta_model(hf_config(model, "sdpa"), torch.bfloat16)
    arch = load_model(model)
    assert count_params(arch).total == sum(p.numel() for p in real.parameters())
    # the family's decoder-layer class (what FSDP wraps and checkpointing recomputes) is the real one
    decoder = real.base_model.layers if hasattr(real.base_model, "layers") else real.base_model.h
    assert {type(m).__name__ for m in decoder} == {arch.decoder_layer}
    # and the linears it lists exist under those names with those module classes
    modules = {n: type(m) for n, m in real.named_modules()}
    for lin in arch.linears:
        found = [c for n, c in modules.items() if n.endswith("." + lin.name)]
        if lin.module == "fused experts":
            assert not found or not issubclass(found[0], torch.nn.Linear), lin.name
            continue
        assert found, lin.name
        exact = found[0] is torch.nn.Linear
        assert exact == (lin.module == "Linear") and issubclass(found[0], torch.nn.Linear), lin.name


def test_quantizable_linears_follow_transformers_bnb_rule():
    # Falcon's projections are FalconLinear, a subclass that transformers' bnb loading skips
    assert count_params(load_model("falcon-7b")).quantizable_linear == 0
    # Mixtral's experts are fused 3D parameters: only attention is quantized
    arch = load_model("mixtral-8x7b")
    attn = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)
    assert count_params(arch).quantizable_linear == attn
