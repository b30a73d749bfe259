"""Falcon (models/falcon/modeling_falcon.py): a parallel attention and MLP, fused query_key_value,
every projection a FalconLinear (an nn.Linear subclass). The original architecture (falcon-7b): one
LayerNorm, multi-query attention, keys broadcast over heads and an explicit mask handed to SDPA
(its math kernel). The new decoder architecture (falcon-40b, falcon-180B): num_kv_heads grouped in
query_key_value but copied to every head before the attention and the cache, ln_attn and ln_mlp."""

from .. import activations as act
from ..architecture import LinearSpec, ModelArch
from .base import Family

PEFT_TARGETS = ("query_key_value",)  # peft 0.21 utils/constants.py


def _parse(r, name, mt) -> ModelArch:
    new_arch = r.bool("new_decoder_architecture", False)
    h = r.int("hidden_size")
    heads, hd = r.heads(h, ("num_attention_heads", "n_head"), stated_head_dim=False)  # FalconAttention: head_dim is always hidden / heads
    parallel = r.bool("parallel_attn", True)
    layer_norms = None
    if new_arch:
        # FalconAttention.__init__: query_key_value is (2 x num_kv_heads + heads) x head_dim wide,
        # num_kv_heads defaulting to the heads (FalconConfig.__post_init__); multi_query is ignored
        kv = r.int("num_kv_heads", default=heads)
        if heads % kv:
            r.fail(f"num_kv_heads must divide num_attention_heads ({heads}), got {kv}")
        if not parallel:
            # FalconDecoderLayer builds input/post_attention_layernorm then, but its forward calls ln_attn
            r.fail("parallel_attn must be true with new_decoder_architecture (transformers' FalconDecoderLayer "
                   "has no sequential form of the new architecture)")
        n_ln = r.int("num_ln_in_parallel_attn", default=2)  # FalconDecoderLayer.__init__: 2 when unset
        if n_ln not in (1, 2):
            r.fail(f"num_ln_in_parallel_attn must be 1 or 2, got {n_ln}")
        layer_norms = n_ln
    else:
        kv = 1 if r.bool("multi_query", True) else heads
    qkv_width = (heads + 2 * kv) * hd
    bias = r.bool("bias", False)
    ffn = r.int("ffn_hidden_size", default=4 * h)
    sub = "Linear subclass"  # FalconLinear
    linears = (
        LinearSpec(name="query_key_value", d_in=h, d_out=qkv_width, bias=bias, module=sub, part="attention"),
        LinearSpec(name="dense", d_in=h, d_out=h, bias=bias, module=sub, part="attention", tp_style="rowwise"),
        LinearSpec(name="dense_h_to_4h", d_in=h, d_out=ffn, bias=bias, module=sub),
        LinearSpec(name="dense_4h_to_h", d_in=ffn, d_out=h, bias=bias, module=sub, tp_style="rowwise"),
    )
    if new_arch:
        # _split_heads broadcasts each group's key and value to its query heads and flattens them
        # (copies), and forward reshapes them with num_heads: attention and the cache see every head
        kv = heads
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
        parallel_attn=parallel,
        layer_norms=layer_norms,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        resid_dropout=r.fraction("hidden_dropout", 0.0, zero=True),
        activation="gelu",
        sdpa_broadcast_kv=not new_arch,
        sdpa_always_math=not new_arch,
        # the new architecture's keys are copied to every head, so SDPA may take a fused kernel,
        # still with the explicit mask FalconModel always builds
        sdpa_explicit_mask=new_arch,
        eager_softmax_compute_dtype=new_arch,
        mlp_norm_before_attention=layer_norms == 2,
        linears=linears,
        default_lora_targets=PEFT_TARGETS,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """FalconDecoderLayer.forward. With one LayerNorm (Falcon-7B) the layer's ops go on its tape:
    the norm, query_key_value, the attention over its views, dense, the MLP over the same norm
    output (held to the layer's end), `mlp_output += attention_output` in place, then the residual
    sum; the new architecture's two norms keep the saved list."""
    saved = act.Saved()
    two_norms = arch.norms_per_layer == 2
    if two_norms:
        # the new architecture's ln_attn and ln_mlp, both over the layer input (FalconDecoderLayer.forward)
        act.layer_norm(ctx, arch, "ln_attn", ("query_key_value",), saved)
        act.second_layer_norm_same_input(ctx, arch, "ln_mlp", ("dense_h_to_4h",), saved)
    else:
        act.layer_norm(ctx, arch, "input_norm", ("query_key_value", "dense_h_to_4h"), saved, source="input")
        saved.linear("query_key_value")
        if arch.kv_heads < arch.heads:
            # multi-query `_split_heads`: `fused_qkv[..., [-2], :]` and `[..., [-1], :]` index with a
            # list, copying the key and the value out of the fused output (held through the attention)
            for part in ("key", "value"):
                saved.temp(f"query_key_value.{part}", ctx.tokens * arch.kv_width * ctx.act_bytes)
    consumed = act.attention_core(ctx, arch, False, saved, projections=() if two_norms else ("query_key_value",) * 3)
    act.o_proj(ctx, arch, "dense", consumed, saved)
    act.explicit_mask_saved(ctx, arch, saved)
    if not two_norms:
        saved.drop("query_key_value.out", "query_key_value.key", "query_key_value.value")
        saved.linear("dense")
        saved.drop(consumed)
    act.plain_mlp(ctx, arch, "dense_h_to_4h", "dense_4h_to_h", saved, linears=not two_norms)
    act.dropout_masks(ctx, arch, arch.resid_dropout, 2, saved)
    if not two_norms:
        saved.temp("layer.out", ctx.tokens * arch.hidden * ctx.stream_bytes)
        saved.drop("dense_4h_to_h.out", "dense.out", "input_norm.out")
        saved.output("layer.out")
    return saved


FAMILY = Family(model_types=("falcon",), parse=_parse, layer_saved=_layer_saved,
                prefill_mlp_per_token=lambda arch, ab: 2 * arch.intermediate * ab)
