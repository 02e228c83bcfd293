"""Full read of a mounted layer with one reader (`tar -C MNT -cf - . | cat > /dev/null`) against
its floors and peers, side by side in one run, medians of N rounds (root; drops caches).

Methods, in a rotating order each round:
  tar-xzf          `tar -xzf LAYER -C tmpfs` (the peer to beat by 2x), page cache dropped
  floor-tmpfs      the tar read of an extracted copy on tmpfs
  floor-inflate    raw inflate of the blob on one core (isal), blob in the page cache
  floor-erofs      the reader's own path: a second kernel EROFS mount of a mount-file-cold
                   mount's FUSE file, page cache dropped and then the whole FUSE file read
                   once (its pages cached, the daemon idle), the tar read of that mount: the
                   least a cold read through EROFS over FUSE can take, whatever the daemon does
                   (not in the default methods: run it on its own, as on a 2-vCPU VM the
                   methods run after it in the same run were 10-40 % slower)
  disk-cold        the tar read of an extracted copy on local disk, page cache dropped
  mount-file-cold  `hybrid-erofs mount` of the local .tar.gz, page cache dropped, tar read
  mount-cold       `hybrid-erofs mount` from a loopback registry (Debian's docker-registry),
                   empty cache, page cache dropped, then the tar read (mount time not counted)
  mount-local      the same mount once its layer is complete and verified (background fetch),
                   page cache dropped, then the tar read (stored spans by splice)
  remount-local    a new mount of the complete layer (file-backed EROFS of the stored layer,
                   no FUSE), page cache dropped, then the tar read

Besides the wall time, the CPU time each method took: the reader's (tar, cat, gzip: the
children's rusage), for the mounts the daemon's during the read (/proc/PID/stat), and for
mount-cold the registry's (docker-registry runs on the same cores). On a machine shared with
other work the wall time of CPU-bound methods follows their CPU time.

--baseline SRC adds mount-file-cold@base and mount-cold@base: the same mounts with the
hybrid_erofs of another tree (PYTHONPATH=SRC, e.g. `git archive OLD src | tar -x -C DIR`),
so before and after are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import CLI, drop_caches, ensure_index, push, registry

from hybrid_erofs.fetching.background import fetch_status

READ = "tar -C {dir} -cf - . | cat > /dev/null"
INFLATE = """
import sys, time
from isal import isal_zlib
data = open(sys.argv[1], 'rb').read()
started = time.perf_counter()
view, d = memoryview(data), isal_zlib.decompressobj(31)
for i in range(0, len(data), 1 << 20):
    d.decompress(view[i:i + (1 << 20)])
print(time.perf_counter() - started)
"""


CPU = {"reader": 0.0, "daemon": 0.0, "registry": 0.0}  # CPU seconds of the last timed_shell
REGISTRY: list[int] = []  # pid of the docker-registry serving the blob


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int | None) -> float:
    """utime + stime of process `pid` (all its threads), in seconds; 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_shell(command: str, daemon: int | None = None) -> float:
    """Wall time of `command`; its CPU time (and the daemon's meanwhile) go to CPU."""
    registry = REGISTRY[0] if REGISTRY else None
    reader, served, answered = _children_cpu(), process_cpu(daemon), process_cpu(registry)
    started = time.perf_counter()
    subprocess.run(command, shell=True, check=True)
    took = time.perf_counter() - started
    CPU["reader"], CPU["daemon"] = _children_cpu() - reader, process_cpu(daemon) - served
    CPU["registry"] = process_cpu(registry) - answered
    return took


def registry_pid() -> int | None:
    """The docker-registry that bench_mount.registry() started (a child of this process)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, rest = stat.split("(", 1)[1].rsplit(")", 1)
            if name == "docker-registry" and int(rest.split()[1]) == os.getpid():
                return int(entry.name)
    return None


def status(env: dict[str, str], mnt: Path) -> dict[str, Any]:
    out = subprocess.run([*CLI, "status", "--json"], env=env, check=True, capture_output=True,
                         text=True).stdout
    for entry in json.loads(out):
        if entry["mountpoint"] == str(mnt):
            found: dict[str, Any] = entry
            return found
    raise RuntimeError(f"{mnt}: not in status")


class Bench:
    def __init__(self, layer: Path, work: Path, ref: str, meta: Path, zinfo: Path,
                 baseline: Path | None = None) -> None:
        self.layer, self.work, self.ref, self.meta, self.zinfo = layer, work, ref, meta, zinfo
        self.tmpfs = work / "tmpfs"
        self.disk_tree = work / "disk-tree"
        self.mnt = work / "mnt"
        self.env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(work / "run")}
        self.baseline = baseline
        self.local_ready = False

    def prepare(self) -> None:
        self.tmpfs.mkdir(parents=True, exist_ok=True)
        if not any(line.split()[1] == str(self.tmpfs)
                   for line in Path("/proc/mounts").read_text().splitlines()):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=90%", "tmpfs", str(self.tmpfs)],
                           check=True)
        for tree in (self.tmpfs / "tree", self.disk_tree):
            if not tree.exists():
                tree.mkdir(parents=True)
                subprocess.run(["tar", "-xzf", str(self.layer), "-C", str(tree)], check=True)
        self.mnt.mkdir(exist_ok=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.tmpfs)], check=False)

    def tar_xzf(self) -> float:
        out = self.tmpfs / "x"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        drop_caches()
        took = timed_shell(f"tar -xzf {self.layer} -C {out}")
        shutil.rmtree(out)
        return took

    def floor_tmpfs(self) -> float:
        return timed_shell(READ.format(dir=self.tmpfs / "tree"))

    def floor_inflate(self) -> float:
        subprocess.run(["cat", str(self.layer)], stdout=subprocess.DEVNULL, check=True)
        out = subprocess.run([sys.executable, "-c", INFLATE, str(self.layer)], check=True,
                             capture_output=True, text=True).stdout
        took = float(out)
        CPU["reader"], CPU["daemon"] = took, 0.0  # one core, busy throughout
        return took

    def disk_cold(self) -> float:
        drop_caches()
        return timed_shell(READ.format(dir=self.disk_tree))

    def _mount(self, cache: Path, *extra: str) -> None:
        subprocess.run([*CLI, "mount", "--via", "fuse", "--meta", str(self.meta), "--zinfo",
                        str(self.zinfo), "--cache-dir", str(cache), *extra, self.ref,
                        str(self.mnt)], env=self.env, check=True, capture_output=True)

    def floor_erofs(self) -> float:
        """The kernel's part of a cold read: EROFS (cold) over the FUSE file (warm)."""
        self._mount_file()
        second = self.work / "mnt-floor"
        second.mkdir(exist_ok=True)
        try:
            daemon = self._daemon()
            device = next((line.split()[0] for line in Path("/proc/mounts").read_text()
                           .splitlines() if line.split()[1] == str(self.mnt)), None)
            if device is None:  # (a path /proc/mounts escapes, e.g. with a space)
                raise RuntimeError(f"{self.mnt}: the mount's FUSE file not found in /proc/mounts")
            drop_caches()
            subprocess.run(["cat", device], stdout=subprocess.DEVNULL, check=True)
            subprocess.run(["mount", "-t", "erofs", "-o", "ro", device, str(second)],
                           check=True)
            try:
                return timed_shell(READ.format(dir=second), daemon)
            finally:
                subprocess.run(["umount", str(second)], check=True)
        finally:
            self._umount()

    def _daemon(self) -> int | None:
        pid = status(self.env, self.mnt).get("daemon_pid")
        return int(pid) if pid else None

    def _read_mount(self) -> float:
        daemon = self._daemon()
        drop_caches()
        return timed_shell(READ.format(dir=self.mnt), daemon)

    def _umount(self) -> None:
        subprocess.run([*CLI, "umount", str(self.mnt)], env=self.env, check=True,
                       capture_output=True)

    def mount_cold(self) -> float:
        cache = self.work / "cache-cold"
        shutil.rmtree(cache, ignore_errors=True)
        self._mount(cache, "--no-background-fetch")
        try:
            return self._read_mount()
        finally:
            self._umount()

    def on_baseline(self, method: Callable[[], float]) -> Callable[[], float]:
        """`method` with the CLI and daemon of the baseline tree."""
        def run() -> float:
            env = self.env
            self.env = {**env, "PYTHONPATH": str(self.baseline)}
            try:
                return method()
            finally:
                self.env = env
        return run

    def _mount_file(self) -> None:
        subprocess.run([*CLI, "mount", "--via", "fuse", "--meta", str(self.meta), "--zinfo",
                        str(self.zinfo), str(self.layer), str(self.mnt)], env=self.env,
                       check=True, capture_output=True)

    def mount_file_cold(self) -> float:
        """The layer mounted from the local .tar.gz file (nothing to fetch), page cache dropped."""
        self._mount_file()
        try:
            return self._read_mount()
        finally:
            self._umount()

    def _complete(self, cache: Path) -> None:
        """Wait until the mounted layer is complete and verified (background fetch)."""
        deadline = time.monotonic() + 1800
        while True:
            layer = status(self.env, self.mnt)["stats"]["layers"][0]
            fetch = fetch_status(layer) or {}
            if fetch.get("state") in ("verified", "complete"):
                return
            if fetch.get("state") in ("failed", "stopped") or time.monotonic() > deadline:
                raise RuntimeError(f"background fetch did not complete: {fetch}")
            time.sleep(1)

    def mount_local(self) -> float:
        """A fresh mount whose background fetch makes the layer complete and verified; then,
        page cache dropped, the read through the same FUSE mount (stored spans by splice)."""
        cache = self.work / "cache-fuse"
        shutil.rmtree(cache, ignore_errors=True)
        self._mount(cache, "--fetch-delay", "0", "--fetch-rate", "1GiB")
        try:
            self._complete(cache)
            return self._read_mount()
        finally:
            self._umount()

    def remount_local(self) -> float:
        """A new mount of a layer that is complete and verified already: the kernel reads the
        meta and the stored layer directly (`via local`); page cache dropped."""
        cache = self.work / "cache-local"
        if not self.local_ready:  # complete it once (kept across rounds)
            self._mount(cache, "--fetch-delay", "0", "--fetch-rate", "1GiB")
            try:
                self._complete(cache)
            finally:
                self._umount()
            self.local_ready = True
        self._mount(cache)
        try:
            if status(self.env, self.mnt)["via"] != "local":
                raise RuntimeError("the complete layer was not mounted locally")
            return self._read_mount()
        finally:
            self._umount()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layer", type=Path, help="a gzip layer (indexed beside it if needed)")
    parser.add_argument("--work", type=Path, required=True,
                        help="scratch directory (extracted copies, registry storage, caches)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="tar-xzf,floor-tmpfs,floor-inflate,disk-cold,"
                        "mount-file-cold,mount-cold,mount-local,remount-local")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--baseline", type=Path,
                        help="another tree's src: adds mount-file-cold@base, mount-cold@base")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mounts, drop_caches)")
    layer = args.layer.resolve()
    stem = layer.name.removesuffix(".gz").removesuffix(".tar")
    zinfo, meta = layer.with_name(stem + ".zinfo"), layer.with_name(stem + ".meta")
    ensure_index(layer, zinfo, meta)
    digest = json.loads(zinfo.with_name(zinfo.name + ".json").read_text())["blob"]["digest"]
    args.work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[list[float]]] = {}  # per method: [reader, daemon, registry] CPU s
    loads: list[float] = []  # 1-minute load average after each method
    with registry(args.work / "registry") as host:
        REGISTRY[:] = [pid] if (pid := registry_pid()) is not None else []
        bench = Bench(layer, args.work.resolve(), push(host, layer, digest), meta, zinfo,
                      args.baseline.resolve() if args.baseline else None)
        bench.prepare()
        methods: dict[str, Callable[[], float]] = {
            "tar-xzf": bench.tar_xzf, "floor-tmpfs": bench.floor_tmpfs,
            "floor-inflate": bench.floor_inflate, "floor-erofs": bench.floor_erofs,
            "disk-cold": bench.disk_cold,
            "mount-file-cold": bench.mount_file_cold, "mount-cold": bench.mount_cold,
            "mount-local": bench.mount_local, "remount-local": bench.remount_local}
        chosen = [m for m in args.methods.split(",") if m]
        if args.baseline:
            for name in ("mount-file-cold", "mount-cold"):
                methods[f"{name}@base"] = bench.on_baseline(methods[name])
                if name in chosen:
                    chosen.insert(chosen.index(name) + 1, f"{name}@base")
        try:
            for number in range(args.rounds):
                order = chosen[number % len(chosen):] + chosen[:number % len(chosen)]
                for name in order:
                    took = methods[name]()
                    times.setdefault(name, []).append(took)
                    cpu.setdefault(name, []).append([round(CPU["reader"], 3),
                                                     round(CPU["daemon"], 3),
                                                     round(CPU["registry"], 3)])
                    load = os.getloadavg()[0]
                    loads.append(round(load, 2))
                    print(f"round {number + 1} {name:14s} {took:7.2f} s  CPU reader "
                          f"{CPU['reader']:5.2f} s daemon {CPU['daemon']:5.2f} s registry "
                          f"{CPU['registry']:5.2f} s  "
                          f"(load {load:.1f})", file=sys.stderr)
        finally:
            bench.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: [statistics.median(r[k] for r in rows) for k in range(3)]
                   for name, rows in cpu.items()}
    summary = {"layer": str(layer), "blob_bytes": layer.stat().st_size, "medians_s": medians,
               "runs_s": times, "cpu_reader_daemon_registry_medians_s": cpu_medians,
               "cpu_runs_s": cpu, "load": loads, "load_after": os.getloadavg()[0]}
    for name, base in (("mount-file-cold", "tar-xzf"), ("mount-cold", "tar-xzf"),
                       ("floor-erofs", "tar-xzf"), ("mount-file-cold", "floor-erofs"),
                       ("mount-file-cold@base", "tar-xzf"), ("mount-cold@base", "tar-xzf"),
                       ("mount-local", "disk-cold"), ("remount-local", "disk-cold")):
        if name in medians and base in medians:
            summary[f"{name} / {base}"] = round(medians[name] / medians[base], 3)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
