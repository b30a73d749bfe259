"""Bloom (models/bloom/modeling_bloom.py): ALiBi instead of rotary positions, a LayerNorm over the
token embeddings (word_embeddings_layernorm), two LayerNorms per block, a fused, head-interleaved
`query_key_value` (nn.Linear, biased), a plain MLP of 4h with bloom_gelu (GeLUFunction, an
autograd Function that saves only its input), tied embeddings. BloomAttention has no SDPA path:
`alibi.baddbmm(q, k^T)` then an fp32 softmax, whatever attn_implementation says."""

from .. import activations as act
from ..architecture import LinearSpec, ModelArch
from .base import Family

PEFT_TARGETS = ("query_key_value",)  # peft 0.21 utils/constants.py


def _parse(r, name, mt) -> ModelArch:
    h = r.int("n_embed", "hidden_size")  # BloomConfig.__post_init__: n_embed, when given, is hidden_size
    # BloomAttention: head_dim is hidden / n_head, which must divide
    heads, hd = r.heads(h, ("n_head", "num_attention_heads"), stated_head_dim=False)
    if r.int("pretraining_tp", default=1) > 1 and r.bool("slow_but_exact", False):
        r.fail("slow_but_exact with pretraining_tp > 1 (sliced dense projections) is not supported; "
               "set slow_but_exact to false")
    if r.bool("apply_residual_connection_post_layernorm", False):
        r.fail("apply_residual_connection_post_layernorm must be false (the residual taken after the norm is not modelled)")
    linears = (
        LinearSpec(name="query_key_value", d_in=h, d_out=3 * h, bias=True, part="attention"),
        LinearSpec(name="dense", d_in=h, d_out=h, bias=True, part="attention", tp_style="rowwise"),
        LinearSpec(name="dense_h_to_4h", d_in=h, d_out=4 * h, bias=True),  # BloomMLP: always 4h
        LinearSpec(name="dense_4h_to_h", d_in=4 * h, d_out=h, bias=True, tp_style="rowwise"),
    )
    return ModelArch(
        name=name,
        family=mt,
        embedding_module="word_embeddings",
        decoder_layer="BloomBlock",
        hidden=h,
        layers=r.int("n_layer", "num_hidden_layers"),
        heads=heads,
        kv_heads=heads,
        head_dim=hd,
        intermediate=4 * h,
        vocab=r.int("vocab_size"),
        # ALiBi has no position table and BloomConfig no length: 2048, the length Bloom was trained at
        max_positions=r.int("seq_length", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", True),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=False,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        resid_dropout=r.fraction("hidden_dropout", 0.0, zero=True),
        activation="bloom_gelu",
        linears=linears,
        default_lora_targets=PEFT_TARGETS,
        embedding_norm=True,
        own_attention=True,
        alibi=True,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """BloomBlock.forward: input_layernorm -> attention (baddbmm scores, fp32 softmax) -> dense +
    residual -> post_attention_layernorm -> dense_h_to_4h -> bloom_gelu -> dense_4h_to_h + residual."""
    saved = act.Saved()
    act.layer_norm(ctx, arch, "input_norm", ("query_key_value",), saved)
    act.o_proj(ctx, arch, "dense", act.attention_core(ctx, arch, False, saved), saved)
    if ctx.attention is act.Kernel.eager and ctx.act_bytes == 4:
        # in fp32, softmax(dtype=float32).to(query_layer.dtype) is a no-op: the probabilities the bmm
        # saves are the softmax output itself
        saved.pop("attn.probs", None)
    act.layer_norm(ctx, arch, "post_attn_norm", ("dense_h_to_4h",), saved)
    act.plain_mlp(ctx, arch, "dense_h_to_4h", "dense_4h_to_h", saved)
    act.dropout_masks(ctx, arch, arch.resid_dropout, 2, saved)
    return saved


FAMILY = Family(model_types=("bloom",), parse=_parse, layer_saved=_layer_saved,
                # bloom_gelu_forward, `x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))`,
                # evaluated left to right: x, x * 0.5, 0.79788456 * x, 0.044715 * x and its product
                # with x are alive at once
                prefill_mlp_per_token=lambda arch, ab: 5 * arch.intermediate * ab)
