"""The caching-allocator model (memplan.allocator), one test per rule of docs/allocator.md "Rules".

Each expectation is worked out by hand in the comment above it, from the rule alone; every test
checks the model's invariants after each event (CachingAllocator._check_invariants).
"""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from memplan.allocator import (
    MiB,
    AllocatorSettings,
    CachingAllocator,
    allocation_size,
    replay,
    round_size,
)

KiB = 1024


class Run:
    """An allocator that checks its invariants after every call."""

    def __init__(self, **settings) -> None:
        self.a = CachingAllocator(AllocatorSettings(**settings))

    def alloc(self, key, nbytes, stream=0) -> bool:
        ok = self.a.malloc(key, nbytes, stream)
        self.a._check_invariants()
        return ok

    def free(self, *keys) -> None:
        for k in keys:
            self.a.free(k)
            self.a._check_invariants()

    def empty_cache(self) -> None:
        self.a.release_cached()
        self.a._check_invariants()

    @property
    def reserved(self) -> int:
        return self.a.reserved

    @property
    def allocated(self) -> int:
        return self.a.allocated

    def block(self, key):
        return self.a.live[key]

    def stats(self):
        return self.a.stats()


# --- sizes ---------------------------------------------------------------------------------------
def test_requests_round_up_to_512_bytes():
    # kMinBlockSize 512: 1 B -> 512, 512 -> 512, 513 -> 1024, 1000 -> 1024
    assert [round_size(n) for n in (1, 512, 513, 1000)] == [512, 512, 1024, 1024]
    r = Run()
    r.alloc("a", 1)
    r.alloc("b", 513)
    # 512 + 1024 allocated; both small, in one 2 MiB segment
    assert r.allocated == 1536 and r.reserved == 2 * MiB


def test_an_empty_tensor_takes_no_block():
    # allocate() calls malloc only for size != 0: nothing allocated, nothing reserved
    r = Run()
    r.alloc("e", 0)
    assert r.allocated == 0 and r.reserved == 0
    r.free("e")
    assert r.stats().segments == 0


def test_small_pool_up_to_1mib_in_2mib_segments():
    # 600 KiB = 614,400 B (a multiple of 512). Three fit one 2 MiB segment (1,800 KiB <= 2,048 KiB,
    # 248 KiB left); the fourth needs a second segment: 4 MiB reserved, two small segments
    r = Run()
    for k in range(4):
        r.alloc(k, 600 * KiB)
    s = r.stats()
    assert r.reserved == 4 * MiB and s.small_pool_segments == 2 and s.large_pool_segments == 0
    # exactly 1 MiB is still small (<= kSmallSize): it fits the second segment's rest,
    # 2,048 - 600 = 1,448 KiB: 4 MiB; 1 MiB + 1 B rounds to 1 MiB + 512: large pool, a 20 MiB
    # segment, 24 MiB
    r.alloc("1MiB", 1 * MiB)
    assert r.reserved == 4 * MiB and r.block("1MiB").segment is r.block(3).segment
    r.alloc("over", 1 * MiB + 1)
    assert r.reserved == 24 * MiB and r.stats().large_pool_segments == 1


def test_large_requests_under_10mib_share_20mib_segments():
    # 3 MiB -> a 20 MiB segment (17 MiB left, split off); 5 MiB and 9 MiB come from that rest
    # (17 -> 12 -> 3 MiB left); 4 MiB does not fit 3 MiB: a second 20 MiB segment, 40 MiB
    r = Run()
    r.alloc("a", 3 * MiB)
    assert r.reserved == 20 * MiB
    r.alloc("b", 5 * MiB)
    r.alloc("c", 9 * MiB)
    assert r.reserved == 20 * MiB and r.stats().segments == 1
    r.alloc("d", 4 * MiB)
    assert r.reserved == 40 * MiB and r.stats().segments == 2
    assert r.block("b").segment is r.block("a").segment is r.block("c").segment


def test_requests_from_10mib_get_their_size_rounded_to_2mib():
    # kMinLargeAlloc 10 MiB: 10 MiB -> a 10 MiB segment; 11 MiB -> 12 MiB; 10 MiB + 1 B rounds
    # to 10 MiB + 512 -> 12 MiB; 9.5 MiB (under 10 MiB) -> the 20 MiB buffer
    assert allocation_size(10 * MiB) == 10 * MiB
    assert allocation_size(11 * MiB) == 12 * MiB
    assert allocation_size(round_size(10 * MiB + 1)) == 12 * MiB
    assert allocation_size(9 * MiB + 512 * KiB) == 20 * MiB
    r = Run()
    r.alloc("a", 10 * MiB)
    r.alloc("b", 11 * MiB)
    assert r.reserved == 22 * MiB and r.stats().segments == 2


def test_best_fit_takes_the_smallest_block_that_fits():
    # cached whole segments of 30, 40 and 50 MiB; 35 MiB fits 40 and 50: best fit is 40 (split:
    # 5 MiB > 1 MiB left), nothing new reserved (120 MiB)
    r = Run()
    for k, mib in (("a", 30), ("b", 40), ("c", 50)):
        r.alloc(k, mib * MiB)
    r.free("a", "b", "c")
    r.alloc("x", 35 * MiB)
    assert r.block("x").segment.size == 40 * MiB
    assert r.reserved == 120 * MiB and r.allocated == 35 * MiB


def test_small_blocks_split_down_to_512_bytes():
    # 2 MiB small segment: 1 MiB, then 1 MiB - 512 (512 B left, >= kMinBlockSize: split), then
    # 512 B takes that rest whole: allocated 2 MiB exactly, one segment
    r = Run()
    r.alloc("a", 1 * MiB)
    r.alloc("b", 1 * MiB - 512)
    assert r.allocated == 2 * MiB - 512
    r.alloc("c", 512)
    assert r.allocated == 2 * MiB and r.reserved == 2 * MiB and r.stats().segments == 1


def test_large_blocks_split_only_when_more_than_1mib_is_left():
    # 19 MiB -> a 20 MiB segment; 1 MiB left is not > kSmallSize: the whole 20 MiB block is
    # handed out and counts as allocated
    r = Run()
    r.alloc("a", 19 * MiB)
    assert r.allocated == 20 * MiB and r.block("a").next is None
    # 19 MiB - 512 -> 1 MiB + 512 left (> 1 MiB): split; allocated 19 MiB - 512, and a later
    # 1 MiB + 512 request (large pool) takes the rest without a new segment
    r = Run()
    r.alloc("a", 19 * MiB - 512)
    assert r.allocated == 19 * MiB - 512
    r.alloc("b", 1 * MiB + 512)
    assert r.reserved == 20 * MiB and r.allocated == 20 * MiB


def test_freed_neighbours_merge_inside_a_segment():
    # one 20 MiB segment: a 4, b 5, c 3 MiB, 8 MiB left. Freeing a and b merges them into one
    # 9 MiB block, which a 9 MiB request fits: still 20 MiB (unmerged, 4 and 5 MiB, it would
    # need a new segment)
    r = Run()
    r.alloc("a", 4 * MiB)
    r.alloc("b", 5 * MiB)
    r.alloc("c", 3 * MiB)
    r.free("a", "b")
    free_sizes = sorted(k[0] for k in r.a.pools[(False, 0)].keys)
    assert free_sizes == [8 * MiB, 9 * MiB]
    r.alloc("d", 9 * MiB)
    assert r.reserved == 20 * MiB and r.block("d").offset == 0
    # freeing c and d merges everything back into the one 20 MiB block: empty_cache returns it
    r.free("c", "d")
    assert [k[0] for k in r.a.pools[(False, 0)].keys] == [20 * MiB]
    r.empty_cache()
    assert r.reserved == 0


def test_blocks_of_different_segments_never_merge():
    # two freed 100 MiB segments hold 200 MiB cached, but no block of 150 MiB: a third segment,
    # 350 MiB reserved
    r = Run()
    r.alloc("a", 100 * MiB)
    r.alloc("b", 100 * MiB)
    r.free("a", "b")
    r.alloc("c", 150 * MiB)
    assert r.reserved == 350 * MiB and r.stats().segments == 3


def test_pools_are_per_stream():
    # 100 MiB freed on stream 0 is not reused on stream 1 (a second segment, 200 MiB), but is
    # on stream 0 (still 200 MiB)
    r = Run()
    r.alloc("a", 100 * MiB, stream=0)
    r.free("a")
    r.alloc("b", 100 * MiB, stream=1)
    assert r.reserved == 200 * MiB
    r.alloc("c", 100 * MiB, stream=0)
    assert r.reserved == 200 * MiB and r.block("c").segment.stream == 0


def test_max_split_size_blocks_are_not_split():
    # max_split_size 64 MiB. A cached 100 MiB block serves a 90 MiB request (oversize, wastes
    # 10 < 20 MiB) whole: allocated 100 MiB, not 90
    r = Run(max_split_size=64 * MiB)
    r.alloc("a", 100 * MiB)
    r.free("a")
    r.alloc("b", 90 * MiB)
    assert r.allocated == 100 * MiB and r.reserved == 100 * MiB and r.block("b").next is None
    # a 70 MiB request would waste 30 >= 20 MiB of it: a new 70 MiB segment, 170 MiB
    r.free("b")
    r.alloc("c", 70 * MiB)
    assert r.reserved == 170 * MiB
    # a request under max_split_size never takes an oversize block: 30 MiB -> a new segment,
    # 200 MiB (unlimited, it would split the cached 100 MiB block and reserve nothing)
    r.alloc("d", 30 * MiB)
    assert r.reserved == 200 * MiB
    plain = Run()
    plain.alloc("a", 100 * MiB)
    plain.free("a")
    plain.alloc("d", 30 * MiB)
    assert plain.reserved == 100 * MiB and plain.allocated == 30 * MiB


def test_max_split_size_must_be_above_20mib():
    # torch refuses max_split_size_mb <= 20 (kLargeBuffer / 1 MiB)
    with pytest.raises(ValidationError, match="max_split_size"):
        AllocatorSettings(max_split_size=20 * MiB)
    assert AllocatorSettings(max_split_size=21 * MiB).env() == "max_split_size_mb:21"


def test_failed_cudamalloc_releases_cached_segments_and_retries():
    # capacity 60 MiB: a 30 MiB (freed, cached) + b 20 MiB (live) = 50 MiB. 40 MiB: nothing cached
    # fits; 50 + 40 > 60 fails; release the whole cached 30 MiB segment (20 MiB left), retry:
    # 20 + 40 = 60 fits. One retry, no OOM, 60 MiB
    r = Run(capacity=60 * MiB)
    r.alloc("a", 30 * MiB)
    r.alloc("b", 20 * MiB)
    r.free("a")
    assert r.alloc("c", 40 * MiB)
    s = r.stats()
    assert r.reserved == 60 * MiB and s.num_alloc_retries == 1 and s.num_ooms == 0


def test_a_live_block_in_every_segment_is_an_oom():
    # capacity 40 MiB: two 20 MiB segments each hold a live 5 MiB block (15 MiB free in each,
    # 30 MiB cached). 16 MiB fits neither 15 MiB block; a 16 MiB segment does not fit 40 - 40;
    # neither segment can be released: OOM after one retry, nothing changes
    r = Run(capacity=40 * MiB)
    r.alloc("a", 5 * MiB)
    r.alloc("x", 15 * MiB)  # fills a's segment, so b needs the second one
    r.alloc("b", 5 * MiB)
    r.alloc("y", 15 * MiB)
    r.free("x", "y")
    assert not r.alloc("c", 16 * MiB)
    s = r.stats()
    assert s.num_ooms == 1 and s.num_alloc_retries == 1 and r.reserved == 40 * MiB
    assert "c" not in r.a.live


def test_oversize_blocks_are_released_first_without_a_retry():
    # max_split_size 64 MiB, capacity 180 MiB: cached 100 MiB (oversize) and 30 MiB segments.
    # 70 MiB: the 100 MiB block wastes 30 >= 20 MiB, so a new segment; 130 + 70 > 180 fails;
    # release_available_cached_blocks frees the smallest oversize block >= 70 MiB (the 100 MiB
    # one) and the retry fits: 30 + 70 = 100 MiB, the 30 MiB block still cached, no
    # num_alloc_retries (release_cached_blocks, which would free the 30 MiB too, is not reached)
    r = Run(max_split_size=64 * MiB, capacity=180 * MiB)
    r.alloc("a", 100 * MiB)
    r.alloc("b", 30 * MiB)
    r.free("a", "b")
    assert r.alloc("c", 70 * MiB)
    s = r.stats()
    assert r.reserved == 100 * MiB and s.num_alloc_retries == 0 and s.segments == 2


def test_empty_cache_returns_segments_without_live_blocks():
    # a 30 MiB (freed) + b 2 KiB (live, 2 MiB small segment): 32 MiB before, 2 MiB after
    # empty_cache; a free of a key never allocated is ignored
    s = replay([
        ("alloc", "a", 30 * MiB, 0), ("alloc", "b", 2 * KiB, 0), ("free", "a"), ("free", "ghost"),
        ("mark", "before"), ("empty_cache",), ("mark", "after"),
    ])
    assert s.marks == {"before": 32 * MiB, "after": 2 * MiB}
    assert s.peak_reserved_bytes == 32 * MiB and s.reserved_bytes == 2 * MiB and s.segments == 1


def test_inactive_split_bytes_at_the_reserved_peak():
    # 4 MiB in a fresh 20 MiB segment: at the peak (20 MiB) the 16 MiB rest is free inside a
    # segment with a live block
    s = replay([("alloc", "a", 4 * MiB, 0)])
    assert s.inactive_split_bytes_at_peak == 16 * MiB


def test_unknown_event_is_refused():
    with pytest.raises(ValueError, match="unknown allocator event"):
        replay([("alloc", "a", 1, 0), ("realloc", "a")])


# --- expandable segments ---------------------------------------------------------------------------
def test_expandable_maps_pages_of_2mib_and_20mib():
    # 3 MiB (large) maps one 20 MiB page; 1 KiB (small) one 2 MiB page: 22 MiB. 25 MiB: the free
    # tail is 20 - 3 = 17 MiB, 8 MiB more is one more 20 MiB page: 42 MiB, still one large range
    r = Run(expandable_segments=True)
    r.alloc("a", 3 * MiB)
    assert r.reserved == 20 * MiB
    r.alloc("b", 1 * KiB)
    assert r.reserved == 22 * MiB
    r.alloc("c", 25 * MiB)
    s = r.stats()
    assert r.reserved == 42 * MiB and s.large_pool_segments == 1 and s.small_pool_segments == 1
    assert r.block("c").offset == 3 * MiB  # it starts in the old tail


def test_expandable_fragmentation_case_needs_no_new_memory():
    # two 100 MiB blocks are neighbours in one range (5 pages each); freed they merge into one
    # 200 MiB block, which serves 150 MiB: 200 MiB reserved, against 350 MiB without
    r = Run(expandable_segments=True)
    r.alloc("a", 100 * MiB)
    r.alloc("b", 100 * MiB)
    r.free("a", "b")
    r.alloc("c", 150 * MiB)
    assert r.reserved == 200 * MiB and r.stats().segments == 1 and r.block("c").offset == 0


def test_expandable_reuses_the_free_tail_before_mapping_more():
    # 30 MiB maps 2 pages (40 MiB), 10 MiB free at the end; 25 MiB takes those 10 and maps
    # ceil(15 / 20) = 1 page more: 60 MiB (not 40 + 40)
    r = Run(expandable_segments=True)
    r.alloc("a", 30 * MiB)
    assert r.reserved == 40 * MiB
    r.alloc("b", 25 * MiB)
    assert r.reserved == 60 * MiB and r.block("b").offset == 30 * MiB
    # expandable blocks split down to 512 B: b holds 25 MiB, 5 MiB stay free at the end
    assert r.allocated == 55 * MiB


def test_expandable_empty_cache_unmaps_only_whole_free_pages():
    # a 5 MiB, b 5 MiB in one 20 MiB page; b freed: the free tail [5, 20) MiB holds no whole
    # page, so empty_cache keeps the page mapped (20 MiB); with a freed too the page is free and
    # unmapped: 0 MiB, no segment
    r = Run(expandable_segments=True)
    r.alloc("a", 5 * MiB)
    r.alloc("b", 5 * MiB)
    r.free("b")
    r.empty_cache()
    assert r.reserved == 20 * MiB
    r.free("a")
    r.empty_cache()
    assert r.reserved == 0 and r.stats().segments == 0


def test_expandable_unmapped_hole_is_mapped_again_first():
    # a, b, c 20 MiB each: pages 0, 1, 2. a freed and empty_cache: page 0 unmapped (40 MiB);
    # d 20 MiB maps page 0 again (the lowest unmapped address that fits), 60 MiB, the range
    # still 60 MiB long
    r = Run(expandable_segments=True)
    for k in "abc":
        r.alloc(k, 20 * MiB)
    r.free("a")
    r.empty_cache()
    assert r.reserved == 40 * MiB
    r.alloc("d", 20 * MiB)
    assert r.reserved == 60 * MiB and r.block("d").offset == 0
    assert r.block("d").segment.size == 60 * MiB


def test_expandable_best_fit_spares_the_growing_end():
    # p 12 MiB maps page 0, q 8 MiB takes its rest; r 12 MiB maps page 1, 8 MiB free at the end.
    # p freed: free blocks of 12 MiB (offset 0, allocated q after it) and 8 MiB (the end, which
    # borders unmapped space). 8 MiB best-fits the end block, but get_free_block walks on to the
    # larger block that cannot grow: s lands at offset 0
    r = Run(expandable_segments=True)
    r.alloc("p", 12 * MiB)
    r.alloc("q", 8 * MiB)
    r.alloc("r", 12 * MiB)
    r.free("p")
    r.alloc("s", 8 * MiB)
    assert r.block("s").offset == 0 and r.reserved == 40 * MiB


def test_expandable_retry_unmaps_free_pages():
    # capacity 60 MiB: a 40 MiB (2 pages), b 20 MiB (page 2); a freed. 50 MiB: the free block is
    # 40 MiB, b is in the way, so pages past the end: 3 more (60 MiB), 60 + 60 > 60 fails;
    # release unmaps pages 0-1 (20 MiB left), retry: the hole [0, 40) is followed by b, too
    # short, so the end: 20 + 60 = 80 > 60 fails again: an OOM
    r = Run(expandable_segments=True, capacity=60 * MiB)
    r.alloc("a", 40 * MiB)
    r.alloc("b", 20 * MiB)
    r.free("a")
    assert not r.alloc("c", 50 * MiB)
    s = r.stats()
    assert s.num_ooms == 1 and s.num_alloc_retries == 1 and r.reserved == 20 * MiB
    # 40 MiB now fits the hole: mapped again, 60 MiB
    assert r.alloc("d", 40 * MiB) and r.reserved == 60 * MiB and r.block("d").offset == 0


# --- random sequences ------------------------------------------------------------------------------
def _random_events(rng: random.Random, n: int, streams: int):
    live, events, key = [], [], 0
    for _ in range(n):
        roll = rng.random()
        if roll < 0.02:
            events.append(("empty_cache",))
        elif live and roll < 0.47:
            events.append(("free", live.pop(rng.randrange(len(live)))))
        else:
            c = rng.random()
            size = (rng.randint(0, 4096) if c < 0.3 else rng.randint(1, 2 * MiB) if c < 0.6
                    else rng.randint(1, 12 * MiB) if c < 0.9 else rng.randint(10 * MiB, 120 * MiB))
            events.append(("alloc", key, size, rng.randrange(streams)))
            live.append(key)
            key += 1
    return events


SETTINGS = [
    {},
    {"max_split_size": 64 * MiB},
    {"capacity": 600 * MiB},
    {"max_split_size": 40 * MiB, "capacity": 600 * MiB},
    {"expandable_segments": True},
    {"expandable_segments": True, "capacity": 600 * MiB},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sequences_keep_the_invariants(settings, seed):
    # after every event: blocks tile each segment exactly, allocated == the live blocks' sizes,
    # reserved == the segments' (mapped) sizes <= capacity, no two free (or unmapped)
    # neighbours, the free blocks are exactly the pools'
    rng = random.Random(seed)
    a = CachingAllocator(AllocatorSettings(**settings))
    for ev in _random_events(rng, 1500, 2):
        if ev[0] == "alloc":
            a.malloc(ev[1], ev[2], ev[3])
        elif ev[0] == "free":
            if ev[1] in a.live:
                a.free(ev[1])
        else:
            a.release_cached()
        a._check_invariants()
    s = a.stats()
    assert s.peak_reserved_bytes >= s.peak_allocated_bytes > 0
    assert s.small_pool_segments + s.large_pool_segments == s.segments <= s.peak_segments
    if "capacity" in settings:
        assert s.peak_reserved_bytes <= settings["capacity"] and s.num_alloc_retries > 0


def test_random_sequence_replays_the_same():
    # the replay is deterministic: one sequence twice, the same statistics
    events = _random_events(random.Random(5), 3000, 2)
    for settings in SETTINGS:
        st = AllocatorSettings(**settings)
        assert replay(events, st) == replay(events, st)


def test_the_invariant_check_catches_a_broken_state():
    # the property test above is only as good as the check: a counter off by 512 B, two free
    # neighbours left unmerged, and a free block missing from its pool must each be caught
    def state():
        r = Run()
        r.alloc("a", 4 * MiB)
        r.alloc("b", 4 * MiB)
        return r.a

    a = state()
    a.allocated += 512
    with pytest.raises(AssertionError):
        a._check_invariants()
    a = state()
    a.live.pop("a").free = True  # freed without merging into the free rest after b
    a.live.pop("b").free = True
    with pytest.raises(AssertionError):
        a._check_invariants()
    a = state()
    a.pools[(False, 0)].keys.clear()
    with pytest.raises(AssertionError):
        a._check_invariants()
