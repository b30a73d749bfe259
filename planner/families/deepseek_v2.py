"""DeepSeek-V2 (models/deepseek_v2/modeling_deepseek_v2.py, transformers 5): multi-head latent
attention (DeepseekV2Attention), the first `first_k_dense_replace` layers a dense gated MLP
(DeepseekV2MLP of intermediate_size), the others DeepseekV2Moe: fused 3-D routed experts
(DeepseekV2Experts, as Mixtral's), a shared gated MLP of moe_intermediate_size x n_shared_experts,
and a router of its own (DeepseekV2TopkRouter: fp32 logits, softmax, top-k). DeepSeek-V3
(deepseek_v3.py) parses through `parse_deepseek` too."""

from __future__ import annotations

from .. import activations as act
from ..architecture import ConfigReader, LinearSpec, MLADims, ModelArch
from .base import Family



# The config classes' defaults for keys a config.json may leave out (configuration_deepseek_v2.py,
# configuration_deepseek_v3.py): a key written as null reads as absent, except q_lora_rank, where
# null means a plain q_proj and absence the default rank
V2_DEFAULTS = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   first_k_dense_replace=0, n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1407,
                   num_experts_per_tok=None, n_group=None, topk_group=None, norm_topk_prob=False)
V3_DEFAULTS = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1, moe_intermediate_size=2048,
                   num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True)


def _int(r: ConfigReader, key: str, defaults: dict, minimum: int = 1) -> int:
    d = defaults[key]
    return r.int(key, minimum=minimum) if d is None else r.int(key, default=d, minimum=minimum)


def _mla(r: ConfigReader, defaults: dict) -> MLADims:
    explicit_none = "q_lora_rank" in r.cfg and r.cfg["q_lora_rank"] is None
    q_rank = None if explicit_none else _int(r, "q_lora_rank", defaults)
    return MLADims(q_lora_rank=q_rank, kv_lora_rank=_int(r, "kv_lora_rank", defaults),
                   qk_nope_head_dim=_int(r, "qk_nope_head_dim", defaults),
                   qk_rope_head_dim=_int(r, "qk_rope_head_dim", defaults), v_head_dim=_int(r, "v_head_dim", defaults))


def mla_linears(h: int, heads: int, m: MLADims, bias: bool) -> list[LinearSpec]:
    """DeepseekV2Attention.__init__: q_proj (or q_a_proj + q_b_proj), kv_a_proj_with_mqa, kv_b_proj,
    o_proj; `attention_bias` on q_a_proj, kv_a_proj_with_mqa and o_proj only."""
    q = heads * m.qk_head_dim
    if m.q_lora_rank is None:
        lin = [LinearSpec(name="q_proj", d_in=h, d_out=q, part="attention")]
    else:
        lin = [LinearSpec(name="q_a_proj", d_in=h, d_out=m.q_lora_rank, bias=bias, part="attention"),
               LinearSpec(name="q_b_proj", d_in=m.q_lora_rank, d_out=q, part="attention")]
    return lin + [
        LinearSpec(name="kv_a_proj_with_mqa", d_in=h, d_out=m.latent_width, bias=bias, part="attention"),
        LinearSpec(name="kv_b_proj", d_in=m.kv_lora_rank, d_out=heads * (m.qk_nope_head_dim + m.v_head_dim),
                   part="attention"),
        LinearSpec(name="o_proj", d_in=heads * m.v_head_dim, d_out=h, bias=bias, part="attention", tp_style="rowwise"),
    ]


def parse_deepseek(r: ConfigReader, name: str, mt: str, *, decoder_layer: str, experts_key: str,
                   router: str, mlp_bias: bool) -> ModelArch:
    """Both versions: `experts_key` the config key of the routed experts' count; `router` the
    ModelArch.deepseek_router kind; `mlp_bias`: the MLPs read config.mlp_bias (V2) or carry none (V3)."""
    h = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    r.kv_heads(heads)  # read (MLA expands keys and values to every head, num_key_value_groups is 1 in the shipped configs)
    defaults = V3_DEFAULTS if router == "sigmoid_grouped" else V2_DEFAULTS
    m = _mla(r, defaults)
    layers = r.int("num_hidden_layers")
    inter = r.int("intermediate_size")
    # DeepseekV2DecoderLayer: the routed MLP from layer first_k_dense_replace on, whatever the
    # experts' count (a first_k_dense_replace of num_hidden_layers or more: every layer dense)
    dense = min(_int(r, "first_k_dense_replace", defaults, minimum=0), layers)
    n_experts = _int(r, experts_key, defaults) if dense < layers else 0
    if r.has("moe_layer_freq") and r.int("moe_layer_freq") != 1:
        # transformers' DeepseekV2/V3DecoderLayer route every layer from first_k_dense_replace on
        # (layer_idx >= config.first_k_dense_replace) and ignore moe_layer_freq
        r.fail("moe_layer_freq must be 1 (transformers routes every layer from first_k_dense_replace on), "
               f"got {r.cfg['moe_layer_freq']}")
    bias = r.bool("mlp_bias", False) if mlp_bias else False
    dense_mlp = (LinearSpec(name="gate_proj", d_in=h, d_out=inter, bias=bias),
                 LinearSpec(name="up_proj", d_in=h, d_out=inter, bias=bias),
                 LinearSpec(name="down_proj", d_in=inter, d_out=h, bias=bias, tp_style="rowwise"))
    linears = mla_linears(h, heads, m, r.bool("attention_bias", False))
    per_tok = moe_inter = shared = 0
    router_spec = None
    groups = (1, 1)
    if dense < layers:
        per_tok = _int(r, "num_experts_per_tok", defaults)
        if per_tok > n_experts:
            r.fail(f"num_experts_per_tok must be at most {experts_key} ({n_experts}), got {per_tok}")
        moe_inter = _int(r, "moe_intermediate_size", defaults)
        shared = moe_inter * _int(r, "n_shared_experts", defaults, minimum=0)
        groups = (1, 1)
        if router == "sigmoid_grouped" or r.cfg.get("topk_method") == "group_limited_greedy":
            groups = (_int(r, "n_group", defaults), _int(r, "topk_group", defaults))
            if n_experts % groups[0]:
                r.fail(f"n_group must divide {experts_key} ({n_experts}), got {groups[0]}")
            if groups[1] > groups[0]:
                r.fail(f"topk_group must be at most n_group ({groups[0]}), got {groups[1]}")
        if router == "softmax" and r.cfg.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
            r.fail(f"topk_method must be greedy or group_limited_greedy, got {r.cfg['topk_method']!r}")
        linears += [
            LinearSpec(name="experts.gate_up_proj", d_in=h, d_out=2 * moe_inter, module="fused experts", copies=n_experts),
            LinearSpec(name="experts.down_proj", d_in=moe_inter, d_out=h, module="fused experts", copies=n_experts, tp_style="rowwise"),
        ]
        if shared:
            linears += [LinearSpec(name="shared_experts.gate_proj", d_in=h, d_out=shared, bias=bias),
                        LinearSpec(name="shared_experts.up_proj", d_in=h, d_out=shared, bias=bias),
                        LinearSpec(name="shared_experts.down_proj", d_in=shared, d_out=h, bias=bias, tp_style="rowwise")]
        router_spec = LinearSpec(name="gate", d_in=h, d_out=n_experts, module="router")
    else:
        linears += dense_mlp
    # peft 0.21 utils/constants.py has no deepseek entry (peft asks for target_modules): memplan's
    # default is every projection of the latent attention (q_proj or q_a_proj and q_b_proj,
    # kv_a_proj_with_mqa, kv_b_proj, o_proj), as q_proj/v_proj are the attention's elsewhere
    attn = tuple(lin.name for lin in linears if lin.part == "attention")
    routed = dense < layers
    return ModelArch(
        name=name,
        family=mt,
        decoder_layer=decoder_layer,
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        # the width scores are taken over (qk_nope_head_dim + qk_rope_head_dim); rotary on its last
        # qk_rope_head_dim channels (the config's own head_dim is qk_rope_head_dim: the rotary tables')
        head_dim=m.qk_head_dim,
        rotary_fraction=m.qk_rope_head_dim / m.qk_head_dim,
        intermediate=moe_inter if routed else inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", False),
        norm="rms",
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        experts=n_experts if routed else 0,
        experts_per_token=per_tok,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        linears=tuple(linears),
        router=router_spec,
        default_lora_targets=attn,
        mla=m,
        # transformers caches the latent (the normed kv_nope as keys, the rotated k_pe as values:
        # DeepseekV2Attention.forward, `past_key_values.update(k_nope, k_pe, ...)` before expand_kv),
        # one head each: kv_lora_rank + qk_rope_head_dim per position, as MLA-aware engines do
        kv_cache_width=m.latent_width,
        kv_cache_key_width=m.kv_lora_rank,
        latent_cache_width=m.latent_width,
        dense_layers=dense if routed else 0,
        dense_intermediate=inter if routed else 0,
        dense_linears=dense_mlp if routed and dense else (),
        shared_intermediate=shared,
        deepseek_router=router if routed else None,
        router_groups=groups if routed else (1, 1),
        # DeepseekV3TopkRouter normalises the top-k weights with norm_topk_prob; V2's router never does
        router_norm_topk=routed and router == "sigmoid_grouped" and r.bool("norm_topk_prob", defaults["norm_topk_prob"]),
        unbuilt_mtp_layers=r.int("num_nextn_predict_layers", default=0, minimum=0),
    )


def layer_saved(arch: ModelArch, ctx: act.Ctx) -> act.Saved:
    """DeepseekV2DecoderLayer: input RMSNorm, latent attention, post-attention RMSNorm, the dense
    MLP or the routed experts beside the shared MLP."""
    saved = act.Saved()
    m = arch.mla
    consumers = ("q_proj", "kv_a_proj_with_mqa") if m.q_lora_rank is None else ("q_a_proj", "kv_a_proj_with_mqa")
    act.rms_norm(ctx, arch, "input_norm", consumers, saved)
    act.mla_attention(ctx, arch, saved)
    routed = bool(arch.experts)
    act.rms_norm(ctx, arch, "post_attn_norm", ("shared_experts.gate_proj", "shared_experts.up_proj") if routed
                 else ("gate_proj", "up_proj"), saved)
    if routed:
        act.deepseek_moe(ctx, arch, saved)
    else:
        act.gated_mlp(ctx, arch, saved)
    return saved


def prefill_mlp(arch: ModelArch, ab: int) -> int:
    """The widest no-grad MLP moment per token (activations.deepseek_prefill_mlp)."""
    return act.deepseek_prefill_mlp(arch, ab)


FAMILY = Family(model_types=("deepseek_v2",),
                parse=lambda r, name, mt: parse_deepseek(r, name, mt, decoder_layer="DeepseekV2DecoderLayer",
                                                         experts_key="n_routed_experts", router="softmax", mlp_bias=True),
                layer_saved=layer_saved, prefill_mlp_per_token=prefill_mlp)
