"""The worked examples of docs/worked-examples.md, recomputed by memplan."""

import math

from memplan import Job, estimate, estimate_memory
from memplan.overhead import FRAGMENTATION
from memplan.profiles import load_gpu, load_model

GB = 10**9
GIB = 2**30


def _component(est, name):
    return est.component(name).bytes


def test_full_finetune_mixed_precision_adam_is_16_bytes_per_param():
    # HF Trainer bf16=True on fp32 weights: 4 (weights) + 4 (grads) + 8 (two fp32 Adam states)
    est = estimate("starcoder", method="full", weight_dtype="fp32", compute_dtype="bf16")
    n = est.params.total
    state = _component(est, "weights") + _component(est, "gradients") + _component(est, "optimizer states")
    assert state == 16 * n
    assert round(state / GB) == 248  # 15.5B x 16 B
    # A100-80GB holds 81920 MiB = 80 GiB. Spread evenly over k GPUs (ZeRO-3), each also needs the
    # CUDA context and allocator slack: 3 GPUs are too few, 4 suffice, before any activation.
    a100 = load_gpu("A100-80GB")

    def per_gpu(k):
        share = math.ceil(state / k)
        return share + int(share * FRAGMENTATION) + a100.workspace_bytes + a100.cuda_context_bytes

    assert per_gpu(3) > a100.memory_bytes
    assert per_gpu(4) <= a100.memory_bytes


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
