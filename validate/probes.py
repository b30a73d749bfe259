"""Checks of what the libraries actually do, which the estimate takes as given.

`python -m memplan.validate.probes [--device cuda] [--out FILE]` prints one JSON line per check:
- which linear layers transformers' bitsandbytes loading leaves unquantized (runs on the meta
  device, so anywhere);
- which scaled-dot-product-attention kernel PyTorch dispatches to for each model's attention, in
  each dtype a job can run it in (on the GPU this decides whether the scores are materialised).
"""

from __future__ import annotations

import argparse
import json
import sys

SDPA_OPS = ("flash", "efficient", "cudnn", "math", "overrideable")


def unquantized_linears(model_name: str) -> dict:
    """Weight matrices (2-D and fused 3-D expert tensors) outside the embeddings and lm_head that
    `replace_with_bnb_linear` leaves in 16 bits, by owning module type."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from .models import hf_config, meta_model

    model = meta_model(hf_config(model_name, "sdpa"), torch.bfloat16)
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"],
                            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    kept: dict[str, int] = {}
    quantized = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head") or isinstance(module, torch.nn.Embedding):
            continue
        kind = type(module).__name__
        for param in module.parameters(recurse=False):
            if param.dim() < 2:  # norms and biases are never quantized
                continue
            if kind in ("Linear4bit", "Linear8bitLt"):
                quantized += param.numel() * (2 if kind == "Linear4bit" else 1)  # packed 4-bit: two per byte
            else:  # 2-D linears of other types, and fused 3-D expert tensors
                kept[kind] = kept.get(kind, 0) + param.numel()
    return {"check": "unquantized_linears", "model": model_name, "quantized_params": quantized, "kept_params_by_type": kept}


def sdpa_kernel(model_name: str, device: str, dtype: str, autocast: bool, batch: int = 1, seq: int = 1024) -> dict:
    """The aten attention ops one layer's forward and backward dispatch to, read off the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from transformers import AutoModelForCausalLM

    from .models import DTYPES, cut_config, hf_config

    cfg = hf_config(cut_config(model_name, 1), "sdpa")

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else torch.autocast(device, enabled=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key.lower()})
    kernel = next((k for k in SDPA_OPS if any(k in op for op in ops if op.startswith("aten::_scaled_dot_product"))), None)
    if kernel is None and any("scaled_dot_product" in op for op in ops):
        kernel = "math"
    return {"check": "sdpa_kernel", "model": model_name, "device": device, "dtype": dtype, "autocast": autocast,
            "batch": batch, "seq": seq, "kernel": kernel, "ops": ops}


def op_timeline(model_name: str, device: str, dtype: str, batch: int, seq: int, job: dict | None = None,
                window: int = 25) -> dict:
    """One decoder layer's forward and backward on real tensors, every op's live bytes recorded:
    the peak of each phase above the model's own bytes, and the ops leading up to it."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import DTYPES, cut_config, hf_config
    from .tracker import LiveBytes

    class Recording(LiveBytes):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self.ops.append((self.phase, str(func.overloadpacket.__name__), self.current))
            return out

    if job is None:
        cfg = hf_config(cut_config(model_name, 1), "sdpa")
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
        model.train()
    else:  # the job's own build (quantization, kbit prepare, LoRA, checkpointing), cut to one layer
        from memplan.job import Job
        from memplan.profiles import load_model

        from .build import build

        job = Job.model_validate({**job, "model": cut_config(job["model"], 1)})
        model = build(job, load_model(job.model), device)
        cfg = model.config
    # the layer alone: embeddings frozen and the loss replaced by a sum, so the vocab-wide tensors
    # stay out of the record
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    hidden = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    layer = next(m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block")))
    pos = torch.arange(seq, device=device).unsqueeze(0)
    kwargs = {}
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is not None:
        kwargs["position_embeddings"] = rotary(hidden, pos)
    import inspect

    if "alibi" in inspect.signature(layer.forward).parameters:
        kwargs["alibi"] = None
    tracker = Recording()
    for t in [*model.parameters(), *model.buffers(), hidden, *kwargs.get("position_embeddings", ())]:
        tracker.track(t)
    base = tracker.current
    with tracker:
        tracker.start_phase("forward")
        out = layer(hidden, attention_mask=None, position_ids=pos, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        loss = out.float().sum()
        tracker.start_phase("backward")
        loss.backward()
    report = {"check": "op_timeline", "model": model_name, "device": device, "dtype": dtype, "batch": batch, "seq": seq,
              "job": job.model_dump(mode="json", exclude_defaults=True) if job is not None else None}
    for phase in ("forward", "backward"):
        ops = [(i, o) for i, o in enumerate(tracker.ops) if o[0] == phase]
        top = max(ops, key=lambda x: x[1][2])
        report[f"{phase}_peak_bytes"] = top[1][2] - base
        report[f"{phase}_ops"] = [f"{o[1]}:{o[2] - base}" for _, o in ops[max(0, top[0] - ops[0][0] - window): top[0] - ops[0][0] + 3]]
    return report


PROBE_MODELS = ("falcon-7b", "starcoder", "gemma-2b", "llama-3-8b", "llama-2-7b", "mistral-7b", "phi-2")
# (weights dtype, autocast): bf16 LoRA/full; QLoRA's fp32 stream after prepare_model_for_kbit_training,
# without and with the Trainer's bf16 autocast
SDPA_CASES = (("bf16", False), ("fp32", False), ("fp32", True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--timeline", default=None, metavar="DTYPE:BATCH:SEQ",
                        help="instead of the probes, one layer's op timeline per model, e.g. fp32:4:2048")
    parser.add_argument("--job", default=None, help="with --timeline: a Job (JSON), built as the harness builds it, cut to one layer")
    args = parser.parse_args(argv)
    if args.timeline and args.job:
        dtype, batch, seq = args.timeline.split(":")
        job = json.loads(args.job)
        _emit(lambda: op_timeline(job["model"], args.device, dtype, int(batch), int(seq), job=job), args.out)
        return 0
    if args.timeline:
        dtype, batch, seq = args.timeline.split(":")
        for m in args.model or PROBE_MODELS:
            _emit(lambda m=m: op_timeline(m, args.device, dtype, int(batch), int(seq)), args.out)
        return 0
    models = args.model or PROBE_MODELS
    checks = [lambda m=m: unquantized_linears(m) for m in models]
    checks += [lambda m=m, d=d, a=a: sdpa_kernel(m, args.device, d, a) for m in models for d, a in SDPA_CASES]
    for check in checks:
        _emit(check, args.out)
    return 0


def _emit(check, out: str | None) -> None:
    try:
        line = json.dumps(check())
    except Exception as exc:  # one failed probe does not hide the others
        line = json.dumps({"check": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
