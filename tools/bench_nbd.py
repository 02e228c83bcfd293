"""nbdcopy throughput (MB/s, median of N runs) from our NBD server vs `nbdkit file` on the same
meta || tar disk file, then our server over the gzip layer through open_device(); prints a
markdown table and the ours/nbdkit ratio (target >= 0.8).

    python tools/bench_nbd.py [--size-mib 512] [--runs 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BUILD_TIME = 1_700_000_000


def make_inputs(workdir: Path, size_mib: int) -> dict[str, Path]:
    """layer.tar (half random, half compressible), its gzip + zinfo, meta.erofs, disk.img."""
    from hybrid_erofs.erofs.writer import MetaBuilder
    from hybrid_erofs.indexing.layer import index_layer

    paths = {n: workdir / n for n in ("layer.tar", "layer.tar.gz", "layer.zinfo", "meta.erofs",
                                      "disk.img")}
    if all(p.exists() for p in paths.values()):
        return paths
    rng = random.Random(1)
    with tarfile.open(paths["layer.tar"], "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(size_mib // 8):
            if i % 2:
                data = rng.randbytes(8 << 20)
            else:
                data = b"".join(b"%08d some fairly compressible log line\n" % j
                                for j in range((8 << 20) // 45 + 1))[: 8 << 20]
            info = tarfile.TarInfo(f"data/file{i:04}.bin")
            info.size, info.mtime = len(data), BUILD_TIME
            tar.addfile(info, io.BytesIO(data))
    builder = MetaBuilder(build_time=BUILD_TIME)
    with open(paths["layer.tar"], "rb") as f:
        while chunk := f.read(8 << 20):
            builder.feed(chunk)
    paths["meta.erofs"].write_bytes(builder.finish())
    with open(paths["disk.img"], "wb") as out:
        for part in ("meta.erofs", "layer.tar"):
            with open(paths[part], "rb") as src:
                shutil.copyfileobj(src, out, 8 << 20)
    subprocess.run(["gzip", "-1", "-n", "-k", "-f", str(paths["layer.tar"])], check=True)
    index_layer(str(paths["layer.tar.gz"]), zinfo=paths["layer.zinfo"], meta=None)
    return paths


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        if path.exists() and subprocess.run(
                ["nbdinfo", "--size", f"nbd+unix:///?socket={path}"],
                capture_output=True).returncode == 0:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server for {path} did not start (rc {proc.poll()})")
        time.sleep(0.1)


@contextlib.contextmanager
def server(cmd: list[str], sock: Path) -> Iterator[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def time_copy(uri: str, runs: int, size: int, extra: list[str]) -> list[float]:
    """MB/s of `nbdcopy URI null:` per run, after one warm-up run."""
    rates = []
    for i in range(runs + 1):
        start = time.perf_counter()
        subprocess.run(["nbdcopy", *extra, uri, "null:"], check=True)
        elapsed = time.perf_counter() - start
        if i:
            rates.append(size / elapsed / 1e6)
    return rates


def serve_main(argv: list[str]) -> None:
    """`bench_nbd.py _serve SOCK disk.img` or `_serve SOCK layer.tar.gz META ZINFO`."""
    from hybrid_erofs.device import open_device
    from hybrid_erofs.export.nbd import serve_nbd
    from hybrid_erofs.source import ByteSource, FileSource

    sock = Path(argv[0])
    device: ByteSource
    if len(argv) == 2:
        device = FileSource(argv[1])
    else:
        device = open_device(argv[1], meta=Path(argv[2]), zinfo=Path(argv[3]))
    try:
        serve_nbd(device, socket_path=sock)
    finally:
        device.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--nbdcopy-args", default="", help="extra nbdcopy args, space-separated")
    args = parser.parse_args()
    for tool in ("nbdcopy", "nbdinfo", "nbdkit", "gzip"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_nbd: {tool} is not installed")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-nbd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = make_inputs(workdir, args.size_mib)
    size = paths["disk.img"].stat().st_size
    extra = args.nbdcopy_args.split()
    me = [sys.executable, str(Path(__file__).resolve()), "_serve"]
    setups = [
        ("nbdkit file (disk.img)", ["nbdkit", "--foreground", "--readonly", "--unix",
                                    str(workdir / "kit.sock"), "file", str(paths["disk.img"])],
         workdir / "kit.sock"),
        ("hybrid-erofs FileSource (disk.img)", [*me, str(workdir / "ours.sock"),
                                                str(paths["disk.img"])], workdir / "ours.sock"),
        ("hybrid-erofs open_device (meta + gzip layer)",
         [*me, str(workdir / "gz.sock"), str(paths["layer.tar.gz"]), str(paths["meta.erofs"]),
          str(paths["layer.zinfo"])], workdir / "gz.sock"),
    ]
    results: dict[str, list[float]] = {}
    for label, cmd, sock in setups:
        with server(cmd, sock) as uri:
            results[label] = time_copy(uri, args.runs, size, extra)
    print(f"\nnbdcopy {' '.join(extra)} URI null: — {size / 1e6:.0f} MB device, "
          f"median of {args.runs} runs, {os.cpu_count()} CPUs\n")
    print("| server | median MB/s | min | max |")
    print("|---|---:|---:|---:|")
    for label, rates in results.items():
        print(f"| {label} | {statistics.median(rates):.0f} | {min(rates):.0f} | "
              f"{max(rates):.0f} |")
    kit = statistics.median(results[setups[0][0]])
    ours = statistics.median(results[setups[1][0]])
    print(f"\nratio ours/nbdkit (same file): {ours / kit:.2f}x (target >= 0.8x)")
    print(f"inputs kept in {workdir}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_main(sys.argv[2:])
    else:
        main()
