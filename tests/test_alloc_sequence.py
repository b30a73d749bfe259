"""The allocation sequence the estimate derives (planner/alloc_sequence.py), checked event by event
against what the libraries do: bitsandbytes' per-call dequantization, the parameters' module order."""

import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from memplan import alloc_sequence as S
from memplan.errors import MemplanInputError
from memplan.estimate import estimate_memory
from memplan.job import Job
from memplan.profiles import load_model
from memplan.stacks import get


def _plan(job: Job, cpu: bool = False):
    """The plan the estimate replays for `job` (`cpu`: on the CPU trace's kernels)."""
    seen = {}
    real = S.replayed

    def keep(plan, settings):
        seen["plan"] = plan
        return real(plan, settings)

    S._REPLAYS.clear()
    S.replayed = keep
    try:
        estimate_memory(job, load_model(job.model), None, get(job.stack).on_cpu() if cpu else None)
    finally:
        S.replayed = real
    return seen["plan"]


def _after(events, mark):
    i = events.index(("mark", mark))
    return events[i + 1:]


@pytest.mark.parametrize("ckpt, passes", [(True, 3), (False, 2)])
def test_every_converted_linear_dequantizes_its_weight_per_call(ckpt, passes):
    """QLoRA: MatMul4Bit dequantizes each converted weight in its forward and again in its backward,
    and a checkpointed layer runs its forward twice: 3 (or 2) dequantized weights per converted linear,
    per layer and step, each of d_in x d_out in the compute dtype (bf16)."""
    job = Job(model="llama-2-7b", method="qlora", micro_batch=1, seq_len=512, gradient_checkpointing=ckpt)
    arch = load_model("llama-2-7b")
    plan = _plan(job)
    converted = get("transformers-5").quantized_linears(arch)
    assert [c.dequant for c in plan.linear_calls] == [d_in * d_out * 2 for d_in, d_out, _ in converted]
    # the second step's forward and backward (the first also allocates the two cuBLAS workspaces)
    step = _after(S.events(plan), "step 1 optimizer step")
    step = step[:step.index(("mark", "step 2 backward"))]
    sizes = [e[2] for e in step if e[0] == "alloc"]
    for n in {c.dequant for c in plan.linear_calls}:
        calls = sum(1 for c in plan.linear_calls if c.dequant == n)
        # an activation of the same size would be counted too: at 512 tokens none is
        assert sizes.count(n) == calls * passes * arch.layers


def test_the_fp32_stream_is_cast_around_each_4bit_matmul():
    """peft's kbit upcast leaves an fp32 stream: Linear4bit casts each input to bf16 and the output
    back (`x.to(compute_dtype)`, `.to(inp_dtype)`)."""
    plan = _plan(Job(model="llama-2-7b", method="qlora", micro_batch=1, seq_len=512))
    t = 512
    for call, lin in zip(plan.linear_calls, load_model("llama-2-7b").projections):
        assert (call.cast, call.out, call.out_cast) == (t * lin.d_in * 2, t * lin.d_out * 2, t * lin.d_out * 4)
    plain = _plan(Job(model="llama-2-7b", method="qlora", micro_batch=1, seq_len=512, kbit_prepare=False))
    assert all(c.cast == 0 and c.out_cast == 0 for c in plain.linear_calls)


def test_optimizer_states_follow_model_parameters_order():
    """torch's AdamW creates each parameter's states at its first step in param-group order, which is
    model.parameters(): the embedding first. Gemma-2B's tied 256k x 2048 embedding's two bf16 states
    are the step's first allocations."""
    arch = load_model("gemma-2b")
    plan = _plan(Job(model="gemma-2b", method="full", micro_batch=1, seq_len=256))
    opt = _after(S.events(plan), "step 1 backward")
    first = [e[2] for e in opt if e[0] == "alloc"][:2]
    assert first == [arch.vocab * arch.hidden * 2] * 2


def test_a_tied_embedding_gradient_is_summed_out_of_place():
    """The tied embedding's second gradient (from the embedding's backward) arrives while the head's
    is held; AccumulateGrad allocates their sum: two vocab x hidden tensors at the end of the backward."""
    arch = load_model("gemma-2b")
    plan = _plan(Job(model="gemma-2b", method="full", micro_batch=1, seq_len=256))
    g = arch.vocab * arch.hidden * 2
    assert plan.tied_grad == g
    ev = S.events(plan)
    bwd = ev[ev.index(("mark", "step 1 forward")) + 1:ev.index(("mark", "step 1 backward"))]
    assert [e[2] for e in bwd if e[0] == "alloc"].count(g) == 3  # the head's, the embedding's, the sum
    untied = _plan(Job(model="llama-2-7b", method="full", micro_batch=1, seq_len=256))
    assert untied.tied_grad == 0


# --- a layer op by op (activations.Saved.tape) --------------------------------------------------

def _live_bytes_at_marks(events) -> dict[str, int]:
    """Bytes of live tensors (as requested) at each mark of a sequence."""
    size, live, out = {}, set(), {}
    for e in events:
        if e[0] == "alloc":
            size[e[1]] = e[2]
            live.add(e[1])
        elif e[0] == "free":
            live.discard(e[1])
        elif e[0] == "mark":
            out[e[1]] = sum(size[k] for k in live)
    return out


@pytest.mark.parametrize("job", [
    Job(model="llama-2-7b", method="lora", micro_batch=4, seq_len=1024, gradient_checkpointing=False),
    Job(model="mistral-7b", method="qlora", micro_batch=2, seq_len=1024),
    Job(model="gemma-2b", method="full", micro_batch=2, seq_len=1024, gradient_checkpointing=True),
], ids=["llama-lora", "mistral-qlora-ck", "gemma-full-ck"])
def test_a_taped_layer_saves_what_the_walk_counts_and_its_step_leaks_nothing(job):
    """The tape makes every tensor the walk counts as saved exactly once (the saved bytes a layer
    keeps through the forward are the walk's), and its forward and backward free the rest: the
    second step ends with what the first ended with."""
    plan = _plan(job)
    assert plan.tape and plan.grads_by_linear
    ev = [("alloc", 0, plan.head_input_grad)]  # the layer's input (an fp32 stream's RMSNorm saves it as is)
    kept, out = S._tape_forward(ev, itertools.count(1), plan.tape, plan.linear_calls, 0)
    size = {e[1]: e[2] for e in ev if e[0] == "alloc"}
    assert sum(size[k] for k in kept) == sum(plan.saved)
    assert out is not None and size[out] == plan.head_input_grad  # the residual stream leaves the layer
    marks = _live_bytes_at_marks(S.events(plan))
    assert marks["step 1 optimizer step"] == marks["step 2 optimizer step"]
    assert marks["step 1 forward"] < marks["step 2 forward"]  # the optimizer states, made in step 1's update


def _traced_layer_matches(job) -> bool:
    """Whether one layer of the derived tape, allocations and frees with their sizes, appears as is
    in the CPU trace's second forward (a middle layer, the first saving less)."""
    import memplan.validate.trace as T

    plan = _plan(job, cpu=True)
    ev: list = []
    S._tape_forward(ev, itertools.count(1), plan.tape, plan.linear_calls, None)
    sizes = {e[1]: e[2] for e in ev if e[0] == "alloc"}

    def signature(events, size):
        return [("A", e[2]) if e[0] == "alloc" else ("F", size[e[1]]) for e in events
                if (e[0] == "alloc" and e[2] > 0) or (e[0] == "free" and size.get(e[1], 0) > 0)]

    derived = signature(ev, sizes)
    derived = derived[:max(i for i, x in enumerate(derived) if x[0] == "A") + 1]  # up to the layer's last allocation
    seen = {}
    real = T.replayed
    T.replayed = lambda events: seen.setdefault("events", events) and real(events)
    try:
        T.trace_training(job, iterations=2, allocator=True)
    finally:
        T.replayed = real
    traced = seen["events"]
    second = traced[[i for i, e in enumerate(traced) if e == ("mark", "forward")][1]:]
    tsig = signature(second, {e[1]: e[2] for e in traced if e[0] == "alloc"})
    n = len(derived)
    return any(tsig[i:i + n] == derived for i in range(len(tsig) - n + 1))


@pytest.mark.parametrize("family, extra", [
    ("llama", {"method": "lora"}),
    ("mistral", {"method": "lora", "lora_targets": "all-linear"}),
    ("gemma", {"method": "full"}),
    ("gemma", {"method": "lora", "lora_targets": "all-linear"}),
], ids=["llama-lora", "mistral-all-linear", "gemma-full", "gemma-all-linear"])
def test_a_taped_layer_is_the_traced_layer_op_by_op(family, extra):
    """The tape of a Llama-style layer (RMSNorm's fp32 pieces, each linear with LoRA's path, the
    rotary products, the residual sums) against the fake-tensor trace of the real step: one layer's
    every allocation and free, with its size, in the trace's order."""
    pytest.importorskip("transformers")
    from memplan.validate.differential import tiny_path

    job = Job(model=tiny_path(family), compute_dtype="bf16", micro_batch=2, seq_len=64, gradient_checkpointing=False, **extra)
    assert _traced_layer_matches(job)


def _clean(events) -> str | None:
    """What is wrong with a sequence: a free of a key not alive (never made, or freed already)."""
    live = set()
    for e in events:
        if e[0] == "alloc":
            live.add(e[1])
        elif e[0] == "free":
            if e[1] not in live:
                return f"free of {e[1]} not alive"
            live.discard(e[1])
    return None


jobs = st.fixed_dictionaries({
    "model": st.sampled_from(["llama-2-7b", "mistral-7b", "gemma-2b", "llama-3-8b", "qwen3-8b", "mixtral-8x7b",
                              "falcon-7b", "phi-2", "starcoder", "gemma-2-2b", "olmo-2-7b"]),
    "method": st.sampled_from(["full", "lora", "qlora"]),
    "micro_batch": st.integers(1, 4),
    "seq_len": st.sampled_from([64, 512, 1000, 2048]),
    "gradient_checkpointing": st.booleans(),
    "attention": st.sampled_from(["sdpa", "eager"]),
    "compute_dtype": st.sampled_from(["bf16", "fp16", "fp32"]),
    "lora_targets": st.sampled_from(["default", "all-linear"]),
    "lora_dropout": st.sampled_from([0.0, 0.1]),
    "autocast": st.booleans(),
    "liger": st.booleans(),
})


@given(jobs)
def test_random_sequences_are_whole(fields):
    """Any training job's derived sequence: every free releases a live tensor, a taped layer makes
    exactly what the walk counts as saved, and the second step ends where the first did (nothing
    leaks from step to step)."""
    if fields["method"] == "full":
        fields = {k: v for k, v in fields.items() if not k.startswith("lora")}
    try:
        job = Job(**fields)
        plan = _plan(job)
    except MemplanInputError:
        assume(False)
    if not isinstance(plan, S.TrainingPlan):
        assume(False)
    ev = S.events(plan)
    assert _clean(ev) is None, _clean(ev)
    for tape, saved in ((plan.tape, plan.saved), (plan.first_tape, plan.first_saved)):
        if tape:
            made = [("alloc", 0, plan.head_input_grad)]
            kept, _ = S._tape_forward(made, itertools.count(1), tape, plan.linear_calls, 0)
            size = {e[1]: e[2] for e in made if e[0] == "alloc"}
            assert sum(size[k] for k in kept) == sum(saved)
    marks = _live_bytes_at_marks(ev)
    assert marks["step 1 optimizer step"] == marks["step 2 optimizer step"]
