"""Issue 14 items 2-6 and issue 11 items 7 and 12: index files that do not belong together are
refused by every command in one line naming both digests, old formats are refused clearly, one
JSON vocabulary, stale temporary files are cleaned, archive data is printed escaped."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hybrid_erofs.cli import main
from hybrid_erofs.gzindex.sidecar import sidecar_path
from hybrid_erofs.outfile import OutputSet, remove_stale_temporaries, write_atomic
from hybrid_erofs.printable import format_time, printable, printable_message
from hybrid_erofs.source import FileSource
from hybrid_erofs.trust.binding import meta_blob_digest

CLI = [sys.executable, "-m", "hybrid_erofs"]
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    return result.output


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return raw.getvalue()


def _file(name: str, data: bytes, **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = 1700000000, 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def _noise(seed: str, size: int) -> bytes:
    import hashlib
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{len(out)}".encode()).digest()
    return bytes(out[:size])


def _layer(path: Path, seed: str) -> Path:
    data = [_file(f"etc/{seed}.conf", f"{seed}\n".encode() * 100),
            _file("usr/bin/tool", _noise(seed, 200_000 + 1000 * len(seed)), mode=0o755)]
    path.write_bytes(gzip.compress(_tar(data), mtime=0))
    return path


@pytest.fixture
def two_layers(tmp_path: Path) -> tuple[Path, Path]:
    return _layer(tmp_path / "one.tar.gz", "one"), _layer(tmp_path / "two.tar.gz", "second")


def _digest(path: Path) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# -- issue 11 item 7: two layers indexed into one directory share m.erofs ---------------------------

def test_a_meta_of_another_layer_is_named_by_both_digests(two_layers: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    one, two = two_layers
    out = tmp_path / "idx"
    out.mkdir()
    assert run("index", str(one), "-o", str(out / "one.zinfo")).exit_code == 0
    second = run("index", str(two), "-o", str(out / "two.zinfo"))
    assert second.exit_code == 0
    assert f"replaced {out / 'm.erofs'}, which was built for another layer" in second.stderr
    assert _digest(one) in second.stderr
    meta, zinfo = str(out / "m.erofs"), str(out / "one.zinfo")
    expected = (f"this meta was built for another layer (blob {_digest(two)}); {zinfo} is for "
                f"blob {_digest(one)}")
    for command in (["cat", "--meta", meta, "--zinfo", zinfo, str(one), "/etc/one.conf"],
                    ["ls", "--meta", meta, "--zinfo", zinfo, str(one), "/etc"],
                    ["ls", "--meta", meta, "--zinfo", zinfo, "/etc"],
                    ["verify", "--meta", meta, "--zinfo", zinfo, str(one)]):
        assert expected in one_line_error(run(*command)), command
    # Without the sidecar the meta is checked against the blob itself (issue 14 item 2).
    sidecar_path(out / "one.zinfo").unlink()
    result = run("cat", "--meta", meta, "--zinfo", zinfo, str(one), "/etc/one.conf")
    assert (f"this meta was built for another layer (blob {_digest(two)}); {one} is blob "
            f"{_digest(one)}") in one_line_error(result)
    result = run("read", str(one), "--zinfo", str(out / "two.zinfo"), "--length", "10")
    assert "not the layer" in one_line_error(result)


def test_the_meta_records_its_blob(two_layers: tuple[Path, Path], tmp_path: Path) -> None:
    one, _ = two_layers
    assert run("index", str(one), "-o", str(tmp_path / "l.zinfo")).exit_code == 0
    source = FileSource(tmp_path / "m.erofs")
    try:
        assert meta_blob_digest(source) == _digest(one)
    finally:
        source.close()
    raw = one.with_suffix("").with_suffix(".tar")
    raw.write_bytes(gzip.decompress(one.read_bytes()))
    assert run("index", str(raw), "--meta", str(tmp_path / "t.erofs")).exit_code == 0
    source = FileSource(tmp_path / "t.erofs")
    try:
        assert meta_blob_digest(source) == _digest(raw)  # a plain tar is its own blob
    finally:
        source.close()


# -- issue 14 item 4: every command honours the sidecar's meta digest ------------------------------

def test_cat_ls_and_verify_refuse_a_meta_the_sidecar_rejects(two_layers: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    one, _ = two_layers
    zinfo, meta = tmp_path / "l.zinfo", tmp_path / "m.erofs"
    assert run("index", str(one), "-o", str(zinfo)).exit_code == 0
    # The same layer's meta, built again with another UUID: it names the right blob but is
    # not the meta the sidecar vouches for.
    other = tmp_path / "other.erofs"
    assert run("index", str(one), "-o", str(tmp_path / "x.zinfo"), "--meta", str(other),
               "--uuid", "12345678-1234-1234-1234-123456789abc").exit_code == 0
    os.replace(other, meta)
    for command in (["cat", "--meta", str(meta), "--zinfo", str(zinfo), str(one), "/etc/one.conf"],
                    ["ls", "--meta", str(meta), "--zinfo", str(zinfo), "/etc"],
                    ["verify", "--meta", str(meta), "--zinfo", str(zinfo), str(one)]):
        assert "not the meta built with" in one_line_error(run(*command)), command


# -- issue 11 item 12: old formats are refused clearly; one vocabulary ---------------------------

def test_version_1_files_are_refused_clearly(two_layers: tuple[Path, Path], tmp_path: Path) -> None:
    one, _ = two_layers
    zinfo = tmp_path / "l.zinfo"
    assert run("index", str(one), "-o", str(zinfo)).exit_code == 0
    side = json.loads(sidecar_path(zinfo).read_text())
    side["version"] = 1
    sidecar_path(zinfo).write_text(json.dumps(side))
    result = run("cat", "--meta", str(tmp_path / "m.erofs"), "--zinfo", str(zinfo), str(one),
                 "/etc/one.conf")
    assert ("zinfo sidecar version 1 is not supported (this hybrid-erofs reads version 2; index "
            "the layer again)") in one_line_error(result)
    from hybrid_erofs.errors import IndexFormatError
    from hybrid_erofs.indexing.imageindex import parse_image_index

    with pytest.raises(IndexFormatError, match="image index version 1 is not supported"):
        parse_image_index(json.dumps({"format": "hybrid-erofs/image-index", "version": 1,
                                      "images": []}).encode())


def _digests(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (json path, value) whose key names a digest, and keys that must not exist."""
    found: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            assert "sha256" not in key, f"{path}.{key}: digests live under 'digest'"
            if key == "digest" or key.endswith("_digest"):
                found.append((f"{path}.{key}", item))
            found += _digests(item, f"{path}.{key}")
    elif isinstance(value, list):
        for number, item in enumerate(value):
            found += _digests(item, f"{path}[{number}]")
    return found


def test_one_json_vocabulary(two_layers: tuple[Path, Path], tmp_path: Path) -> None:
    one, _ = two_layers
    zinfo = tmp_path / "l.zinfo"
    result = run("index", str(one), "-o", str(zinfo), "--span", "64KiB", "--json")
    documents = {"index --json": json.loads(result.stdout),
                 "sidecar": json.loads(sidecar_path(zinfo).read_text())}
    plain = run("inspect", str(zinfo), "--json")
    documents["inspect --json"] = json.loads(plain.stdout)
    listed = json.loads(run("inspect", str(zinfo), "--json", "--checkpoints").stdout)
    assert "checkpoint_list" not in documents["inspect --json"]
    assert len(listed["checkpoint_list"]) == listed["checkpoints"] > 1
    report = documents["index --json"]
    assert report["blob"] == {"digest": _digest(one), "size": one.stat().st_size}
    assert report["zinfo"]["digest"] == _digest(zinfo) == documents["sidecar"]["zinfo"]["digest"]
    assert report["meta"]["digest"] == _digest(tmp_path / "m.erofs")
    assert documents["inspect --json"]["sidecar"]["blob"] == report["blob"]
    for name, document in documents.items():
        found = _digests(document)
        assert found, name
        for where, value in found:
            assert isinstance(value, str) and DIGEST.fullmatch(value), f"{name}{where}: {value}"
    for span in documents["sidecar"]["spans"]:
        assert DIGEST.fullmatch(span[2])


# -- issue 14 item 3 (part): temporary files of killed writers --------------------------------------

def test_stale_temporaries_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    target = tmp_path / "layer.zinfo"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".layer.zinfo.{dead}-abcd1234.tmp"
    old_style = tmp_path / ".layer.zinfo.k3j4h5g6.tmp"
    live = tmp_path / f".layer.zinfo.{os.getppid()}-zzzz0000.tmp"
    other = tmp_path / f".layer.zinfo.json.{dead}-abcd1234.tmp"  # another file's
    for path in (stale, old_style, live, other):
        path.write_bytes(b"x")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists() and not old_style.exists()
    assert live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "layer.zinfo.json") == [other]


def test_an_output_set_is_renamed_in_order_or_not_at_all(tmp_path: Path) -> None:
    with OutputSet() as files:
        files.add(tmp_path / "a", b"a")
        files.add(tmp_path / "b", b"b")
        assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # left by an exception or without commit: nothing
    with OutputSet() as files:
        files.add(tmp_path / "a", b"a")
        files.add(tmp_path / "b", b"b")
        files.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# -- issue 14 items 5 and 6: archive data is printed escaped -----------------------------------------

def test_printable_escapes_what_a_terminal_acts_on() -> None:
    assert printable("plain/name.txt") == "plain/name.txt"
    assert printable(b"a\nError: forged\r\x1b[2K") == "a\\nError: forged\\r\\e[2K"
    assert printable(b"caf\xc3\xa9 \xff") == "café \\xff"
    assert printable("a\u202eb") == "a\\u202eb"
    assert printable("back\\slash") == "back\\\\slash"
    assert printable_message("C:\\dir a\nb") == "C:\\dir a\\nb"
    assert format_time(0) == "1970-01-01 00:00:00"
    assert format_time(2**60) == f"@{2**60}"


def _strict_utf8(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env,
                          errors="surrogateescape")


def test_huge_times_and_non_utf8_names_print_escaped(tmp_path: Path) -> None:
    members = [_file("future", b"f", mtime=2**60), _file("bad\udcffname", b"x"),
               _file("a", b"first a\n")]
    link = tarfile.TarInfo("b\udcfflink")
    link.type, link.linkname, link.mtime = tarfile.LNKTYPE, "a", 1700000000
    members += [(link, b""), _file("a", b"the a that replaced it\n")]
    layer = tmp_path / "odd.tar"
    layer.write_bytes(_tar(members, fmt=tarfile.GNU_FORMAT))
    meta = tmp_path / "odd.erofs"
    assert run("index", str(layer), "--meta", str(meta)).exit_code == 0
    listing = _strict_utf8(["ls", "--meta", str(meta), "-l", "/"])
    assert listing.returncode == 0, listing.stderr
    # containerd's boundTime: an mtime past 2262 unpacks as 1970 (docs/tar.md); how such a
    # time in another tool's image prints: test_printable_escapes_what_a_terminal_acts_on.
    assert "1970-01-01 00:00:00 future" in listing.stdout
    assert "bad\\xffname" in listing.stdout and "Traceback" not in listing.stderr
    checked = _strict_utf8(["verify", "--meta", str(meta), str(layer)])
    assert "Traceback" not in checked.stderr, checked.stderr
    assert "/b\\xfflink" in checked.stdout, checked.stdout


def test_control_characters_in_names_cannot_forge_lines(tmp_path: Path) -> None:
    members = [_file("x\nError: forged\r", b"a file"), _file("x\nError: forged\r/child", b"")]
    layer = tmp_path / "evil.tar"
    layer.write_bytes(_tar(members))
    result = subprocess.run([*CLI, "index", str(layer), "--meta", str(tmp_path / "m.erofs")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "\r" not in result.stderr, repr(result.stderr)
    assert "x\\nError: forged\\r" in result.stderr
