"""Resident memory of a mount daemon over many random reads: a ~130 MB generated layer served by a
loopback registry (tests/fault_registry.py, no faults), mounted via FUSE, read at random 64 KiB
at a time (page caches dropped first, so every read reaches the daemon); the daemon's RSS every
10,000 reads. `--src DIR` runs the daemon from another source tree (a git worktree of an older
commit) to compare. Root only.

    python tools/bench_rss.py [--reads 60000] [--src DIR] [-- MOUNT OPTIONS...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from hybrid_erofs.indexing.layer import index_layer  # noqa: E402
from tests.fault_registry import FaultRegistry, make_layer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=60_000)
    parser.add_argument("--src", type=Path, default=ROOT / "src",
                        help="source tree the daemon runs from")
    parser.add_argument("options", nargs="*", help="more `mount` options")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_rss.py: needs root (mounts)")
    blob, files = make_layer(11, count=1200, level=1)
    registry = FaultRegistry(blob)
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        work = Path(tmp)
        zinfo, meta, mnt = work / "layer.zinfo", work / "m.erofs", work / "mnt"
        index_layer(registry.ref, zinfo=zinfo, meta=meta, span=1 << 20)
        env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(work / "run"),
               "PYTHONPATH": str(args.src)}
        cli = [sys.executable, "-m", "hybrid_erofs"]
        mnt.mkdir()
        subprocess.run([*cli, "mount", "--meta", str(meta), "--zinfo", str(zinfo), "--via",
                        "fuse", "--cache-dir", str(work / "cache"), *args.options,
                        registry.ref, str(mnt)], env=env, check=True)
        record = json.loads(next((work / "run" / "mounts").glob("*[0-9a-f].json")).read_text())
        pid = record["daemon_pid"]
        disk_fd = os.open(record["disk_path"], os.O_RDONLY)
        skip = -(-meta.stat().st_size // 4096) * 4096
        names, rng = sorted(files), random.Random(1)
        started = time.monotonic()
        try:
            print(f"layer: {len(blob) >> 20} MiB blob, {sum(map(len, files.values())) >> 20} "
                  f"MiB of files; daemon from {args.src}; options {args.options}")
            for n in range(args.reads + 1):
                if n % 10_000 == 0:
                    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
                    print(f"{n:>7} reads: RSS {pages * os.sysconf('SC_PAGE_SIZE') >> 20} MiB "
                          f"({time.monotonic() - started:.0f} s)", flush=True)
                name = rng.choice(names)
                data = files[name]
                offset = rng.randrange(len(data))
                length = min(65536, len(data) - offset)
                fd = os.open(mnt / name, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.posix_fadvise(disk_fd, skip, 0, os.POSIX_FADV_DONTNEED)
                    assert os.pread(fd, length, offset) == data[offset : offset + length]
                finally:
                    os.close(fd)
        finally:
            os.close(disk_fd)
            subprocess.run([*cli, "umount", str(mnt)], env=env, check=True)
            registry.close()


if __name__ == "__main__":
    main()
