"""tools/install_erofs_oracle.py against a loopback Debian mirror of real .debs (built with
dpkg-deb): pinned bytes install and run, every failure (gone from the mirror, other bytes, wrong
version, bad pins) stops it with one line naming the package, and the committed pins install
into a fresh prefix from the downloaded .debs alone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import ci_required, install_erofs_oracle

oracle = install_erofs_oracle
ARCH = "amd64"
TRIPLET = "x86_64-linux-gnu"
# Stands in for ld-linux: `LOADER --library-path DIRS BINARY ARGS...` runs BINARY ARGS.
FAKE_LOADER = '#!/bin/sh\n[ "$1" = --library-path ] || exit 99\nshift 2\nexec "$@"\n'


class Mirror:
    """A Debian pool over HTTP on 127.0.0.1: path -> bytes; counts the GETs."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.gets: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                mirror.gets.append(self.path)
                data = mirror.files.get(self.path.removeprefix("/debian/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/debian"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    served = Mirror()
    yield served
    served.close()


def build_deb(work: Path, package: str, version: str, files: dict[str, str]) -> bytes:
    """A real .deb (dpkg-deb --build) holding `files` (path -> text, executable)."""
    tree = work / f"{package}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: {ARCH}\n"
        f"Maintainer: tests <tests@example.org>\nDescription: test package\n")
    for name, text in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    out = work / f"{package}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()


def publish(mirror: Mirror, work: Path, *, upstream: str = "1.9.4") -> str:
    """erofs-utils (tools printing `upstream`) and a libc6 with the loader; the pins text."""
    tools = {f"usr/bin/{tool}": f"#!/bin/sh\necho '{tool} (erofs-utils) {upstream}'\n"
             for tool in ("mkfs.erofs", "dump.erofs", "fsck.erofs")}
    debs = {("erofs-utils", "1.9.4-1"): build_deb(work, "erofs-utils", "1.9.4-1", tools),
            ("libc6", "2.43-7"): build_deb(work, "libc6", "2.43-7", {
                f"usr/lib/{TRIPLET}/ld-linux-x86-64.so.2": FAKE_LOADER})}
    lines = ["suite sid"]
    for (package, version), data in debs.items():
        filename = f"pool/main/{package[0]}/{package}/{package}_{version}_{ARCH}.deb"
        mirror.files[filename] = data
        lines.append(f"{ARCH} {package} {version} {filename} "
                     f"{hashlib.sha256(data).hexdigest()} {len(data)}")
    return "\n".join(lines) + "\n"


def run_install(tmp_path: Path, pins: str, uris: list[str], *, cache: Path | None = None) -> str:
    return str(oracle.install(arch=ARCH, root=tmp_path / "opt", bindir=tmp_path / "bin",
                              cache=cache, uris=uris, pins_text=pins, say=lambda _line: None))


def test_installs_the_pinned_debs_and_the_wrappers_run(mirror: Mirror, tmp_path: Path) -> None:
    pins = publish(mirror, tmp_path / "build")
    line = run_install(tmp_path, pins, [mirror.uri])
    assert line == "mkfs.erofs (erofs-utils) 1.9.4"
    for tool in ("mkfs.erofs", "dump.erofs", "fsck.erofs"):
        out = subprocess.run([str(tmp_path / "bin" / f"{tool}-oracle"), "--version"],
                             capture_output=True, text=True, check=True).stdout
        assert out == f"{tool} (erofs-utils) 1.9.4\n"
    (prefix,) = (tmp_path / "opt").iterdir()
    assert prefix.name.startswith("erofs-utils-1.9.4-1-")
    # Installed once: a second run neither downloads nor unpacks again.
    before = len(mirror.gets)
    assert run_install(tmp_path, pins, [mirror.uri]) == line
    assert len(mirror.gets) == before


def test_next_mirror_when_the_first_lacks_a_file(mirror: Mirror, tmp_path: Path) -> None:
    pins = publish(mirror, tmp_path / "build")
    gone = Mirror()
    try:
        assert run_install(tmp_path, pins, [gone.uri, mirror.uri]).endswith("1.9.4")
        assert len(gone.gets) == 2  # asked for both files, had neither
    finally:
        gone.close()


def test_a_pin_no_mirror_has_stops_the_install(mirror: Mirror, tmp_path: Path) -> None:
    pins = publish(mirror, tmp_path / "build")
    del mirror.files[next(name for name in mirror.files if "/libc6_" in name)]
    with pytest.raises(oracle.OracleError) as caught:
        run_install(tmp_path, pins, [mirror.uri])
    message = str(caught.value)
    assert message.startswith("libc6 2.43-7 (amd64): no mirror has it any more (")
    assert "HTTP 404" in message and "--repin" in message
    assert not (tmp_path / "bin").exists()
    assert not (tmp_path / "opt").exists()  # nothing half-unpacked


def test_other_bytes_than_pinned_are_refused(mirror: Mirror, tmp_path: Path) -> None:
    pins = publish(mirror, tmp_path / "build")
    name = next(name for name in mirror.files if "/erofs-utils_" in name)
    mirror.files[name] += b"\0"
    with pytest.raises(oracle.OracleError, match=r"^erofs-utils 1\.9\.4-1: http://127\.0\.0\.1:"
                       r"\d+/debian/pool/\S+ has sha256 [0-9a-f]{64}, the pin says [0-9a-f]{64}: "
                       r"refusing it$"):
        run_install(tmp_path, pins, [mirror.uri])
    assert not (tmp_path / "bin").exists()


def test_a_tool_of_another_version_is_refused(mirror: Mirror, tmp_path: Path) -> None:
    pins = publish(mirror, tmp_path / "build", upstream="1.8.10")
    with pytest.raises(oracle.OracleError, match=r"mkfs\.erofs-oracle --version: expected "
                       r"erofs-utils 1\.9\.4, got mkfs\.erofs \(erofs-utils\) 1\.8\.10"):
        run_install(tmp_path, pins, [mirror.uri])


def test_cached_debs_install_without_a_mirror(mirror: Mirror, tmp_path: Path) -> None:
    pins = publish(mirror, tmp_path / "build")
    cache = tmp_path / "debs"
    run_install(tmp_path / "first", pins, [mirror.uri], cache=cache)
    asked = len(mirror.gets)
    mirror.files.clear()
    assert run_install(tmp_path / "second", pins, [mirror.uri], cache=cache).endswith("1.9.4")
    assert len(mirror.gets) == asked


def test_cli_reports_one_line_and_exit_1(mirror: Mirror, tmp_path: Path) -> None:
    env = {**os.environ, oracle.MIRROR_ENV: mirror.uri}
    result = subprocess.run(
        ["python3", str(oracle.HERE / "install_erofs_oracle.py"), "--prefix", str(tmp_path / "o"),
         "--bindir", str(tmp_path / "b"), "--cache", str(tmp_path / "c"),
         "--mirror", mirror.uri], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install_erofs_oracle: ")
    assert "no mirror has it any more" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("suite sid\namd64 erofs-utils 1.9.4-1 pool/x.deb nothex 10\n",
     "erofs-oracle.pins:2: not a pin line: 'amd64 erofs-utils 1.9.4-1 pool/x.deb nothex 10'"),
    ("# only a comment\n", "erofs-oracle.pins: no suite line or no pins"),
], ids=["bad-digest", "empty"])
def test_malformed_pins(text: str, message: str) -> None:
    with pytest.raises(oracle.OracleError) as caught:
        oracle.parse_pins(text)
    assert str(caught.value) == message


def test_an_architecture_without_pins_is_named() -> None:
    pins = oracle.parse_pins(f"suite sid\namd64 erofs-utils 1 pool/e.deb {'0' * 64} 1\n")
    with pytest.raises(oracle.OracleError, match=r"no pins for architecture riscv64 \(it has: "
                       r"amd64\); run `.* --repin --arch riscv64`"):
        pins.for_arch("riscv64")


def test_closure_follows_alternatives_and_provides() -> None:
    stanzas = {"erofs-utils": {"Depends": "libc6 (>= 2.38), liblz4-1 | liblz4, libcurl-any"},
               "libc6": {"Depends": "libgcc-s1"}, "libgcc-s1": {"Depends": "libc6 (>= 2.35)"},
               "liblz4-1": {}, "libcurl4t64": {"Provides": "libcurl-any (= 8)"}}
    assert oracle.closure(stanzas, "erofs-utils") == [
        "erofs-utils", "libc6", "liblz4-1", "libcurl4t64", "libgcc-s1"]
    with pytest.raises(oracle.OracleError, match=r"libgcc-s1: cannot satisfy 'libmissing'"):
        oracle.closure({**stanzas, "libgcc-s1": {"Depends": "libmissing"}}, "erofs-utils")


def test_packages_index_must_match_the_signed_release(mirror: Mirror) -> None:
    mirror.files["dists/sid/main/binary-amd64/Packages.xz"] = b"not what was signed"
    release = f"SHA256:\n {'0' * 64} 19 main/binary-amd64/Packages.xz\n"
    with pytest.raises(oracle.OracleError, match=r"Packages\.xz: sha256 differs from the signed "
                       r"Release"):
        oracle.packages_index(mirror.uri, "sid", "amd64", release)


def test_committed_pins_install_into_a_fresh_prefix(tmp_path: Path) -> None:
    """The pins in the repository are complete: from the .debs the test command downloaded,
    a fresh prefix runs the pinned mkfs.erofs (nothing fetched: the mirror is unreachable)."""
    pins = oracle.parse_pins(oracle.PINS.read_text())
    arch = oracle.host_arch()
    cache = oracle.default_locations()[2]
    wanted = pins.for_arch(arch)
    missing = [p.filename.rsplit("/", 1)[-1] for p in wanted
               if not (cache / p.filename.rsplit("/", 1)[-1]).is_file()]
    if missing:
        ci_required(f"{cache}: {len(missing)} pinned .debs not downloaded yet (tools/test "
                    f"downloads them): {', '.join(missing[:3])}")
    line = oracle.install(arch=arch, root=tmp_path / "opt", bindir=tmp_path / "bin",
                          cache=cache, uris=["http://127.0.0.1:9"], say=lambda _line: None)
    assert line.startswith("mkfs.erofs (erofs-utils) ")
    assert pins.version(arch).rsplit("-", 1)[0] in line
