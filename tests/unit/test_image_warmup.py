"""ImageWarmup (fetching/warmup.py): the profile spans of an image's layers are fetched in
first-read order across the layers, a fixed number in flight in total; a layer added later
slots its spans in by time; a failing layer stops alone."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.fetching.warmup import ImageWarmup, WarmSpan


class Target:
    """A chunk cache stand-in: records reads; `gate` holds them until set."""

    def __init__(self, name: str, log: list[tuple[str, int]], *, fail: bool = False,
                 gate: threading.Event | None = None) -> None:
        self.name, self.log, self.fail, self.gate = name, log, fail, gate
        self.closed = False
        self.exact = 0

    @contextlib.contextmanager
    def exact_reads(self) -> Iterator[None]:
        self.exact += 1
        yield

    def pread(self, length: int, offset: int) -> bytes:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:
            raise SourceIOError(f"{self.name}: the registry went away")
        self.log.append((self.name, offset))
        return bytes(length)

    def close(self) -> None:
        self.closed = True


def _spans(layer: str, times: list[float]) -> list[WarmSpan]:
    return [WarmSpan(at, layer, offset=int(at), length=10) for at in times]


def test_spans_of_two_layers_are_fetched_in_first_read_order() -> None:
    log: list[tuple[str, int]] = []
    gate = threading.Event()
    rootfs, binaries = Target("rootfs", log, gate=gate), Target("bin", log)
    warmup = ImageWarmup(workers=1)
    warmup.add("rootfs", _spans("rootfs", [0, 40, 900]), lambda: rootfs)
    warmup.add("bin", _spans("bin", [20, 60, 1000]), lambda: binaries)
    gate.set()
    warmup.join(10)
    assert log == [("rootfs", 0), ("bin", 20), ("rootfs", 40), ("bin", 60), ("rootfs", 900),
                   ("bin", 1000)]
    assert warmup.fetched == 6 and rootfs.closed and binaries.closed
    assert rootfs.exact == 3  # no readahead past a span


def test_a_layer_added_later_slots_its_spans_in_by_time() -> None:
    log: list[tuple[str, int]] = []
    gate = threading.Event()
    first = Target("first", log, gate=gate)
    warmup = ImageWarmup(workers=1)
    warmup.add("first", _spans("first", [0, 10, 30, 50]), lambda: first)
    late = Target("late", log)
    warmup.add("late", _spans("late", [5, 20, 40]), lambda: late)  # span 0 is in flight
    gate.set()
    warmup.join(10)
    assert log == [("first", 0), ("late", 5), ("first", 10), ("late", 20), ("first", 30),
                   ("late", 40), ("first", 50)]
    # and one added once all is done starts the threads again
    warmup.add("again", _spans("again", [1]), lambda: Target("again", log))
    warmup.join(10)
    assert log[-1] == ("again", 1)


def test_workers_bound_the_spans_in_flight_in_total() -> None:
    log: list[tuple[str, int]] = []
    gate = threading.Event()
    inflight, peak = [0], [0]
    lock = threading.Lock()

    class Counting(Target):
        def pread(self, length: int, offset: int) -> bytes:
            with lock:
                inflight[0] += 1
                peak[0] = max(peak[0], inflight[0])
            try:
                return super().pread(length, offset)
            finally:
                with lock:
                    inflight[0] -= 1

    warmup = ImageWarmup(workers=2)
    for name in ("a", "b", "c"):
        target = Counting(name, log, gate=gate)
        warmup.add(name, _spans(name, [1, 2, 3, 4]), lambda target=target: target)
    deadline = time.monotonic() + 10
    while inflight[0] < 2:  # both threads hold a span
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)  # a third would be in by now
    gate.set()
    warmup.join(10)
    assert len(log) == 12 and peak[0] == 2


def test_a_failing_or_dropped_layer_stops_alone() -> None:
    log: list[tuple[str, int]] = []
    gate = threading.Event()
    broken = Target("broken", log, fail=True)
    good = Target("good", log, gate=gate)
    warmup = ImageWarmup(workers=1)
    warmup.add("good", _spans("good", [0, 3, 5]), lambda: good)
    warmup.add("broken", _spans("broken", [1, 2, 4]), lambda: broken)
    warmup.add("dropped", _spans("dropped", [2.5]), lambda: Target("dropped", log))
    warmup.drop("dropped")
    gate.set()
    warmup.join(10)
    assert log == [("good", 0), ("good", 3), ("good", 5)]
    assert broken.closed and good.closed
    assert [span.layer for span in warmup.order] == ["good", "broken", "good", "good"]


def test_a_local_blob_has_nothing_to_warm() -> None:
    warmup = ImageWarmup(workers=2)
    warmup.add("local", _spans("local", [0, 1]), lambda: None)
    warmup.join(10)
    assert warmup.fetched == 0


def test_a_layer_added_again_keeps_both_sets() -> None:
    log: list[tuple[str, int]] = []
    gate = threading.Event()
    old, new = Target("old", log, gate=gate), Target("new", log)
    warmup = ImageWarmup(workers=1)
    warmup.add("layer", _spans("layer", [0, 10]), lambda: old)
    warmup.add("layer", _spans("layer", [5, 15]), lambda: new)  # mounted again
    gate.set()
    warmup.join(10)
    assert log == [("old", 0), ("new", 5), ("old", 10), ("new", 15)]
    assert old.closed and new.closed
