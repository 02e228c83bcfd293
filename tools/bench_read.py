"""4 KiB random-read latency of GzipSource against indexed_gzip, both on the same checkpoints
(our zinfo converted to indexed_gzip's GZIDX); cold and warm p50/p99 in ms, every read checked
against the decompressed tar."""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hybrid_erofs.gzindex import source as gzsource
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import WINDOW_SIZE, GzipIndex, load_index
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.source import FileSource

READ = 4096
SEED = 1234

# indexed_gzip 1.10 zran.c export format (gzip-libs.md section 1.2); native endian = little here.
GZIDX_HEADER = struct.Struct("<5sBBQQIII")
GZIDX_POINT = struct.Struct("<QQBB")


def zinfo_to_gzidx(index: GzipIndex, *, blob_size: int, layer_size: int, last_window: bytes) -> bytes:
    """GZIDX v1 holding exactly our checkpoints, plus the EOF point indexed_gzip's own export adds.

    Checkpoint 0 goes in window-less (data_flag 0): indexed_gzip treats such a point as a stream
    start, which checkpoint 0 is.  Every other point carries its window, so indexed_gzip primes
    `bits` and sets the dictionary, as our reader does.  The compressed size must equal the
    blob's size or import fails (ZRAN_IMPORT_INCONSISTENT).  Without the EOF point (at
    `layer_size`, window = the layer's last 32 KiB) an imported index does not "cover" the last
    span and seeks there raise NotCoveredError; no read ever starts from it.
    """
    if len(last_window) != WINDOW_SIZE:
        raise ValueError(f"'last_window' must be {WINDOW_SIZE} bytes (got {len(last_window)})")
    cps = index.checkpoints
    spacing = max(index.span, WINDOW_SIZE + 1)  # import requires spacing > window size
    out = bytearray(GZIDX_HEADER.pack(b"GZIDX", 1, 0, blob_size, layer_size,
                                      min(spacing, 0xFFFFFFFF), WINDOW_SIZE, len(cps) + 1))
    for i, cp in enumerate(cps):
        out += GZIDX_POINT.pack(cp.in_offset, cp.out_offset, cp.bits, 0 if i == 0 else 1)
    out += GZIDX_POINT.pack(blob_size, layer_size, 0, 1)
    for cp in cps[1:]:
        out += cp.window
    out += last_window
    return bytes(out)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Reference:
    """The decompressed tar, read with os.pread (it may be several GB)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, length: int, offset: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


def _igzip_open(blob: Path, gzidx: Path) -> object:
    from indexed_gzip import _IndexedGzipFile

    # auto_build off: the imported index is complete; readbuf at the 1 MiB default.
    f = _IndexedGzipFile(str(blob), auto_build=False, skip_crc_check=True)
    f.import_index(str(gzidx))
    return f


def _igzip_read(f: object, length: int, offset: int) -> bytes:
    f.seek(offset)  # type: ignore[attr-defined]
    return bytes(f.read(length))  # type: ignore[attr-defined]


def _timed(read: Callable[[int, int], bytes], length: int, offset: int) -> tuple[float, bytes]:
    started = time.perf_counter()
    data = read(length, offset)
    return (time.perf_counter() - started) * 1e3, data


KEYS = ("ours_cold", "ours_cold_shared", "ours_warm",
        "igzip_cold", "igzip_cold_fresh", "igzip_warm")


def one_rep(blob: Path, index: GzipIndex, gzidx: Path, ref: Reference, offsets: list[int],
            layer_size: int, *, igzip_first: bool) -> dict[str, dict[str, float]]:
    """Latencies (ms) of both readers at `offsets` in every mode of KEYS, and wrong-read counts.

    Cold has two flavours per reader.  "fresh": a new reader per read (ours: new GzipSource and
    FileSource; indexed_gzip: new instance + import_index, outside the timer).  "shared": one
    reader for all reads (ours: cache_bytes=0, which keeps at most the last span, so random
    offsets still miss; indexed_gzip: its
    normal mode, where every read inflates again from the checkpoint).  The targets compare our
    fresh reads with indexed_gzip's shared ones, the flavour that is faster for each.
    Each reader runs as its own phase: interleaving them per read let indexed_gzip's 40 MB
    window import (page faults, cache churn) slow our next read down by about 40 %.
    """
    lat: dict[str, list[float]] = {k: [] for k in KEYS}
    wrong: dict[str, float] = dict.fromkeys(KEYS, 0)
    expected = {offset: ref.read(READ, offset) for offset in offsets}

    def record(key: str, read: Callable[[int, int], bytes], offset: int) -> None:
        ms, data = _timed(read, READ, offset)
        lat[key].append(ms)
        wrong[key] += data != expected[offset]

    def ours() -> None:
        for offset in offsets:
            src = GzipSource(FileSource(blob), index, size=layer_size)
            record("ours_cold", src.pread, offset)
            record("ours_warm", src.pread, offset)  # the span and its decoder are in the LRU
            src.close()
        shared = GzipSource(FileSource(blob), index, size=layer_size, cache_bytes=0)
        for offset in offsets:
            record("ours_cold_shared", shared.pread, offset)
        shared.close()

    def igzip() -> None:
        for offset in offsets:
            f = _igzip_open(blob, gzidx)
            record("igzip_cold_fresh", functools.partial(_igzip_read, f), offset)
            f.close()  # type: ignore[attr-defined]
        f = _igzip_open(blob, gzidx)
        read = functools.partial(_igzip_read, f)
        for offset in offsets:
            record("igzip_cold", read, offset)
            record("igzip_warm", read, offset)  # same region again: it re-inflates
        f.close()  # type: ignore[attr-defined]

    for phase in ((igzip, ours) if igzip_first else (ours, igzip)):
        phase()
    return {
        "p50": {k: percentile(v, 50) for k, v in lat.items()},
        "p99": {k: percentile(v, 99) for k, v in lat.items()},
        "wrong": wrong,
    }


def boundary_check(blob: Path, index: GzipIndex, gzidx: Path, ref: Reference,
                   layer_size: int, *, limit: int = 64) -> dict[str, int]:
    """Reads at, just before and across sampled checkpoints, by both readers; wrong-read counts."""
    rng = random.Random(SEED + 1)
    cps = list(index.checkpoints)
    sample = cps if len(cps) <= limit else rng.sample(cps, limit)
    offsets = sorted({o for cp in sample
                      for o in (cp.out_offset, cp.out_offset - 1000, cp.out_offset - READ // 2)
                      if 0 <= o <= layer_size - READ} | {0, layer_size - READ})
    src = GzipSource(FileSource(blob), index, size=layer_size, cache_bytes=0)
    f = _igzip_open(blob, gzidx)
    wrong = {"reads": len(offsets), "ours": 0, "igzip": 0}
    for offset in offsets:
        expected = ref.read(READ, offset)
        wrong["ours"] += src.pread(READ, offset) != expected
        wrong["igzip"] += _igzip_read(f, READ, offset) != expected
    src.close()
    f.close()  # type: ignore[attr-defined]
    return wrong


def run_bench(blob: Path, tar: Path, *, zinfo: Path | None, span: int, reps: int,
              reads: int) -> dict[str, object]:
    blob_size = blob.stat().st_size
    layer_size = tar.stat().st_size
    if zinfo is not None:
        index = load_index(zinfo)
    else:
        with open(blob, "rb") as f:
            index = build_index(f, span=span).index
    ref = Reference(tar)
    rng = random.Random(SEED)
    offsets = [rng.randrange(0, layer_size - READ + 1) for _ in range(reads)]
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        gzidx = Path(tmp) / "index.gzidx"
        last = ref.read(WINDOW_SIZE, max(0, layer_size - WINDOW_SIZE)).rjust(WINDOW_SIZE, b"\0")
        gzidx.write_bytes(zinfo_to_gzidx(index, blob_size=blob_size, layer_size=layer_size,
                                         last_window=last))
        with open(blob, "rb") as f:  # page cache: both readers see a warm blob file
            while f.read(8 << 20):
                pass
        # Alternate which reader goes first, so neither always runs on a fresher machine.
        runs = [one_rep(blob, index, gzidx, ref, offsets, layer_size, igzip_first=bool(i % 2))
                for i in range(reps)]
        boundary = boundary_check(blob, index, gzidx, ref, layer_size)
    ref.close()
    keys = KEYS
    summary = {
        stat: {k: statistics.median(r[stat][k] for r in runs) for k in keys}
        for stat in ("p50", "p99")
    }
    wrong = {k: sum(int(r["wrong"][k]) for r in runs) for k in keys}
    p50 = summary["p50"]
    return {
        "blob": str(blob), "tar": str(tar), "blob_size": blob_size, "layer_size": layer_size,
        "checkpoints": len(index), "span": index.span, "reads": reads, "reps": reps,
        "read_size": READ, "seed": SEED, "codec": getattr(gzsource, "CODEC_NAME", "?"),
        "summary_ms": summary, "runs": runs, "wrong_reads": wrong, "boundary": boundary,
        "targets": {
            "cold_p50_ratio": p50["ours_cold"] / p50["igzip_cold"],
            "cold_p50_ratio_ok": p50["ours_cold"] <= 0.7 * p50["igzip_cold"],
            "warm_p50_ok": p50["ours_warm"] <= 0.1,
        },
    }


def markdown(report: dict[str, object]) -> str:
    s = report["summary_ms"]
    t = report["targets"]
    w = report["wrong_reads"]
    b = report["boundary"]
    assert isinstance(s, dict) and isinstance(t, dict) and isinstance(w, dict)
    assert isinstance(b, dict)
    lines = [
        f"blob `{report['blob']}`: {report['blob_size']:,} B -> {report['layer_size']:,} B; "
        f"{report['checkpoints']} checkpoints, span {report['span']:,}; {report['reads']} reads "
        f"of {report['read_size']} B, seed {report['seed']}, median of {report['reps']} reps; "
        f"GzipSource codec {report['codec']}",
        "",
        "| reader | mode | p50 ms | p99 ms | wrong reads |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "ours_cold": ("GzipSource", "cold, fresh source per read"),
        "ours_cold_shared": ("GzipSource", "cold, one source, cache_bytes=0"),
        "ours_warm": ("GzipSource", "warm (span in LRU)"),
        "igzip_cold": ("indexed_gzip", "cold, one instance (re-inflates per read)"),
        "igzip_cold_fresh": ("indexed_gzip", "cold, fresh instance + import per read"),
        "igzip_warm": ("indexed_gzip", "warm (same 4 KiB again)"),
    }
    for key, (who, mode) in labels.items():
        lines.append(f"| {who} | {mode} | {s['p50'][key]:.3f} | {s['p99'][key]:.3f} | "
                     f"{int(w[key])} |")
    lines += [
        "",
        f"cold p50 ratio GzipSource fresh / indexed_gzip one-instance = "
        f"{t['cold_p50_ratio']:.2f} (target <= 0.70: "
        f"{'PASS' if t['cold_p50_ratio_ok'] else 'FAIL'}); warm p50 target <= 0.1 ms: "
        f"{'PASS' if t['warm_p50_ok'] else 'FAIL'}",
        f"boundary reads (at / 1000 B before / across checkpoints): {b['reads']}, wrong: "
        f"ours {b['ours']}, indexed_gzip {b['igzip']}",
    ]
    return "\n".join(lines)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
    t = text.strip().lower()
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * units[suffix])
    return int(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("blob", type=Path, help="the .tar.gz")
    parser.add_argument("--tar", type=Path,
                        help="its decompressed tar [default: the blob name without .gz]")
    parser.add_argument("--zinfo", type=Path, help="use these checkpoints [default: build_index]")
    parser.add_argument("--span", type=_size, default=4 << 20,
                        help="span when building the index (default 4MiB)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    tar = args.tar or args.blob.with_suffix("")
    if not tar.exists() or tar == args.blob:
        parser.error(f"{tar}: decompressed tar not found; pass --tar")
    report = run_bench(args.blob, tar, zinfo=args.zinfo, span=args.span, reps=args.reps,
                       reads=args.reads)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    wrong = report["wrong_reads"]
    boundary = report["boundary"]
    assert isinstance(wrong, dict) and isinstance(boundary, dict)
    return 1 if sum(wrong.values()) or boundary["ours"] or boundary["igzip"] else 0


if __name__ == "__main__":
    sys.exit(main())
