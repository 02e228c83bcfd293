"""Tar parser and EROFS meta writer: parsing edge cases, errors, determinism and byte layout."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import pytest

from hybrid_erofs.erofs.image import crc32c
from hybrid_erofs.erofs.tar import DIRECTORY, REGULAR, TarMember, TarParser
from hybrid_erofs.erofs.tree import Node, Tree
from hybrid_erofs.erofs.writer import MetaBuilder, build_meta
from hybrid_erofs.errors import TarFormatError
from tests.conftest import _load_tool

corpus_tool = _load_tool("make_tar_corpus")
header, member, pax, END = (corpus_tool.header, corpus_tool.member, corpus_tool.pax,
                            corpus_tool.END)
CORPUS: dict[str, bytes] = corpus_tool.corpus()
T = 1_700_000_000


def parse(data: bytes, chunk: int = 1 << 20) -> list[TarMember]:
    out: list[TarMember] = []
    parser = TarParser(out.append)
    for offset in range(0, len(data), chunk):
        parser.feed(memoryview(data)[offset:offset + chunk])
    parser.close()
    return out


def meta(data: bytes, **kw: object) -> bytes:
    options: dict[str, object] = {"build_time": T, "root_uid": 0, "root_gid": 0, **kw}
    return build_meta([data], **options)  # type: ignore[arg-type]


# -- a tiny decoder, enough to check the layout rules -----------------------------------------

def superblock(image: bytes) -> dict[str, int]:
    f = struct.unpack_from("<IIIBBHQQIIII", image, 1024)
    return {"magic": f[0], "crc": f[1], "compat": f[2], "blkszbits": f[3], "root": f[5],
            "inos": f[6], "epoch": f[7], "blocks": f[9],
            "incompat": struct.unpack_from("<I", image, 1024 + 0x50)[0],
            "dev_blocks": struct.unpack_from("<I", image, 1152 + 64)[0],
            "uniaddr": struct.unpack_from("<I", image, 1152 + 68)[0]}


def inode(image: bytes, nid: int) -> dict[str, int]:
    off = nid * 32
    i_format, icount, mode = struct.unpack_from("<HHH", image, off)
    if i_format & 1:
        size, i_u, ino, uid, gid, mtime, nsec, nlink = struct.unpack_from(
            "<8xQIIIIqII", image, off)
        isize = 64
    else:
        nlink, size, _, i_u, ino, uid, gid = struct.unpack_from("<6xHIIIIHH", image, off)
        mtime, nsec, isize = T, 0, 32
    xsize = 12 + 4 * (icount - 1) if icount else 0
    return {"extended": i_format & 1, "layout": (i_format >> 1) & 7, "mode": mode, "size": size,
            "i_u": i_u, "uid": uid, "gid": gid, "mtime": mtime, "nsec": nsec, "nlink": nlink,
            "ino": ino, "body": off + isize + xsize}


def read_data(image: bytes, nid: int) -> bytes:
    node = inode(image, nid)
    size, layout = node["size"], node["layout"]
    if layout == 2:
        full = size - size % 512
        head = image[node["i_u"] * 512:node["i_u"] * 512 + full] if full else b""
        return head + image[node["body"]:node["body"] + size % 512]
    assert layout == 0
    return image[node["i_u"] * 512:node["i_u"] * 512 + size]


def readdir(image: bytes, nid: int) -> dict[bytes, int]:
    data = read_data(image, nid)
    out: dict[bytes, int] = {}
    for start in range(0, len(data), 512):
        block = data[start:start + 512]
        count = struct.unpack_from("<H", block, 8)[0] // 12
        ents = [struct.unpack_from("<QHBB", block, 12 * i) for i in range(count)]
        for i, (child, nameoff, _, _) in enumerate(ents):
            end = ents[i + 1][1] if i + 1 < count else len(block)
            out[block[nameoff:end].rstrip(b"\0")] = child
    return out


def lookup(image: bytes, path: bytes) -> int:
    nid = superblock(image)["root"]
    for part in path.split(b"/"):
        nid = readdir(image, nid)[part]
    return nid


# -- parser ---------------------------------------------------------------------------------

def test_data_offsets_match_tarfile() -> None:
    data = CORPUS["tarfile-pax.tar"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = {m.name.encode(): m.offset_data for m in tar.getmembers() if m.isfile()}
    got = {m.name: m.data_offset for m in parse(data) if m.kind == REGULAR}
    assert got == expected


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 1 << 20])
def test_chunking_does_not_change_output(chunk: int) -> None:
    data = CORPUS["raw-features.tar"]
    builder = MetaBuilder(build_time=T, root_uid=0, root_gid=0)
    for offset in range(0, len(data), chunk):
        builder.feed(memoryview(bytearray(data[offset:offset + chunk])))
    assert builder.finish() == meta(data)
    assert builder.layer_size == len(data)


def test_pax_fraction_negative_mtime_and_globals() -> None:
    data = (pax([(b"uid", b"42"), (b"SCHILY.xattr.user.g", b"G")], typeflag=b"g")
            + pax([(b"mtime", b"-1.5")]) + member(b"a", b"x")
            + pax([(b"mtime", b"5.000000001"), (b"uid", b"7")]) + member(b"b", b"y")
            + END)
    g, a, b = parse(data)  # Go: global records apply to no other entry
    assert (g.name, g.kind) == (b"./PaxHeaders/x", ord("g"))
    assert (a.mtime, a.mtime_nsec, a.uid, a.xattrs) == (-2, 500_000_000, 0, ())
    assert (b.mtime, b.mtime_nsec, b.uid) == (5, 1, 7)


def test_gnu_long_names_base256_and_v7() -> None:
    data = (corpus_tool.gnu_long(b"L", b"n" * 300) + corpus_tool.gnu_long(b"K", b"k" * 200)
            + member(b"short", typeflag=b"2")
            + member(b"b", b"z", uid=5_000_000, base256=("uid", "size"))
            + member(b"v7", b"old", typeflag=b"\0", magic=bytes(8)) + END)
    long, b256, v7 = parse(data, chunk=100)
    assert (long.name, long.linkname) == (b"n" * 300, b"k" * 200)
    assert (b256.uid, b256.size) == (5_000_000, 1)
    assert v7.kind == REGULAR and v7.size == 3


def test_end_marker_then_garbage_is_consumed() -> None:
    data = member(b"f", b"1") + END + b"\xff" * 3000
    builder = MetaBuilder(build_time=T)
    builder.feed(data)
    image = builder.finish()
    assert builder.entries == 1 and builder.layer_size == len(data)
    assert superblock(image)["dev_blocks"] == 4  # header + data + two zero blocks


def test_missing_end_marker_is_accepted() -> None:
    assert [m.name for m in parse(member(b"f", b"1"))] == [b"f"]


def test_file_over_4gib_uses_extended_inode_and_one_chunk() -> None:
    size = (5 << 30) + 3
    builder = MetaBuilder(build_time=T, root_uid=0, root_gid=0)
    builder.feed(header(b"huge", size=size))
    zeros = memoryview(bytes(1 << 20))
    remaining = size + (-size % 512)
    while remaining:  # the parser skips data by arithmetic: this is fast
        step = min(remaining, len(zeros))
        builder.feed(zeros[:step])
        remaining -= step
    builder.feed(END)
    image = builder.finish()
    node = inode(image, lookup(image, b"huge"))
    assert node["extended"] and node["layout"] == 4 and node["size"] == size
    assert node["i_u"] == 0x20 | (33 - 9)
    index = -(-node["body"] // 8) * 8
    assert struct.unpack_from("<HHI", image, index) == (0, 1, 1)  # data at tar block 1
    assert struct.unpack_from("<HHI", image, index + 8) == (0, 0, 0)  # one index only


# -- errors ---------------------------------------------------------------------------------

def _error(data: bytes, **kw: object) -> str:
    with pytest.raises(TarFormatError) as info:
        meta(data, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_checksum_names_entry_and_offset() -> None:
    block = bytearray(member(b"ok", b"1") + member(b"bad-one", b"2"))
    block[1024 + 100] ^= 1  # mode byte of the second header at offset 1024
    message = _error(bytes(block) + END)
    assert "bad-one" in message and "checksum" in message and "offset 1024" in message


@pytest.mark.parametrize("cut", [1100, 1536 + 10])
def test_truncated_archive(cut: int) -> None:
    data = member(b"first", b"1") + member(b"second", b"x" * 700)
    message = _error(data[:cut])
    assert "truncated" in message and f"offset {cut}" in message


@pytest.mark.parametrize("value", [b"abc", b"-1", str(2**64).encode()])
def test_absurd_pax_size(value: bytes) -> None:
    message = _error(pax([(b"path", b"big"), (b"size", value)]) + member(b"x") + END)
    assert "big" in message and "size" in message and "offset 1024" in message


def test_empty_pax_value_keeps_the_header_field() -> None:
    (entry,) = parse(pax([(b"size", b""), (b"path", b"")]) + member(b"x", b"abc") + END)
    assert (entry.name, entry.size) == (b"x", 3)


def test_nul_in_pax_path() -> None:
    message = _error(pax([(b"path", b"evil\0name")]) + member(b"x") + END)
    assert "invalid pax record path" in message and "offset 0" in message


def test_garbage_header() -> None:
    message = _error(member(b"ok", b"1") + bytes(range(256)) * 2 + END)
    assert "offset 1024" in message


def test_old_gnu_sparse_needs_a_gnu_header() -> None:
    assert "GNU sparse" in _error(member(b"gnu-sparse", b"x", typeflag=b"S") + END)


def test_pax_sparse_member() -> None:
    (entry,) = parse(pax([(b"GNU.sparse.major", b"0"), (b"GNU.sparse.minor", b"1"),
                          (b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.map", b"4,1"),
                          (b"GNU.sparse.size", b"9"), (b"path", b"ps")]) + member(b"x", b"a")
                     + END)
    assert (entry.name, entry.size, entry.sparse) == (b"ps", 9, ((4, 1),))


def test_unknown_pax_sparse_version_is_a_plain_file() -> None:
    (entry,) = parse(pax([(b"GNU.sparse.major", b"1"), (b"path", b"ps")]) + member(b"x", b"a")
                     + END)
    assert (entry.name, entry.size, entry.sparse) == (b"ps", 1, None)


@pytest.mark.parametrize(("data", "words"), ids=["missing", "to-dir", "long", "notdir"],
                         argvalues=[
    (member(b"h", typeflag=b"1", linkname=b"missing") + END, ["h", "missing", "not exist"]),
    (member(b"d/", typeflag=b"5") + member(b"h", typeflag=b"1", linkname=b"d") + END,
     ["h", "directory"]),
    (pax([(b"path", b"n" * 256)]) + member(b"x") + END, ["nnnn", "256", "255"]),
    (member(b"f", b"1") + member(b"f/child", b"2") + END, ["f/child", "not a directory"]),
])
def test_tree_errors(data: bytes, words: list[str]) -> None:
    message = _error(data)
    for word in words:
        assert word in message
    assert "offset" in message


# -- writer ----------------------------------------------------------------------------------

def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") ^ 0xFFFFFFFF == 0xE3069283


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_superblock_and_determinism(name: str) -> None:
    image = meta(CORPUS[name])
    assert image == meta(CORPUS[name])
    sb = superblock(image)
    assert len(image) % 512 == 0 and sb["blocks"] * 512 == len(image)
    assert sb["magic"] == 0xE0F5E1E2 and sb["blkszbits"] == 9 and sb["epoch"] == T
    assert sb["compat"] == 0x3 and sb["incompat"] == 0x8 and sb["root"] in (40, 48)
    assert sb["uniaddr"] == sb["blocks"]
    zeroed = bytearray(image[1024:1536])
    zeroed[4:8] = bytes(4)
    assert crc32c(zeroed) == sb["crc"]


def test_uuid_and_build_time_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    image = build_meta([END])
    assert superblock(image)["epoch"] == 1234 and image[1024 + 0x30:1024 + 0x40] == bytes(16)
    image = build_meta([END], uuid=b"u" * 16)
    assert image[1024 + 0x30:1024 + 0x40] == b"u" * 16


def test_inode_rules() -> None:
    data = (member(b"./", typeflag=b"5", mode=0o755, mtime=T)
            + member(b"compact", b"c", mtime=T) + member(b"ids", b"i", uid=70000, mtime=T)
            + pax([(b"mtime", b"1700000000.5")]) + member(b"nsec", b"n")
            + member(b"old", b"o", mtime=-5, base256=("mtime",))
            + member(b"empty") + pax([(b"linkpath", b"t" * 600)]) + member(b"link", typeflag=b"2")
            + pax([(b"linkpath", b"t" * 1001)]) + member(b"link2", typeflag=b"2")
            + member(b"hl", typeflag=b"1", linkname=b"compact", mtime=T)
            + member(b"chr", typeflag=b"3", devmajor=300, devminor=70000) + END)
    image = meta(data)
    get = {name: inode(image, lookup(image, name)) for name in
           (b"compact", b"ids", b"nsec", b"old", b"empty", b"link", b"link2", b"chr")}
    assert not get[b"compact"]["extended"] and get[b"compact"]["nlink"] == 2
    assert get[b"ids"]["extended"] and get[b"ids"]["uid"] == 70000
    assert get[b"nsec"]["extended"] and get[b"nsec"]["nsec"] == 500_000_000
    assert get[b"old"]["extended"] and get[b"old"]["mtime"] == 0  # containerd: not < 1970
    assert get[b"empty"]["layout"] == 0 and get[b"empty"]["size"] == 0
    assert get[b"link"]["layout"] == 2 and get[b"link2"]["layout"] == 0
    assert read_data(image, lookup(image, b"link")) == b"t" * 600
    assert read_data(image, lookup(image, b"link2")) == b"t" * 1001
    assert get[b"chr"]["i_u"] == 0x11112C70
    root = superblock(image)["root"]
    inos = sorted(inode(image, nid)["ino"] for nid in readdir(image, root).values())
    assert inos[0] == 1 and inos[-1] == superblock(image)["inos"]


def test_big_dir_is_sorted_and_spans_blocks() -> None:
    names = [b"e%04d" % i for i in range(300)] + [b"!bang", b"+plus", b"-dash", b"\xc3\xa9"]
    image = meta(b"".join(member(b"d/" + n, b"") for n in names) + END)
    nid = lookup(image, b"d")
    assert inode(image, nid)["size"] > 512 * 5
    entries = readdir(image, nid)
    assert list(entries) == sorted([*names, b".", b".."])
    assert entries[b"."] == nid and entries[b".."] == superblock(image)["root"]


def test_later_entries_win_and_xattrs_merge() -> None:
    data = (pax([(b"SCHILY.xattr.user.a", b"first"), (b"SCHILY.xattr.user.b", b"b")])
            + member(b"d/", typeflag=b"5", mode=0o700)
            + pax([(b"SCHILY.xattr.user.a", b"second")])
            + member(b"d/", typeflag=b"5", mode=0o750, uid=9)
            + member(b"d/x", b"1") + member(b"d", b"now a file") + END)
    image = meta(data)
    node = inode(image, lookup(image, b"d"))
    assert node["size"] == 10 and node["layout"] == 4 and node["nlink"] == 1


def _load_tree(data: bytes, *, aufs: bool = False) -> Tree:
    builder = MetaBuilder(build_time=T, root_uid=0, root_gid=0, aufs=aufs)
    builder.feed(data)
    return builder._tree  # white-box look at the tree


def _child(node: Node, *names: bytes) -> Node:
    for name in names:
        assert node.children is not None
        node = node.children[name]
    return node


def test_dir_over_dir_later_xattr_value_wins() -> None:
    data = (pax([(b"SCHILY.xattr.user.a", b"first"), (b"SCHILY.xattr.user.b", b"b")])
            + member(b"d/", typeflag=b"5", mode=0o700)
            + pax([(b"SCHILY.xattr.user.a", b"second")])
            + member(b"d/", typeflag=b"5", mode=0o750, uid=9) + END)
    node = _child(_load_tree(data).root, b"d")
    assert node.xattrs == {b"user.a": b"second", b"user.b": b"b"}
    assert (node.mode & 0o7777, node.uid) == (0o750, 9)


def test_aufs_conversion() -> None:
    data = (member(b"etc/.wh.gone", b"") + member(b"opq/.wh..wh..opq") + member(b"keep", b"")
            + END)
    assert _child(_load_tree(data).root, b"etc", b".wh.gone").mode == 0o100644
    root = _load_tree(data, aufs=True).root
    etc, opq, gone = _child(root, b"etc"), _child(root, b"opq"), _child(root, b"etc", b"gone")
    assert gone.mode == 0o20000 and gone.rdev == 0
    assert etc.xattrs == {b"trusted.overlay.origin": b""}
    assert opq.xattrs == {b"trusted.overlay.opaque": b"y"} and not opq.children


def test_implicit_parents_follow_containerd_mkparent() -> None:
    data = member(b"./", typeflag=b"5", mode=0o775, uid=3, mtime=T + 9) + member(b"a/b/c", b"")
    root = _load_tree(data + END).root
    a = _child(root, b"a")
    assert (a.mode, a.uid, a.mtime) == (0o40755, 0, T)
    assert (root.mode, root.uid, root.mtime) == (0o40755, 0, T)


def test_feed_after_finish_is_a_caller_bug() -> None:
    builder = MetaBuilder(build_time=T)
    builder.finish()
    with pytest.raises(ValueError):
        builder.feed(END)


def test_directory_entry_kinds() -> None:
    kinds = {m.name: m.kind for m in parse(CORPUS["raw-features.tar"])}
    assert kinds[b"./child/"] == DIRECTORY


def test_corpus_script_is_deterministic(tmp_path: Path) -> None:
    first = corpus_tool.write_corpus(tmp_path / "a")
    second = corpus_tool.write_corpus(tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
