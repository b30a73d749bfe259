"""litgpt 0.5.13 on lightning Fabric 2.6: `litgpt finetune_lora` / `litgpt finetune` (full) on one
device, as `litgpt/finetune/lora.py` and `litgpt/finetune/full.py` run them (docs/stacks/litgpt.md).

What differs from transformers + peft + the HF Trainer, as far as memory goes:
- the model is litgpt's own `GPT` (litgpt/model.py): a fused qkv linear, (B, H, T, hd) attention
  layouts, keys and values repeated to every query head before SDPA (`repeat_interleave`), its own
  RMSNorm (litgpt/model.py `RMSNorm`: `weight.float()`), the RoPE tables as fp32 buffers, and for
  Mistral-style configs a sliding-window mask built and saved by every layer;
- LoRA on the fused qkv (litgpt/lora.py `LoRAQKVLinear`): one lora_A for the enabled parts, a
  grouped conv1d for lora_B and, unless q, k and v are all enabled, a zero-padded (B, T, n_qkv)
  scatter of the update (`zero_pad`) whose `index_copy_` keeps its source;
- Fabric's precision plugins convert the model's output to the default dtype (fp32,
  lightning/fabric/wrappers.py `_FabricModule.forward` -> `convert_output`): the logits are fp32
  for every precision; LoRA splits the head along the sequence (`lm_head_chunk_size=128`), the loss
  is `chunked_cross_entropy` (litgpt/utils.py) over 128-row chunks, and `fit()` keeps `logits`
  referenced through backward, the optimizer step and the next forward;
- the default precision is `bf16-mixed` (litgpt/utils.py `get_default_supported_precision`): fp32
  weights and adapters under torch.autocast (a Job: weight_dtype=fp32); `bf16-true` puts everything
  in bf16 (weight_dtype=bf16, adapter_dtype=bf16);
- no activation checkpointing on one device (only the multi-device strategies wrap blocks):
  `checkpoints` is False, so asking for it changes nothing.

LoRA targets: a Job names them in memplan's (transformers) vocabulary and `lora_flags` maps them
onto litgpt's `lora_query/key/value/projection/mlp/head` (docs/stacks/litgpt.md, "LoRA targets").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import MemplanInputError
from .base import LossTerms, Stack

if TYPE_CHECKING:
    from ..activations import Ctx, Saved
    from ..architecture import ModelArch
    from ..job import Job

# litgpt/finetune/lora.py setup(): lora_query=True, lora_key=False, lora_value=True,
# lora_projection=False, lora_mlp=False, lora_head=False
DEFAULT_FLAGS = {"lora_query": True, "lora_key": False, "lora_value": True,
                 "lora_projection": False, "lora_mlp": False, "lora_head": False}
# memplan (transformers) linear name -> litgpt flag; litgpt's lora_mlp adapts every MLP linear at once
_FLAG_OF = {"q_proj": "lora_query", "k_proj": "lora_key", "v_proj": "lora_value", "o_proj": "lora_projection",
            "gate_proj": "lora_mlp", "up_proj": "lora_mlp", "down_proj": "lora_mlp"}
_MLP = ("gate_proj", "up_proj", "down_proj")
# litgpt/finetune/lora.py fit(): model(input_ids, lm_head_chunk_size=128); chunked_cross_entropy's chunk_size=128
HEAD_CHUNK = 128
# the families whose litgpt layer is modelled here (RMSNorm, fused qkv, LLaMAMLP)
FAMILIES = ("llama", "mistral")


def lora_flags(job: "Job", arch: "ModelArch") -> dict[str, bool]:
    """litgpt's LoRA switches for a Job: "default" is litgpt's own default (query and value, which
    is also peft's for Llama and Mistral), "all-linear" every block linear (query, key, value,
    projection, mlp; not the head, as peft's all-linear), or memplan linear names, where the MLP's
    three linears go together (litgpt has one switch for them)."""
    from ..training import resolve_targets

    if job.lora_targets == "default":
        return dict(DEFAULT_FLAGS)
    targets = resolve_targets(job, arch)
    flags = {k: False for k in DEFAULT_FLAGS}
    for name in targets:
        if name not in _FLAG_OF:
            raise MemplanInputError(f"LoRA target {name!r} has no litgpt switch; allowed: {', '.join(_FLAG_OF)}")
        flags[_FLAG_OF[name]] = True
    mlp = [n for n in _MLP if n in targets]
    if mlp and len(mlp) != len(_MLP):
        raise MemplanInputError(
            f"litgpt adapts the MLP's linears together (lora_mlp): name all of {', '.join(_MLP)} or none, got {', '.join(mlp)}")
    return flags


def _targets(ctx: "Ctx") -> dict[str, bool]:
    t = ctx.targets
    return {"q": "q_proj" in t, "k": "k_proj" in t, "v": "v_proj" in t, "proj": "o_proj" in t, "mlp": "gate_proj" in t}


@dataclass(frozen=True)
class Litgpt(Stack):
    name: str = "litgpt"
    label: str = "litgpt 0.5.13 + lightning Fabric"
    sources: str = "litgpt 0.5.13, lightning 2.6.6"
    bnb_rule: str = "every nn.Linear of the blocks (lightning BitsandbytesPrecision); not traced"
    features: tuple[str, ...] = ()

    def default_weight_dtype(self, job: "Job") -> "DType":
        """litgpt's default training precision is `bf16-mixed` (litgpt/utils.py
        `get_default_supported_precision(training=True)`): fp32 weights under autocast in the
        16-bit compute dtype. `--weight-dtype bf16` is `--precision bf16-true`."""
        from ..dtypes import DType

        if job.method == "qlora":
            return DType.nf4
        if job.task != "train":  # (refused by check: litgpt's generation is not modelled)
            return job.compute_dtype
        return DType.fp32 if job.compute_dtype is not DType.fp32 else job.compute_dtype

    def default_adapter_dtype(self, job: "Job") -> "DType":
        """The adapters are built with the model and converted with it: the weights' dtype."""
        w = job.base_weight_dtype
        return w if w.is_float else job.compute_dtype

    def check(self, job: "Job", arch: "ModelArch") -> None:
        """What litgpt cannot run, or memplan does not model for it, refused in one line each."""
        if arch.family not in FAMILIES:
            raise MemplanInputError(
                f"the litgpt stack models {', '.join(FAMILIES)} layers so far, not {arch.family} ({arch.name})")
        if job.task != "train":
            raise MemplanInputError("the litgpt stack models finetuning (litgpt finetune_lora / finetune), not "
                                    "inference: use --stack transformers-5 for generation")
        if job.method == "qlora":
            raise MemplanInputError("litgpt's QLoRA (--quantize bnb.nf4) is not modelled: its bitsandbytes path "
                                    "cannot be traced under fake tensors; use --method lora or full")
        if job.attention != "sdpa":
            raise MemplanInputError("litgpt's attention is always SDPA: drop --attention eager")

    def checkpoints(self, arch: "ModelArch") -> bool:
        """litgpt checkpoints no block on one device: finetune/full.py:107-116 and finetune/lora.py:152-164
        build a checkpointing strategy only for devices * num_nodes > 1 (FSDPStrategy's
        activation_checkpointing_policy={Block}; parallelize_fn's checkpoint_wrapper), else
        strategy="auto". A one-GPU job asking for checkpointing is estimated without it (as it runs)."""
        return False

    # --- activations ---------------------------------------------------------------------------
    def layer_saved(self, arch: "ModelArch", ctx: "Ctx") -> "Saved":
        """One litgpt `Block` (litgpt/model.py `Block.forward`, `CausalSelfAttention.forward`,
        `RMSNorm.forward`, `LLaMAMLP.forward`; LoRA: litgpt/lora.py `LoRAQKVLinear.forward`,
        `LoRALinear.forward`), read off the CPU trace op by op (docs/stacks/litgpt.md, "Per layer")."""
        t, h, i = ctx.tokens, arch.hidden, arch.intermediate
        qw, kvw = arch.q_width, arch.kv_width
        nqkv = qw + 2 * kvw
        mixed = ctx.autocast or ctx.lora_autocast  # bf16-mixed: fp32 weights and stream under autocast
        a = ctx.act_bytes  # what a linear outputs (the compute dtype)
        la = 2 if mixed else ctx.adapter_bytes  # the LoRA branch's dtype (autocast casts it to bf16)
        tg = _targets(ctx)
        r = ctx.rank
        full = ctx.base_trains
        weights_fp32 = mixed or a == 4
        saved: dict[str, int] = {}

        def norm(prefix: str, grad: bool) -> None:
            # RMSNorm: x.float(); mean(x * x); x * rsqrt(...); (x_normed * weight.float()).to(dtype)
            if grad:
                saved[f"{prefix}.fp32_input"] = 4 * t * h
                saved[f"{prefix}.rsqrt"] = 4 * t
                if not weights_fp32:
                    saved[f"{prefix}.weight_fp32"] = 4 * h  # weight.float() of a 16-bit weight, kept by the mul
            if full:
                saved[f"{prefix}.normed_fp32"] = 4 * t * h  # x_normed, kept for the weight's gradient

        def linear_in(name: str, d_in: int, consumers: int = 1) -> None:
            # a trainable linear keeps its input; under autocast each consumer its own 16-bit cast
            # of the fp32 norm output
            if full:
                saved[f"{name}.input"] = t * d_in * a * (consumers if mixed else 1)

        def lora_plain(name: str, d_in: int, shared: str, fp32_source: bool = False, grad: bool = True) -> None:
            # LoRALinear: (x @ A.T @ B.T) * scaling keeps x and x @ A.T; under autocast an fp32
            # input (a norm's output) is cast to bf16 for each adapter, a 16-bit one is kept as is.
            # With dropout, lora_A keeps the dropped copy, and the dropout its mask only where its
            # input needs a gradient (`grad`)
            if ctx.lora_dropout > 0:
                # under autocast lora_A keeps its bf16 cast of the fp32 dropped copy, and the
                # dropout's mask is in its input's dtype (fp32) on the CPU, a bool on CUDA
                upcast = mixed and fp32_source
                saved[f"{name}.lora_dropout_out"] = t * d_in * (la if upcast else a)
                if grad:
                    saved[f"{name}.lora_dropout_mask"] = t * d_in * ctx.dropout_mask(4 if upcast else a)
            elif mixed and fp32_source:
                saved[f"{name}.lora_input_cast"] = t * d_in * la
            else:
                saved[shared] = t * d_in * a
            saved[f"{name}.lora_A_out"] = t * r * la

        # grad_in: the layer input needs a gradient (not so for layer 0 of frozen-embedding LoRA)
        norm("norm_1", ctx.grad_in)
        linear_in("qkv", h)
        enabled = [tg["q"], tg["k"], tg["v"]]
        lora_qkv = any(enabled)
        if lora_qkv:
            lora_plain("qkv", h, "norm_1.out", fp32_source=True, grad=ctx.grad_in)
            widths = [qw * tg["q"], kvw * tg["k"], kvw * tg["v"]]
            saved["qkv.lora_A_out"] = t * r * sum(enabled) * la
            if not all(enabled):
                # zero_pad: index_copy_ keeps its source (the conv1d output) and a clone of lora_ind
                saved["qkv.lora_B_out"] = t * sum(widths) * la
                saved["qkv.lora_ind"] = 8 * sum(widths)
        attn_grad = ctx.grad_in or full or lora_qkv
        if attn_grad:
            # q and k are rebuilt by torch.cat after RoPE (contiguous (B, H, T, hd)); grouped keys
            # and values are repeated to every query head; with one group per head, v stays a view
            # of the fused qkv output, which SDPA keeps whole
            saved["attn.q"] = t * qw * a
            if arch.kv_heads != arch.heads:
                saved["attn.k_repeated"] = t * qw * a
                saved["attn.v_repeated"] = t * qw * a
            else:
                saved["attn.k"] = t * kvw * a
                saved["attn.qkv_out"] = t * nqkv * a
            saved["attn.out"] = t * qw * a
            saved["attn.lse"] = 4 * ctx.batch * arch.heads * ctx.seq
            if arch.sliding_window:
                # every layer builds its own (1, 1, T, T) sliding-window mask in q's dtype; SDPA keeps it
                saved["attn.sliding_mask"] = ctx.seq * ctx.seq * a
        # proj: y.transpose(1, 2).reshape(B, T, C) is a contiguous copy, kept if proj trains
        linear_in("proj", qw)
        if tg["proj"]:
            lora_plain("proj", qw, "proj.input")
        mlp_grad = attn_grad or tg["proj"]
        norm("norm_2", mlp_grad)
        linear_in("mlp.fc", h, consumers=2)
        if tg["mlp"]:
            lora_plain("mlp.fc_1", h, "norm_2.out", fp32_source=True, grad=mlp_grad)
            lora_plain("mlp.fc_2", h, "norm_2.out", fp32_source=True, grad=mlp_grad)
        if mlp_grad or tg["mlp"]:
            # F.silu(x_fc_1) * x_fc_2
            saved["mlp.gate_out"] = t * i * a
            saved["mlp.act_out"] = t * i * a
            saved["mlp.up_out"] = t * i * a
        linear_in("mlp.proj", i)
        if tg["mlp"]:
            lora_plain("mlp.proj", i, "mlp.product")
        if ctx.lora_autocast:
            # autocast caches a bf16 cast of every fp32 adapter weight (trainable leaves), kept for backward
            adapters = 0
            if lora_qkv:
                adapters += r * sum(enabled) * h + r * sum(widths)
            if tg["proj"]:
                adapters += r * (qw + h)
            if tg["mlp"]:
                adapters += 2 * r * (h + i) + r * (i + h)
            saved["lora.autocast_weight_casts"] = adapters * 2
        if ctx.lora_autocast and not ctx.grad_in:
            # bf16-mixed LoRA, layer 0: a frozen linear whose input needs no gradient keeps nothing,
            # so autocast's bf16 cast of its weight (which the core counts for every frozen matmul,
            # training.py autocast_weight_copies) dies at once: the fused qkv always, the projection
            # and the MLP where no adapter upstream makes their input need a gradient
            unkept = h * nqkv
            if not attn_grad:
                unkept += qw * h
            if not mlp_grad:
                unkept += 2 * h * i
            if not (mlp_grad or tg["mlp"]):
                unkept += i * h
            saved["autocast.unkept_weight_casts"] = -unkept * 2
        return saved

    def _fused(self, ctx: "Ctx") -> "Ctx":
        import dataclasses

        from ..attention import Kernel

        return dataclasses.replace(ctx, attention=Kernel.fused)

    def layer_backward_transient(self, arch: "ModelArch", ctx: "Ctx", saved: "Saved") -> int:
        """The core's rule with a fused SDPA kernel always: litgpt repeats grouped keys and values to
        every head itself (litgpt/model.py:538-539) and never passes enable_gqa, so no dtype sends it to
        SDPA's math kernel (the core's rule for transformers' grouped fp32 attention on CUDA); with a
        sliding-window mask CUDA takes the memory-efficient kernel, O(T) state plus the saved mask."""
        return super().layer_backward_transient(arch, self._fused(ctx), saved)

    def layer_forward_transient(self, arch: "ModelArch", ctx: "Ctx", saved: "Saved", checkpointed: bool) -> int:
        """As `layer_backward_transient`: a fused kernel, no materialised scores."""
        return super().layer_forward_transient(arch, self._fused(ctx), saved, checkpointed)

    # --- loss ----------------------------------------------------------------------------------
    def loss(self, job: "Job", arch: "ModelArch", tokens: int, logit_bytes: int) -> LossTerms:
        """lm_head, Fabric's output conversion and `chunked_cross_entropy` (litgpt/utils.py), in
        `fit()` (finetune/lora.py lines 354-358, finetune/full.py lines 282-284)."""
        v = arch.vocab
        b, s = job.micro_batch, job.seq_len
        lora = job.uses_lora
        # lm_head's output: the compute dtype (bf16-true weights, or autocast over fp32 ones)
        la = 4 if job.compute_dtype.value == "fp32" else 2
        logits = tokens * v * 4  # Fabric's convert_output: fp32 logits, kept by fit() until the next forward
        shifted = b * (s - 1) * v * 4  # the log-softmax of every row but the last of each sequence
        # forward high point: at the output conversion the 16-bit logits beside their fp32 copy (and
        # the previous step's logits, `held`), or later the fp32 logits beside every chunk's log-softmax
        convert = tokens * v * la + logits if la != 4 else logits
        # bf16-mixed LoRA: the frozen fp32 head is cast to bf16 again for every chunk of the head
        # (autocast caches casts of trainable leaves only) and each chunk's linear keeps its cast;
        # the core counts one
        chunks = -(-s // HEAD_CHUNK) if lora else 1
        head_casts = (chunks - 1) * v * arch.hidden * 2 if (lora and job.mixed_precision) else 0
        # full fine-tuning: for B > 1, `logits[..., :-1, :]` is not contiguous and chunked_cross_entropy's
        # reshape copies it, beside the log-softmax it feeds
        # LoRA: the last chunk, shifted, is copied the same way beside every chunk's log-softmax
        last = s - HEAD_CHUNK * (chunks - 1)
        copy = 0 if b == 1 else (b * (last - 1) * v * 4 if lora else shifted)
        fwd = max(convert, shifted + copy) + head_casts
        # loss backward: every chunk's log-softmax, plus one chunk's two fp32 gradients
        rows = b * min(HEAD_CHUNK, s) if lora else min(HEAD_CHUNK, b * (s - 1))
        bwd = shifted + 2 * rows * v * 4 + head_casts
        return LossTerms(
            forward=fwd,
            backward=bwd,
            held=logits,
            formula=(f"{tokens:,} tokens x {v:,} vocab: fp32 logits (Fabric's output conversion) held by fit() "
                     "through the step, fp32 log-softmax of every 128-row chunk"
                     + (f"; {chunks - 1} more bf16 casts of the frozen head, one per head chunk" if head_casts else "")),
        )
