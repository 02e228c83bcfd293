"""`hybrid-erofs ls / cat / verify` through click's CliRunner on the committed EROFS fixtures."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hybrid_erofs.cli import main
from tests.unit.test_erofs_reader import _fix_crc

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "erofs"
META, TAR = str(FIXTURES / "tarfile-gnu.erofs"), str(FIXTURES / "tarfile-gnu.tar")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _no_traceback(result: Result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def test_ls_root_long() -> None:
    result = run("ls", "--meta", META, "-l")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("-rw-r-----") and line.endswith(" bigids") for line in lines)
    assert any(" 3000000 4000000 " in line for line in lines)
    assert any(line.startswith("l") and " longlink -> LLLL" in line for line in lines)


def test_ls_names_file_and_layer_argument() -> None:
    assert run("ls", "--meta", META).output.split() == [
        "bigids", "d" * 60, "future", "hardlong", "longlink", "neg", "neg-dir"]
    assert run("ls", "--meta", META, TAR, "/neg").output == "neg\n"
    assert run("ls", "--meta", META, TAR).exit_code == 0


def test_ls_recursive_json() -> None:
    result = run("ls", "--meta", META, "-R", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    by_path = {entry["path"]: entry for entry in entries}
    assert by_path["/bigids"]["uid"] == 3000000 and by_path["/bigids"]["type"] == "file"
    assert any(path.endswith("/" + "f" * 200) for path in by_path)
    assert by_path["/longlink"]["target"] == "L" * 300
    recursive_text = run("ls", "--meta", META, "-R").output
    assert recursive_text.startswith("/:\n") and "\n/neg-dir:\n" in recursive_text


def test_cat_file_and_symlink_errors() -> None:
    result = run("cat", "--meta", META, TAR, "/bigids")
    assert result.exit_code == 0 and result.stdout_bytes == b"ids\n"
    deep = "/".join(["d" * 60] * 4) + "/" + "f" * 200
    assert run("cat", "--meta", META, TAR, deep).stdout_bytes == run(
        "cat", "--meta", META, TAR, "/hardlong").stdout_bytes
    for args, words in [(("/neg-dir",), "is a directory"), (("/missing",), "no such file"),
                        (("/longlink",), "no such file")]:
        result = run("cat", "--meta", META, TAR, *args)
        assert result.exit_code == 1 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        _no_traceback(result)


def test_verify_ok_text_and_json() -> None:
    result = run("verify", "--meta", META, TAR)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{META}: OK: 4 files, 6 dirs, 1 symlink, 0 others") and "B/s)" in result.output
    report = json.loads(run("verify", "--meta", META, "--json").output)
    assert report["ok"] and report["files"] == 4 and report["bytes_read"] == 0


def test_verify_reports_problems(tmp_path: Path) -> None:
    meta = bytearray((FIXTURES / "tarfile-gnu.erofs").read_bytes())
    meta += bytes(512)                        # meta size no longer blocks * 512
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(bytes(_fix_crc(meta)))
    result = run("verify", "--meta", str(bad), TAR, "--max-problems", "1")
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("problem: superblock: meta image is")
    _no_traceback(result)
    # the wrong layer: headers and sizes do not match
    result = run("verify", "--meta", META, str(FIXTURES / "raw-features.tar"), "--json")
    assert result.exit_code == 1 and json.loads(result.output)["problem_count"] > 0


@pytest.mark.parametrize("command", [["ls"], ["cat", TAR, "/bigids"], ["verify"]])
def test_bad_inputs_give_one_line(command: list[str], tmp_path: Path) -> None:
    missing = run(command[0], "--meta", str(tmp_path / "nope.erofs"), *command[1:])
    not_erofs = run(command[0], "--meta", TAR, *command[1:])
    short = tmp_path / "short.erofs"
    short.write_bytes(b"x" * 100)
    too_short = run(command[0], "--meta", str(short), *command[1:])
    for result, words in [(missing, "cannot open"), (not_erofs, "not an EROFS image"),
                          (too_short, "outside the meta image")]:
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and words in result.output
        assert len(result.output.strip().splitlines()) == 1
        _no_traceback(result)


def test_cat_gzip_layer_without_zinfo(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))
    result = run("cat", "--meta", META, str(layer), "/bigids")
    assert result.exit_code == 1 and "zinfo" in result.output
    _no_traceback(result)


def test_chunk_past_device_is_a_problem(tmp_path: Path) -> None:
    meta = bytearray((FIXTURES / "tarfile-gnu.erofs").read_bytes())
    # bigids: patch its chunk index (found through the reader) to point past the layer.
    from hybrid_erofs.erofs.reader import ErofsImage
    from hybrid_erofs.source import MemorySource
    with ErofsImage(MemorySource(bytes(meta))) as image:
        inode = image.lookup("/bigids")
    struct.pack_into("<I", meta, -(-inode.tail_offset // 8) * 8 + 4, 5000)
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(bytes(_fix_crc(meta)))
    result = run("verify", "--meta", str(bad))
    assert result.exit_code == 1 and "/bigids" in result.output and "past" in result.output
    result = run("cat", "--meta", str(bad), TAR, "/bigids")
    assert result.exit_code == 1 and result.output.startswith("Error: nid ")
