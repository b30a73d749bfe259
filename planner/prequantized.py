"""Pre-quantized checkpoints: the `quantization_config` of a config.json, and the bytes its weights take.

A checkpoint quantized ahead of time (GPTQ, AWQ, bitsandbytes, FP8, MXFP4) says so in its config's
`quantization_config`; transformers' quantizer for that `quant_method` swaps the model's linears for the
format's module before the weights load, and those modules hold the format's packed tensors. This module
is pure: `parse_quantization` reads the config through ConfigReader-style checks into a `QuantSpec`, and
`linear_storage_bytes` gives the bytes one quantized linear holds per format, each from the source file
its layout comes from (docs/quantization.md):

- GPTQ: gptqmodel 7.7 `nn_modules/qlinear/__init__.py` `GPTQQuantLinear._register_gptq_buffers`:
  qweight int32 [ceil(in*bits/32), out], qzeros int32 [ceil(in/g), ceil(out*bits/32)], scales fp16
  [ceil(in/g), out], g_idx int32 [in] (always registered; desc_act only reorders it), bias fp16 [out];
  group_size -1 is one group of `in` rows (`PackedGroupedQuantLinear.__init__`). transformers
  quantizers/quantizer_gptq.py loads it through optimum 2.3 gptq/quantizer.py `convert_model`: the layers
  `gptq/utils.py get_layers` finds under the blocks' prefix, `type(module) is nn.Linear` exactly (subclasses
  such as routers are skipped; the head is outside the blocks), kept to `modules_in_block_to_quantize`.
- AWQ: gptqmodel `AWQuantLinear.__init__`: qweight int32 [in, ceil(out*bits/32)], qzeros int32
  [in // g, ceil(out*bits/32)], scales fp16 [in // g, out], bias fp16; transformers integrations/awq.py
  `replace_with_awq_linear` converts every `isinstance(module, nn.Linear)` outside modules_to_not_convert
  and the default skips (the output embedding: quantizer_awq.py `get_modules_to_not_convert(...,
  add_default_skips=True)`).
- bitsandbytes: memplan's dtypes.linear_weight_bytes (QuantState / Int8Params), for the linears the stack
  converts (Stack.bnb_converts), minus llm_int8_skip_modules.
- fbgemm_fp8: transformers integrations/fbgemm_fp8.py `FbgemmFp8Linear`: fp8 weight [out, in], fp32
  weight_scale [out, 1], fp32 bias, a 4-byte input_scale_ub buffer; `isinstance(module, nn.Linear)`.
- fp8 (finegrained, DeepSeek-V3's quant_method "fp8"): integrations/finegrained_fp8.py `FP8Linear`: fp8
  weight [out, in], fp32 weight_scale_inv [ceil(out/b0), ceil(in/b1)] (one scalar per tensor without
  weight_block_size), a static activation_scale of one fp32; `type(module) is nn.Linear` and every
  `.experts` module (FP8Experts, fused 3-D stacks with the same per-block scales).
- compressed-tensors (FP8 weight schemes only): transformers quantizers/quantizer_compressed_tensors.py
  leaves the weights compressed at load and compressed-tensors decompresses them on the first forward
  pass, so a run holds them dense in the model dtype; with `use_optimized_inference: true` (inference
  only) they stay fp8 in `CompressedTensorsFP8Linear` (integrations/compressed_tensors.py: fp8 weight
  [out, in], fp32 weight_scale [1, out]). `dequantize: true` loads them dense.
- mxfp4: integrations/mxfp4.py `Mxfp4GptOssExperts`: the fused experts' packed FP4 blocks (two values a
  byte: uint8 [E, out, in/2], the checkpoint's [E, out, in/32, 16]), uint8 scales [E, out, in/32] (one
  E8M0 exponent per 32 values) and fp32 biases; everything else stays in the compute dtype.
  quantizer_mxfp4.py `validate_environment`: without triton >= 3.4 and the `kernels` package, on a GPU
  under compute capability 7.5, or with `dequantize: true`, the experts are dequantized to bf16 on load.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from .errors import MemplanInputError

if TYPE_CHECKING:
    from .architecture import ConfigReader, LinearSpec, ModelArch

QuantMethod = Literal["gptq", "awq", "bitsandbytes", "fbgemm_fp8", "fp8", "compressed-tensors", "mxfp4"]
METHODS: tuple[str, ...] = QuantMethod.__args__  # type: ignore[attr-defined]

# The file each format's storage layout is read from (docs/quantization.md).
SOURCES = {
    "gptq": "gptqmodel 7.7 nn_modules/qlinear/__init__.py GPTQQuantLinear._register_gptq_buffers; optimum 2.3 gptq",
    "awq": "gptqmodel 7.7 nn_modules/qlinear/__init__.py AWQuantLinear; transformers integrations/awq.py",
    "bitsandbytes": "bitsandbytes functional.py QuantState / Int8Params (memplan dtypes.linear_weight_bytes)",
    "fbgemm_fp8": "transformers integrations/fbgemm_fp8.py FbgemmFp8Linear",
    "fp8": "transformers integrations/finegrained_fp8.py FP8Linear / FP8Experts",
    "compressed-tensors": "transformers integrations/compressed_tensors.py CompressedTensorsFP8Linear",
    "mxfp4": "transformers integrations/mxfp4.py Mxfp4GptOssExperts",
}
MXFP4_BLOCK = 32  # values per E8M0 scale (integrations/mxfp4.py: blocks (.., in/32, 16) bytes, scales (.., in/32))


class QuantSpec(BaseModel):
    """A checkpoint's quantization_config, checked and typed."""

    model_config = ConfigDict(frozen=True)

    method: QuantMethod
    bits: int
    # GPTQ/AWQ: input rows per group of scales and zero points; None: one group over all `in` rows (-1)
    group_size: int | None = None
    desc_act: bool = False  # GPTQ act-order: g_idx is stored either way, desc_act only permutes it
    sym: bool = True
    zero_point: bool = True  # AWQ: qzeros are registered either way (AWQuantLinear)
    version: str = "gemm"  # AWQ kernel layout: gemm, or gemv (its own padded layout); others counted as gemm
    bnb_quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    # FP8: [rows, cols] of one fp32 scale block (DeepSeek-V3's weight_block_size); None: per tensor
    block: tuple[int, int] | None = None
    scale_strategy: Literal["tensor", "channel", "block"] = "tensor"
    static_activation: bool = False  # FP8 activation_scheme "static": one fp32 activation scale per linear
    skip: tuple[str, ...] = ()  # modules_to_not_convert / llm_int8_skip_modules / ignore: compute dtype
    # GPTQ modules_in_block_to_quantize (flattened): when given, only block linears whose name ends with one
    only: tuple[str, ...] = ()
    dequantize: bool = False  # MXFP4 (and FP8) `dequantize: true`: the weights load in bf16
    # compressed-tensors without use_optimized_inference: decompressed to the model dtype on the first forward
    decompressed_on_forward: bool = False

    @property
    def source(self) -> str:
        return SOURCES[self.method]

    @property
    def label(self) -> str:
        if self.method in ("gptq", "awq"):
            g = "one group" if self.group_size is None else f"group {self.group_size}"
            return f"{self.method} {self.bits}-bit ({g}{', desc_act' if self.desc_act else ''})"
        if self.method == "bitsandbytes":
            return f"bitsandbytes {self.bnb_quant_type if self.bits == 4 else 'int8'}"
        if self.method in ("fp8", "compressed-tensors", "fbgemm_fp8"):
            scale = (f"{self.block[0]}x{self.block[1]} blocks" if self.block else self.scale_strategy)
            return f"{self.method} (fp8 e4m3, scales per {scale})"
        return "mxfp4 experts" + (" (dequantized to bf16 on load)" if self.dequantize else "")

    @property
    def job_dtype(self):
        """The Job weight dtype that models this checkpoint's storage with memplan's bitsandbytes rules
        (bitsandbytes checkpoints only): nf4/fp4/int8. None for the other formats."""
        from .dtypes import DType

        if self.method != "bitsandbytes":
            return None
        return DType(self.bnb_quant_type) if self.bits == 4 else DType.int8


class _Reader:
    """ConfigReader-style access to the quantization_config object: a bad value is one line naming
    `quantization_config.<key>` and what is allowed."""

    def __init__(self, r: "ConfigReader") -> None:
        self.source = r.source
        self.cfg = r.cfg["quantization_config"]
        if not isinstance(self.cfg, dict):
            self.fail("", f"must be a JSON object, got {self.cfg!r}")

    def fail(self, key: str, message: str):
        where = f"quantization_config.{key}" if key else "quantization_config"
        raise MemplanInputError(f"{self.source}: {where} {message}")

    def get(self, key: str):
        return self.cfg.get(key)

    def choice(self, key: str, allowed: tuple, default=None, *, lower: bool = False):
        v = self.cfg.get(key)
        if v is None:
            if default is None:
                self.fail(key, f"is missing; allowed: {', '.join(map(str, allowed))}")
            return default
        if lower and isinstance(v, str):
            v = v.lower()
        if isinstance(v, bool) or v not in allowed:
            self.fail(key, f"must be one of {', '.join(map(str, allowed))}, got {v!r}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.cfg.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {v!r}")
        return v

    def names(self, *keys: str) -> tuple[str, ...]:
        out: list[str] = []
        for key in keys:
            v = self.cfg.get(key)
            if v is None:
                continue
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                self.fail(key, f"must be a list of module names, got {v!r}")
            out += v
        return tuple(out)


def parse_quantization(r: "ConfigReader") -> QuantSpec | None:
    """The checkpoint's quantization_config as a QuantSpec; None when the config has none."""
    if r.cfg.get("quantization_config") is None:
        return None
    q = _Reader(r)
    method = q.choice("quant_method", METHODS, lower=True)
    if method == "gptq":
        bits = q.choice("bits", (2, 3, 4, 8))
        g = q.get("group_size")
        g = 128 if g is None else g
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
            q.fail("group_size", f"must be -1 (one group) or a positive integer, got {g!r}")
        only = q.get("modules_in_block_to_quantize")
        if only is not None and not (isinstance(only, list) and all(
                isinstance(x, list) and all(isinstance(n, str) for n in x) for x in only)):
            q.fail("modules_in_block_to_quantize", f"must be a list of lists of module names, got {only!r}")
        return QuantSpec(method=method, bits=bits, group_size=None if g == -1 else g,
                         desc_act=q.bool("desc_act", False), sym=q.bool("sym", True),
                         skip=q.names("modules_to_not_convert"), only=tuple(n for x in only or [] for n in x))
    if method == "awq":
        # AwqConfig: bits defaults to 4 (older configs write w_bit)
        bits = q.choice("bits" if q.get("bits") is not None or q.get("w_bit") is None else "w_bit", (4,), default=4)
        g = q.get("group_size") if q.get("group_size") is not None else q.get("q_group_size")
        g = 128 if g is None else g
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
            q.fail("group_size", f"must be a positive integer, got {g!r}")
        version = q.choice("version", ("gemm", "gemv", "gemv_fast", "exllama", "ipex"), default="gemm", lower=True)
        return QuantSpec(method=method, bits=bits, group_size=g, zero_point=q.bool("zero_point", True),
                         version=version, sym=not q.bool("zero_point", True), skip=q.names("modules_to_not_convert"))
    if method == "bitsandbytes":
        four, eight = q.bool("load_in_4bit", False), q.bool("load_in_8bit", False)
        if four == eight:
            q.fail("load_in_4bit", "and load_in_8bit: exactly one must be true")
        return QuantSpec(method=method, bits=4 if four else 8,
                         bnb_quant_type=q.choice("bnb_4bit_quant_type", ("nf4", "fp4"), default="fp4"),
                         double_quant=q.bool("bnb_4bit_use_double_quant", False),
                         skip=q.names("llm_int8_skip_modules"))
    if method == "fbgemm_fp8":
        return QuantSpec(method=method, bits=8, scale_strategy="channel", skip=q.names("modules_to_not_convert"))
    if method == "fp8":
        block = q.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            q.fail("weight_block_size", f"must be two positive integers [rows, cols], got {block!r}")
        act = q.choice("activation_scheme", ("dynamic", "static"), default="dynamic")
        q.choice("fmt", ("e4m3",), default="e4m3")
        return QuantSpec(method=method, bits=8, block=tuple(block) if block else None,
                         scale_strategy="block" if block else "tensor", static_activation=act == "static",
                         skip=q.names("modules_to_not_convert"), dequantize=q.bool("dequantize", False))
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    # mxfp4 (gpt-oss)
    return QuantSpec(method=method, bits=4, skip=q.names("modules_to_not_convert"),
                     dequantize=q.bool("dequantize", False))


def _compressed_tensors(q: _Reader) -> QuantSpec:
    """compressed-tensors: one config group whose weights are 8-bit floats (the FP8 schemes); the
    integer pack-quantized schemes are refused in one line."""
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        q.fail("config_groups", f"must be an object of quantization groups, got {groups!r}")
    if len(groups) != 1:
        q.fail("config_groups", f"with {len(groups)} groups is not modelled: memplan reads one FP8 weight group")
    (name, group), = groups.items()
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict):
        q.fail(f"config_groups.{name}.weights", f"must be an object, got {w!r}")
    if w.get("type") != "float" or w.get("num_bits") != 8:
        q.fail(f"config_groups.{name}.weights", f"type {w.get('type')!r} num_bits {w.get('num_bits')!r} is not "
               "modelled: memplan models compressed-tensors FP8 weights (type float, num_bits 8) only")
    strategy = w.get("strategy", "tensor")
    if strategy not in ("tensor", "channel", "block"):
        q.fail(f"config_groups.{name}.weights.strategy", f"must be one of tensor, channel, block, got {strategy!r}")
    block = w.get("block_structure")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2
                                    and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        q.fail(f"config_groups.{name}.weights.block_structure", f"must be two positive integers, got {block!r}")
    # quantizer_compressed_tensors.py: without use_optimized_inference the weights are decompressed on the
    # first forward pass (dense in the model dtype from then on), as with dequantize
    optimized = q.bool("use_optimized_inference", False) and not q.bool("dequantize", False)
    return QuantSpec(method="compressed-tensors", bits=8, scale_strategy="channel", skip=q.names("ignore"),
                     dequantize=not optimized, decompressed_on_forward=not optimized and not q.bool("dequantize", False))


# --- which linears a format converts ------------------------------------------------------------

def _skipped(spec: QuantSpec, lin: "LinearSpec", layer: int) -> bool:
    """transformers quantizers_utils.py `should_convert_module`: a pattern matches a module path from
    its start (up to a module boundary), as a regex, or as a suffix. memplan's LinearSpec names are the
    module's own; the path is taken as Llama's `model.layers.<i>.self_attn|mlp.<name>` (an approximation
    for families that name their blocks otherwise)."""
    if not spec.skip:
        return False
    parent = "self_attn" if lin.part == "attention" else "mlp"
    path = f"model.layers.{layer}.{parent}.{lin.name}"
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in spec.skip:
        try:
            if re.match(rf"(?:{key}){boundary}", path):
                return True
        except re.error:
            pass
        if path.endswith(key) or lin.name == key:
            return True
    return False


def converts(spec: QuantSpec, lin: "LinearSpec", stack=None) -> bool:
    """Whether the format's loader replaces this block projection (before the skip list)."""
    if spec.dequantize:
        return False
    if spec.method == "mxfp4":
        return lin.module == "fused experts"  # Mxfp4GptOssExperts replaces the experts only
    if spec.method == "bitsandbytes":
        from .stacks import get

        return (stack or get("transformers-5")).bnb_converts(lin)
    if spec.method == "fp8":
        return lin.module in ("Linear", "fused experts")  # type(module) is nn.Linear, and `.experts` modules
    if spec.method == "gptq":  # optimum gptq/utils.py get_layers: `type(module) is nn.Linear`
        return lin.module == "Linear" and (not spec.only or any(
            f"{'self_attn' if lin.part == 'attention' else 'mlp'}.{lin.name}".endswith(n) for n in spec.only))
    return lin.module in ("Linear", "Linear subclass")  # isinstance(module, nn.Linear)


def linear_storage_bytes(spec: QuantSpec, lin: "LinearSpec", compute_bytes: int) -> int:
    """Bytes one layer's `lin` holds in the format (all `copies` of a fused expert stack), bias included."""
    from .dtypes import DType, linear_weight_bytes

    i, o, n = lin.d_in, lin.d_out, lin.copies
    if spec.method == "gptq":
        g = spec.group_size or i
        groups = -(-i // g)
        per = (4 * (-(-i * spec.bits // 32)) * o + 4 * groups * (-(-o * spec.bits // 32)) + 2 * groups * o + 4 * i
               + (2 * o if lin.bias else 0))
    elif spec.method == "awq" and spec.version == "gemv":
        # gptqmodel qlinear/gemv_awq.py AwqGEMVQuantLinear: qweight int32 [out, in/8], qzeros int32 [out, w],
        # scales fp16 [out, 8 w], w = utils/gemv.py calculate_zeros_width (groups padded to a multiple of 8)
        mult = {64: 2, 32: 4, 16: 8}.get(spec.group_size, 1)
        w = -(-(-(-(i // spec.group_size) // 8)) // mult) * mult
        per = 4 * o * (i * spec.bits // 32) + 4 * o * w + 2 * o * w * 8 + (2 * o if lin.bias else 0)
    elif spec.method == "awq":
        groups = i // spec.group_size
        packed_out = -(-o * spec.bits // 32)
        per = 4 * i * packed_out + 4 * groups * packed_out + 2 * groups * o + (2 * o if lin.bias else 0)
    elif spec.method == "bitsandbytes":
        per = linear_weight_bytes(o, i, spec.job_dtype, spec.double_quant) + (compute_bytes * o if lin.bias else 0)
        assert spec.job_dtype in (DType.nf4, DType.fp4, DType.int8)
    elif spec.method == "fbgemm_fp8":
        per = o * i + 4 * o + (4 * o if lin.bias else 0) + 4
    elif spec.method == "compressed-tensors":  # CompressedTensorsFP8Linear: fp32 weight_scale [1, out]
        per = o * i + 4 * o + (compute_bytes * o if lin.bias else 0)
    elif spec.method == "fp8":
        if spec.block:
            scales = (-(-o // spec.block[0])) * (-(-i // spec.block[1]))
        else:
            scales = o if spec.scale_strategy == "channel" else 1
        per = o * i + 4 * scales + (4 if spec.static_activation else 0) + (compute_bytes * o if lin.bias else 0)
    else:  # mxfp4
        per = o * i // 2 + o * (i // MXFP4_BLOCK) + (4 * o if lin.bias else 0)
    return n * per


def quantized_layer_bytes(spec: QuantSpec, arch: "ModelArch", compute_bytes: int, stack=None) -> tuple[int, int]:
    """(bytes of the converted projections over every layer, their parameter count). DeepSeek's first
    dense layers (ModelArch.dense_layers) hold their dense MLP's projections, not the routed ones."""
    total = params = 0
    dense = arch.dense_view().projections if arch.dense_layers else ()
    for layer in range(arch.layers):
        for lin in (dense if layer < arch.dense_layers else arch.projections):
            if converts(spec, lin, stack) and not _skipped(spec, lin, layer):
                total += linear_storage_bytes(spec, lin, compute_bytes)
                params += lin.params
    return total, params


def largest_converted(spec: QuantSpec, arch: "ModelArch", stack=None) -> int:
    """Elements of the largest converted weight (one expert of a fused stack)."""
    return max((lin.d_in * lin.d_out for lin in arch.projections if converts(spec, lin, stack)
                and not _skipped(spec, lin, 0)), default=0)


def converted_per_layer(spec: QuantSpec, arch: "ModelArch", stack=None) -> int:
    """Weight elements of one layer's converted (non-expert) linears."""
    return sum(lin.d_in * lin.d_out * lin.copies for lin in arch.projections
               if converts(spec, lin, stack) and not _skipped(spec, lin, 0))


# --- the job over a pre-quantized checkpoint ---------------------------------------------------

def check_job(job, arch: "ModelArch") -> None:
    """A job that asks for a dtype the checkpoint does not hold is one line (docs/quantization.md)."""
    spec = arch.quantization
    if spec is None or spec.dequantize:
        return
    if spec.method == "bitsandbytes":
        return  # estimate.effective_job maps it onto the bitsandbytes job (weight dtype, double quant)
    held = spec.label
    if job.task == "train" and job.sharding != "none":
        raise MemplanInputError(
            f"sharding a pre-quantized checkpoint ({held}) is not modelled: use --sharding none (one GPU or DDP)")
    if job.weight_dtype is not None:
        raise MemplanInputError(
            f"{arch.name} is a pre-quantized checkpoint ({held}): its weights load as stored, not as "
            f"--weight-dtype {job.weight_dtype.value}; drop --weight-dtype (compute dtype: --compute-dtype)")
    if job.task == "train":
        if job.method == "qlora":
            raise MemplanInputError(
                f"{arch.name} is already quantized ({held}): --method qlora would quantize it again with bitsandbytes; "
                "use --method lora (adapters over the frozen quantized base)")
        if job.method == "full":
            raise MemplanInputError(
                f"{arch.name} is a pre-quantized checkpoint ({held}): its quantized weights cannot be trained; "
                "use --method lora")
        if spec.method == "mxfp4":
            raise MemplanInputError(
                f"{arch.name}'s MXFP4 experts do not train (transformers quantizer_mxfp4.py is_trainable is False): "
                "load it dequantized (a config with quantization_config.dequantize true) to train LoRA on it")
        if spec.method == "compressed-tensors":
            raise MemplanInputError(
                f"{arch.name}: use_optimized_inference runs FP8 kernels for inference only (quantizer_compressed_tensors.py "
                "is_trainable); drop it from the quantization_config to fine-tune (the weights are then decompressed)")
        if spec.method == "fbgemm_fp8":
            raise MemplanInputError(
                f"LoRA over a {spec.method} checkpoint is not modelled (its linears' backward is not read off a "
                "source): use a fp8 (finegrained), GPTQ, AWQ or bitsandbytes checkpoint, or inference")


def effective_job(job, arch: "ModelArch"):
    """A bitsandbytes pre-quantized checkpoint runs as memplan's bitsandbytes job: the checkpoint's
    4/8-bit type and double quantization as the job's weight dtype. A conflicting --weight-dtype is one line."""
    spec = arch.quantization
    if spec is None or spec.method != "bitsandbytes":
        return job
    want = spec.job_dtype
    if job.weight_dtype is not None and job.weight_dtype is not want:
        raise MemplanInputError(
            f"{arch.name} is a pre-quantized bitsandbytes checkpoint ({spec.label}): its weights are {want.value}, "
            f"not --weight-dtype {job.weight_dtype.value}; drop --weight-dtype")
    if job.task == "train" and job.method == ("lora" if want.is_4bit else "qlora"):
        fix = "qlora" if want.is_4bit else "lora"
        raise MemplanInputError(
            f"{arch.name} is a pre-quantized bitsandbytes {want.value} checkpoint: train it with --method {fix}")
    if job.task == "train" and job.method == "full":
        raise MemplanInputError(f"{arch.name} is a pre-quantized bitsandbytes checkpoint ({spec.label}): its "
                                f"{want.value} weights cannot be fully fine-tuned; use --method "
                                f"{'qlora' if want.is_4bit else 'lora'}")
    fields = {**job.model_dump(exclude_unset=True), "weight_dtype": want, "double_quant": spec.double_quant}
    return type(job)(**fields)


def applies(job, arch: "ModelArch") -> bool:
    """Whether the weights row counts the checkpoint's own storage (not bitsandbytes, not dequantized)."""
    spec = arch.quantization
    return spec is not None and not spec.dequantize and spec.method != "bitsandbytes"


def weight_bytes(job, arch: "ModelArch", params, stack) -> tuple[int, str]:
    """The weights row over a pre-quantized checkpoint: the converted projections in the format's storage,
    everything else (embeddings, norms, head, skipped modules, routers) in the compute dtype."""
    from .dtypes import float_bytes
    from .units import count

    spec = arch.quantization
    cb = float_bytes(job.compute_dtype)
    q, q_params = quantized_layer_bytes(spec, arch, cb, stack)
    rest = params.total - q_params
    formula = (f"{count(q_params)} params in {spec.label} storage ({spec.source}) + {count(rest)} others x {cb} B "
               f"({job.compute_dtype.value})")
    return q + rest * cb, formula


def backward_saved_per_layer(job, arch: "ModelArch", act_bytes: int, grad_in: bool = True) -> int:
    """What a LoRA step over the quantized base saves per layer beyond the model's activations. GPTQ's
    trainable kernel (gptqmodel qlinear/torch.py `TorchQuantLinear._forward_eager`: `weights =
    self.dequantize_weight(); torch.matmul(x, weights)`) multiplies by a dequantized copy of the weight, and
    autograd saves that copy for the input gradient: every converted linear's weight, per layer, in the
    activation dtype (derived from the source, not traced). AWQ's (gemm_awq.py AwqGemmFn) and FP8's
    (finegrained_fp8.py FP8LinearFunction) save the packed weight only and dequantize in backward."""
    spec = arch.quantization
    if not (applies(job, arch) and job.uses_lora and spec.method == "gptq"):
        return 0
    if grad_in:
        return converted_per_layer(spec, arch) * act_bytes
    # the first layer without a gradient into its input (frozen embeddings, no checkpointing): matmul saves
    # the weight only where its input requires grad, so the projections reading the layer's input (the
    # attention's, before its output projection, the last attention linear) save none
    attn = [lin for lin in arch.projections if lin.part == "attention"]
    reading_input = {lin.name for lin in attn[:-1]}
    return sum(lin.d_in * lin.d_out * lin.copies for lin in arch.projections
               if converts(spec, lin) and not _skipped(spec, lin, 0) and lin.name not in reading_input) * act_bytes


def dequant_transient(job, arch: "ModelArch", rows: int, grad: bool, compute_bytes: int) -> int:
    """The dequantized weight alive for one matmul of `rows` rows (the largest converted linear):
    - GPTQ inference: Marlin / exllama kernels fuse the dequantization into the matmul: none (gptqmodel
      picks them for inference; from memory, exllama v2 reconstructs a fp16 weight over 50 rows);
      training: TorchQuantLinear's fp16 dequantized weight beside its cast into the compute dtype;
    - AWQ: AwqGemmFn (gemm_awq.py) dequantizes the whole weight and casts it for more than 1,024 rows,
      and again in backward (`awq_dequantize_weights(...).to(grad_output.dtype)`): fp16 and its cast;
    - fp8: FP8LinearFunction.backward `_dequantize_fp8_weight`: the weight in the gradient's dtype;
      the forward's kernels (triton / DeepGEMM) read fp8 directly;
    - mxfp4 / fbgemm / compressed-tensors: fused kernels, none."""
    spec = arch.quantization
    if not applies(job, arch):
        return 0
    largest = largest_converted(spec, arch)
    # the kernels dequantize into fp16 (their scales' dtype); another compute dtype is a cast beside it
    fp16_and_cast = largest * (2 + (0 if job.compute_dtype.value == "fp16" else compute_bytes))
    if spec.method == "gptq":
        return fp16_and_cast if grad else 0
    if spec.method == "awq":
        return fp16_and_cast if (grad or rows > 1024) else 0
    if spec.method == "fp8":
        return largest * compute_bytes if grad else 0
    return 0


def dequant_row(arch: "ModelArch") -> str | None:
    """The dequantized-weight row's text over a pre-quantized checkpoint (None: bitsandbytes' text)."""
    if arch.quantization is None or not applies(None, arch):
        return None
    return {"gptq": "TorchQuantLinear's fp16 dequantized weight (and its cast), the largest linear (training)",
            "awq": "AwqGemmFn dequantizes the largest weight to fp16 (and casts it) over 1,024 rows and in backward",
            "fp8": "FP8LinearFunction.backward dequantizes the largest weight into the gradient's dtype",
            }.get(arch.quantization.method, "fused kernels: no dequantized weight")


def notes(job, arch: "ModelArch") -> list[str]:
    """What an estimate over a pre-quantized checkpoint assumes, in words (Estimate.notes)."""
    from .units import human

    spec = arch.quantization
    if spec is None:
        return []
    if spec.decompressed_on_forward:
        return [f"{arch.name}: compressed-tensors decompresses the weights on the first forward pass "
                "(quantizer_compressed_tensors.py, without use_optimized_inference), so they are counted dense in "
                f"{job.compute_dtype.value}; use_optimized_inference: true keeps FP8 weights (inference, SM89+)"]
    if spec.dequantize:
        return [f"{arch.name}: quantization_config.dequantize is true: the {spec.method} weights are dequantized on "
                f"load and counted in {job.compute_dtype.value}"]
    if spec.method == "bitsandbytes":
        out = [f"{arch.name} is a pre-quantized bitsandbytes checkpoint: counted as {spec.job_dtype.value} weights"
               f"{' with double quantization' if spec.double_quant else ''}, as its quantization_config says"]
        skipped = sorted({lin.name for lin in arch.projections
                          if any(_skipped(spec, lin, i) for i in range(arch.layers))})
        if skipped:
            out.append(f"llm_int8_skip_modules names block linears ({', '.join(skipped)}): memplan's bitsandbytes rows "
                       "count them quantized, so the weights are under-counted by their 16-bit share")
        return out
    out = [f"{arch.name} is a pre-quantized {spec.label} checkpoint: the converted linears hold the format's storage "
           f"({spec.source}); embeddings, norms, the head and skipped modules stay in {job.compute_dtype.value}"]
    if spec.method == "awq" and job.compute_dtype.value == "bf16":
        out.append("transformers' AWQ quantizer loads bf16 as fp16 on CUDA (quantizer_awq.py update_dtype): the same "
                   "bytes; --compute-dtype fp16 names what runs")
    if spec.method in ("gptq", "awq") and job.task == "infer":
        out.append("inference kernels assumed: GPTQ's Marlin/exllama fuse the dequantization into the matmul (no "
                   "dequantized weight counted); AWQ's GEMM kernel dequantizes the whole weight for more than 1,024 "
                   "rows (gemm_awq.py AwqGemmFn: counted)")
    if job.uses_lora:
        if spec.method == "gptq":
            out.append("LoRA over GPTQ runs gptqmodel's TorchQuantLinear (the trainable kernel), whose forward "
                       "multiplies by a dequantized weight that autograd keeps for backward: each layer saves its "
                       "linears' weights in the activation dtype (derived from qlinear/torch.py, not traced)")
        else:
            out.append(f"LoRA over {spec.method}: the backward dequantizes one weight at a time for the input "
                       "gradient (derived from the kernel's autograd function, not traced)")
            rest = count_rest(job, arch)
            out.append(f"peft's prepare_model_for_kbit_training, if called, casts the non-quantized parameters of a "
                       f"{spec.method} base to fp32 (peft utils/other.py; skipped for GPTQ): +{human(rest * 2)} of "
                       "weights and an fp32 residual stream, not counted here")
        if not job.checkpointing:
            out.append("prepare_model_for_kbit_training turns gradient checkpointing on: pass --gradient-checkpointing "
                       "to estimate that run")
    if spec.method == "fp8":
        from .params import count_params

        out.append("FP8 weights stay fp8 on GPUs of compute capability >= 8.9 (4090, L4, H100, ...); below it (A100, "
                   "V100, T4) and without a GPU transformers dequantizes them to bf16 on load (quantizer_finegrained_fp8.py "
                   f"validate_environment): {human(count_params(arch).total * 2)} of weights (a config with "
                   "quantization_config.dequantize true)")
    if spec.method == "mxfp4":
        from .params import count_params

        bf16 = count_params(arch).total * 2
        out.append(f"MXFP4 needs triton >= 3.4, the `kernels` package and compute capability >= 7.5 "
                   f"(quantizer_mxfp4.py validate_environment); without them transformers dequantizes the experts to "
                   f"bf16 on load: {human(bf16)} of weights (a config with quantization_config.dequantize true)")
    return out


def count_rest(job, arch: "ModelArch") -> int:
    """Parameters outside the converted linears (compute dtype)."""
    from .params import count_params

    _, q_params = quantized_layer_bytes(arch.quantization, arch, 2)
    return count_params(arch).total - q_params
