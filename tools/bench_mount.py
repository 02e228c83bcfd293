"""Time to first use of a multi-GB layer in a loopback registry: `hybrid-erofs mount` -> first
`ls` -> one small file read (with bytes and spans fetched, from the daemon's stats), against
pulling and extracting the whole layer (`curl BLOB | tar -xz`). Root only; cold caches each run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "hybrid_erofs"]
REPO = "bench/usr"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def ensure_index(layer: Path, zinfo: Path, meta: Path) -> None:
    """Index the layer unless zinfo, its sidecar and meta are newer than it."""
    outputs = (zinfo, zinfo.with_name(zinfo.name + ".json"), meta)
    if all(p.exists() and p.stat().st_mtime >= layer.stat().st_mtime for p in outputs):
        return
    print(f"indexing {layer} ...", file=sys.stderr)
    subprocess.run([*CLI, "index", str(layer), "-o", str(zinfo), "--meta", str(meta)],
                   check=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def registry(storage: Path) -> Iterator[str]:
    """A docker-registry (distribution 2.8) on a free loopback port over `storage`."""
    port = free_port()
    storage.mkdir(parents=True, exist_ok=True)
    config = storage.parent / f"{storage.name}.yml"
    config.write_text(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {storage}
http:
  addr: 127.0.0.1:{port}
""")
    with open(storage.parent / f"{storage.name}.log", "wb") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT)
    host = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("registry did not start")
            time.sleep(0.1)
        yield host
    finally:
        process.terminate()
        process.wait(10)


def push(host: str, blob: Path, digest: str) -> str:
    """Monolithic upload of the layer (and a config), then an OCI manifest; returns the ref."""
    base = f"http://{host}/v2/{REPO}"
    with httpx.Client(timeout=600) as http:
        def upload(data: Any, size: int, blob_digest: str) -> None:
            if http.head(f"{base}/blobs/{blob_digest}").status_code == 200:
                return
            start = http.post(f"{base}/blobs/uploads/")
            start.raise_for_status()
            location = start.headers["location"]
            url = location if location.startswith("http") else f"http://{host}{location}"
            sep = "&" if "?" in url else "?"
            done = http.put(f"{url}{sep}digest={blob_digest}", content=data,
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(size)})
            done.raise_for_status()

        started = time.monotonic()
        with open(blob, "rb") as f:
            upload(iter(lambda: f.read(1 << 20), b""), blob.stat().st_size, digest)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        upload(config, len(config), config_digest)
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": config_digest, "size": len(config)},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": digest, "size": blob.stat().st_size}]}
        http.put(f"{base}/manifests/usr", content=json.dumps(manifest).encode(),
                 headers={"Content-Type": str(manifest["mediaType"])}).raise_for_status()
        print(f"blob in the registry after {time.monotonic() - started:.1f} s", file=sys.stderr)
    return f"{host}/{REPO}:usr"


def status(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([*CLI, "status", "--json"], env=env, check=True, capture_output=True,
                         text=True).stdout
    entries: list[dict[str, Any]] = json.loads(out)
    return entries[0]


def pick_small_file(mnt: Path) -> str:
    """A file of 1-64 KiB in the middle of the layer (sorted order): metadata only, no data."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.isfile(path) and not os.path.islink(path) and 1024 <= st.st_size <= 65536:
                found.append(os.path.relpath(path, mnt))
    return found[len(found) // 2]


def run_mount(ref: str, meta: Path, zinfo: Path, work: Path, small: str | None) -> dict[str, Any]:
    runtime, cache, mnt = work / "run", work / "cache", work / "mnt"
    for path in (runtime, cache):
        shutil.rmtree(path, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    drop_caches()
    started = time.monotonic()
    subprocess.run([*CLI, "mount", "--meta", str(meta), "--zinfo", str(zinfo), "--cache-dir",
                    str(cache), ref, str(mnt)], env=env, check=True, capture_output=True)
    mounted = time.monotonic()
    try:
        os.listdir(mnt)
        listed = time.monotonic()
        if small is None:
            small = pick_small_file(mnt)
        step = time.monotonic()
        data = (mnt / small).read_bytes()
        read = time.monotonic()
        time.sleep(2.5)  # the daemon writes its stats every 2 s
        stats = status(env)["stats"]
    finally:
        subprocess.run([*CLI, "umount", str(mnt)], env=env, check=True, capture_output=True)
    return {"file": small, "file_size": len(data), "mount_s": mounted - started,
            "first_ls_s": listed - started, "read_s": read - step,
            "first_file_s": listed - started + read - step,
            "bytes_fetched": stats["bytes_fetched"], "spans_fetched": stats["spans_verified"],
            "cache_misses": stats["cache_misses"]}


def run_pull(host: str, digest: str, work: Path) -> float:
    out = work / "extract"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    drop_caches()
    started = time.monotonic()
    subprocess.run(f"curl -sf http://{host}/v2/{REPO}/blobs/{digest} | tar -xzf - -C {out}",
                   shell=True, check=True)
    took = time.monotonic() - started
    shutil.rmtree(out)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layer", type=Path, default=ROOT / "bench-data/usr.tar.gz")
    parser.add_argument("--zinfo", type=Path, default=ROOT / "bench-data/usr.zinfo")
    parser.add_argument("--meta", type=Path, default=ROOT / "bench-data/usr.meta.erofs")
    parser.add_argument("--storage", type=Path, default=ROOT / "bench-data/bench-mount-registry")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pull-runs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mounts, drop_caches)")
    ensure_index(args.layer, args.zinfo, args.meta)
    sidecar = json.loads(args.zinfo.with_name(args.zinfo.name + ".json").read_text())
    digest = sidecar["blob"]["digest"]
    with registry(args.storage) as host, tempfile.TemporaryDirectory(dir=ROOT / "bench-data") as tmp:
        ref = push(host, args.layer, digest)
        work = Path(tmp)
        runs: list[dict[str, Any]] = []
        small: str | None = None
        for number in range(args.runs):
            result = run_mount(ref, args.meta, args.zinfo, work, small)
            small = result["file"]
            runs.append(result)
            print(f"run {number + 1}: mount {result['mount_s']:.2f} s, first ls "
                  f"{result['first_ls_s']:.2f} s, {result['file']} ({result['file_size']} B) "
                  f"readable at {result['first_file_s']:.2f} s, fetched "
                  f"{result['bytes_fetched'] / 1e6:.1f} MB in {result['spans_fetched']} spans",
                  file=sys.stderr)
        pulls = [run_pull(host, digest, work) for _ in range(args.pull_runs)]
        print(f"curl | tar -xz: {statistics.median(pulls):.1f} s", file=sys.stderr)
    summary = {
        "layer": str(args.layer), "blob_bytes": args.layer.stat().st_size,
        "layer_bytes": sidecar["layer_size"], "file": small,
        "median_first_ls_s": statistics.median(r["first_ls_s"] for r in runs),
        "median_first_file_s": statistics.median(r["first_file_s"] for r in runs),
        "max_spans_fetched": max(r["spans_fetched"] for r in runs),
        "median_bytes_fetched": statistics.median(r["bytes_fetched"] for r in runs),
        "pull_extract_s": statistics.median(pulls), "runs": runs, "pulls": pulls,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
