"""Cold read of every file of a gzip layer: `hybrid-erofs serve` (FUSE, or NBD + nbdfuse) under a
kernel EROFS mount, against `tar -xzf` of the same blob. Root only (mounts, drop_caches).
Medians of N runs, page cache dropped before each; prints seconds and the ratio tar / ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.mounting: the kernel_mount helper shared with the tests
from tests.mounting import kernel_mount  # noqa: E402

CHUNK = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _read_file(path: str) -> int:
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while data := os.read(fd, CHUNK):
            total += len(data)
    finally:
        os.close(fd)
    return total


def read_tree(root: Path, *, jobs: int) -> tuple[int, int]:
    """Read every regular file under `root` (walk order = name order); (files, bytes)."""
    paths: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                paths.append(path)
    if jobs <= 1:
        return len(paths), sum(map(_read_file, paths))
    with ThreadPoolExecutor(jobs) as pool:
        return len(paths), sum(pool.map(_read_file, paths, chunksize=64))


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        if path.exists():
            return
        time.sleep(0.05)
    raise SystemExit(f"{path} did not appear in {timeout_s}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def exported_disk(args: argparse.Namespace, work: Path) -> Iterator[Path]:
    """Start the server (and nbdfuse) fresh, so no decoded span survives from an earlier run."""
    serve = [sys.executable, "-m", "hybrid_erofs", "serve", "--meta", str(args.meta),
             "--zinfo", str(args.zinfo), str(args.layer)]
    fuse_dir = work / "fuse"
    fuse_dir.mkdir(exist_ok=True)
    if args.via == "fuse":
        server = subprocess.Popen([*serve, "--fuse", str(fuse_dir)], stdout=subprocess.DEVNULL)
        try:
            _wait_for(fuse_dir / "disk.img", server)
            yield fuse_dir / "disk.img"
        finally:
            _stop(server)
        return
    sock = work / "disk.sock"
    server = subprocess.Popen([*serve, "--socket", str(sock)], stdout=subprocess.DEVNULL)
    nbdfuse: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(sock, server)
        nbdfuse = subprocess.Popen(["nbdfuse", "-r", str(fuse_dir / "disk.img"), "--unix",
                                    str(sock)])
        _wait_for(fuse_dir / "disk.img", nbdfuse)
        yield fuse_dir / "disk.img"
    finally:
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
        if nbdfuse is not None:
            nbdfuse.wait(30)
        _stop(server)


def _bdi_read_ahead(disk: Path, read_ahead_kb: int | None) -> None:
    if read_ahead_kb is None:
        return
    st_dev = os.stat(disk.parent).st_dev
    Path(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb").write_text(
        f"{read_ahead_kb}\n")


def run_ours(args: argparse.Namespace, work: Path) -> dict[str, float]:
    with exported_disk(args, work) as disk:
        _bdi_read_ahead(disk, args.read_ahead_kb)
        drop_caches()
        started = time.perf_counter()
        with kernel_mount(disk, work / "mnt", via=args.mount) as mnt:
            files, size = read_tree(mnt, jobs=args.jobs)
        elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "files": files, "bytes": size}


def run_tar(args: argparse.Namespace, work: Path) -> dict[str, float]:
    out = work / "extract"
    out.mkdir()
    try:
        drop_caches()
        started = time.perf_counter()
        subprocess.run(["tar", "-xzf", str(args.layer), "-C", str(out)], check=True)
        # Written data still sits in the page cache: count the flush, as ours has nothing to write.
        os.sync()
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": elapsed}


def median_of(runs: int, label: str, fn: Callable[[], dict[str, float]]) -> dict[str, object]:
    results = []
    for i in range(runs):
        result = fn()
        print(f"{label} run {i + 1}: {result['seconds']:.2f}s", file=sys.stderr)
        results.append(result)
    seconds = [r["seconds"] for r in results]
    return {"median_s": statistics.median(seconds), "runs_s": seconds, **results[-1]}


def _default(layer: Path, suffix: str) -> Path:
    return layer.with_name(layer.name.removesuffix(".tar.gz") + suffix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=Path, default=ROOT / "bench-data" / "usr.tar.gz",
                        help="gzip layer [default: bench-data/usr.tar.gz]")
    parser.add_argument("--zinfo", type=Path, help="[default: LAYER's stem + .zinfo]")
    parser.add_argument("--meta", type=Path, help="[default: LAYER's stem + .meta.erofs]")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--via", choices=["fuse", "nbdfuse"], default="fuse",
                        help="serve --fuse, or serve --socket + nbdfuse")
    parser.add_argument("--mount", choices=["file", "loop"], default="file",
                        help="file-backed mount(2) or a loop device")
    parser.add_argument("--jobs", type=int, default=1, help="parallel file readers")
    parser.add_argument("--read-ahead-kb", type=int, default=None,
                        help="set the FUSE mount's bdi readahead (serve --fuse sets 1024 itself)")
    parser.add_argument("--skip-tar", action="store_true", help="only measure ours")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (kernel mounts, drop_caches)")
    args.zinfo = args.zinfo or _default(args.layer, ".zinfo")
    args.meta = args.meta or _default(args.layer, ".meta.erofs")
    for path in (args.layer, args.zinfo, args.meta):
        if not path.is_file():
            parser.error(f"{path}: missing (hybrid-erofs index LAYER -o ZINFO --meta META)")

    with tempfile.TemporaryDirectory(prefix="bench-tree-", dir=args.layer.parent) as tmp:
        work = Path(tmp)
        report: dict[str, object] = {
            "layer": str(args.layer), "blob_bytes": args.layer.stat().st_size,
            "via": args.via, "mount": args.mount, "jobs": args.jobs, "runs": args.runs,
            "ours": median_of(args.runs, f"ours ({args.via}, {args.mount})",
                              lambda: run_ours(args, work)),
        }
        if not args.skip_tar:
            report["tar_xzf"] = median_of(args.runs, "tar -xzf", lambda: run_tar(args, work))
    ours = report["ours"]
    assert isinstance(ours, dict)
    line = (f"ours: {ours['median_s']:.2f}s for {ours['files']} files, "
            f"{ours['bytes'] / 1e6:.0f} MB ({ours['bytes'] / 1e6 / ours['median_s']:.0f} MB/s)")
    if "tar_xzf" in report:
        tar = report["tar_xzf"]
        assert isinstance(tar, dict)
        report["ratio_tar_over_ours"] = tar["median_s"] / ours["median_s"]
        line += (f"; tar -xzf: {tar['median_s']:.2f}s; ours is "
                 f"{report['ratio_tar_over_ours']:.2f}x as fast")
    print(line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
