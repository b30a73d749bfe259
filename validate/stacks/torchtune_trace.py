"""CPU trace of torchtune 0.6.1's own single-device fine-tuning step, under FakeTensorMode.

Runs inside the torchtune venv (memplan.validate.stack_envs, pins in torchtune.txt), which has torch,
torchtune and torchao but not pydantic: the request is plain JSON that the main environment builds
with `request(job)` (the Job as JSON, the model's raw HF config, the resolved LoRA targets and
memplan's parameter count), and the reply has the shape of validate/trace.py's TraceResult (a
timeline of per-phase snapshots) plus per-layer detail. `trace_job(job)` does both sides.

The model is torchtune's own (its component builders, e.g. `torchtune.models.llama2.lora_llama2`),
built as recipes/lora_finetune_single_device.py `_setup_model` builds it: under
`training.set_default_dtype(dtype)` (on meta here), `set_trainable_params(model,
get_adapter_params(model))`, `training.set_activation_checkpointing(model,
auto_wrap_policy={TransformerSelfAttentionLayer})` when on, `model.set_num_output_chunks(k)` when the
loss is CEWithChunkedOutputLoss. The step is the recipe's `train()` loop body: `_loss_step`
(forward, `torch.hstack` of the shifted labels and the ignore-index column, the loss, `del logits`),
`* current_num_tokens`, `running_loss +=`, `backward()`, then `training.scale_grads(model,
1 / num_tokens)`, `optimizer.step()`, `optimizer.zero_grad(set_to_none=True)`. The optimizer is the
configs' `torch.optim.AdamW(fused=True, weight_decay=0.01)` over `model.parameters()`, or, with
`optimizer_in_backward`, full_finetune_single_device.py's one AdamW per parameter stepped by
`training.register_optim_in_bwd_hooks`.
"""

from __future__ import annotations

import json
import sys
import time

PHASES = ("forward", "backward", "optimizer step")
IGNORE_INDEX = -100  # CEWithChunkedOutputLoss and nn.CrossEntropyLoss default
LR = 3e-4  # recipes/configs/llama2/7B_lora_single_device.yaml
WEIGHT_DECAY = 0.01
DTYPES = ("bf16", "fp32")
# HF linear names -> torchtune's (models/<family>/_component_builders.py: lora_attn_modules options
# {"q_proj", "k_proj", "v_proj", "output_proj"}; the MLP's w1/w2/w3 only all together, apply_lora_to_mlp)
ATTN_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
FAMILIES = ("llama", "mistral", "qwen2", "gemma")


# ---- main environment side ---------------------------------------------------------------------

def refusal(job) -> str | None:
    """Why torchtune's single-device recipes cannot run `job` as described (one line), or None."""
    from memplan.profiles import load_model

    arch = load_model(job.model)
    if job.task != "train":
        return "the torchtune trace covers training only"
    if arch.family not in FAMILIES:
        return f"the torchtune trace builds {', '.join(FAMILIES)} models, not {arch.family}"
    if job.quantized:
        return "torchtune's QLoRA bases (torchao NF4Tensor) are not traced under fake tensors"
    w, c = job.base_weight_dtype.value, job.compute_dtype.value
    if w not in DTYPES or w != c or job.runs_autocast:
        return f"torchtune recipes run one dtype (bf16 or fp32) with no autocast, got {w} weights and {c} compute"
    if job.uses_lora and job.lora_dtype.value != w:
        return f"torchtune builds LoRA adapters in the model dtype {w} (set_default_dtype), not {job.lora_dtype.value}"
    if job.optimizer != "adamw":
        return f"the torchtune trace runs torch.optim.AdamW, not {job.optimizer}"
    if job.attention != "sdpa":
        return "torchtune's attention is SDPA only"
    if job.num_gpus != 1 or job.sharding != "none":
        return "the torchtune trace covers the single-device recipes"
    if job.activation_offloading:
        return "torchtune's OffloadActivations needs torch.cuda.default_stream(): it cannot run on the CPU trace"
    if job.packing or job.liger:
        return "the torchtune trace runs unpacked rows with torchtune's own modules (no packing, no Liger kernels)"
    if job.checkpoint_reentrant:
        return "torchtune checkpoints non-reentrant (checkpoint_wrapper NO_REENTRANT), not reentrant"
    if job.optimizer_in_backward and job.uses_lora:
        return "optimizer_in_bwd is a full_finetune_single_device.py option, not a LoRA recipe's"
    if job.uses_lora:
        torchtune_targets(job, arch)
    return None


def torchtune_targets(job, arch) -> tuple[list[str], bool]:
    """(lora_attn_modules, apply_lora_to_mlp) for the job's resolved HF target names."""
    from memplan import stacks

    targets = set(stacks.get("torchtune").lora_targets(job, arch))
    attn = [ATTN_NAMES[n] for n in ATTN_NAMES if n in targets]
    mlp = [n for n in MLP_NAMES if n in targets]
    rest = targets - set(ATTN_NAMES) - set(MLP_NAMES)
    if rest or len(mlp) not in (0, len(MLP_NAMES)):
        raise ValueError(
            f"torchtune applies LoRA to q/k/v/o projections and to the whole MLP (gate, up and down together), "
            f"not to {sorted(targets)}"
        )
    return attn, bool(mlp)


def request(job, iterations: int = 2) -> dict:
    from memplan.params import count_params
    from memplan.profiles import load_hf_config, load_model

    why = refusal(job)
    if why:
        raise ValueError(why)
    arch = load_model(job.model)
    attn, mlp = torchtune_targets(job, arch) if job.uses_lora else ([], False)
    return {
        "job": job.model_dump(mode="json"),
        "family": arch.family,
        "config": dict(load_hf_config(job.model)[1]),
        "lora_attn_modules": attn,
        "apply_lora_to_mlp": mlp,
        "expected_params": count_params(arch).total,
        "dtype": job.base_weight_dtype.value,
        "checkpointing": job.checkpointing,
        "iterations": iterations,
    }


def trace_job(job, iterations: int = 2) -> dict:
    return trace_jobs([job], iterations)[0]


def trace_jobs(jobs, iterations: int = 2) -> list[dict]:
    """Trace several jobs in one venv process (importing torchtune and torchao takes ~8 s, a
    cut-down step ~1 s)."""
    from memplan.validate import stack_envs

    reply = stack_envs.run("torchtune", "torchtune_trace", {"traces": [request(j, iterations) for j in jobs]})
    return reply["results"]


LORA_ALL = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the recipes' LoRA targets


def matrix(real_size: bool = False) -> list:
    """The jobs tests/test_stack_torchtune.py traces: Llama-2-7B (real vocabulary and a 4k one),
    Mistral-7B, Qwen2.5-7B and Gemma-2B cut to 2 layers, one real-size Llama-2-7B; full and LoRA (the
    configs' rank 8, alpha 16, q/v/output_proj + MLP, and peft's q/v default), checkpointing on and
    off, micro-batch 1 and 2, sequence 256 and 512, bf16 (torchtune's default) and fp32, the chunked
    loss (8) and the unchunked one, optimizer in backward. `real_size` adds four real-size jobs (~50 s
    each on a loaded 2-core machine: kept out of CI)."""
    from memplan.job import Job
    from memplan.validate.models import cut_config

    def cut(model: str, layers: int, vocab: int | None = None) -> str:
        path = cut_config(model, layers, vocab)
        _NAMES[path] = f"{model.split('/')[-1]}-L{layers}" + (f"-V{vocab}" if vocab else "")
        return path

    l2 = cut("meta-llama/Llama-2-7b-hf", 2)
    l2v = cut("meta-llama/Llama-2-7b-hf", 2, 4096)
    m2 = cut("mistralai/Mistral-7B-v0.1", 2)
    q2 = cut("Qwen/Qwen2.5-7B", 2, 8192)
    g2 = cut("google/gemma-2b", 2, 8192)
    lora = dict(method="lora", adapter_dtype="bf16", lora_targets=LORA_ALL, lora_rank=8, lora_alpha=16)
    lora32 = {**lora, "adapter_dtype": "fp32"}
    full = dict(method="full")
    rows = [
        (l2, full, 1, 256, dict(chunked_loss=8)),
        (l2, full, 2, 512, dict(chunked_loss=0, gradient_checkpointing=True)),
        (l2, lora, 2, 256, dict(chunked_loss=8)),
        (l2, lora, 1, 512, dict(chunked_loss=0, gradient_checkpointing=True)),
        (l2, lora, 2, 512, dict(chunked_loss=8, gradient_checkpointing=True)),
        (l2, {**lora, "lora_targets": ("q_proj", "v_proj")}, 2, 256, dict(chunked_loss=8)),
        (l2v, full, 2, 256, dict(chunked_loss=0, compute_dtype="fp32")),
        (l2v, lora32, 1, 512, dict(chunked_loss=8, compute_dtype="fp32")),
        (l2v, lora, 2, 256, dict(chunked_loss=8, gradient_checkpointing=True)),
        (l2v, full, 2, 256, dict(chunked_loss=8, optimizer_in_backward=True)),
        (l2v, full, 1, 512, dict(chunked_loss=0, optimizer_in_backward=True, gradient_checkpointing=True)),
        (m2, {**lora, "lora_targets": "default"}, 2, 256, dict(chunked_loss=8)),  # the configs' targets
        (m2, full, 1, 512, dict(chunked_loss=8, gradient_checkpointing=True)),
        (q2, lora, 2, 256, dict(chunked_loss=8)),
        (q2, full, 1, 256, dict(chunked_loss=0)),
        (g2, lora, 2, 256, dict(chunked_loss=8)),
        (g2, full, 1, 512, dict(chunked_loss=0)),
    ]
    if real_size:
        rows += [
            ("meta-llama/Llama-2-7b-hf", lora, 2, 512, dict(chunked_loss=8, gradient_checkpointing=True)),
            ("meta-llama/Llama-2-7b-hf", full, 2, 512,
             dict(chunked_loss=8, gradient_checkpointing=True, optimizer_in_backward=True)),
            ("mistralai/Mistral-7B-v0.1", full, 1, 512, dict(chunked_loss=8)),
            ("Qwen/Qwen2.5-7B", lora, 1, 512, dict(chunked_loss=8)),
        ]
    return [Job(model=m, stack="torchtune", micro_batch=b, seq_len=s, **meth, **kw) for m, meth, b, s, kw in rows]


_NAMES: dict[str, str] = {}  # cut config path -> readable name


def label(job) -> str:
    name = _NAMES.get(job.model, job.model.split("/")[-1])
    return (f"{name} {job.method} {job.base_weight_dtype.value} b{job.micro_batch} "
            f"s{job.seq_len} ck{int(job.checkpointing)} k{job.chunked_loss}" + (" inbwd" if job.optimizer_in_backward else "")
            + (f" {'+'.join(job.lora_targets) if isinstance(job.lora_targets, tuple) else job.lora_targets}"
               if job.uses_lora and job.lora_targets != LORA_ALL else ""))


def compare(job, result: dict) -> dict[str, tuple[int, int]]:
    """(estimate, trace) bytes per measured phase of the steady iteration."""
    from memplan import stacks
    from memplan.estimate import estimate_memory
    from memplan.profiles import load_model

    est = estimate_memory(job, load_model(job.model), stack=stacks.get(job.stack).on_cpu()).measured_phases()
    last = max(p["iteration"] for p in result["timeline"])
    trace = {p["phase"]: p["peak_bytes"] for p in result["timeline"] if p["iteration"] == last}
    return {ph: (est[ph], trace[ph]) for ph in PHASES}


def record(path: str) -> None:
    """Trace the matrix (with the real-size job) and append one JSON line per job (trace, estimate
    per phase) to `path`."""
    jobs = matrix(real_size=True)
    for job, r in zip(jobs, trace_jobs(jobs)):
        row = {**r, "label": label(job), "estimate_vs_trace": compare(job, r)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(row["label"], " ".join(f"{ph} {100 * (e - t) / t:+.2f}%" for ph, (e, t) in row["estimate_vs_trace"].items()))


# ---- inside the torchtune venv ------------------------------------------------------------------

def _builder_kwargs(req: dict) -> tuple[object, dict]:
    cfg, family, job = req["config"], req["family"], req["job"]
    lora = job["method"] == "lora"
    kw = dict(
        vocab_size=cfg["vocab_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        embed_dim=cfg["hidden_size"],
        intermediate_dim=cfg["intermediate_size"],
        max_seq_len=cfg["max_position_embeddings"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_base=cfg.get("rope_theta", 10000.0),
    )
    if family == "llama" and kw["rope_base"] == 10000.0:
        # models/llama2/_component_builders.py: lora_llama2 takes no rope_base (10000 throughout)
        from torchtune.models.llama2 import llama2 as base, lora_llama2 as with_lora

        del kw["rope_base"]
    elif family == "llama":  # Llama 3 (rope_theta 500000)
        from torchtune.models.llama3 import llama3 as base, lora_llama3 as with_lora
    elif family == "mistral":
        from torchtune.models.mistral import mistral as base, lora_mistral as with_lora
    elif family == "qwen2":
        from torchtune.models.qwen2 import qwen2 as base, lora_qwen2 as with_lora

        kw["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    elif family == "gemma":  # models/gemma/_component_builders.py: head_dim stated, output tied (TiedLinear)
        from torchtune.models.gemma import gemma as base, lora_gemma as with_lora

        kw["head_dim"] = cfg["head_dim"]
    else:
        raise ValueError(f"family {family!r}: the torchtune trace builds {', '.join(FAMILIES)}")
    if family == "llama" and cfg.get("tie_word_embeddings"):
        raise ValueError("torchtune's llama2 builder has an untied output projection")
    if not lora:
        return base, kw
    kw.update(
        lora_attn_modules=req["lora_attn_modules"],
        apply_lora_to_mlp=req["apply_lora_to_mlp"],
        apply_lora_to_output=False,
        lora_rank=job["lora_rank"],
        lora_alpha=job["lora_alpha"],
        lora_dropout=job["lora_dropout"],
    )
    if family == "gemma":  # lora_gemma: the output is tied to the embedding, no LoRA on it
        del kw["apply_lora_to_output"]
    return with_lora, kw


def build(req: dict):
    """The model as `_setup_model` builds it, on meta."""
    import torch
    from torchtune import modules, training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    job = req["job"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[req["dtype"]]
    builder, kw = _builder_kwargs(req)
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = builder(**kw)
    if job["method"] == "lora":
        set_trainable_params(model, get_adapter_params(model))
    if req["checkpointing"]:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if job["chunked_loss"]:
        model.set_num_output_chunks(job["chunked_loss"])
    return model


def _count(model) -> int:
    """Distinct base-model parameters (a tied output projection is no parameter of its own; LoRA's
    lora_a/lora_b are adapters, not base weights)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)


def trace(req: dict) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from memplan.validate.tracker import LiveBytes

    started = time.perf_counter()
    job = req["job"]
    model = build(req)
    n = _count(model)
    if n != req["expected_params"]:
        raise AssertionError(f"torchtune model has {n} parameters, memplan counts {req['expected_params']}")
    k = job["chunked_loss"]
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=k) if k else torch.nn.CrossEntropyLoss()
    b, s, vocab = job["micro_batch"], job["seq_len"], req["config"]["vocab_size"]
    tracker = LiveBytes()
    timeline: list[dict] = []
    layer_ends: list[int] = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        for m in model.modules():  # full_finetune_distributed.py: rope buffers after to_empty from meta
            if hasattr(m, "rope_init"):
                m.rope_init()
        model.train()
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        in_bwd = job["optimizer_in_backward"]

        def adamw(params):
            return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

        if in_bwd:
            optim_dict = {p: adamw([p]) for p in model.parameters()}
            training.register_optim_in_bwd_hooks(model=model, optim_dict=optim_dict)
            states = lambda: [v for o in optim_dict.values() for st in o.state.values() for v in st.values()]
        else:
            opt = adamw(model.parameters())
            opt.zero_grad()
            states = lambda: [v for st in opt.state.values() for v in st.values()]
        # recipe __init__/setup: ignore_labels_cache = torch.full((batch_size, 1), ignore_index)
        ignore_labels_cache = torch.full((b, 1), IGNORE_INDEX)
        tokens = torch.randint(0, vocab, (b, s))
        tracker.track(ignore_labels_cache)
        tracker.track(tokens)

        def end_of_layer(_mod, _inp, _out):
            layer_ends.append(tracker.current)

        hooks = [layer.register_forward_hook(end_of_layer) for layer in model.layers]
        with tracker:
            for it in range(req["iterations"]):
                batch = {"tokens": tokens, "labels": tokens.clone()}
                num_tokens = 0
                running_loss = 0
                layer_ends.clear()
                # forward: current_num_tokens, then _loss_step(batch) * current_num_tokens
                tracker.start_phase("forward")
                current_num_tokens = (batch["labels"] != IGNORE_INDEX).sum()
                num_tokens += current_num_tokens
                labels = batch.pop("labels")
                logits = model(**batch)
                head = tracker.current
                labels = torch.hstack((labels[..., 1:], ignore_labels_cache[: labels.shape[0]]))
                if not isinstance(logits, list):
                    labels = labels.reshape(-1)
                    logits = logits.reshape(-1, logits.size(-1))
                loss = loss_fn(logits, labels)
                del logits, labels
                current_loss = loss * current_num_tokens
                del loss
                running_loss += current_loss
                timeline.append(_snapshot(tracker, it, "forward", model, states))
                forward_detail = {"layer_ends": list(layer_ends), "after_logits": head}
                tracker.start_phase("backward")
                current_loss.backward()
                del current_loss
                timeline.append(_snapshot(tracker, it, "backward", model, states))
                tracker.start_phase("optimizer step")
                if not in_bwd:
                    training.scale_grads(model, 1 / num_tokens)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                del running_loss, num_tokens, current_num_tokens, batch
                timeline.append(_snapshot(tracker, it, "optimizer step", model, states))
        for h in hooks:
            h.remove()
    steady = [p for p in timeline if p["iteration"] == req["iterations"] - 1]
    top = max(steady, key=lambda p: p["peak_bytes"])
    import torchao
    import torchtune

    return {
        "job": job,
        "peak_allocated_bytes": top["peak_bytes"],
        "peak_phase": top["phase"],
        "timeline": timeline,
        "seconds": time.perf_counter() - started,
        "params": n,
        "detail": forward_detail,
        "versions": {"torch": torch.__version__, "torchtune": torchtune.__version__, "torchao": torchao.__version__},
    }


def _snapshot(tracker, iteration: int, phase: str, model, states) -> dict:
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    st = [v for v in states() if hasattr(v, "untyped_storage") and v.dim() > 0]
    return {
        "iteration": iteration,
        "phase": phase,
        "peak_bytes": tracker.phase_peak,
        "end_bytes": tracker.current,
        "params_bytes": tracker.bytes_of(params),
        "grads_bytes": tracker.bytes_of(grads),
        "optimizer_bytes": tracker.bytes_of(st),
    }


def main() -> None:
    req = json.loads(sys.stdin.read())
    if "traces" in req:
        print(json.dumps({"results": [trace(r) for r in req["traces"]]}))
    else:
        print(json.dumps(trace(req)))


if __name__ == "__main__":
    main()
