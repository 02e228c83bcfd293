"""Whole-image indexing against layer-by-layer indexing: wall time of one
`hybrid-erofs index REF --all-layers` (default --jobs and --jobs 1) against the sum of one
`hybrid-erofs index REF --layer N --aufs` per layer; medians of N interleaved repetitions.

The input is an OCI layout: given (--layout oci:DIR:TAG) or built once from a directory tree
split into layers of different sizes (--tree, default /usr), cached under bench-data/.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hybrid_erofs.cli.options import parse_size

ROOT = Path(__file__).resolve().parent.parent
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TAG = "bench"
MTIME = "2024-01-01 00:00:00Z"


# --- building the layout -----------------------------------------------------------------------

def split_tree(root: Path, layers: int, *, max_size: int | None) -> list[list[str]]:
    """Names (relative to root's parent, parents first) of each layer: contiguous runs of the
    sorted tree whose file bytes are in the ratio 2^(layers-1) : ... : 2 : 1."""
    entries: list[tuple[str, int]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        # Symlinks to directories come in dirnames; os.walk does not descend into them.
        names = sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))])
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                size = os.lstat(path).st_size
            except OSError:
                continue
            entries.append((os.path.relpath(path, root.parent), size))
            total += size
            if max_size is not None and total >= max_size:
                break
        if max_size is not None and total >= max_size:
            break
    weights = [1 << (layers - 1 - i) for i in range(layers)]
    bounds = [total * sum(weights[:i + 1]) / sum(weights) for i in range(layers)]
    groups: list[list[str]] = [[] for _ in range(layers)]
    done = 0
    current = 0
    for i, (name, size) in enumerate(entries):
        # Move on at a size bound, or when only one entry per remaining layer is left.
        while current < layers - 1 and groups[current] and (
                done >= bounds[current] or len(entries) - i <= layers - 1 - current):
            current += 1
        groups[current].append(name)
        done += size
    out: list[list[str]] = []
    for names in groups:
        ancestors: set[str] = set()
        for name in names:
            parent = os.path.dirname(name)
            while parent and parent not in ancestors:
                ancestors.add(parent)
                parent = os.path.dirname(parent)
        out.append(sorted(ancestors) + names)
    return out


def _pump(src: IO[bytes], dst: IO[bytes], digest: hashlib._Hash) -> int:
    size = 0
    while block := src.read(1 << 20):
        digest.update(block)
        dst.write(block)
        size += len(block)
    return size


def write_layer(parent: Path, names: list[str], blob: Path, *, compressor: str) -> tuple[str, int]:
    """Tar `names` (GNU tar, fixed owner and mtime) and gzip it into `blob`; return the
    diff_id and the layer data size."""
    with tempfile.NamedTemporaryFile("wb", suffix=".list") as listing:
        listing.write(b"".join(os.fsencode(n) + b"\0" for n in names))
        listing.flush()
        tar = subprocess.Popen(
            ["tar", "-C", str(parent), "--no-recursion", "--null", "--verbatim-files-from",
             "-T", listing.name, "--numeric-owner", "--owner=0", "--group=0",
             f"--mtime={MTIME}", "--format=pax", "--ignore-failed-read",
             "--pax-option=delete=atime,delete=ctime", "-cf", "-"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert tar.stdout is not None
        digest = hashlib.sha256()
        with open(blob, "wb") as out:
            if compressor == "pigz":
                pigz = subprocess.Popen(["pigz", "-6", "-n", "-c"], stdin=subprocess.PIPE,
                                        stdout=out)
                assert pigz.stdin is not None
                size = _pump(tar.stdout, pigz.stdin, digest)
                pigz.stdin.close()
                if pigz.wait() != 0:
                    raise RuntimeError(f"{blob}: pigz failed")
            else:
                with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
                    size = _pump(tar.stdout, gz, digest)  # type: ignore[arg-type]
        if tar.wait() not in (0, 1):  # 1: some file changed or vanished while read
            raise RuntimeError(f"{blob}: tar failed (exit {tar.returncode})")
    return "sha256:" + digest.hexdigest(), size


def _blob(layout: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def build_layout(tree: Path, layout: Path, *, layers: int, max_size: int | None,
                 compressor: str) -> str:
    """Write a single-platform OCI layout of `tree` at `layout` unless a finished one is there
    (`bench-layout.json` is written last); return `oci:LAYOUT:bench`."""
    marker = layout / "bench-layout.json"
    params = {"tree": str(tree), "layers": layers, "max_size": max_size, "gzip": compressor}
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return f"oci:{layout}:{TAG}"
    shutil.rmtree(layout, ignore_errors=True)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descriptors, diff_ids, sizes = [], [], []
    for i, names in enumerate(split_tree(tree, layers, max_size=max_size)):
        started = time.perf_counter()
        part = layout / f"layer-{i}.part"
        diff_id, size = write_layer(tree.parent, names, part, compressor=compressor)
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        blob_size = part.stat().st_size
        part.rename(layout / "blobs" / "sha256" / digest.hexdigest())
        descriptors.append({"mediaType": GZIP_LAYER, "digest": f"sha256:{digest.hexdigest()}",
                            "size": blob_size})
        diff_ids.append(diff_id)
        sizes.append(size)
        print(f"layer {i}: {len(names)} entries, {size:,} B -> {blob_size:,} B "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": _blob(layout, json.dumps(config).encode(), OCI_CONFIG),
                "layers": descriptors}
    entry = _blob(layout, json.dumps(manifest).encode(), OCI_MANIFEST)
    entry["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    (layout / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}))
    marker.write_text(json.dumps({"params": params, "layer_sizes": sizes}) + "\n")
    return f"oci:{layout}:{TAG}"


# --- timing ------------------------------------------------------------------------------------

@dataclass
class Method:
    """One timed command (or, for the sum row, a sequence of commands timed as one)."""

    name: str
    notes: str
    run: Callable[[Path], None]
    times_s: list[float] = field(default_factory=list)
    error: str | None = None


def _sh(argv: list[str]) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)


def _layers(cli: list[str], ref: str, extra: list[str]) -> list[dict[str, object]]:
    proc = subprocess.run([*cli, "inspect", ref, "--json", *extra], capture_output=True,
                          check=True, text=True)
    layers = json.loads(proc.stdout)["layers"]
    assert isinstance(layers, list)
    return layers


def _warm(layout: Path, layers: list[dict[str, object]]) -> None:
    """Read every blob once so each method starts with them in the page cache."""
    for layer in layers:
        with open(layout / "blobs" / "sha256" / str(layer["digest"]).split(":", 1)[1], "rb") as f:
            while f.read(8 << 20):
                pass


def methods_for(cli: list[str], ref: str, count: int, *, extra: list[str],
                jobs: int | None, per_layer: dict[int, list[float]]) -> list[Method]:
    all_layers = [*cli, "index", ref, "--all-layers", "--min-layer-size", "0", "--no-progress",
                  *extra]

    def whole(jobs_args: list[str]) -> Callable[[Path], None]:
        return lambda out: _sh([*all_layers, "-o", str(out / "all"), *jobs_args])

    def singles(out: Path) -> None:
        (out / "single").mkdir()
        for n in range(count):
            started = time.perf_counter()
            _sh([*cli, "index", ref, "--layer", str(n), "-o", str(out / "single" / f"{n}.zinfo"),
                 "--meta", str(out / "single" / f"{n}.erofs"), "--aufs", "--no-progress",
                 *extra])
            per_layer.setdefault(n, []).append(time.perf_counter() - started)

    methods = [
        Method("index --all-layers", "default --jobs (CPUs, at most 4)", whole([])),
        Method("index --all-layers --jobs 1", "one layer at a time, one process", whole(["--jobs", "1"])),
        Method(f"sum of {count} x index --layer N --aufs", f"{count} processes, one after another",
               singles),
        Method("hybrid-erofs --help", "interpreter + CLI start-up, once",
               lambda out: _sh([*cli, "--help"])),
    ]
    if jobs is not None:
        methods.insert(2, Method(f"index --all-layers --jobs {jobs}", "", whole(["--jobs", str(jobs)])))
    return methods


def run_bench(ref: str, *, cli: list[str], reps: int, jobs: int | None, platform_arg: str | None,
              keep: Path | None) -> dict[str, object]:
    extra = ["--platform", platform_arg] if platform_arg else []
    layers = _layers(cli, ref, extra)
    layout = Path(ref.removeprefix("oci:").partition(":")[0])
    if layout.is_dir():
        _warm(layout, layers)
    per_layer: dict[int, list[float]] = {}
    methods = methods_for(cli, ref, len(layers), extra=extra, jobs=jobs, per_layer=per_layer)
    work = Path(tempfile.mkdtemp(prefix="bench-all-layers-", dir=keep))
    # Interleave repetitions so slow phases of a noisy VM hit every method alike.
    for rep in range(reps):
        for m in methods:
            if m.error:
                continue
            out = work / f"{rep}-{methods.index(m)}"
            out.mkdir()
            started = time.perf_counter()
            try:
                m.run(out)
            except subprocess.CalledProcessError as exc:
                m.error = (exc.stderr or b"").decode(errors="replace").strip()[-300:] or str(exc)
                continue
            m.times_s.append(time.perf_counter() - started)
            if keep is None and rep < reps - 1:
                shutil.rmtree(out)
    layer_sizes = _layer_data_sizes(work, len(layers))
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    known = [size for size in layer_sizes if size is not None]
    total = sum(known) if len(known) == len(layer_sizes) else None
    by_name = {m.name: m for m in methods}
    base = by_name[f"sum of {len(layers)} x index --layer N --aufs"]
    base_s = statistics.median(base.times_s) if base.times_s else None
    rows: list[dict[str, object]] = []
    for m in methods:
        median = statistics.median(m.times_s) if m.times_s else None
        is_startup = m.name == "hybrid-erofs --help"
        rows.append({
            "method": m.name, "notes": m.notes, "error": m.error,
            "times_s": [round(t, 4) for t in m.times_s], "median_s": median,
            "mb_per_s": total / median / 1e6 if median and total and not is_startup else None,
            "vs_sum_of_singles": median / base_s if median and base_s and not is_startup else None,
        })
    layer_rows = [{"layer": n, "blob_size": layers[n]["size"], "layer_size": layer_sizes[n],
                   "median_s": statistics.median(per_layer[n]) if per_layer.get(n) else None}
                  for n in range(len(layers))]
    return {
        "reference": ref, "layers": layer_rows, "reps": reps, "layer_data_total": total,
        "blob_total": sum(int(str(x["size"])) for x in layers), "rows": rows,
        "machine": f"{platform.node()} {os.cpu_count()} cpu", "python": platform.python_version(),
        "cli": shlex.join(cli),
    }


def _layer_data_sizes(work: Path, count: int) -> list[int | None]:
    """Layer data sizes from the single-layer runs' zinfo sidecars (any repetition)."""
    sizes: list[int | None] = []
    for n in range(count):
        found = sorted(work.glob(f"*/single/{n}.zinfo.json"))
        sizes.append(int(json.loads(found[-1].read_text())["layer_size"]) if found else None)
    return sizes


def markdown(report: dict[str, object]) -> str:
    rows, layers = report["rows"], report["layers"]
    assert isinstance(rows, list) and isinstance(layers, list)
    total = report["layer_data_total"]
    lines = [
        f"image `{report['reference']}`: {len(layers)} layers, {report['blob_total']:,} B of blobs, "
        + (f"{total:,} B of layer data" if isinstance(total, int) else "layer data size unknown")
        + f"; median of {report['reps']}; {report['machine']}, Python {report['python']}",
        "",
        "| method | median s | MB/s | vs sum of single-layer runs | notes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['method']} | error | | | {r['error'][:160]} |")
            continue
        lines.append(f"| {r['method']} | {r['median_s']:.3f} | "
                     + ("" if r["mb_per_s"] is None else f"{r['mb_per_s']:.0f}") + " | "
                     + ("" if r["vs_sum_of_singles"] is None
                        else f"{r['vs_sum_of_singles']:.2f}x") + f" | {r['notes']} |")
    lines += ["", "| layer | blob B | layer data B | index --layer N median s |", "|---|---|---|---|"]
    for layer in layers:
        median = layer["median_s"]
        lines.append(f"| {layer['layer']} | {layer['blob_size']:,} | "
                     + (f"{layer['layer_size']:,}" if layer["layer_size"] is not None else "?")
                     + " | " + ("" if median is None else f"{median:.3f}") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--layout", help="an existing image, oci:DIR:TAG (skips building one)")
    source.add_argument("--tree", type=Path, default=Path("/usr"),
                        help="directory to split into layers (default /usr)")
    parser.add_argument("--layers", type=int, default=5, help="layers to split --tree into (default 5)")
    parser.add_argument("--max-size", type=parse_size, help="use only the first SIZE of file bytes of --tree")
    parser.add_argument("--gzip", choices=["pigz", "python"],
                        default="pigz" if shutil.which("pigz") else "python",
                        help="compressor, level 6 (default pigz when installed)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "bench-data" / "all-layers",
                        help="where built layouts are cached (default bench-data/all-layers)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per method (default 3)")
    parser.add_argument("--jobs", type=int, help="also time --all-layers --jobs N")
    parser.add_argument("--platform", help="platform of a multi-platform --layout")
    parser.add_argument("--cli", default=f"{shlex.quote(sys.executable)} -m hybrid_erofs",
                        help="the hybrid-erofs command (default: this Python's -m hybrid_erofs)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here ('-': stdout)")
    parser.add_argument("--keep", type=Path, help="keep the outputs under this directory")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"'--reps' must be >= 1 (got {args.reps})")
    if not 1 <= args.layers <= 16:
        parser.error(f"'--layers' must be between 1 and 16 (got {args.layers})")
    ref = args.layout
    if ref is None:
        tree = args.tree.resolve()
        slug = (f"{str(tree).strip('/').replace('/', '_') or 'root'}-{args.layers}l-"
                f"{args.max_size or 'all'}-{args.gzip}")
        ref = build_layout(tree, args.data_dir / slug, layers=args.layers,
                           max_size=args.max_size, compressor=args.gzip)
    report = run_bench(ref, cli=shlex.split(args.cli), reps=args.reps, jobs=args.jobs,
                       platform_arg=args.platform, keep=args.keep)
    if args.json and str(args.json) == "-":
        print(json.dumps(report, indent=1))
        return 0
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
