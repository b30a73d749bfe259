"""A model of PyTorch's CUDA caching allocator: what `torch.cuda.memory_reserved()` holds for a
sequence of allocations and frees.

Rules and constants (docs/allocator.md "Rules" gives each one's source and the test that pins it):
- c10/core/AllocatorConfig.h (shipped in the torch 2.13 wheel, torch/include): kSmallBuffer 2 MiB
  (line 17), kMinBlockSize 512 B (19), kSmallSize 1 MiB (21), kMinLargeAlloc 10 MiB (23),
  kRoundLarge 2 MiB (25), large_segment_size_ 20 MiB (340, the old kLargeBuffer), max_split_size_
  unlimited (342), max_non_split_rounding_size_ 20 MiB by default (comment at 184-186).
- c10/cuda/CUDACachingAllocator.cpp (not in the wheel; recalled, as in ../shared/ALLOCATOR.md):
  `round_size`, `get_allocation_size`, `get_free_block` (best fit per pool and stream, the
  max_split_size rules), `should_split`, `free_block`/`try_merge_blocks` (neighbours inside one
  segment only), `release_available_cached_blocks` and `release_cached_blocks` (the free-and-retry
  path before an OOM), and expandable segments (`find_expandable_block`, `map_block`,
  `unmap_block`: one growing range per pool and stream, mapped and unmapped a page at a time).

Pure: events in, statistics out. Bytes are integers.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

from pydantic import BaseModel, field_validator

KiB, MiB = 1024, 1024**2
MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to a multiple of it
SMALL_SIZE = 1 * MiB  # kSmallSize: requests up to it are served from the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: one small-pool segment, and a small expandable page
# large_segment_size_ (kLargeBuffer before torch 2.8): the segment for a large request under
# MIN_LARGE_ALLOC, and a large expandable page
LARGE_BUFFER = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests get a segment of their size rounded to it
# max_non_split_rounding_size_: an oversize request takes a cached oversize block only if it
# wastes less than this (the default; max_non_split_rounding_mb sets it)
MAX_NON_SPLIT_ROUNDING = 20 * MiB
NO_LIMIT = 2**63 - 1
# The unmapped address space past an expandable range's mapped end: torch reserves 1 1/8 of the
# card (`find_expandable_block`), which is more than any hole inside the range; only its being
# larger matters (the best-fit walk in `get_free_block` compares sizes with it).
_VIRTUAL = 2**62


class AllocatorSettings(BaseModel):
    """What PYTORCH_CUDA_ALLOC_CONF can set that changes reserved memory."""

    expandable_segments: bool = False
    max_split_size: int = NO_LIMIT  # max_split_size_mb, in bytes; unlimited by default
    # bytes the allocator may hold (the card less the CUDA context and other processes): past it
    # cudaMalloc fails, cached segments are released and the request retried, then it is an OOM
    capacity: int = NO_LIMIT

    @field_validator("max_split_size")
    @classmethod
    def _split_above_large_buffer(cls, v: int) -> int:
        # parseMaxSplitSize refuses max_split_size_mb <= kLargeBuffer / 1 MiB (recalled): a
        # 20 MiB segment must stay splittable
        if v != NO_LIMIT and v <= LARGE_BUFFER:
            raise ValueError(f"max_split_size {v} B: must be more than {LARGE_BUFFER // MiB} MiB")
        return v

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
    peak_reserved_bytes: int  # reserved_bytes.all.peak: every segment cudaMalloc'd / page mapped
    reserved_bytes: int  # reserved at the end
    segments: int  # segment.all.current at the end
    peak_segments: int
    small_pool_segments: int
    large_pool_segments: int
    # free bytes inside segments that also hold live blocks, at the reserved peak
    # (inactive_split_bytes): what fragmentation costs there
    inactive_split_bytes_at_peak: int
    # the least the allocator must be able to reserve to run the sequence: at every cudaMalloc, the
    # segments that hold a live block plus the new one. A card with less memory than the reserved
    # peak still runs it, since before an OOM the allocator releases every cached segment with no
    # live block and retries (`release_cached_blocks`); one with less than this does not
    required_bytes: int = 0
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


def _round_up(n: int, page: int) -> int:
    return -(-n // page) * page


@dataclass(eq=False, slots=True)
class _Block:
    """A piece of a segment: free (cached, in its pool), allocated, or (expandable segments
    only) an unmapped hole, which holds address space but no memory."""

    segment: "_Segment" = field(repr=False)
    offset: int
    size: int
    free: bool = True
    prev: "_Block | None" = field(default=None, repr=False)
    next: "_Block | None" = field(default=None, repr=False)
    mapped: bool = True

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment.id, self.offset)


@dataclass(eq=False, slots=True)
class _Segment:
    id: int
    size: int  # its extent: a cudaMalloc'd segment's size; an expandable range's up to its last mapped page
    small: bool
    stream: int
    live: int = 0  # blocks in use
    first: _Block | None = field(default=None, repr=False)
    expandable: bool = False
    mapped: int = 0  # bytes of memory behind it (== size unless expandable)
    last: _Block | None = field(default=None, repr=False)  # its last block: where a range grows
    holes: int = 0  # unmapped blocks inside an expandable range
    free_bytes: int = 0  # its blocks cached in the pool (kept by _Pool.add/remove)
    pool: "_Pool | None" = field(default=None, repr=False)  # where its free blocks are cached

    def page(self) -> int:
        return SMALL_BUFFER if self.small else LARGE_BUFFER


@dataclass
class _Totals:
    """Sums over the segments that hold a live block, kept as blocks move, so that reading them at
    every new peak and every cudaMalloc costs nothing however many segments there are."""

    inactive: int = 0  # their cached free bytes (inactive_split_bytes)
    held: int = 0  # their mapped bytes: what a release cannot give back


@dataclass
class _Pool:
    """The free blocks of one (pool, stream), ordered by (size, segment, offset): best fit."""

    totals: _Totals
    keys: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)

    def add(self, b: _Block) -> None:
        k = b.key()
        bisect.insort(self.keys, k)
        self.blocks[k] = b
        b.segment.free_bytes += b.size
        if b.segment.live:
            self.totals.inactive += b.size

    def remove(self, b: _Block) -> None:
        k = b.key()
        i = bisect.bisect_left(self.keys, k)
        del self.keys[i]
        del self.blocks[k]
        b.segment.free_bytes -= b.size
        if b.segment.live:
            self.totals.inactive -= b.size


def _link_after(b: _Block, new: _Block) -> None:
    new.prev, new.next = b, b.next
    if b.next is not None:
        b.next.prev = new
    else:
        b.segment.last = new
    b.next = new


def _absorb(b: _Block, nb: _Block) -> _Block:
    """Merge neighbour `nb` into `b` (either side); the block that remains."""
    if nb is b.prev:
        nb.size += b.size
        _unlink(b)
        return nb
    b.size += nb.size
    _unlink(nb)
    return b


def _unlink(b: _Block) -> None:
    """Drop `b` from its segment's list (its bytes were merged into a neighbour)."""
    if b.prev is not None:
        b.prev.next = b.next
    else:
        b.segment.first = b.next
    if b.next is not None:
        b.next.prev = b.prev
    else:
        b.segment.last = b.prev


class CachingAllocator:
    """The allocator's state: segments, their blocks, and the free blocks of each pool and stream."""

    def __init__(self, settings: AllocatorSettings | None = None) -> None:
        self.s = settings or AllocatorSettings()
        # read on every malloc: kept as plain attributes (the pydantic model is slower to read)
        self._limit = self.s.max_split_size
        self._grows = self.s.expandable_segments
        self._totals = _Totals()
        self.pools: dict[tuple[bool, int], _Pool] = {}
        self.segments: dict[int, _Segment] = {}
        self.live: dict[object, _Block | None] = {}
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.peak_segments = 0
        self.inactive_at_peak = 0
        self.required = 0
        self._at_peak = False  # reserved reached a new peak in the malloc under way
        self.retries = self.ooms = 0
        self.marks: dict[str, int] = {}
        self._next_segment = 0
        # expandable segments: the one growing range of each (pool, stream)
        self._expandable: dict[tuple[bool, int], _Segment] = {}

    def _pool(self, small: bool, stream: int) -> _Pool:
        pool = self.pools.get((small, stream))
        if pool is None:
            pool = self.pools[(small, stream)] = _Pool(self._totals)
        return pool

    # --- malloc ------------------------------------------------------------------------------
    def malloc(self, key: object, nbytes: int, stream: int = 0) -> bool:
        """Allocate `nbytes` for `key`; False (and an OOM counted) when it cannot be had."""
        if nbytes <= 0:
            # CUDACachingAllocator's `allocate` calls malloc only `if (size != 0)`: an empty
            # tensor holds no block
            self.live[key] = None
            return True
        size = round_size(nbytes)
        small = is_small(size)
        pool = self.pools.get((small, stream)) or self._pool(small, stream)
        block = self._free_block(pool, size)
        if block is None:
            block = self._alloc_block(small, stream, size)
            if block is None:
                self.ooms += 1
                self._at_peak = False
                return False
        else:
            pool.remove(block)
        remaining = block.size - size
        # `should_split`
        if (remaining >= MIN_BLOCK if small or self._grows
                else size < self._limit and remaining > SMALL_SIZE):
            rest = _Block(block.segment, block.offset + size, remaining)
            _link_after(block, rest)
            block.size = size
            pool.add(rest)
        block.free = False
        seg = block.segment
        seg.live += 1
        if seg.live == 1:  # the segment joins those holding a live block
            self._totals.inactive += seg.free_bytes
            self._totals.held += seg.mapped
        self.live[key] = block
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self._at_peak:
            # read once the request holds its block and the rest of the new segment is cached:
            # that state is what the reserved peak looks like
            self._at_peak = False
            self.inactive_at_peak = self._inactive_split()
        return True

    def _free_block(self, pool: _Pool, size: int) -> _Block | None:
        """`get_free_block`: the smallest cached block that fits, but an oversize block
        (>= max_split_size) serves only a request that wastes under MAX_NON_SPLIT_ROUNDING of it."""
        keys = pool.keys
        i = bisect.bisect_left(keys, (size, -1, -1))
        if i == len(keys):
            return None
        b = pool.blocks[keys[i]]
        if b.segment.expandable:
            # best fit counts a block bordering unmapped space as the size it can grow to, and
            # walks on to a larger block that can grow less: the range's growing end is kept
            # for requests nothing else serves
            while i + 1 < len(keys):
                nb = pool.blocks[keys[i + 1]]
                if self._expandable_size(nb) >= self._expandable_size(b):
                    break
                i, b = i + 1, nb
        limit = self._limit
        if size < limit and b.size >= limit:
            return None
        if size >= limit and b.size >= size + MAX_NON_SPLIT_ROUNDING:
            return None
        return b

    @staticmethod
    def _expandable_size(b: _Block) -> int:
        if b.next is None:
            return b.size + _VIRTUAL
        return b.size + (0 if b.next.mapped else b.next.size)

    def _alloc_block(self, small: bool, stream: int, size: int) -> _Block | None:
        """malloc's path when no cached block fits: cudaMalloc (or map pages); when that fails,
        release enough oversize cached blocks and retry (`release_available_cached_blocks`),
        then release every cached segment and retry (`release_cached_blocks`, counted in
        num_alloc_retries)."""
        block = self._new_block(small, stream, size)
        if block is None and self._release_available(small, stream, size):
            block = self._new_block(small, stream, size)
        if block is None:
            self.retries += 1
            self.release_cached()
            block = self._new_block(small, stream, size)
        return block

    def _new_block(self, small: bool, stream: int, size: int) -> _Block | None:
        if self.s.expandable_segments:
            return self._map(small, stream, size)
        seg_size = allocation_size(size)
        if not self._cuda_malloc(seg_size):
            return None
        seg = _Segment(self._next_segment, seg_size, small, stream, mapped=seg_size,
                       pool=self._pool(small, stream))
        self._next_segment += 1
        seg.first = seg.last = _Block(seg, 0, seg_size, free=False)
        self.segments[seg.id] = seg
        self._track_segments()
        return seg.first

    def _release_available(self, small: bool, stream: int, size: int) -> bool:
        """`release_available_cached_blocks` (only with max_split_size set): cudaFree the
        smallest cached oversize block at least max(size, max_split_size), else oversize blocks
        from the largest down until that much is freed (what it frees stays freed even when it
        is not enough)."""
        limit = self.s.max_split_size
        if limit == NO_LIMIT or self.s.expandable_segments:
            # expandable blocks are skipped there, so nothing is released
            return False
        pool = self._pool(small, stream)
        need = max(size, limit)
        i = bisect.bisect_left(pool.keys, (need, -1, -1))
        if i < len(pool.keys):
            b = pool.blocks[pool.keys[i]]
            if b.prev is None and b.next is None:
                self._release_segment(b.segment)
                return True
            return False
        released, j = 0, i - 1
        while released < need and j >= 0 and pool.keys[j][0] >= limit:
            b = pool.blocks[pool.keys[j]]
            j -= 1
            if b.prev is None and b.next is None:  # a whole segment (oversize blocks are never split)
                released += b.size
                self._release_segment(b.segment)
        return released >= need

    def _release_segment(self, seg: _Segment) -> None:
        """cudaFree a segment that holds one free block (oversize blocks are never split)."""
        seg.pool.remove(seg.first)
        self.reserved -= seg.size
        del self.segments[seg.id]

    def _map(self, small: bool, stream: int, size: int) -> _Block | None:
        """Expandable segments (`find_expandable_block`, `map_block`): map pages of the pool's
        range, 2 MiB (small) or 20 MiB (large) each, into the first stretch of not-allocated
        address space that holds `size` (an unmapped hole with the free block before it and
        whatever free and unmapped space follows, or else the range's end with its free tail
        block); the mapped pages merge with their free neighbours into one block, returned
        (not in the pool)."""
        seg = self._expandable.get((small, stream))
        if seg is None:
            seg = _Segment(self._next_segment, 0, small, stream, expandable=True,
                           pool=self._pool(small, stream))
            self._next_segment += 1
            self.segments[seg.id] = seg
            self._expandable[(small, stream)] = seg
        page = seg.page()
        plan = None
        b = seg.first if seg.holes else None
        while b is not None and plan is None:
            if not b.mapped:
                start = b.prev if b.prev is not None and b.prev.free else b
                plan = self._plan(start, size, page)
                if plan is not None:
                    plan = (start, plan)
            b = b.next
        if plan is None:
            last = seg.last
            start = last if last is not None and last.free else None
            plan = (start, self._plan(start, size, page))
        start, maps = plan
        if not self._cuda_malloc(sum(take for _, take in maps)):
            return None
        fresh = set()  # blocks that were unmapped: not in the pool
        for hole, take in maps:
            if hole is None:  # past the mapped end
                new = _Block(seg, seg.size, take)
                last = seg.last
                if last is None:
                    seg.first = seg.last = new
                else:
                    _link_after(last, new)
                seg.size += take
                fresh.add(new)
                start = start or new
                continue
            if take < hole.size:
                _link_after(hole, _Block(seg, hole.offset + take, hole.size - take, False, mapped=False))
                hole.size = take
            else:
                seg.holes -= 1
            hole.mapped, hole.free = True, True
            fresh.add(hole)
        grown = sum(take for _, take in maps)
        seg.mapped += grown
        if seg.live:
            self._totals.held += grown
        pool = seg.pool
        m = start
        if m not in fresh:
            pool.remove(m)
        while m.next is not None and m.next.free:
            nb = m.next
            if nb not in fresh:
                pool.remove(nb)
            m.size += nb.size
            _unlink(nb)
        self._track_segments()
        m.free = False
        return m

    @staticmethod
    def _plan(start: _Block | None, size: int, page: int) -> list | None:
        """The pages to map from `start` on for `size` bytes: [(hole or None for the range's
        end, bytes)], or None when an allocated block comes first (`has_available_address_space`)."""
        covered, maps, b = 0, [], start
        while covered < size:
            if b is None:
                maps.append((None, _round_up(size - covered, page)))
                break
            if b.free:
                covered += b.size
            elif not b.mapped:
                take = min(b.size, _round_up(size - covered, page))
                maps.append((b, take))
                covered += take
            else:
                return None
            b = b.next
        return maps

    def _cuda_malloc(self, n: int) -> bool:
        need = self._held() + n
        if need > self.required:
            self.required = need
        if self.reserved + n > self.s.capacity:
            return False
        self.reserved += n
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
            self._at_peak = True
        return True

    def _track_segments(self) -> None:
        # every cudaMalloc'd segment is mapped; of the few expandable ranges (one per pool and
        # stream) only those with pages: counted without a scan of every segment
        n = len(self.segments) - sum(1 for s in self._expandable.values() if not s.mapped)
        if n > self.peak_segments:
            self.peak_segments = n

    def _held(self) -> int:
        """Bytes of the segments a release cannot give back: those with a live block."""
        return self._totals.held

    def _inactive_split(self) -> int:
        # per segment, not per block: it is read at every new peak
        return self._totals.inactive

    # --- free ---------------------------------------------------------------------------------
    def free(self, key: object) -> None:
        b = self.live.pop(key)
        if b is None:  # an empty tensor: nothing was allocated
            return
        self.allocated -= b.size
        b.free = True
        seg = b.segment
        seg.live -= 1
        if seg.live == 0:
            self._totals.inactive -= seg.free_bytes
            self._totals.held -= seg.mapped
        pool = b.segment.pool
        # `try_merge_blocks`: only free (so mapped) neighbours in the same segment
        for nb in (b.prev, b.next):
            if nb is not None and nb.free:
                pool.remove(nb)
                b = _absorb(b, nb)
        pool.add(b)

    def release_cached(self) -> None:
        """`release_cached_blocks` (empty_cache, and the retry before an OOM): every segment with
        no live block goes back to the driver; in an expandable range every whole page inside a
        free block is unmapped (`unmap_block`), and a range left with nothing mapped is dropped."""
        for seg in list(self.segments.values()):
            if seg.expandable:
                self._unmap_free(seg)
            elif seg.live == 0:
                self._release_segment(seg)

    def _unmap_free(self, seg: _Segment) -> None:
        page, pool = seg.page(), seg.pool
        b = seg.first
        while b is not None:
            nxt = b.next
            if b.free:
                lo, hi = _round_up(b.offset, page), (b.offset + b.size) // page * page
                if hi > lo:
                    pool.remove(b)
                    if hi < b.offset + b.size:  # a partial page after the hole stays mapped
                        after = _Block(seg, hi, b.offset + b.size - hi)
                        _link_after(b, after)
                        pool.add(after)
                    if lo > b.offset:  # and one before it
                        before = _Block(seg, b.offset, lo - b.offset, True, b.prev, b)
                        if b.prev is not None:
                            b.prev.next = before
                        else:
                            seg.first = before
                        b.prev = before
                        b.offset = lo
                        pool.add(before)
                    b.size, b.free, b.mapped = hi - lo, False, False
                    self.reserved -= b.size
                    seg.mapped -= b.size
                    if seg.live:
                        self._totals.held -= b.size
                    for nb in (b.prev, b.next):  # holes merge with holes
                        if nb is not None and not nb.mapped:
                            b = _absorb(b, nb)
                    nxt = b.next
            b = nxt
        last = seg.last
        if last is not None and not last.mapped:  # a hole at the end is just unused address space
            seg.size -= last.size
            _unlink(last)
        holes, b = 0, seg.first
        while b is not None:
            holes += not b.mapped
            b = b.next
        seg.holes = holes
        if seg.first is None:  # `release_expandable_segment`
            del self.segments[seg.id]
            del self._expandable[(seg.small, seg.stream)]

    def reset_peak(self) -> None:
        """torch.cuda.reset_peak_memory_stats(): the peaks start again from what is held now."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
        self.peak_segments = len(self.segments)
        self.inactive_at_peak = self._inactive_split()
        self.required = max(self._held(), self.allocated)

    def mark(self, name: str) -> None:
        self.marks[name] = self.reserved

    def stats(self) -> AllocatorStats:
        segs = [s for s in self.segments.values() if s.mapped]
        return AllocatorStats(
            peak_allocated_bytes=self.peak_allocated,
            peak_reserved_bytes=self.peak_reserved,
            reserved_bytes=self.reserved,
            segments=len(segs),
            peak_segments=self.peak_segments,
            small_pool_segments=sum(1 for s in segs if s.small),
            large_pool_segments=sum(1 for s in segs if not s.small),
            inactive_split_bytes_at_peak=self.inactive_at_peak,
            required_bytes=max(self.required, self.peak_allocated),
            num_alloc_retries=self.retries,
            num_ooms=self.ooms,
            marks=dict(self.marks),
        )

    def _check_invariants(self) -> None:
        """Raise AssertionError when the state breaks a rule of the model (tests call it after
        every event): blocks tile each segment, counters equal what the blocks add up to, no two
        free (or two unmapped) blocks are neighbours, and the free blocks are exactly the pools'."""
        pooled = {id(b): b for p in self.pools.values() for b in p.blocks.values()}
        for (small, stream), p in self.pools.items():
            assert p.keys == sorted(p.keys) and len(p.keys) == len(p.blocks)
            for k, b in p.blocks.items():
                assert k == b.key() and b.free and (b.segment.small, b.segment.stream) == (small, stream)
                assert self.segments.get(b.segment.id) is b.segment
        free_seen = set()
        mapped_total = 0
        for seg in self.segments.values():
            off, live, mapped, holes, prev = 0, 0, 0, 0, None
            b = seg.first
            while b is not None:
                assert b.segment is seg and b.prev is prev and b.offset == off and b.size > 0
                assert b.mapped or (seg.expandable and not b.free)
                if b.mapped:
                    mapped += b.size
                else:
                    page = seg.page()
                    assert b.offset % page == 0 and b.size % page == 0
                    assert prev is None or prev.mapped  # holes merge
                    holes += 1
                if b.free:
                    free_seen.add(id(b))
                    assert prev is None or not prev.free  # free neighbours merge
                elif b.mapped:
                    live += 1
                off += b.size
                prev, b = b, b.next
            assert off == seg.size and live == seg.live and mapped == seg.mapped and seg.last is prev
            assert seg.free_bytes == sum(b.size for b in pooled.values() if b.segment is seg)
            assert seg.pool is self.pools[(seg.small, seg.stream)]
            if seg.expandable:
                assert prev is None or prev.mapped  # no hole at the end
                assert holes == seg.holes
                assert seg.mapped % seg.page() == 0
            else:
                assert seg.mapped == seg.size
            mapped_total += seg.mapped
        assert free_seen == set(pooled)
        live_segs = [g for g in self.segments.values() if g.live]
        assert self._totals.inactive == sum(g.free_bytes for g in live_segs)
        assert self._totals.held == sum(g.mapped for g in live_segs)
        assert self.reserved == mapped_total <= self.s.capacity
        assert self.allocated == sum(b.size for b in self.live.values() if b is not None)
        assert all(b is None or not b.free for b in self.live.values())
        assert self.peak_reserved >= self.reserved and self.peak_allocated >= self.allocated


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

