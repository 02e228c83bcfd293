"""Lazy reads of a multi-GB gzip layer through a loopback registry: one small file from a cold
cache (bytes fetched, requests, time), and a full sequential read of the layer data through the
stack against one `curl` download of the blob and `curl | gzip -dc`. Medians of N runs.

Starts Debian's `docker-registry` (filesystem storage, no auth) on 127.0.0.1 and pushes the blob
with a monolithic upload (POST /v2/<name>/blobs/uploads/, then PUT ?digest=); without it, falls
back to tests/fault_registry.py. The zinfo is indexed from the registry once and kept.

    python tools/bench_registry.py --blob bench-data/usr.tar.gz --meta bench-data/usr.meta.erofs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hybrid_erofs.device import RegistryOptions, open_image, open_layer  # noqa: E402
from hybrid_erofs.gzindex.sidecar import load_sidecar, sidecar_path  # noqa: E402
from hybrid_erofs.indexing.layer import index_layer  # noqa: E402
from hybrid_erofs.sources.chunkcache import ChunkCacheSource  # noqa: E402

REPOSITORY = "bench/layer"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
READ = 4 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def push(base: str, blob: Path, digest: str) -> str:
    """Upload blob + config + manifest (distribution-spec "monolithic upload"); return the ref."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    with httpx.Client(base_url=base, timeout=600) as http:
        for data, what in ((blob, digest), (config, config_digest)):
            if http.head(f"/v2/{REPOSITORY}/blobs/{what}").status_code == 200:
                continue  # pushed by an earlier run
            started = http.post(f"/v2/{REPOSITORY}/blobs/uploads/")
            started.raise_for_status()
            # Location carries the upload state in its query: add digest, do not replace it.
            location = httpx.URL(base).join(started.headers["location"]).copy_merge_params(
                {"digest": what})
            if isinstance(data, Path):
                with open(data, "rb") as handle:
                    body = iter(lambda: handle.read(8 << 20), b"")
                    done = http.put(location, content=body,
                                    headers={"Content-Type": "application/octet-stream"})
            else:
                done = http.put(location, content=data,
                                headers={"Content-Type": "application/octet-stream"})
            done.raise_for_status()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": digest, "size": blob.stat().st_size}],
        }).encode()
        http.put(f"/v2/{REPOSITORY}/manifests/latest", content=manifest,
                 headers={"Content-Type": OCI_MANIFEST}).raise_for_status()
    return f"{base.removeprefix('http://')}/{REPOSITORY}:latest"


@contextmanager
def registry(storage: Path, blob: Path, digest: str, *, fault_server: bool) -> Iterator[str]:
    """A loopback registry holding `blob`; yields its reference."""
    if fault_server or shutil.which("docker-registry") is None:
        from tests.fault_registry import FaultRegistry

        server = FaultRegistry(blob.read_bytes(), token_auth=False)
        try:
            yield server.ref
        finally:
            server.close()
        return
    from tests.registry_rig import _config, _wait_ready, free_port

    port = free_port()
    storage.mkdir(parents=True, exist_ok=True)
    config = storage / "config.yml"
    config.write_text(_config("bench", port, storage / "data", ""))
    with open(storage / "registry.log", "wb") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/")
        started = time.monotonic()
        ref = push(f"http://127.0.0.1:{port}", blob, digest)
        print(f"pushed (or found) the blob in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield ref
    finally:
        process.terminate()
        process.wait(timeout=10)


def cache_stats(source: object) -> ChunkCacheSource:
    """The ChunkCacheSource under a GzipSource -> VerifiedSource stack."""
    node = source
    for _ in range(4):
        if isinstance(node, ChunkCacheSource):
            return node
        node = getattr(node, "_inner", None)
    raise RuntimeError("no ChunkCacheSource in the stack")


def small_file(meta: Path, ref: str, zinfo: Path, cache: Path, path: str | None) -> dict[str, object]:
    """Read one small file through open_image from a cold cache."""
    options = RegistryOptions(cache_dir=cache)
    with open_image(meta, layer=ref, zinfo=zinfo, registry=options) as image:
        if path is None:  # the regular file of 4-64 KiB nearest the middle of the layer data
            middle = load_sidecar(sidecar_path(zinfo), zinfo_bytes=zinfo.read_bytes()).layer_size // 2
            best: tuple[int, str] | None = None
            for name, inode in image.walk("/"):
                if inode.is_reg and 4096 <= inode.size <= 65536:
                    extent = next(image.extents(inode))
                    if extent.device is not None:
                        distance = abs(extent.physical - middle)
                        if best is None or distance < best[0]:
                            best = (distance, name)
            assert best is not None
            path = best[1]
        inode = image.lookup(path)
        layer_source, _ = image.device_source(1)
        cached = cache_stats(layer_source)
        started = time.perf_counter()
        data = image.read(inode, inode.size)
        elapsed_s = time.perf_counter() - started
        time.sleep(0.5)  # let readahead settle before counting
        stats = cached.stats
    return {"path": path, "size": len(data), "time_ms": elapsed_s * 1e3,
            "bytes_fetched": stats.bytes_fetched, "requests": stats.inner_reads,
            "chunks": stats.misses, "readahead_chunks": stats.readahead_chunks}


def full_read(ref: str, zinfo: Path, cache: Path) -> float:
    """Seconds to read the whole layer data sequentially through the stack, cold cache."""
    source = open_layer(ref, zinfo=zinfo, registry=RegistryOptions(cache_dir=cache))
    try:
        started = time.perf_counter()
        for offset in range(0, source.size, READ):
            source.pread(min(READ, source.size - offset), offset)
        return time.perf_counter() - started
    finally:
        source.close()


def timed_shell(command: str) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blob", type=Path, default=ROOT / "bench-data/usr.tar.gz")
    parser.add_argument("--meta", type=Path, default=ROOT / "bench-data/usr.meta.erofs")
    parser.add_argument("--zinfo", type=Path, default=None,
                        help="default: bench-data/<blob>-registry-<span>.zinfo, made if absent")
    parser.add_argument("--span", type=int, default=1 << 20)
    parser.add_argument("--file", default=None, help="small file to read (default: chosen)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fault-server", action="store_true",
                        help="use tests/fault_registry.py instead of docker-registry")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    blob: Path = args.blob
    stem = blob.name.removesuffix(".tar.gz")
    zinfo: Path = args.zinfo or blob.parent / f"{stem}-registry-{args.span >> 10}k.zinfo"
    side = sidecar_path(zinfo)
    digest = (load_sidecar(side, zinfo_bytes=zinfo.read_bytes()).blob_digest
              if side.exists() else sha256_file(blob))
    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=blob.parent))
    results: dict[str, object] = {"blob": str(blob), "blob_size": blob.stat().st_size}
    try:
        with registry(blob.parent / "registry-storage", blob, digest,
                      fault_server=args.fault_server) as ref:
            host, _, repository = ref.rpartition(":")[0].partition("/")
            url = f"http://{host}/v2/{repository}/blobs/{digest}"
            if not zinfo.exists():
                report = index_layer(ref, zinfo=zinfo, meta=None, span=args.span,
                                     registry=RegistryOptions(cache_dir=work / "index"))
                results["index_s"] = report.elapsed_s
                print(f"indexed from the registry in {report.elapsed_s:.1f} s", file=sys.stderr)
            layer_size = load_sidecar(side, zinfo_bytes=zinfo.read_bytes()).layer_size
            results["layer_size"] = layer_size
            smalls: list[dict[str, object]] = []
            path = args.file
            for k in range(args.runs):
                smalls.append(small_file(args.meta, ref, zinfo, work / f"small{k}", path))
                path = str(smalls[-1]["path"])
            results["small_file"] = smalls
            stack = []
            curl = []
            curl_gunzip = []
            for k in range(args.runs):
                stack.append(full_read(ref, zinfo, work / f"full{k}"))
                shutil.rmtree(work / f"full{k}")
                curl.append(timed_shell(f"curl -sf -o /dev/null '{url}'"))
                curl_gunzip.append(timed_shell(f"curl -sf '{url}' | gzip -dc > /dev/null"))
                print(f"run {k + 1}: stack {stack[-1]:.1f} s, curl {curl[-1]:.1f} s, "
                      f"curl|gzip -dc {curl_gunzip[-1]:.1f} s", file=sys.stderr)
            results.update(stack_s=stack, curl_s=curl, curl_gunzip_s=curl_gunzip,
                           registry="fault_registry" if args.fault_server or
                           shutil.which("docker-registry") is None else "docker-registry")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def table(results: dict[str, object]) -> str:
    blob_size = int(results["blob_size"])  # type: ignore[call-overload]
    layer_size = int(results["layer_size"])  # type: ignore[call-overload]
    smalls: list[dict[str, object]] = results["small_file"]  # type: ignore[assignment]
    small = smalls[0]
    lines = [
        f"Small file `{small['path']}` ({small['size']} bytes), cold cache, "
        f"median of {len(smalls)}:",
        "",
        "| time (ms) | bytes fetched | requests | chunks missed | readahead chunks |",
        "|---|---|---|---|---|",
        "| {:.1f} | {:,} | {} | {} | {} |".format(
            statistics.median(float(s["time_ms"]) for s in smalls),  # type: ignore[arg-type]
            int(statistics.median(int(s["bytes_fetched"]) for s in smalls)),  # type: ignore[call-overload]
            int(statistics.median(int(s["requests"]) for s in smalls)),  # type: ignore[call-overload]
            int(statistics.median(int(s["chunks"]) for s in smalls)),  # type: ignore[call-overload]
            int(statistics.median(int(s["readahead_chunks"]) for s in smalls)),  # type: ignore[call-overload]
        ),
        "",
        f"Full sequential read, blob {blob_size / 1e9:.2f} GB, layer data {layer_size / 1e9:.2f} GB, "
        f"median of {len(results['stack_s'])}:",  # type: ignore[arg-type]
        "",
        "| what | seconds | blob MB/s | layer data MB/s | time vs curl |",
        "|---|---|---|---|---|",
    ]
    curl_s = statistics.median(results["curl_s"])  # type: ignore[arg-type]
    for name, key in (("stack, cold cache (4 MiB preads)", "stack_s"), ("`curl -o /dev/null`", "curl_s"),
                      ("`curl \\| gzip -dc > /dev/null`", "curl_gunzip_s")):
        seconds = statistics.median(results[key])  # type: ignore[arg-type]
        lines.append(f"| {name} | {seconds:.1f} | {blob_size / 1e6 / seconds:.0f} | "
                     f"{layer_size / 1e6 / seconds:.0f} | {seconds / curl_s:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
