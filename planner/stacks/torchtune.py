"""torchtune 0.6.1 (+ torchao 0.11.0): its single-device recipes, as memory goes.

recipes/lora_finetune_single_device.py and recipes/full_finetune_single_device.py build the model
with torchtune's own modules in one dtype (`training.set_default_dtype(bf16)`: weights, LoRA
adapters, activations; no autocast), train with the configs' `torch.optim.AdamW(fused=True)` (or
one AdamW per parameter stepped inside backward, `optimizer_in_bwd`), and take the loss as
`CEWithChunkedOutputLoss` over `model.set_num_output_chunks(8)` chunks (Job.chunked_loss). Each
override cites the file it follows; docs/stacks/torchtune.md has one section per rule, and
tests/test_stack_torchtune.py holds them to the trace of the real step (validate/stacks/
torchtune_trace.py) per phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import LossTerms, Stack

ROUND = 512  # the CUDA caching allocator's (and the trace's) block


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


@dataclass(frozen=True)
class Torchtune(Stack):
    name: str = "torchtune"
    label: str = "torchtune 0.6.1 single-device recipes"
    sources: str = "torchtune 0.6.1, torchao 0.11.0"
    # optimizer_in_bwd, CEWithChunkedOutputLoss, enable_activation_offloading (the OffloadActivations
    # TRL copied: planner/offload.py)
    features: tuple[str, ...] = ("optimizer_in_backward", "chunked_loss", "activation_offloading")

    # torchtune's model builders memplan models (models/llama2, llama3, mistral, qwen2_5, gemma)
    families: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma")

    def check(self, job, arch) -> None:
        """What the single-device recipes cannot run, or memplan does not model for them."""
        from ..errors import MemplanInputError

        if arch.family not in self.families:
            raise MemplanInputError(f"the torchtune stack models {', '.join(self.families)} builders, not "
                                    f"{arch.family} ({arch.name})")
        if job.task != "train":
            raise MemplanInputError("the torchtune stack models the finetuning recipes, not generation: use "
                                    "--stack transformers-5 for inference")
        if job.num_gpus > 1 or job.sharding != "none":
            raise MemplanInputError("the torchtune stack models the single-device recipes (lora_finetune_single_device, "
                                    "full_finetune_single_device): use --num-gpus 1 --sharding none")
        if job.method == "qlora":
            raise MemplanInputError("torchtune's QLoRA (torchao NF4Tensor, qlora_* builders) is not modelled: use "
                                    "--method lora or full, or --stack transformers-5")

    def default_adapter_dtype(self, job):
        """The LoRA builders run under `training.set_default_dtype(dtype)` (recipes'
        `_setup_model`): adapters in the recipe's dtype, the weights'."""
        w = job.base_weight_dtype
        return w if w.is_float else job.compute_dtype

    def lora_targets(self, job, arch) -> tuple[str, ...]:
        """"default" is what the recipes' configs adapt, not peft's q/v: `lora_attn_modules:
        ['q_proj', 'v_proj', 'output_proj']` and `apply_lora_to_mlp: True`
        (recipes/configs/llama2/7B_lora_single_device.yaml; the same in mistral, qwen2_5, gemma
        configs), in memplan's (HF) names. Explicit names are the job's."""
        if job.lora_targets != "default":
            return super().lora_targets(job, arch)
        names = {lin.name for lin in arch.linears}
        wanted = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return tuple(n for n in wanted if n in names)

    def buffer_bytes(self, job, arch) -> int:
        """RoPE tables for `max_seq_len` positions, fp32 (modules/position_embeddings.py
        `RotaryPositionalEmbeddings.rope_init`/`build_rope_cache`: `theta` of head_dim/2 and
        `cache` of max_seq_len x head_dim/2 x 2 (cos, sin)); Qwen2's
        (models/qwen2/_positional_embeddings.py) caches cos and sin over the whole head_dim,
        max_seq_len x head_dim x 2. The full model shares one instance across layers
        (models/llama2/_component_builders.py `llama2`: `rope = ...` before the layer loop); the
        LoRA builders make one per layer (`lora_llama2_self_attention`: `rope = ...` inside, called
        once per layer; the same in mistral, llama3, qwen2)."""
        half = arch.rotary_dim // 2
        per_position = 2 * arch.rotary_dim if arch.family == "qwen2" else 2 * half
        one = _rounded(half * 4) + _rounded(arch.max_positions * per_position * 4)
        return one * (arch.layers if job.uses_lora else 1)

    def buffers_formula(self, job, arch) -> str:
        shape = "max_seq_len x head_dim x 2" if arch.family == "qwen2" else "max_seq_len x head_dim/2 x 2"
        where = f"one per layer ({arch.layers}: the LoRA builders)" if job.uses_lora else "one, shared by every layer"
        return f"RoPE theta + cache ({arch.max_positions:,} positions; {shape}), fp32, {where}"

    def optimizer_step_temporary(self, job, n_train: int, largest: int) -> tuple[int, str]:
        """The recipes' configs take `torch.optim.AdamW` with `fused: True`
        (recipes/configs/llama2/7B_lora_single_device.yaml, 7B_full.yaml): `_fused_adamw_` updates
        parameters and states in place, with no step-wide temporary (the trace: the step's peak is
        the end of backward plus the per-parameter `step` scalars)."""
        if job.optimizer != "adamw":
            return super().optimizer_step_temporary(job, n_train, largest)
        return 0, "fused AdamW (torchtune configs: fused: True) updates in place"

    def gradients_held(self, job, produced: int, in_flight: int) -> int:
        """`optimizer_in_bwd` (full_finetune_single_device.py `_setup_optimizer`,
        training/memory.py `register_optim_in_bwd_hooks`): each parameter's post-accumulate-grad
        hook steps its own AdamW and calls `zero_grad()` (set_to_none), so at most one gradient
        is alive at a time, and none after backward."""
        if job.optimizer_in_backward:
            return min(produced, in_flight)
        return produced

    def layer_saved(self, arch, ctx):
        """The family's saved tensors (the transformers defaults), with two torchtune differences
        the trace measured per layer (middle layer of a 3-layer model, exact to the byte):

        - modules/rms_norm.py `RMSNorm.forward` (line 38): `F.rms_norm(x.float(), ..., weight=self.scale)
          .to(x.dtype)`: with the scale training (full fine-tuning) the normalised tensor kept for
          its gradient is fp32, where transformers keeps it in the model dtype (+2 x T x hidden
          per layer in bf16; nothing in fp32).
        - modules/attention.py `MultiHeadAttention.forward`: grouped-query k and v are expanded to
          every query head (`k.unsqueeze(2).expand(...).flatten(1, 2)`, a copy) before SDPA, which
          saves the expanded copies: k and v of heads x head_dim, not kv_heads x head_dim."""
        saved = dict(super().layer_saved(arch, ctx))
        t = ctx.tokens
        if ctx.base_trains:
            for norm in ("input_norm", "post_attn_norm"):
                if f"{norm}.normed" in saved:
                    saved[f"{norm}.normed"] = t * arch.hidden * 4
        if arch.kv_heads != arch.heads:
            for key in ("attn.k", "attn.v"):
                if key in saved:
                    saved[key] = t * arch.heads * arch.head_dim * ctx.act_bytes
        return saved

    def layer_forward_transient(self, arch, ctx, saved, checkpointed: bool) -> int:
        """A checkpointed layer (training/_activation_checkpointing.py, non-reentrant
        `checkpoint_wrapper` around each TransformerSelfAttentionLayer) keeps none of its
        intermediates, so its forward's high point is the MLP's (modules/feed_forward.py
        `FeedForward.forward`: `h = activation(w1(x))`, then `h * w3(x)`) over the new residual
        stream and its norm: `h` alive while `w3(x)` runs, and inside a LoRA `w3`
        (modules/peft/lora.py `LoRALinear.forward`: `out + (alpha / rank) * lora_b(...)`) the base
        output, the scaled adapter output and their sum: 4 x tokens x intermediate with LoRA on the
        up projection, else 3 (h, w3(x), their product)."""
        base = super().layer_forward_transient(arch, ctx, saved, checkpointed)
        if not checkpointed or not arch.gated_mlp:
            return base
        t, ab = ctx.tokens, ctx.act_bytes
        mlp = (4 if "up_proj" in ctx.targets else 3) * t * arch.intermediate * ab
        return max(base, 2 * t * arch.hidden * ab + mlp)

    def loss(self, job, arch, tokens: int, logit_bytes: int) -> LossTerms:
        """Unchunked (`chunked_loss=0`): modules/transformer.py `unembed` returns
        `self.output(h).float()`, so the 16-bit head output dies at once and the fp32 logits and
        nn.CrossEntropyLoss's fp32 log-softmax are live together (8 B a logit); its backward is
        the log-softmax and two fp32 gradients (12 B).

        Chunked (k chunks, `CEWithChunkedOutputLoss`, modules/loss/ce_chunked_output_loss.py):
        `chunked_output` keeps every chunk's logits in the model dtype until the recipe's
        `del logits` (`_loss_step`), `compute_cross_entropy` upcasts one chunk at a time
        (`logits.float()`), and each chunk's fp32 log-softmax is saved for backward. At the last
        chunk: all logits + all log-softmax + one chunk's fp32 copy. Backward of the first chunk
        it reaches: every chunk's log-softmax + that chunk's two fp32 gradients. Chunks split the
        sequence (`chunk(k, dim=1)`): ceil(seq/k) positions of every sequence."""
        v, k = arch.vocab, job.chunked_loss
        if not k:
            return LossTerms(
                forward=tokens * v * 8,
                backward=tokens * v * 12,
                held=0,
                formula=(f"{tokens:,} tokens x {v:,} vocab x 8 B in forward (fp32 logits from unembed's .float() "
                         "+ fp32 log-softmax), x 12 B in loss backward (log-softmax + 2 fp32 gradients)"),
            )
        chunk = job.micro_batch * -(-job.seq_len // k)
        upcast = 4 if logit_bytes != 4 else 0
        return LossTerms(
            forward=tokens * v * (logit_bytes + 4) + chunk * v * upcast,
            backward=tokens * v * 4 + chunk * v * 8,
            held=0,
            formula=(f"{k} chunks of {chunk:,} tokens: {tokens:,} x {v:,} x {logit_bytes + 4} B in forward "
                     f"({logit_bytes} B logits + fp32 log-softmax)"
                     + (f" + one chunk's fp32 copy ({chunk:,} x {v:,} x 4 B)" if upcast else "")
                     + f"; in loss backward every chunk's log-softmax + one chunk's 2 fp32 gradients"),
        )
