"""The worked examples of docs/worked-examples.md, recomputed by memplan."""

import math

from memplan import Job, estimate, estimate_memory
from memplan.fit import DEFAULT_SAFETY_MARGIN
from memplan.overhead import FRAGMENTATION
from memplan.recommend import GPU_COUNTS, recommend
from memplan.profiles import load_gpu, load_model

GB = 10**9
GIB = 2**30


def _component(est, name):
    return est.component(name).bytes


def _starcoder_sharded(k, **kw):
    return Job(model="starcoder", method="full", weight_dtype="fp32", compute_dtype="bf16", num_gpus=k, sharding="fsdp_full",
               **kw)


def _fewest_gpus(arch, gpu, room, most=64, **kw):
    for k in range(1, most + 1):
        if estimate_memory(_starcoder_sharded(k, **kw), arch, gpu).device_used_bytes <= room:
            return k
    raise AssertionError("nothing fits")


def test_full_finetune_mixed_precision_adam_is_16_bytes_per_param():
    # HF Trainer bf16=True on fp32 weights: 4 (weights) + 4 (grads) + 8 (two fp32 Adam states)
    est = estimate("starcoder", method="full", weight_dtype="fp32", compute_dtype="bf16")
    n = est.params.total
    state = _component(est, "weights") + _component(est, "gradients") + _component(est, "optimizer states")
    assert state == 16 * n
    assert round(state / GB) == 248  # 15.5B x 16 B
    # The rule: spread evenly over k GPUs (FSDP full shard), plus the CUDA context and allocator slack,
    # 4 x A100-80GB (80 GiB each) would suffice before any activation.
    arch, a100 = load_model("starcoder"), load_gpu("A100-80GB")

    def rule(k):
        share = math.ceil(state / k)
        return share + int(share * FRAGMENTATION) + a100.workspace_bytes + a100.cuda_context_bytes

    assert rule(3) > a100.memory_bytes >= rule(4)
    # memplan's FSDP estimate (micro-batch 1, 512 tokens) agrees on 4, with little to spare
    assert _fewest_gpus(arch, a100, a100.memory_bytes) == 4
    at4 = estimate_memory(_starcoder_sharded(4), arch, a100)
    assert at4.fits and a100.memory_bytes - at4.device_used_bytes < 2 * 2**30
    # the 16 B/param share is divided by 4, plus FSDP2's dim-0 padding of each tensor (under 0.001%)
    share = sum(_component(at4, c) for c in ("weights", "gradients", "optimizer states"))
    assert state // 4 <= share < state // 4 * 1.00001
    # FSDP gathers the fp32 shards in bf16: no autocast weight copies (a 4-GPU ZeRO-3/FSDP estimate that
    # ran the forward under autocast used to add 28.8 GiB of them per GPU)
    assert at4.bytes_of("autocast weight copies") == 0
    # the peak is the optimizer step: beside the share, foreach AdamW's sqrt of every fp32 state shard
    assert at4.peak_phase == "optimizer step"
    assert 4 * n // 4 <= _component(at4, "optimizer step temporary") < 4 * n // 4 * 1.00001
    # recommend (2,048 tokens, 5% free, checkpointing allowed) can only use counts of GPU_COUNTS
    # dividing the global batch: the fewest is the first such count at or above the fewest that fit
    room = a100.memory_bytes * (1 - DEFAULT_SAFETY_MARGIN)
    k_rec = _fewest_gpus(arch, a100, room, seq_len=2048, gradient_checkpointing=True)
    base = Job(model="starcoder", method="full", weight_dtype="fp32", compute_dtype="bf16", seq_len=2048)
    result = recommend(base, arch, [a100], global_batch=32, max_gpus=8)
    expected = min(c for c in GPU_COUNTS if c >= k_rec and 32 % c == 0)
    assert result.plans and min(p.num_gpus for p in result.plans) == result.plans[0].num_gpus == expected > 4


def test_qlora_on_15b_is_about_10_gb_before_activations():
    est = estimate("starcoder", method="qlora")
    static = sum(_component(est, c) for c in ("weights", "adapters", "gradients", "optimizer states"))
    # by hand: 40 blocks x (c_attn 6144x6400 + c_proj 6144^2 + c_fc and c_proj 2 x 6144x24576) in NF4+DQ,
    # every other parameter (embeddings, norms, biases) upcast to fp32 by prepare_model_for_kbit_training
    quant = 40 * (6144 * 6400 + 6144 * 6144 + 2 * 6144 * 24576)
    other = est.params.total - quant
    adapters = 40 * 16 * (6144 + 6400)  # r=16 on c_attn
    by_hand = quant * (0.5 + 1 / 64 + 4 / 16384) + other * 4 + adapters * (4 + 4 + 8)
    assert abs(static - by_hand) / by_hand < 1e-4
    assert 8 * GB < static < 11 * GB


def test_13b_two_byte_grads_and_adam_is_78_gb():
    est = estimate("llama-2-13b", method="full", compute_dtype="bf16")  # pure bf16: states in bf16
    grads_and_adam = _component(est, "gradients") + _component(est, "optimizer states")
    assert grads_and_adam == 6 * est.params.total
    assert round(grads_and_adam / GB) == 78


def test_inference_rule_of_thumb_against_memplan():
    # rule of thumb: params x bytes x 1.2
    arch = load_model("llama-2-7b")
    short = estimate_memory(Job(model="llama-2-7b", task="infer", seq_len=512, new_tokens=128), arch)
    rule = short.params.total * 2 * 1.2
    assert abs(short.device_used_bytes - rule) / rule < 0.2
    # the rule ignores the KV cache: a long batch blows past it (batch 8 x 4096 positions = 16 GiB of KV)
    long = estimate_memory(Job(model="llama-2-7b", task="infer", seq_len=3584, new_tokens=512, micro_batch=8), arch)
    assert _component(long, "KV cache") == 2 * 32 * 4096 * 4096 * 8 * 2
    assert long.device_used_bytes > 2 * rule
