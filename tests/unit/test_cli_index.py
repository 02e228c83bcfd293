"""`hybrid-erofs index`, `inspect` and `read` as a user runs them: outputs, summaries, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.gzindex.format import load_index

from .test_gzip_source import mixed

DATA = mixed(11, 3 << 20)


@pytest.fixture()
def layer(tmp_path: Path) -> Path:
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(DATA, 6))
    return path


def run(*args: str, input: bytes | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_index_writes_zinfo_and_reports(layer: Path, tmp_path: Path) -> None:
    code, out = run("index", str(layer), "-o", str(tmp_path / "l.zinfo"), "--no-meta",
                    "--span", "512KiB", "--json")
    assert code == 0, out
    report = json.loads(out)
    index = load_index(tmp_path / "l.zinfo")
    assert report["zinfo"]["checkpoints"] == len(index) >= 5
    assert report["layer"]["size"] == len(DATA)
    assert report["blob"]["size"] == layer.stat().st_size
    assert report["blob"]["digest"] == "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    assert report["zinfo"]["span"] == index.span == 512 << 10
    assert report["meta"] is None
    code, out = run("index", str(layer), "-o", str(tmp_path / "m.zinfo"), "--no-meta")
    assert code == 0 and "1 checkpoint (span 4.0 MiB)" in out and "MiB/s" in out and out.count("\n") == 1


def test_index_reads_stdin(layer: Path, tmp_path: Path) -> None:
    code, out = run("index", "-", "-o", str(tmp_path / "s.zinfo"), "--no-meta",
                    input=layer.read_bytes())
    assert code == 0, out
    code, _ = run("index", str(layer), "-o", str(tmp_path / "f.zinfo"), "--no-meta")
    assert (tmp_path / "s.zinfo").read_bytes() == (tmp_path / "f.zinfo").read_bytes()


def test_inspect_and_read(layer: Path, tmp_path: Path) -> None:
    zinfo = tmp_path / "l.zinfo"
    assert run("index", str(layer), "-o", str(zinfo), "--no-meta", "--span", "1MiB")[0] == 0
    code, out = run("inspect", str(zinfo))
    assert code == 0 and "zinfo v2" in out and "span 1.0 MiB" in out
    code, out = run("inspect", str(zinfo), "--json")
    assert json.loads(out)["checkpoints"] == len(load_index(zinfo))
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_erofs", "read", str(layer), "--zinfo", str(zinfo),
         "--offset", "1234567", "--length", "100000"], capture_output=True, check=True)
    assert proc.stdout == DATA[1234567 : 1234567 + 100000]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = gzip.compress(DATA[:200_000])
    cases = {
        "empty": (b"", "empty file"),
        "not-gzip": (b"hello world" * 100, "not a gzip file"),
        "truncated": (good[: len(good) // 2], "truncated gzip"),
        "trailing-garbage": (good + b"GARBAGE", "trailing garbage after gzip member 1"),
        "zstd": (b"\x28\xb5\x2f\xfd" + bytes(100), "zstd-compressed, not gzip"),
        "xz": (lzma.compress(b"x" * 1000), "xz-compressed, not gzip"),
        "bzip2": (b"BZh91AY&SY" + bytes(100), "bzip2-compressed, not gzip"),
        "corrupt": (good[:100] + bytes(50) + good[150:], "corrupt gzip data"),
    }
    out = {}
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(data)
        out[name] = (path, message)
    return out


@pytest.mark.parametrize("case", ["empty", "not-gzip", "truncated", "trailing-garbage", "zstd",
                                  "xz", "bzip2", "corrupt"])
def test_bad_layers_give_one_line_and_no_output(tmp_path: Path, case: str) -> None:
    path, message = _bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_erofs", "index", str(path), "-o", str(out_dir / "l.zinfo"),
         "--meta", str(out_dir / "m.erofs")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: {path}: ")
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert list(out_dir.iterdir()) == []  # nothing written, not even a temp file


def test_missing_input_and_unwritable_output(layer: Path, tmp_path: Path) -> None:
    code, out = run("index", str(tmp_path / "nope.tar.gz"), "-o", str(tmp_path / "x.zinfo"))
    assert code == 1 and "nope.tar.gz: no such file" in out
    code, out = run("index", str(layer), "-o", str(tmp_path / "no" / "dir" / "x.zinfo"))
    assert code == 1 and "does not exist" in out
    code, out = run("index", str(layer), "-o", str(tmp_path))
    assert code != 0
    code, out = run("index", str(layer), "-o", str(layer), "--no-meta")
    assert code == 1 and "is the input layer itself" in out
    assert gzip.decompress(layer.read_bytes()) == DATA


def test_unwritable_directory_as_a_user(layer: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        locked = Path("/proc/hybrid-erofs-test")  # not creatable, even for root
    else:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
    code, out = run("index", str(layer), "-o", str(locked / "x.zinfo"), "--no-meta")
    assert code == 1 and "x.zinfo" in out


def test_size_option_validation(layer: Path, tmp_path: Path) -> None:
    code, out = run("index", str(layer), "-o", str(tmp_path / "x.zinfo"), "--span", "4 parsecs")
    assert code == 2 and "not a size" in out


def test_index_writes_the_meta_beside_the_zinfo_by_default(tmp_path: Path) -> None:
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"demo\n"))
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(raw.getvalue()))
    code, out = run("index", str(layer), "-o", str(tmp_path / "layer.zinfo"), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["meta"]["path"] == str(tmp_path / "m.erofs") and report["meta"]["entries"] == 1
    assert (tmp_path / "m.erofs").stat().st_size % 512 == 0
    # A bad tar inside good gzip: one line naming the layer, the entry and the offset.
    bad = bytearray(raw.getvalue())
    bad[1024 + 148] ^= 0x7F  # garbage where the end-of-archive block should be
    layer.write_bytes(gzip.compress(bytes(bad)))
    (tmp_path / "m.erofs").unlink()
    (tmp_path / "layer.zinfo").unlink()
    code, out = run("index", str(layer), "-o", str(tmp_path / "layer.zinfo"))
    assert code == 1 and f"{layer}: " in out and "checksum" in out and "offset 1024" in out
    assert not (tmp_path / "m.erofs").exists() and not (tmp_path / "layer.zinfo").exists()
