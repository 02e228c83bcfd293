"""The mount daemon's heap settings (lifecycle.bound_malloc, trim_malloc): large read buffers
are reused instead of being mapped and zero-filled anew, and free pages go back on a trim.
Each case runs in a child process, since mallopt settings are process-wide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

CHILD = """
import resource, sys, threading
sys.path.insert(0, {src!r})
from hybrid_erofs.mounting.lifecycle import bound_malloc, trim_malloc
if sys.argv[1] == "bound":
    bound_malloc()

def work():
    keep = []
    for _ in range(100):  # a read's buffers: a 1 MiB reply, 4 MiB inflate outputs
        reply = bytearray(1 << 20)
        keep.append(bytes(4 << 20))
        if len(keep) > 3:
            keep.pop(0)
        del reply

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=work)
thread.start()
thread.join()
work()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# Free memory held inside the heap (a live buffer above it stops glibc's own trim at the top).
held = [bytearray(1 << 20) for _ in range(64)]
pin = bytearray(1 << 20)
del held
high = rss_kib()
trim_malloc()
print(faults, high, rss_kib())
"""


def _run(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(src=str(SRC)), mode], check=True,
                         capture_output=True, text=True).stdout.split()
    faults, high, low = (int(x) for x in out)
    return faults, high, low


def test_bound_heap_reuses_large_buffers() -> None:
    # Glibc's default (a dynamic mmap threshold) already reuses; the old fixed 256 KiB
    # threshold mapped every buffer: 200 x (1 + 4) MiB = 256,000 page faults.
    faults, _, _ = _run("bound")
    assert faults < 25_000, faults


def test_trim_gives_free_pages_back() -> None:
    _, high, low = _run("bound")
    assert high - low > 48 << 10, (high, low)  # KiB: most of the 64 MiB freed below `pin`
