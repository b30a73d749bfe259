"""Phi (models/phi/modeling_phi.py): parallel attention and MLP after one LayerNorm, partial
rotary, a biased lm_head, gelu_new (NewGELUActivation, in Python)."""

from .. import activations as act
from ..architecture import LinearSpec, ModelArch, attention_linears
from .base import Family

PEFT_TARGETS = ("q_proj", "v_proj", "fc1", "fc2")  # peft 0.21 utils/constants.py


def _parse(r, name, mt) -> ModelArch:
    h = r.int("hidden_size")
    heads, hd = r.heads(h, stated_head_dim=False)  # PhiAttention: head_dim is always hidden / heads
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size")
    linears = attention_linears(h, heads * hd, kv * hd, True)
    linears[3] = LinearSpec(name="dense", d_in=heads * hd, d_out=h, bias=True, part="attention", tp_style="rowwise")
    linears += [
        LinearSpec(name="fc1", d_in=h, d_out=inter, bias=True),
        LinearSpec(name="fc2", d_in=inter, d_out=h, bias=True, tp_style="rowwise"),
    ]
    return ModelArch(
        name=name,
        family=mt,
        decoder_layer="PhiDecoderLayer",
        hidden=h,
        layers=r.int("num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", False),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=True,
        lm_head_bias=True,
        rotary_fraction=r.fraction("partial_rotary_factor", 0.5, zero=False),
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        resid_dropout=r.fraction("resid_pdrop", 0.0, zero=True),
        embd_dropout=r.fraction("embd_pdrop", 0.0, zero=True),
        activation="gelu_new",
        linears=tuple(linears),
        default_lora_targets=PEFT_TARGETS,
    )


def _layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    saved = act.Saved()
    act.layer_norm(ctx, arch, "input_norm", ("q_proj", "k_proj", "v_proj", "fc1"), saved)
    # partial rotary: q and k are rebuilt by torch.cat, so the sdpa output is not in (b, s, h, d)
    # layout on the CPU and dense consumes a contiguous copy
    act.o_proj(ctx, arch, "dense", act.attention_core(ctx, arch, True, saved), saved)
    act.plain_mlp(ctx, arch, "fc1", "fc2", saved)
    act.dropout_masks(ctx, arch, arch.resid_dropout, 2, saved)
    return saved


FAMILY = Family(model_types=("phi",), parse=_parse, layer_saved=_layer_saved,
                # gelu_new's widest moment: its input, 0.5x, x^3 and its scaled copy
                prefill_mlp_per_token=lambda arch, ab: 4 * arch.intermediate * ab)
