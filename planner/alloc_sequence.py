"""The allocation sequence of a job, derived from the estimate's own walk, for the allocator model.

The walk (planner/estimate.py) knows what is live at each moment; the caching allocator
(planner/allocator.py) needs the order in which tensors are allocated and freed, tensor by tensor,
because what it reserves depends on which freed block a later request lands in. This module turns
the walk's quantities into that order, one decoder layer's pattern repeated:

- load: every parameter in module order (a 4/8-bit linear as transformers' bitsandbytes loading
  makes it: the 16-bit weight on the device, its quantized storage beside it, the 16-bit copy
  freed); peft's kbit upcast (an fp32 copy of each 16-bit parameter, the original freed); adapters.
- each step (two are replayed, STEPS below):
  forward layer by layer: where the family records its layer's ops (activations.Saved.tape: the
  norms', the rotary positions', each linear's call, the residual sums, in the order the modeling
  file runs them) the layer runs op by op (_tape_forward), else its saved tensors with its linear
  calls' temporaries spread among them (LinearCall); a checkpointed layer's first forward frees its
  tensors as they are consumed, its input kept. The head and loss; the loss's backward; each
  layer's backward in reverse (recomputation; on a taped layer with fused attention the forward's
  ops in reverse, _tape_backward, else gradients of the activations shaped like the tensors they
  belong to then the parameters' gradients; each 4/8-bit weight dequantized again; the saved
  tensors freed); a tied embedding's gradient summed out of place; the optimizer step (states
  created in the first step, in parameter order, then the update's temporaries),
  zero_grad(set_to_none=True).

Pure: numbers in, events out.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from .allocator import AllocatorSettings, AllocatorStats, Event, replay

# steps replayed: the harness runs three (a warm-up and two measured, validate/worker.py), but from
# the second on the optimizer states exist and every step repeats the one before: two give the
# same reserved bytes as three on all 42 committed rows, from the traced sequence and this one alike
STEPS = 2


@dataclass
class LoadPlan:
    """Parameter storage in load order: per decoder layer (dense, stored, upcast) for each tensor
    (dense > stored: a quantized weight, its 16-bit form freed once quantized; upcast > 0: the
    bytes of its fp32 copy under peft's kbit upcast), then the root tensors, then the adapters."""

    layer: list[tuple[int, int, int]]
    root: list[tuple[int, int, int]]
    layers: int
    empty_cache_after_upcast: bool = False  # Stack.kbit_prepare_empties_cache
    adapters_per_layer: list[int] = field(default_factory=list)
    adapters_root: list[int] = field(default_factory=list)
    root_leading: int = 0  # root tensors before the layers in module order (the embeddings)
    adapters_leading: int = 0  # root adapters before the layers (an embedding's LoRA)


@dataclass(frozen=True)
class LinearCall:
    """What one linear call of a layer allocates and frees beyond the tensors the layer saves. Zero
    bytes: no such tensor.
    - A 4/8-bit base (bitsandbytes Linear4bit.forward: `x.to(compute_dtype)`, then MatMul4Bit.forward
      `F.linear(A, dequantize_4bit(B).to(A.dtype).t())`, then `.to(inp_dtype)`; MatMul4Bit.backward:
      `grad_output @ dequantize_4bit(B).t()`): the input cast (none when it is already in the compute
      dtype), the dequantized weight (none where the fused kernel runs), the matmul's output.
    - A LoRA target (peft tuners/lora/layer.py `Linear.forward`: `result = result +
      lora_B(lora_A(dropout(x))) * scaling`, then `result.to(torch_result_dtype)`): lora_B's output,
      its scaled copy, the sum (promoted to the wider of the two dtypes) and the sum cast back."""

    cast: int = 0  # the input in the compute dtype
    dequant: int = 0  # the weight dequantized
    # double quantization: the fp32 absmax of every block, dequantized first (bitsandbytes
    # functional.py `dequantize_4bit`: `absmax = dequantize_blockwise(quant_state.absmax, ...)`)
    absmax: int = 0
    out: int = 0  # the matmul's output in the compute dtype
    out_cast: int = 0  # ... cast back to the input's dtype (0: it was in the compute dtype)
    grad_in: int = 0  # backward: the input gradient in the compute dtype
    lora_out: int = 0  # lora_B's output (and its scaled copy)
    lora_sum: int = 0  # result + the scaled lora output, in the promoted dtype
    lora_cast: int = 0  # the sum cast back to the result's dtype (0: same dtype, no copy)
    name: str = ""  # the projection (empty: one call standing for the layer's, e.g. a kernel's dequantized weight)
    result: int = 0  # the output as the base layer returns it (the output's own tensor, on the tape)

    @property
    def busy(self) -> bool:
        """Whether the call allocates anything beyond its output."""
        return dataclasses.replace(self, name="", result=0) != LinearCall()

    def run(self, ev: list[Event], keys: itertools.count, own: list[int]) -> tuple[int, list[int]]:
        """The call on a layer's tape: the base layer's temporaries and its output, the linear's own
        saved tensors (`own`: LoRA's input cast and lora_A's output, made between the base matmul
        and lora_B), LoRA's sum. Returns the key of the output, which the layer goes on with, and
        the own tensors' keys."""
        c, d, o = next(keys), next(keys), next(keys)
        if self.cast:
            ev.append(("alloc", c, self.cast))
        self._dequantize(ev, d, keys)
        ev += [("alloc", o, self.out or self.result), ("free", d)] + ([("free", c)] if self.cast else [])
        if self.out_cast:
            r = next(keys)
            ev += [("alloc", r, self.out_cast), ("free", o)]
            o = r
        mine = [next(keys) for _ in own]
        ev += [("alloc", k, n) for k, n in zip(mine, own)]
        if self.lora_out:
            b, sc, sm = next(keys), next(keys), next(keys)
            ev += [("alloc", b, self.lora_out), ("alloc", sc, self.lora_out), ("free", b), ("alloc", sm, self.lora_sum),
                   ("free", sc), ("free", o)]
            o = sm
            if self.lora_cast:
                ca = next(keys)
                ev += [("alloc", ca, self.lora_cast), ("free", sm)]
                o = ca
        return o, mine

    def forward(self, ev: list[Event], keys: itertools.count) -> None:
        """The call spread among a layer's saved tensors (an untaped layer): its temporaries only,
        the output counted among the saved tensors, so freed here."""
        o, _ = dataclasses.replace(self, result=0).run(ev, keys, [])
        ev.append(("free", o))

    def _dequantize(self, ev: list[Event], key: int, keys: itertools.count) -> None:
        if self.dequant and self.absmax:
            a = next(keys)
            ev += [("alloc", a, self.absmax), ("alloc", key, self.dequant), ("free", a)]
        else:
            ev.append(("alloc", key, self.dequant))

    def backward(self, ev: list[Event], keys: itertools.count) -> None:
        d, g = next(keys), next(keys)
        self._dequantize(ev, d, keys)
        ev += [("alloc", g, self.grad_in), ("free", d), ("free", g)]


@dataclass
class TrainingPlan:
    load: LoadPlan
    layers: int
    first_saved: list[int]  # the first layer's saved tensors (it may save less: no input gradient)
    saved: list[int]  # one layer's saved tensors, in the order its forward makes them
    checkpointed: bool
    checkpoint_input: int  # a checkpointed layer's kept input
    forward_transient: int  # what one layer's forward holds briefly (attention scores)
    backward_transient: int  # one layer's backward: gradients of its activations
    scores: int  # one materialised attention-score tensor (0: a fused kernel)
    # one layer's linear calls that allocate beyond what it saves (4/8-bit bases, LoRA targets), in
    # module order, each as a short tape (LinearCall)
    linear_calls: list["LinearCall"]
    shared: int  # rotary tables, masks, the final norm's saved tensors
    # LossTerms.forward_tensors / backward_ops (planner/stacks/base.py)
    loss_forward: tuple
    loss_backward: tuple
    head_input_grad: int  # gradient into the final hidden states
    layer_grads: list[int]  # gradients of one layer's trainable tensors
    root_grads: list[int]  # embedding / head / final norm gradients
    # optimizer states of each trainable tensor of one layer, and of the root, in parameter order
    layer_states: list[tuple[int, ...]]
    root_states: list[tuple[int, ...]]
    # the update's temporaries per trainable tensor (foreach: all at once; else one tensor at a time)
    layer_temps: list[int]
    root_temps: list[int]
    # trainable root tensors before the layers in model.parameters() order (the embedding, or its
    # LoRA): the optimizer creates states and runs its update in that order
    root_leading: int = 0
    temporaries_together: bool = True
    # a tied embedding that trains: its gradient as the embedding's backward makes it, while the
    # head's (the first root gradient) is held; AccumulateGrad adds the two out of place
    tied_grad: int = 0
    # cuBLAS workspaces, allocated through torch's pool by the first matmul of each thread: the
    # forward's, then the autograd engine's in the first backward (planner/overhead.py)
    workspaces: list[int] = field(default_factory=list)
    # one layer's forward op by op (layer_tape), the first layer's, where the family records one:
    # then a forward with gradients runs the tape, and the saved lists only give the checkpointed
    # layer's no-grad forward
    tape: tuple = ()
    first_tape: tuple = ()
    # the layer's parameter gradients by the linear whose backward makes them, in parameter order
    # (trainable_by_linear; "": the norms', made last); empty: the tape's backward is not followed
    grads_by_linear: dict = field(default_factory=dict)


def in_module_order(per_layer: list, layers: int, root: list, leading: int) -> list:
    """Every layer's items and the root's, as model.parameters() walks them: the root's first
    `leading` (the embeddings) before the decoder layers, the rest (final norm, head) after."""
    return root[:leading] + [x for _ in range(layers) for x in per_layer] + root[leading:]


def _load_events(p: LoadPlan, ev: list[Event], keys: itertools.count) -> None:
    upcasts: list[tuple[int, int]] = []

    def put(dense: int, stored: int, upcast: int) -> None:
        k = next(keys)
        if dense > stored:
            t = next(keys)
            ev.append(("alloc", t, dense))
            ev.append(("alloc", k, stored))
            ev.append(("free", t))
        else:
            ev.append(("alloc", k, stored))
        if upcast:
            upcasts.append((k, upcast))

    for dense, stored, upcast in in_module_order(p.layer, p.layers, p.root, p.root_leading):
        put(dense, stored, upcast)
    for old, new in upcasts:
        # peft prepare_model_for_kbit_training: `param.data = param.data.to(torch.float32)`, one
        # parameter at a time, the 16-bit storage freed as the fp32 copy replaces it
        ev.append(("alloc", next(keys), new))
        ev.append(("free", old))
    if upcasts and p.empty_cache_after_upcast:
        ev.append(("empty_cache",))
    for n in in_module_order(p.adapters_per_layer, p.layers, p.adapters_root, p.adapters_leading):
        ev.append(("alloc", next(keys), n))


def _start(load: LoadPlan) -> tuple[itertools.count, list[Event]]:
    """Fresh keys and the load's events; the peaks start after it, as what the job holds from
    there on is what must fit: a peak while loading that an empty_cache ended (peft's upcast) is
    given back to the driver by the free-and-retry path when memory is short."""
    keys = itertools.count(1)
    ev: list[Event] = []
    _load_events(load, ev, keys)
    ev.append(("mark", "loaded"))
    ev.append(("reset_peak",))
    return keys, ev


def split_like(total: int, shapes: list[int]) -> list[int]:
    """`total` bytes of gradients cut into tensors the size of `shapes` (the activations they are
    gradients of, largest first), the rest as one tensor."""
    out = []
    left = total
    for s in sorted(shapes, reverse=True):
        if s and s <= left:
            out.append(s)
            left -= s
    if left > 0:
        out.append(left)
    return out


# A checkpointed layer's first forward runs without saving (torch.utils.checkpoint): each
# intermediate is freed once the op consuming it has run, so at most the latest two of the layer's
# tensors (an op's input and its output) are alive together, not the whole layer's saved set
NO_GRAD_WINDOW = 2


def _layer_forward(ev: list[Event], keys: itertools.count, saved: list[int], calls: list[LinearCall],
                   window: int = 0) -> list[int]:
    """One layer's forward: its tensors in the order it makes them, with each linear call's
    temporaries (LinearCall) spread over the layer in module order, as the linears run. `window`:
    free each tensor that many allocations later (a forward under no_grad); 0 keeps them all (saved
    for backward). Returns the keys still alive."""
    ks = [next(keys) for _ in saved]
    at = [len(saved) * j // len(calls) for j in range(len(calls))]
    d = 0
    for j, (x, n) in enumerate(zip(ks, saved)):
        while d < len(calls) and at[d] <= j:
            calls[d].forward(ev, keys)
            d += 1
        ev.append(("alloc", x, n))
        if window and j >= window:
            ev.append(("free", ks[j - window]))
    for call in calls[d:]:
        call.forward(ev, keys)
    if window:
        ev += [("free", x) for x in ks[-window:]]
        return []
    return ks


def layer_tape(saved) -> tuple:
    """A layer's tape (activations.Saved.tape) with every size resolved, or () when its family
    records no linear call (then the saved list stands for the forward). Ops: ("alloc", name, n,
    kept) a tensor made (kept: saved for backward); ("keep", name) an earlier tensor saved (the
    layer's input is "input"); ("free", name); ("linear", name, [n of its own saved tensors]);
    ("output", name). A saved tensor the tape never made is made at the layer's end."""
    tape = getattr(saved, "tape", None)
    if not tape or not any(op[0] == "linear" for op in tape):
        return ()
    placed = {op[1] for op in tape if op[0] == "linear"}
    own = {n: [] for n in placed}
    moved = set()
    for op in tape:
        if op[0] == "save" and op[1] in saved:
            lin = next((n for n in placed if op[1].startswith(n + ".")), None)
            if lin is not None:
                own[lin].append(saved[op[1]])
                moved.add(op[1])
    out: list[tuple] = []
    made: set[str] = set()
    for op in tape:
        kind, name = op[0], op[1]
        if kind == "save":
            if name in saved and name not in moved:
                out.append(("keep", name) if name in made else ("alloc", name, saved[name], True))
                made.add(name)
        elif kind == "temp":
            if name not in made:
                kept = name in saved
                out.append(("alloc", name, saved[name] if kept else op[2], kept))
                made.add(name)
        elif kind == "alias":
            for tensor in op[2:]:
                made_here = tensor in made or tensor == "input"
                out.append(("keep", tensor) if made_here else ("alloc", tensor, saved[name] // len(op[2:]), True))
                made.add(tensor)
            made.add(name)
        elif kind == "drop":
            out += [("free", n) for n in op[1:]]
        elif kind == "linear":
            out.append(("linear", name, tuple(own[name])))
            made.add(f"{name}.out")
        elif kind == "output":
            out.append(("output", name))
    aliased = {op[1] for op in tape if op[0] == "alias"}
    out += [("alloc", n, v, True) for n, v in saved.items() if n not in made and n not in moved and n not in aliased]
    return tuple(out)


def _tape_forward(ev: list[Event], keys: itertools.count, tape: tuple, calls: list[LinearCall],
                  inp: int | None, keep_output: bool = True, trail: list | None = None) -> tuple[list[int], int | None]:
    """One layer's forward with gradients, op by op (layer_tape). `inp`: the key of the layer's
    input, freed when the layer returns unless the layer saves it (None: not in the sequence, or
    held by someone else: the checkpoint). Returns the keys of what the layer saves and of its
    output (None where `keep_output` is off: a recomputation's output is dropped)."""
    by_name = {c.name: c for c in calls if c.name}
    placed = {op[1] for op in tape if op[0] == "linear"}
    for call in calls:  # a call the tape does not place runs first
        if call.busy and call.name not in placed:
            call.forward(ev, keys)
    live: dict[str, int] = {} if inp is None else {"input": inp}
    kept: set[str] = set()
    own: list[int] = []  # the linears' own saved tensors
    output = None
    for op in tape:
        kind, name = op[0], op[1]
        if kind == "alloc":
            k = live[name] = next(keys)
            ev.append(("alloc", k, op[2]))
            if op[3]:
                kept.add(name)
            if trail is not None:
                trail.append(("tensor", k, op[2]))
        elif kind == "keep":
            if name in live:
                kept.add(name)
        elif kind == "free":
            if name in live and name not in kept:
                ev.append(("free", live.pop(name)))
        elif kind == "linear":
            call = by_name.get(name, LinearCall(name=name))
            live[f"{name}.out"], mine = call.run(ev, keys, list(op[2]))
            own += mine
            if trail is not None:
                trail.append(("linear", name, mine, call.result))
        elif kind == "output":
            output = name
    saved_keys = [live[n] for n in kept if n in live] + own
    out_key = live.get(output) if output is not None and keep_output else None
    for n, k in list(live.items()):
        if n not in kept and k != out_key:
            ev.append(("free", k))
    return saved_keys, out_key


def _tape_backward(ev: list[Event], keys: itertools.count, trail: list, calls: list[LinearCall],
                   grads: dict[str, list[int]], hg: int, out_bytes: int, kept: list[int]) -> tuple[int, list[int]]:
    """One layer's backward as autograd runs it, the forward's ops in reverse (`trail`, what
    _tape_forward made): each tensor's gradient is made when its consumer's backward runs and
    released once its producer's has (so the latest two are alive, as along a chain), each linear
    makes its parameters' gradients (`grads`, by linear) where its backward runs, and what the
    forward saved is released by the backward of the op that saved it. `hg`: the gradient coming
    in. Returns the gradient into the layer below and the parameters' gradients; releases every
    key of `kept` (the saved tensors the trail did not make, a checkpoint's input, at the end)."""
    by_name = {c.name: c for c in calls if c.name}
    saved = set(kept)
    made: list[int] = []
    prev = hg
    for entry in reversed(trail):
        if entry[0] == "linear":
            call = by_name.get(entry[1])
            if call is not None and call.busy:
                call.backward(ev, keys)
            for n in reversed(grads.get(entry[1], [])):  # autograd reaches lora_B before lora_A
                g = next(keys)
                ev.append(("alloc", g, n))
                made.append(g)
            ev += [("free", k) for k in entry[2]]
            saved.difference_update(entry[2])
            continue
        _, key, n = entry
        g = next(keys)
        ev += [("alloc", g, n), ("free", prev)]
        prev = g
        if key in saved:
            ev.append(("free", key))
            saved.discard(key)
    out = next(keys)
    ev += [("alloc", out, out_bytes), ("free", prev)]
    ev += [("free", k) for k in kept if k in saved]
    for n in grads.get("", []):
        g = next(keys)
        ev.append(("alloc", g, n))
        made.append(g)
    return out, made


def training_events(p: TrainingPlan, steps: int = STEPS) -> list[Event]:
    keys, ev = _start(p.load)
    states: list[int] = []
    # transients are tensors shaped like the layer's own: its saved activations, its scores
    shapes = p.saved + ([p.scores] if p.scores else [])
    bwd_pieces = split_like(p.backward_transient, shapes)
    busy = [c for c in p.linear_calls if c.busy]
    fwd_pieces = split_like(p.forward_transient, shapes) if p.forward_transient else []
    for step in range(1, steps + 1):
        # --- forward
        if step == 1 and p.workspaces:
            ev.append(("alloc", next(keys), p.workspaces[0]))
        shared = next(keys)
        ev.append(("alloc", shared, p.shared))
        layer_keys: list[list[int]] = []
        trails: list[list] = []  # each taped layer's forward, for its backward
        stream = None  # the last layer's output, on a taped forward
        for i in range(p.layers):
            saved = p.first_saved if i == 0 else p.saved
            tape = p.first_tape if i == 0 else p.tape
            if p.checkpointed:
                k = next(keys)
                ev.append(("alloc", k, p.checkpoint_input))
                _layer_forward(ev, keys, saved, busy, window=NO_GRAD_WINDOW)
                layer_keys.append([k])
            elif tape:
                trail: list = []
                kept, stream = _tape_forward(ev, keys, tape, p.linear_calls, stream, trail=trail)
                layer_keys.append(kept)
                trails.append(trail)
            else:
                layer_keys.append(_layer_forward(ev, keys, saved, busy))
            ts = [next(keys) for _ in fwd_pieces]
            ev += [("alloc", x, n) for x, n in zip(ts, fwd_pieces)]
            ev += [("free", x) for x in ts]
        named: dict[str, int] = {}
        step_end, fwd_end = [], []
        for name, n, life in p.loss_forward:
            k = named[name] = next(keys)
            ev.append(("alloc", k, n))
            if life == "free":
                fwd_end.append(name)
            elif life == "step":
                step_end.append(named.pop(name))
        for name in fwd_end:  # the model's outputs dropped as the forward returns, the loss kept
            ev.append(("free", named.pop(name)))
        if stream is not None:  # the last layer's output, read by the final norm
            ev.append(("free", stream))
        ev.append(("mark", f"step {step} forward"))
        # --- loss backward
        if step == 1:
            ev += [("alloc", next(keys), n) for n in p.workspaces[1:]]
        for op in p.loss_backward:
            if op[0] == "alloc":
                k = named[op[1]] = next(keys)
                ev.append(("alloc", k, op[2]))
            else:
                ev.append(("free", named.pop(op[1])))
        hg = next(keys)
        ev.append(("alloc", hg, p.head_input_grad))
        ev += [("free", k) for k in named.values()]
        grads: list[int] = []
        for n in p.root_grads[:1]:  # the head's (or tied embedding's) gradient, from the loss backward
            g = next(keys)
            ev.append(("alloc", g, n))
            grads.append(g)
        # --- layers' backward, last first
        for i in reversed(range(p.layers)):
            saved = p.first_saved if i == 0 else p.saved
            tape = p.first_tape if i == 0 else p.tape
            recomputed = []
            # materialised attention's backward holds several score-sized gradients at once
            # (layer_backward_transient), which the chain of _tape_backward does not follow
            if tape and p.grads_by_linear and not p.scores:
                trail = trails[i] if not p.checkpointed else []
                if p.checkpointed:
                    recomputed, _ = _tape_forward(ev, keys, tape, p.linear_calls, None, keep_output=False, trail=trail)
                kept = recomputed + layer_keys[i]
                out, made = _tape_backward(ev, keys, trail, p.linear_calls, p.grads_by_linear, hg, p.head_input_grad, kept)
                grads += made
                hg = out
                continue
            if p.checkpointed and tape:
                recomputed, _ = _tape_forward(ev, keys, tape, p.linear_calls, None, keep_output=False)
            elif p.checkpointed:
                recomputed = _layer_forward(ev, keys, saved, busy)
            for call in reversed(busy):  # each weight dequantized again for the input gradient
                call.backward(ev, keys)
            pieces = [next(keys) for _ in bwd_pieces]
            ev += [("alloc", x, n) for x, n in zip(pieces, bwd_pieces)]
            for n in p.layer_grads:
                g = next(keys)
                ev.append(("alloc", g, n))
                grads.append(g)
            out = next(keys)  # the gradient into the layer below
            ev.append(("alloc", out, p.head_input_grad))
            ev += [("free", x) for x in recomputed + layer_keys[i]]
            ev.append(("free", hg))
            ev += [("free", x) for x in pieces]
            hg = out
        ev.append(("free", hg))
        if p.tied_grad and grads:
            e, total = next(keys), next(keys)
            ev += [("alloc", e, p.tied_grad), ("alloc", total, p.tied_grad), ("free", grads[0]), ("free", e)]
            grads[0] = total
        for n in p.root_grads[1:]:
            g = next(keys)
            ev.append(("alloc", g, n))
            grads.append(g)
        ev.append(("free", shared))
        ev.append(("mark", f"step {step} backward"))
        # --- optimizer step
        if not states:
            for per in in_module_order(p.layer_states, p.layers, p.root_states, p.root_leading):
                for n in per:
                    k = next(keys)
                    ev.append(("alloc", k, n))
                    states.append(k)
        temporaries = in_module_order(p.layer_temps, p.layers, p.root_temps, p.root_leading)
        if p.temporaries_together:
            ts = [next(keys) for _ in temporaries]
            ev += [("alloc", x, n) for x, n in zip(ts, temporaries)]
            ev += [("free", x) for x in ts]
        else:
            for n in temporaries:
                a, b = next(keys), next(keys)
                ev += [("alloc", a, n), ("alloc", b, n), ("free", a), ("free", b)]
        ev += [("free", g) for g in grads]
        ev += [("free", x) for x in step_end]
        ev.append(("mark", f"step {step} optimizer step"))
    return ev


# --- the plan, from the job and the walk's quantities ------------------------------------------

def _unquantized_bytes(job) -> int:
    from .dtypes import float_bytes

    w = job.base_weight_dtype
    return float_bytes(w) if w.is_float else float_bytes(job.compute_dtype)


def parameter_tensors(job, arch, stack) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(dense, stored, upcast) of every parameter tensor of one decoder layer, and of the root
    (embedding, final norm, untied head), as loading leaves them (see LoadPlan)."""
    from .dtypes import float_bytes, linear_weight_bytes

    eb = _unquantized_bytes(job)
    up = 4 if job.kbit_upcast and eb != 4 else 0

    def plain(numel: int) -> tuple[int, int, int]:
        return (0, numel * eb, numel * up)

    layer = []
    for lin in arch.projections:
        if job.quantized and stack.bnb_converts(lin):
            dense = lin.copies * lin.d_in * lin.d_out * float_bytes(job.compute_dtype)
            stored = lin.copies * linear_weight_bytes(lin.d_out, lin.d_in, job.base_weight_dtype, job.double_quant)
            layer.append((dense, stored, 0))
        else:
            layer.append(plain(lin.copies * lin.d_in * lin.d_out))
        if lin.bias:
            layer.append(plain(lin.copies * lin.d_out))
    layer += [plain(arch.norm_params)] * arch.norms_per_layer
    root = [plain(arch.vocab * arch.hidden)]
    if arch.learned_positions:
        root.append(plain(arch.max_positions * arch.hidden))
    root.append(plain(arch.norm_params))
    if not arch.tied_embeddings:
        root.append(plain(arch.vocab * arch.hidden))
    return layer, root


def embedding_tensors(arch) -> int:
    """The root parameters before the decoder layers in module order: the token embedding, and
    learned position embeddings beside it."""
    return 2 if arch.learned_positions else 1


def trainable_by_linear(job, arch, targets) -> dict[str, list[int]]:
    """Elements of each trainable tensor of one decoder layer, in parameter order, by the linear
    they belong to: every projection's weight and bias for full fine-tuning, the norms' weights
    under ""; lora_A (r x d_in) and lora_B (d_out x r) of each target (peft LoraLayer), with DoRA's
    magnitude (d_out)."""
    out: dict[str, list[int]] = {}
    if job.method == "full":
        for lin in arch.projections:
            out[lin.name] = [lin.copies * lin.d_in * lin.d_out] + ([lin.copies * lin.d_out] if lin.bias else [])
        out[""] = [arch.norm_params] * arch.norms_per_layer
        return out
    r = job.lora_rank
    for lin in arch.linears:
        if lin.name in targets:
            out[lin.name] = [r * lin.d_in, r * lin.d_out] + ([lin.d_out] if job.dora else [])
    return out


def trainable_tensors(job, arch, targets) -> tuple[list[int], list[int]]:
    """Elements of each trainable tensor of one decoder layer (trainable_by_linear) and of the
    root, in parameter order."""
    from .params import HEAD_MODULE, embedding_module

    layer = [n for per in trainable_by_linear(job, arch, targets).values() for n in per]
    if job.method == "full":
        root = [arch.vocab * arch.hidden, arch.norm_params] + ([] if arch.tied_embeddings else [arch.vocab * arch.hidden])
        return layer, root
    r = job.lora_rank
    root = []
    if embedding_module(arch) in targets:
        root += [r * arch.vocab, r * arch.hidden]
    if HEAD_MODULE in targets:
        root += [r * arch.hidden, r * arch.vocab]
    return layer, root


def linear_calls(job, arch, stack, ctx, largest: int) -> list[LinearCall]:
    """One layer's linear calls in module order (LinearCall), every projection named, with its
    output: the busy ones (4/8-bit bases, LoRA targets) allocate more than the layer saves. `largest` is the walk's dequantized weight
    (inference.dequant_bytes: 0 where the fused kernel runs), which gives the dtype every converted
    weight is dequantized into; a 4/8-bit linear's input and output are in the residual stream's
    dtype (fp32 under peft's kbit upcast), cast to and from the compute dtype around the matmul. A
    pre-quantized checkpoint's kernel (planner/prequantized.py) is the one dequantized figure the
    walk gives."""
    from .activations import lora_out_bytes
    from .dtypes import BNB_4BIT_BLOCK, float_bytes

    t, cb = ctx.tokens, float_bytes(job.compute_dtype)
    if not job.quantized:
        calls = [LinearCall(dequant=largest)] if largest else []
        per, cast = 0, False
    else:
        calls = []
        converted = stack.quantized_linears(arch)
        per = largest // max(d_in * d_out for d_in, d_out, _ in converted) if largest and converted else 0
        cast = ctx.stream_bytes != cb
    nested = job.double_quant and job.base_weight_dtype.is_4bit
    lb = lora_out_bytes(ctx)
    for lin in arch.projections:
        call = LinearCall(name=lin.name, result=lin.copies * t * lin.d_out * ctx.act_bytes)
        if job.quantized and stack.bnb_converts(lin):
            blocks = -(-lin.d_in * lin.d_out // BNB_4BIT_BLOCK) if nested else 0
            call = dataclasses.replace(
                call, cast=t * lin.d_in * cb if cast else 0, dequant=lin.d_in * lin.d_out * per, absmax=4 * blocks,
                out=t * lin.d_out * cb, out_cast=t * lin.d_out * ctx.stream_bytes if cast else 0,
                grad_in=t * lin.d_in * cb)
        if lin.name in ctx.targets:
            result = ctx.stream_bytes if call.out else ctx.act_bytes  # the base output, cast back by bitsandbytes
            wide = max(result, lb)
            call = dataclasses.replace(call, lora_out=t * lin.d_out * lb, lora_sum=t * lin.d_out * wide,
                                       lora_cast=t * lin.d_out * result if wide != result else 0)
        calls.append(call)
    return calls


def loss_sequence(terms, tokens: int, vocab: int) -> tuple[tuple, tuple]:
    """The loss's tensors one by one: the stack's own (LossTerms.forward_tensors), else its totals
    cut into fp32 vocab-wide tensors, the last of the forward's saved for the backward."""
    if terms.forward_tensors:
        return terms.forward_tensors, terms.backward_ops
    piece = tokens * vocab * 4
    fwd = split_like(max(terms.forward - terms.held, 0), [piece])
    fwd_t = tuple((f"f{i}", n, "keep" if i == len(fwd) - 1 else "free") for i, n in enumerate(fwd))
    if terms.held:
        fwd_t += (("held", terms.held, "step"),)
    bwd = split_like(max(terms.backward - (fwd[-1] if fwd else 0), 0), [piece])
    ops = tuple(("alloc", f"b{i}", n) for i, n in enumerate(bwd))
    return fwd_t, ops


def plan_training(job, arch, stack, targets, *, saved0: dict[str, int], saved: dict[str, int], checkpointed: bool,
                  checkpoint_input: int, forward_transient: int, backward_transient: int, scores: int,
                  shared: int, loss, tokens: int, hidden_grad: int, workspaces: list[int],
                  calls: list[LinearCall]) -> TrainingPlan:
    from .params import embedding_module
    from .training import state_tensors, trainable_bytes_per_param

    layer_w, root_w = parameter_tensors(job, arch, stack)
    layer_t, root_t = trainable_tensors(job, arch, targets)
    pb = trainable_bytes_per_param(job)
    adapters = job.uses_lora
    adamw = job.optimizer == "adamw"  # torch AdamW's sqrt(exp_avg_sq) per tensor; SGD and bnb update in place
    fwd, bwd = loss_sequence(loss, tokens, arch.vocab)
    # the trainable root tensors before the layers: full fine-tuning's embedding, an embedding's LoRA
    leading = 1 if job.method == "full" else (2 if embedding_module(arch) in targets else 0)
    # the gradient the loss backward makes first goes first: full fine-tuning's head (tied: the
    # embedding, which the head is), then the final norm's and an untied embedding's
    root_grads = [n * pb for n in root_t]
    if job.method == "full" and not arch.tied_embeddings:
        root_grads = root_grads[-1:] + root_grads[:-1]
    return TrainingPlan(
        load=LoadPlan(layer=layer_w, root=root_w, layers=arch.layers,
                      empty_cache_after_upcast=stack.kbit_prepare_empties_cache,
                      adapters_per_layer=[n * pb for n in layer_t] if adapters else [],
                      adapters_root=[n * pb for n in root_t] if adapters else [],
                      root_leading=embedding_tensors(arch), adapters_leading=leading if adapters else 0),
        layers=arch.layers,
        first_saved=list(saved0.values()),
        saved=list(saved.values()),
        first_tape=layer_tape(saved0),
        tape=layer_tape(saved),
        checkpointed=checkpointed,
        checkpoint_input=checkpoint_input,
        forward_transient=forward_transient,
        backward_transient=backward_transient,
        scores=scores,
        linear_calls=calls,
        shared=shared,
        loss_forward=fwd,
        loss_backward=bwd,
        head_input_grad=hidden_grad,
        layer_grads=[n * pb for n in layer_t],
        root_grads=root_grads,
        layer_states=[state_tensors(job, n) for n in layer_t],
        root_states=[state_tensors(job, n) for n in root_t],
        layer_temps=[n * pb for n in layer_t] if adamw else [],
        root_temps=[n * pb for n in root_t] if adamw else [],
        temporaries_together=job.foreach,
        root_leading=leading,
        tied_grad=root_grads[0] if job.method == "full" and arch.tied_embeddings and root_grads else 0,
        grads_by_linear={k: [n * pb for n in per] for k, per in trainable_by_linear(job, arch, targets).items()},
        workspaces=workspaces,
    )


# --- inference (generate()) ---------------------------------------------------------------------

# decode steps the replay walks at most: a longer generation is walked in strides of several
# positions per replayed step (the cache grows by the stride's positions each time), so the
# replay stays a few thousand events while every 2 MiB segment boundary the cache crosses is crossed
DECODE_STEPS_REPLAYED = 64


@dataclass
class InferencePlan:
    load: LoadPlan
    layers: int
    prompt_cache: list[int]  # each layer's K + V after the prefill
    final_cache: list[int]  # each layer's K + V after the last new token
    grows: bool  # DynamicCache: every decode step concatenates (torch.cat), a new tensor per step
    prefill_pieces: list[int]  # one layer's no-grad intermediates while its prefill runs
    head: list[int]  # the prefill's head: final norm output, logits (and their fp32 copy)
    decode_pieces: list[int]  # one layer's intermediates in one decode step
    logits: int  # one decode step's logits and their fp32 copy
    new_tokens: int
    workspaces: list[int] = field(default_factory=list)


def inference_events(p: InferencePlan, steps: int = DECODE_STEPS_REPLAYED) -> list[Event]:
    keys, ev = _start(p.load)
    ev += [("alloc", next(keys), n) for n in p.workspaces]
    cache: list[tuple[int, int]] = []
    for i in range(p.layers):
        ts = [next(keys) for _ in p.prefill_pieces]
        ev += [("alloc", x, n) for x, n in zip(ts, p.prefill_pieces)]
        k, v = next(keys), next(keys)  # the projections' outputs become the cache (DynamicLayer.update)
        half = p.prompt_cache[i] // 2
        ev += [("alloc", k, half), ("alloc", v, p.prompt_cache[i] - half)]
        ev += [("free", x) for x in ts]
        cache.append((k, v))
    hs = [next(keys) for _ in p.head]
    ev += [("alloc", x, n) for x, n in zip(hs, p.head)]
    ev += [("free", x) for x in hs]
    ev.append(("mark", "prefill"))
    if not p.new_tokens:
        return ev
    replayed = min(p.new_tokens, steps)
    for j in range(1, replayed + 1):
        for i in range(p.layers):
            ts = [next(keys) for _ in p.decode_pieces]
            ev += [("alloc", x, n) for x, n in zip(ts, p.decode_pieces)]
            if p.grows:
                size = p.prompt_cache[i] + (p.final_cache[i] - p.prompt_cache[i]) * j // replayed
                half = size // 2
                k, v = next(keys), next(keys)
                # torch.cat([past, new]) makes the longer tensor while the shorter is alive
                ev += [("alloc", k, half), ("free", cache[i][0]), ("alloc", v, size - half), ("free", cache[i][1])]
                cache[i] = (k, v)
            ev += [("free", x) for x in ts]
        lg = next(keys)
        ev += [("alloc", lg, p.logits), ("free", lg)]
    ev.append(("mark", "decode"))
    return ev


def plan_inference(job, arch, stack, *, prompt_cache: list[int], final_cache: list[int], prefill: int,
                   head: int, logits: int, workspaces: list[int], weights: int | None = None) -> InferencePlan:
    """`weights`: what this GPU holds in all when it is not the whole model (accelerate's layer split):
    its layers' tensors as usual, the rest as one tensor."""
    from .dtypes import float_bytes

    layer_w, root_w = parameter_tensors(job, arch, stack)
    if weights is not None:
        root_w = [(0, max(weights - arch.layers * sum(t[1] for t in layer_w), 0), 0)]
    ab = float_bytes(job.compute_dtype)
    t = job.micro_batch * job.seq_len
    shapes = [t * arch.hidden * ab, t * arch.intermediate * ab]
    stream = job.micro_batch * arch.hidden * ab
    return InferencePlan(
        load=LoadPlan(layer=layer_w, root=root_w, layers=arch.layers,
                      root_leading=embedding_tensors(arch) if weights is None else 0),
        layers=arch.layers,
        prompt_cache=prompt_cache,
        final_cache=final_cache,
        # a static cache is allocated whole at its first update; a quantized one keeps a short
        # residual and requantizes it in place of growing
        grows=job.cache_implementation != "static" and job.kv_cache_dtype is None,
        prefill_pieces=split_like(prefill, shapes),
        head=split_like(head, [t * arch.hidden * ab]),
        decode_pieces=[stream, job.micro_batch * arch.intermediate * ab],
        logits=logits,
        new_tokens=job.new_tokens,
        workspaces=workspaces,
    )


# decoder layers the replay walks at most. Every shipped model has fewer (Llama-3.1-405B: 126); a
# config with more (any number up to ConfigReader's 10,000 is read) replays this many and scales
# the allocator's slack by layers / MAX_REPLAYED_LAYERS, so one estimate stays well under a second
MAX_REPLAYED_LAYERS = 128


def bounded(plan) -> tuple[object, float]:
    """`plan` cut to MAX_REPLAYED_LAYERS decoder layers, and the factor its slack is scaled by."""
    if plan.layers <= MAX_REPLAYED_LAYERS:
        return plan, 1.0
    n = MAX_REPLAYED_LAYERS
    cut = {"layers": n, "load": dataclasses.replace(plan.load, layers=n)}
    if isinstance(plan, InferencePlan):
        cut |= {"prompt_cache": plan.prompt_cache[:n], "final_cache": plan.final_cache[:n]}
    return dataclasses.replace(plan, **cut), plan.layers / n


def events(plan) -> list[Event]:
    """The allocation sequence of a training or an inference plan."""
    return training_events(plan) if isinstance(plan, TrainingPlan) else inference_events(plan)


# replays remembered by (plan, settings): fit, --explain and the tests estimate one job again and again
_REPLAYS: dict[tuple[str, str], tuple[AllocatorStats, int]] = {}
_REPLAYS_KEPT = 256


def replayed(plan, settings: AllocatorSettings) -> tuple[AllocatorStats, int]:
    """The allocator's replay of `plan`, and its event count."""
    key = (repr(plan), settings.model_dump_json())
    hit = _REPLAYS.get(key)
    if hit is None:
        ev = events(plan)
        hit = (replay(ev, settings), len(ev))
        if len(_REPLAYS) >= _REPLAYS_KEPT:
            _REPLAYS.clear()
        _REPLAYS[key] = hit
    return hit
