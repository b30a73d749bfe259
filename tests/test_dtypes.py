from memplan.dtypes import DType, linear_weight_bytes


def test_nf4_without_double_quant_is_half_byte_plus_fp32_absmax_per_64():
    n = 4096 * 4096
    assert linear_weight_bytes(4096, 4096, DType.nf4, double_quant=False) == n // 2 + 4 * (n // 64)
    # 0.5 + 4/64 = 0.5625 bytes per parameter
    assert linear_weight_bytes(4096, 4096, DType.nf4, double_quant=False) / n == 0.5625


def test_nf4_double_quant_is_half_byte_plus_8bit_absmax_plus_fp32_per_256_blocks():
    n = 4096 * 4096
    blocks = n // 64
    expected = n // 2 + blocks + 4 * (blocks // 256) + 4  # + the fp32 offset of the nested state
    assert linear_weight_bytes(4096, 4096, DType.nf4, double_quant=True) == expected
    assert abs(expected / n - (0.5 + 1 / 64 + 4 / 16384)) < 1e-6


def test_int8_is_one_byte_plus_fp32_scale_per_row():
    assert linear_weight_bytes(11008, 4096, DType.int8, double_quant=False) == 11008 * 4096 + 4 * 11008


def test_float_dtypes():
    assert linear_weight_bytes(10, 20, DType.fp32, False) == 800
    assert linear_weight_bytes(10, 20, DType.bf16, False) == 400
