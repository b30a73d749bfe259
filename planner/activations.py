"""What autograd keeps for backward: the building blocks of a decoder layer.

Each family module (planner/families) assembles its layer from these; each function lists the
tensors a transformers 5.x decoder layer saves in its forward (read off
the modeling files and confirmed op by op with `memplan trace`, docs/activations.md), in bytes
for `tokens = micro_batch x seq_len`. Whether a tensor is saved depends on who needs it:
a linear saves its input only when its weight trains; LoRA saves its own cast of the input;
a norm saves its fp32 input only when gradients flow through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import ModelArch
from .attention import Kernel, attention_kernel
from .dtypes import float_bytes
from .job import Job
from .stacks import Stack

class Saved(dict):
    """What a layer's forward saves for backward: name -> bytes, in the order the forward makes
    them. Beside the dict (which every sum reads) it keeps the forward's tape for the allocator
    model (planner/alloc_sequence.py `layer_tape`, `_tape_forward`): the same tensors in order,
    with what the forward makes and frees between them. A block that knows its ops records them; a
    family whose blocks record none leaves a tape of its saved tensors alone. A plain dict copy
    keeps no tape.

    Tape ops: ("save", name) a saved tensor made here; ("temp", name, bytes) a tensor made here and
    not saved (freed by a later ("drop", names...), else when the layer returns); ("alias", name,
    tensors...) the saved `name` is the earlier tensor(s) (no new allocation; "input" is the
    layer's input); ("linear", name) the linear `name` runs here (its call's temporaries, its own
    saved tensors named `name.*`, and its output, the temp `name.out`); ("output", name) the tensor
    the layer returns, alive until the next layer has returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tape: list[tuple] = [("save", k) for k in self]

    def __setitem__(self, name: str, n: int) -> None:
        if name not in self:
            self.tape.append(("save", name))
        super().__setitem__(name, n)

    def update(self, other=(), **kwargs) -> None:
        if isinstance(other, Saved):
            self.tape += [op for op in other.tape if op[0] != "save" or op[1] not in self]
        for k, v in dict(other, **kwargs).items():
            super().__setitem__(k, v)

    def temp(self, name: str, n: int) -> None:
        self.tape.append(("temp", name, n))

    def drop(self, *names: str) -> None:
        self.tape.append(("drop", *names))

    def alias(self, name: str, n: int, *tensors: str) -> None:
        """The saved `name` (n bytes) is the tensor(s) the tape made as `tensors`."""
        super().__setitem__(name, n)
        self.tape.append(("alias", name, *tensors))

    def linear(self, name: str) -> None:
        self.tape.append(("linear", name))

    def output(self, name: str) -> None:
        self.tape.append(("output", name))


@dataclass(frozen=True)
class Ctx:
    """Everything the per-layer formulas need, resolved once from the job."""

    tokens: int
    batch: int
    seq: int
    act_bytes: int  # dtype of matmul outputs
    stream_bytes: int  # dtype of the residual stream: fp32 under autocast over fp32 weights
    autocast: bool  # fp32 weights, 16-bit compute: every linear casts its fp32 input itself
    base_trains: bool  # full fine-tuning: every base weight requires grad
    targets: frozenset[str]  # LoRA-targeted linear names
    adapter_bytes: int
    rank: int
    lora_dropout: float
    grad_in: bool  # gradients flow into the layer's input (not so for layer 0 of frozen-embedding LoRA)
    attention: Kernel  # planner/attention.py
    sdpa_bytes: int  # dtype SDPA sees: the compute dtype under autocast, else the activations'
    kernel_bytes: int  # dtype the fused attention kernel saves its inputs in (flash-attn casts fp32 to 16 bits)
    packed_mask: bool  # packed rows under SDPA: a block-diagonal mask, so no enable_gqa (keys repeated)
    liger: bool  # Liger's RMSNorm and SwiGLU/GeGLU kernels replace the model's (planner/liger.py)
    lora_autocast: bool  # adapters under autocast: lora_A keeps a 16-bit cast of its input
    stats_bytes: int  # LayerNorm mean/rstd dtype: fp32 on CUDA, the input dtype on CPU
    cpu: bool  # follow the CPU kernels the trace runs instead of CUDA's
    # DoRA (peft use_dora=True): (name, d_out) of each targeted block linear; empty without DoRA
    dora: tuple[tuple[str, int], ...] = ()
    dora_d_in: tuple[int, ...] = ()  # their d_in, in the same order
    dora_weight_copy: bool = False  # the base weight's dtype differs from the adapters': .to() copies it
    dora_dequant: int = 0  # bytes per element of a 4-bit weight's dequantized copy (0: not quantized)
    flash_attn: bool = False  # attention="flash_attention_2" (MLA's values are padded for it)

    @property
    def cuda_math(self) -> bool:
        """SDPA's math kernel on CUDA, where the allocator sees more than the CPU trace can."""
        return self.attention is Kernel.math_fp32 and not self.cpu

    def dropout_mask(self, elem_bytes: int) -> int:
        """CUDA's fused native_dropout keeps a bool mask; the CPU keeps the scaled noise tensor."""
        return elem_bytes if self.cpu else 1


def lora_inputs(ctx: Ctx, name: str, d_in: int, shared_input: str, saved: Saved) -> None:
    """peft LoraLayer.forward: x.to(adapter dtype) -> dropout -> lora_A -> lora_B."""
    if name not in ctx.targets:
        return
    t = ctx.tokens
    dora_saved(ctx, name, d_in, saved)
    if ctx.lora_dropout > 0:
        saved[f"{name}.lora_dropout_out"] = t * d_in * ctx.adapter_bytes
        saved[f"{name}.lora_dropout_mask"] = t * d_in * ctx.dropout_mask(ctx.adapter_bytes)
    if ctx.lora_autocast:
        # autocast casts lora_A's input to the compute dtype (per target: activations are not
        # cached) and lora_A's output is 16-bit (allocator trace of a QLoRA layer, H200)
        if ctx.lora_dropout == 0 and ctx.sdpa_bytes == ctx.act_bytes:
            saved[shared_input] = t * d_in * ctx.act_bytes
        else:
            saved[f"{name}.lora_input_cast"] = t * d_in * ctx.sdpa_bytes
        saved[f"{name}.lora_A_out"] = t * ctx.rank * ctx.sdpa_bytes
        return
    if ctx.lora_dropout == 0 and ctx.adapter_bytes == ctx.act_bytes:
        saved[shared_input] = t * d_in * ctx.act_bytes  # the cast is a no-op: lora_A saves the shared input
    elif ctx.lora_dropout == 0:
        saved[f"{name}.lora_input_cast"] = t * d_in * ctx.adapter_bytes
    saved[f"{name}.lora_A_out"] = t * ctx.rank * ctx.adapter_bytes


def lora_out_bytes(ctx: Ctx) -> int:
    """dtype of lora_B's output: the adapters', or the compute dtype under autocast."""
    return ctx.sdpa_bytes if ctx.lora_autocast else ctx.adapter_bytes


def dora_saved(ctx: Ctx, name: str, d_in: int, saved: Saved) -> None:
    """What DoRA adds to a targeted linear's saved tensors (peft tuners/lora/dora.py
    `DoraLinearLayer.forward`): `result_dora = (m/||W'|| - 1) * base_result + m/||W'|| * lora_result
    * scaling`. Both products save their tensor operand for the magnitude's gradient: the base
    layer's output (activation dtype) and lora_B's output (adapter dtype), next to the d_out-wide
    scale factors (the weight norm kept by the division, m/||W'|| - 1, and m/||W'||). With dropout
    in training (variants.py `DoraLinearVariant.forward`: base_result=None) the base output is
    recomputed as `F.linear(dropout(x), W.to(x.dtype))`: that saves the weight in the adapter dtype
    (a new copy unless the base is already in it) and its output replaces the base layer's."""
    d_out = dict(ctx.dora).get(name)
    if d_out is None:
        return
    t = ctx.tokens
    ob = lora_out_bytes(ctx)
    saved[f"{name}.dora_scales"] = 3 * d_out * ctx.adapter_bytes
    saved[f"{name}.dora_lora_out"] = t * d_out * ob
    if ctx.lora_dropout > 0:
        saved[f"{name}.dora_base_out"] = t * d_out * ob
        if ctx.dora_weight_copy:
            saved[f"{name}.dora_weight"] = d_in * d_out * ob
    else:
        saved[f"{name}.dora_base_out"] = t * d_out * ctx.act_bytes


def dora_forward_transient(ctx: Ctx, d_in: int, d_out: int, checkpointed: bool = False) -> int:
    """Bytes a DoRA linear holds while its forward runs, beyond what it saves (dora.py):
    `get_lora_weight` runs lora_B(lora_A(eye(d_in))), so the d_in x d_in identity (kept by lora_A
    for its weight gradient), its r-wide image and the d_in x d_out product live until the forward
    returns (the product's graph is referenced by the local `lora_weight`); the base weight in the
    input's dtype (`dequantize_module_weight(...).to(x.dtype)`: a copy unless the base is already
    in the adapter dtype, a 4-bit base dequantized first); `get_weight_norm` then holds
    `scaling * lora_weight` and `weight + ...` at once, two more d_out x d_in tensors.
    A checkpointed forward saves nothing, so the identity and its image die with `get_lora_weight`:
    there the high point is the larger of lora_B's call (identity, image, product) and the norm."""
    ab = ctx.adapter_bytes
    copy = d_in * d_out * ab if ctx.dora_weight_copy else 0
    copy += ctx.dora_dequant * d_in * d_out
    eye = d_in * d_in * ab + d_in * ctx.rank * ab
    product = d_in * d_out * ab
    norm = product + copy + 2 * d_in * d_out * ab
    if checkpointed:
        # nothing of the layer is saved, but the target's input and its cast to the adapter dtype
        # are still alive while its DoRA forward runs
        inputs = ctx.tokens * d_in * (ctx.act_bytes + ab)
        return max(eye + product, norm) + inputs
    return eye + norm


def dora_recompute_transient(ctx: Ctx) -> int:
    """A checkpointed DoRA layer's recomputation (backward): beside the layer's recomputed tensors
    ("recomputed layer"), one target's identity, image and product held through its weight norm, as
    in the uncheckpointed forward (CPU trace), and the target's input itself, alive as its argument
    but not among the saved tensors when LoRA saves its own cast; lora_A's and lora_B's outputs,
    computed after the norm (dora.py:155), are not there yet."""
    def one(d_in: int, d_out: int) -> int:
        shared = ctx.lora_dropout == 0 and ctx.adapter_bytes == ctx.act_bytes and not ctx.lora_autocast
        later = ctx.tokens * (ctx.rank + d_out) * lora_out_bytes(ctx)
        return dora_forward_transient(ctx, d_in, d_out) + (0 if shared else ctx.tokens * d_in * ctx.act_bytes) - later

    return max((one(d_in, d_out) for (_, d_out), d_in in zip(ctx.dora, ctx.dora_d_in)), default=0)


def dora_layer_transient(ctx: Ctx, checkpointed: bool = False) -> int:
    """The largest DoRA forward transient of one layer's targeted linears (0 without DoRA)."""
    return max((dora_forward_transient(ctx, d_in, d_out, checkpointed) for (_, d_out), d_in in
                zip(ctx.dora, ctx.dora_d_in)), default=0)


def linear_input(ctx: Ctx, names: tuple[str, ...], d_in: int, tensor: str, saved: Saved,
                  fp32_source: bool = False) -> None:
    """A tensor consumed by `names` is kept if any base linear trains or LoRA keeps it. Under
    autocast an fp32 tensor (a norm's output) is cast separately by each consuming linear, and
    each keeps its own 16-bit copy."""
    if ctx.base_trains and ctx.autocast and fp32_source:
        for n in names:
            saved[f"{n}.autocast_input"] = ctx.tokens * d_in * ctx.act_bytes
    elif ctx.base_trains:
        saved[tensor] = ctx.tokens * d_in * ctx.act_bytes
    for n in names:
        lora_inputs(ctx, n, d_in, tensor, saved)


def rms_norm(ctx: Ctx, arch: ModelArch, prefix: str, consumers: tuple[str, ...], saved: Saved,
             source: str | None = None) -> None:
    t, h = ctx.tokens, arch.hidden
    if ctx.grad_in and ctx.liger:
        # LigerRMSNormFunction saves X as it comes (the stream itself, no fp32 copy) and one fp32
        # rstd per row; the weight's gradient is computed from them (ops/rms_norm.py:674)
        saved[f"{prefix}.input"] = t * h * ctx.stream_bytes
        saved[f"{prefix}.rstd"] = 4 * t
    elif ctx.grad_in:
        saved[f"{prefix}.fp32_input"] = 4 * t * h  # LlamaRMSNorm: x.to(float32), saved by pow and mul
        saved[f"{prefix}.rsqrt"] = 4 * t
        if ctx.base_trains:
            # weight * x_normed: Llama saves the cast-back copy, Gemma the fp32 product before (1 + w)
            # (with an fp32 stream the cast back is a no-op: the fp32 product is kept)
            saved[f"{prefix}.normed"] = t * h * (4 if arch.norm in ("rms_gemma", "rms_fp32") else ctx.stream_bytes)
    if not ctx.liger and isinstance(saved, Saved):
        rms_norm_tape(ctx, arch, prefix, source, saved)
    linear_input(ctx, consumers, h, f"{prefix}.out", saved, fp32_source=True)


def rms_norm_tape(ctx: Ctx, arch: ModelArch, prefix: str, source: str | None, saved: Saved) -> None:
    """The order of an RMSNorm's ops for the allocator model, around what `rms_norm` saves (which
    this rewrites into the tape in place). LlamaRMSNorm.forward: `x = x.to(float32)` (a copy unless
    the stream is fp32; then, with `source` naming the stream tensor, the saved input is that
    tensor), `variance = x.pow(2).mean(-1)`, `x = x * rsqrt(variance + eps)`, `weight *
    x.to(input_dtype)`; GemmaRMSNorm (and the fp32 variants): `x.float()`, the same normalisation,
    `* (1 + weight.float())` in fp32, then `.type_as(x)`. The output is the temp `prefix.out`
    (saved instead where a linear keeps it), alive until its consumer's block drops it."""
    t, h, sb = ctx.tokens, arch.hidden, ctx.stream_bytes
    names = (f"{prefix}.fp32_input", f"{prefix}.rsqrt", f"{prefix}.normed")
    saved.tape = [op for op in saved.tape if not (op[0] == "save" and op[1] in names)]
    fp32_in, rsqrt, normed = (n in saved for n in names)
    if sb == 4 and source is not None:
        if fp32_in:
            saved.alias(names[0], saved[names[0]], source)
    elif fp32_in:
        saved.tape.append(("save", names[0]))
    else:
        saved.temp(names[0], 4 * t * h)
    gemma = arch.norm == "rms_gemma"
    saved.temp(f"{prefix}.pow", 4 * t * h)
    saved.temp(f"{prefix}.variance", 4 * t)
    saved.drop(f"{prefix}.pow")
    saved.temp(f"{prefix}.eps", 4 * t)
    if gemma:  # one expression in `_norm`: the mean is a temporary, not a local
        saved.drop(f"{prefix}.variance")
    saved.tape.append(("save", names[1])) if rsqrt else saved.temp(names[1], 4 * t)
    saved.drop(f"{prefix}.eps")
    scaled = f"{prefix}.scaled"
    if arch.norm in ("rms_gemma", "rms_fp32"):
        # the fp32 normalised input is what `* (1 + weight)` (Olmo2: `weight *`) saves
        saved.tape.append(("save", names[2])) if normed else saved.temp(names[2], 4 * t * h)
        saved.drop(names[0])
        if gemma:  # `1.0 + self.weight.float()`: the weight's fp32 copy, then the sum
            saved.drop(names[1])
            saved.temp(f"{prefix}.weight_fp32", 4 * h)
            saved.temp(f"{prefix}.weight_plus_one", 4 * h)
            saved.drop(f"{prefix}.weight_fp32")
        saved.temp(f"{prefix}.product", 4 * t * h)
        if gemma:  # the sum is saved by the product (a few KiB the walk leaves out): held to the layer's end
            saved.drop(names[2])
        saved.temp(f"{prefix}.out", t * h * sb)
        saved.drop(f"{prefix}.product", names[2], names[1])
    else:
        saved.temp(scaled, 4 * t * h)
        saved.drop(names[0])
        if normed:
            saved.tape.append(("save", names[2]))
        elif sb != 4:
            saved.temp(names[2], t * h * sb)
        saved.temp(f"{prefix}.out", t * h * (4 if sb == 4 else ctx.act_bytes))
        saved.drop(names[2], scaled, names[1])
    saved.drop(f"{prefix}.variance")


def head_norms(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """Qwen3's q_norm and k_norm: an RMSNorm over each head of the projection's output, saved as
    the hidden-size norm saves (fp32 input, rsqrt per head, the cast-back copy when the weight
    trains) wherever a gradient flows through it: its projection trains or the layer input needs one."""
    t = ctx.tokens
    for name, width, heads in (("q", arch.q_width, arch.heads), ("k", arch.kv_width, arch.kv_heads)):
        if not (ctx.grad_in or ctx.base_trains or f"{name}_proj" in ctx.targets):
            continue
        if ctx.liger:  # the same module class, patched as the hidden-size norms
            saved[f"{name}_norm.input"] = t * width * ctx.act_bytes
            saved[f"{name}_norm.rstd"] = 4 * t * heads
            continue
        saved[f"{name}_norm.fp32_input"] = 4 * t * width
        saved[f"{name}_norm.rsqrt"] = 4 * t * heads
        if ctx.base_trains:
            saved[f"{name}_norm.normed"] = t * width * ctx.act_bytes


def layer_norm(ctx: Ctx, arch: ModelArch, prefix: str, consumers: tuple[str, ...], saved: Saved,
               source: str | None = None) -> None:
    """aten native_layer_norm saves input, mean and rstd (fp32 on CUDA). On the tape (`source`
    naming the input tensor): the op makes its output (the input's dtype), then mean and rstd
    (layer_norm_kernel.cu / layer_norm.cpp `at::empty` in that order); the saved input is the input."""
    t, h = ctx.tokens, arch.hidden
    taped = source is not None and isinstance(saved, Saved)
    if taped:
        saved.temp(f"{prefix}.out", t * h * ctx.stream_bytes)
    if ctx.grad_in and taped:
        saved.alias(f"{prefix}.input", t * h * ctx.stream_bytes, source)
        saved.temp(f"{prefix}.mean", t * ctx.stats_bytes)
        saved.temp(f"{prefix}.rstd", t * ctx.stats_bytes)
        saved.alias(f"{prefix}.mean_rstd", 2 * t * ctx.stats_bytes, f"{prefix}.mean", f"{prefix}.rstd")
    elif ctx.grad_in:
        saved[f"{prefix}.input"] = t * h * ctx.stream_bytes
        saved[f"{prefix}.mean_rstd"] = 2 * t * ctx.stats_bytes
    linear_input(ctx, consumers, h, f"{prefix}.out", saved, fp32_source=True)


def attention_core(ctx: Ctx, arch: ModelArch, rope_copies: bool, saved: Saved,
                   projections: tuple[str, str, str] = ()) -> str:
    """Scaled dot-product attention for one layer: what it saves, and the name of the tensor the
    output projection consumes (saved only if that projection trains or LoRA keeps it).
    `projections`: the q, k and v linears whose outputs (temps `name.out` on the tape) it reads."""
    t, s, a, ab = ctx.tokens, ctx.seq, arch.heads, ctx.act_bytes
    q, kv = arch.q_width, arch.kv_width
    if ctx.attention is Kernel.fused:
        ab = ctx.kernel_bytes  # under autocast the kernel saves its 16-bit casts
        # q and k are new tensors after RoPE; v is the projection output itself. With a packed
        # row's mask transformers does not pass enable_gqa (integrations/sdpa_attention.py
        # `use_gqa_in_sdpa`: only without a mask on CUDA) and repeat_kv copies keys and values to
        # every head; SDPA turns the bool mask into an additive one per call
        # (attention.cpp `convert_boolean_attn_mask`), which the memory-efficient kernel saves
        kv_saved = q if ctx.packed_mask else kv
        if projections and isinstance(saved, Saved):
            _fused_inputs_tape(ctx, arch, projections, kv_saved, ab, saved)
        else:
            saved["attn.q"] = t * q * ab
            saved["attn.k"] = t * kv_saved * ab
            saved["attn.v"] = t * kv_saved * ab
        if ctx.packed_mask:
            saved["attn.packed_mask"] = ctx.batch * ctx.seq * ctx.seq * ab
        saved["attn.out"] = t * q * ab
        saved["attn.logsumexp"] = 4 * t * a
        return "attn.out_contiguous" if rope_copies else "attn.out"
    rotated = ()
    if projections and isinstance(saved, Saved) and _rotary(arch, ab, ctx):
        # q and k rotated (temps): what the materialised path reads; the projections' outputs go
        rotated = tuple(_rotary_tape(ctx, f"attn.{x}_rotated", w, ab, saved) for x, w in (("q", q), ("k", kv)))
        saved.drop(f"{projections[0]}.out", f"{projections[1]}.out")
    if ctx.attention is Kernel.eager:
        # LlamaAttention eager: repeat_kv copies, fp32 softmax and its cast back
        saved["attn.softmax_fp32"] = 4 * t * a * s
        saved["attn.probs"] = ab * t * a * s
        md = ab
    else:
        # the math kernel (and Falcon's eager path): scores and probabilities in one tensor
        md = materialised_bytes(ctx)
        saved["attn.probs"] = md * t * a * s
        if arch.attn_dropout > 0:  # dropout on the probabilities: its mask and the dropped copy
            saved["attn.dropout_mask"] = t * a * s * ctx.dropout_mask(md)
            saved["attn.probs_dropped"] = md * t * a * s
    # scaled q, and k and v broadcast to every head for the batched matmuls: folding (batch, heads)
    # into one dimension copies the broadcast keys unless the batch is 1 (then it stays a view)
    # (enable_gqa's repeat_interleave always copies)
    expanded = q if ctx.batch > 1 or ctx.attention is Kernel.eager or not arch.sdpa_broadcast_kv else kv
    saved["attn.q_scaled"] = t * q * md
    saved["attn.k_expanded"] = t * expanded * md
    saved["attn.v_expanded"] = t * expanded * md
    if rotated:
        saved.drop(*rotated)
    return "attn.out_contiguous"


def _rotary(arch: ModelArch, ab: int, ctx: Ctx) -> bool:
    """Whether the tape follows the layer's rotary ops: full-width rotary positions in the
    activations' dtype (partial rotary slices and concatenates more; learned positions and ALiBi
    have none)."""
    return not (arch.learned_positions or arch.alibi) and arch.rotary_fraction == 1 and ab == ctx.act_bytes


def _rotary_tape(ctx: Ctx, name: str, width: int, ab: int, saved: Saved, kept: bool = False) -> str:
    """transformers `apply_rotary_pos_emb` on one of q, k: `x * cos + rotate_half(x) * sin`, where
    rotate_half is `cat((-x2, x1))`: x * cos, -x2 (half the width), the cat, its product with sin,
    then the sum, `name` (saved when `kept`, else a temp)."""
    n = ctx.tokens * width * ab
    saved.temp(f"{name}.cos", n)
    saved.temp(f"{name}.half", n // 2)
    saved.temp(f"{name}.cat", n)
    saved.drop(f"{name}.half")
    saved.temp(f"{name}.sin", n)
    saved.drop(f"{name}.cat")
    if kept:
        saved[name] = n
    else:
        saved.temp(name, n)
    saved.drop(f"{name}.cos", f"{name}.sin")
    return name


def _fused_inputs_tape(ctx: Ctx, arch: ModelArch, projections: tuple[str, str, str], kv_saved: int, ab: int,
                       saved: Saved) -> None:
    """q, k and v as the fused kernel gets them, on the tape: rotary positions make q and k anew
    (_rotary_tape, saved), the projections' outputs released once both are rotated; without them
    q and k are the projections' outputs. v is the projection's output itself unless keys and
    values are repeated to every head (a copy)."""
    t = ctx.tokens
    qn, kn, vn = projections
    rope = _rotary(arch, ab, ctx)
    for name, width, proj in (("attn.q", arch.q_width, qn), ("attn.k", kv_saved, kn)):
        if rope:
            _rotary_tape(ctx, name, width, ab, saved, kept=True)
        else:
            saved.alias(name, t * width * ab, f"{proj}.out")
    if rope:
        saved.drop(f"{qn}.out", f"{kn}.out")
    if kv_saved == arch.kv_width:
        saved.alias("attn.v", t * kv_saved * ab, f"{vn}.out")
    else:
        saved["attn.v"] = t * kv_saved * ab


def materialised_bytes(ctx: Ctx) -> int:
    """Element size of materialised scores: fp32 for SDPA's math kernel, else the activations'."""
    return 4 if ctx.attention is Kernel.math_fp32 else ctx.act_bytes


def score_bytes(arch: ModelArch, ctx: Ctx) -> int:
    """One materialised attention-score tensor (batch x heads x seq x seq), 0 under a fused kernel;
    eager softmax and the math kernel hold it in fp32."""
    if ctx.attention is Kernel.fused:
        return 0
    score = 4 if ctx.attention in (Kernel.eager, Kernel.math_fp32) else ctx.act_bytes
    return ctx.tokens * arch.heads * ctx.seq * score


def o_proj(ctx: Ctx, arch: ModelArch, name: str, consumed: str, saved: Saved) -> None:
    linear_input(ctx, (name,), arch.q_width, consumed, saved)


def gated_mlp(ctx: Ctx, arch: ModelArch, saved: Saved, linears: bool = False) -> None:
    """`down_proj(act(gate_proj(x)) * up_proj(x))`. `linears`: record the projections' calls on the
    tape (Saved), in the order Python evaluates them."""
    t, i, ab = ctx.tokens, arch.intermediate, ctx.act_bytes

    def projection(name: str, kept: str) -> None:
        if linears:
            saved.linear(name)
            saved.alias(kept, t * i * ab, f"{name}.out")
        else:
            saved[kept] = t * i * ab

    projection("gate_proj", "mlp.gate_out")  # saved by the activation function
    if not ctx.liger:  # LigerSiLUMulFunction / LigerGELUMulFunction save only gate and up (swiglu.py:272)
        saved["mlp.act_out"] = t * i * ab  # saved by act * up
    projection("up_proj", "mlp.up_out")
    if linears:
        saved.temp("mlp.product", t * i * ab)
    linear_input(ctx, ("down_proj",), i, "mlp.product", saved)
    if linears:
        saved.linear("down_proj")
        saved.drop("mlp.product")


def moe_mlp(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """MixtralSparseMoeBlock (fused experts, grouped_mm): router state plus k routed copies per token."""
    t, h, i, ab = ctx.tokens, arch.hidden, arch.intermediate, ctx.act_bytes
    k, e = arch.experts_per_token, arch.experts
    saved["moe.router"] = t * (4 * e + 4 + k * (8 + 4 + 8 + 8 + 4 + 8))
    if ctx.base_trains:  # the grouped matmuls keep their inputs only for the experts' weight gradients
        saved["moe.routed_inputs"] = t * k * h * ab
        saved["moe.product"] = t * k * i * ab
    saved["moe.gate_up_out"] = t * k * 2 * i * ab
    saved["moe.act_out"] = t * k * i * ab
    saved["moe.expert_out"] = t * k * h * ab


def plain_mlp(ctx: Ctx, arch: ModelArch, fc1: str, fc2: str, saved: Saved, linears: bool = False) -> None:
    """`fc2(act(fc1(x)))`. `linears`: record the two projections' calls on the tape (Saved)."""
    t, i, ab = ctx.tokens, arch.intermediate, ctx.act_bytes
    if linears:
        saved.linear(fc1)
    # In a parallel block the MLP reads the layer input directly: where no gradient flows into it
    # (layer 0 of frozen-embedding LoRA) and fc1 is frozen, the activation has nothing to save.
    if not (ctx.grad_in or ctx.base_trains or fc1 in ctx.targets or not arch.parallel_attn):
        if linears:
            saved.temp("mlp.act_out", t * i * ab)
        lora_inputs(ctx, fc2, i, "mlp.act_out", saved)
        _fc2_tape(fc1, fc2, linears, saved)
        return
    if linears:
        saved.alias("mlp.fc1_out", t * i * ab, f"{fc1}.out")
    else:
        saved["mlp.fc1_out"] = t * i * ab
    if arch.activation == "gelu_new":
        # NewGELUActivation in Python: 0.5*x, tanh(...), 1+tanh and the product are kept. CUDA
        # autocast runs pow in fp32 (its fp32 op list; the CPU's does not), so under autocast on
        # the GPU the rest of the GELU is fp32 too (allocator trace of Phi-2, H200)
        parts = 4 if ctx.autocast and not ctx.cpu else ab
        saved["mlp.gelu_parts"] = 3 * t * i * parts
    if linears:
        saved.temp("mlp.act_out", t * i * ab)
    linear_input(ctx, (fc2,), i, "mlp.act_out", saved)
    _fc2_tape(fc1, fc2, linears, saved)


def _fc2_tape(fc1: str, fc2: str, linears: bool, saved: Saved) -> None:
    if linears:
        saved.linear(fc2)
        saved.drop("mlp.act_out", f"{fc1}.out")


def dropout_masks(ctx: Ctx, arch: ModelArch, p: float, sites: int, saved: Saved) -> None:
    if p > 0:
        saved["dropout_masks"] = sites * ctx.tokens * arch.hidden * ctx.dropout_mask(ctx.act_bytes)


def layer_backward_transient(arch: ModelArch, ctx: Ctx, saved: Saved) -> int:
    """Bytes above the layer's saved tensors at the high point of its backward.

    Always: the incoming and outgoing residual-stream gradients. Then the larger of the MLP's
    intermediate gradients (3 or 2 x s x i, while everything is still saved) and, for materialised
    attention, the two score-sized gradients of the softmax backward, which run after the MLP's
    backward has already freed the MLP's saved tensors."""
    t, ab = ctx.tokens, ctx.act_bytes
    width = arch.intermediate * (arch.experts_per_token or 1)
    stream = 2 * t * arch.hidden * ctx.stream_bytes
    # the down projection's input is released once its backward has run, before the intermediate
    # gradients of act * up appear (allocator trace of an all-linear QLoRA layer, H200)
    # Liger's SwiGLU backward writes the gate and up gradients into its saved inputs (swiglu.py
    # `swiglu_backward`): only the product's gradient is new
    mlp = (1 if ctx.liger else 3 if arch.gated_mlp else 2) * t * width * ab - saved.get("mlp.product", 0)
    attn = 0
    if ctx.attention is not Kernel.fused:
        # eager softmax runs in fp32; the math kernel in its own dtype (fp32 on the CPU)
        score = 4 if ctx.attention in (Kernel.eager, Kernel.math_fp32) else ab
        after = ("mlp.", "moe.", "post_attn_norm.", "attn.out_contiguous", "attn.v_expanded")
        if arch.mla is not None:
            # o_proj's backward has run too: its LoRA input cast and lora_A output are
            # gone (CPU trace of a checkpointed DeepSeek-V2 layer). The same holds in every family
            # whose o_proj LoRA targets; left to the lead so that their numbers do not move here
            after += ("o_proj.",)
        dropout = ("attn.probs_dropped", "attn.dropout_mask")
        eager_probs = ("attn.probs",) if ctx.attention is Kernel.eager else ()
        freed = sum(v for k, v in saved.items() if k.startswith(after + dropout + eager_probs))
        scores = t * arch.heads * ctx.seq * score
        # CUDA's math-kernel backward holds three score-sized gradients next to the saved
        # probabilities (allocator traces of Falcon and Mistral layers on the H200,
        # validate/results/alloc-traces-*); the CPU trace shows two
        attn = (3 if ctx.cuda_math else 2) * scores - freed
        if "attn.dropout_mask" in saved:
            # the dropout backward comes first: the dropped probabilities' gradient while the mask
            # and the dropped copy are still held
            attn = max(attn, scores - sum(v for k, v in saved.items() if k.startswith(after)))
    return stream + max(mlp, attn)


def attention_backward_after_mlp(arch: ModelArch, ctx: Ctx, saved: Saved) -> tuple[int, int]:
    """(saved bytes the MLP's backward has freed, transient bytes of the attention's backward above
    what is left): the moment inside `layer_backward_transient` where the attention's backward runs,
    for a walk that also holds the MLP's gradients then (planner/fsdp.py)."""
    t, ab = ctx.tokens, ctx.act_bytes
    stream = 2 * t * arch.hidden * ctx.stream_bytes
    after = ("mlp.", "moe.", "post_attn_norm.", "attn.out_contiguous", "attn.v_expanded")
    freed = sum(v for k, v in saved.items() if k.startswith(after))
    if ctx.attention is Kernel.fused:
        return freed, stream
    score = 4 if ctx.attention in (Kernel.eager, Kernel.math_fp32) else ab
    scores = t * arch.heads * ctx.seq * score
    return freed, stream + (3 if ctx.cuda_math else 2) * scores


def layer_forward_transient(arch: ModelArch, ctx: Ctx, saved: Saved, checkpointed: bool) -> int:
    """Bytes above what is kept at the high point of one layer's forward: materialised attention
    holds its raw scores next to the probabilities, and a checkpointed layer (which keeps nothing)
    still holds its attention tensors while it runs."""
    if ctx.attention is Kernel.fused:
        return 0
    score = 4 if ctx.attention in (Kernel.eager, Kernel.math_fp32) else ctx.act_bytes
    # the raw scores live until the softmax has produced the probabilities; with dropout the
    # high point comes later, at the dropped copy, when the scores are already gone
    scores = 0 if "attn.dropout_mask" in saved else ctx.tokens * arch.heads * ctx.seq * score
    held = sum(v for k, v in saved.items() if k.startswith("attn.")) if checkpointed else 0
    # the math kernel's _safe_softmax builds a bool mask of the -inf scores inside one aten op: the
    # CUDA allocator sees it (H200 trace of a Mistral layer), the CPU trace's dispatch mode cannot
    inside = ctx.tokens * arch.heads * ctx.seq if ctx.cuda_math else 0
    extra = own_attention_forward_extra(arch, ctx, checkpointed)
    if arch.mla is not None:
        extra += mla_forward_live(arch, ctx, saved)
    return scores + held + inside + extra


def attention_mask_bytes(arch: ModelArch, ctx: Ctx, batch: int) -> int:
    """Eager attention needs an explicit (b, 1, s, s) additive mask, built once per forward; packed
    rows under SDPA a (b, 1, s, s) bool block-diagonal causal one (masking_utils `sdpa_mask`)."""
    if ctx.attention is Kernel.eager:
        # Gemma 2/3 build one per layer type, but the model's forward drops them before the head
        # and a checkpointed backward holds one (CPU trace of tiny-gemma2): one is counted here,
        # both in the prefill's layer moments (inference.mask_kinds)
        return batch * ctx.seq * ctx.seq * ctx.act_bytes
    if ctx.packed_mask or (arch.sdpa_explicit_mask and ctx.attention is Kernel.fused):
        return batch * ctx.seq * ctx.seq
    if arch.sliding_mask_always:  # a bool (1, 1, s, s) expanded over the batch (ModelArch.sliding_mask_always)
        return ctx.seq * ctx.seq
    return 0


def mask_kinds(arch: ModelArch) -> int:
    """Masks a forward builds: one per attention kind its layers mix (the models with `layer_types`
    build `create_causal_mask` and `create_sliding_window_causal_mask` once each, e.g.
    GptOssModel.forward `causal_mask_mapping`)."""
    windows = arch.layer_windows
    mixed = windows and None in windows and any(w is not None for w in windows)
    return 2 if mixed or arch.sliding_mask_always else 1


def checkpoint_saved(arch: ModelArch, ctx: Ctx) -> int:
    """Non-reentrant checkpointing keeps each layer's input hidden states."""
    return ctx.tokens * arch.hidden * ctx.stream_bytes


def recompute_input_alias(arch: ModelArch, ctx: Ctx) -> int:
    """Bytes of the recomputed layer's saved tensors that are its checkpointed input itself: a
    LayerNorm saves its input as is, and an RMSNorm's `x.to(float32)` is the same tensor when the
    stream is already fp32 (QLoRA after kbit prepare: allocator trace on the H200)."""
    if not ctx.grad_in:
        return 0
    if arch.norm == "layer" or ctx.stream_bytes == 4:
        return ctx.tokens * arch.hidden * ctx.stream_bytes
    return 0


def rotary_tables(arch: ModelArch, ctx: Ctx) -> int:
    """cos and sin for the positions of one sequence, shared by all layers (batch dimension 1)."""
    if arch.learned_positions or arch.alibi:
        return 0
    return 2 * ctx.seq * arch.rotary_dim * ctx.stream_bytes * arch.rope_kinds  # Gemma 3: one per layer type


def final_norm_saved(arch: ModelArch, ctx: Ctx) -> Saved:
    saved = Saved()
    if arch.norm == "layer":
        layer_norm(ctx, arch, "final_norm", (), saved)
    else:
        rms_norm(ctx, arch, "final_norm", (), saved)
    if ctx.base_trains and not ctx.liger:
        # lm_head weight trains: it keeps the normed hidden states (its own cast under autocast);
        # Liger's fused linear cross-entropy computes the head's gradients in the forward instead
        saved["final_norm.out"] = ctx.tokens * arch.hidden * ctx.act_bytes
    return saved


def make_ctx(job: Job, arch: ModelArch, targets: tuple[str, ...], stack: Stack, grad_in: bool) -> Ctx:
    act_bytes = 4 if job.kbit_upcast else float_bytes(job.compute_dtype)
    autocast = job.task == "train" and job.method == "full" and job.mixed_precision
    sdpa_bytes = float_bytes(job.compute_dtype) if job.runs_autocast else act_bytes
    attention = attention_kernel(job, arch, stack, grad=True, sdpa_bytes=sdpa_bytes)
    # flash-attn casts fp32 inputs to the 16-bit dtype of the model's linears
    # (integrations/flash_attention.py `get_target_dtype`)
    fa2 = job.attention == "flash_attention_2"
    kernel_bytes = float_bytes(job.compute_dtype) if fa2 else sdpa_bytes
    return Ctx(
        tokens=job.micro_batch * job.seq_len,
        batch=job.micro_batch,
        seq=job.seq_len,
        act_bytes=act_bytes,
        stream_bytes=4 if autocast else act_bytes,
        autocast=autocast,
        base_trains=job.task == "train" and job.method == "full",
        targets=frozenset(targets) if job.uses_lora else frozenset(),
        adapter_bytes=float_bytes(job.lora_dtype),
        rank=job.lora_rank,
        lora_dropout=job.lora_dropout,
        grad_in=grad_in,
        attention=attention,
        sdpa_bytes=sdpa_bytes,
        kernel_bytes=kernel_bytes,
        packed_mask=job.packing and job.attention == "sdpa",
        liger=job.task == "train" and job.liger,
        lora_autocast=job.uses_lora and job.runs_autocast,
        stats_bytes=act_bytes if stack.cpu else 4,
        cpu=stack.cpu,
        flash_attn=fa2,
        **dora_fields(job, arch, targets),
    )


def dora_fields(job: Job, arch: ModelArch, targets: tuple[str, ...]) -> dict:
    if not (job.uses_lora and job.dora):
        return {}
    lins = [lin for lin in arch.linears if lin.name in targets]
    # the weight as DoRA reads it: a 4-bit one dequantized to the compute dtype (bitsandbytes)
    base = float_bytes(job.compute_dtype if job.quantized else job.base_weight_dtype)
    return dict(dora=tuple((lin.name, lin.d_out) for lin in lins), dora_d_in=tuple(lin.d_in for lin in lins),
                dora_weight_copy=base != float_bytes(job.lora_dtype),
                dora_dequant=float_bytes(job.compute_dtype) if job.quantized else 0)


# --- routed experts through transformers 5's grouped_mm path (Qwen2-MoE, Qwen3-MoE, gpt-oss) -----
# integrations/moe.py `grouped_mm_experts_forward`: transformers selects `grouped_mm` whenever the
# experts class is decorated with @use_experts_implementation (modeling_utils.py
# `get_correct_experts_implementation`: "grouped_mm" unless another is asked for), and
# `_can_use_grouped_mm` takes torch's grouped_mm on the CPU (torch >= 2.10) as on CUDA (SM80+),
# so the CPU trace runs the same ops as the GPU. With S = tokens x k routed copies:
# `expert_ids.sort()` (int64 ids and perm), `hidden_states[perm // k]` (S x h), the up grouped_mm
# (S x 2i, plus the gathered per-row bias `gate_up_proj_bias[expert_ids_g]` where the experts have
# biases, added in place), the gate, the down grouped_mm (S x h, bias likewise), `proj_out *
# sample_weights_g` (S x h), `weighted_out[inv_perm]` (S x h), `.view(t, k, h).sum(1)`.
# Mixtral's layers keep `moe_mlp` above (their numbers are held as they were).


def grouped_router_saved(ctx: Ctx, arch: ModelArch) -> int:
    """The router's and the grouped path's bookkeeping, per layer. Softmax-first routers
    (Qwen2/3-MoE `TopKRouter.forward`) keep the fp32 softmax over all experts; the top-k values in
    fp32 (and their sum when renormalised); int64 top-k indices. Top-k-first (GptOssTopKRouter)
    keeps the k-wide softmax of the top logits in the compute dtype. Then the grouped path keeps
    the sorted order (`perm`, `perm // k`), `inv_perm` (int64 each) and the gathered sample weights
    (the score dtype: fp32 unless cast back)."""
    t, k, e, ab = ctx.tokens, arch.experts_per_token, arch.experts, ctx.act_bytes
    if arch.router_topk_first:
        router = k * (8 + ab)
        score = ab
    else:
        router = 4 * e + k * (8 + 4) + (4 if arch.router_norm_topk else 0)
        score = ab if arch.router_scores_cast else 4
    return t * (router + k * (8 + 8 + 8 + score))


def grouped_experts(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """What the routed experts save (integrations/moe.py `grouped_mm_experts_forward`): each
    grouped_mm keeps its input only for its weight's gradient (full fine-tuning: the gathered
    hidden states and the gated product); the gate keeps the up output (S x 2i: `chunk`/strided
    views of it are what SiLU, the clamps and `* up` save) and, for `act(gate) * up`, the
    activation (S x i); gpt-oss's clamped SwiGLU (GptOssExperts._apply_gate) keeps the clamped
    gate, sigmoid(alpha * gate), up + 1 and glu (4 x S x i); `proj_out * sample_weights` keeps the
    down output (S x h) for the router's gradient."""
    t, h, i, ab = ctx.tokens, arch.hidden, arch.intermediate, ctx.act_bytes
    s = t * arch.experts_per_token
    saved["moe.router"] = grouped_router_saved(ctx, arch)
    if ctx.base_trains:
        saved["moe.routed_inputs"] = s * h * ab
        saved["moe.product"] = s * i * ab
    saved["moe.gate_up_out"] = s * 2 * i * ab
    saved["moe.act_out"] = s * (4 if arch.expert_clamped_swiglu else 1) * i * ab
    saved["moe.expert_out"] = s * h * ab


def shared_expert_saved(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """Qwen2MoeSparseMoeBlock's shared expert (a Qwen2MoeMLP over every token, like `gated_mlp`)
    and `sigmoid(shared_expert_gate(x)) * shared_expert_output`: the product keeps the sigmoid
    (t x 1) and the shared expert's output (t x h)."""
    t, h, i, ab = ctx.tokens, arch.hidden, arch.shared_expert_intermediate, ctx.act_bytes
    saved["shared.gate_out"] = t * i * ab
    saved["shared.act_out"] = t * i * ab
    saved["shared.up_out"] = t * i * ab
    linear_input(ctx, ("shared_expert.down_proj",), i, "shared.product", saved)
    saved["shared.sigmoid"] = t * ab
    saved["shared.out"] = t * h * ab


def routed_layer_saved(arch: ModelArch, ctx: Ctx) -> Saved:
    """A Llama-like layer (input RMSNorm, attention with q/k norms where the arch has them,
    post-attention RMSNorm) whose MLP is the grouped_mm routed block: the post-attention norm's
    output feeds the router (and the shared expert and its gate), the experts gather their own copy."""
    saved = Saved()
    rms_norm(ctx, arch, "input_norm", ("q_proj", "k_proj", "v_proj"), saved)
    if arch.qk_norm:
        head_norms(ctx, arch, saved)
    o_proj(ctx, arch, "o_proj", attention_core(ctx, arch, False, saved), saved)
    consumers = (arch.router.name,) if arch.router else ()
    if arch.shared_expert_intermediate:
        consumers += ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert_gate")
    rms_norm(ctx, arch, "post_attn_norm", consumers, saved)
    grouped_experts(ctx, arch, saved)
    if arch.shared_expert_intermediate:
        shared_expert_saved(ctx, arch, saved)
    return saved


def _expert_bias(arch: ModelArch) -> bool:
    return any(lin.bias for lin in arch.linears if lin.module == "fused experts")


def routed_forward_transient(arch: ModelArch, ctx: Ctx, saved: Saved, checkpointed: bool) -> int:
    """The routed block's forward high point, at `weighted_out[inv_perm]` (integrations/moe.py):
    the gathered hidden states (unless saved), the down output (unless saved), `weighted_out` and
    its reordered copy, S x h each, and with expert biases the gathered down bias (still named by
    `selected_biases`); beside them the residual, the post-attention norm's output (unless saved)
    and the layer's input, which the decoder loop still references (unless saved). gpt-oss's
    clamped SwiGLU has a second candidate, its last product `(up + 1) * glu`: the gathered up bias
    (S x 2i), the clamped up (S x i, kept by nothing) and the product itself (unless saved), beside
    the gathered input (unless saved). A checkpointed layer saves nothing: all of them are counted."""
    t, h, i, ab = ctx.tokens, arch.hidden, arch.intermediate, ctx.act_bytes
    s = t * arch.experts_per_token
    kept = {} if checkpointed else saved
    bias = _expert_bias(arch)
    routed = 2 + ("moe.routed_inputs" not in kept) + ("moe.expert_out" not in kept) + bias
    if arch.expert_clamped_swiglu:
        parts = [k for k in ("moe.gate_up_out", "moe.act_out", "moe.product") if k not in kept]
        own = {"moe.gate_up_out": 2 * i, "moe.act_out": 4 * i, "moe.product": i}
        up = 2 * i * bias + i + sum(own[k] for k in parts) + h * ("moe.routed_inputs" not in kept)
        width = max(routed * h, up)
    else:
        width = routed * h
    stream = 1 + ("post_attn_norm.out" not in kept) + (0 if checkpointed else 1)
    return width * s * ab + stream * t * h * ab


def routed_backward_transient(arch: ModelArch, ctx: Ctx, saved: Saved) -> int:
    """The layer's backward as `layer_backward_transient`, or, larger with many small experts
    (h > i), the first step of the routed block's backward, the reorder's: the S x h gradient of the
    summed view made contiguous, the zeros `index` backward scatters into and the scattered
    result, beside the stream gradients. The walk holds a layer's transient beside its own weight
    gradients; at the reorder the experts' are not produced yet (the grouped_mm backward makes
    them), so where they train their bytes (in the weights' dtype, the stream's) are not there."""
    t, h, ab = ctx.tokens, arch.hidden, ctx.act_bytes
    s = t * arch.experts_per_token
    reorder = 2 * t * h * ctx.stream_bytes + 3 * s * h * ab
    if ctx.base_trains:
        reorder -= sum(lin.params for lin in arch.linears if lin.module == "fused experts") * ctx.stream_bytes
    return max(layer_backward_transient(arch, ctx, saved), reorder)


def routed_prefill_per_token(arch: ModelArch, ab: int) -> int:
    """The routed block's widest no-grad moment per token: k copies of the gathered input with
    the up output, the activation and the product (4i + h), or at the combine the gathered
    input, the down output, `weighted_out` and its reordered copy (4h); gpt-oss's clamped SwiGLU
    at its last product holds the up output, the two clamps, glu, up + 1 and the product (7i + h),
    and its gathered biases add 2i there and h at the combine. Qwen2-MoE's shared expert
    runs first (Qwen2MoeSparseMoeBlock.forward): its own gated moment (act, up and product), then
    its output (h) alive through the routed experts."""
    i, h = arch.intermediate, arch.hidden
    bias = _expert_bias(arch)  # the gathered biases (up: 2i, down: h), alive to the next grouped_mm / the end
    up = (7 * i if arch.expert_clamped_swiglu else 4 * i) + h + 2 * i * bias
    routed = arch.experts_per_token * max(up, (4 + bias) * h) * ab
    if arch.shared_expert_intermediate:
        return max(routed + h * ab, 3 * arch.shared_expert_intermediate * ab)
    return routed


# --- attention sinks in the model's own attention (gpt-oss) ---------------------------------------


def sink_attention(ctx: Ctx, arch: ModelArch, saved: Saved) -> str:
    """gpt-oss's eager attention (models/gpt_oss/modeling_gpt_oss.py `eager_attention_forward`, the
    path transformers runs for it on the CPU and by default: no SDPA path): keys and values
    repeated to every head (`repeat_kv` copies, kept by the two matmuls with q after RoPE), the
    scores in the compute dtype, `torch.cat([scores, sinks])` (a + 1 column), minus their max
    (`max(dim=-1)` keeps its int64 indices), `softmax(..., dtype=combined_logits.dtype)` keeps its
    output (s + 1 wide, in the compute dtype: no fp32 upcast), whose view without the sink column
    the second matmul keeps. Returns the tensor o_proj consumes."""
    t, s, a, ab = ctx.tokens, ctx.seq, arch.heads, ctx.act_bytes
    q = arch.q_width
    saved["attn.q_scaled"] = t * q * ab
    saved["attn.k_expanded"] = t * q * ab
    saved["attn.v_expanded"] = t * q * ab
    saved["attn.probs"] = t * a * (s + 1) * ab
    saved["attn.max_indices"] = t * a * 8
    return "attn.out_contiguous"


def sink_layer_saved(arch: ModelArch, ctx: Ctx) -> Saved:
    """GptOssDecoderLayer: RMSNorm (GptOssRMSNorm `(weight * x).to(dtype)`: the weight multiplies
    the fp32 normalised input, which that product keeps when the weight trains), biased q/k/v/o,
    the sink attention, RMSNorm, the router (with bias) and the grouped_mm experts with biases and
    the clamped SwiGLU."""
    saved = Saved()
    t, h = ctx.tokens, arch.hidden
    rms_norm(ctx, arch, "input_norm", ("q_proj", "k_proj", "v_proj"), saved)
    o_proj(ctx, arch, "o_proj", sink_attention(ctx, arch, saved), saved)
    rms_norm(ctx, arch, "post_attn_norm", (arch.router.name,) if arch.router else (), saved)
    for prefix in ("input_norm", "post_attn_norm"):
        if f"{prefix}.normed" in saved:
            saved[f"{prefix}.normed"] = 4 * t * h
    grouped_experts(ctx, arch, saved)
    return saved


def _own_softmax(ctx: Ctx) -> Ctx:
    """The context with the model's own softmax in the compute dtype (Kernel.math) for the shared
    backward formula: gpt-oss's eager attention does not upcast."""
    from dataclasses import replace

    return replace(ctx, attention=Kernel.math)


def sink_forward_transient(arch: ModelArch, ctx: Ctx, saved: Saved, checkpointed: bool) -> int:
    """The larger of the routed block's high point and the attention's at its softmax: the masked
    scores (still referenced as `attn_weights`) and the max-subtracted logits beside the
    probabilities (saved), a x s x (s + 1) each; a checkpointed layer also holds its attention's
    tensors then."""
    t, s, a, ab = ctx.tokens, ctx.seq, arch.heads, ctx.act_bytes
    held = sum(v for k, v in saved.items() if k.startswith("attn.")) if checkpointed else 0
    attention = t * a * s * ab + t * a * (s + 1) * ab + held
    return max(attention, routed_forward_transient(arch, ctx, saved, checkpointed))


def sink_backward_transient(arch: ModelArch, ctx: Ctx, saved: Saved) -> int:
    """As `routed_backward_transient`, the attention's softmax backward in the compute dtype."""
    return routed_backward_transient(arch, _own_softmax(ctx), saved)


# --- GPT-NeoX, Bloom, Falcon's new decoder architecture (LayerNorm families) -----------------------


def second_layer_norm_same_input(ctx: Ctx, arch: ModelArch, prefix: str, consumers: tuple[str, ...],
                                 saved: Saved) -> None:
    """A second LayerNorm over the same layer input as the first (GPT-NeoX's parallel residual:
    post_attention_layernorm(hidden_states); Falcon's new architecture: ln_mlp beside ln_attn).
    native_layer_norm saves its input, which the first norm already keeps (one storage): only its
    own mean and rstd, and its output for the consuming linears."""
    t, h = ctx.tokens, arch.hidden
    if ctx.grad_in:
        saved[f"{prefix}.mean_rstd"] = 2 * t * ctx.stats_bytes
    linear_input(ctx, consumers, h, f"{prefix}.out", saved, fp32_source=True)


def fused_qkv_value_view(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """GPT-NeoX splits `query_key_value`'s output by `.view(...).transpose(1, 2).chunk(3)`: the value
    SDPA gets is a view into the fused projection output, and a fused kernel saves its inputs as
    given, so the whole (q + k + v)-wide output stays alive where only v was counted (q and k are
    new tensors after the rotary's torch.cat). The materialising paths copy v (batched matmul)."""
    if ctx.attention is not Kernel.fused or ctx.kernel_bytes != ctx.act_bytes or ctx.packed_mask:
        return
    saved["attn.v"] = ctx.tokens * (arch.q_width + 2 * arch.kv_width) * ctx.act_bytes


def explicit_mask_saved(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """A fused SDPA kernel handed an explicit bool mask (Falcon) turns it into an additive one in
    its own dtype per call (attention.cpp `convert_boolean_attn_mask`) and saves it: one (b, 1, s, s)
    per layer, as with packed rows."""
    if arch.sdpa_explicit_mask and ctx.attention is Kernel.fused and not ctx.packed_mask:
        saved["attn.explicit_mask"] = ctx.batch * ctx.seq * ctx.seq * ctx.kernel_bytes


def own_attention_forward_extra(arch: ModelArch, ctx: Ctx, checkpointed: bool) -> int:
    """Bloom's attention forward beyond eager's scores (models/bloom/modeling_bloom.py): the baddbmm
    scores stay referenced by `attention_scores` while their masked sum goes through the softmax;
    and a checkpointed layer returns its probabilities (saved nowhere, but BloomModel's loop holds
    them in `outputs` through the next layer's forward); and the fused query_key_value output, which
    q, k and v were reshaped (copied) out of, is alive through the attention."""
    if not arch.own_attention:
        return 0
    fused = ctx.tokens * (arch.q_width + 2 * arch.kv_width) * ctx.act_bytes
    return ctx.tokens * arch.heads * ctx.seq * ctx.act_bytes * (2 if checkpointed else 1) + fused


# --- Gemma 2/3, Phi-3, OLMo 2 ---------------------------------------------------------------------

def post_norm_saved(ctx: Ctx, arch: ModelArch, prefix: str, saved: Saved) -> None:
    """An RMSNorm whose output only joins the residual sum (Gemma 2/3 post_attention_layernorm and
    post_feedforward_layernorm, OLMo 2's post-norms): what `rms_norm` saves for the norm itself
    (fp32 input, rsqrt, and with a trainable weight the product `weight *` keeps), no linear input."""
    scratch = Saved()
    rms_norm(ctx, arch, prefix, (), scratch)
    scratch.pop(f"{prefix}.out", None)  # no projection reads it
    saved.update(scratch)


def attention_softcap_saved(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """Gemma 2's attention soft-capping in eager_attention_forward (models/gemma2/modeling_gemma2.py):
    `scores / cap` then `tanh` then `* cap`; tanh saves its output (t x heads x s in the scores'
    dtype), the scalar divisions save nothing. Fused kernels (flash-attn's `softcap`) keep nothing."""
    if arch.attn_softcap is None or ctx.attention is Kernel.fused:
        return
    md = ctx.act_bytes if ctx.attention is Kernel.eager else materialised_bytes(ctx)
    # not an "attn." key: a checkpointed forward saves nothing, and `* cap` frees tanh's output
    # before the softmax's high point, so it is not among the attention tensors a checkpointed
    # layer holds while it runs (layer_forward_transient)
    saved["softcap.attn_tanh"] = ctx.tokens * arch.heads * ctx.seq * md


def full_width_qk_norms(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """OLMo 2's q_norm and k_norm (models/olmo2/modeling_olmo2.py Olmo2Attention.forward:
    `q_norm(q_proj(x))`, an Olmo2RMSNorm over all heads x head_dim at once): as the hidden-size
    norm saves, fp32 input, one rsqrt per token and, when the weight trains, the fp32 normalised
    input `weight *` keeps (Olmo2RMSNorm multiplies before it casts back). The cast-back output
    that RoPE reads is not kept: RoPE's products save the cos/sin tables, not their input."""
    t = ctx.tokens
    for name, width in (("q", arch.q_width), ("k", arch.kv_width)):
        if not (ctx.grad_in or ctx.base_trains or f"{name}_proj" in ctx.targets):
            continue
        saved[f"{name}_norm.fp32_input"] = 4 * t * width
        saved[f"{name}_norm.rsqrt"] = 4 * t
        if ctx.base_trains:  # `weight * x` keeps the fp32 normalised input (Olmo2RMSNorm casts after)
            saved[f"{name}_norm.normed"] = 4 * t * width


def gemma_head_norms(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """Gemma 3's q_norm and k_norm (models/gemma3/modeling_gemma3.py Gemma3Attention.forward): a
    Gemma3RMSNorm over each head, `x.float()` normalised then `* (1 + w)` in fp32 and cast back, so
    where a gradient flows it saves the fp32 input and one rsqrt per head, and with a trainable
    weight the fp32 normalised product (not a cast-back copy, as Qwen3's `head_norms` keeps)."""
    t = ctx.tokens
    for name, width, heads in (("q", arch.q_width, arch.heads), ("k", arch.kv_width, arch.kv_heads)):
        if not (ctx.grad_in or ctx.base_trains or f"{name}_proj" in ctx.targets):
            continue
        saved[f"{name}_norm.fp32_input"] = 4 * t * width
        saved[f"{name}_norm.rsqrt"] = 4 * t * heads
        if ctx.base_trains:
            saved[f"{name}_norm.normed"] = 4 * t * width


def fused_qkv_view(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """A fused qkv projection (Phi-3 `qkv_proj`) whose value slice reaches the attention as a view:
    whatever keeps v keeps the whole qkv output, q and k columns included (the fused kernels save
    v itself; eager keeps it only when repeat_kv has nothing to repeat)."""
    if ctx.attention is Kernel.fused:
        kept = "attn.v" in saved and not ctx.packed_mask
    elif ctx.attention is Kernel.eager:
        kept = arch.kv_heads == arch.heads
    else:
        kept = False
    if kept:
        saved["attn.qkv_rest"] = ctx.tokens * (arch.q_width + arch.kv_width) * (
            ctx.kernel_bytes if ctx.attention is Kernel.fused else ctx.act_bytes)


def fused_gated_mlp(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """Phi3MLP: `gate, up = gate_up_proj(x).chunk(2)`, `up * act(gate)`: act saves gate and the
    product saves up and act's output; gate and up are views of one (tokens, 2i) output, so that
    storage is what stays (the same bytes as the separate gate and up of `gated_mlp`)."""
    t, i, ab = ctx.tokens, arch.intermediate, ctx.act_bytes
    saved["mlp.gate_up_out"] = 2 * t * i * ab
    saved["mlp.act_out"] = t * i * ab
    linear_input(ctx, ("down_proj",), i, "mlp.product", saved)


# --- DeepSeek-V2/V3: multi-head latent attention, routed experts with a shared MLP -----
# models/deepseek_v2/modeling_deepseek_v2.py and models/deepseek_v3/modeling_deepseek_v3.py
# (transformers 5); each rule read off the modeling file and confirmed on the CPU trace of the tiny
# and real-size configs (docs/activations.md, "DeepSeek-V2 / V3").


def _small_rms_norm(ctx: Ctx, prefix: str, width: int, flows: bool, consumer: str, saved: Saved) -> None:
    """DeepseekV2RMSNorm over a latent (q_a_layernorm, kv_a_layernorm), as the hidden-size one
    saves: its fp32 input and rsqrt where a gradient flows through it, the cast-back copy when its
    weight trains; its output is the next projection's input."""
    t = ctx.tokens
    if flows:
        saved[f"{prefix}.fp32_input"] = 4 * t * width
        saved[f"{prefix}.rsqrt"] = 4 * t
        if ctx.base_trains:
            saved[f"{prefix}.normed"] = t * width * ctx.act_bytes
    linear_input(ctx, (consumer,), width, f"{prefix}.out", saved)


def mla_attention(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """DeepseekV2Attention.forward after the input norm (whose output q_proj or q_a_proj and
    kv_a_proj_with_mqa consume): q_a_layernorm -> q_b_proj when q is low-rank; kv_a_layernorm over
    the latent -> kv_b_proj; RoPE on the rotary slices (V2: complex multiplication by freqs_cis, V3:
    rotate_half or its interleaved form; either saves only the shared tables, as the tables need no
    gradient); `torch.cat((q_nope, q_pe))` a new query, `expand_kv` a new key (`new_empty` +
    `copy_`) and the value a view of kv_b_proj's output. Then the kernel, and o_proj's input, the
    output made contiguous (heads x v_head_dim)."""
    m = arch.mla
    t, s, a, ab = ctx.tokens, ctx.seq, arch.heads, ctx.act_bytes
    flows = ctx.grad_in or ctx.base_trains
    if m.q_lora_rank is not None:
        _small_rms_norm(ctx, "q_a_norm", m.q_lora_rank, flows or "q_a_proj" in ctx.targets, "q_b_proj", saved)
    _small_rms_norm(ctx, "kv_a_norm", m.kv_lora_rank, flows or "kv_a_proj_with_mqa" in ctx.targets, "kv_b_proj", saved)
    qk, v = a * m.qk_head_dim, a * m.v_head_dim
    kv_b_out = a * (m.qk_nope_head_dim + m.v_head_dim)  # the value's storage: kv_b_proj's whole output
    if ctx.attention is Kernel.fused:
        kb = ctx.kernel_bytes
        saved["attn.q"] = t * qk * kb
        saved["attn.k"] = t * qk * kb
        if ctx.packed_mask:
            saved["attn.packed_mask"] = ctx.batch * s * s * kb
        # flash-attn pads the values to the query width (integrations/flash_attention.py: `pad`
        # to head_dim, output cropped) and keeps the padded output; SDPA's memory-efficient
        # kernel takes the narrower values as they are, a view of kv_b_proj's output
        saved["attn.v"] = t * (qk if ctx.flash_attn else kv_b_out) * kb
        saved["attn.out"] = t * (qk if ctx.flash_attn else v) * kb
        saved["attn.logsumexp"] = 4 * t * a
    elif ctx.attention is Kernel.eager:
        # eager_attention_forward: q and k for the scores, the fp32 softmax and its cast back, and v
        saved["attn.q_scaled"] = t * qk * ab
        saved["attn.k_expanded"] = t * qk * ab
        saved["attn.softmax_fp32"] = 4 * t * a * s
        saved["attn.probs"] = ab * t * a * s
        saved["attn.v_expanded"] = t * kv_b_out * ab
    else:
        # SDPA's math kernel: q (scaled) and k in its dtype, the probabilities and v (a new copy)
        md = materialised_bytes(ctx)
        saved["attn.q_scaled"] = t * qk * md
        saved["attn.k_expanded"] = t * qk * md
        saved["attn.probs"] = md * t * a * s
        if arch.attn_dropout > 0:
            saved["attn.dropout_mask"] = t * a * s * ctx.dropout_mask(md)
            saved["attn.probs_dropped"] = md * t * a * s
        saved["attn.v_expanded"] = t * v * md
    linear_input(ctx, ("o_proj",), v, "attn.out_contiguous", saved)


def deepseek_router(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """DeepseekV2TopkRouter / DeepseekV3TopkRouter: `F.linear(x.float(), weight.float())` keeps the
    fp32 copy of the input when the router's weight trains and the fp32 copy of the weight
    (hidden x experts) for the input's gradient; V2's softmax keeps its output and topk its indices;
    V3's sigmoid keeps its output, the grouped top-k its group indices (top-2 per group, then the
    topk_group best groups), the bool mask of the kept experts and the top-k indices; with
    norm_topk_prob the sum and the normalised weights' copy."""
    t, h, e, k = ctx.tokens, arch.hidden, arch.experts, arch.experts_per_token
    if ctx.base_trains:
        saved["moe.router_fp32_input"] = 4 * t * h
    saved["moe.router_fp32_weight"] = 4 * h * e
    saved["moe.router_scores"] = 4 * t * e
    saved["moe.router_topk"] = 8 * t * k
    groups, best = arch.router_groups
    if arch.deepseek_router == "sigmoid_grouped":
        saved["moe.router_groups"] = 8 * t * (2 * groups + best) + t * e
    elif groups > 1:
        # V2's group_limited_greedy: the max per group keeps its indices, then the best groups'
        # indices and the bool mask (read off the modeling file; no shipped config runs it)
        saved["moe.router_groups"] = 8 * t * (groups + best) + t * e
        if arch.router_norm_topk:
            saved["moe.router_norm"] = 4 * t + 4 * t * k


def deepseek_experts(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """DeepseekV2Experts (fused 3-D weights, the grouped_mm experts implementation, as Mixtral's):
    the sort of the routed tokens (three int64 index vectors of tokens x k, the int32 offsets per
    expert), the inputs gathered per expert and the product (for the experts' weight gradients
    only), the fused gate-up output, the activation, the experts' output and their fp32 routing
    weights, both kept by the weighting."""
    t, h, i, ab = ctx.tokens, arch.hidden, arch.intermediate, ctx.act_bytes
    k, e = arch.experts_per_token, arch.experts
    saved["moe.sort"] = 3 * 8 * t * k + 4 * e
    saved["moe.weights"] = 4 * t * k
    if ctx.base_trains:
        saved["moe.routed_inputs"] = t * k * h * ab
        saved["moe.product"] = t * k * i * ab
    saved["moe.gate_up_out"] = t * k * 2 * i * ab
    saved["moe.act_out"] = t * k * i * ab
    saved["moe.expert_out"] = t * k * h * ab


def shared_gated_mlp(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """DeepseekV2Moe.shared_experts: a gated MLP of shared_intermediate beside the routed experts
    (its input, the post-attention norm's output, is kept by its gate and up projections)."""
    t, i, ab = ctx.tokens, arch.shared_intermediate, ctx.act_bytes
    saved["mlp.shared_gate_out"] = t * i * ab
    if not ctx.liger:
        saved["mlp.shared_act_out"] = t * i * ab
    saved["mlp.shared_up_out"] = t * i * ab
    linear_input(ctx, ("shared_experts.down_proj",), i, "mlp.shared_product", saved)


def deepseek_moe(ctx: Ctx, arch: ModelArch, saved: Saved) -> None:
    """DeepseekV2Moe / DeepseekV3MoE.forward: router, routed experts, shared experts."""
    deepseek_router(ctx, arch, saved)
    deepseek_experts(ctx, arch, saved)
    if arch.shared_intermediate:
        shared_gated_mlp(ctx, arch, saved)


def deepseek_prefill_mlp(arch: ModelArch, ab: int) -> int:
    """A routed layer's widest no-grad moment per token: the routed experts' (k routed inputs, the
    fused gate-up, act and product), the dense layers' gated MLP when wider."""
    routed = arch.experts_per_token * (4 * arch.intermediate + arch.hidden) * ab if arch.experts else 0
    return max(routed, 3 * (arch.dense_intermediate or arch.intermediate) * ab)


def mla_forward_live(arch: ModelArch, ctx: Ctx, saved: Saved) -> int:
    """What DeepseekV2Attention.forward holds at its scores beyond what the layer saves: its locals
    keep q_proj's (q_b_proj's) output (q_nope and q_pe are views of it; q_a_proj's output and its
    norm's are temporaries of one expression), the concatenated query,
    kv_b_proj's output (the value is a view of it), the new key, the latent projection, its norm's
    output and the rotated q_pe and k_pe; the math kernel adds its unscaled fp32 copy of q
    (CPU trace of a checkpointed DeepSeek-V2 layer). Those the layer saves are not counted twice."""
    m = arch.mla
    t, a, ab = ctx.tokens, arch.heads, ctx.act_bytes
    qk = a * m.qk_head_dim
    live = {
        "q_out": t * qk * ab,
        "attn.q": t * qk * ab,
        "attn.k": t * qk * ab,
        "attn.v": t * a * (m.qk_nope_head_dim + m.v_head_dim) * ab,
        "kv_a_out": t * m.latent_width * ab,
        "kv_a_norm.out": t * m.kv_lora_rank * ab,
        "rope": t * (a + 1) * m.qk_rope_head_dim * ab,
    }
    # the saved tensors that are these same tensors
    same = {"attn.q": ("attn.q", "attn.q_scaled"), "attn.k": ("attn.k", "attn.k_expanded"),
            "attn.v": ("attn.v", "attn.v_expanded"), "kv_a_norm.out": ("kv_a_norm.out",),
            "q_a_norm.out": ("q_a_norm.out",)}
    fp32_copies = ctx.attention is Kernel.math_fp32 and ctx.act_bytes != 4
    total = 0
    for name, n in live.items():
        aliases = same.get(name, ())
        if fp32_copies and name in ("attn.q", "attn.k", "attn.v"):
            aliases = ()  # the math kernel saved fp32 copies, not these
        if not any(k in saved for k in aliases):
            total += n
    if fp32_copies:
        total += t * qk * 4  # q.float() before the scaling (the scaled copy is saved)
    return total
