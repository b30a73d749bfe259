"""Memory never decreases with batch, sequence or rank (hypothesis)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from memplan import Job, estimate_memory
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
    }
)


def peak(fields):
    job = Job(**fields)
    est = estimate_memory(job, load_model(job.model))
    return est.peak_allocated_bytes, est.device_used_bytes


@settings(max_examples=150, deadline=None)
@given(jobs, st.sampled_from(["micro_batch", "seq_len", "lora_rank"]), st.integers(1, 64))
def test_more_never_needs_less(fields, knob, extra):
    bigger = dict(fields, **{knob: fields[knob] + extra})
    small_alloc, small_dev = peak(fields)
    big_alloc, big_dev = peak(bigger)
    assert big_alloc >= small_alloc
    assert big_dev >= small_dev
