"""Bytes per element for every data type memplan knows, and quantized storage.

Sources (docs/memory-model.md cites them in full):
- bitsandbytes `functional.py` (QuantState, `quantize_4bit`): 4-bit weights pack two values per
  byte, blocksize 64, one fp32 absmax per block; with double quantization (`compress_statistics`)
  the absmax values are themselves quantized to 8 bits in blocks of 256 with one fp32 absmax
  (plus a 4-byte offset) per 256 blocks.
- bitsandbytes `Int8Params` / LLM.int8 (Dettmers et al. 2022): int8 weights with one fp32
  scale per output row (`SCB`).
"""

from __future__ import annotations

from enum import Enum


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    nf4 = "nf4"
    fp4 = "fp4"

    @property
    def is_float(self) -> bool:
        return self in (DType.fp32, DType.fp16, DType.bf16)

    @property
    def is_4bit(self) -> bool:
        return self in (DType.nf4, DType.fp4)


FLOAT_BYTES = {DType.fp32: 4, DType.fp16: 2, DType.bf16: 2}

BNB_4BIT_BLOCK = 64
BNB_NESTED_BLOCK = 256
# Each quantized weight carries its own lookup tables: the 16 fp32 NF4/FP4 values, and with
# double quantization the 256-entry fp32 dynamic map of the 8-bit absmax (QuantState.code).
CODE_4BIT = 16 * 4
CODE_NESTED = 256 * 4


def float_bytes(dtype: DType) -> int:
    if dtype not in FLOAT_BYTES:
        raise ValueError(f"{dtype.value} is not a floating-point dtype")
    return FLOAT_BYTES[dtype]


def linear_weight_bytes(rows: int, cols: int, dtype: DType, double_quant: bool) -> int:
    """Storage of one `rows x cols` linear weight (rows = out_features) in `dtype`."""
    n = rows * cols
    if dtype.is_float:
        return n * FLOAT_BYTES[dtype]
    if dtype is DType.int8:
        return n + 4 * rows
    blocks = -(-n // BNB_4BIT_BLOCK)
    packed = -(-n // 2)
    if not double_quant:
        return packed + 4 * blocks + CODE_4BIT
    nested_blocks = -(-blocks // BNB_NESTED_BLOCK)
    return packed + blocks + 4 * nested_blocks + 4 + CODE_4BIT + CODE_NESTED


def bytes_per_param_formula(dtype: DType, double_quant: bool) -> str:
    if dtype.is_float:
        return f"{FLOAT_BYTES[dtype]} B"
    if dtype is DType.int8:
        return "(1 B + 4 B per row)"
    if double_quant:
        return "(0.5 + 1/64 + 4/16384) B"
    return "(0.5 + 4/64) B"
