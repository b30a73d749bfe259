"""Falcon (models/falcon/modeling_falcon.py): one LayerNorm before a parallel attention and MLP,
fused query_key_value, multi-query attention, every projection a FalconLinear (an nn.Linear
subclass). FalconAttention hands SDPA keys broadcast over heads and an explicit mask."""

from .. import activations as act
from ..architecture import LinearSpec, ModelArch
from .base import Family

PEFT_TARGETS = ("query_key_value",)  # peft 0.21 utils/constants.py


def _parse(r, name, mt) -> ModelArch:
    if r.bool("new_decoder_architecture", False):
        r.fail("Falcon's new_decoder_architecture (40B/180B) is not supported yet; "
               "supported Falcon configs use multi_query or multi-head attention")
    h = r.int("hidden_size")
    heads, hd = r.heads(h, ("num_attention_heads", "n_head"), stated_head_dim=False)  # FalconAttention: head_dim is always hidden / heads
    kv = 1 if r.bool("multi_query", True) else heads
    bias = r.bool("bias", False)
    ffn = r.int("ffn_hidden_size", default=4 * h)
    sub = "Linear subclass"  # FalconLinear
    linears = (
        LinearSpec(name="query_key_value", d_in=h, d_out=(heads + 2 * kv) * hd, bias=bias, module=sub, part="attention"),
        LinearSpec(name="dense", d_in=h, d_out=h, bias=bias, module=sub, part="attention"),
        LinearSpec(name="dense_h_to_4h", d_in=h, d_out=ffn, bias=bias, module=sub),
        LinearSpec(name="dense_4h_to_h", d_in=ffn, d_out=h, bias=bias, module=sub),
    )
    return ModelArch(
        name=name,
        family=mt,
        embedding_module="word_embeddings",
        decoder_layer="FalconDecoderLayer",
        hidden=h,
        layers=r.int("num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=ffn,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", True),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=r.bool("parallel_attn", True),
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        resid_dropout=r.fraction("hidden_dropout", 0.0, zero=True),
        activation="gelu",
        sdpa_broadcast_kv=True,
        sdpa_always_math=True,
        linears=linears,
        default_lora_targets=PEFT_TARGETS,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    saved: act.Saved = {}
    act.layer_norm(ctx, arch, "input_norm", ("query_key_value", "dense_h_to_4h"), saved)
    act.o_proj(ctx, arch, "dense", act.attention_core(ctx, arch, False, saved), saved)
    act.plain_mlp(ctx, arch, "dense_h_to_4h", "dense_4h_to_h", saved)
    act.dropout_masks(ctx, arch, arch.resid_dropout, 2, saved)
    return saved


FAMILY = Family(model_types=("falcon",), parse=_parse, layer_saved=_layer_saved,
                prefill_mlp_per_token=lambda arch, ab: 2 * arch.intermediate * ab)
