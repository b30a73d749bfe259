"""The allocation sequence the CPU trace records (validate/tracker.py `record`), and the allocator
model (planner/allocator.py) replayed over it (validate/trace.py TraceResult.allocator).

What is compared, precisely:
- balance: every free names a key allocated before it and not yet freed; the allocations left live
  after the sequence, each rounded as the tracker rounds (up to 512 B; 0 B storages carry no event),
  sum to the tracker's `current`, and the running sum of those rounded sizes peaks at the tracker's
  highest phase peak.
- replayed allocated: at every event the model's allocated bytes equal that running sum plus, for
  each live large-pool block the model did not split, the unsplit remainder (at most kSmallSize =
  1 MiB: the large pool splits only a remainder over 1 MiB, ../shared/ALLOCATOR.md); a small-pool
  block has none. So the replayed peak allocated lies between the trace's peak and that plus 1 MiB
  per live large block.
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402

from memplan import Job  # noqa: E402
from memplan.allocator import SMALL_SIZE, CachingAllocator, round_size  # noqa: E402
from memplan.validate import tracker as tracker_module  # noqa: E402
from memplan.validate.trace import trace_inference, trace_training  # noqa: E402
from memplan.validate.tracker import LiveBytes, rounded  # noqa: E402

from .conftest import DATA  # noqa: E402

ROWS = Path(__file__).parents[1] / "validate" / "results" / "trace-reserved-cpu.jsonl"


def tiny(family: str) -> str:
    return str(DATA / f"tiny-{family}.json")


@pytest.fixture
def trackers(monkeypatch):
    """The LiveBytes instances the traces build, kept for the test to read."""
    made: list[LiveBytes] = []

    class Kept(LiveBytes):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(tracker_module, "LiveBytes", Kept)
    return made


def live_after(events) -> tuple[dict, int]:
    """The keys live after `events` with their bytes, and the peak of the rounded running sum;
    asserts that every free matches an earlier, still live allocation."""
    live: dict[int, int] = {}
    current = peak = 0
    for ev in events:
        if ev[0] == "alloc":
            assert ev[1] not in live and ev[2] > 0
            live[ev[1]] = ev[2]
            current += rounded(ev[2])
            peak = max(peak, current)
        elif ev[0] == "free":
            assert ev[1] in live, f"free of {ev[1]} without a live allocation"
            current -= rounded(live.pop(ev[1]))
    return live, peak


JOBS = [
    dict(model=tiny("llama"), method="full", micro_batch=2, seq_len=128),
    dict(model=tiny("llama"), method="lora", gradient_checkpointing=True, micro_batch=3, seq_len=384),
    dict(model=tiny("gemma"), method="full", weight_dtype="fp32", compute_dtype="bf16", micro_batch=2, seq_len=256),
]


@pytest.mark.parametrize("fields", JOBS, ids=lambda f: f"{Path(f['model']).stem}-{f['method']}-{f['seq_len']}")
def test_training_sequence_balances_and_replays(fields, trackers):
    r = trace_training(Job(**fields), allocator=True)
    tr = trackers[0]
    events = tr.events[: r.events]  # what the trace replayed; frees after it are the model dying
    live, peak = live_after(events)
    assert sum(rounded(n) for n in live.values()) == r.timeline[-1].end_bytes
    assert peak == max(s.peak_bytes for s in r.timeline)
    # the whole list, frees after the trace included, still matches the tracker now
    live_now, _ = live_after(tr.events)
    assert sum(rounded(n) for n in live_now.values()) == tr.current
    assert r.allocations == sum(1 for e in events if e[0] == "alloc")
    assert [e[1] for e in events if e[0] == "mark"] == ["forward", "backward", "optimizer step"] * 2

    # step through the model: allocated = the tracker's rounded sum + unsplit large remainders
    a = CachingAllocator()
    sizes: dict[int, int] = {}
    running = most_large = 0
    for ev in events:
        if ev[0] == "alloc":
            a.malloc(ev[1], ev[2])
            sizes[ev[1]] = ev[2]
            running += rounded(ev[2])
        elif ev[0] == "free":
            a.free(ev[1])
            running -= rounded(sizes.pop(ev[1]))
        else:
            continue
        extra = 0
        for key, block in a.live.items():
            excess = block.size - round_size(sizes[key])
            assert 0 <= excess <= (0 if block.segment.small else SMALL_SIZE)
            extra += excess
        assert a.allocated == running + extra
        most_large = max(most_large, sum(1 for b in a.live.values() if not b.segment.small))
    assert peak <= r.allocator.peak_allocated_bytes <= peak + most_large * SMALL_SIZE
    for stats in (r.allocator, r.allocator_expandable):
        assert stats.peak_reserved_bytes >= stats.peak_allocated_bytes
        assert stats.num_ooms == 0
    # expandable segments grow one range per pool instead of a segment per large request
    assert r.allocator_expandable.peak_reserved_bytes <= r.allocator.peak_reserved_bytes
    assert r.allocator_expandable.segments <= 2 < r.allocator.segments


def test_inference_sequence_balances(trackers):
    r = trace_inference(Job(model=tiny("llama"), task="infer", micro_batch=2, seq_len=128, new_tokens=3), allocator=True)
    tr = trackers[0]
    events = tr.events[: r.events]
    # generate() frees its last step's temporaries after the last phase ends, so the live set is
    # compared with the tracker itself rather than with the last snapshot
    live, peak = live_after(tr.events)
    assert sum(rounded(n) for n in live.values()) == tr.current
    assert live_after(events)[1] == peak == max(s.peak_bytes for s in r.timeline)
    # a mark at the prefill and one after each phase generate() yields (trace_inference)
    assert [e[1] for e in events if e[0] == "mark"] == ["prefill"] + ["decode"] * len(r.timeline)
    assert r.allocator.peak_reserved_bytes >= r.allocator.peak_allocated_bytes >= peak


def test_resize_is_free_then_alloc_and_keys_are_fresh():
    tr = LiveBytes(record=True)
    with tr:
        x = torch.empty(1000, dtype=torch.float32)  # 4,000 B
        st = x.untyped_storage()
        st.resize_(0)  # FSDP frees an unsharded unit like this
        st.resize_(4000)  # and gathers it back
        st.resize_(6000)  # a size change: the new block first, then the old one goes
        del x, st
        y = torch.empty(0)  # no block for 0 bytes
        for _ in range(2):  # id() of the dead storage may come back; the key does not
            z = torch.empty(10)
            del z
        del y
    kinds = [e[:1] + e[2:] for e in tr.events]
    assert kinds == [("alloc", 4000, 0), ("free",), ("alloc", 4000, 0), ("alloc", 6000, 0), ("free",), ("free",),
                     ("alloc", 40, 0), ("free",), ("alloc", 40, 0), ("free",)]
    allocs = [e[1] for e in tr.events if e[0] == "alloc"]
    assert len(set(allocs)) == len(allocs)
    assert [e[1] for e in tr.events if e[0] == "free"] == [allocs[0], allocs[1], allocs[2], allocs[3], allocs[4]]
    assert tr.current == 0


def test_not_recording_by_default():
    tr = LiveBytes()
    with tr:
        torch.empty(10)
    assert tr.events is None


def _smallest_row():
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    return min(rows, key=lambda r: r["trace_seconds"])


def test_committed_row_replays_again():
    """The quickest committed row of trace-reserved-cpu.jsonl, traced again, replays to the same
    reserved figures (the sequence is deterministic for the same library versions)."""
    from memplan.validate.trace_reserved import trace_row, versions

    row = _smallest_row()
    if row["versions"] != versions():
        pytest.skip(f"row traced with {row['versions']}, here {versions()}")
    if row["trace_seconds"] > 60:
        pytest.skip(f"the quickest committed row took {row['trace_seconds']} s to trace")
    again = trace_row(row["job"], row["iterations"])
    for key in ("trace_peak_allocated_bytes", "replayed_peak_reserved_bytes",
                "replayed_expandable_peak_reserved_bytes", "replayed_segments", "allocations"):
        assert again[key] == row[key], key
