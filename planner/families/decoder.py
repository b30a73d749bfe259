"""The decoder layer most families share, built like transformers' LlamaDecoderLayer: RMSNorm,
q/k/v/o projections, a gated (or routed) MLP. Llama, Mistral, Gemma, Qwen2/3 and Mixtral parse and
save through these, each family module naming its own differences."""

from __future__ import annotations

from .. import activations as act
from ..architecture import ConfigReader, LinearSpec, ModelArch, attention_linears


def llama_like(r: ConfigReader, name: str, family: str, *, decoder_layer: str, default_targets: tuple[str, ...],
               qkv_bias: bool | None = None, tied_default: bool = False, norm: str = "rms",
               sliding_window: int | None = None, qk_norm: bool = False, experts: tuple[int, int] | None = None,
               expert_intermediate: int | None = None, shared_expert: int = 0,
               layer_windows: tuple[int | None, ...] = (), **traits) -> ModelArch:
    """`qkv_bias`: q, k and v carry a bias and o does not (Qwen2Attention); None reads attention_bias.
    `experts`: (num_local_experts, num_experts_per_tok) of a routed MLP of fused experts, each
    `expert_intermediate` wide (None: intermediate_size, as Mixtral); `shared_expert`: the width of
    Qwen2-MoE's shared expert (a gated MLP beside the routed ones, scaled by a sigmoid gate), 0 for
    none. `traits`: further ModelArch fields the family sets."""
    h = r.int("hidden_size")
    heads, hd = r.heads(h)
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size") if expert_intermediate is None else expert_intermediate
    mlp_bias = r.bool("mlp_bias", False)
    if qkv_bias is None:
        linears = attention_linears(h, heads * hd, kv * hd, r.bool("attention_bias", False))
    else:
        linears = attention_linears(h, heads * hd, kv * hd, qkv_bias, o_bias=False)
    router = None
    n_experts = per_tok = 0
    if experts:
        n_experts, per_tok = experts
        linears += [
            LinearSpec(name="experts.gate_up_proj", d_in=h, d_out=2 * inter, module="fused experts", copies=n_experts),
            LinearSpec(name="experts.down_proj", d_in=inter, d_out=h, module="fused experts", copies=n_experts, tp_style="rowwise"),
        ]
        router = LinearSpec(name="gate", d_in=h, d_out=n_experts, module="router")
        if shared_expert:  # Qwen2MoeSparseMoeBlock: shared_expert (Qwen2MoeMLP) and shared_expert_gate
            linears += [
                LinearSpec(name="shared_expert.gate_proj", d_in=h, d_out=shared_expert),
                LinearSpec(name="shared_expert.up_proj", d_in=h, d_out=shared_expert),
                LinearSpec(name="shared_expert.down_proj", d_in=shared_expert, d_out=h, tp_style="rowwise"),
                LinearSpec(name="shared_expert_gate", d_in=h, d_out=1, tp_style="replicated"),
            ]
    else:
        linears += [
            LinearSpec(name="gate_proj", d_in=h, d_out=inter, bias=mlp_bias),
            LinearSpec(name="up_proj", d_in=h, d_out=inter, bias=mlp_bias),
            LinearSpec(name="down_proj", d_in=inter, d_out=h, bias=mlp_bias, tp_style="rowwise"),
        ]
    return ModelArch(
        name=name,
        family=family,
        decoder_layer=decoder_layer,
        hidden=h,
        layers=r.int("num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", tied_default),
        norm=norm,
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        experts=n_experts,
        experts_per_token=per_tok,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        sliding_window=sliding_window,
        qk_norm=qk_norm,
        linears=tuple(linears),
        router=router,
        default_lora_targets=default_targets,
        **({"layer_windows": layer_windows} if layer_windows else {}),
        **({"shared_expert_intermediate": shared_expert} if shared_expert else {}),
        **traits,
    )


def llama_layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """LlamaDecoderLayer: input RMSNorm, attention (q/k norms for Qwen3), post-attention RMSNorm,
    gated MLP or routed experts."""
    saved = act.Saved()
    qkv = ("q_proj", "k_proj", "v_proj")
    stream = ctx.tokens * arch.hidden * ctx.stream_bytes
    act.rms_norm(ctx, arch, "input_norm", qkv, saved, source="input")
    for name in qkv:
        saved.linear(name)
    if arch.qk_norm:
        act.head_norms(ctx, arch, saved)
    consumed = act.attention_core(ctx, arch, False, saved, projections=() if arch.qk_norm else qkv)
    saved.drop(*(f"{n}.out" for n in qkv))
    act.o_proj(ctx, arch, "o_proj", consumed, saved)
    saved.linear("o_proj")
    # the attention block returns (its input, the norm's output, released), then the residual sum
    saved.drop(consumed, "input_norm.out")
    saved.temp("residual", stream)
    saved.drop("o_proj.out")
    routed = bool(arch.experts)
    act.rms_norm(ctx, arch, "post_attn_norm", () if routed else ("gate_proj", "up_proj"), saved, source="residual")
    if routed:
        act.moe_mlp(ctx, arch, saved)
    else:
        act.gated_mlp(ctx, arch, saved, linears=True)
    saved.drop("post_attn_norm.out")
    saved.temp("layer.out", stream)
    saved.drop("down_proj.out", "residual")
    saved.output("layer.out")
    return saved


def gated_prefill_mlp(arch: ModelArch, ab: int) -> int:
    """act(gate) x up: act, up and their product alive together."""
    return 3 * arch.intermediate * ab


def routed_prefill_mlp(arch: ModelArch, ab: int) -> int:
    """k routed copies per token: the routed inputs, fused gate-up, act and product."""
    return arch.experts_per_token * (4 * arch.intermediate + arch.hidden) * ab
