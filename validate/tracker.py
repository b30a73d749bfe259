"""Live-storage accounting under a TorchDispatchMode: every op's outputs are registered by
storage, rounded like the CUDA caching allocator (512 B), and dropped when the storage dies.

Two things no dispatch mode sees are followed as well, for sharded training (validate/sharded.py):
- `UntypedStorage.resize_`: FSDP frees an all-gathered unit by resizing its storage to 0 and
  re-allocates it by resizing it back (FSDP2 `_fsdp_param.free_storage`/`alloc_storage`, FSDP1
  `distributed/utils.py` `_free_storage`/`_alloc_storage`, through `TypedStorage._resize_`). While the
  tracker is active every resize moves the count by the storage's new size minus its current size,
  and a storage dies with the size it has then.
  With `record`, a resize to 0 is a free and a resize back an allocation (see below).
- DTensor parameters, gradients and optimizer states (FSDP2): a DTensor is a wrapper with no storage
  of its own; what the rank holds is its `._local_tensor`, which is what is counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROUND = 512

# `record=True` keeps the ordered allocation sequence the CUDA caching allocator would see, in the
# event form planner/allocator.py `replay` takes:
#   ("alloc", key, nbytes, 0)  a storage first tracked, with its real nbytes (the allocator rounds)
#   ("free", key)              it died (the weakref callback), or was resized to 0
#   ("mark", phase)            start_phase
# Keys come from a counter, because id() of a dead storage is reused by the next one. A storage of 0
# bytes gets no event: torch's CUDA allocator hands out a null pointer for size 0 and allocates no
# block (c10/cuda/CUDACachingAllocator.cpp NativeCachingAllocator::allocate, `if (size != 0)`;
# recalled, the wheel ships no .cpp: ../shared/ALLOCATOR.md). A resize from one non-zero size to
# another is an allocation of the new size, then the free of the old: resize_ copies into a new
# block before it drops the old one (aten/src/ATen/native/cuda/Resize.cpp resize_bytes_cuda; recalled).


def rounded(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this rank holds: a DTensor's local shard, else `t` itself."""
    while hasattr(t, "_local_tensor"):
        t = t._local_tensor
    return t


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live tensor storage and remembers the peak and its phase."""

    def __init__(self, detail: bool = False, record: bool = False) -> None:
        super().__init__()
        # id(storage) -> [weakref to it, bytes counted now, dtype, op that made it]
        self._live: dict[int, list] = {}
        self.current = 0
        self.peak = 0
        self.peak_phase = ""
        self.phase = "setup"
        self.phase_peak = 0
        # detail: the live storages at the phase's peak, as (dtype, bytes, op) -> count
        self.detail = detail
        self.phase_peak_live: dict[tuple[str, int, str], int] = {}
        self._saved_resize = None
        self.events: list[tuple] | None = [] if record else None
        # id(storage) -> the event key of its allocation now (absent while it holds no bytes)
        self._event_key: dict[int, int] = {}
        self._next_key = 0

    def _record_alloc(self, key: int, nbytes: int) -> None:
        if self.events is None or nbytes == 0:
            return
        self._event_key[key] = k = self._next_key
        self._next_key += 1
        self.events.append(("alloc", k, nbytes, 0))

    def _record_free(self, key: int) -> None:
        if self.events is None:
            return
        k = self._event_key.pop(key, None)
        if k is not None:
            self.events.append(("free", k))

    def start_phase(self, name: str) -> None:
        if self.events is not None:
            self.events.append(("mark", name))
        self.phase = name
        self.phase_peak = self.current
        if self.detail:
            self.phase_peak_live = self.live_groups()

    def track(self, t: torch.Tensor, op: str = "") -> None:
        t = local(t)
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        nbytes = st.nbytes()
        n = rounded(nbytes)

        def release(_ref, key=key) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]
                self._record_free(key)

        self._live[key] = [weakref.ref(st, release), n, str(t.dtype).removeprefix("torch."), op]
        self.current += n
        self._record_alloc(key, nbytes)

    def bytes_of(self, tensors) -> int:
        """Bytes of the distinct live storages behind `tensors` (a DTensor's: its local shard's)."""
        seen = {}
        for t in tensors:
            st = local(t).untyped_storage()
            if id(st) in self._live:
                seen[id(st)] = self._live[id(st)][1]
        return sum(seen.values())

    def live_groups(self) -> dict[tuple[str, int, str], int]:
        """The storages live now with bytes, grouped by (dtype, bytes, op that allocated them)."""
        groups: dict[tuple[str, int, str], int] = {}
        for _ref, n, dtype, op in self._live.values():
            if n:
                groups[(dtype, n, op)] = groups.get((dtype, n, op), 0) + 1
        return groups

    def _resized(self, st) -> None:
        key = id(st)
        nbytes = st.nbytes()
        n = rounded(nbytes)
        entry = self._live.get(key)
        if entry is None:
            if n == 0:
                return

            def release(_ref, key=key) -> None:
                gone = self._live.pop(key, None)
                if gone is not None:
                    self.current -= gone[1]
                    self._record_free(key)

            self._live[key] = entry = [weakref.ref(st, release), 0, "?", "resize_"]
        if self.events is not None and n != entry[1]:
            old = self._event_key.pop(key, None)  # the new block first, then the old one goes
            self._record_alloc(key, nbytes)
            if old is not None:
                self.events.append(("free", old))
        self.current += n - entry[1]
        entry[1] = n
        self._new_high()

    def _new_high(self) -> None:
        if self.current > self.phase_peak:
            self.phase_peak = self.current
            if self.detail:
                self.phase_peak_live = self.live_groups()
            if self.current > self.peak:
                self.peak = self.current
                self.peak_phase = self.phase

    def __enter__(self):
        saved = self._saved_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = saved(storage, size)
            tracker._resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._saved_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.__name__ if self.detail else ""
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, op)
        self._new_high()
        return out
