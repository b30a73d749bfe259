"""A model of PyTorch's CUDA caching allocator: what `torch.cuda.memory_reserved()` holds for a
sequence of allocations and frees.

Rules and constants (docs/allocator.md says which committed rows confirm each):
- c10/core/AllocatorConfig.h (shipped in the torch 2.13 wheel, torch/include): kMinBlockSize 512 B,
  kSmallSize 1 MiB, kSmallBuffer 2 MiB, kLargeBuffer 20 MiB, kMinLargeAlloc 10 MiB, kRoundLarge 2 MiB.
- c10/cuda/CUDACachingAllocator.cpp (not in the wheel; as set out in ../shared/ALLOCATOR.md):
  `round_size`, `get_allocation_size`, `get_free_block` (best fit per pool and stream, the
  max_split_size rules), `should_split`, `free_block`/`try_merge_blocks` (neighbours inside one
  segment only), `release_cached_blocks` (the free-and-retry path before an OOM), and expandable
  segments (one growing range per pool and stream, mapped a page at a time).

Pure: events in, statistics out. Bytes are integers.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Literal

from pydantic import BaseModel

KiB, MiB = 1024, 1024**2
MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to a multiple of it
SMALL_SIZE = 1 * MiB  # kSmallSize: requests up to it are served from the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: one small-pool segment
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: the segment for a large request under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests get a segment of their size rounded to it
NO_LIMIT = 2**63 - 1


class AllocatorSettings(BaseModel):
    """What PYTORCH_CUDA_ALLOC_CONF can set that changes reserved memory."""

    expandable_segments: bool = False
    max_split_size: int = NO_LIMIT  # max_split_size_mb, in bytes; unlimited by default
    # bytes the allocator may hold (the card less the CUDA context and other processes): past it
    # cudaMalloc fails, cached segments are released and the request retried, then it is an OOM
    capacity: int = NO_LIMIT

    def env(self) -> str:
        """The PYTORCH_CUDA_ALLOC_CONF value for these settings ('' for the defaults)."""
        parts = []
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        if self.max_split_size != NO_LIMIT:
            parts.append(f"max_split_size_mb:{self.max_split_size // MiB}")
        return ",".join(parts)


class AllocatorStats(BaseModel):
    """What the replay ends with, in the names of torch.cuda.memory_stats() where there is one."""

    peak_allocated_bytes: int  # allocated_bytes.all.peak: blocks handed out (their whole size)
    peak_reserved_bytes: int  # reserved_bytes.all.peak: every segment cudaMalloc'd
    reserved_bytes: int  # reserved at the end
    segments: int  # segment.all.current at the end
    peak_segments: int
    small_pool_segments: int
    large_pool_segments: int
    # free bytes inside segments that also hold live blocks, at the reserved peak
    # (inactive_split_bytes): what fragmentation costs there
    inactive_split_bytes_at_peak: int
    num_alloc_retries: int  # cudaMalloc failed, cached segments were released and it was retried
    num_ooms: int
    # reserved at each mark the sequence carries ('step 1 forward', ...), in order
    marks: dict[str, int] = {}


def round_size(size: int) -> int:
    """`round_size`: at least 512 B, a multiple of 512 B."""
    if size < MIN_BLOCK:
        return MIN_BLOCK
    return -(-size // MIN_BLOCK) * MIN_BLOCK


def is_small(size: int) -> bool:
    return size <= SMALL_SIZE


def allocation_size(size: int) -> int:
    """`get_allocation_size`: the segment cudaMalloc'd for a rounded request nothing cached can serve."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    segment: "_Segment"
    offset: int
    size: int
    free: bool = True
    prev: "_Block | None" = None
    next: "_Block | None" = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment.id, self.offset)


@dataclass(eq=False)
class _Segment:
    id: int
    size: int
    small: bool
    stream: int
    live: int = 0  # blocks in use
    first: _Block | None = None


@dataclass
class _Pool:
    """The free blocks of one (pool, stream), ordered by (size, segment, offset): best fit."""

    keys: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)

    def add(self, b: _Block) -> None:
        k = b.key()
        bisect.insort(self.keys, k)
        self.blocks[k] = b

    def remove(self, b: _Block) -> None:
        k = b.key()
        i = bisect.bisect_left(self.keys, k)
        del self.keys[i]
        del self.blocks[k]

    def best_fit(self, size: int) -> _Block | None:
        i = bisect.bisect_left(self.keys, (size, -1, -1))
        return self.blocks[self.keys[i]] if i < len(self.keys) else None


class CachingAllocator:
    """The allocator's state: segments, their blocks, and the free blocks of each pool and stream."""

    def __init__(self, settings: AllocatorSettings | None = None) -> None:
        self.s = settings or AllocatorSettings()
        self.pools: dict[tuple[bool, int], _Pool] = {}
        self.segments: dict[int, _Segment] = {}
        self.live: dict[object, _Block] = {}
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.peak_segments = 0
        self.inactive_at_peak = 0
        self.retries = self.ooms = 0
        self.marks: dict[str, int] = {}
        self._next_segment = 0
        # expandable segments: the one growing segment of each (pool, stream)
        self._expandable: dict[tuple[bool, int], _Segment] = {}

    def _pool(self, small: bool, stream: int) -> _Pool:
        return self.pools.setdefault((small, stream), _Pool())

    # --- malloc ------------------------------------------------------------------------------
    def malloc(self, key: object, nbytes: int, stream: int = 0) -> bool:
        """Allocate `nbytes` for `key`; False (and an OOM counted) when it cannot be had."""
        size = round_size(nbytes)
        small = is_small(size)
        pool = self._pool(small, stream)
        block = self._free_block(pool, size)
        if block is None:
            block = self._new_block(small, stream, size)
            if block is None:
                self.ooms += 1
                return False
            pool = self._pool(small, stream)
        else:
            pool.remove(block)
        if self._should_split(block, size):
            rest = _Block(block.segment, block.offset + size, block.size - size, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            pool.add(rest)
        block.free = False
        block.segment.live += 1
        self.live[key] = block
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return True

    def _free_block(self, pool: _Pool, size: int) -> _Block | None:
        """`get_free_block`: the smallest cached block that fits, but an oversize block
        (>= max_split_size) serves only a request that wastes under kLargeBuffer of it."""
        b = pool.best_fit(size)
        if b is None:
            return None
        limit = self.s.max_split_size
        if size < limit and b.size >= limit:
            return None
        if size >= limit and b.size >= size + LARGE_BUFFER:
            return None
        return b

    def _should_split(self, b: _Block, size: int) -> bool:
        remaining = b.size - size
        if b.segment.small or self.s.expandable_segments:
            return remaining >= MIN_BLOCK
        return size < self.s.max_split_size and remaining > SMALL_SIZE

    def _new_block(self, small: bool, stream: int, size: int) -> _Block | None:
        if self.s.expandable_segments:
            return self._grow(small, stream, size)
        seg_size = allocation_size(size)
        if not self._cuda_malloc(seg_size):
            # free-and-retry: release every cached whole segment, then cudaMalloc again
            self.retries += 1
            self.release_cached()
            if not self._cuda_malloc(seg_size):
                return None
        seg = _Segment(self._next_segment, seg_size, small, stream)
        self._next_segment += 1
        seg.first = _Block(seg, 0, seg_size)
        self.segments[seg.id] = seg
        self._track_segments()
        return seg.first

    def _grow(self, small: bool, stream: int, size: int) -> _Block | None:
        """Expandable segments: map pages (2 MiB small, 20 MiB large) at the end of the pool's one
        range, as many as the request needs beyond a free block already at the end."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        seg = self._expandable.get((small, stream))
        pool = self._pool(small, stream)
        if seg is None:
            seg = _Segment(self._next_segment, 0, small, stream)
            self._next_segment += 1
            self.segments[seg.id] = seg
            self._expandable[(small, stream)] = seg
        last = seg.first
        while last is not None and last.next is not None:
            last = last.next
        tail = last.size if last is not None and last.free else 0
        need = -(-(size - tail) // page) * page
        if not self._cuda_malloc(need):
            self.retries += 1
            self.release_cached()
            if not self._cuda_malloc(need):
                return None
            last = seg.first
            while last is not None and last.next is not None:
                last = last.next
            tail = last.size if last is not None and last.free else 0
        if tail:
            pool.remove(last)
            last.size += need
        else:
            grown = _Block(seg, seg.size, need, True, last, None)
            if last is not None:
                last.next = grown
            else:
                seg.first = grown
            last = grown
        seg.size += need
        self._track_segments()
        return last

    def _cuda_malloc(self, n: int) -> bool:
        if self.reserved + n > self.s.capacity:
            return False
        self.reserved += n
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
            self.inactive_at_peak = self._inactive_split()
        return True

    def _track_segments(self) -> None:
        self.peak_segments = max(self.peak_segments, len(self.segments))

    def _inactive_split(self) -> int:
        return sum(b.size for pool in self.pools.values() for b in pool.blocks.values() if b.segment.live)

    # --- free ---------------------------------------------------------------------------------
    def free(self, key: object) -> None:
        b = self.live.pop(key)
        self.allocated -= b.size
        b.free = True
        b.segment.live -= 1
        pool = self._pool(b.segment.small, b.segment.stream)
        for nb in (b.prev, b.next):  # `try_merge_blocks`: only neighbours in the same segment
            if nb is not None and nb.free:
                pool.remove(nb)
                if nb is b.prev:
                    nb.size += b.size
                    nb.next = b.next
                    if b.next is not None:
                        b.next.prev = nb
                    b = nb
                else:
                    b.size += nb.size
                    b.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = b
        pool.add(b)

    def release_cached(self) -> None:
        """`release_cached_blocks` (empty_cache, and the retry before an OOM): every segment with no
        live block goes back to the driver; an expandable range unmaps its free tail."""
        for seg in list(self.segments.values()):
            if self.s.expandable_segments:
                last = seg.first
                while last is not None and last.next is not None:
                    last = last.next
                if last is not None and last.free:
                    self._pool(seg.small, seg.stream).remove(last)
                    seg.size -= last.size
                    self.reserved -= last.size
                    if last.prev is not None:
                        last.prev.next = None
                    else:
                        seg.first = None
                continue
            if seg.live == 0:
                self._pool(seg.small, seg.stream).remove(seg.first)
                self.reserved -= seg.size
                del self.segments[seg.id]

    def reset_peak(self) -> None:
        """torch.cuda.reset_peak_memory_stats(): the peaks start again from what is held now."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
        self.peak_segments = len(self.segments)
        self.inactive_at_peak = self._inactive_split()

    def mark(self, name: str) -> None:
        self.marks[name] = self.reserved

    def stats(self) -> AllocatorStats:
        segs = [s for s in self.segments.values() if s.size]
        return AllocatorStats(
            peak_allocated_bytes=self.peak_allocated,
            peak_reserved_bytes=self.peak_reserved,
            reserved_bytes=self.reserved,
            segments=len(segs),
            peak_segments=self.peak_segments,
            small_pool_segments=sum(1 for s in segs if s.small),
            large_pool_segments=sum(1 for s in segs if not s.small),
            inactive_split_bytes_at_peak=self.inactive_at_peak,
            num_alloc_retries=self.retries,
            num_ooms=self.ooms,
            marks=dict(self.marks),
        )


# One event of an allocation sequence:
#   ("alloc", key, bytes, stream)  a tensor's storage is allocated on `stream`
#   ("free", key)                  it is freed (its last reference dropped)
#   ("mark", name)                 a point to read reserved at (a phase's end)
#   ("empty_cache",)               torch.cuda.empty_cache()
#   ("reset_peak",)                torch.cuda.reset_peak_memory_stats()
Event = tuple


def replay(events: Iterable[Event], settings: AllocatorSettings | None = None) -> AllocatorStats:
    """Run `events` through a fresh allocator. A free of a key never allocated is ignored (a trace
    may free what was allocated before it started)."""
    a = CachingAllocator(settings)
    for ev in events:
        kind = ev[0]
        if kind == "alloc":
            a.malloc(ev[1], ev[2], ev[3] if len(ev) > 3 else 0)
        elif kind == "free":
            if ev[1] in a.live:
                a.free(ev[1])
        elif kind == "mark":
            a.mark(ev[1])
        elif kind == "empty_cache":
            a.release_cached()
        elif kind == "reset_peak":
            a.reset_peak()
        else:
            raise ValueError(f"unknown allocator event {ev!r}")
    return a.stats()


Mode = Literal["default", "expandable"]
