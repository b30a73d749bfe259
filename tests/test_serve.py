"""The serving view wired to a Job (planner/serve.py) and the CLI: estimate / fit --engine vllm."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from memplan.errors import MemplanInputError
from memplan.job import Job
from memplan.profiles import load_gpu, load_model
from memplan.serve import longest_model_len, serve

MiB = 2**20


def _run(*args):
    return subprocess.run([sys.executable, "-m", "memplan", *args], capture_output=True, text=True)


def test_llama_3_8b_on_one_h100_takes_the_hand_derived_terms():
    """The Job path hands planner/serving.py the terms tests/test_serving.py derives by hand: bf16
    weights 8,030,261,248 x 2 B (+ Llama's 512 B rotary buffer), 224 MiB of kernels loaded after
    vLLM's snapshot; the CUDA context (before it) only has to leave the requested share free."""
    job = Job(model="llama-3-8b", task="infer", engine="vllm", gpu_memory_utilization=0.9, max_model_len=8192)
    sv = serve(job, load_model("llama-3-8b"), load_gpu("H100-80GB"))
    assert sv.weights_bytes == 8_030_261_248 * 2 + 512
    assert sv.non_torch_bytes == 224 * MiB
    assert sv.num_blocks == 28_469  # budget // 2 MiB per block: the buffer moves no block
    fp8 = serve(job.model_copy(update={"kv_cache_dtype": "fp8"}), load_model("llama-3-8b"), load_gpu("H100-80GB"))
    assert fp8.num_blocks == 56_939


def test_tensor_parallel_serving_caches_this_gpus_kv_heads():
    one = serve(Job(model="llama-3-70b", task="infer", engine="vllm", num_gpus=4, sharding="tp"),
                load_model("llama-3-70b"), load_gpu("H100-80GB"))
    assert one.page_bytes_per_layer == 2 * 16 * (8 // 4) * 128 * 2
    assert one.config.tensor_parallel_size == 4


def test_longest_model_len_is_vllms_own_estimate():
    job = Job(model="llama-3.1-8b", task="infer", engine="vllm")
    sv = serve(job, load_model("llama-3.1-8b"), load_gpu("L4"))
    assert not sv.fits
    said = int(re.search(r"estimated maximum model length is (\d+)", sv.error).group(1))
    assert longest_model_len(job, load_model("llama-3.1-8b"), load_gpu("L4")) == said


def test_cli_estimate_and_fit():
    r = _run("estimate", "-m", "llama-3-8b", "--task", "infer", "--engine", "vllm", "-g", "H100-80GB",
             "--gpu-memory-utilization", "0.9", "--max-model-len", "8192")
    assert r.returncode == 0, r.stderr
    assert "KV cache: 28,469 blocks x 16 tokens = 455,504 tokens" in r.stdout
    f = _run("fit", "-m", "llama-3-8b", "--task", "infer", "--engine", "vllm", "-g", "H100-80GB", "-s", "2048",
             "--new-tokens", "512", "--gpu-memory-utilization", "0.9", "--max-model-len", "8192")
    assert f.returncode == 0 and "sequences of 2,560 tokens at once: 177" in f.stdout  # (28,469 - 1) // 160


@pytest.mark.parametrize("args, message", [
    (["fit", "-m", "llama-3-8b", "--task", "infer", "--engine", "vllm", "-g", "L4", "--safety-margin", "0.1"],
     "--safety-margin does not apply beside --engine vllm"),
    (["estimate", "-m", "llama-3-8b", "--task", "infer", "--engine", "vllm"], "give --gpu"),
    (["estimate", "-m", "llama-3-8b", "--task", "infer", "--max-num-seqs", "8"], "is a vLLM setting"),
    (["estimate", "-m", "llama-3-8b", "--task", "infer", "--engine", "vllm", "-g", "L4",
      "--gpu-memory-utilization", "1.5"], "gpu-memory-utilization must be in (0, 1]"),
    (["estimate", "-m", "llama-3-8b", "--task", "infer", "--engine", "vllm", "-g", "L4", "--kv-cache-dtype", "int4"],
     "vLLM takes fp8"),
])
def test_bad_serving_input_is_one_line(args, message):
    r = _run(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_serve_needs_the_vllm_engine():
    with pytest.raises(MemplanInputError, match="--engine vllm"):
        serve(Job(model="llama-3-8b", task="infer"), load_model("llama-3-8b"), load_gpu("L4"))


def test_library_serving_entry_point():
    import memplan

    sv = memplan.kv_budget("llama-3-8b", gpu="H100-80GB", max_model_len=8192, gpu_memory_utilization=0.9)
    assert sv.num_blocks == 28_469
    with pytest.raises(MemplanInputError, match="a model name or a Job"):
        memplan.kv_budget()
