"""Live-storage accounting under a TorchDispatchMode: every op's outputs are registered by
storage, rounded like the CUDA caching allocator (512 B), and dropped when the storage dies."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROUND = 512


def rounded(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live tensor storage and remembers the peak and its phase."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0
        self.peak_phase = ""
        self.phase = "setup"
        self.phase_peak = 0

    def start_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peak = self.current

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        n = rounded(st.nbytes())

        def release(_ref, key=key, n=n) -> None:
            if self._live.pop(key, None) is not None:
                self.current -= n

        self._live[key] = (weakref.ref(st, release), n)
        self.current += n

    def bytes_of(self, tensors) -> int:
        """Bytes of the distinct live storages behind `tensors`."""
        seen = {}
        for t in tensors:
            st = t.untyped_storage()
            if id(st) in self._live:
                seen[id(st)] = self._live[id(st)][1]
        return sum(seen.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self.current > self.phase_peak:
            self.phase_peak = self.current
            if self.current > self.peak:
                self.peak = self.current
                self.peak_phase = self.phase
        return out
