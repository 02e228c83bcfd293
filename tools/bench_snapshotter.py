"""Time to ready and bytes fetched: containerd with `hybrid-erofs snapshotter` (CRI PullImage,
then `ctr run`) against containerd's overlayfs snapshotter (`ctr images pull`, then `ctr run`),
and the snapshotter with and without a prefetch profile, in the same run, with the registry in
a network namespace of its own behind a veth link shaped with tc HTB. Root only; not part of
the test suite. Figures: docs/benchmarks.md.

    python3 tools/bench_snapshotter.py --runs 3 --rates 200mbit --images big \
        --kinds hybrid-erofs,hybrid-erofs+profile --json out.json

Images (built once, cached in --data): "small" = the debootstrap rootfs (HYBRID_EROFS_ROOTFS_TAR)
plus a small top layer; "big" = the same plus layers of this machine's /usr/share and /usr/bin
(>= 1 GB of layer data). Each is pushed and indexed (`index --all-layers --min-layer-size 0
--push`: its pull_ref, the index bound), then a prefetch profile of the workload is recorded
(`hybrid-erofs profile`) and published (`index --push` again: a second pull_ref, index and
profile bound). The container runs --workload: `app` (the default) reads about 80 MB at start,
`ready` only prints a line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test rig's containerd, registry and image builders

from tests.containerd_rig import (  # noqa: E402
    SNAPSHOTTER,
    Containerd,
    Registry,
    RunImage,
    SnapshotterProcess,
    build_run_image,
    top_layer_tar,
    unmount_below,
)

CLI = [sys.executable, "-m", "hybrid_erofs"]
NETNS = "hebench"
HOST_IF, NS_IF = "hebench0", "hebench1"
# A /30 that exists only between this host and the namespace this script makes.
HOST_ADDR, NS_ADDR = "10.213.7.1", "10.213.7.2"
READY = "ready"
READY_CMD = ("/bin/sh", "-c", f"cat /etc/debian_version >/dev/null && echo {READY}")
# The start of an application that reads about 80 MB spread over three of the big image's
# layers: an interpreter with a few modules (perl, rootfs layer), two programs' binaries
# (skopeo and docker-registry, 37 MB, /usr/bin layer) and a tree of 2,000 small data files
# (vim's runtime files, 40 MB, /usr/share layer). It is what --profile records and replays.
APP_SCRIPT = ("perl -e 'use strict; use warnings; use POSIX ();' && "
              "cat /opt/bench/bin/skopeo /opt/bench/bin/docker-registry >/dev/null && "
              "tar -cf - /opt/bench/share/vim | cat >/dev/null")
APP_CMD = ("/bin/sh", "-c", f"{APP_SCRIPT} && echo {READY}")
WORKLOADS = {"ready": READY_CMD, "app": APP_CMD}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


# -- the shaped link ------------------------------------------------------------------------------

@contextlib.contextmanager
def shaped_link() -> Iterator[None]:
    """netns NETNS with NS_ADDR, a veth pair to the host (HOST_ADDR), an HTB qdisc on both
    ends (rate set by shape())."""
    sh("ip", "netns", "del", NETNS, check=False)
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "add", NETNS)
    try:
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        sh("ip", "link", "set", NS_IF, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        ns = ("ip", "netns", "exec", NETNS)
        sh(*ns, "ip", "addr", "add", f"{NS_ADDR}/30", "dev", NS_IF)
        sh(*ns, "ip", "link", "set", NS_IF, "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        for prefix, dev in (((), HOST_IF), (ns, NS_IF)):
            sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
               "default", "10")
            sh(*prefix, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10",
               "htb", "rate", "10gbit")
        yield
    finally:
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("ip", "netns", "del", NETNS, check=False)


def shape(rate: str) -> None:
    """Both directions of the link to `rate` (tc syntax: 1gbit, 200mbit)."""
    ns = ("ip", "netns", "exec", NETNS)
    for prefix, dev in (((), HOST_IF), (ns, NS_IF)):
        sh(*prefix, "tc", "class", "change", "dev", dev, "parent", "1:", "classid", "1:10",
           "htb", "rate", rate, "ceil", rate, "burst", "256k", "cburst", "256k")


def rx_bytes() -> int:
    """Bytes the host received over the link (registry -> node)."""
    return int(Path(f"/sys/class/net/{HOST_IF}/statistics/rx_bytes").read_text())


# -- images ---------------------------------------------------------------------------------------

def layer_tar(data: Path, name: str, source: str, prefix: str) -> Path:
    """This machine's `source` tree as a tar under `prefix` (cached as data/NAME.tar)."""
    path = data / f"{name}.tar"
    if not path.exists():
        print(f"building {path} from {source} ...", file=sys.stderr)
        sh("tar", "-C", str(Path(source).parent), "--sort=name", "--numeric-owner",
           "--owner=0", "--group=0", "--mtime=2024-01-01 00:00:00Z", "--format=pax",
           "--ignore-failed-read", "--exclude=__pycache__",
           f"--transform=s,^{Path(source).name},{prefix},", "-cf", f"{path}.part",
           Path(source).name, check=False)
        os.replace(f"{path}.part", path)
    return path


def build_images(data: Path, rootfs: Path) -> dict[str, RunImage]:
    layout = data / "layout"
    images = {"small": build_run_image(layout, rootfs, tag="small", cmd=READY_CMD)}
    share = layer_tar(data, "usr-share", "/usr/share", "opt/bench/share")
    libs = layer_tar(data, "usr-bin", "/usr/bin", "opt/bench/bin")
    images["big"] = build_run_image(layout, rootfs, tag="big", cmd=READY_CMD,
                                    extra_layers=(share, libs, top_layer_tar()))
    return images


def layer_bytes(image: RunImage) -> tuple[int, int]:
    """(compressed, uncompressed) size of the image's layers."""
    compressed = uncompressed = 0
    for digest in image.layer_digests:
        blob = image.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        compressed += blob.stat().st_size
        with open(blob, "rb") as f:
            uncompressed += int.from_bytes(_gzip_isize(f), "little")
    return compressed, uncompressed


def _gzip_isize(f: Any) -> bytes:
    f.seek(-4, os.SEEK_END)  # ISIZE (RFC 1952): right for single-member layers < 4 GiB
    data: bytes = f.read(4)
    return data


def index_and_push(ref: str, directory: Path, span: str | None = None) -> str:
    """`index REF --all-layers --push` (with `--span SPAN`): the pull_ref (the image with its
    index bound)."""
    proc = sh(*CLI, "index", ref, "--all-layers", "--min-layer-size", "0", "--push",
              *(["--span", span] if span else []),
              "--insecure", "-o", str(directory), "--json", check=False)
    if proc.returncode != 0:
        raise SystemExit(f"index {ref}: {proc.stderr.strip()}")
    return str(json.loads(proc.stdout).get("pull_ref") or ref)


def publish(registry: Registry, images: dict[str, RunImage], data: Path,
            workload: tuple[str, ...], span: str | None = None) -> dict[str, dict[str, str]]:
    """Per image: `plain` = the pull_ref of the image with its index bound, `profile` = the
    pull_ref once a prefetch profile of `workload` is recorded and published with the index
    (`hybrid-erofs profile`, then `index --push` again: the profile is bound too)."""
    refs = {}
    for name, image in images.items():
        ref = f"{registry.host}/bench/{name}:1"
        sh("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
           image.ref(), f"docker://{ref}")
        directory = data / f"index-{name}"
        shutil.rmtree(directory, ignore_errors=True)  # profiles of another workload go too
        plain = index_and_push(ref, directory, span)
        cache = data / f"profile-cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        script = " ".join(shlex.quote(arg) for arg in workload)
        proc = sh(*CLI, "profile", ref, "--index-dir", str(directory), "--insecure",
                  "--cache-dir", str(cache), "--", "sh", "-c",
                  f'chroot "$ROOTFS" {script} >/dev/null', check=False)
        shutil.rmtree(cache, ignore_errors=True)
        if proc.returncode != 0:
            raise SystemExit(f"profile {ref}: {proc.stderr.strip()}")
        print(proc.stdout.strip(), file=sys.stderr)
        refs[name] = {"plain": plain, "profile": index_and_push(ref, directory, span)}
        if refs[name]["profile"] == plain:
            raise SystemExit(f"{ref}: the profile did not change the bound image")
    return refs


# -- one measurement ------------------------------------------------------------------------------

def run_lazy(ctrd: Containerd, sn: SnapshotterProcess, ref: str, n: int,
             cmd: tuple[str, ...]) -> dict[str, Any]:
    before, t0 = rx_bytes(), time.monotonic()
    ctrd.cri_pull(ref)
    t_pull = time.monotonic() - t0
    out = ctrd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, ref, f"lazy-{n}", *cmd)
    elapsed = time.monotonic() - t0
    assert out.stdout.strip() == READY, out.stdout
    fetched = rx_bytes() - before
    log = sn.log.read_text(errors="replace")
    return {"ready_s": elapsed, "pull_s": t_pull, "run_s": elapsed - t_pull, "bytes": fetched,
            "lazy_layers": log.count("mounted lazily as"), "fallbacks": log.count("(fallback,")}


def run_overlay(ctrd: Containerd, ref: str, n: int, cmd: tuple[str, ...]) -> dict[str, Any]:
    before, t0 = rx_bytes(), time.monotonic()
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref,
             timeout_s=3600)
    t_pull = time.monotonic() - t0
    out = ctrd.ctr("run", "--rm", "--snapshotter", "overlayfs", ref, f"ovl-{n}", *cmd)
    elapsed = time.monotonic() - t0
    assert out.stdout.strip() == READY, out.stdout
    return {"ready_s": elapsed, "pull_s": t_pull, "run_s": elapsed - t_pull,
            "bytes": rx_bytes() - before}


def forget(ctrd: Containerd) -> None:
    """Every image (CRI also names it by ID and digest), its content and snapshots gone from
    containerd (both snapshotters): the next pull starts cold."""
    images = ctrd.ctr("images", "ls", "-q", check=False).stdout.split()
    if images:
        ctrd.ctr("images", "rm", "--sync", *images, check=False)
    for digest in ctrd.ctr("content", "ls", "-q", check=False).stdout.split():
        ctrd.ctr("content", "rm", digest, check=False)
    left = ctrd.ctr("content", "ls", "-q", check=False).stdout.split()
    if left:
        raise SystemExit(f"containerd still holds {len(left)} blobs: not a cold start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="1gbit,200mbit")
    parser.add_argument("--images", default="small,big")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data" / "snapshotter")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--span", metavar="SIZE",
                        help="index the images with checkpoints SIZE apart (index --span; "
                             "default: index's own, 4 MiB)")
    parser.add_argument("--kinds", default="hybrid-erofs,hybrid-erofs+profile,overlayfs",
                        help="what to measure, alternating: " + ", ".join(KINDS))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="app",
                        help="the container's command (and what the profile records)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespace, containerd, mounts)")
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: one of {', '.join(KINDS)}")
    cmd = WORKLOADS[args.workload]
    rootfs = Path(os.environ.get("HYBRID_EROFS_ROOTFS_TAR",
                                 "/var/cache/hybrid-erofs-ci/rootfs.tar"))
    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    images = build_images(data, rootfs)
    images = {name: images[name] for name in args.images.split(",")}
    work = data / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    results: dict[str, Any] = {"images": {}, "runs": [], "workload": list(cmd),
                               "span": args.span, "loadavg": []}
    with shaped_link():
        registry = Registry(work / "registry", address=NS_ADDR, netns=NETNS,
                            storage=data / "registry-storage")
        registry.start()
        ctrd: Containerd | None = None
        try:
            refs = publish(registry, images, data, cmd, args.span)
            sn = SnapshotterProcess(work / "sn.sock", work / "sn-root", work / "sn.log")
            ctrd = Containerd(work / "containerd", sn.address, registry.host)
            ctrd.start()
            for name in images:
                compressed, uncompressed = layer_bytes(images[name])
                results["images"][name] = {"layers": len(images[name].layer_digests),
                                           "compressed": compressed,
                                           "uncompressed": uncompressed, "refs": refs[name]}
                for rate in args.rates.split(","):
                    shape(rate)
                    for n in range(args.runs):
                        # rotate which kind goes first
                        order = kinds[n % len(kinds):] + kinds[:n % len(kinds)]
                        for kind in order:
                            results["loadavg"].append(os.getloadavg()[0])
                            forget(ctrd)
                            if kind == "overlayfs":
                                row = run_overlay(ctrd, refs[name]["plain"], n, cmd)
                            else:
                                row = measure_lazy(ctrd, sn, work, refs[name], kind,
                                                   f"{name}-{rate}-{n}", n, cmd)
                            row.update(image=name, rate=rate, run=n, snapshotter=kind,
                                       load=os.getloadavg()[0])
                            results["runs"].append(row)
                            print(json.dumps(row), flush=True)
        finally:
            if ctrd is not None:
                ctrd.remove_all()
                ctrd.stop()
            registry.stop()
            unmount_below(work)
    summarize(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


# hybrid-erofs: the image's layers mounted ahead, in parallel (the default); -1by1: one after
# the other as containerd prepares them (--no-mount-ahead); +profile: the image whose bound
# index carries the workload's prefetch profile.
KINDS = ("hybrid-erofs", "hybrid-erofs+profile", "hybrid-erofs-1by1",
         "hybrid-erofs-1by1+profile", "overlayfs")


def measure_lazy(ctrd: Containerd, sn: SnapshotterProcess, work: Path, refs: dict[str, str],
                 kind: str, tag: str, n: int, cmd: tuple[str, ...]) -> dict[str, Any]:
    """A fresh snapshotter (empty root and chunk cache, so the index files are fetched too)
    and CRI PullImage of the bound image, with or without its prefetch profile."""
    cache = work / f"cache-{tag}"
    sn.root = work / f"sn-root-{tag}"
    sn.extra_args = ("--insecure", "--cache-dir", str(cache),
                     *(("--no-mount-ahead",) if "-1by1" in kind else ()))
    sn.env = {"HYBRID_EROFS_RUNTIME_DIR": str(work / "runtime")}
    sn.log.unlink(missing_ok=True)
    sn.start()
    ctrd.wait_for_snapshotter()
    try:
        ref = refs["profile" if kind.endswith("+profile") else "plain"]
        return run_lazy(ctrd, sn, ref, n, cmd)
    finally:
        forget(ctrd)
        sn.stop()
        sn.stop_layer_daemons()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(sn.root, ignore_errors=True)


def summarize(results: dict[str, Any]) -> None:
    loads = results["loadavg"]
    if loads:
        print(f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")
    print("| image | link | snapshotter | time to ready, median (min-max) | pull | run | "
          "bytes fetched |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r["image"], r["rate"]) for r in results["runs"]})
    for image, rate in keys:
        medians = {}
        for kind in KINDS:
            rows = [r for r in results["runs"] if (r["image"], r["rate"], r["snapshotter"])
                    == (image, rate, kind)]
            if not rows:
                continue
            times = [r["ready_s"] for r in rows]
            medians[kind] = statistics.median(times)
            fetched = statistics.median(r["bytes"] for r in rows)
            comp = results["images"][image]["compressed"]
            print(f"| {image} | {rate} | {kind} | {medians[kind]:.2f} s ({min(times):.2f}-"
                  f"{max(times):.2f}) | {statistics.median(r['pull_s'] for r in rows):.2f} s | "
                  f"{statistics.median(r['run_s'] for r in rows):.2f} s | "
                  f"{fetched / 1e6:.1f} MB ({100 * fetched / comp:.1f} % of {comp / 1e6:.0f} MB)"
                  f" |")
        for kind, other in (("hybrid-erofs+profile", "hybrid-erofs"),
                            ("hybrid-erofs-1by1+profile", "hybrid-erofs-1by1"),
                            ("hybrid-erofs", "hybrid-erofs-1by1"),
                            ("hybrid-erofs+profile", "hybrid-erofs-1by1"),
                            ("hybrid-erofs", "overlayfs")):
            if kind in medians and other in medians:
                print(f"| {image} | {rate} | {kind} / {other} | "
                      f"{medians[kind] / medians[other]:.2f}x | | | |")


if __name__ == "__main__":
    main()
