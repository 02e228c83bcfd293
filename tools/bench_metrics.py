"""The cost of metrics on the read path: 4 KiB random reads through two mounts of one layer, one
daemon with metrics (latency histogram, /metrics scraped every 15 s), one without (the
histogram off: HYBRID_EROFS_NO_READ_METRICS=1), interleaved A/B/B/A in many rounds; cold reads
(decoded from a checkpoint) and warm ones (decoded data in memory), page caches dropped before
each read so that every read reaches its daemon. Two ways in: files of the EROFS mount (the
kernel reads ahead from the FUSE file), and the FUSE file itself with readahead off (exactly
4 KiB per daemon read: the least work per read, so the largest share for metrics).

Measured per read: the wall time, and the CPU time the daemon spent (its threads in a cgroup
of their own, cpuacct.usage in ns): on a shared machine the wall time is mostly other people's
load, the daemon's CPU time much less so. Plus the histogram's cost per call, measured on
MeteredSource alone. Root only (mounts, cgroups).

    python tools/bench_metrics.py [--tar TAR] [--work DIR] [--rounds 40] [--reads 50]
                                  [--scrape-every 15]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import timeit
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hybrid_erofs.mounting.layer import NO_READ_METRICS_ENV  # noqa: E402
from hybrid_erofs.source import MemorySource  # noqa: E402
from hybrid_erofs.sources.metered import MeteredSource  # noqa: E402

CLI = [sys.executable, "-m", "hybrid_erofs"]
DEFAULT_TAR = Path("/var/cache/hybrid-erofs-ci/rootfs.tar")


def prepare(tar: Path, work: Path) -> tuple[Path, Path, Path]:
    """layer.tar.gz (pigz -6, else gzip -6), its zinfo (1 MiB spans) and meta, once."""
    work.mkdir(parents=True, exist_ok=True)
    layer, zinfo, meta = work / "layer.tar.gz", work / "layer.zinfo", work / "m.erofs"
    if not layer.exists():
        compressor = shutil.which("pigz") or "gzip"
        with open(tar, "rb") as src, open(layer.with_suffix(".part"), "wb") as dst:
            subprocess.run([compressor, "-6", "-n", "-c"], stdin=src, stdout=dst, check=True)
        layer.with_suffix(".part").rename(layer)
    if not meta.exists():
        subprocess.run([*CLI, "index", str(layer), "-o", str(zinfo), "--meta", str(meta),
                        "--span", "1MiB"], check=True)
    return layer, zinfo, meta


@contextlib.contextmanager
def mounted(layer: Path, zinfo: Path, meta: Path, mnt: Path, runtime: Path, *,
            metrics: bool) -> Iterator[dict[str, object]]:
    """A mount of the layer; its state record. A small memory cache makes random reads cold."""
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    if not metrics:
        env[NO_READ_METRICS_ENV] = "1"
    mnt.mkdir(parents=True, exist_ok=True)
    extra = ["--metrics-address", "127.0.0.1:0"] if metrics else []
    subprocess.run([*CLI, "mount", "--meta", str(meta), "--zinfo", str(zinfo), "--via", "fuse",
                    "--memory-cache", "2MiB", *extra, str(layer), str(mnt)], env=env,
                   check=True, capture_output=True)
    record = json.loads(next((runtime / "mounts").glob("*[0-9a-f].json")).read_text())
    try:
        yield record
    finally:
        subprocess.run([*CLI, "umount", str(mnt)], env=env, check=True, capture_output=True)


class DaemonCpu:
    """CPU time of one daemon (all its threads, exited ones too): a cgroup v1 cpuacct group
    of its own, or (without one) the sum of its live threads' schedstat."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.group: Path | None = Path(f"/sys/fs/cgroup/cpuacct/hybrid-erofs-bench-{name}-{pid}")
        try:
            self.group.mkdir()
            (self.group / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            self.group = None

    def ns(self) -> int:
        if self.group is not None:
            return int((self.group / "cpuacct.usage").read_text())
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total

    def settled_ns(self, quiet_s: float = 0.003, limit_s: float = 0.5) -> int:
        """The CPU time once the daemon has been idle for `quiet_s` (its background work for
        the last read, decoding ahead for instance, counted with that read)."""
        deadline = time.monotonic() + limit_s
        last, quiet_since = self.ns(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(quiet_s / 3)
            now = self.ns()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
        return last

    def close(self) -> None:
        if self.group is not None:
            with contextlib.suppress(OSError):  # the daemon has exited: the group is empty
                self.group.rmdir()


def files_of(mnt: Path) -> list[tuple[str, int]]:
    found = []
    for path in mnt.rglob("*"):
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            if size >= 16384:
                found.append((str(path.relative_to(mnt)), size))
    return sorted(found)


def timed_reads(mnt: Path, disk_fd: int, skip: int, cpu: DaemonCpu,
                reads: list[tuple[str, int]]) -> dict[str, list[tuple[float, float]]]:
    """(wall µs, daemon CPU µs) of each (file, offset) read cold, and of each but the last
    read again (warm) right after the next one's cold read: reading the same span twice in a
    row would start GzipSource's decode-ahead, whose CPU time would swamp the read's own.
    Page caches are dropped before each read. The file "" is the FUSE device file, read with
    readahead off."""
    out: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
    order = [(0, "cold")]
    for k in range(1, len(reads)):
        order += [(k, "cold"), (k - 1, "warm")]
    for k, temp in order:
        name, offset = reads[k]
        fd = os.open(mnt / name, os.O_RDONLY) if name else disk_fd
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.posix_fadvise(fd, skip if fd == disk_fd else 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(disk_fd, skip, 0, os.POSIX_FADV_DONTNEED)
            cpu_before = cpu.settled_ns()
            started = time.perf_counter_ns()
            data = os.pread(fd, 4096, offset)
            wall = time.perf_counter_ns() - started
            out[temp].append((wall / 1000, (cpu.settled_ns() - cpu_before) / 1000))
            assert len(data) == 4096
        finally:
            if fd != disk_fd:
                os.close(fd)
    return out


def histogram_cost_ns(calls: int = 200_000) -> tuple[float, float]:
    """ns per MeteredSource.pread over a MemorySource, with and without the histogram (median
    of 7 interleaved repetitions)."""
    with_h, without = MeteredSource(MemorySource(bytes(8192))), MeteredSource(
        MemorySource(bytes(8192)), latency=False)
    results: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(7):
        for flag, source in ((True, with_h), (False, without)):
            seconds = timeit.timeit(functools.partial(source.pread, 4096, 1024), number=calls)
            results[flag].append(seconds / calls * 1e9)
    return statistics.median(results[True]), statistics.median(results[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tar", type=Path, default=DEFAULT_TAR)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-data" / "metrics")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--reads", type=int, default=50, help="reads per batch")
    parser.add_argument("--scrape-every", type=float, default=15.0, metavar="SECONDS",
                        help="how often /metrics of A is scraped (Prometheus: 15 s or more)")
    parser.add_argument("--control", action="store_true",
                        help="A without metrics too (an A/A run: the noise and bias floor)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_metrics.py: needs root (mounts)")
    layer, zinfo, meta = prepare(args.tar, args.work)
    skip = -(-meta.stat().st_size // 4096) * 4096  # the meta's pages stay cached
    rng = random.Random(1234)
    run = args.work / "run"
    with mounted(layer, zinfo, meta, args.work / "a", run / "a",
                 metrics=not args.control) as rec_a, \
            mounted(layer, zinfo, meta, args.work / "b", run / "b", metrics=False) as rec_b:
        mounts = {"A": (args.work / "a", rec_a), "B": (args.work / "b", rec_b)}
        candidates = files_of(args.work / "a")
        stop = threading.Event()
        scrapes = [0]

        def scraper() -> None:  # as Prometheus would
            while not stop.wait(args.scrape_every) and not args.control:
                httpx.get(f"http://{rec_a['metrics_address']}/metrics", timeout=10)
                scrapes[0] += 1

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        modes = [f"{way} {temp}" for way in ("erofs", "device") for temp in ("cold", "warm")]
        # mode -> daemon -> per round: [(wall µs, cpu µs) per read]
        rounds: dict[str, dict[str, list[list[tuple[float, float]]]]] = {
            m: {"A": [], "B": []} for m in modes}
        disk_fds = {k: os.open(str(rec["disk_path"]), os.O_RDONLY) for k, (_, rec) in
                    mounts.items()}
        cpus = {k: DaemonCpu(int(str(rec["daemon_pid"])), k) for k, (_, rec) in mounts.items()}
        device_size = os.fstat(disk_fds["A"]).st_size
        try:
            for r in range(args.rounds):
                batches: dict[str, list[tuple[str, int]]] = {"erofs": [], "device": []}
                for _ in range(args.reads):
                    name, size = rng.choice(candidates)
                    batches["erofs"].append((name, rng.randrange(size // 4096 - 1) * 4096))
                    batches["device"].append(
                        ("", rng.randrange(skip // 4096, device_size // 4096 - 1) * 4096))
                for key in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    for way, reads in batches.items():
                        got = timed_reads(mounts[key][0], disk_fds[key], skip, cpus[key],
                                          reads)
                        for temp, values in got.items():
                            rounds[f"{way} {temp}"][key].append(values)
        finally:
            stop.set()
            thread.join()
            for fd in disk_fds.values():
                os.close(fd)
    for cpu in cpus.values():
        cpu.close()
    print(f"{'CONTROL (A without metrics too): ' if args.control else ''}"
          f"{args.rounds} rounds x {args.reads} reads of 4 KiB per daemon and mode, A/B/B/A; "
          f"/metrics of A scraped {scrapes[0]} times; CPU from "
          f"{'cgroup cpuacct' if cpus['A'].group else 'schedstat'}")
    print("| reads | wall µs, median: A (metrics) / B (none) | daemon CPU µs per read, mean: "
          "A / B | A/B CPU: all reads | A/B CPU: median of per-round ratios (quartiles) |")
    print("|---|---|---|---|---|")
    for mode in modes:
        a_all = [v for batch in rounds[mode]["A"] for v in batch]
        b_all = [v for batch in rounds[mode]["B"] for v in batch]
        cpu_a = statistics.fmean(c for _, c in a_all)
        cpu_b = statistics.fmean(c for _, c in b_all)
        ratios = sorted(sum(c for _, c in a) / sum(c for _, c in b)
                        for a, b in zip(rounds[mode]["A"], rounds[mode]["B"], strict=True))
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        print(f"| {mode} | {statistics.median(w for w, _ in a_all):.0f} / "
              f"{statistics.median(w for w, _ in b_all):.0f} | {cpu_a:.1f} / {cpu_b:.1f} | "
              f"{cpu_a / cpu_b:.3f} | {statistics.median(ratios):.3f} "
              f"({q1:.3f} - {q3:.3f}) |")
    warm_cpu_b = statistics.fmean(c for batch in rounds["device warm"]["B"] for _, c in batch)
    with_h, without = histogram_cost_ns()
    print(f"MeteredSource.pread: {with_h:.0f} ns with the histogram, {without:.0f} ns without: "
          f"{with_h - without:.0f} ns per read = {100 * (with_h - without) / warm_cpu_b / 1000:.2f}"
          f" % of the daemon's CPU for a warm 4 KiB device read ({warm_cpu_b:.1f} µs)")


if __name__ == "__main__":
    main()
