"""Gemma 2 (models/gemma2/modeling_gemma2.py): Gemma's RMSNorm (x * (1 + w), in fp32) four times per
layer (Gemma2DecoderLayer: input, post-attention, pre-feedforward and post-feedforward norms; the
post-norms normalise the attention's and the MLP's outputs before the residual adds), tanh
soft-capping of the attention scores (`attn_logit_softcapping`, eager_attention_forward) and of the
final logits (`final_logit_softcapping`, Gemma2ForCausalLM.forward), sliding-window and global
layers alternating (`layer_types`, Gemma2Config.__post_init__: even layers slide), scores scaled by
`query_pre_attn_scalar ** -0.5` (Gemma2Attention.scaling: a scalar, nothing saved), the embedding
scaled by sqrt(hidden) (Gemma2TextScaledWordEmbedding), tied embeddings, gelu_pytorch_tanh.

Gemma2PreTrainedModel sets `_supports_sdpa = False`: transformers 5 refuses attn_implementation
"sdpa", and a model loaded without one runs eager, so an sdpa job is estimated (and traced) as
eager (ModelArch.sdpa_supported)."""

from __future__ import annotations

import dataclasses

from .. import activations as act
from ..architecture import ConfigReader, LinearSpec, ModelArch, attention_linears
from .base import Family
from .decoder import gated_prefill_mlp

PEFT_TARGETS = ("q_proj", "v_proj")  # peft 0.21 utils/constants.py

LAYER_TYPES = ("sliding_attention", "full_attention")


def layer_windows(r: ConfigReader, layers: int, window: int | None, default) -> tuple[int | None, ...]:
    """Each layer's sliding window from `layer_types` (the config's, else `default(i)`, the
    config class's __post_init__ rule): `window` for a sliding_attention layer, None for a global one."""
    types = r.cfg.get("layer_types")
    if types is None:
        types = [default(i) for i in range(layers)]
    elif not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        r.fail(f"layer_types must be a list of {layers} values (num_hidden_layers), each one of "
               f"{', '.join(LAYER_TYPES)}; got {types!r}")
    if window is None and "sliding_attention" in types:
        r.fail("sliding_window is missing; it must be a positive integer when layer_types has sliding_attention layers")
    return tuple(window if t == "sliding_attention" else None for t in types)


def softcap(r: ConfigReader, key: str, default: float | None) -> float | None:
    _, value = r._find((key,))
    if key in r.cfg and r.cfg[key] is None:
        return None  # written as null: soft-capping off
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value or value == float("inf"):
        r.fail(f"{key} must be a positive number or null, got {value!r}")
    return float(value)


def gemma_sandwich_arch(r: ConfigReader, name: str, mt: str, *, decoder_layer: str, windows_default,
                        attn_softcap_default: float | None, final_softcap_default: float | None,
                        qk_norm: bool, rope_kinds: int, sdpa_supported: bool, vocab_default: int) -> ModelArch:
    """The Gemma 2 / Gemma 3 text layer's shape: Llama's projections, four Gemma norms."""
    h = r.int("hidden_size")
    heads, hd = r.heads(h)
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size")
    layers = r.int("num_hidden_layers")
    r.int("query_pre_attn_scalar", default=256)  # only scales the scores (Gemma2Attention.scaling)
    bias = r.bool("attention_bias", False)
    linears = attention_linears(h, heads * hd, kv * hd, bias) + [
        LinearSpec(name="gate_proj", d_in=h, d_out=inter),
        LinearSpec(name="up_proj", d_in=h, d_out=inter),
        LinearSpec(name="down_proj", d_in=inter, d_out=h, tp_style="rowwise"),
    ]
    window = r.int("sliding_window", default=4096)
    return ModelArch(
        name=name,
        family=mt,
        decoder_layer=decoder_layer,
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size", default=vocab_default),
        max_positions=r.int("max_position_embeddings", default=8192),
        tied_embeddings=r.bool("tie_word_embeddings", True),
        norm="rms_gemma",
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        sliding_window=None,
        layer_windows=layer_windows(r, layers, window, windows_default),
        qk_norm=qk_norm,
        activation="gelu_pytorch_tanh",
        linears=tuple(linears),
        default_lora_targets=PEFT_TARGETS,
        layer_norms=4,
        attn_softcap=softcap(r, "attn_logit_softcapping", attn_softcap_default),
        final_softcap=softcap(r, "final_logit_softcapping", final_softcap_default),
        sdpa_supported=sdpa_supported,
        rope_kinds=rope_kinds,
    )


def _parse(r: ConfigReader, name: str, mt: str) -> ModelArch:
    return gemma_sandwich_arch(r, name, mt, decoder_layer="Gemma2DecoderLayer",
                               windows_default=lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention",
                               attn_softcap_default=50.0, final_softcap_default=30.0, qk_norm=False, rope_kinds=1,
                               sdpa_supported=False, vocab_default=256000)


def sandwich_layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """Gemma2DecoderLayer.forward / Gemma3DecoderLayer.forward: input_layernorm -> attention (q/k
    norms on Gemma 3) -> post_attention_layernorm -> residual add -> pre_feedforward_layernorm -> MLP
    -> post_feedforward_layernorm -> residual add."""
    saved = act.Saved()
    act.rms_norm(ctx, arch, "input_norm", ("q_proj", "k_proj", "v_proj"), saved)
    if arch.qk_norm:
        act.gemma_head_norms(ctx, arch, saved)
    act.o_proj(ctx, arch, "o_proj", act.attention_core(ctx, arch, False, saved), saved)
    act.attention_softcap_saved(ctx, arch, saved)
    # past the attention a gradient flows whenever its projections train, even into layer 0 of a
    # frozen-embedding LoRA (the residual sum then requires grad)
    attn_trains = ctx.base_trains or any(lin.name in ctx.targets for lin in arch.linears if lin.part == "attention")
    mid = dataclasses.replace(ctx, grad_in=ctx.grad_in or attn_trains) if not ctx.grad_in else ctx
    act.post_norm_saved(mid, arch, "post_attn_norm", saved)
    act.rms_norm(mid, arch, "mlp.pre_norm", ("gate_proj", "up_proj"), saved)
    act.gated_mlp(ctx, arch, saved)
    mlp_trains = ctx.base_trains or any(lin.name in ctx.targets for lin in arch.linears)
    late = dataclasses.replace(ctx, grad_in=ctx.grad_in or mlp_trains) if not ctx.grad_in else ctx
    act.post_norm_saved(late, arch, "mlp.post_norm", saved)
    return saved


FAMILY = Family(model_types=("gemma2",), parse=_parse, layer_saved=sandwich_layer_saved,
                prefill_mlp_per_token=gated_prefill_mlp)
