"""A model's shape, normalised from a Hugging Face `config.json` into what the memory model needs.

Each family (planner/families, one module per family) maps its config keys into a ModelArch;
`linears` lists the linear layers of one decoder block with their peft/transformers module names
and module class, so LoRA targets and 4-bit quantization (which the stack decides) can be counted
per module. Families follow the transformers 5.x modeling files (`models/<family>/modeling_<family>.py`).
"""

from __future__ import annotations

from typing import Literal, NoReturn

from pydantic import BaseModel, ConfigDict

from .errors import MemplanInputError
from .prequantized import QuantSpec, parse_quantization

# rms: Llama's (weight x the normalised input cast back); rms_gemma: x (1 + weight) in fp32, then cast;
# rms_fp32: weight x the fp32 normalised input, then cast (OLMo 2's Olmo2RMSNorm); layer: LayerNorm
NormKind = Literal["rms", "rms_gemma", "layer", "rms_fp32"]
# The module class a projection is built as, which decides whether bitsandbytes loading converts it
# (Stack.bnb_converts): an exact nn.Linear, a subclass of it (FalconLinear), a fused 3-D expert
# tensor (transformers 5 Mixtral), or an MoE router.
LinearModule = Literal["Linear", "Linear subclass", "fused experts", "router"]


class LinearSpec(BaseModel):
    """One linear projection in a decoder block."""

    model_config = ConfigDict(frozen=True)

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    module: LinearModule = "Linear"
    # Fused MoE experts: `copies` stacked weights of this shape; each token visits experts_per_token.
    copies: int = 1
    # Which half of the block it belongs to: the backward runs the MLP's before the attention's
    part: Literal["attention", "mlp"] = "mlp"
    # How tensor parallelism splits it (Megatron-LM, Shoeybi et al. 2019, section 3; vLLM's
    # ColumnParallelLinear / RowParallelLinear, transformers' tp_plan "colwise" / "rowwise"): a
    # linear that reads the residual stream is column-parallel (its outputs split), the one that
    # writes back into it row-parallel (its inputs split, the partial sums all-reduced); a tiny
    # gate stays whole on every rank
    tp_style: Literal["colwise", "rowwise", "replicated"] = "colwise"

    @property
    def params(self) -> int:
        return self.copies * (self.d_in * self.d_out + (self.d_out if self.bias else 0))


class MLADims(BaseModel):
    """Multi-head latent attention's widths (DeepSeek-V2/V3, models/deepseek_v2/modeling_deepseek_v2.py
    `DeepseekV2Attention.__init__`): q through q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj when
    `q_lora_rank` is set; kv_a_proj_with_mqa makes the latent (kv_lora_rank) and one shared rotary key
    (qk_rope_head_dim); kv_b_proj expands the normed latent to every head's nope key and value."""

    model_config = ConfigDict(frozen=True)

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """What one position's latent holds: the compressed kv and the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def norm_params(self) -> int:
        """kv_a_layernorm, and q_a_layernorm when q is low-rank (RMSNorm weights)."""
        return self.kv_lora_rank + (self.q_lora_rank or 0)


class ModelArch(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    family: str  # the config's model_type, a key of planner.families.FAMILIES
    decoder_layer: str  # the decoder layer's class in the modeling file (FSDP wrap, checkpointing unit)
    embedding_module: str = "embed_tokens"  # the token embedding's module name (a peft LoRA target)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    tied_embeddings: bool
    norm: NormKind
    norm_bias: bool
    gated_mlp: bool
    parallel_attn: bool
    learned_positions: bool = False
    lm_head_bias: bool = False
    experts: int = 0
    experts_per_token: int = 0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    sliding_window: int | None = None
    # Per-layer sliding windows, from the config's `layer_types` (Gemma 2/3, gpt-oss, Qwen2's
    # max_window_layers): None for a global layer. Empty: every layer has `sliding_window`.
    layer_windows: tuple[int | None, ...] = ()
    # Elements one cached position holds per layer, keys and values together, as the transformers
    # attention caches them. None: 2 x kv_heads x head_dim. (MLA caches other widths.)
    kv_cache_width: int | None = None
    rotary_fraction: float = 1.0
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and of k
    activation: str = "silu"  # the MLP's activation function (config hidden_act)
    # The attention hands SDPA keys and values broadcast over the query heads (Falcon, GPT-BigCode)
    # instead of grouped ones with enable_gqa.
    sdpa_broadcast_kv: bool = False
    # ... and with an explicit mask, so that SDPA takes its math kernel in every dtype on CUDA and in
    # generation (Falcon: validate/results/probes-*).
    sdpa_always_math: bool = False
    linears: tuple[LinearSpec, ...]
    router: LinearSpec | None = None  # MoE: the router's projection (hidden -> experts)
    default_lora_targets: tuple[str, ...]
    # A pre-quantized checkpoint's quantization_config (GPTQ, AWQ, bitsandbytes, FP8, MXFP4), parsed for
    # every family in arch_from_hf_config (planner/prequantized.py); None: the weights are as the job loads them.
    quantization: QuantSpec | None = None
    # MoE with a shared expert (Qwen2-MoE, models/qwen2_moe/modeling_qwen2_moe.py
    # Qwen2MoeSparseMoeBlock): a gated MLP of this width every token runs beside the routed experts,
    # scaled by sigmoid(shared_expert_gate(x)). 0: none.
    shared_expert_intermediate: int = 0
    # MoE routers (the `gate`/`router` module of the sparse block), as the modeling files write them:
    # softmax over every expert, then top-k (Mixtral, Qwen2/3-MoE), or top-k of the raw logits,
    # then a softmax over those k (GptOssTopKRouter: `router_topk_first`); whether the top-k
    # weights are renormalised by their sum (`norm_topk_prob`; Mixtral always) and cast back to the
    # compute dtype (Qwen2/3-MoE `.to(router_logits.dtype)`; Mixtral keeps them fp32).
    router_topk_first: bool = False
    router_norm_topk: bool = True
    router_scores_cast: bool = False
    # gpt-oss experts' activation (GptOssExperts._apply_gate): gate and up interleaved in gate_up,
    # both clamped, glu = gate * sigmoid(alpha * gate), (up + 1) * glu. False: act(gate) * up.
    expert_clamped_swiglu: bool = False
    # gpt-oss attention sinks (GptOssAttention.sinks): one learned logit per head, concatenated to
    # the scores as an extra column before the softmax (eager) or passed to the kernel as s_aux.
    attention_sinks: bool = False
    # The model builds a sliding-window causal mask on every forward that no SDPA skip applies to,
    # a (1, 1, q, kv) bool tensor expanded over the batch: Qwen2MoeModel.forward builds it
    # unconditionally and Qwen2MoeConfig sets sliding_window 0 without use_sliding_window
    # (masking_utils `_ignore_causal_mask_sdpa`: kv_length >= local_attention_size).
    sliding_mask_always: bool = False
    # The model class has no SDPA path (`_supports_sdpa = False`: GptOssPreTrainedModel; Gemma 2,
    # "sdpa does not support softcapping"): transformers 5 raises for attn_implementation="sdpa"
    # and its default resolution picks eager, which memplan counts instead.
    sdpa_supported: bool = True
    # Hidden-size norms per decoder layer where a block has neither the parallel block's one nor
    # Llama's two: two in a parallel block (GPT-NeoX's input_layernorm and post_attention_layernorm;
    # Falcon's new architecture's ln_attn and ln_mlp), four in Gemma 2/3 (pre- and post-attention,
    # pre- and post-feedforward), OLMo 2's two post-norms. None: 1 if parallel_attn else 2.
    layer_norms: int | None = None
    # A LayerNorm over the token embeddings before the first layer (Bloom's word_embeddings_layernorm)
    embedding_norm: bool = False
    # The attention has no SDPA path and always runs its own matmul-softmax with an fp32 softmax
    # (BloomAttention: alibi.baddbmm, softmax(dtype=float32)), whatever attn_implementation says
    own_attention: bool = False
    # ALiBi biases instead of rotary positions (Bloom): no rotary tables or inverse frequencies
    alibi: bool = False
    # SDPA always gets an explicit bool causal mask (Falcon: create_causal_mask(allow_is_causal_skip=False)),
    # which it turns into an additive one per call (attention.cpp convert_boolean_attn_mask)
    sdpa_explicit_mask: bool = False
    # The model's own (eager) attention keeps its softmax in the compute dtype (FalconAttention:
    # softmax(..., dtype=hidden_states.dtype)); read for configs whose SDPA is not always math
    eager_softmax_compute_dtype: bool = False
    # The MLP's own norm runs before the attention (Falcon's new architecture: ln_mlp beside ln_attn),
    # so its output is alive through the attention
    mlp_norm_before_attention: bool = False
    # Gemma 2/3, Phi-3 and OLMo 2
    # q_norm/k_norm over the whole q and k projection width (OLMo 2: Olmo2Attention builds
    # Olmo2RMSNorm(heads x head_dim)) instead of over each head (Qwen3, Gemma 3)
    qk_norm_full_width: bool = False
    # tanh soft-capping (Gemma 2): of the attention scores (attn_logit_softcapping, eager
    # attention's `tanh(scores / cap) * cap`) and of the final logits (final_logit_softcapping)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Rotary embeddings with their own bases (Gemma 3: one inv_freq pair and one cos/sin table per
    # layer type, Gemma3RotaryEmbedding)
    rope_kinds: int = 1
    # What of the checkpoint the estimate leaves out, for a note (the multimodal Gemma 3's vision
    # tower and projector: only its text_config's language model is counted)
    partial_model: str | None = None
    # DeepSeek-V2/V3 multi-head latent attention: its widths (None: q/k/v/o attention)
    mla: MLADims | None = None
    # Elements one cached position holds per layer in an MLA-aware serving engine (vLLM,
    # SGLang): the compressed latent, kv_lora_rank + qk_rope_head_dim. None: not an MLA model.
    latent_cache_width: int | None = None
    # Of kv_cache_width, the keys' share (DynamicCache grows keys and values by torch.cat
    # one after the other): None, half. MLA caches the latent as keys and the rotary key as values.
    kv_cache_key_width: int | None = None
    # DeepSeek's first_k_dense_replace: the first `dense_layers` decoder layers run a dense
    # gated MLP of `dense_intermediate` whose linears are `dense_linears`, in place of the routed
    # MLP (the `part="mlp"` linears and the router) the other layers run
    dense_layers: int = 0
    dense_intermediate: int = 0
    dense_linears: tuple[LinearSpec, ...] = ()
    # routed experts beside a shared gated MLP (DeepseekV2Moe.shared_experts): its width; 0: none
    shared_intermediate: int = 0
    # DeepSeek's router: "softmax" (V2: fp32 logits, softmax, top-k) or "sigmoid_grouped"
    # (V3: fp32 sigmoid + e_score_correction_bias, an fp32 buffer per MoE layer, grouped top-k)
    deepseek_router: Literal["softmax", "sigmoid_grouped"] | None = None
    # its grouped top-k: (n_group, topk_group); whether its top-k weights are normalised
    # (norm_topk_prob: DeepseekV3TopkRouter divides by their sum) is router_norm_topk, which the parser sets
    router_groups: tuple[int, int] = (1, 1)
    # DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers): in the
    # checkpoint, not built by transformers (DeepseekV3PreTrainedModel._keys_to_ignore_on_load_unexpected)
    unbuilt_mtp_layers: int = 0

    @property
    def sdpa_value_width_differs(self) -> bool:
        """MLA hands SDPA values narrower than its queries and keys (v_head_dim < qk_head_dim)."""
        return self.mla is not None and self.mla.v_head_dim != self.mla.qk_head_dim

    @property
    def moe_layers(self) -> int:
        """Decoder layers running the routed MLP (all of them unless some are dense)."""
        return self.layers - self.dense_layers if self.experts else 0

    def dense_view(self) -> "ModelArch":
        """The architecture as its dense layers see it: the dense MLP in place of the routed one."""
        attn = tuple(lin for lin in self.linears if lin.part == "attention")
        return self.model_copy(update=dict(linears=attn + self.dense_linears, router=None, experts=0,
                                           experts_per_token=0, intermediate=self.dense_intermediate,
                                           shared_intermediate=0, dense_layers=0, dense_linears=()))

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def window_of(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (0-based), None when it attends globally."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def cache_width(self) -> int:
        """Elements per cached position per layer, K and V together."""
        return self.kv_cache_width if self.kv_cache_width is not None else 2 * self.kv_width

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def projections(self) -> tuple[LinearSpec, ...]:
        """Every projection of a block that bitsandbytes loading might convert: linears and router."""
        return self.linears + ((self.router,) if self.router else ())

    @property
    def norms_per_layer(self) -> int:
        if self.layer_norms is not None:
            return self.layer_norms
        return 1 if self.parallel_attn else 2

    @property
    def qk_norm_widths(self) -> tuple[int, int]:
        """Parameters of q_norm and k_norm (0, 0 without q/k norms): one head's width, or the whole
        projection's (qk_norm_full_width)."""
        if not self.qk_norm:
            return 0, 0
        return (self.q_width, self.kv_width) if self.qk_norm_full_width else (self.head_dim, self.head_dim)

    @property
    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm_bias else 1)


# The largest count a config may state: an int32, the width torch and transformers index shapes with.
# Anything larger is a typo (or a fuzzer), and the formulas' float steps would lose precision on it.
MAX_CONFIG_INT = 2**31 - 1
# The most decoder layers a config may state. The estimate follows layers one by one where they differ
# (per-layer sliding windows, DeepSeek's dense first layers, caches per layer, skipped modules of a
# pre-quantized checkpoint), and a config of millions of layers, which transformers could not build
# either, would stall it; the deepest shipped model has 126 (Llama-3.1-405B).
MAX_LAYERS = 10_000
_MAXIMA = {"num_hidden_layers": MAX_LAYERS, "n_layer": MAX_LAYERS}
_REQUIRED = object()
_JSON_KIND = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def config_source(name: str) -> str:
    """How messages name a config: a display name ending in .json is a local file (profiles'
    load_hf_config names files by path); anything else is a shipped or hub model id."""
    return f"config file {name!r}" if name.endswith(".json") else f"config of {name!r}"


class ConfigReader:
    """Typed access to one parsed config.json: each family parser reads every value through it, so
    a missing key, a wrong type or an impossible value is one MemplanInputError naming the source,
    the key and what is allowed, before any formula sees it. A key written as `null` counts as
    absent, as transformers' configs write unset optional values."""

    def __init__(self, cfg: object, name: str) -> None:
        self.source = config_source(name)
        if not isinstance(cfg, dict):
            self.fail(f"must be a JSON object of config keys, got a JSON {_JSON_KIND.get(type(cfg), type(cfg).__name__)}")
        self.cfg = cfg

    def fail(self, message: str) -> NoReturn:
        raise MemplanInputError(f"{self.source}: {message}")

    def has(self, *keys: str) -> bool:
        return any(self.cfg.get(k) is not None for k in keys)

    def _find(self, keys: tuple[str, ...]) -> tuple[str, object]:
        """The first of `keys` that is set (alternative names, as transformers' attribute_map), and its value."""
        for k in keys:
            if self.cfg.get(k) is not None:
                return k, self.cfg[k]
        return " or ".join(keys), None

    def int(self, *keys: str, default: object = _REQUIRED, minimum: int = 1) -> int:
        """An integer >= `minimum` (JSON booleans are not integers here), or `default` when absent."""
        key, value = self._find(keys)
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if value is None:
            if default is _REQUIRED:
                self.fail(f"{key} is missing; it must be {kind}")
            return default  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(f"{key} must be {kind}, got {value!r}")
        if value > MAX_CONFIG_INT:
            self.fail(f"{key} must be {kind} up to {MAX_CONFIG_INT}, got {value!r}")
        if value > _MAXIMA.get(key, MAX_CONFIG_INT):
            self.fail(f"{key} must be {kind} up to {_MAXIMA[key]:,}, got {value!r}")
        return value

    def fraction(self, key: str, default: float, *, zero: bool) -> float:
        """A number in [0, 1] (`zero`: dropout probabilities) or in (0, 1] (a share such as partial_rotary_factor).
        NaN and infinities (which Python's json accepts) fail the range check."""
        _, value = self._find((key,))
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (0 <= value <= 1) if zero else (0 < value <= 1)
        ):
            self.fail(f"{key} must be a number {'from 0 to 1' if zero else 'in (0, 1]'}, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        _, value = self._find((key,))
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(f"{key} must be true or false, got {value!r}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        """One of `allowed` (a string), or `default` when absent."""
        _, value = self._find((key,))
        if value is None:
            return default
        if value not in allowed:
            self.fail(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def nested(self, key: str) -> "ConfigReader | None":
        """A reader over a JSON object nested under `key` (e.g. rope_parameters), None when absent."""
        _, value = self._find((key,))
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(f"{key} must be a JSON object, got {value!r}")
        sub = ConfigReader(value, "")
        sub.source = f"{self.source}, {key}"
        return sub

    def heads(self, hidden: int, heads_keys: tuple[str, ...] = ("num_attention_heads",),
              stated_head_dim: bool = True) -> tuple[int, int]:
        """(heads, head_dim): head_dim as the config states it (families whose attention reads
        `config.head_dim`), else hidden / heads, which must divide."""
        heads = self.int(*heads_keys)
        if stated_head_dim and self.has("head_dim"):
            return heads, self.int("head_dim")
        if hidden % heads:
            key, _ = self._find(heads_keys)
            self.fail(f"{key} ({heads}) must divide hidden_size ({hidden}) when head_dim is not given")
        return heads, hidden // heads

    def kv_heads(self, heads: int) -> int:
        """num_key_value_heads (default: heads), which grouped-query attention needs to divide heads."""
        kv = self.int("num_key_value_heads", default=heads)
        if heads % kv:
            self.fail(f"num_key_value_heads must divide num_attention_heads ({heads}), got {kv}")
        return kv


def attention_linears(h: int, q: int, kv: int, bias: bool, o_bias: bool | None = None) -> list[LinearSpec]:
    """q, k, v and o projections as LlamaAttention builds them (nn.Linear each)."""
    return [
        LinearSpec(name="q_proj", d_in=h, d_out=q, bias=bias, part="attention"),
        LinearSpec(name="k_proj", d_in=h, d_out=kv, bias=bias, part="attention"),
        LinearSpec(name="v_proj", d_in=h, d_out=kv, bias=bias, part="attention"),
        LinearSpec(name="o_proj", d_in=q, d_out=h, bias=bias if o_bias is None else o_bias, part="attention",
                   tp_style="rowwise"),
    ]


def arch_from_hf_config(cfg: dict, name: str) -> ModelArch:
    """Normalise a transformers `config.json` dict (already parsed) into a ModelArch through its
    family's parser (planner/families); a config that is not one memplan can estimate raises
    MemplanInputError naming the key."""
    from .families import FAMILIES, supported_model_types

    r = ConfigReader(cfg, name)
    model_type = r.cfg.get("model_type")
    if model_type in FAMILIES:
        arch = FAMILIES[model_type].parse(r, name, model_type)
        spec = parse_quantization(r)
        return arch if spec is None else arch.model_copy(update={"quantization": spec})
    supported = ", ".join(supported_model_types())
    if model_type is None:
        r.fail(f"model_type is missing; supported: {supported}")
    r.fail(f"model_type {model_type!r} is not supported; supported: {supported}")
