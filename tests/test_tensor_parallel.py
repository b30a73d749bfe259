"""Tensor-parallel inference (planner/tensor_parallel.py): per-GPU figures derived by hand.

Each expected figure is written out from the config: per layer q and o (hidden x heads x head_dim
/ N each), k and v (hidden x kv_heads x head_dim / N each), gate, up and down (hidden x intermediate
/ N each), two norms whole; the embedding and the head split by vocabulary (transformers: an
`embed_tokens` embedding, "embedding_rowwise"), by the padded vocabulary (vLLM). KV cache: 2 (K and
V) x layers x KV heads per GPU x head_dim x positions x batch x 2 B. And rank 0's parameters against
transformers' own `apply_tensor_parallelism` on the meta model (validate/tensor_parallel.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memplan.errors import MemplanInputError
from memplan.estimate import estimate_memory
from memplan.job import Job
from memplan.profiles import load_gpu, load_model

PROMPT, NEW = 2048, 256


def _tp(model: str, n: int, engine: str = "transformers", **kw):
    job = Job(model=model, task="infer", seq_len=PROMPT, new_tokens=NEW, num_gpus=n, sharding="tp", engine=engine, **kw)
    return estimate_memory(job, load_model(model))


def _layer(n: int, hidden: int = 8192, q: int = 8192, kv: int = 1024, inter: int = 28672) -> int:
    return 2 * hidden * (q // n) + 2 * hidden * (kv // n) + 3 * hidden * (inter // n) + 2 * hidden


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("model, vocab", [("llama-2-70b", 32000), ("llama-3-70b", 128256)])
def test_70b_per_gpu(model, vocab, n):
    """Llama-2-70B and Llama-3-70B share every shape but the vocabulary."""
    est = _tp(model, n)
    params = 80 * _layer(n) + 2 * (vocab // n) * 8192 + 8192
    assert est.bytes_of("weights") == params * 2
    assert est.bytes_of("KV cache") == 2 * 80 * (8 // n) * 128 * (PROMPT + NEW) * 1 * 2


@pytest.mark.parametrize("n", [2, 4, 8])
def test_llama_3_70b_vllm_splits_the_padded_vocabulary(n):
    est = _tp("llama-3-70b", n, "vllm")
    padded = 128256  # already a multiple of vLLM's 64-row vocabulary padding
    params = 80 * _layer(n) + 2 * (padded // n) * 8192 + 8192
    assert est.bytes_of("weights") == params * 2


def test_fewer_kv_heads_than_gpus_are_replicated_by_vllm():
    """Qwen3-30B-A3B: 32 query heads, 4 KV heads, over 8 GPUs: 4 query heads per GPU and each KV head
    on 2 GPUs, so each GPU caches one KV head (vLLM QKVParallelLinear num_kv_head_replicas = 8 / 4)."""
    est = _tp("qwen3-30b-a3b", 8, "vllm")
    assert est.bytes_of("KV cache") == 2 * 48 * 1 * 128 * (PROMPT + NEW) * 2
    assert any("each on 2 GPUs" in note for note in est.notes)
    # transformers' tp_plan splits k_proj's rows and cannot: refused in one line naming vLLM
    with pytest.raises(MemplanInputError, match="4 KV heads are not divisible by --num-gpus 8.*--engine vllm"):
        _tp("qwen3-30b-a3b", 8)


def test_qwen2_5_7b_over_8_gpus_is_refused_as_vllm_refuses_it():
    """28 attention heads do not divide over 8 GPUs (vllm/config/model.py verify_with_parallel_config),
    though its 4 KV heads would be replicated twice; over 4 GPUs each GPU holds 7 heads and 1 KV head."""
    with pytest.raises(MemplanInputError, match="28 attention heads are not divisible by --num-gpus 8"):
        _tp("qwen2.5-7b", 8, "vllm")
    est = _tp("qwen2.5-7b", 4, "vllm")
    assert est.bytes_of("KV cache") == 2 * 28 * 1 * 128 * (PROMPT + NEW) * 2
    # weights: q/k/v carry biases (Qwen2Attention), split with their outputs; o_proj none
    h, n = 3584, 4
    layer = (h * 7 * 128 + 7 * 128) + 2 * (h * 128 + 128) + 7 * 128 * h + 3 * h * (18944 // n) + 2 * h
    vocab_rows = -(-152064 // 64) * 64 // n
    assert est.bytes_of("weights") == (28 * layer + 2 * vocab_rows * h + h) * 2


def test_nccl_buffers_of_the_tensor_parallel_communicator():
    g = load_gpu("A100-80GB")
    job = Job(model="llama-2-70b", task="infer", num_gpus=4, sharding="tp", gpu="A100-80GB")
    est = estimate_memory(job, load_model("llama-2-70b"), g)
    assert est.bytes_of("NCCL buffers (tensor-parallel communicator)") > 0


def test_per_gpu_shares_add_up_to_the_model():
    """Over N GPUs the split parts sum to the whole; what is replicated (the norms) is counted on each GPU."""
    whole = estimate_memory(Job(model="llama-3-70b", task="infer", seq_len=PROMPT, new_tokens=NEW),
                            load_model("llama-3-70b"))
    for n in (2, 4, 8):
        est = _tp("llama-3-70b", n)
        replicated = (80 * 2 * 8192 + 8192) * 2
        assert n * (est.bytes_of("weights") - replicated) == whole.bytes_of("weights") - replicated
        assert n * est.bytes_of("KV cache") == whole.bytes_of("KV cache")


@pytest.mark.parametrize("fields, message", [
    (dict(num_gpus=4), "say how the model is split"),
    (dict(num_gpus=1, sharding="tp"), "splits nothing"),
    (dict(num_gpus=2, sharding="zero3"), "inference takes --sharding tp"),
])
def test_bad_inference_sharding(fields, message):
    with pytest.raises(MemplanInputError, match=message):
        Job(model="llama-2-7b", task="infer", **fields)


def test_tp_is_refused_for_training_and_unsupported_families():
    with pytest.raises(MemplanInputError, match="modelled for inference"):
        Job(model="llama-2-7b", num_gpus=2, sharding="tp")
    with pytest.raises(MemplanInputError, match="no plain tp_plan"):
        estimate_memory(Job(model="falcon-7b", task="infer", num_gpus=2, sharding="tp"), load_model("falcon-7b"))


def test_prequantized_weights_split_with_their_metadata():
    """A GPTQ checkpoint over 2 GPUs: each linear's packed weight, scales and zeros split with it, the
    embedding and head by vocabulary; what each GPU keeps whole beyond the final norm: the layers' two
    norms (2 x 4096 x 2 B) and the g_idx of the five column-parallel linears (4096 int32 each: its
    input is not split)."""
    one = estimate_memory(Job(model="llama-2-7b-gptq", task="infer"), load_model("llama-2-7b-gptq"))
    two = _tp("llama-2-7b-gptq", 2)
    whole = 4096 * 2  # the final norm, fp16
    kept = 32 * (2 * 4096 * 2 + 5 * 4096 * 4)
    assert 2 * (two.bytes_of("weights") - whole) - (one.bytes_of("weights") - whole) == kept


def test_fit_searches_the_per_gpu_share():
    """fit over a tensor-parallel job: the largest batch fits each GPU with the margin, one more does not."""
    from memplan.fit import DEFAULT_SAFETY_MARGIN, fits_with_margin, largest

    g, arch = load_gpu("A100-80GB"), load_model("llama-2-70b")
    job = Job(model="llama-2-70b", task="infer", seq_len=2048, new_tokens=256, num_gpus=4, sharding="tp", gpu=g.name)
    ans = largest(job, arch, g, "micro_batch", margin=DEFAULT_SAFETY_MARGIN)
    assert ans.largest > 1

    def used(b):
        return estimate_memory(job.model_copy(update={"micro_batch": b}), arch, g).device_used_bytes

    assert fits_with_margin(used(ans.largest), g, DEFAULT_SAFETY_MARGIN)
    assert not fits_with_margin(used(ans.largest + 1), g, DEFAULT_SAFETY_MARGIN)



# rank 0 under transformers' own sharding (validate/tensor_parallel.py, one process per GPU count): a tied
# model (Gemma), GPT-NeoX (embed_in, not split), a fused-expert MoE, biased q/k/v (Qwen2)
EXACT = {2: ["llama-2-7b", "qwen2.5-7b", "qwen3-8b", "gemma-7b", "gemma-2-9b", "phi-2", "pythia-1.4b", "mixtral-8x7b",
             "qwen3-30b-a3b"],
         4: ["llama-2-70b", "llama-3-70b", "qwen2.5-7b"],
         8: ["llama-3-70b"]}


def _rank0(n: int, *args: str):
    """validate/tensor_parallel.py in its own process (a fake process group of n ranks)."""
    out = subprocess.run([sys.executable, "-m", "memplan.validate.tensor_parallel", str(n), *args], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", sorted(EXACT))
def test_rank_0_holds_what_transformers_shards(n):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    real = _rank0(n, "--weights", *EXACT[n])
    for model in EXACT[n]:
        est = estimate_memory(Job(model=model, task="infer", num_gpus=n, sharding="tp"), load_model(model))
        assert est.bytes_of("weights") == real[model], model



# generate() on rank 0 under transformers' tensor parallelism, traced (validate/tensor_parallel.py
# --generate): named cases where the all-reduce moment does and does not decide the prefill, a tied
# model, MoE, partial rotary, and a seeded draw over the families transformers splits
NAMED = {2: [("llama-2-7b", 4, 1024, 2), ("gemma-7b", 2, 512, 2), ("mixtral-8x7b", 2, 512, 2), ("phi-2", 4, 512, 2)],
         4: [("llama-2-7b", 4, 1024, 2), ("qwen2.5-7b", 4, 1024, 2)],
         8: [("llama-2-7b", 4, 1024, 2), ("qwen3-8b", 2, 1024, 2)]}
DRAW_MODELS = ["llama-2-7b", "mistral-7b", "qwen2.5-7b", "qwen3-8b", "gemma-7b", "gemma-2-9b", "phi-2", "pythia-1.4b",
               "llama-3.2-1b", "qwen3-30b-a3b"]


def _drawn(seed: int = 20261202, count: int = 6) -> dict[int, list[tuple]]:
    import random

    rng = random.Random(seed)
    out: dict[int, list[tuple]] = {}
    while sum(map(len, out.values())) < count:
        model = rng.choice(DRAW_MODELS)
        arch = load_model(model)
        n = rng.choice([t for t in (2, 4, 8) if arch.kv_heads % t == 0 and arch.heads % t == 0] or [0])
        if n:
            out.setdefault(n, []).append((model, rng.choice([1, 2, 4]), rng.choice([128, 256, 512, 1024]),
                                          rng.choice([1, 2, 5])))
    return out


def _cases() -> list[tuple[int, list[tuple]]]:
    merged: dict[int, list[tuple]] = {n: list(v) for n, v in NAMED.items()}
    for n, v in _drawn().items():
        merged.setdefault(n, []).extend(v)
    return sorted(merged.items())


@pytest.mark.parametrize("n, cases", _cases(), ids=lambda v: str(v) if isinstance(v, int) else f"{len(v)} jobs")
def test_generation_per_gpu_matches_transformers_tp_trace(n, cases):
    """Prefill and decode peaks of rank 0 within 0.5% of the trace of transformers' own split (the CPU's
    kernels: the estimate under the stack's on_cpu())."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memplan.stacks import get

    jobs = [Job(model=m, task="infer", micro_batch=b, seq_len=s, new_tokens=k, num_gpus=n, sharding="tp")
            for m, b, s, k in cases]
    traced = _rank0(n, "--generate", *[j.model_dump_json() for j in jobs])
    for job, phases in zip(jobs, traced):
        est = estimate_memory(job, load_model(job.model), None, get(job.stack).on_cpu()).measured_phases()
        for phase, measured in phases.items():
            assert abs(est[phase] - measured) / measured <= 0.005, (job.model, job.micro_batch, job.seq_len, phase,
                                                                     est[phase], measured)


def test_the_plain_trace_refuses_multi_gpu_and_vllm_inference_in_one_line():
    from memplan.validate.trace import refusal

    arch = load_model("llama-2-7b")
    tp = Job(model="llama-2-7b", task="infer", num_gpus=2, sharding="tp")
    assert "memplan.validate.tensor_parallel 2 --generate" in refusal(tp, arch)
    assert "vLLM cannot be traced" in refusal(Job(model="llama-2-7b", task="infer", engine="vllm"), arch)
    split = Job(model="llama-2-7b", task="infer", num_gpus=2, sharding="device_map", max_memory=(2**34, 2**34))
    assert "layer split cannot be traced" in refusal(split, arch)
