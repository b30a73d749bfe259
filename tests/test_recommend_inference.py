"""recommend --task infer: the roofline cost model (planner/inference_cost.py) by hand, and the search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memplan.errors import MemplanInputError
from memplan.inference_cost import active_params, decode_step_seconds, prefill_seconds, usd_per_million_generated
from memplan.job import Job
from memplan.params import count_params
from memplan.profiles import load_gpu, load_model
from memplan.recommend_inference import recommend_inference


def test_decode_step_is_the_weights_and_cache_over_bandwidth():
    arch, gpu = load_model("llama-2-7b"), load_gpu("H100-80GB")
    w, kv = 13_476_839_424, 2**30
    step = decode_step_seconds(arch, gpu, weight_bytes_per_gpu=w, kv_bytes_per_gpu=kv, sequences=8, num_gpus=1,
                               utilisation=0.38)
    assert step == pytest.approx((w + kv) / gpu.memory_bandwidth_bytes_per_s)
    # a batch large enough turns it compute-bound: 2 FLOPs per parameter per sequence
    n = count_params(arch).total
    big = decode_step_seconds(arch, gpu, weight_bytes_per_gpu=w, kv_bytes_per_gpu=0, sequences=4096, num_gpus=1,
                              utilisation=0.38)
    assert big == pytest.approx(2 * n * 4096 / (gpu.peak_tflops_16bit * 1e12 * 0.38))


def test_prefill_flops_and_cost():
    arch, gpu = load_model("llama-2-7b"), load_gpu("A100-80GB")
    n = count_params(arch).total
    t = prefill_seconds(arch, gpu, prompt=1000, sequences=2, num_gpus=2, utilisation=0.5)
    assert t == pytest.approx((2 * n + 2 * 32 * 1000 * 4096) * 1000 * 2 / (2 * gpu.peak_tflops_16bit * 1e12 * 0.5))
    # 2 GPUs at 3 USD/h for (1 s + 100 x 0.01 s) make 2 x 100 tokens
    assert usd_per_million_generated(3.0, 2, 1.0, 0.01, 100, 2) == pytest.approx(6.0 * 2.0 / 3600 / 200 * 1e6)


def test_moe_reads_only_the_routed_experts():
    arch = load_model("mixtral-8x7b")
    total, one = active_params(arch, 1)
    expert = sum(lin.params for lin in arch.linears if lin.copies > 1) * arch.layers
    assert one == total - expert + expert * 2 // 8
    assert active_params(arch, 64)[1] == total


def test_search_splits_a_70b_model_and_ranks_by_cost():
    base = Job(model="llama-2-70b", task="infer", seq_len=2048, new_tokens=256, micro_batch=4)
    gpus = [load_gpu("A100-80GB"), load_gpu("L4")]
    result = recommend_inference(base, load_model("llama-2-70b"), gpus, max_gpus=8)
    assert result.plans, result.refused
    assert all(p.num_gpus > 1 for p in result.plans)  # 129 GiB of bf16 weights fit no single card
    costs = [p.usd_per_million_tokens for p in result.plans]
    assert costs == sorted(costs)
    for p in result.plans:
        assert p.device_used_bytes <= p.gpu_memory_bytes * (1 - result.safety_margin)


def test_search_needs_generated_tokens():
    with pytest.raises(MemplanInputError, match="new-tokens"):
        recommend_inference(Job(model="llama-2-7b", task="infer"), load_model("llama-2-7b"), [load_gpu("L4")])


def test_cli_emits_the_vllm_command(tmp_path):
    out = tmp_path / "serve.sh"
    r = subprocess.run([sys.executable, "-m", "memplan", "recommend", "-m", "llama-3-8b", "--task", "infer",
                        "--new-tokens", "128", "--sequences", "16", "--gpus", "H100-80GB", "--emit", "vllm",
                        "--emit-path", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("vllm serve meta-llama/Meta-Llama-3-8B --tensor-parallel-size 1 "
                                      "--max-model-len 2176 --max-num-seqs 16")
    bad = subprocess.run([sys.executable, "-m", "memplan", "recommend", "-m", "llama-3-8b", "--task", "infer",
                          "--new-tokens", "8", "--method", "lora"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--method applies to training" in bad.stderr
    js = subprocess.run([sys.executable, "-m", "memplan", "recommend", "-m", "llama-3-8b", "--task", "infer",
                         "--new-tokens", "8", "--gpus", "L4", "--json"], capture_output=True, text=True)
    assert json.loads(js.stdout)["plans"][0]["gpu"] == "L4"


def test_vllm_plans_must_hold_every_sequences_blocks():
    """Under --engine vllm a plan fits when vLLM starts with max-model-len = prompt + new tokens and its
    blocks hold all the sequences at once (planner/serve.py), the card's utilisation share taken whole."""
    from memplan.serve import serve

    base = Job(model="llama-3-70b", task="infer", seq_len=2048, new_tokens=512, micro_batch=64, engine="vllm")
    result = recommend_inference(base, load_model("llama-3-70b"), [load_gpu("H100-80GB")], max_gpus=8)
    assert [p.num_gpus for p in result.plans] == [4, 8]  # 2 x H100: 65 GiB of weights each leave too few blocks for 64 x 2,560 tokens
    for p in result.plans:
        sv = serve(p.job, load_model("llama-3-70b"), load_gpu("H100-80GB"))
        assert sv.concurrent_sequences(2560) >= 64 and p.kv_cache_bytes == sv.num_blocks * sv.bytes_per_block
        assert p.device_used_bytes == sv.requested_bytes
