from memplan.dtypes import CODE_4BIT, CODE_NESTED, DType, linear_weight_bytes


def test_nf4_without_double_quant_is_half_byte_plus_fp32_absmax_per_64():
    n = 4096 * 4096
    assert linear_weight_bytes(4096, 4096, DType.nf4, double_quant=False) == n // 2 + 4 * (n // 64) + CODE_4BIT
    # 0.5 + 4/64 = 0.5625 bytes per parameter, plus a 64-byte code table
    assert abs(linear_weight_bytes(4096, 4096, DType.nf4, double_quant=False) / n - 0.5625) < 1e-5


def test_nf4_double_quant_is_half_byte_plus_8bit_absmax_plus_fp32_per_256_blocks():
    n = 4096 * 4096
    blocks = n // 64
    # + the fp32 offset and the two code tables of the nested state
    expected = n // 2 + blocks + 4 * (blocks // 256) + 4 + CODE_4BIT + CODE_NESTED
    assert linear_weight_bytes(4096, 4096, DType.nf4, double_quant=True) == expected
    assert abs(expected / n - (0.5 + 1 / 64 + 4 / 16384)) < 1e-4  # tables add 1088 B per weight


def test_int8_is_one_byte_plus_fp32_scale_per_row():
    assert linear_weight_bytes(11008, 4096, DType.int8, double_quant=False) == 11008 * 4096 + 4 * 11008


def test_float_dtypes():
    assert linear_weight_bytes(10, 20, DType.fp32, False) == 800
    assert linear_weight_bytes(10, 20, DType.bf16, False) == 400


def test_4bit_storage_matches_bitsandbytes():
    torch = __import__("pytest").importorskip("torch")
    bnb = __import__("pytest").importorskip("bitsandbytes")
    from memplan.validate.worker import _quant_state_tensors

    for dq in (False, True):
        w = torch.randn(384, 256, dtype=torch.bfloat16)
        p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=dq).to("cpu")
        real = p.untyped_storage().nbytes() + sum(t.untyped_storage().nbytes() for t in _quant_state_tensors(p.quant_state))
        assert real == linear_weight_bytes(384, 256, DType.nf4, double_quant=dq)
