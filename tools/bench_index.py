"""Index-building throughput on one gzip layer: our build_index / CLI against mkfs.erofs-oracle,
indexed_gzip, gztool and zcat; medians of N interleaved repetitions, MB/s of uncompressed data.
Also checks that our zinfo equals the oracle's, checkpoint for checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_erofs.cli.options import parse_size
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import GzipIndex, load_index, write_index


@dataclass
class Method:
    """One way of indexing (or just decompressing) the layer, timed as a whole."""

    name: str
    run: Callable[[], None]
    kind: str  # "in-process" or "process"
    notes: str = ""
    times_s: list[float] = field(default_factory=list)
    error: str | None = None


def _sh(argv: list[str], *, stdout: int | None = subprocess.DEVNULL) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, check=True)
    return run


def _warm(path: Path) -> None:
    """Read the blob once so every method starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def methods_for(layer: Path, work: Path, span: int, *, every_member: bool) -> list[Method]:
    """All methods, each writing its index into `work` (overwritten every repetition)."""
    ours = work / "ours.zinfo"
    mib = max(1, span >> 20)

    def build(engine: str) -> Callable[[], None]:
        def run() -> None:
            with open(layer, "rb") as f:
                result = build_index(f, span=span, engine=engine, every_member=every_member)
            write_index(result.index, ours if engine == "auto" else work / f"{engine}.zinfo")
        return run

    def igzip() -> None:
        from indexed_gzip import _IndexedGzipFile

        f = _IndexedGzipFile(str(layer), spacing=span, readbuf_size=1 << 20)
        try:
            f.build_full_index()
            f.export_index(str(work / "igzip.gzidx"))
        finally:
            f.close()

    cli = [sys.executable, "-m", "hybrid_erofs", "index", str(layer), "--span", str(span),
           "-o", str(work / "cli.zinfo")]
    if every_member:
        cli.append("--every-member")
    methods = [
        Method("build_index (engine auto)", build("auto"), "in-process", "build + write zinfo"),
        Method("build_index (engine zlib)", build("zlib"), "in-process", "system libz via ctypes"),
        Method("hybrid-erofs index (zinfo only)", _sh([*cli, "--no-meta"]), "process",
               "includes interpreter start-up"),
        Method("hybrid-erofs index --meta", _sh([*cli, "--meta", str(work / "cli.erofs")]),
               "process", "zinfo + EROFS meta in one pass"),
        Method("mkfs.erofs-oracle --tar=i --gzinfo", _sh(
            ["mkfs.erofs-oracle", "--quiet", "--tar=i", f"--gzinfo={work / 'oracle.zinfo'}",
             str(work / "oracle.erofs"), str(layer)]), "process",
            "C; also builds meta; span fixed at 4 MiB"),
        Method("indexed_gzip build_full_index + export", igzip, "in-process",
               "readbuf 1 MiB"),
        Method(f"gztool -z -i -s {mib}", _sh(
            ["gztool", "-z", "-i", "-f", "-v", "0", "-s", str(mib),
             "-I", str(work / "gztool.gzi"), str(layer)]), "process",
            "windows zlib-compressed; -z: no line numbers"),
        Method("zcat > /dev/null", _sh(["gzip", "-dc", str(layer)]), "process", "gzip 1.12"),
        Method("pigz -dc > /dev/null", _sh(["pigz", "-dc", str(layer)]), "process", ""),
    ]
    return [m for m in methods if shutil.which(_tool(m)) is not None or m.kind == "in-process"]


def _tool(method: Method) -> str:
    first = method.name.split()[0]
    return {"zcat": "gzip", "hybrid-erofs": sys.executable}.get(first, first)


def _header_end(blob: bytes, start: int) -> int | None:
    """Offset just past a gzip member header starting at `start` (RFC 1952 section 2.3), or None."""
    if blob[start:start + 3] != b"\x1f\x8b\x08" or len(blob) < start + 10:
        return None
    flags, at = blob[start + 3], start + 10
    if flags & 0x04:  # FEXTRA
        at += 2 + int.from_bytes(blob[at:at + 2], "little")
    for bit in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            nul = blob.find(b"\x00", at)
            if nul < 0:
                return None
            at = nul + 1
    return at + 2 if flags & 0x02 else at  # FHCRC


def member_starts(blob: bytes) -> set[int]:
    """Compressed offsets where a member's deflate data begins (after its header)."""
    starts, at = set(), 0
    while (end := _header_end(blob, at)) is not None:
        starts.add(end)
        d = zlib.decompressobj(-15)
        d.decompress(blob[end:])
        if not d.eof:
            break
        at = len(blob) - len(d.unused_data) + 8  # skip the CRC32 + ISIZE trailer
    return starts


def compare(ours: GzipIndex, oracle: GzipIndex, starts: set[int]) -> dict[str, object]:
    """Checkpoint-by-checkpoint comparison.

    Window 0 is skipped (erofs copies a malloc'd buffer there), and windows at member starts
    are counted apart: erofs-utils 1.9 writes a stale ring buffer there, which no decoder reads.
    """
    tuples_equal = windows_equal = member_start_windows_differ = 0
    first_diff: str | None = None
    for i, (a, b) in enumerate(zip(ours.checkpoints, oracle.checkpoints, strict=False)):
        same = (a.in_offset, a.out_offset, a.bits) == (b.in_offset, b.out_offset, b.bits)
        tuples_equal += same
        window_same = i == 0 or a.window == b.window
        if i >= 1 and not window_same and a.in_offset in starts and a.bits == 0:
            member_start_windows_differ += 1
            window_same = True
        windows_equal += i >= 1 and window_same
        if first_diff is None and not (same and window_same):
            first_diff = (f"#{i}: ours ({a.in_offset}, {a.out_offset}, {a.bits}), oracle "
                          f"({b.in_offset}, {b.out_offset}, {b.bits})"
                          + ("" if window_same else ", window differs"))
    pairs = min(len(ours), len(oracle))
    return {
        "equal": len(ours) == len(oracle) and tuples_equal == pairs
        and windows_equal == max(0, pairs - 1),
        "ours_checkpoints": len(ours),
        "oracle_checkpoints": len(oracle),
        "tuples_equal": tuples_equal,
        "windows_equal_after_first": windows_equal,
        "member_start_windows_differ": member_start_windows_differ,
        "nonzero_bits": sum(1 for c in ours.checkpoints if c.bits),
        "first_difference": first_diff,
        "oracle_window0_zero": bool(oracle.checkpoints) and not any(oracle.checkpoints[0].window),
    }


def run_bench(layer: Path, *, span: int, reps: int, every_member: bool | None,
              keep: Path | None) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-index-", dir=keep))
    with open(layer, "rb") as f:
        probe = build_index(f, span=span)  # also warms the page cache
    layer_size, members = probe.layer_size, probe.members
    if every_member is None:
        every_member = members > 1  # erofs' rule, so the comparison with it is meaningful
    methods = methods_for(layer, work, span, every_member=every_member)
    _warm(layer)
    # Interleave repetitions so slow phases of a noisy VM hit every method alike.
    for _ in range(reps):
        for m in methods:
            if m.error:
                continue
            started = time.perf_counter()
            try:
                m.run()
            except subprocess.CalledProcessError as exc:
                m.error = (exc.stderr or b"").decode(errors="replace").strip()[-300:] or str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a broken method is reported, not fatal
                m.error = f"{type(exc).__name__}: {exc}"
                continue
            m.times_s.append(time.perf_counter() - started)
    rows: list[dict[str, object]] = []
    by_name = {m.name: m for m in methods}
    oracle = by_name.get("mkfs.erofs-oracle --tar=i --gzinfo")
    oracle_s = statistics.median(oracle.times_s) if oracle and oracle.times_s else None
    for m in methods:
        median = statistics.median(m.times_s) if m.times_s else None
        rows.append({
            "method": m.name, "kind": m.kind, "notes": m.notes, "error": m.error,
            "times_s": [round(t, 4) for t in m.times_s],
            "median_s": median,
            "mb_per_s": layer_size / median / 1e6 if median else None,
            "vs_oracle": oracle_s / median if median and oracle_s else None,
        })
    zinfo_only = by_name["hybrid-erofs index (zinfo only)"]
    with_meta = by_name["hybrid-erofs index --meta"]
    meta_ratio = (statistics.median(with_meta.times_s) / statistics.median(zinfo_only.times_s)
                  if with_meta.times_s and zinfo_only.times_s else None)
    comparison: dict[str, object] = {"available": False}
    if (work / "oracle.zinfo").exists() and (work / "ours.zinfo").exists():
        starts = member_starts(layer.read_bytes()) if members > 1 else set()
        comparison = {"available": True, **compare(load_index(work / "ours.zinfo"),
                                                    load_index(work / "oracle.zinfo"), starts)}
        comparison["byte_identical"] = ((work / "ours.zinfo").read_bytes()
                                        == (work / "oracle.zinfo").read_bytes())
        if span != 4 << 20:
            comparison["note"] = "oracle span is fixed at 4 MiB; ours used --span"
    sizes = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "layer": str(layer), "blob_size": layer.stat().st_size, "layer_size": layer_size,
        "members": members, "span": span, "every_member": every_member, "reps": reps,
        "engine_auto": probe.engine, "machine": f"{platform.node()} {os.cpu_count()} cpu",
        "python": platform.python_version(), "rows": rows,
        "meta_over_zinfo_only": meta_ratio, "output_sizes": sizes, "oracle_comparison": comparison,
    }


def markdown(report: dict[str, object]) -> str:
    rows = report["rows"]
    assert isinstance(rows, list)
    lines = [
        f"layer `{report['layer']}`: {report['blob_size']:,} B blob, {report['layer_size']:,} B "
        f"layer data, {report['members']} member(s); span {report['span']:,}; "
        f"median of {report['reps']}; engine auto = {report['engine_auto']}",
        "",
        "| method | kind | median s | MB/s | vs oracle | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['method']} | {r['kind']} | error | | | {r['error'][:120]} |")
            continue
        lines.append(f"| {r['method']} | {r['kind']} | {r['median_s']:.3f} | "
                     f"{r['mb_per_s']:.0f} | "
                     f"{'' if r['vs_oracle'] is None else format(r['vs_oracle'], '.2f') + 'x'} | "
                     f"{r['notes']} |")
    ratio = report["meta_over_zinfo_only"]
    lines.append("")
    lines.append("meta+zinfo / zinfo-only time (CLI): "
                 + ("n/a" if ratio is None else f"{ratio:.2f}"))
    comp = report["oracle_comparison"]
    assert isinstance(comp, dict)
    if comp.get("available"):
        lines.append(
            f"zinfo vs oracle: equal={comp['equal']} byte_identical={comp['byte_identical']} "
            f"checkpoints {comp['ours_checkpoints']}/{comp['oracle_checkpoints']}, "
            f"tuples equal {comp['tuples_equal']}, windows equal after #0 "
            f"{comp['windows_equal_after_first']} (of which member-start windows that differ, "
            f"ignored: {comp['member_start_windows_differ']}), bits!=0 {comp['nonzero_bits']}"
            + (f"; first difference {comp['first_difference']}" if comp["first_difference"] else "")
            + (f"; {comp['note']}" if comp.get("note") else ""))
    else:
        lines.append("zinfo vs oracle: not available")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layer", type=Path, help="a .tar.gz (e.g. bench-data/usr.tar.gz)")
    parser.add_argument("--span", type=parse_size, default=4 << 20, help="default 4MiB")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per method (default 3)")
    parser.add_argument("--every-member", action=argparse.BooleanOptionalAction, default=None,
                        help="erofs' per-member rule for our builder [default: when >1 member]")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here ('-': stdout)")
    parser.add_argument("--keep", type=Path, help="keep the index files under this directory")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"'--reps' must be >= 1 (got {args.reps})")
    report = run_bench(args.layer, span=args.span, reps=args.reps,
                       every_member=args.every_member, keep=args.keep)
    if args.json and str(args.json) == "-":
        print(json.dumps(report, indent=1))
        return 0
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
