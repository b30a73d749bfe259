"""A model's shape, normalised from a Hugging Face `config.json` into what the memory model needs.

Each supported family maps its config keys here; `linears` lists the linear layers of one
decoder block with their peft/transformers module names, so LoRA targets and 4-bit quantization
can be counted per module. Families follow the transformers 5.x modeling files
(`models/<family>/modeling_<family>.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from .errors import MemplanInputError

Family = Literal["llama", "mistral", "mixtral", "gemma", "qwen2", "qwen3", "falcon", "phi", "gpt_bigcode"]
NormKind = Literal["rms", "rms_gemma", "layer"]
# decoder layers built like LlamaDecoderLayer: RMSNorm, q/k/v/o projections, gated (or MoE) MLP
LLAMA_LIKE = ("llama", "mistral", "mixtral", "gemma", "qwen2", "qwen3")


class LinearSpec(BaseModel):
    """One linear projection in a decoder block."""

    model_config = ConfigDict(frozen=True)

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    # transformers' bitsandbytes integration converts only modules whose type is exactly
    # nn.Linear (integrations/bitsandbytes.py, `type(module) is nn.Linear`): Falcon's
    # FalconLinear subclass and Mixtral's fused expert tensors stay in the compute dtype.
    quantizable: bool = True
    # Fused MoE experts: `copies` stacked weights of this shape; each token visits experts_per_token.
    copies: int = 1

    @property
    def params(self) -> int:
        return self.copies * (self.d_in * self.d_out + (self.d_out if self.bias else 0))


class ModelArch(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    family: Family
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
    rotary_fraction: float = 1.0
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and of k
    linears: tuple[LinearSpec, ...]
    default_lora_targets: tuple[str, ...]

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def largest_quantizable_linear(self) -> int:
        """Elements of the biggest 4/8-bit weight: bitsandbytes dequantizes one at a time."""
        return max((lin.d_in * lin.d_out for lin in self.linears if lin.quantizable), default=0)

    @property
    def norms_per_layer(self) -> int:
        return 1 if self.parallel_attn else 2

    @property
    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm_bias else 1)


# peft utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft 0.21)
_PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "falcon": ("query_key_value",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gpt_bigcode": ("c_attn",),
}


def _get(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _attention_linears(h: int, q: int, kv: int, bias: bool, o_bias: bool | None = None) -> list[LinearSpec]:
    return [
        LinearSpec(name="q_proj", d_in=h, d_out=q, bias=bias),
        LinearSpec(name="k_proj", d_in=h, d_out=kv, bias=bias),
        LinearSpec(name="v_proj", d_in=h, d_out=kv, bias=bias),
        LinearSpec(name="o_proj", d_in=q, d_out=h, bias=bias if o_bias is None else o_bias),
    ]


def _sliding_window(cfg: dict, family: str) -> int | None:
    """Mistral slides every layer. Qwen2 and Qwen3 slide only with `use_sliding_window`, and then
    only the layers from `max_window_layers` on (transformers Qwen2Config.layer_types); with some
    layers full, the cache is counted at full length (an upper bound)."""
    if family not in ("qwen2", "qwen3"):
        return cfg.get("sliding_window")
    if cfg.get("use_sliding_window") and cfg.get("max_window_layers", 0) == 0:
        return cfg.get("sliding_window")
    return None


def _llama_like(cfg: dict, name: str, family: str) -> ModelArch:
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = _get(cfg, "head_dim", default=h // heads)
    inter = cfg["intermediate_size"]
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    if family == "qwen2":  # Qwen2Attention: q, k and v carry a bias, o does not
        linears = _attention_linears(h, heads * hd, kv * hd, True, o_bias=False)
    else:
        linears = _attention_linears(h, heads * hd, kv * hd, attn_bias)
    experts = 0
    per_tok = 0
    if family == "mixtral":
        experts = cfg["num_local_experts"]
        per_tok = cfg["num_experts_per_tok"]
        linears += [
            LinearSpec(name="experts.gate_up_proj", d_in=h, d_out=2 * inter, quantizable=False, copies=experts),
            LinearSpec(name="experts.down_proj", d_in=inter, d_out=h, quantizable=False, copies=experts),
        ]
    else:
        linears += [
            LinearSpec(name="gate_proj", d_in=h, d_out=inter, bias=mlp_bias),
            LinearSpec(name="up_proj", d_in=h, d_out=inter, bias=mlp_bias),
            LinearSpec(name="down_proj", d_in=inter, d_out=h, bias=mlp_bias),
        ]
    default_tied = family == "gemma"
    return ModelArch(
        name=name,
        family=family,
        hidden=h,
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=cfg["vocab_size"],
        max_positions=_get(cfg, "max_position_embeddings", default=2048),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", default_tied)),
        norm="rms_gemma" if family == "gemma" else "rms",
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        experts=experts,
        experts_per_token=per_tok,
        attn_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        sliding_window=_sliding_window(cfg, family),
        qk_norm=family == "qwen3",
        linears=tuple(linears),
        default_lora_targets=_PEFT_DEFAULT_TARGETS[family],
    )


def _falcon(cfg: dict, name: str) -> ModelArch:
    h = cfg["hidden_size"]
    heads = _get(cfg, "num_attention_heads", "n_head")
    hd = h // heads
    if cfg.get("new_decoder_architecture"):
        raise MemplanInputError(
            f"{name}: Falcon's new_decoder_architecture (40B/180B) is not supported yet; "
            "supported Falcon configs use multi_query or multi-head attention"
        )
    kv = 1 if cfg.get("multi_query", True) else heads
    bias = bool(cfg.get("bias", False))
    ffn = _get(cfg, "ffn_hidden_size", default=4 * h)
    # All four projections are FalconLinear (modeling_falcon.py), a subclass bnb loading skips.
    linears = (
        LinearSpec(name="query_key_value", d_in=h, d_out=(heads + 2 * kv) * hd, bias=bias, quantizable=False),
        LinearSpec(name="dense", d_in=h, d_out=h, bias=bias, quantizable=False),
        LinearSpec(name="dense_h_to_4h", d_in=h, d_out=ffn, bias=bias, quantizable=False),
        LinearSpec(name="dense_4h_to_h", d_in=ffn, d_out=h, bias=bias, quantizable=False),
    )
    return ModelArch(
        name=name,
        family="falcon",
        hidden=h,
        layers=_get(cfg, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=ffn,
        vocab=cfg["vocab_size"],
        max_positions=_get(cfg, "max_position_embeddings", default=2048),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=bool(cfg.get("parallel_attn", True)),
        attn_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        resid_dropout=float(cfg.get("hidden_dropout", 0.0) or 0.0),
        linears=linears,
        default_lora_targets=_PEFT_DEFAULT_TARGETS["falcon"],
    )


def _phi(cfg: dict, name: str) -> ModelArch:
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = h // heads
    inter = cfg["intermediate_size"]
    linears = _attention_linears(h, heads * hd, kv * hd, True)
    linears[3] = LinearSpec(name="dense", d_in=heads * hd, d_out=h, bias=True)
    linears += [
        LinearSpec(name="fc1", d_in=h, d_out=inter, bias=True),
        LinearSpec(name="fc2", d_in=inter, d_out=h, bias=True),
    ]
    return ModelArch(
        name=name,
        family="phi",
        hidden=h,
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=cfg["vocab_size"],
        max_positions=_get(cfg, "max_position_embeddings", default=2048),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=True,
        lm_head_bias=True,
        rotary_fraction=float(cfg.get("partial_rotary_factor", 0.5)),
        attn_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        resid_dropout=float(cfg.get("resid_pdrop", 0.0) or 0.0),
        embd_dropout=float(cfg.get("embd_pdrop", 0.0) or 0.0),
        linears=tuple(linears),
        default_lora_targets=_PEFT_DEFAULT_TARGETS["phi"],
    )


def _gpt_bigcode(cfg: dict, name: str) -> ModelArch:
    h = _get(cfg, "n_embd", "hidden_size")
    heads = _get(cfg, "n_head", "num_attention_heads")
    hd = h // heads
    kv = 1 if cfg.get("multi_query", True) else heads
    inter = _get(cfg, "n_inner", default=4 * h)
    linears = (
        LinearSpec(name="c_attn", d_in=h, d_out=h + 2 * kv * hd, bias=True),
        LinearSpec(name="attn.c_proj", d_in=h, d_out=h, bias=True),
        LinearSpec(name="c_fc", d_in=h, d_out=inter, bias=True),
        LinearSpec(name="mlp.c_proj", d_in=inter, d_out=h, bias=True),
    )
    return ModelArch(
        name=name,
        family="gpt_bigcode",
        hidden=h,
        layers=_get(cfg, "n_layer", "num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=cfg["vocab_size"],
        max_positions=_get(cfg, "n_positions", "max_position_embeddings", default=2048),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        norm="layer",
        norm_bias=True,
        gated_mlp=False,
        parallel_attn=False,
        learned_positions=True,
        attn_dropout=float(cfg.get("attn_pdrop", 0.0) or 0.0),
        resid_dropout=float(cfg.get("resid_pdrop", 0.0) or 0.0),
        embd_dropout=float(cfg.get("embd_pdrop", 0.0) or 0.0),
        linears=linears,
        default_lora_targets=_PEFT_DEFAULT_TARGETS["gpt_bigcode"],
    )


SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "falcon", "phi", "gpt_bigcode")


def arch_from_hf_config(cfg: dict, name: str) -> ModelArch:
    """Normalise a transformers `config.json` dict (already parsed) into a ModelArch."""
    model_type = cfg.get("model_type")
    if model_type in LLAMA_LIKE:
        return _llama_like(cfg, name, model_type)
    if model_type == "falcon":
        return _falcon(cfg, name)
    if model_type == "phi":
        return _phi(cfg, name)
    if model_type == "gpt_bigcode":
        return _gpt_bigcode(cfg, name)
    raise MemplanInputError(
        f"model_type {model_type!r} in {name} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
