"""Pre-quantized checkpoints (planner/prequantized.py): weight storage per format by hand on Llama-2-7B's
shapes, bad quantization_config values in one line, and the jobs a checkpoint cannot run.

Llama-2-7B per layer: q, k, v, o 4096 x 4096; gate, up 4096 -> 11008; down 11008 -> 4096; 32 layers.
Outside the blocks (compute dtype, 2 B): embedding and head 32000 x 4096 each, 65 RMSNorms of 4096:
262,144,000 + 262,144,000 + 532,480 = 524,820,480 B."""

import json

import pytest

from memplan import Job, count_params, estimate_memory
from memplan.architecture import LinearSpec, arch_from_hf_config
from memplan.errors import MemplanInputError
from memplan.prequantized import QuantSpec, linear_storage_bytes
from memplan.profiles import load_hf_config, load_model, shipped_models

REST = 524_820_480
SQ = LinearSpec(name="q_proj", d_in=4096, d_out=4096)
UP = LinearSpec(name="up_proj", d_in=4096, d_out=11008)
DOWN = LinearSpec(name="down_proj", d_in=11008, d_out=4096)


def _weights(model: str, **kw) -> int:
    job = Job(model=model, task="infer", compute_dtype="fp16", **kw)
    return next(c.bytes for c in estimate_memory(job, load_model(model)).components if c.name == "weights")


def _with_quant(qc: dict, base: str = "llama-2-7b") -> dict:
    _, cfg = load_hf_config(base)
    return {**cfg, "quantization_config": qc}


def test_gptq_by_hand():
    g = QuantSpec(method="gptq", bits=4, group_size=128)
    # qweight int32 [4096*4/32, out], qzeros int32 [32 groups, out*4/32], scales fp16 [32, out], g_idx int32 [in]
    assert linear_storage_bytes(g, SQ, 2) == 512 * 4096 * 4 + 32 * 512 * 4 + 32 * 4096 * 2 + 4096 * 4 == 8_732_672
    assert linear_storage_bytes(g, UP, 2) == 512 * 11008 * 4 + 32 * 1376 * 4 + 32 * 11008 * 2 + 4096 * 4 == 23_441_408
    assert linear_storage_bytes(g, DOWN, 2) == 1376 * 4096 * 4 + 86 * 512 * 4 + 86 * 4096 * 2 + 11008 * 4 == 23_469_056
    layer = 4 * 8_732_672 + 2 * 23_441_408 + 23_469_056
    assert _weights("llama-2-7b-gptq") == 32 * layer + REST == 3_893_862_400
    # group_size -1: one group over all input rows; 8 bits: 4 values per int32
    one = QuantSpec(method="gptq", bits=8, group_size=None)
    assert linear_storage_bytes(one, SQ, 2) == 1024 * 4096 * 4 + 1 * 1024 * 4 + 1 * 4096 * 2 + 4096 * 4
    # 3 bits: ceil(4096 * 3 / 32) = 384 rows of qweight
    assert linear_storage_bytes(QuantSpec(method="gptq", bits=3, group_size=128), SQ, 2) == (
        384 * 4096 * 4 + 32 * 384 * 4 + 32 * 4096 * 2 + 4096 * 4)


def test_awq_by_hand():
    a = QuantSpec(method="awq", bits=4, group_size=128)
    # qweight int32 [in, out/8], qzeros int32 [in/128, out/8], scales fp16 [in/128, out]
    assert linear_storage_bytes(a, SQ, 2) == 4096 * 512 * 4 + 32 * 512 * 4 + 32 * 4096 * 2 == 8_716_288
    assert linear_storage_bytes(a, UP, 2) == 4096 * 1376 * 4 + 32 * 1376 * 4 + 32 * 11008 * 2 == 23_425_024
    assert linear_storage_bytes(a, DOWN, 2) == 11008 * 512 * 4 + 86 * 512 * 4 + 86 * 4096 * 2 == 23_425_024
    assert _weights("llama-2-7b-awq") == 32 * (4 * 8_716_288 + 3 * 23_425_024) + REST == 3_889_307_648


def test_fp8_and_fbgemm_by_hand():
    blk = QuantSpec(method="fp8", bits=8, block=(128, 128), scale_strategy="block")
    # fp8 weight + one fp32 scale_inv per 128 x 128 block
    assert linear_storage_bytes(blk, SQ, 2) == 4096 * 4096 + 32 * 32 * 4
    assert linear_storage_bytes(blk, UP, 2) == 4096 * 11008 + 86 * 32 * 4
    assert linear_storage_bytes(blk, DOWN, 2) == 4096 * 11008 + 32 * 86 * 4
    fb = QuantSpec(method="fbgemm_fp8", bits=8, scale_strategy="channel")
    # fp8 weight, fp32 [out, 1] scale, the 4-byte input_scale_ub buffer
    assert linear_storage_bytes(fb, SQ, 2) == 4096 * 4096 + 4096 * 4 + 4
    cfg = _with_quant({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic", "fmt": "e4m3"})
    arch = arch_from_hf_config(cfg, "llama-2-7b-fp8")
    w = next(c.bytes for c in estimate_memory(Job(model="llama-2-7b", task="infer"), arch).components if c.name == "weights")
    per = 4 * (4096 * 4096 + 32 * 32 * 4) + 3 * (4096 * 11008 + 86 * 32 * 4)
    assert w == 32 * per + REST


def test_mxfp4_by_hand():
    # gpt-oss-20b's experts: 32 x gate_up (2880 -> 5760, bias) and down (2880 -> 2880, bias)
    mx = QuantSpec(method="mxfp4", bits=4)
    gate_up = LinearSpec(name="experts.gate_up_proj", d_in=2880, d_out=5760, bias=True, module="fused experts", copies=32)
    down = LinearSpec(name="experts.down_proj", d_in=2880, d_out=2880, bias=True, module="fused experts", copies=32)
    # blocks: out x in/2 bytes; scales: out x in/32 bytes (E8M0); biases fp32
    assert linear_storage_bytes(mx, gate_up, 2) == 32 * (5760 * 1440 + 5760 * 90 + 5760 * 4) == 282_746_880
    assert linear_storage_bytes(mx, down, 2) == 32 * (2880 * 1440 + 2880 * 90 + 2880 * 4)


def test_bitsandbytes_checkpoint_is_the_bitsandbytes_job():
    cfg = _with_quant({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                       "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"})
    arch = arch_from_hf_config(cfg, "llama-2-7b-bnb")
    pre = estimate_memory(Job(model="llama-2-7b", method="qlora"), arch)
    plain = estimate_memory(Job(model="llama-2-7b", method="qlora"), load_model("llama-2-7b"))
    assert [p.allocated_bytes for p in pre.phases] == [p.allocated_bytes for p in plain.phases]
    # a checkpoint without double quantization counts its own (larger) absmax
    single = arch_from_hf_config(_with_quant({"quant_method": "bitsandbytes", "load_in_4bit": True,
                                              "bnb_4bit_quant_type": "nf4"}), "x")
    assert estimate_memory(Job(model="llama-2-7b", task="infer"), single).peak_allocated_bytes == estimate_memory(
        Job(model="llama-2-7b", task="infer", weight_dtype="nf4", double_quant=False), load_model("llama-2-7b")
    ).peak_allocated_bytes
    with pytest.raises(MemplanInputError, match="its weights are nf4, not --weight-dtype int8"):
        estimate_memory(Job(model="llama-2-7b", task="infer", weight_dtype="int8"), arch)


def test_skip_modules_stay_in_the_compute_dtype():
    cfg = _with_quant({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                       "modules_to_not_convert": ["down_proj"]})
    arch = arch_from_hf_config(cfg, "x")
    w = next(c.bytes for c in estimate_memory(Job(model="llama-2-7b", task="infer", compute_dtype="fp16"), arch
                                              ).components if c.name == "weights")
    assert w == 32 * (4 * 8_716_288 + 2 * 23_425_024 + 11008 * 4096 * 2) + REST


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "bits": 5}, "quantization_config.bits must be one of 2, 3, 4, 8, got 5"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "quantization_config.group_size must be -1"),
    ({"quant_method": "awq", "bits": 3, "group_size": 128}, "quantization_config.bits must be one of 4, got 3"),
    ({"quant_method": "foo"}, "quantization_config.quant_method must be one of gptq, awq"),
    ({"bits": 4}, "quantization_config.quant_method is missing"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "quantization_config.weight_block_size must be two"),
    ({"quant_method": "bitsandbytes"}, "exactly one must be true"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
     "bnb_4bit_quant_type must be one of nf4, fp4"),
    ({"quant_method": "gptq", "bits": 4, "desc_act": "yes"}, "quantization_config.desc_act must be true or false"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4}}}},
     "FP8 weights"),
])
def test_bad_values_are_one_line(qc, message):
    with pytest.raises(MemplanInputError) as err:
        arch_from_hf_config(_with_quant(qc), "bad")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_jobs_the_checkpoint_cannot_run():
    arch = load_model("llama-2-7b-gptq")
    with pytest.raises(MemplanInputError, match="already quantized .* use --method lora"):
        estimate_memory(Job(model="llama-2-7b-gptq", method="qlora"), arch)
    with pytest.raises(MemplanInputError, match="not as --weight-dtype fp16"):
        estimate_memory(Job(model="llama-2-7b-awq", task="infer", weight_dtype="fp16", compute_dtype="fp16"), load_model("llama-2-7b-awq"))
    with pytest.raises(MemplanInputError, match="cannot be trained"):
        estimate_memory(Job(model="llama-2-7b-gptq"), arch)


def test_lora_over_gptq_saves_dequantized_weights():
    """TorchQuantLinear multiplies by a dequantized copy that autograd saves (derived, unchecked): with
    checkpointing only the recomputed layer holds them, one layer's 7 linears in fp16."""
    arch = load_model("llama-2-7b-gptq")
    kw = dict(method="lora", compute_dtype="fp16", gradient_checkpointing=True)
    g = estimate_memory(Job(model="llama-2-7b-gptq", **kw), arch)
    a = estimate_memory(Job(model="llama-2-7b-awq", **kw), load_model("llama-2-7b-awq"))
    rec = {c.name: c.bytes for c in g.components}["recomputed layer"]
    rec_awq = {c.name: c.bytes for c in a.components}["recomputed layer"]
    assert rec - rec_awq == (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2


def test_shipped_configs():
    for name, q in (("llama-2-7b-gptq", "gptq"), ("llama-2-7b-awq", "awq"), ("llama-3.1-8b-instruct-awq", "awq")):
        arch = load_model(name)
        assert arch.quantization.method == q and arch.quantization.bits == 4 and arch.quantization.group_size == 128
    # Llama-3.1-8B AWQ: 32 x (q 4096x4096, k/v 4096x1024, o 4096x4096, 3 MLP 4096 <-> 14336) + 2 x 128256 x 4096
    assert _weights("llama-3.1-8b-instruct-awq") == 5_727_854_592


def test_gptq_modules_in_block_to_quantize():
    """optimum's convert_model keeps only the listed block linears: the MLP here stays in fp16."""
    cfg = _with_quant({"quant_method": "gptq", "bits": 4, "group_size": 128,
                       "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                        ["self_attn.o_proj"]]})
    arch = arch_from_hf_config(cfg, "x")
    w = next(c.bytes for c in estimate_memory(Job(model="llama-2-7b", task="infer", compute_dtype="fp16"), arch
                                              ).components if c.name == "weights")
    assert w == 32 * (4 * 8_732_672 + 3 * 4096 * 11008 * 2) + REST


def test_awq_gemv_layout():
    """gemv pads the groups to a multiple of 8 (utils/gemv.py calculate_zeros_width): 86 groups -> 88."""
    v = QuantSpec(method="awq", bits=4, group_size=128, version="gemv")
    assert linear_storage_bytes(v, SQ, 2) == 4096 * 512 * 4 + 4096 * 4 * 4 + 4096 * 32 * 2
    assert linear_storage_bytes(v, DOWN, 2) == 4096 * 1376 * 4 + 4096 * 11 * 4 + 4096 * 88 * 2


def test_compressed_tensors_fp8():
    group = {"group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "channel",
                                                            "symmetric": True, "dynamic": False}}}
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": group,
          "ignore": ["lm_head"], "quantization_status": "compressed"}
    dense = arch_from_hf_config(_with_quant(qc), "x")
    job = Job(model="llama-2-7b", task="infer")
    # decompressed on the first forward pass: the dense model's bytes
    assert estimate_memory(job, dense).peak_allocated_bytes == estimate_memory(job, load_model("llama-2-7b")).peak_allocated_bytes
    fast = arch_from_hf_config(_with_quant({**qc, "use_optimized_inference": True}), "x")
    w = next(c.bytes for c in estimate_memory(job, fast).components if c.name == "weights")
    # CompressedTensorsFP8Linear: fp8 weight + fp32 weight_scale [1, out]
    assert w == 32 * (4 * (4096 * 4096 + 4 * 4096) + 2 * (4096 * 11008 + 4 * 11008) + (4096 * 11008 + 4 * 4096)) + REST
    with pytest.raises(MemplanInputError, match="inference only"):
        estimate_memory(Job(model="llama-2-7b", method="lora"), fast)


def test_mxfp4_and_fp8_experts_in_the_weights_row():
    """Fused 3-D experts (Mixtral's shapes, standing in for gpt-oss): MXFP4 converts the experts only,
    finegrained FP8 the experts and the attention; the router stays in the compute dtype."""
    _, cfg = load_hf_config("mixtral-8x7b")
    total = 46_702_792_704
    experts = 32 * 8 * (4096 * 28672 + 14336 * 4096)
    mx = arch_from_hf_config({**cfg, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}, "x")
    job = Job(model="mixtral-8x7b", task="infer")
    w = next(c.bytes for c in estimate_memory(job, mx).components if c.name == "weights")
    per_layer = 8 * (28672 * 4096 // 2 + 28672 * 128 + 4096 * 14336 // 2 + 4096 * 448)
    assert w == 32 * per_layer + (total - experts) * 2
    fp8 = arch_from_hf_config({**cfg, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "x")
    w = next(c.bytes for c in estimate_memory(job, fp8).components if c.name == "weights")
    attn = 2 * (4096 * 4096 + 32 * 32 * 4) + 2 * (1024 * 4096 + 8 * 32 * 4)
    moe = 8 * (28672 * 4096 + 224 * 32 * 4 + 4096 * 14336 + 32 * 112 * 4)
    attn_params = 2 * 4096 * 4096 + 2 * 1024 * 4096
    assert w == 32 * (attn + moe) + (total - experts - 32 * attn_params) * 2
    with pytest.raises(MemplanInputError, match="MXFP4 experts do not train"):
        estimate_memory(Job(model="mixtral-8x7b", method="lora"), mx)


def test_lora_over_gptq_without_checkpointing():
    """Every layer keeps its dequantized weights, except the first layer's q, k, v: their input (the
    frozen embedding's norm) needs no gradient, so matmul saves no weight for them."""
    kw = dict(method="lora", compute_dtype="fp16")
    acts = {m: {c.name: c.bytes for c in estimate_memory(Job(model=m, **kw), load_model(m)).components}["activations"]
            for m in ("llama-2-7b-gptq", "llama-2-7b-awq")}
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert acts["llama-2-7b-gptq"] - acts["llama-2-7b-awq"] == (32 * layer - 3 * 4096 * 4096) * 2


def test_every_shipped_prequantized_config_splits_its_parameters():
    """The converted linears and the rest add up to the model's parameters for every shipped
    checkpoint with a quantization_config, DeepSeek-V3's first dense layers included (their dense
    MLP is converted, not the routed experts they do not have)."""
    from memplan.prequantized import quantized_layer_bytes

    seen = 0
    for hub_id in shipped_models():
        arch = load_model(hub_id)
        if arch.quantization is None:
            continue
        seen += 1
        _, q_params = quantized_layer_bytes(arch.quantization, arch, 2)
        assert 0 < q_params < count_params(arch).total, hub_id
    assert seen >= 6  # GPTQ, two AWQ, gpt-oss x 2, DeepSeek-V3
    # DeepSeek-V3 by hand: 3 dense layers (MLA + a dense MLP of 18,432) and 58 routed ones (MLA, 256
    # routed experts and one shared of 2,048); every projection but the routers is converted
    arch = load_model("deepseek-v3")
    h, mla = 7168, 128 * 192 * 1536 + 7168 * 1536 + 7168 * 576 + 512 * 128 * (128 + 128) + 128 * 128 * 7168
    dense_mlp, routed_mlp = 3 * 7168 * 18432, (256 + 1) * 3 * 7168 * 2048
    _, q_params = quantized_layer_bytes(arch.quantization, arch, 2)
    assert q_params == 3 * (mla + dense_mlp) + 58 * (mla + routed_mlp) and h == arch.hidden
