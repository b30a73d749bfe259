"""CPU trace of litgpt 0.5.13's own finetune step under fake tensors, run inside the litgpt venv
(memplan.validate.stack_envs): `python -m memplan.validate.stacks.litgpt_trace`, one JSON request on
stdin, one JSON line on stdout.

Request: {"job": Job JSON, "base_model": memplan model name the litgpt config is found by
(`Config.from_name` takes the HF "org/name"; default job.model, give it when job.model is a cut
config file), "layers": n_layer override, "vocab": vocabulary override (vocab_size =
padded_vocab_size), "iterations": 2, "layer_delta": true to trace a second model with one more
layer and report what one layer adds, "marks": true for the live bytes at every block's and the
head's forward/backward start and end}; or {"requests": [request, ...]} for several in one process
(reply {"results": [...]}). Reply: the steady-state timeline (validate/trace.py TraceResult's shape),
litgpt's parameter counts (base, LoRA, trainable), the Fabric precision, the logits' dtype, the LoRA
switches used and the library versions.

The step is litgpt's, through a real lightning Fabric on the CPU accelerator:
- model built as `finetune/lora.py main()` / `finetune/full.py main()` do: `fabric.init_module()`
  (the precision's default dtype: bf16 for bf16-true, fp32 for bf16-mixed) here on meta, then
  `mark_only_lora_as_trainable` (LoRA), `fabric.setup_module` (bf16-true: `module.to(bf16)`),
  `model.max_seq_length = T` as `fit()` sets it (rebuilds the fp32 RoPE cache).
- optimizer `instantiate_torch_optimizer("AdamW", model.parameters())`: torch.optim.AdamW with its
  defaults, whose foreach=None resolves to foreach on CUDA (torch optim/optimizer.py
  `_default_to_fused_or_foreach`); on the CPU trace it would resolve to the per-tensor loop, so the
  job's `foreach` is passed explicitly.
- LoRA (`finetune/lora.py fit()` lines 354-365): `logits = model(input_ids, lm_head_chunk_size=128)`;
  `logits[-1] = logits[-1][..., :-1, :]`; `loss = chunked_cross_entropy(logits, targets[..., 1:])`;
  `fabric.backward(loss)`; `optimizer.step()`; `optimizer.zero_grad()`.
  Full (`finetune/full.py fit()` lines 282-291): `logits = model(input_ids)`;
  `loss = chunked_cross_entropy(logits[..., :-1, :], targets[..., 1:])`; same backward and step.
  `logits` and `loss` stay referenced (locals of the loop) until the next forward returns.
Phases: "forward" (model forward and loss), "backward", "optimizer step" (step + zero_grad).
"""

from __future__ import annotations

import json
import sys
import time

PHASES = ("forward", "backward", "optimizer step")

# finetune/lora.py setup(): lora_query=True, lora_key=False, lora_value=True, lora_projection=False,
# lora_mlp=False, lora_head=False
LORA_FLAGS = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")


def precision_of(job) -> str:
    """The Fabric precision string a memplan Job describes (bf16-mixed: fp32 weights under bf16
    autocast, litgpt's default; bf16-true: bf16 weights; 32-true)."""
    w, c = job.base_weight_dtype.value, job.compute_dtype.value
    if w == "fp32" and c == "bf16":
        return "bf16-mixed"
    if w == "fp32" and c == "fp32":
        return "32-true"
    if w == "bf16" and c == "bf16":
        return "bf16-true"
    if w == "fp16" and c == "fp16":
        return "16-true"
    if w == "fp32" and c == "fp16":
        return "16-mixed"
    raise ValueError(f"litgpt has no precision for {w} weights with {c} compute")


def refusal(job) -> str | None:
    if job.task != "train":
        return "the litgpt trace runs training steps only"
    if job.quantized:
        return "litgpt's bitsandbytes quantization cannot run under fake tensors (Params4bit)"
    if job.optimizer != "adamw":
        return f"litgpt's default optimizer is AdamW; {job.optimizer!r} is not traced"
    if job.checkpointing:
        return ("litgpt has no activation checkpointing on one device (only its multi-device strategies: "
                "finetune/full.py FSDPStrategy(activation_checkpointing_policy={Block}), finetune/lora.py "
                "parallelize_fn checkpoint_wrapper)")
    if job.num_gpus != 1:
        return "the litgpt trace runs one device"
    if job.uses_lora:
        weights = {"bf16-mixed": "fp32", "32-true": "fp32", "16-mixed": "fp32"}.get(precision_of(job),
                                                                                  job.base_weight_dtype.value)
        if job.lora_dtype.value != weights:
            return (f"litgpt builds the adapters in the weights' dtype ({weights}), "
                    f"got adapter dtype {job.lora_dtype.value}")
    return None


def build(job, base_model: str, layers: int | None, vocab: int | None, flags: dict):
    import torch

    from litgpt import lora as litlora
    from litgpt.config import Config
    from litgpt.model import GPT

    kwargs: dict = {}
    if layers:
        kwargs["n_layer"] = layers
    if vocab:
        kwargs["vocab_size"] = vocab
        kwargs["padded_vocab_size"] = vocab
    init_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision_of(job), torch.float32)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype)  # fabric.init_module(): the precision's tensor_init_context
    try:
        with torch.device("meta"):
            if job.uses_lora:
                cfg = litlora.Config.from_name(base_model, lora_r=job.lora_rank, lora_alpha=job.lora_alpha,
                                               lora_dropout=job.lora_dropout, **flags, **kwargs)
                model = litlora.GPT(cfg)
                litlora.mark_only_lora_as_trainable(model)
            else:
                cfg = Config.from_name(base_model, **kwargs)
                model = GPT(cfg)
    finally:
        torch.set_default_dtype(saved)
    return model


def _add_marks(model, tracker, marks: list) -> None:
    """Live bytes (and the running phase peak) as each block and the head start and end their
    forward and backward: where inside a phase its high point lies."""
    inner = model.module
    mods = [("lm_head", inner.lm_head), ("ln_f", inner.transformer.ln_f)] + [
        (f"h.{i}", blk) for i, blk in enumerate(inner.transformer.h)]

    def mark(tag):
        def hook(*_args, **_kw):
            marks.append((tag, tracker.phase, tracker.current, tracker.phase_peak))
        return hook

    for name, m in mods:
        m.register_forward_pre_hook(mark(f"{name} fwd start"))
        m.register_forward_hook(mark(f"{name} fwd end"))
        m.register_full_backward_pre_hook(mark(f"{name} bwd start"))
        m.register_full_backward_hook(mark(f"{name} bwd end"))


def trace(job, base_model: str, layers, vocab, flags: dict, iterations: int, want_marks: bool = False) -> dict:
    import lightning as L
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer

    from memplan.validate.tracker import LiveBytes

    precision = precision_of(job)
    model = build(job, base_model, layers, vocab, flags)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    tracker = LiveBytes()
    timeline = []
    B, T = job.micro_batch, job.seq_len
    V = model.config.padded_vocab_size
    # setup_module on the meta model (its precision's convert_module is a no-op: fabric.init_module already
    # built it in that dtype; a second .to() on fake parameters fails to swap them), then storage for all
    model = fabric.setup_module(model, move_to_device=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        model.max_seq_length = T  # fit(): model.max_seq_length = min(longest_seq_length, ...)
        model.train()
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        opt = instantiate_torch_optimizer("AdamW", model.parameters())
        for group in opt.param_groups:
            group["foreach"] = job.foreach
        opt = fabric.setup_optimizers(opt)
        marks: list = []
        if want_marks:
            _add_marks(model, tracker, marks)
        input_ids = torch.randint(0, V, (B, T))
        targets = torch.randint(0, V, (B, T))
        with tracker:
            logits = loss = None
            for it in range(iterations):
                for phase in PHASES:
                    tracker.start_phase(phase)
                    if phase == "forward":
                        if job.uses_lora:
                            logits = model(input_ids, lm_head_chunk_size=128)
                            logits[-1] = logits[-1][..., :-1, :]
                            loss = chunked_cross_entropy(logits, targets[..., 1:])
                        else:
                            logits = model(input_ids)
                            loss = chunked_cross_entropy(logits[..., :-1, :], targets[..., 1:])
                    elif phase == "backward":
                        fabric.backward(loss)
                    else:
                        opt.step()
                        opt.zero_grad()
                    timeline.append(_snapshot(tracker, it, phase, model, opt))
    logits_dtype = str((logits[0] if isinstance(logits, list) else logits).dtype)
    return {"timeline": timeline, "base_params": base_params, "lora_params": lora_params,
            "trainable_params": trainable, "precision": precision, "padded_vocab": V,
            "n_layer": model.config.n_layer, "logits_dtype": logits_dtype, "marks": marks}


def _snapshot(tracker, iteration, phase, model, opt) -> dict:
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for st in opt.optimizer.state.values() for v in st.values()
              if hasattr(v, "untyped_storage") and v.dim() > 0]
    return {"iteration": iteration, "phase": phase, "peak_bytes": tracker.phase_peak, "end_bytes": tracker.current,
            "params_bytes": tracker.bytes_of(params), "grads_bytes": tracker.bytes_of(grads),
            "optimizer_bytes": tracker.bytes_of(states)}


def lora_flags(job) -> dict:
    if not job.uses_lora:
        return {}
    try:
        from memplan.stacks.litgpt import lora_flags as resolve
    except ImportError:  # before the Stack seam: litgpt's own defaults only
        if job.lora_targets != "default":
            raise
        return {"lora_query": True, "lora_key": False, "lora_value": True,
                "lora_projection": False, "lora_mlp": False, "lora_head": False}
    from memplan.profiles import load_model

    return resolve(job, load_model(job.model))


def main() -> None:
    """One request, or {"requests": [...]} for several in one process (litgpt's import takes
    seconds): {"results": [...]} in the same order."""
    request = json.loads(sys.stdin.read())
    if "requests" in request:
        print(json.dumps({"results": [run_one(r) for r in request["requests"]]}))
    else:
        print(json.dumps(run_one(request)))


def run_one(request: dict) -> dict:
    import lightning
    import torch

    from memplan.job import Job

    job = Job.model_validate(request["job"])
    why = refusal(job)
    if why:
        raise ValueError(why)
    base = request.get("base_model") or job.model
    layers, vocab = request.get("layers"), request.get("vocab")
    iterations = int(request.get("iterations", 2))
    flags = lora_flags(job)
    started = time.perf_counter()
    result = trace(job, base, layers, vocab, flags, iterations, bool(request.get("marks")))
    steady = [s for s in result["timeline"] if s["iteration"] == iterations - 1]
    top = max(steady, key=lambda s: s["peak_bytes"])
    out = {"job": request["job"], "peak_allocated_bytes": top["peak_bytes"], "peak_phase": top["phase"],
           "timeline": result["timeline"], "lora_flags": flags,
           **{k: v for k, v in result.items() if k not in ("timeline", "marks")}}
    if request.get("marks"):
        out["marks"] = result["marks"]
    if request.get("layer_delta"):
        n = result["n_layer"]
        more = trace(job, base, n + 1, vocab, flags, iterations)
        fwd = [s for s in result["timeline"] if s["iteration"] == iterations - 1 and s["phase"] == "forward"][0]
        fwd1 = [s for s in more["timeline"] if s["iteration"] == iterations - 1 and s["phase"] == "forward"][0]
        # bytes one more decoder layer keeps at the end of the forward, beyond its parameters
        out["layer_saved_bytes"] = (fwd1["end_bytes"] - fwd1["params_bytes"]) - (fwd["end_bytes"] - fwd["params_bytes"])
        out["layer_params_bytes"] = fwd1["params_bytes"] - fwd["params_bytes"]
        out["layer_delta_peaks"] = {s["phase"]: s2["peak_bytes"] - s["peak_bytes"]
                                    for s, s2 in zip(steady, [x for x in more["timeline"]
                                                              if x["iteration"] == iterations - 1])}
    out["seconds"] = time.perf_counter() - started
    out["versions"] = {"litgpt": _version("litgpt"), "lightning": lightning.__version__, "torch": torch.__version__}
    return out


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
