"""A model's shape, normalised from a Hugging Face `config.json` into what the memory model needs.

Each supported family maps its config keys here; `linears` lists the linear layers of one
decoder block with their peft/transformers module names, so LoRA targets and 4-bit quantization
can be counted per module. Families follow the transformers 5.x modeling files
(`models/<family>/modeling_<family>.py`).
"""

from __future__ import annotations

from typing import Literal, NoReturn

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


# The largest count a config may state: an int32, the width torch and transformers index shapes with.
# Anything larger is a typo (or a fuzzer), and the formulas' float steps would lose precision on it.
MAX_CONFIG_INT = 2**31 - 1
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


def _attention_linears(h: int, q: int, kv: int, bias: bool, o_bias: bool | None = None) -> list[LinearSpec]:
    return [
        LinearSpec(name="q_proj", d_in=h, d_out=q, bias=bias),
        LinearSpec(name="k_proj", d_in=h, d_out=kv, bias=bias),
        LinearSpec(name="v_proj", d_in=h, d_out=kv, bias=bias),
        LinearSpec(name="o_proj", d_in=q, d_out=h, bias=bias if o_bias is None else o_bias),
    ]


def _sliding_window(r: ConfigReader, family: str) -> int | None:
    """Mistral slides every layer. Qwen2 and Qwen3 slide only with `use_sliding_window`, and then
    only the layers from `max_window_layers` on (transformers Qwen2Config.layer_types); with some
    layers full, the cache is counted at full length (an upper bound)."""
    if family not in ("qwen2", "qwen3"):
        return r.int("sliding_window", default=None)
    if r.bool("use_sliding_window", False) and r.int("max_window_layers", default=0, minimum=0) == 0:
        return r.int("sliding_window", default=None)
    return None


def _llama_like(r: ConfigReader, name: str, family: str) -> ModelArch:
    h = r.int("hidden_size")
    heads, hd = r.heads(h)
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size")
    attn_bias = r.bool("attention_bias", False)
    mlp_bias = r.bool("mlp_bias", False)
    if family == "qwen2":  # Qwen2Attention: q, k and v carry a bias, o does not
        linears = _attention_linears(h, heads * hd, kv * hd, True, o_bias=False)
    else:
        linears = _attention_linears(h, heads * hd, kv * hd, attn_bias)
    experts = 0
    per_tok = 0
    if family == "mixtral":
        experts = r.int("num_local_experts")
        per_tok = r.int("num_experts_per_tok")
        if per_tok > experts:
            r.fail(f"num_experts_per_tok must be at most num_local_experts ({experts}), got {per_tok}")
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
        layers=r.int("num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        intermediate=inter,
        vocab=r.int("vocab_size"),
        max_positions=r.int("max_position_embeddings", default=2048),
        tied_embeddings=r.bool("tie_word_embeddings", default_tied),
        norm="rms_gemma" if family == "gemma" else "rms",
        norm_bias=False,
        gated_mlp=True,
        parallel_attn=False,
        experts=experts,
        experts_per_token=per_tok,
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        sliding_window=_sliding_window(r, family),
        qk_norm=family == "qwen3",
        linears=tuple(linears),
        default_lora_targets=_PEFT_DEFAULT_TARGETS[family],
    )


def _falcon(r: ConfigReader, name: str) -> ModelArch:
    if r.bool("new_decoder_architecture", False):
        r.fail("Falcon's new_decoder_architecture (40B/180B) is not supported yet; "
               "supported Falcon configs use multi_query or multi-head attention")
    h = r.int("hidden_size")
    heads, hd = r.heads(h, ("num_attention_heads", "n_head"), stated_head_dim=False)  # FalconAttention: head_dim is always hidden / heads
    kv = 1 if r.bool("multi_query", True) else heads
    bias = r.bool("bias", False)
    ffn = r.int("ffn_hidden_size", default=4 * h)
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
        parallel_attn=r.bool("parallel_attn", True),
        attn_dropout=r.fraction("attention_dropout", 0.0, zero=True),
        resid_dropout=r.fraction("hidden_dropout", 0.0, zero=True),
        linears=linears,
        default_lora_targets=_PEFT_DEFAULT_TARGETS["falcon"],
    )


def _phi(r: ConfigReader, name: str) -> ModelArch:
    h = r.int("hidden_size")
    heads, hd = r.heads(h, stated_head_dim=False)  # PhiAttention: head_dim is always hidden / heads
    kv = r.kv_heads(heads)
    inter = r.int("intermediate_size")
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
        linears=tuple(linears),
        default_lora_targets=_PEFT_DEFAULT_TARGETS["phi"],
    )


def _gpt_bigcode(r: ConfigReader, name: str) -> ModelArch:
    h = r.int("n_embd", "hidden_size")
    heads, hd = r.heads(h, ("n_head", "num_attention_heads"), stated_head_dim=False)  # GPTBigCodeAttention: head_dim is always hidden / heads
    kv = 1 if r.bool("multi_query", True) else heads
    inter = r.int("n_inner", default=4 * h)
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
        linears=linears,
        default_lora_targets=_PEFT_DEFAULT_TARGETS["gpt_bigcode"],
    )


SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "falcon", "phi", "gpt_bigcode")


def arch_from_hf_config(cfg: dict, name: str) -> ModelArch:
    """Normalise a transformers `config.json` dict (already parsed) into a ModelArch; a config that
    is not one memplan can estimate raises MemplanInputError naming the key."""
    r = ConfigReader(cfg, name)
    model_type = r.cfg.get("model_type")
    if model_type in LLAMA_LIKE:
        return _llama_like(r, name, model_type)
    if model_type == "falcon":
        return _falcon(r, name)
    if model_type == "phi":
        return _phi(r, name)
    if model_type == "gpt_bigcode":
        return _gpt_bigcode(r, name)
    if model_type is None:
        r.fail(f"model_type is missing; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    r.fail(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
