"""Memory never decreases with batch, sequence, rank or new tokens (hypothesis)."""

from hypothesis import assume, example, given
from hypothesis import strategies as st

from memplan import Job, estimate_memory
from memplan.job import INFERENCE_ONLY, LORA_ONLY, TRAINING_ONLY
from memplan.profiles import load_model

MODELS = ["llama-2-7b", "falcon-7b", "gemma-2b", "phi-2", "mixtral-8x7b", "starcoder", "llama-3-8b"]
jobs = st.fixed_dictionaries(
    {
        "model": st.sampled_from(MODELS),
        "method": st.sampled_from(["full", "lora", "qlora"]),
        "task": st.sampled_from(["train", "infer"]),
        "micro_batch": st.integers(1, 16),
        "seq_len": st.integers(1, 1024),
        "lora_rank": st.integers(1, 128),
        "gradient_checkpointing": st.booleans(),
        "attention": st.sampled_from(["sdpa", "eager"]),
        "optimizer": st.sampled_from(["adamw", "adamw_8bit", "paged_adamw", "sgd", "sgd_momentum"]),
        "new_tokens": st.one_of(st.just(0), st.integers(1, 256)),
    }
)


def _applicable(fields):
    """The drawn fields the job's task and method read (the Job refuses the others)."""
    if fields["task"] == "infer":
        return {k: v for k, v in fields.items() if k not in TRAINING_ONLY and k != "method"}
    drop = set(INFERENCE_ONLY) | (set(LORA_ONLY) if fields["method"] == "full" else set())
    return {k: v for k, v in fields.items() if k not in drop}


def peak(fields):
    """Bytes the job puts on the GPU at its peak (torch's pool plus paged optimizer states, which
    live in unified memory outside torch's pool), and the device total pynvml would report.
    torch's figure alone is not monotone: a tensor that grows past bitsandbytes' paging threshold
    leaves torch's pool (test_estimate.py::test_rank_past_paging_threshold_leaves_torch_pool).
    Nor is the caching allocator's slack, which the device figure carries: a larger tensor can land
    whole in a cached block that a smaller one would have split (planner/allocator.py), so the
    device figure is compared without it; reserved >= allocated is held for every job."""
    job = Job(**_applicable(fields))
    est = estimate_memory(job, load_model(job.model))
    paged = sum(c.bytes for c in est.components if c.pool == "unified")
    slack = est.peak_reserved_bytes - est.peak_allocated_bytes
    assert slack >= 0
    return est.peak_allocated_bytes + paged, est.device_used_bytes - slack


@given(jobs, st.sampled_from(["micro_batch", "seq_len", "lora_rank", "new_tokens"]), st.integers(1, 64))
@example(dict(model="llama-2-7b", method="lora", task="train", micro_batch=1, seq_len=8, lora_rank=10,
              gradient_checkpointing=False, attention="sdpa", optimizer="paged_adamw", new_tokens=0), "lora_rank", 15)
def test_more_never_needs_less(fields, knob, extra):
    # from 0 new tokens (a plain forward: logits for every position) to 1 (generate: the last
    # position's) the workload changes kind; from 1 on, more tokens only grow the cache
    assume(knob != "new_tokens" or fields["new_tokens"] > 0)
    bigger = dict(fields, **{knob: fields[knob] + extra})
    small_alloc, small_dev = peak(fields)
    big_alloc, big_dev = peak(bigger)
    assert big_alloc >= small_alloc
    assert big_dev >= small_dev
