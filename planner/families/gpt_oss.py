"""gpt-oss (models/gpt_oss/modeling_gpt_oss.py, transformers 5): attention with learned per-head
sinks (GptOssAttention.sinks) and biases, alternating sliding-window and full layers from
`layer_types` (sliding_window on the sliding ones), YaRN rotary, and a routed MLP (GptOssMLP): a
biased router taking the top-k logits, then a softmax over those k (GptOssTopKRouter), and fused
experts with biases (GptOssExperts: `gate_up_proj` (E, h, 2i) with gate and up interleaved,
`down_proj` (E, i, h), run by integrations/moe.py's grouped_mm path, transposed) behind a clamped
SwiGLU. No SDPA path (`_supports_sdpa = False`): the eager attention, in the compute dtype.

The hub checkpoints store the experts in MXFP4 (`quantization_config.quant_method` "mxfp4",
`modules_to_not_convert` naming the rest). Their storage is read from that config elsewhere (the
pre-quantized checkpoints' reader of fused-experts LinearSpecs); this module only lays the experts
out as `experts.gate_up_proj` and `experts.down_proj` with `copies = num_local_experts`, which is
what the model builds on the meta device (from_config does not quantize) and what the CPU trace
runs, in bf16."""

from .. import activations as act
from ..architecture import LinearSpec, ModelArch, attention_linears
from .base import Family
from .routed import experts_of

# peft 0.21 utils/constants.py maps no default targets for gpt_oss (get_peft_model asks for
# target_modules); memplan's default is Llama's, q_proj and v_proj
PEFT_TARGETS = ("q_proj", "v_proj")
LAYER_TYPES = ("sliding_attention", "full_attention")


def _layer_windows(r, layers: int) -> tuple[int | None, ...]:
    """GptOssConfig: `layer_types` (default: sliding then full, alternating), each sliding layer's
    window `sliding_window` (GptOssAttention.__init__)."""
    types = r.cfg.get("layer_types")
    if types is None:
        types = [LAYER_TYPES[i % 2] for i in range(layers)]  # GptOssConfig.__post_init__
    if not isinstance(types, list) or len(types) != layers or not set(types) <= set(LAYER_TYPES):
        r.fail(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {layers} layers")
    window = r.int("sliding_window", default=128) if "sliding_attention" in types else None
    return tuple(window if t == "sliding_attention" else None for t in types)


def _parse(r, name, mt) -> ModelArch:
    h = r.int("hidden_size")
    heads, hd = r.heads(h)
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size")
    layers = r.int("num_hidden_layers")
    experts, per_tok = experts_of(r, "num_local_experts")
    linears = attention_linears(h, heads * hd, kv * hd, r.bool("attention_bias", True))
    linears += [
        LinearSpec(name="experts.gate_up_proj", d_in=h, d_out=2 * inter, bias=True, module="fused experts", copies=experts),
        LinearSpec(name="experts.down_proj", d_in=inter, d_out=h, bias=True, module="fused experts", copies=experts, tp_style="rowwise"),
    ]
    return ModelArch(
        name=name,
        family=mt,
        decoder_layer="GptOssDecoderLayer",
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=131072),
        tied_embeddings=r.bool("tie_word_embeddings", False),
        norm="rms",
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        experts=experts,
        experts_per_token=per_tok,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        layer_windows=_layer_windows(r, layers),
        linears=tuple(linears),
        router=LinearSpec(name="router", d_in=h, d_out=experts, bias=True, module="router"),
        default_lora_targets=PEFT_TARGETS,
        router_topk_first=True,
        router_norm_topk=False,
        expert_clamped_swiglu=True,
        attention_sinks=True,
        sdpa_supported=False,
    )


FAMILY = Family(model_types=("gpt_oss",), parse=_parse, layer_saved=act.sink_layer_saved,
                prefill_mlp_per_token=act.routed_prefill_per_token,
                forward_transient=act.sink_forward_transient, backward_transient=act.sink_backward_transient)
