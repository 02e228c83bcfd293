"""Install the erofs-utils reference tools the tests compare against (the oracle): Debian
unstable's erofs-utils and every library it needs, each .deb pinned by version and sha256 in
tools/erofs-oracle.pins, unpacked into a private prefix and run through that prefix's own
dynamic loader, so nothing of the system changes. Wrappers: BINDIR/{mkfs,dump,fsck}.erofs-oracle.

A pinned .deb that no mirror serves any more, or whose bytes differ from the pin, stops the
install with one line naming the package: a new upstream release never slips in unnoticed.
`--repin` rewrites the pins from Debian unstable's current (signature-checked) package index.

    python3 tools/install_erofs_oracle.py              # as root: /opt/hybrid-erofs, /usr/local/bin
    python3 tools/install_erofs_oracle.py --prefix DIR --bindir DIR
    python3 tools/install_erofs_oracle.py --repin      # then commit tools/erofs-oracle.pins
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PINS = HERE / "erofs-oracle.pins"
PACKAGE = "erofs-utils"
TOOLS = ("mkfs.erofs", "dump.erofs", "fsck.erofs")
SUFFIX = "-oracle"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "HYBRID_EROFS_DEBIAN_MIRROR"  # tried first; e.g. a local mirror or proxy
SNAPSHOT = "https://snapshot.debian.org/archive/debian"  # keeps every file ever published
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Debian architecture -> (multiarch triplet, dynamic loader).
ARCHES = {"amd64": ("x86_64-linux-gnu", "ld-linux-x86-64.so.2"),
          "arm64": ("aarch64-linux-gnu", "ld-linux-aarch64.so.1")}
TIMEOUT_S = 60.0
COMPLETE = ".complete"  # written last into a prefix: its content is the pins it was made from


class OracleError(Exception):
    """One line for the user; the installer exits 1 with it."""


@dataclass(frozen=True, slots=True)
class Pin:
    """One .deb: where it lies in the Debian pool and the sha256 its bytes must have."""

    arch: str
    package: str
    version: str
    filename: str  # pool/main/e/erofs-utils/erofs-utils_1.9.4-1_amd64.deb
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class PinFile:
    suite: str
    snapshot: str | None  # a snapshot.debian.org timestamp at which every pin was published
    pins: tuple[Pin, ...]

    def for_arch(self, arch: str) -> list[Pin]:
        chosen = [pin for pin in self.pins if pin.arch == arch]
        if not chosen:
            have = ", ".join(sorted({pin.arch for pin in self.pins})) or "none"
            raise OracleError(f"{PINS.name}: no pins for architecture {arch} (it has: {have}); "
                              f"run `{Path(sys.argv[0]).name} --repin --arch {arch}`")
        return chosen

    def version(self, arch: str) -> str:
        for pin in self.for_arch(arch):
            if pin.package == PACKAGE:
                return pin.version
        raise OracleError(f"{PINS.name}: {PACKAGE} itself is not pinned for {arch}")


# -- the pins file ----------------------------------------------------------------------------------

def parse_pins(text: str, *, name: str = PINS.name) -> PinFile:
    """`suite S`, `snapshot TS` and `ARCH PACKAGE VERSION FILENAME SHA256 SIZE` lines; # comments."""
    suite, snapshot, pins = "", None, []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if fields[0] == "suite" and len(fields) == 2:
            suite = fields[1]
        elif fields[0] == "snapshot" and len(fields) == 2:
            snapshot = fields[1]
        elif len(fields) == 6 and re.fullmatch(r"[0-9a-f]{64}", fields[4]) and fields[5].isdigit():
            pins.append(Pin(fields[0], fields[1], fields[2], fields[3], fields[4], int(fields[5])))
        else:
            raise OracleError(f"{name}:{number}: not a pin line: {raw.strip()!r}")
    if not suite or not pins:
        raise OracleError(f"{name}: no suite line or no pins")
    return PinFile(suite, snapshot, tuple(pins))


def format_pins(suite: str, snapshot: str, release_date: str, pins: Sequence[Pin]) -> str:
    lines = [
        "# The erofs-utils oracle: every .deb tools/install_erofs_oracle.py unpacks, pinned.",
        f"# From Debian {suite} (Release of {release_date}); rewrite with",
        "# `python3 tools/install_erofs_oracle.py --repin` when the mirror no longer has them.",
        "# ARCH PACKAGE VERSION POOL-FILENAME SHA256 SIZE",
        f"suite {suite}",
        f"snapshot {snapshot}",
    ]
    lines += [f"{p.arch} {p.package} {p.version} {p.filename} {p.sha256} {p.size}" for p in pins]
    return "\n".join(lines) + "\n"


def pins_digest(pins: Sequence[Pin]) -> str:
    text = "".join(f"{p.package} {p.version} {p.sha256}\n" for p in pins)
    return hashlib.sha256(text.encode()).hexdigest()


# -- downloads --------------------------------------------------------------------------------------

def system_mirrors() -> list[str]:
    """The Debian mirrors apt already uses (deb822 .sources and one-line sources.list)."""
    found: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    files = sorted(sources.glob("*.sources")) if sources.is_dir() else []
    for path in files:
        with contextlib.suppress(OSError):
            found += re.findall(r"(?m)^URIs:\s*(\S+)", path.read_text())
    with contextlib.suppress(OSError):
        found += re.findall(r"(?m)^deb\s+(?:\[[^]]*\]\s+)?(\S+)", Path("/etc/apt/sources.list")
                            .read_text())
    return [uri.rstrip("/") for uri in found if "security" not in uri]


def mirrors(explicit: Sequence[str], snapshot: str | None) -> list[str]:
    """Where to look, in order: --mirror, $HYBRID_EROFS_DEBIAN_MIRROR, apt's mirrors,
    deb.debian.org, then snapshot.debian.org at the pins' timestamp."""
    chosen = list(explicit)
    if not chosen:
        env = os.environ.get(MIRROR_ENV)
        chosen = ([env] if env else []) + system_mirrors() + [DEFAULT_MIRROR]
        if snapshot:
            chosen.append(f"{SNAPSHOT}/{snapshot}")
    unique: list[str] = []
    for uri in chosen:
        uri = uri.rstrip("/")
        if uri not in unique:
            unique.append(uri)
    return unique


def _fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "hybrid-erofs-oracle"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        data: bytes = response.read()
        return data


def fetch_first(paths: str, uris: Sequence[str]) -> tuple[bytes, str]:
    """The bytes of `paths` (relative to a mirror root) from the first mirror that has it;
    OracleError listing every failure when none has."""
    failures: list[str] = []
    for uri in uris:
        url = f"{uri}/{paths}"
        try:
            return _fetch(url), url
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            failures.append(f"{url}: {reason}")
    raise OracleError("; ".join(failures) or f"{paths}: no mirror to try")


def obtain(pin: Pin, uris: Sequence[str], cache: Path | None) -> Path:
    """The pinned .deb, its sha256 checked: from `cache` when there, else downloaded."""
    name = pin.filename.rsplit("/", 1)[-1]
    if cache is not None:
        cached = cache / name
        if cached.is_file() and _sha256(cached.read_bytes()) == pin.sha256:
            return cached
    try:
        data, url = fetch_first(pin.filename, uris)
    except OracleError as exc:
        raise OracleError(
            f"{pin.package} {pin.version} ({pin.arch}): no mirror has it any more ({exc}); "
            f"the pins are out of date: run `python3 tools/install_erofs_oracle.py --repin`, "
            f"check the new erofs-utils against the tests and commit {PINS.name}") from None
    digest = _sha256(data)
    if digest != pin.sha256:
        raise OracleError(f"{pin.package} {pin.version}: {url} has sha256 {digest}, the pin "
                          f"says {pin.sha256}: refusing it")
    target_dir = cache if cache is not None else Path(tempfile.mkdtemp(prefix="erofs-oracle-"))
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / name
    partial = target.with_name(f".{name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- install ----------------------------------------------------------------------------------------

def default_locations() -> tuple[Path, Path, Path]:
    """(prefix root, bindir, .deb cache): system-wide for root, else under the user's home."""
    if os.geteuid() == 0:
        return (Path("/opt/hybrid-erofs/oracle"), Path("/usr/local/bin"),
                Path("/var/cache/hybrid-erofs-ci/debs"))
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (data / "hybrid-erofs/oracle", Path.home() / ".local/bin",
            cache / "hybrid-erofs/debs")


def wrapper_text(prefix: Path, arch: str, tool: str) -> str:
    """A shell wrapper that runs `tool` with the prefix's loader and libraries only."""
    triplet, loader = ARCHES[arch]
    libdirs = ":".join(str(prefix / d) for d in (f"usr/lib/{triplet}", f"lib/{triplet}"))
    binary = next((prefix / d / tool for d in ("usr/bin", "usr/sbin", "sbin", "bin")
                   if (prefix / d / tool).exists()), None)
    if binary is None:
        raise OracleError(f"{prefix}: {PACKAGE} has no {tool}")
    return (f"#!/bin/sh\n# {tool} from the pinned {PACKAGE} oracle (tools/install_erofs_oracle.py)"
            f"\nexec {prefix}/usr/lib/{triplet}/{loader} --library-path {libdirs} {binary} "
            f'"$@"\n')


def write_wrapper(path: Path, text: str) -> None:
    """Atomically: a test running now sees the old wrapper or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.chmod(0o755)
    os.replace(partial, path)


def unpack(debs: Iterable[Path], prefix: Path) -> None:
    """dpkg-deb -x every .deb into a fresh directory, then move it to `prefix` in one step."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.", dir=prefix.parent))
    try:
        for deb in debs:
            result = subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise OracleError(f"{deb.name}: dpkg-deb -x failed: "
                                  f"{result.stderr.strip().splitlines()[-1:]}")
        if prefix.exists():
            shutil.rmtree(prefix)
        os.replace(staging, prefix)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_version(bindir: Path, version: str) -> str:
    """Run the installed mkfs.erofs wrapper: it must start and report the pinned version."""
    upstream = version.split(":")[-1].rsplit("-", 1)[0]
    tool = bindir / f"mkfs.erofs{SUFFIX}"
    try:
        result = subprocess.run([str(tool), "--version"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OracleError(f"{tool}: does not run: {exc}") from exc
    first = (result.stdout or result.stderr).strip().splitlines()[:1]
    if result.returncode != 0 or not first or upstream not in first[0]:
        raise OracleError(f"{tool} --version: expected {PACKAGE} {upstream}, got "
                          f"{first[0] if first else 'nothing'} (exit {result.returncode})")
    return first[0]


def install(*, arch: str, root: Path, bindir: Path, cache: Path | None,
            uris: Sequence[str] | None = None, pins_text: str | None = None,
            say: Callable[[str], None] = print) -> str:
    """Install (or find installed) the pinned oracle; return `mkfs.erofs --version`'s line."""
    pinfile = parse_pins(PINS.read_text() if pins_text is None else pins_text)
    if arch not in ARCHES:
        raise OracleError(f"architecture {arch} is not supported (only {', '.join(ARCHES)})")
    pins = pinfile.for_arch(arch)
    version = pinfile.version(arch)
    digest = pins_digest(pins)
    prefix = root / f"{PACKAGE}-{version}-{digest[:12]}"
    marker = prefix / COMPLETE
    if not (marker.is_file() and marker.read_text() == digest):
        chosen = mirrors(uris or (), pinfile.snapshot)
        say(f"{PACKAGE} {version} oracle: {len(pins)} pinned packages into {prefix}")
        debs = [obtain(pin, chosen, cache) for pin in pins]
        unpack(debs, prefix)
        (prefix / COMPLETE).write_text(digest)
        if cache is None:
            for deb in debs:
                shutil.rmtree(deb.parent, ignore_errors=True)
    for tool in TOOLS:
        write_wrapper(bindir / f"{tool}{SUFFIX}", wrapper_text(prefix, arch, tool))
    return check_version(bindir, version)


# -- repin ------------------------------------------------------------------------------------------

def verified_release(uri: str, suite: str) -> str:
    """dists/SUITE/InRelease with its signature checked by gpgv against Debian's keyring."""
    data, url = fetch_first(f"dists/{suite}/InRelease", [uri])
    if not KEYRING.is_file():
        raise OracleError(f"{KEYRING}: missing (apt-get install debian-archive-keyring)")
    with tempfile.TemporaryDirectory() as work:
        signed, plain = Path(work) / "InRelease", Path(work) / "Release"
        signed.write_bytes(data)
        result = subprocess.run(["gpgv", "--keyring", str(KEYRING), "--output", str(plain),
                                 str(signed)], capture_output=True, text=True)
        if result.returncode != 0:
            raise OracleError(f"{url}: bad signature: {result.stderr.strip().splitlines()[-1:]}")
        return plain.read_text()


def packages_index(uri: str, suite: str, arch: str, release: str) -> dict[str, dict[str, str]]:
    """main/binary-ARCH/Packages.xz, its sha256 checked against the signed Release."""
    path = f"main/binary-{arch}/Packages.xz"
    match = re.search(rf"(?m)^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(path)}$",
                      release.split("SHA256:", 1)[-1])
    if match is None:
        raise OracleError(f"dists/{suite}/InRelease: lists no {path}")
    data, url = fetch_first(f"dists/{suite}/{path}", [uri])
    if _sha256(data) != match.group(1):
        raise OracleError(f"{url}: sha256 differs from the signed Release")
    stanzas: dict[str, dict[str, str]] = {}
    for block in lzma.decompress(data).decode().split("\n\n"):
        fields = dict(re.findall(r"(?m)^([A-Za-z0-9-]+):[ \t]*(.*)$", block))
        if "Package" in fields:
            stanzas[fields["Package"]] = fields
    return stanzas


def closure(stanzas: dict[str, dict[str, str]], root: str) -> list[str]:
    """`root` and everything its Pre-Depends/Depends need (first satisfiable alternative)."""
    provides: dict[str, str] = {}
    for name, fields in stanzas.items():
        for item in fields.get("Provides", "").split(","):
            provides.setdefault(item.strip().split(" ")[0], name)
    order: list[str] = []
    todo = [root]
    while todo:
        name = todo.pop(0)
        if name in order:
            continue
        if name not in stanzas:
            raise OracleError(f"{name}: not in the package index")
        order.append(name)
        for field in ("Pre-Depends", "Depends"):
            for relation in filter(None, (r.strip() for r in stanzas[name].get(field, "")
                                          .split(","))):
                for alternative in relation.split("|"):
                    wanted = alternative.strip().split(" ")[0].split(":")[0]
                    real = wanted if wanted in stanzas else provides.get(wanted)
                    if real is not None:
                        todo.append(real)
                        break
                else:
                    raise OracleError(f"{name}: cannot satisfy {relation!r}")
    return order


def repin(*, arches: Sequence[str], uri: str, suite: str = "sid") -> str:
    release = verified_release(uri, suite)
    date_match = re.search(r"(?m)^Date:\s*(.+)$", release)
    if date_match is None:
        raise OracleError(f"dists/{suite}/InRelease: no Date")
    released = datetime.datetime.strptime(date_match.group(1).strip(),
                                          "%a, %d %b %Y %H:%M:%S %Z")
    # snapshot.debian.org serves the archive as it was at a time: half a day after the Release,
    # every file it lists has been published there.
    snapshot = (released + datetime.timedelta(hours=12)).strftime("%Y%m%dT%H%M%SZ")
    pins: list[Pin] = []
    for arch in arches:
        stanzas = packages_index(uri, suite, arch, release)
        for name in sorted(closure(stanzas, PACKAGE)):
            fields = stanzas[name]
            pins.append(Pin(arch, name, fields["Version"], fields["Filename"], fields["SHA256"],
                            int(fields["Size"])))
    return format_pins(suite, snapshot, date_match.group(1).strip(), pins)


# -- command line -----------------------------------------------------------------------------------

def host_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        machine = os.uname().machine
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def main(argv: Sequence[str] | None = None) -> int:
    root, bindir, cache = default_locations()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=Path, default=root,
                        help=f"where versions are unpacked [default: {root}]")
    parser.add_argument("--bindir", type=Path, default=bindir,
                        help=f"where the *-oracle wrappers go [default: {bindir}]")
    parser.add_argument("--cache", type=Path, default=cache,
                        help=f"keep downloaded .debs here [default: {cache}]")
    parser.add_argument("--mirror", action="append", default=[],
                        help="Debian mirror to use (repeatable) [default: $"
                             f"{MIRROR_ENV}, apt's mirrors, {DEFAULT_MIRROR}, snapshot.debian.org]")
    parser.add_argument("--arch", action="append", default=[],
                        help="with --repin: architectures to pin [default: amd64 and arm64]")
    parser.add_argument("--repin", action="store_true",
                        help=f"rewrite {PINS.name} from Debian unstable's current index")
    args = parser.parse_args(argv)
    try:
        if args.repin:
            uri = (args.mirror or [DEFAULT_MIRROR])[0].rstrip("/")
            PINS.write_text(repin(arches=args.arch or ["amd64", "arm64"], uri=uri))
            print(f"wrote {PINS}")
            return 0
        line = install(arch=host_arch(), root=args.prefix, bindir=args.bindir, cache=args.cache,
                       uris=args.mirror)
        print(f"{line} ({args.bindir}/mkfs.erofs{SUFFIX})")
        return 0
    except OracleError as exc:
        print(f"install_erofs_oracle: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"install_erofs_oracle: {exc.filename or ''}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
