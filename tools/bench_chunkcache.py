"""ChunkCacheSource chunk-size benchmark: cold-cache read patterns over a simulated registry
(per-request latency + a shared link of fixed bandwidth), and the warm-hit latency of the
sparse-file store against one-file-per-chunk. Prints a Markdown table (or --json)."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hybrid_erofs.source import ByteSource, FileSource
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from hybrid_erofs.sources.chunkstore import _crc32 as crc32

KEY = "sha256:" + "be" * 32
CHUNK_SIZES = (256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20)
READAHEAD_BYTES = 8 << 20
Pattern = list[tuple[int, int]]  # (length, offset) reads


class RegistryLikeSource:
    """Wraps a source: each read waits `latency_s` (requests overlap), then moves its bytes
    over one shared link of `bytes_per_s` (transfers queue). Counts requests. Thread-safe."""

    def __init__(self, inner: ByteSource, *, latency_s: float, bytes_per_s: float) -> None:
        self._inner, self._latency_s, self._bytes_per_s = inner, latency_s, bytes_per_s
        self._lock = threading.Lock()
        self._link_free_at = 0.0
        self.requests = 0
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self._inner.size

    def pread(self, length: int, offset: int) -> bytes:
        time.sleep(self._latency_s)
        with self._lock:
            self.requests += 1
            self.bytes_read += length
            start = max(time.monotonic(), self._link_free_at)
            self._link_free_at = done = start + length / self._bytes_per_s
        time.sleep(max(0.0, done - time.monotonic()))
        return self._inner.pread(length, offset)

    def close(self) -> None:
        self._inner.close()


def patterns(size: int, seed: int, reads: int) -> dict[str, Pattern]:
    rng = random.Random(seed)

    def random_reads(low: int, high: int, count: int) -> Pattern:
        out = []
        for _ in range(count):
            length = int(2 ** rng.uniform(low.bit_length() - 1, high.bit_length() - 1))
            out.append((length, rng.randrange(size - length)))
        return out

    return {
        "random 4K-1M": random_reads(4 << 10, 1 << 20, reads),
        # GzipSource reads one compressed span per miss: about 4 MiB / ratio 2-4.
        "spans 0.5-2M": random_reads(512 << 10, 2 << 20, reads // 2),
        # Reading a few whole files: runs of forward reads at random places.
        "clustered": [(length, base + k * length)
                      for base in (rng.randrange(size - (8 << 20)) for _ in range(reads // 5))
                      for length in [rng.choice((64 << 10, 256 << 10, 512 << 10))]
                      for k in range(6)],
        "sequential 128K": [(128 << 10, o) for o in range(0, min(size, 128 << 20), 128 << 10)],
    }


def unique_bytes(pattern: Pattern) -> int:
    """Size of the union of the read ranges."""
    total, end = 0, 0
    for length, offset in sorted(pattern, key=lambda r: r[1]):
        start = max(offset, end)
        if offset + length > start:
            total += offset + length - start
            end = offset + length
    return total


def run_pattern(path: Path, pattern: Pattern, chunk_size: int, args: argparse.Namespace,
                cache_dir: Path) -> dict[str, object]:
    inner = RegistryLikeSource(FileSource(path), latency_s=args.latency_ms / 1000,
                               bytes_per_s=args.mbps * 1e6)
    source = ChunkCacheSource(inner, key=KEY, cache_dir=cache_dir, chunk_size=chunk_size,
                              readahead=max(1, READAHEAD_BYTES // chunk_size))
    got = []
    started = time.perf_counter()
    for length, offset in pattern:
        got.append(source.pread(length, offset))
    elapsed = time.perf_counter() - started
    truth = FileSource(path)
    for (length, offset), data in zip(pattern, got, strict=True):
        if data != truth.pread(length, offset):
            raise SystemExit(f"wrong bytes at {offset}+{length}")
    truth.close()
    source.close()  # waits for readahead, so its requests are counted too
    need = unique_bytes(pattern)
    return {"chunk_size": chunk_size, "time_s": round(elapsed, 3), "requests": inner.requests,
            "fetched": inner.bytes_read, "needed": need,
            "overfetch": round(inner.bytes_read / need, 2)}


def hit_latency(path: Path, chunk_size: int, cache_dir: Path) -> dict[str, float]:
    """p50 µs of warm 4 KiB reads in the first 64 MiB: our sparse-file store vs
    open/read/close of one file per chunk (both verify the chunk's crc32)."""
    source = ChunkCacheSource(FileSource(path), key=KEY, cache_dir=cache_dir,
                              chunk_size=chunk_size, readahead=0)
    span = min(64 << 20, source.size)
    data = source.pread(span, 0)  # warm every chunk
    per_file = Path(cache_dir) / "per-chunk"
    per_file.mkdir()
    for number in range(-(-span // chunk_size)):
        (per_file / str(number)).write_bytes(data[number * chunk_size : (number + 1) * chunk_size])
    rng = random.Random(7)
    offsets = [rng.randrange(span - 4096) for _ in range(2000)]

    def sparse(offset: int) -> bytes:
        return source.pread(4096, offset)

    def files(offset: int) -> bytes:
        number = offset // chunk_size
        with open(per_file / str(number), "rb") as f:
            chunk = f.read()
        crc32(chunk)  # the same verification the sparse store does
        return chunk[offset - number * chunk_size :][:4096]

    def p50(fn: Callable[[int], bytes]) -> float:
        samples = []
        for offset in offsets:
            t = time.perf_counter()
            fn(offset)
            samples.append(time.perf_counter() - t)
        return round(statistics.median(samples) * 1e6, 1)

    result = {"sparse_us": p50(sparse), "files_us": p50(files)}
    source.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="blob size; a real layer is far bigger than what a workload reads")
    parser.add_argument("--reads", type=int, default=150, help="random reads per pattern")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--mbps", type=float, default=100.0, help="link bandwidth, MB/s")
    parser.add_argument("--chunk-sizes", default=",".join(str(c >> 10) for c in CHUNK_SIZES),
                        help="KiB, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    chunk_sizes = [int(c) << 10 for c in args.chunk_sizes.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))  # incompressible, like a gzip blob
        size = args.size_mib << 20
        for name, pattern in patterns(size, 1234, args.reads).items():
            for chunk_size in chunk_sizes:
                with tempfile.TemporaryDirectory(dir=tmp) as cache_dir:
                    row = run_pattern(path, pattern, chunk_size, args, Path(cache_dir))
                rows.append({"pattern": name, **row})
                print(f"{name:>16} {chunk_size >> 10:>5} KiB: {row}", file=sys.stderr)
        for chunk_size in chunk_sizes:
            with tempfile.TemporaryDirectory(dir=tmp) as cache_dir:
                rows.append({"pattern": "warm 4K hit p50", "chunk_size": chunk_size,
                             **hit_latency(path, chunk_size, Path(cache_dir))})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.size_mib} MiB blob, {args.latency_ms:g} ms/request, {args.mbps:g} MB/s link, "
          f"readahead {READAHEAD_BYTES >> 20} MiB\n")
    print("| pattern | chunk | time s | requests | fetched MiB | over-fetch |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "time_s" in row:
            print(f"| {row['pattern']} | {int(row['chunk_size']) >> 10} KiB | {row['time_s']} | "  # type: ignore[call-overload]
                  f"{row['requests']} | {int(row['fetched']) / 2**20:.1f} | {row['overfetch']}x |")  # type: ignore[call-overload]
    print("\n| warm 4 KiB hit p50 | sparse file + index | one file per chunk |\n|---|---|---|")
    for row in rows:
        if "sparse_us" in row:
            print(f"| {int(row['chunk_size']) >> 10} KiB | {row['sparse_us']} µs | "  # type: ignore[call-overload]
                  f"{row['files_us']} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
