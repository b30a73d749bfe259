"""GPT-NeoX (models/gpt_neox/modeling_gpt_neox.py): Pythia, StableLM-alpha. Two LayerNorms per layer
(input_layernorm, post_attention_layernorm) in a parallel residual (`use_parallel_residual`:
x + attn(ln1(x)) + mlp(ln2(x))) or a sequential one; a fused `query_key_value` (nn.Linear, biased);
partial rotary (`rotary_pct`, 0.25 by default: GPTNeoXConfig.convert_rope_params_to_dict); a plain
GELU MLP; an untied head (the hub's `embed_out`, `lm_head` in transformers 5) and the embedding
`embed_in`."""

from dataclasses import replace

from .. import activations as act
from ..architecture import LinearSpec, ModelArch
from .base import Family

PEFT_TARGETS = ("query_key_value",)  # peft 0.21 utils/constants.py


def _rotary_fraction(r) -> float:
    """GPTNeoXConfig.convert_rope_params_to_dict: `rope_parameters["partial_rotary_factor"]`, else the
    legacy `rotary_pct`, else 0.25."""
    rope = r.nested("rope_parameters") or r.nested("rope_scaling")
    if rope is not None and rope.has("partial_rotary_factor"):
        return rope.fraction("partial_rotary_factor", 0.25, zero=False)
    return r.fraction("rotary_pct", 0.25, zero=False)


def _parse(r, name, mt) -> ModelArch:
    h = r.int("hidden_size")
    # GPTNeoXAttention: head_size is always hidden / heads (GPTNeoXConfig.validate_architecture)
    heads, hd = r.heads(h, stated_head_dim=False)
    inter = r.int("intermediate_size")
    bias = r.bool("attention_bias", True)
    linears = (
        LinearSpec(name="query_key_value", d_in=h, d_out=3 * h, bias=bias, part="attention"),
        LinearSpec(name="dense", d_in=h, d_out=h, bias=bias, part="attention", tp_style="rowwise"),
        LinearSpec(name="dense_h_to_4h", d_in=h, d_out=inter, bias=True),  # GPTNeoXMLP: nn.Linear, biased
        LinearSpec(name="dense_4h_to_h", d_in=inter, d_out=h, bias=True, tp_style="rowwise"),
    )
    return ModelArch(
        name=name,
        family=mt,
        embedding_module="embed_in",
        decoder_layer="GPTNeoXLayer",
        hidden=h,
        layers=r.int("num_hidden_layers"),
        heads=heads,
        kv_heads=heads,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", False),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=r.bool("use_parallel_residual", True),
        layer_norms=2,
        rotary_fraction=_rotary_fraction(r),
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        resid_dropout=r.fraction("hidden_dropout", 0.0, zero=True),
        embd_dropout=r.fraction("hidden_dropout", 0.0, zero=True),  # GPTNeoXModel.emb_dropout
        activation=r.choice("hidden_act", ("gelu",), "gelu"),  # GPTNeoXMLP: ACT2FN[hidden_act]
        linears=linears,
        default_lora_targets=PEFT_TARGETS,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """GPTNeoXLayer.forward: input_layernorm -> attention (fused qkv, partial rotary rebuilt by
    torch.cat as Phi's) -> dense; post_attention_layernorm over the layer input (parallel) or over
    attention output + input (sequential) -> dense_h_to_4h -> gelu -> dense_4h_to_h."""
    saved = act.Saved()
    act.layer_norm(ctx, arch, "input_norm", ("query_key_value",), saved)
    act.o_proj(ctx, arch, "dense", act.attention_core(ctx, arch, True, saved), saved)
    act.fused_qkv_value_view(ctx, arch, saved)
    if arch.parallel_attn:
        act.second_layer_norm_same_input(ctx, arch, "post_attn_norm", ("dense_h_to_4h",), saved)
    else:
        # attention output + input: a gradient flows through it once the attention trains, even
        # where none flows into the layer (layer 0 of LoRA)
        attn_trains = ctx.base_trains or any(lin.part == "attention" and lin.name in ctx.targets for lin in arch.linears)
        act.layer_norm(replace(ctx, grad_in=ctx.grad_in or attn_trains), arch, "post_attn_norm", ("dense_h_to_4h",), saved)
    act.plain_mlp(ctx, arch, "dense_h_to_4h", "dense_4h_to_h", saved)
    act.dropout_masks(ctx, arch, arch.resid_dropout, 2, saved)
    return saved


FAMILY = Family(model_types=("gpt_neox",), parse=_parse, layer_saved=_layer_saved,
                prefill_mlp_per_token=lambda arch, ab: 2 * arch.intermediate * ab)
