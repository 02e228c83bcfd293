"""The tree of a meta || tar is the one containerd unpacks (issue 12, items 1-7, and the rules
of Go's archive/tar and containerd's archive.Apply), read back with our EROFS reader.

The integration suite (tests/integration/test_tar_parity.py) checks the same archives and
many more against containerd's own code through the kernel; these run in milliseconds.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_erofs.erofs.reader import ErofsImage
from hybrid_erofs.erofs.tar import GLOBAL, TarMember, TarParser
from hybrid_erofs.erofs.writer import build_meta
from hybrid_erofs.errors import TarFormatError
from hybrid_erofs.source import MemorySource
from tests.conftest import _load_tool

corpus_tool = _load_tool("make_tar_corpus")
header, member, pax, END = (corpus_tool.header, corpus_tool.member, corpus_tool.pax,
                            corpus_tool.END)
T = 1_700_000_000


def mount(data: bytes, *, aufs: bool = False) -> ErofsImage:
    """Our reader over meta || tar, the way the kernel sees the device."""
    meta = build_meta([data], build_time=T, aufs=aufs)
    return ErofsImage(MemorySource(meta), flat=MemorySource(meta + data + bytes(-len(data) % 512)))


def tree(data: bytes, *, aufs: bool = False) -> dict[str, tuple[int, int, int, int, bytes]]:
    """path -> (mode, uid, gid, mtime, content or symlink target) of every entry."""
    image = mount(data, aufs=aufs)
    out = {}
    for path, inode in image.walk():
        body = b""
        if inode.is_reg:
            body = image.read(inode, inode.size)
        elif inode.is_symlink:
            body = image.readlink(inode).encode()
        out[path] = (inode.mode, inode.uid, inode.gid, inode.mtime, body)
    return out


def refusal(data: bytes) -> str:
    with pytest.raises(TarFormatError) as info:
        build_meta([data], build_time=T)
    message = str(info.value)
    assert "\n" not in message and message.isprintable()
    return message


def parse(data: bytes) -> list[TarMember]:
    out: list[TarMember] = []
    parser = TarParser(out.append)
    parser.feed(data)
    parser.close()
    return out


# -- issue 12, items 1-7 (each failed before) ---------------------------------------------------

@pytest.mark.parametrize("typeflag", [b"1", b"2", b"3", b"4", b"5", b"6"])
def test_header_only_types_carry_no_data_whatever_their_size(typeflag: bytes) -> None:
    # Item 1: CPython's ustar/dirtype-with-size; Go's hdr-only.tar. The "data" of such an
    # entry is the next header, which must not be swallowed.
    data = (member(b"target", b"t\n")
            + header(b"entry", typeflag=typeflag, size=5, linkname=b"target", devmajor=1)
            + member(b"after", b"still here\n") + END)
    got = tree(data)
    assert got["/after"][4] == b"still here\n"
    assert "/entry" in got


def test_v7_regular_type_with_a_trailing_slash_is_a_directory() -> None:
    # Item 2: typeflag NUL + "name/" is an old-style directory (Go, GNU tar, Python).
    data = (member(b"olddir/", typeflag=b"\0", mode=0o750, magic=bytes(8))
            + member(b"olddir/file", b"inside\n", typeflag=b"\0", magic=bytes(8))
            + member(b"plain", b"regular\n", typeflag=b"\0", magic=bytes(8)) + END)
    got = tree(data)
    assert got["/olddir"][0] == stat.S_IFDIR | 0o750
    assert got["/olddir/file"][4] == b"inside\n" and stat.S_ISREG(got["/plain"][0])


def test_regular_type_0_with_a_trailing_slash_stays_a_file() -> None:
    # Go converts only the old NUL type; containerd then cleans the name.
    got = tree(member(b"f/", b"data\n") + END)
    assert stat.S_ISREG(got["/f"][0]) and got["/f"][4] == b"data\n"


@pytest.mark.parametrize("tail", [0, 100])
def test_unpadded_last_entry_without_end_blocks_is_read(tail: int) -> None:
    # Item 3: what a Go tar.Writer that was never closed leaves (umoci insert layers).
    data = member(b"a", b"first\n") + header(b"last", size=7) + b"last!\n\n" + bytes(tail)
    assert tree(data)["/last"][4] == b"last!\n\n"


def test_stream_ending_inside_data_is_refused() -> None:
    data = member(b"a", b"first\n") + header(b"last", size=700) + b"x" * 600
    message = refusal(data)
    assert "last" in message and "truncated" in message and "offset 1024" in message


def test_trailing_extended_header_without_entry_is_an_empty_tree() -> None:
    # Item 4: Go's pax-path-hdr.tar.
    assert set(tree(pax([(b"path", b"never")]))) == {"/"}
    assert set(tree(member(b"f", b"x") + pax([(b"path", b"never")]) + END)) == {"/", "/f"}
    assert set(tree(corpus_tool.gnu_long(b"L", b"long" * 50))) == {"/"}


def test_implied_parents_are_0755_root_owned() -> None:
    # Item 5: containerd's mkparent makes missing parents 0755 root:root, whatever the root
    # entry and the parents' owners say.
    data = (member(b"./", typeflag=b"5", mode=0o777, uid=3, gid=4)
            + member(b"open/", typeflag=b"5", mode=0o777, uid=5)
            + member(b"open/a/b/file", b"x", uid=6) + END)
    got = tree(data)
    assert got["/open/a"][:3] == got["/open/a/b"][:3] == (stat.S_IFDIR | 0o755, 0, 0)
    assert got["/open"][:3] == (stat.S_IFDIR | 0o777, 5, 0)
    assert got["/"][:3] == (stat.S_IFDIR | 0o755, 0, 0)  # containerd ignores "./"


def test_the_last_of_several_pax_headers_wins() -> None:
    # Item 6: Go's pax-multi-hdrs.tar: records of earlier 'x' headers are dropped.
    data = (pax([(b"path", b"first"), (b"uid", b"5"), (b"SCHILY.xattr.user.a", b"1")])
            + pax([(b"mtime", b"7.5"), (b"linkpath", b"target")])
            + member(b"name", typeflag=b"2", linkname=b"ignored") + END)
    (entry,) = parse(data)
    assert (entry.name, entry.uid, entry.mtime, entry.mtime_nsec, entry.linkname,
            entry.xattrs) == (b"name", 0, 7, 500_000_000, b"target", ())


def test_index_of_an_empty_tar(tmp_path: Path) -> None:
    # Item 7: a tar of only end blocks is a valid empty layer ("not a gzip file" before).
    for name, data in (("empty.tar", END), ("ten-k.tar", bytes(10240)),
                       ("v7.tar", member(b"v7file", b"old\n", magic=bytes(8)) + END)):
        layer, meta = tmp_path / name, tmp_path / f"{name}.erofs"
        layer.write_bytes(data)
        proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", "index", "--meta",
                               str(meta), str(layer)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        image = ErofsImage(MemorySource(meta.read_bytes()),
                           flat=MemorySource(meta.read_bytes() + data))
        assert len(list(image.walk())) == (2 if name == "v7.tar" else 1)


# -- more of containerd's rules ---------------------------------------------------------------

def test_global_headers_apply_to_no_entry() -> None:
    # Go returns a 'g' header as an entry of its own (named by its path record); containerd
    # creates its parents and removes what its name held, but nothing else.
    data = (member(b"victim", b"v") + pax([(b"path", b"victim"), (b"uid", b"42")], typeflag=b"g")
            + member(b"a", b"x") + END)
    kinds = [(m.name, m.kind) for m in parse(data)]
    assert kinds[1] == (b"victim", GLOBAL)
    got = tree(data)
    assert set(got) == {"/", "/a"} and got["/a"][1] == 0


def test_names_are_cleaned_and_cannot_leave_the_root() -> None:
    data = (member(b"a/../b", b"b") + member(b"../../escape", b"e") + member(b"/abs", b"a")
            + member(b"./", b"a root that is a file is ignored") + member(b"x/..", b"ignored")
            + END)
    assert set(tree(data)) == {"/", "/b", "/escape", "/abs"}  # no implied "a"


def test_parents_resolve_through_symlinks_inside_the_layer() -> None:
    data = (member(b"real/", typeflag=b"5") + member(b"link", typeflag=b"2", linkname=b"real")
            + member(b"link/file", b"through\n")
            + member(b"abs", typeflag=b"2", linkname=b"/../real")
            + member(b"abs/two", b"2\n")
            + member(b"dangling", typeflag=b"2", linkname=b"made/here")
            + member(b"dangling/f", b"f\n") + END)
    got = tree(data)
    assert got["/real/file"][4] == b"through\n" and got["/real/two"][4] == b"2\n"
    assert got["/made/here/f"][4] == b"f\n"
    assert "/link/file" not in got and stat.S_ISLNK(got["/link"][0])


def test_symlink_loops_are_refused() -> None:
    data = member(b"a", typeflag=b"2", linkname=b"b") + member(b"b", typeflag=b"2",
                                                               linkname=b"a")
    assert "symbolic links" in refusal(data + member(b"a/f", b"") + END)


def test_hard_links_take_the_attributes_of_their_header() -> None:
    data = (member(b"f", b"data\n", mode=0o644, uid=1, mtime=T - 5)
            + member(b"h", typeflag=b"1", linkname=b"./f", mode=0o600, uid=2, mtime=T - 9) + END)
    got = tree(data)
    assert got["/f"][:4] == got["/h"][:4] == (stat.S_IFREG | 0o600, 2, 0, T - 9)


def test_symlinks_are_0777_and_old_mtimes_are_1970() -> None:
    data = (member(b"s", typeflag=b"2", linkname=b"t", mode=0o644)
            + member(b"old", b"o", mtime=-5, base256=("mtime",)) + END)
    got = tree(data)
    assert got["/s"][0] == stat.S_IFLNK | 0o777 and got["/old"][3] == 0


def test_xattrs_containerd_would_not_set_are_dropped() -> None:
    data = (pax([(b"SCHILY.xattr.trusted.x", b"t"), (b"SCHILY.xattr.user.ok", b"u"),
                 (b"SCHILY.xattr.foo.bar", b"f"), (b"SCHILY.xattr.security.s", b"s")])
            + member(b"f", b"x")
            + pax([(b"SCHILY.xattr.user.no", b"u")]) + member(b"fifo", typeflag=b"6") + END)
    image = mount(data)
    assert image.xattrs(image.lookup("/f")) == {"user.ok": b"u", "security.s": b"s"}
    assert image.xattrs(image.lookup("/fifo")) == {}


def test_ids_are_32_bit_and_minus_one_leaves_root() -> None:
    data = (pax([(b"uid", b"-1"), (b"gid", str((1 << 32) + 7).encode())]) + member(b"f", b"x")
            + END)
    assert tree(data)["/f"][1:3] == (0, 7)


@pytest.mark.parametrize(("data", "words"), ids=[
    "self-link", "missing-link", "dir-link", "dumpdir", "volume", "contiguous", "zero-gap",
    "bad-whiteout", "pax-nul-padding", "negative-size", "octal-junk",
    "non-gnu-sparse", "control-chars",
], argvalues=[
    (member(b"s", b"x") + member(b"s", typeflag=b"1", linkname=b"s"), ["s", "does not exist"]),
    (member(b"h", typeflag=b"1", linkname=b"missing"), ["h", "missing", "does not exist"]),
    (member(b"d/", typeflag=b"5") + member(b"h", typeflag=b"1", linkname=b"d"),
     ["h", "directory"]),
    (member(b"dd", b"x", typeflag=b"D"), ["dd", "type 68", "containerd"]),
    (member(b"label", typeflag=b"V"), ["label", "type 86"]),
    (member(b"c", b"x", typeflag=b"7"), ["type 55"]),
    (member(b"a", b"x") + bytes(512) + member(b"b", b"y"), ["zero block", "offset 1024"]),
    (member(b"d/.wh.", b""), ["whiteout"]),
    (member(b"./PaxHeaders/x", b"11 path=ab\n\0\0", typeflag=b"x") + member(b"f"),
     ["pax record", "offset 0"]),
    (header(b"neg", size=-3, base256=("size",)), ["neg", "size"]),
    (header(b"junk", mode=0) [:100] + b"07x4\0\0\0\0" + header(b"junk")[108:], ["junk"]),
    (member(b"s", b"x", typeflag=b"S"), ["s", "GNU sparse"]),
    (member(b"bell\x07\x1b[31m", typeflag=b"V"), ["bell\\x07\\e[31m"]),
])
def test_what_containerd_refuses_is_refused_in_one_line(data: bytes, words: list[str]) -> None:
    message = refusal(data + END)
    for word in words:
        assert word in message, message


def test_whiteout_names_containerd_refuses_in_either_mode() -> None:
    assert "whiteout" in refusal(member(b".wh...", b"") + END)


def test_overlay_whiteout_of_an_entry_of_the_same_layer_is_refused() -> None:
    # containerd's OverlayConvertWhiteout mknods the whiteout: EEXIST fails the layer.
    with pytest.raises(TarFormatError, match="whiteout for x"):
        build_meta([member(b"x", b"") + member(b".wh.x", b"") + END], aufs=True)


def test_overlay_whiteouts() -> None:
    data = (member(b"etc/.wh.gone", b"", uid=3) + member(b"opq/.wh..wh..opq")
            + member(b"keep", b"") + END)
    image = mount(data, aufs=True)
    gone = image.lookup("/etc/gone")
    assert (gone.mode, gone.rdev, gone.uid) == (stat.S_IFCHR, (0, 0), 3)
    assert image.xattrs(image.lookup("/opq")) == {"trusted.overlay.opaque": b"y"}


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    layer, meta = tmp_path / "bad.tar", tmp_path / "m.erofs"
    layer.write_bytes(member(b"ok", b"x") + member(b"dump\x1bdir", b"d", typeflag=b"D") + END)
    proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", "index", "--meta", str(meta),
                           str(layer)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"Error: {layer}: dump\\edir: unhandled tar header type 68 ('D'); "
                    "containerd refuses the layer (tar header at offset 1024)")
    assert not meta.exists()
