"""GPT-BigCode / StarCoder (models/gpt_bigcode/modeling_gpt_bigcode.py): learned positions, two
LayerNorms, fused c_attn with multi-query keys, a bool causal-mask buffer."""

from .. import activations as act
from ..architecture import LinearSpec, ModelArch
from .base import Family

PEFT_TARGETS = ("c_attn",)  # peft 0.21 utils/constants.py


def _parse(r, name, mt) -> ModelArch:
    h = r.int("n_embd", "hidden_size")
    heads, hd = r.heads(h, ("n_head", "num_attention_heads"), stated_head_dim=False)  # GPTBigCodeAttention: head_dim is always hidden / heads
    kv = 1 if r.bool("multi_query", True) else heads
    inter = r.int("n_inner", default=4 * h)
    linears = (
        LinearSpec(name="c_attn", d_in=h, d_out=h + 2 * kv * hd, bias=True, part="attention"),
        LinearSpec(name="attn.c_proj", d_in=h, d_out=h, bias=True, part="attention", tp_style="rowwise"),
        LinearSpec(name="c_fc", d_in=h, d_out=inter, bias=True),
        LinearSpec(name="mlp.c_proj", d_in=inter, d_out=h, bias=True, tp_style="rowwise"),
    )
    return ModelArch(
        name=name,
        family=mt,
        embedding_module="wte",
        decoder_layer="GPTBigCodeBlock",
        hidden=h,
        layers=r.int("n_layer", "num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("n_positions", "max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", True),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=False,
        learned_positions=True,
        attn_dropout=r.fraction("attn_pdrop", 0.0, zero=True),
        resid_dropout=r.fraction("resid_pdrop", 0.0, zero=True),
        embd_dropout=r.fraction("embd_pdrop", 0.0, zero=True),
        activation="gelu_pytorch_tanh",
        sdpa_broadcast_kv=True,
        linears=linears,
        default_lora_targets=PEFT_TARGETS,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """GPTBigCodeBlock.forward: ln_1, attention over the fused c_attn's q/k/v views, c_proj, the
    residual sum, ln_2, c_fc, the activation, mlp.c_proj, the residual sum (on the layer's tape)."""
    saved = act.Saved()
    stream = ctx.tokens * arch.hidden * ctx.stream_bytes
    act.layer_norm(ctx, arch, "ln_1", ("c_attn",), saved, source="input")
    saved.linear("c_attn")
    consumed = act.attention_core(ctx, arch, False, saved, projections=("c_attn",) * 3)
    if ctx.batch == 1 and ctx.attention is not act.Kernel.eager and ctx.attention is not act.Kernel.fused:
        # GPTBigCodeAttention hands SDPA an expanded key: scaling it materialises every head, and
        # with a batch of one the query is kept twice, as its contiguous copy and scaled (seen in
        # the CPU trace)
        t, q, md = ctx.tokens, arch.q_width, act.materialised_bytes(ctx)
        saved["attn.k_expanded"] = t * q * md
        saved["attn.q_contiguous"] = t * q * md
    saved.drop("c_attn.out")
    act.o_proj(ctx, arch, "attn.c_proj", consumed, saved)
    saved.linear("attn.c_proj")
    saved.drop(consumed, "ln_1.out")
    saved.temp("residual", stream)
    saved.drop("attn.c_proj.out")
    act.layer_norm(ctx, arch, "post_attn_norm", ("c_fc",), saved, source="residual")
    act.plain_mlp(ctx, arch, "c_fc", "mlp.c_proj", saved, linears=True)
    act.dropout_masks(ctx, arch, arch.resid_dropout, 2, saved)
    saved.drop("post_attn_norm.out")
    saved.temp("layer.out", stream)
    saved.drop("mlp.c_proj.out", "residual")
    saved.output("layer.out")
    return saved


FAMILY = Family(model_types=("gpt_bigcode",), parse=_parse, layer_saved=_layer_saved,
                prefill_mlp_per_token=lambda arch, ab: 2 * arch.intermediate * ab)
