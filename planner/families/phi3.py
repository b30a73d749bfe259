"""Phi-3 and Phi-4 (models/phi3/modeling_phi3.py; phi-4 ships as model_type phi3): Llama's RMSNorm
layer with a fused `qkv_proj` (Phi3Attention) and a fused `gate_up_proj` (Phi3MLP: `gate, up =
gate_up_proj(x).chunk(2)`, `up * silu(gate)`), RoPE over `partial_rotary_factor` of each head
(apply_rotary_pos_emb always rebuilds q and k with torch.cat), residual dropout on both branches
(`resid_pdrop`), untied head.

Views keep whole storages: q, k and v are slices of the one qkv output, and v reaches the kernel
as a view, so whatever keeps v keeps all of qkv; the MLP's gate and up are views of the one
gate_up output, kept by silu and by the product.

`rope_scaling` longrope (Phi-3 128k) adds no buffer: Phi3RotaryEmbedding registers inv_freq and
original_inv_freq, and modeling_rope_utils.py `dynamic_rope_update` keeps `long_inv_freq` as a
plain attribute (a head_dim/2 fp32 vector made on the first forward)."""

from __future__ import annotations

from .. import activations as act
from ..architecture import ConfigReader, LinearSpec, ModelArch
from .base import Family

# peft 0.21 utils/constants.py has no phi3 entry (get_peft_model then asks for target_modules):
# the fused attention projection stands in for Llama's q_proj and v_proj
PEFT_TARGETS = ("qkv_proj",)


def _parse(r: ConfigReader, name: str, mt: str) -> ModelArch:
    h = r.int("hidden_size")
    heads, hd = r.heads(h)
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size")
    q, k = heads * hd, kv * hd
    linears = (
        LinearSpec(name="qkv_proj", d_in=h, d_out=q + 2 * k, part="attention"),
        LinearSpec(name="o_proj", d_in=q, d_out=h, part="attention", tp_style="rowwise"),
        LinearSpec(name="gate_up_proj", d_in=h, d_out=2 * inter),
        LinearSpec(name="down_proj", d_in=inter, d_out=h, tp_style="rowwise"),
    )
    scaling = r.cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        r.fail(f"rope_scaling must be an object or null, got {scaling!r}")
    return ModelArch(
        name=name,
        family=mt,
        decoder_layer="Phi3DecoderLayer",
        hidden=h,
        layers=r.int("num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=4096),
        tied_embeddings=r.bool("tie_word_embeddings", False),
        norm="rms",
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        resid_dropout=r.fraction("resid_pdrop", 0.0, zero=True),
        embd_dropout=r.fraction("embd_pdrop", 0.0, zero=True),
        sliding_window=r.int("sliding_window", default=None),
        rotary_fraction=r.fraction("partial_rotary_factor", 1.0, zero=False),
        activation=str(r.cfg.get("hidden_act") or "silu"),
        linears=linears,
        default_lora_targets=PEFT_TARGETS,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    saved = act.Saved()
    act.rms_norm(ctx, arch, "input_norm", ("qkv_proj",), saved)
    # q and k are rebuilt by torch.cat (apply_rotary_pos_emb), so on the CPU the SDPA output is
    # not in (b, s, h, d) layout and o_proj reads a contiguous copy, as Phi-2's
    consumed = act.attention_core(ctx, arch, True, saved)
    act.fused_qkv_view(ctx, arch, saved)
    act.o_proj(ctx, arch, "o_proj", consumed, saved)
    act.rms_norm(ctx, arch, "post_attn_norm", ("gate_up_proj",), saved)
    act.fused_gated_mlp(ctx, arch, saved)
    act.dropout_masks(ctx, arch, arch.resid_dropout, 2, saved)
    return saved


FAMILY = Family(model_types=("phi3",), parse=_parse, layer_saved=_layer_saved,
                # the fused gate-up output stays alive (up is a view of it) beside silu(gate) and the product
                prefill_mlp_per_token=lambda arch, ab: 4 * arch.intermediate * ab)
