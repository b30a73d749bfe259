"""OLMo 2 (models/olmo2/modeling_olmo2.py): no pre-norms; Olmo2DecoderLayer normalises the
attention's output (post_attention_layernorm) and the MLP's output (post_feedforward_layernorm)
before each residual add, and Olmo2Attention normalises the whole q and k projections (q_norm over
heads x head_dim, k_norm over kv_heads x head_dim, before the heads are split). Olmo2RMSNorm
multiplies its weight into the fp32 normalised input and casts after (`(weight * x).to(dtype)`).
Llama's gated SiLU MLP, RoPE, untied head."""

from __future__ import annotations

import dataclasses

from .. import activations as act
from ..architecture import ConfigReader, LinearSpec, ModelArch, attention_linears
from .base import Family
from .decoder import gated_prefill_mlp

# peft 0.21 utils/constants.py has no olmo2 entry: Llama's q_proj and v_proj
PEFT_TARGETS = ("q_proj", "v_proj")


def _parse(r: ConfigReader, name: str, mt: str) -> ModelArch:
    h = r.int("hidden_size")
    heads, hd = r.heads(h, stated_head_dim=False)  # Olmo2Attention: head_dim is hidden / heads
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size")
    linears = attention_linears(h, heads * hd, kv * hd, r.bool("attention_bias", False)) + [
        LinearSpec(name="gate_proj", d_in=h, d_out=inter),
        LinearSpec(name="up_proj", d_in=h, d_out=inter),
        LinearSpec(name="down_proj", d_in=inter, d_out=h, tp_style="rowwise"),
    ]
    return ModelArch(
        name=name,
        family=mt,
        decoder_layer="Olmo2DecoderLayer",
        hidden=h,
        layers=r.int("num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", False),
        norm="rms_fp32",
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        qk_norm=True,
        qk_norm_full_width=True,
        linears=tuple(linears),
        default_lora_targets=PEFT_TARGETS,
        layer_norms=2,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """attention (q_norm, k_norm) -> post_attention_layernorm -> residual add -> MLP ->
    post_feedforward_layernorm -> residual add. With no pre-norm q, k, v and gate, up read the
    stream itself: the layer input (saved once, in the stream's dtype) and the residual sum."""
    saved = act.Saved()
    t, h = ctx.tokens, arch.hidden
    act.linear_input(ctx, ("q_proj", "k_proj", "v_proj"), h, "input", saved, fp32_source=True)
    act.full_width_qk_norms(ctx, arch, saved)
    act.o_proj(ctx, arch, "o_proj", act.attention_core(ctx, arch, False, saved), saved)
    attn_trains = ctx.base_trains or any(lin.name in ctx.targets for lin in arch.linears if lin.part == "attention")
    mid = ctx if ctx.grad_in else dataclasses.replace(ctx, grad_in=attn_trains)
    act.post_norm_saved(mid, arch, "post_attn_norm", saved)
    act.linear_input(ctx, ("gate_proj", "up_proj"), h, "post_attn_norm.residual", saved, fp32_source=True)
    act.gated_mlp(ctx, arch, saved)
    mlp_trains = ctx.base_trains or any(lin.name in ctx.targets for lin in arch.linears)
    late = ctx if ctx.grad_in else dataclasses.replace(ctx, grad_in=mlp_trains)
    act.post_norm_saved(late, arch, "mlp.post_norm", saved)
    return saved


FAMILY = Family(model_types=("olmo2",), parse=_parse, layer_saved=_layer_saved, prefill_mlp_per_token=gated_prefill_mlp)
