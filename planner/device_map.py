"""`from_pretrained(..., device_map="auto"|"balanced"|"balanced_low_0"|"sequential")`, reproduced.

transformers 5.23 places whole modules on devices with its own copies of accelerate's placement
functions (transformers/integrations/accelerate.py, which imports only `get_max_memory`,
`get_max_layer_size` and `clean_device_map` from accelerate 1.15.0's accelerate/utils/modeling.py):

1. `_get_device_map` (integrations/accelerate.py:340): for every strategy but "sequential",
   `get_balanced_memory(model, max_memory, no_split_module_classes=model._no_split_modules,
   hf_quantizer, low_zero=(device_map == "balanced_low_0"))` caps each GPU but the last;
   "sequential" takes `get_max_memory(max_memory)` as it is. A quantizer then scales the budgets
   (`hf_quantizer.adjust_max_memory`: x 0.90 for bitsandbytes 4- and 8-bit).
2. `infer_auto_device_map` (integrations/accelerate.py:644) walks the module tree in registration
   order, filling device 0, then 1, ..., then "cpu", then "disk", keeping room on GPU 0 and on the
   cpu for the largest layer that remains (`max_layer_size`), never splitting a `_no_split_modules`
   class (the decoder layer), and putting a tied parameter's module on the device of the first
   module that holds the tie.
3. `clean_device_map` (accelerate utils/modeling.py:871) merges children that share a device into
   their parent's key.

This module re-implements those steps on a pure module tree built from a ModelArch (no torch): the
named modules transformers builds, each with its parameters' and buffers' bytes in the loading
dtype. tests/test_device_map.py holds the tree and the placement against transformers' own
functions on the meta model, exactly. docs/device-map.md states the rules with their sources.

What is not reproduced: `no_placement_params` (no covered model sets `_no_placement_params`),
`offload_buffers` (from_pretrained never passes it to infer_auto_device_map), and the warnings and
logs the functions emit; devices other than CUDA GPUs (mps, npu, xpu).
"""

from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, model_validator

from .architecture import ModelArch
from .dtypes import DType
from .errors import MemplanInputError

Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
Device = Union[int, Literal["cpu", "disk"]]
# bitsandbytes loading as transformers 5.23 sizes it: quantizers/quantizer_bnb_4bit.py
# `quantized_element_size` 0.5 and quantizer_bnb_8bit.py 1 byte per element of a converted weight.
BnbQuant = Literal["bnb-4bit", "bnb-8bit"]
_BNB_ELEMENT = {"bnb-4bit": 0.5, "bnb-8bit": 1}
_LOAD_DTYPES = {DType.fp32: 4, DType.fp16: 2, DType.bf16: 2}
# torch.arange(...).float() in every family's RotaryEmbedding.compute_default_rope_parameters:
# inv_freq and its original_inv_freq copy stay fp32 whatever dtype the model loads in.
_FP32 = 4


# --- the module tree -------------------------------------------------------------------------------

class Tensor(BaseModel):
    """A parameter or buffer held directly by a module, its bytes in the loading dtype."""

    model_config = ConfigDict(frozen=True)

    name: str  # local name (`weight`, `inv_freq`)
    nbytes: Union[int, float]  # a float only under bitsandbytes' fractional element sizes
    kind: Literal["param", "buffer"] = "param"
    # counted by transformers' compute_module_sizes: a tied parameter's second name is skipped
    # (integrations/accelerate.py compute_module_sizes, `if name in tied_keys: continue`)
    tied: bool = False


class ModuleNode(BaseModel):
    """One named module as transformers registers it: `params` and `buffers` in registration
    order (named_parameters / named_buffers with recurse=False), `children` likewise. Decoder
    layers share one node per distinct layer: names are local, full names are built on the walk."""

    model_config = ConfigDict(frozen=True)

    name: str
    cls: str  # the class name, which `_no_split_modules` matches (get_max_layer_size)
    params: tuple[Tensor, ...] = ()
    buffers: tuple[Tensor, ...] = ()
    children: tuple["ModuleNode", ...] = ()


class ModuleTree(BaseModel):
    """The causal-LM's module tree with what placement needs besides it."""

    model_config = ConfigDict(frozen=True)

    root: ModuleNode
    no_split: tuple[str, ...]  # model._no_split_modules: the decoder layer's class
    tied: tuple[tuple[str, ...], ...]  # groups of full parameter names tied together, sorted
    layers_prefix: str  # full name of the decoder layers' ModuleList (`model.layers`, `transformer.h`)
    layers: int


def _linear(name: str, d_in: int, d_out: int, bias: bool, size: Union[int, float], cls: str = "Linear",
            weight_size: Union[int, float, None] = None, tied: bool = False) -> ModuleNode:
    """nn.Linear: weight (d_out x d_in) then bias (d_out)."""
    ws = size if weight_size is None else weight_size
    params = [Tensor(name="weight", nbytes=d_in * d_out * ws, tied=tied)]
    if bias:
        params.append(Tensor(name="bias", nbytes=d_out * size))
    return ModuleNode(name=name, cls=cls, params=tuple(params))


def _norm(name: str, width: int, bias: bool, size: int, cls: str) -> ModuleNode:
    params = [Tensor(name="weight", nbytes=width * size)]
    if bias:
        params.append(Tensor(name="bias", nbytes=width * size))
    return ModuleNode(name=name, cls=cls, params=tuple(params))


def _rotary(name: str, arch: ModelArch, cls: str) -> ModuleNode:
    """inv_freq and original_inv_freq (non-persistent buffers, rotary_dim / 2 fp32 values each):
    e.g. models/llama/modeling_llama.py LlamaRotaryEmbedding.__init__."""
    n = arch.rotary_dim // 2
    return ModuleNode(name=name, cls=cls, buffers=(
        Tensor(name="inv_freq", nbytes=n * _FP32, kind="buffer"),
        Tensor(name="original_inv_freq", nbytes=n * _FP32, kind="buffer"),
    ))


def _leaf(name: str, cls: str) -> ModuleNode:
    return ModuleNode(name=name, cls=cls)


class _Sizes:
    """Bytes per element: `size` for every float parameter, `linear` for the weights bitsandbytes
    converts (exact nn.Linear inside the decoder layers: transformers 5.23
    integrations/bitsandbytes.py:162 `replace_with_bnb_linear`; lm_head is kept by quantizers/base.py `get_keys_to_not_convert`)."""

    def __init__(self, dtype: DType, quant: BnbQuant | None) -> None:
        self.size = _LOAD_DTYPES[dtype]
        self.linear: Union[int, float] = self.size if quant is None else _BNB_ELEMENT[quant]


def _by_name(arch: ModelArch) -> dict:
    return {lin.name: lin for lin in arch.linears}


def _proj(arch: ModelArch, s: _Sizes, name: str, cls: str = "Linear") -> ModuleNode:
    lin = _by_name(arch)[name]
    ws = s.linear if lin.module == "Linear" else s.size
    return _linear(name, lin.d_in, lin.d_out, lin.bias, s.size, cls=cls, weight_size=ws)


def _llama_like_layer(arch: ModelArch, s: _Sizes, prefix: str) -> ModuleNode:
    """LlamaDecoderLayer and its kin (Mistral, Qwen2, Qwen3, Gemma, Mixtral, Qwen3-MoE):
    self_attn (q, k, v, o, then Qwen3's q_norm and k_norm), mlp, input_layernorm,
    post_attention_layernorm (models/llama/modeling_llama.py LlamaDecoderLayer.__init__)."""
    attn = [_proj(arch, s, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if arch.qk_norm:  # Qwen3Attention.__init__: q_norm, k_norm after o_proj, head_dim wide
        attn += [_norm("q_norm", arch.head_dim, False, s.size, f"{prefix}RMSNorm"),
                 _norm("k_norm", arch.head_dim, False, s.size, f"{prefix}RMSNorm")]
    if arch.experts:
        lins = _by_name(arch)
        gu, down = lins["experts.gate_up_proj"], lins["experts.down_proj"]
        # MixtralExperts / Qwen3MoeExperts: gate_up_proj (E, 2I, H) and down_proj (E, H, I)
        # parameters, then the act_fn child; bitsandbytes leaves these 3-D tensors as they are
        experts = ModuleNode(name="experts", cls=f"{prefix}Experts", params=(
            Tensor(name="gate_up_proj", nbytes=gu.copies * gu.d_in * gu.d_out * s.size),
            Tensor(name="down_proj", nbytes=down.copies * down.d_in * down.d_out * s.size),
        ), children=(_leaf("act_fn", "SiLUActivation"),))
        r = arch.router
        gate = ModuleNode(name="gate", cls=f"{prefix}TopKRouter",
                          params=(Tensor(name="weight", nbytes=r.d_in * r.d_out * s.size),))
        # MixtralSparseMoeBlock registers gate then experts; Qwen3MoeSparseMoeBlock experts then gate
        kids = (gate, experts) if arch.family == "mixtral" else (experts, gate)
        mlp = ModuleNode(name="mlp", cls=f"{prefix}SparseMoeBlock", children=kids)
    else:
        mlp = ModuleNode(name="mlp", cls=f"{prefix}MLP", children=tuple(
            [_proj(arch, s, n) for n in ("gate_proj", "up_proj", "down_proj")] + [_leaf("act_fn", "Activation")]))
    norm = f"{prefix}RMSNorm"
    return ModuleNode(name="0", cls=arch.decoder_layer, children=(
        ModuleNode(name="self_attn", cls=f"{prefix}Attention", children=tuple(attn)),
        mlp,
        _norm("input_layernorm", arch.hidden, False, s.size, norm),
        _norm("post_attention_layernorm", arch.hidden, False, s.size, norm),
    ))


# model_type -> the class-name prefix of its modeling file
_LLAMA_LIKE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
               "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_LLAMA_LIKE) + ("falcon", "phi")


def _layer_list(layer: ModuleNode, n: int, name: str) -> ModuleNode:
    """nn.ModuleList children "0".."n-1"; every layer of a covered family is the same shape."""
    return ModuleNode(name=name, cls="ModuleList",
                      children=tuple(layer.model_copy(update={"name": str(i)}) for i in range(n)))


def _head(arch: ModelArch, s: _Sizes) -> ModuleNode:
    """lm_head: nn.Linear(hidden, vocab), its weight tied to the embedding's when tie_word_embeddings."""
    return _linear("lm_head", arch.hidden, arch.vocab, arch.lm_head_bias, s.size, tied=arch.tied_embeddings)


def _embedding(name: str, arch: ModelArch, s: _Sizes, scaled: bool = False, cls: str = "Embedding") -> ModuleNode:
    buffers = ()
    if scaled:
        # GemmaTextScaledWordEmbedding: embed_scale = torch.tensor(sqrt(hidden)), a 0-d buffer
        # made in the default dtype, which from_pretrained's init context sets to the loading dtype
        buffers = (Tensor(name="embed_scale", nbytes=s.size, kind="buffer"),)
    return ModuleNode(name=name, cls=cls, params=(Tensor(name="weight", nbytes=arch.vocab * arch.hidden * s.size),),
                      buffers=buffers)


def module_tree(arch: ModelArch, dtype: DType | str = DType.bf16, quantization: BnbQuant | None = None) -> ModuleTree:
    """The module tree transformers 5.23 builds for `arch` in `dtype` (AutoModelForCausalLM), with
    bitsandbytes' element size for converted linears when `quantization` is given. Families whose
    tree memplan does not build exactly raise MemplanInputError."""
    dtype = _dtype(dtype)
    if quantization is not None and quantization not in _BNB_ELEMENT:
        raise MemplanInputError(f"quantization {quantization!r} is not supported; allowed: None, "
                                + ", ".join(_BNB_ELEMENT))
    if arch.family not in SUPPORTED_FAMILIES:
        raise MemplanInputError(f"device_map placement: model_type {arch.family!r} is not supported; "
                                f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    if arch.quantization is not None:
        raise MemplanInputError(f"device_map placement: {arch.name} is a pre-quantized checkpoint "
                                f"({arch.quantization.method}), whose module tree memplan does not build")
    s = _Sizes(dtype, quantization)
    if arch.family in _LLAMA_LIKE:
        p = _LLAMA_LIKE[arch.family]
        # LlamaModel.__init__ (and kin): embed_tokens, layers, norm, rotary_emb
        base = ModuleNode(name="model", cls=f"{p}Model", children=(
            _embedding("embed_tokens", arch, s, scaled=arch.family == "gemma",
                       cls="GemmaTextScaledWordEmbedding" if arch.family == "gemma" else "Embedding"),
            _layer_list(_llama_like_layer(arch, s, p), arch.layers, "layers"),
            _norm("norm", arch.hidden, False, s.size, f"{p}RMSNorm"),
            _rotary("rotary_emb", arch, f"{p}RotaryEmbedding"),
        ))
        prefix, cls = "model.layers", f"{p}ForCausalLM"
    elif arch.family == "phi":
        # models/phi/modeling_phi.py: PhiDecoderLayer (self_attn, mlp, input_layernorm,
        # resid_dropout); PhiAttention q, k, v, dense; PhiMLP activation_fn, fc1, fc2;
        # PhiModel embed_tokens, layers, rotary_emb, embed_dropout, final_layernorm
        if arch.qk_norm:
            raise MemplanInputError("device_map placement: Phi with qk_layernorm is not supported")
        layer = ModuleNode(name="0", cls=arch.decoder_layer, children=(
            ModuleNode(name="self_attn", cls="PhiAttention",
                       children=tuple(_proj(arch, s, n) for n in ("q_proj", "k_proj", "v_proj", "dense"))),
            ModuleNode(name="mlp", cls="PhiMLP", children=(
                _leaf("activation_fn", "NewGELUActivation"), _proj(arch, s, "fc1"), _proj(arch, s, "fc2"))),
            _norm("input_layernorm", arch.hidden, True, s.size, "LayerNorm"),
            _leaf("resid_dropout", "Dropout"),
        ))
        base = ModuleNode(name="model", cls="PhiModel", children=(
            _embedding("embed_tokens", arch, s),
            _layer_list(layer, arch.layers, "layers"),
            _rotary("rotary_emb", arch, "PhiRotaryEmbedding"),
            _leaf("embed_dropout", "Dropout"),
            _norm("final_layernorm", arch.hidden, True, s.size, "LayerNorm"),
        ))
        prefix, cls = "model.layers", "PhiForCausalLM"
    else:  # falcon
        # models/falcon/modeling_falcon.py FalconDecoderLayer.__init__: self_attention
        # (query_key_value, dense, attention_dropout), mlp (dense_h_to_4h, act, dense_4h_to_h),
        # then post_attention_layernorm + input_layernorm (sequential), ln_attn + ln_mlp (new
        # architecture, two norms) or input_layernorm (parallel, one norm)
        norms = {1: ("input_layernorm",), 2: ("ln_attn", "ln_mlp")}[arch.norms_per_layer]
        if not arch.parallel_attn:
            norms = ("post_attention_layernorm", "input_layernorm")
        flin = "FalconLinear"
        layer = ModuleNode(name="0", cls=arch.decoder_layer, children=(
            ModuleNode(name="self_attention", cls="FalconAttention", children=(
                _proj(arch, s, "query_key_value", flin), _proj(arch, s, "dense", flin), _leaf("attention_dropout", "Dropout"))),
            ModuleNode(name="mlp", cls="FalconMLP", children=(
                _proj(arch, s, "dense_h_to_4h", flin), _leaf("act", "GELUActivation"), _proj(arch, s, "dense_4h_to_h", flin))),
        ) + tuple(_norm(n, arch.hidden, True, s.size, "LayerNorm") for n in norms))
        # FalconModel.__init__: word_embeddings, h, ln_f, rotary_emb
        base = ModuleNode(name="transformer", cls="FalconModel", children=(
            _embedding("word_embeddings", arch, s),
            _layer_list(layer, arch.layers, "h"),
            _norm("ln_f", arch.hidden, True, s.size, "LayerNorm"),
            _rotary("rotary_emb", arch, "FalconRotaryEmbedding"),
        ))
        prefix, cls = "transformer.h", "FalconForCausalLM"
    root = ModuleNode(name="", cls=cls, children=(base, _head(arch, s)))
    embed = f"{base.name}.{base.children[0].name}.weight"
    # PreTrainedModel.post_init: all_tied_weights_keys {"lm_head.weight": "<embedding>.weight"};
    # _init_infer_auto_device_map makes one sorted group per tie target (integrations/accelerate.py:617)
    tied = ((tuple(sorted(["lm_head.weight", embed])),) if arch.tied_embeddings else ())
    return ModuleTree(root=root, no_split=(arch.decoder_layer,), tied=tied, layers_prefix=prefix, layers=arch.layers)


def _dtype(dtype: DType | str) -> DType:
    try:
        d = DType(dtype)
    except ValueError:
        d = None
    if d not in _LOAD_DTYPES:
        raise MemplanInputError(f"dtype {dtype!r} is not a loading dtype; allowed: fp32, fp16, bf16")
    return d


def module_sizes(tree: ModuleTree, only_modules: bool = False) -> tuple[dict[str, Union[int, float]], dict[str, Union[int, float]]]:
    """transformers 5.23 integrations/accelerate.py `compute_module_sizes`: every module's bytes
    (its parameters and buffers, recursively, tied duplicates skipped) keyed by full name, and with
    `only_modules=False` every tensor's own bytes too; and the bytes each module holds directly
    (its "leaves": the parent of every tensor)."""
    sizes: dict[str, Union[int, float]] = {}
    leaves: dict[str, Union[int, float]] = {}

    def walk(node: ModuleNode, full: str) -> None:
        for t in node.params + node.buffers:
            if t.tied:
                continue
            name = f"{full}.{t.name}" if full else t.name
            parts = name.split(".")
            for i in range(len(parts)):
                key = ".".join(parts[:i])
                sizes[key] = sizes.get(key, 0) + t.nbytes
            if "." in name:
                parent = name.rsplit(".", 1)[0]
                leaves[parent] = leaves.get(parent, 0) + t.nbytes
            if not only_modules:
                sizes[name] = sizes.get(name, 0) + t.nbytes
        for c in node.children:
            walk(c, f"{full}.{c.name}" if full else c.name)

    walk(tree.root, "")
    return sizes, leaves


def named_modules(tree: ModuleTree) -> list[tuple[str, ModuleNode]]:
    """(full name, node) in the order torch's named_modules() yields them (root first, depth first)."""
    out: list[tuple[str, ModuleNode]] = []

    def walk(node: ModuleNode, full: str) -> None:
        out.append((full, node))
        for c in node.children:
            walk(c, f"{full}.{c.name}" if full else c.name)

    walk(tree.root, "")
    return out


# --- max_memory ------------------------------------------------------------------------------------

Budget = Union[int, float]  # bytes; a float once a 0.9 factor has been applied, as in Python there


class MaxMemory(BaseModel):
    """The `max_memory` dict from_pretrained hands on: GPU i's bytes at gpus[i], the cpu's (None:
    no "cpu" key, so what does not fit the GPUs goes to "disk"). `from_user` False: derived from
    the cards' free memory (`derived_max_memory`), which get_balanced_memory treats differently
    (the 0.9 factor on a single GPU)."""

    model_config = ConfigDict(frozen=True)

    gpus: tuple[Budget, ...]
    cpu: Budget | None = None
    from_user: bool = True

    @model_validator(mode="after")
    def _check(self) -> "MaxMemory":
        if not self.gpus:
            raise ValueError("max_memory: at least one GPU is needed")
        for i, b in enumerate(self.gpus):
            if isinstance(b, bool) or b < 0 or not math.isfinite(b):
                raise ValueError(f"max_memory: GPU {i} bytes must be a non-negative number, got {b!r}")
        if self.cpu is not None and (isinstance(self.cpu, bool) or self.cpu < 0 or not math.isfinite(self.cpu)):
            raise ValueError(f"max_memory: cpu bytes must be a non-negative number, got {self.cpu!r}")
        return self

    def as_dict(self) -> dict[Device, Budget]:
        d: dict[Device, Budget] = {i: b for i, b in enumerate(self.gpus)}
        if self.cpu is not None:
            d["cpu"] = self.cpu
        return d


def derived_max_memory(gpu_free: list[int], cpu_available: int, gpu_cached_free: list[int] | None = None) -> MaxMemory:
    """The max_memory transformers 5.23 derives when the user passes none
    (integrations/accelerate.py `get_max_memory` on accelerate 1.15 utils/modeling.py `get_max_memory(None)`):
    - GPU i: `torch.cuda.mem_get_info(i)[0]`, its free bytes (`gpu_free[i]`), plus what torch's
      caching allocator holds reserved but unallocated (`memory_reserved - memory_allocated`,
      `gpu_cached_free[i]`, 0 in a fresh process);
    - "cpu": `psutil.virtual_memory().available` (`cpu_available`) x 0.90 (transformers' own cut,
      "we don't want to set extremely tight bound and pressure for cpu").
    (accelerate leaves the cpu out on an integrated GPU; not modelled: memplan's GPUs are discrete.)"""
    if not gpu_free:
        raise MemplanInputError("gpu_free must list each GPU's free bytes; got none")
    cached = list(gpu_cached_free) if gpu_cached_free is not None else [0] * len(gpu_free)
    if len(cached) != len(gpu_free):
        raise MemplanInputError(f"gpu_cached_free has {len(cached)} values for {len(gpu_free)} GPUs; give one per GPU")
    for what, vals in (("gpu_free", gpu_free), ("gpu_cached_free", cached), ("cpu_available", [cpu_available])):
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MemplanInputError(f"{what} must be non-negative integer bytes, got {v!r}")
    return MaxMemory(gpus=tuple(f + c for f, c in zip(gpu_free, cached)), cpu=cpu_available * 0.90, from_user=False)


def _get_balanced_memory(tree: ModuleTree, mm: dict[Device, Budget], from_user: bool, low_zero: bool) -> dict[Device, Budget]:
    """transformers 5.23 integrations/accelerate.py:242 `get_balanced_memory`."""
    mm = dict(mm)
    num_devices = len([d for d in mm if isinstance(d, int) and mm[d] > 0])
    if num_devices == 0:
        return mm
    if num_devices == 1:
        low_zero = False  # "We cannot do low_zero on just one GPU"
        if not from_user:
            for key in mm:  # "90% is a good compromise", on the first GPU only
                if isinstance(key, int):
                    mm[key] *= 0.9
                    break
    sizes, leaves = module_sizes(tree, only_modules=True)
    per_gpu = sizes[""] // (num_devices - 1 if low_zero else num_devices)
    # the biggest no-split module (every one of them, not only the first: layers may differ) and
    # the biggest tensor-holding module (usually the embedding), x 1.25
    biggest_no_split = max((sizes.get(n, 0) for n, node in named_modules(tree) if node.cls in tree.no_split), default=0)
    biggest_leaf = max(leaves.values(), default=0)
    per_gpu += int(1.25 * max(biggest_no_split, biggest_leaf))
    gpus = sorted(d for d, m in mm.items() if isinstance(d, int) and m > 0)
    for idx in gpus[:-1]:  # the last GPU keeps its max_memory "in case the buffer is not enough"
        mm[idx] = min(mm[0] if low_zero and idx == 0 else per_gpu, mm[idx])
    if low_zero:
        min_zero = max(0, sizes[""] - sum(mm[i] for i in range(1, num_devices)))
        mm[0] = min(min_zero, mm[0])
    return mm


# --- infer_auto_device_map -------------------------------------------------------------------------

class _Tensor:
    """A parameter or buffer standing in modules_to_treat (not an nn.Module: no children)."""

    __slots__ = ()


_TENSOR = _Tensor()


def _children(node) -> list[tuple[str, ModuleNode]]:
    return [] if not isinstance(node, ModuleNode) else [(c.name, c) for c in node.children]


def _max_layer_size(modules: list, sizes: dict, no_split: tuple[str, ...]) -> tuple[Budget, list[str]]:
    """accelerate 1.15 utils/modeling.py:718 `get_max_layer_size`: the largest module that has no
    children or is a no-split class, with every name that reaches that size."""
    max_size: Budget = 0
    names: list[str] = []
    todo = list(modules)
    while todo:
        name, node = todo.pop(0)
        kids = _children(node)
        if not kids or node.cls in no_split:
            size = sizes.get(name, 0)
            if size > max_size:
                max_size, names = size, [name]
            elif size == max_size:
                names.append(name)
        else:
            todo = [(f"{name}.{n}", v) for n, v in kids] + todo
    return max_size, names


def _direct(name: str, node: ModuleNode) -> list:
    """module.named_parameters(recurse=False) + module.named_children(), as the walk splits a module
    (a split module's own buffers are not listed: transformers does not either)."""
    return ([(f"{name}.{t.name}", _TENSOR) for t in node.params]
            + [(f"{name}.{c.name}", c) for c in node.children])


def _size_with_ties(tied_params: list[str], size: Budget, sizes: dict, todo: list) -> tuple[Budget, list[str], list]:
    """transformers 5.23 integrations/accelerate.py:62 `get_module_size_with_ties`: the module plus
    every not-yet-placed module holding one of its tied parameters, each counted once and in full
    (unlike accelerate's own version, which subtracts the tied parameter)."""
    if not tied_params:
        return size, [], []
    names: list[str] = []
    nodes: list = []
    total = size
    for p in tied_params:
        i = [i for i, (n, _) in enumerate(todo) if p.startswith(n + ".")][0]
        n, node = todo[i]
        if n not in names:
            names.append(n)
            nodes.append(node)
            total += sizes.get(n, 0)
    return total, names, nodes


def _buffer_bytes(node: ModuleNode) -> Budget:
    """compute_module_total_buffer_size (integrations/accelerate.py:196): the buffers under a module."""
    return sum(t.nbytes for t in node.buffers) + sum(_buffer_bytes(c) for c in node.children)


class _Walk(BaseModel):
    """What infer_auto_device_map leaves beside the map."""

    device_map: dict[str, Device]
    first_reserve: Budget
    used: dict[str, Budget]  # device_memory_used at the end (placed bytes plus reserves), keyed str(device)
    offloaded_buffers: Budget  # device_buffer_sizes of "cpu" and "disk"


def _infer_auto_device_map(tree: ModuleTree, mm: dict[Device, Budget]) -> _Walk:
    """transformers 5.23 integrations/accelerate.py:644 `infer_auto_device_map` (with
    `_init_infer_auto_device_map`, :574), clean_result=True, offload_buffers=False, no
    no_placement_params. Returns the map before cleaning, the first reserve (max_layer_size), what each
    device used and the buffers of the modules placed on the cpu or disk."""
    devices: list[Device] = list(mm.keys())
    if "disk" not in devices:
        devices.append("disk")
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    main_devices = [gpus[0], "cpu"] if gpus else ["cpu"]
    sizes, _ = module_sizes(tree, only_modules=False)
    tied = [list(g) for g in tree.tied] or [[]]
    no_split = tree.no_split
    root = tree.root
    # direct parameters, children, direct buffers of the root
    todo: list = ([(t.name, _TENSOR) for t in root.params] + [(c.name, c) for c in root.children]
                  + [(t.name, _TENSOR) for t in root.buffers])
    device_map: dict[str, Device] = {}
    current = 0
    used: dict[Device, Budget] = {d: 0 for d in devices}
    buffers: dict[Device, Budget] = {}
    max_layer, max_names = _max_layer_size(todo, sizes, no_split)
    first_reserve = max_layer

    def refresh() -> tuple[Budget, list[str]]:
        return _max_layer_size([(n, m) for n, m in todo if isinstance(m, ModuleNode)], sizes, no_split)

    while todo:
        name, node = todo.pop(0)
        # the largest remaining layer may have changed now that one was taken
        max_names = [n for n in max_names if n != name and not n.startswith(name + ".")]
        if not max_names:
            max_layer, max_names = refresh()
        size = sizes.get(name, 0)
        groups = [g for g in tied if any(name + "." in k + "." for k in g) and not all(name + "." in k + "." for k in g)]
        tied_params = sum(([p for p in g if name + "." not in p + "."] for g in groups), [])
        device = devices[current]
        cap = mm[device] if device != "disk" else None
        reserved: Budget = 0
        if device in main_devices:  # keep room for the largest layer on GPU 0 and on the cpu
            cap = cap - max_layer
            reserved = max_layer
        with_ties, tied_names, tied_nodes = _size_with_ties(tied_params, size, sizes, todo)
        if cap is None or used[device] + with_ties <= cap:
            used[device] += with_ties
            device_map[name] = device
            for tn in tied_names:
                if tn in [m[0] for m in todo]:
                    todo.pop(next(i for i, (n, _) in enumerate(todo) if n == tn))
                device_map[tn] = device
            if isinstance(node, ModuleNode):
                # offload_buffers=False: an offloaded module's buffers will sit on the execution GPU
                buffers[device] = buffers.get(device, 0) + _buffer_bytes(node)
            continue
        if tied_params and used[device] + size <= cap:
            # the module alone fits: try to split a tied module instead
            split = False
            for tn, tnode in zip(tied_names, tied_nodes):
                if not _children(tnode) or tnode.cls in no_split:
                    continue
                kids = _direct(tn, tnode)
                ti = [i for i, (n, _) in enumerate(todo) if n == tn][0]
                todo = [(name, node)] + todo[:ti] + kids + todo[ti + 1:]
                max_layer, max_names = refresh()
                split = True
                break
            if split:
                continue
        if isinstance(node, ModuleNode) and node.children and node.cls not in no_split:
            # split: the module's parameters and children take its place
            todo = _direct(name, node) + todo
            max_layer, max_names = refresh()
            continue
        # cannot split: the rest goes to the next device, the reserve stays counted on this one
        used[device] += reserved
        current += 1
        todo = [(name, node)] + todo
    return _Walk(device_map=device_map, first_reserve=first_reserve, used={str(k): v for k, v in used.items()},
                 offloaded_buffers=buffers.get("cpu", 0) + buffers.get("disk", 0))


def clean_device_map(device_map: dict[str, Device], module_name: str = "") -> dict[str, Device]:
    """accelerate 1.15 utils/modeling.py:871 `clean_device_map`: a module whose keys all share one
    device becomes one key, recursively from the root."""
    prefix = "" if module_name == "" else f"{module_name}."
    values = [v for k, v in device_map.items() if k.startswith(prefix)]
    if len(set(values)) == 1 and len(values) > 1:
        for k in [k for k in device_map if k.startswith(prefix)]:
            del device_map[k]
        device_map[module_name] = values[0]
    children = [k for k in device_map if k.startswith(prefix) and len(k) > len(module_name)]
    idx = len(module_name.split(".")) + 1 if module_name else 1
    # accelerate iterates a set here; the result's content does not depend on the order
    for child in sorted(set(".".join(k.split(".")[:idx]) for k in children)):
        clean_device_map(device_map, module_name=child)
    return device_map


# --- the result ------------------------------------------------------------------------------------

class DevicePlacement(BaseModel):
    """What one device holds: the device-map keys placed on it, the decoder layers among them, the
    bytes of their parameters and buffers (weights), and the max_memory budget placement used
    (rounded down to whole bytes where a 0.9 factor made it fractional; None for disk)."""

    device: Device
    modules: tuple[str, ...]
    layers: tuple[int, ...]
    weight_bytes: int
    budget_bytes: int | None


class DeviceMapPlan(BaseModel):
    model_name: str
    strategy: Strategy
    dtype: DType
    quantization: BnbQuant | None
    # module name -> device, exactly as from_pretrained's `model.hf_device_map`
    device_map: dict[str, Device]
    devices: tuple[DevicePlacement, ...]  # GPUs in order, then cpu, then disk; only devices holding modules
    # the device of each decoder layer, by layer index (where the lead adds KV cache and activations)
    layer_devices: tuple[Device, ...]
    layers_prefix: str = "model.layers"  # the decoder layers' ModuleList (ModuleTree.layers_prefix)
    # the GPU holding the most weight bytes (the lowest index on a tie), None when no GPU holds any
    busiest_gpu: int | None
    # the room kept on GPU 0 (and the cpu) for the largest layer when the walk started (max_layer_size)
    reserve_bytes: int
    max_memory: dict[str, int]  # the budgets infer_auto_device_map got, floored, keyed "0", "1", ..., "cpu"
    total_weight_bytes: int
    # Buffers of the modules placed on the cpu or disk: from_pretrained dispatches with
    # offload_buffers=False, so accelerate's dispatch_model keeps them on the execution GPU; and
    # whether they fit a GPU's max_memory beside what it holds (else accelerate warns of an OOM)
    offloaded_buffer_bytes: int = 0
    offloaded_buffers_fit: bool = True
    # Why from_pretrained raises instead of loading with this map, None when it loads: bitsandbytes
    # refuses modules on the cpu or disk beside GPUs (quantizer_bnb_4bit.py / quantizer_bnb_8bit.py
    # validate_environment, without llm_int8_enable_fp32_cpu_offload)
    refusal: str | None = None

    def device_of(self, name: str) -> Device:
        """The device of module or parameter `name` (accelerate's _get_param_device: its own key or the
        nearest parent's)."""
        n = name
        while True:
            if n in self.device_map:
                return self.device_map[n]
            if n == "":
                raise MemplanInputError(f"module {name!r} is not in the device map")
            n = n.rsplit(".", 1)[0] if "." in n else ""


def _floor(b: Budget) -> int:
    return math.floor(b)


def _bytes(b: Budget) -> int:
    return math.ceil(b)


def place(arch: ModelArch, max_memory: MaxMemory | list[int], strategy: Strategy = "auto",
          dtype: DType | str = DType.bf16, quantization: BnbQuant | None = None) -> DeviceMapPlan:
    """The device map `from_pretrained(device_map=strategy, max_memory=..., dtype=...)` computes in
    transformers 5.23 (integrations/accelerate.py `_get_device_map`). `max_memory`: a MaxMemory, or
    a list of per-GPU bytes as a user would pass {0: b0, 1: b1, ...} (no "cpu" key: what does not
    fit goes to "disk"); `derived_max_memory` gives the one transformers derives when none is passed.
    `quantization`: bitsandbytes 4- or 8-bit loading (the quantizer's element size and its
    adjust_max_memory x 0.90)."""
    if strategy not in STRATEGIES:
        raise MemplanInputError(f"strategy {strategy!r} is not a device_map strategy; allowed: {', '.join(STRATEGIES)}")
    if not isinstance(max_memory, MaxMemory):
        try:
            max_memory = MaxMemory(gpus=tuple(max_memory))
        except (TypeError, ValueError) as exc:
            raise MemplanInputError(f"max_memory {max_memory!r}: give each GPU's bytes as a list of integers ({exc})") from None
    d = _dtype(dtype)
    tree = module_tree(arch, d, quantization)
    mm = max_memory.as_dict()
    if strategy != "sequential":
        mm = _get_balanced_memory(tree, mm, max_memory.from_user, low_zero=strategy == "balanced_low_0")
    if quantization is not None:
        # quantizer_bnb_4bit.py / quantizer_bnb_8bit.py adjust_max_memory: "need more space for
        # buffers that are created during quantization"
        mm = {k: v * 0.90 for k, v in mm.items()}
    walk = _infer_auto_device_map(tree, mm)
    device_map = clean_device_map(dict(walk.device_map))
    # infer_auto_device_map's check before its warning: do the offloaded modules' buffers fit some
    # GPU beside what the walk put there (reserves included)?
    fits = walk.offloaded_buffers == 0 or any(
        m >= walk.offloaded_buffers + walk.used.get(str(g), 0) for g, m in mm.items() if isinstance(g, int))
    sizes, _ = module_sizes(tree, only_modules=False)
    plan_devices = []
    order = [d for d in mm if isinstance(d, int)] + ["cpu", "disk"]
    layer_devs = _layer_devices(tree, device_map)
    for dev in order:
        keys = tuple(k for k, v in device_map.items() if v == dev)
        if not keys:
            continue
        plan_devices.append(DevicePlacement(
            device=dev, modules=keys, layers=tuple(i for i, ld in enumerate(layer_devs) if ld == dev),
            weight_bytes=_bytes(sum(sizes.get(k, 0) for k in keys)),
            budget_bytes=None if dev == "disk" else _floor(mm[dev])))
    gpu_rows = [p for p in plan_devices if isinstance(p.device, int) and p.weight_bytes > 0]
    busiest = max(gpu_rows, key=lambda p: (p.weight_bytes, -p.device)).device if gpu_rows else None
    refusal = None
    values = set(device_map.values())
    if quantization is not None and values != {"cpu"} and ("cpu" in values or "disk" in values):
        refusal = (f"transformers refuses to load a {quantization} model with modules on the cpu or disk "
                   "beside GPUs (bitsandbytes validate_environment): more GPU memory is needed")
    return DeviceMapPlan(
        refusal=refusal,
        model_name=arch.name, strategy=strategy, dtype=d, quantization=quantization, device_map=device_map,
        devices=tuple(plan_devices), layer_devices=layer_devs, layers_prefix=tree.layers_prefix, busiest_gpu=busiest, reserve_bytes=_bytes(walk.first_reserve),
        offloaded_buffer_bytes=_bytes(walk.offloaded_buffers), offloaded_buffers_fit=fits,
        max_memory={str(k): _floor(v) for k, v in mm.items()}, total_weight_bytes=_bytes(sizes[""]))


def _layer_devices(tree: ModuleTree, device_map: dict[str, Device]) -> tuple[Device, ...]:
    out = []
    for i in range(tree.layers):
        n = f"{tree.layers_prefix}.{i}"
        while n not in device_map:
            n = n.rsplit(".", 1)[0] if "." in n else ""
            if n == "" and "" not in device_map:
                raise AssertionError(f"decoder layer {i} is not in the device map")  # the walk places every module
        out.append(device_map[n])
    return tuple(out)
