#!/usr/bin/env python3
"""Write a deterministic corpus of tar files exercising the EROFS tar-index writer.

Usage: make_tar_corpus.py OUTDIR [--big]   (--big adds a sparse 5 GiB member, not for CI)
Each tar must build with both our writer and `mkfs.erofs --tar=i`; the kernel views must agree.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

T0 = 1_600_000_000          # default member mtime (not the images' build time)
BLOCK = 512


def content(label: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{label}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# -- raw header crafting (for what tarfile cannot express) -------------------------------

def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _base256(value: int, width: int) -> bytes:
    if value < 0:
        return (value % (1 << (8 * width))).to_bytes(width, "big")  # two's complement, 0xff lead
    return b"\x80" + value.to_bytes(width - 1, "big")


def header(name: bytes, *, typeflag: bytes = b"0", size: int = 0, mode: int = 0o644,
           uid: int = 0, gid: int = 0, mtime: int = T0, linkname: bytes = b"",
           devmajor: int = 0, devminor: int = 0, prefix: bytes = b"",
           magic: bytes = b"ustar\x0000", base256: Iterable[str] = (),
           signed_checksum: bool = False) -> bytes:
    """One 512-byte header; fields named in `base256` use GNU base-256 encoding."""
    def num(field: str, value: int, width: int) -> bytes:
        return _base256(value, width) if field in base256 else _octal(value, width)

    block = bytearray(BLOCK)
    block[0:len(name)] = name
    block[100:108] = num("mode", mode, 8)
    block[108:116] = num("uid", uid, 8)
    block[116:124] = num("gid", gid, 8)
    block[124:136] = num("size", size, 12)
    block[136:148] = num("mtime", mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:157 + len(linkname)] = linkname
    block[257:265] = magic
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[329:337] = num("devmajor", devmajor, 8)
    block[337:345] = num("devminor", devminor, 8)
    block[345:345 + len(prefix)] = prefix
    total = sum(b - 256 if b > 127 else b for b in block) if signed_checksum else sum(block)
    block[148:156] = b"%06o\0 " % (total & 0o777777)
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes = b"", **kw: object) -> bytes:
    return header(name, size=len(data), **kw) + pad(data)  # type: ignore[arg-type]


def pax_records(records: Iterable[tuple[bytes, bytes]]) -> bytes:
    out = bytearray()
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return bytes(out)


def pax(records: Iterable[tuple[bytes, bytes]], *, typeflag: bytes = b"x",
        name: bytes = b"./PaxHeaders/x") -> bytes:
    return member(name, pax_records(records), typeflag=typeflag)


def gnu_long(kind: bytes, value: bytes) -> bytes:
    return member(b"././@LongLink", value + b"\0", typeflag=kind)


END = bytes(2 * BLOCK)


# -- the corpus -----------------------------------------------------------------------------

def tarfile_pax() -> bytes:
    """Python tarfile, PAX format: every type, sizes, big dir, long symlinks, owners."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object
                ) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = T0
            info.mode = 0o644
            for key, value in kw.items():
                setattr(info, key, value)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("./", tarfile.DIRTYPE, mode=0o755)
        add("./files", tarfile.DIRTYPE, mode=0o755)
        for size in (0, 1, 511, 512, 513, 4096, 10000, 70000):
            add(f"./files/s{size}", data=content(f"s{size}", size))
        add("./files/setuid", data=b"x", mode=0o4755)
        add("./files/sticky", tarfile.DIRTYPE, mode=0o1777)
        add("./files/owned", data=b"owned\n", uid=70000, gid=100000)
        add("./files/owned16", data=b"o16\n", uid=1000, gid=1000, mtime=T0 + 7)
        add("./links", tarfile.DIRTYPE, mode=0o755)
        for length in (1, 8, 60, 511, 512, 513, 600, 1001):
            add(f"./links/l{length}", tarfile.SYMTYPE, linkname="t" * length, mode=0o777)
        add("./links/hard1", tarfile.LNKTYPE, linkname="./files/s10000")
        add("./links/hard2", tarfile.LNKTYPE, linkname="files/s10000")
        add("./links/hard-to-symlink", tarfile.LNKTYPE, linkname="./links/l8")
        add("./dev", tarfile.DIRTYPE, mode=0o755)
        add("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        add("./dev/sda1", tarfile.BLKTYPE, devmajor=8, devminor=1, mode=0o660, gid=6)
        add("./dev/big", tarfile.CHRTYPE, devmajor=300, devminor=70000)
        add("./dev/fifo", tarfile.FIFOTYPE, mode=0o600)
        add("./dev/null-link", tarfile.LNKTYPE, linkname="./dev/null")
        add("./big", tarfile.DIRTYPE, mode=0o755)
        for i in range(400):
            add(f"./big/entry-{i:04d}-{'x' * (i % 37)}", data=b"%d\n" % i)
        add("./sort", tarfile.DIRTYPE, mode=0o755)
        for name in ("!bang", "+plus", "-dash", "a", "B", "_u", "~tilde", "é", "日本",
                     ".hidden", "..dots", "z" * 255):
            add(f"./sort/{name}", data=name.encode())
        add("./xattr", data=b"x", pax_headers={
            "SCHILY.xattr.user.a": "alpha", "SCHILY.xattr.user.empty": "",
            "SCHILY.xattr.trusted.t": "tee", "SCHILY.xattr.security.selinux":
            "system_u:object_r:bin_t:s0"})
    return buf.getvalue()


def tarfile_gnu() -> bytes:
    """Python tarfile, GNU format: L/K long names, base-256 numbers, negative mtimes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object
                ) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = T0
            info.mode = 0o640
            for key, value in kw.items():
                setattr(info, key, value)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        long_dir = "/".join(["d" * 60] * 4)
        add(f"{long_dir}/{'f' * 200}", data=b"long name\n")
        add("longlink", tarfile.SYMTYPE, linkname="L" * 300)
        add("hardlong", tarfile.LNKTYPE, linkname=f"{long_dir}/{'f' * 200}")
        add("neg", data=b"old\n", mtime=-86400 * 365)
        add("neg-dir", tarfile.DIRTYPE, mtime=-1, mode=0o755)
        add("bigids", data=b"ids\n", uid=3_000_000, gid=4_000_000)
        add("future", data=b"f\n", mtime=8_000_000_000)
    return buf.getvalue()


def raw_features() -> bytes:
    """Hand-made headers: PAX fractions, binary and LIBARCHIVE xattrs, global PAX, prefix."""
    acl = bytes.fromhex("0200000001000600ffffffff04000400ffffffff10000400ffffffff20000400ffffffff")
    cap = bytes.fromhex("0000000200200000000000000000000000000000")
    out = bytearray()
    out += pax([(b"comment", b"global header with only a comment")], typeflag=b"g")
    out += member(b"./", typeflag=b"5", mode=0o750, uid=5, gid=6, mtime=T0 + 1)
    out += pax([(b"mtime", b"1600000001.123456789"),
                (b"SCHILY.xattr.user.frac", b"yes")])
    out += member(b"./frac", b"fraction\n")
    out += pax([(b"SCHILY.xattr.system.posix_acl_access", acl),
                (b"SCHILY.xattr.security.capability", cap),
                (b"SCHILY.xattr.trusted.overlay.x", b"\x00\x01\x02\xff"),
                (b"SCHILY.xattr.user.empty", b""),
                (b"SCHILY.xattr.user." + "ü".encode(), b"utf8 name")])
    out += member(b"./binary-xattrs", b"b\n", mode=0o755)
    out += pax([(b"LIBARCHIVE.xattr.user.lib%3Darchive", b"aGVsbG8gd29ybGQ="),
                (b"LIBARCHIVE.xattr.user.plain", b"dmFsdWU")])
    out += member(b"./libarchive", b"l\n")
    out += pax([(b"path", b"./pax/" + b"p" * 150 + b"/" + b"q" * 200),
                (b"uid", b"70000"), (b"gid", b"100000"), (b"mtime", b"-1000")])
    out += member(b"./ignored-name", b"pax path\n")
    out += pax([(b"linkpath", b"pax-link-target/" + b"t" * 200)])
    out += member(b"./paxlink", typeflag=b"2", linkname=b"ignored", mode=0o777)
    out += member(b"name-in-prefix", b"prefixed\n", prefix=b"./ustar/prefix/dir")
    out += member(b"./b256", b"base-256\n", uid=123, gid=456, base256=("uid", "gid", "mtime"))
    out += member(b"./signed-\xc3\xa9", b"signed checksum\n", signed_checksum=True)
    out += member(b"./child/before/parent", b"orphan first\n", mtime=T0 + 2)
    out += member(b"./child/", typeflag=b"5", mode=0o700, uid=7, gid=8, mtime=T0 + 3)
    out += pax([(b"SCHILY.xattr.user.dir", b"d1")])
    out += member(b"./dd/", typeflag=b"5", mode=0o755)
    out += pax([(b"SCHILY.xattr.user.dir2", b"d2")])
    out += member(b"./dd", typeflag=b"5", mode=0o711, mtime=T0 + 4)
    out += member(b"/abs/path", b"absolute\n")
    out += member(b"./dot/./x", b"dot\n")
    out += member(b"a/../b", b"dotdot\n")
    out += member(b"../escape", b"clamped\n")
    out += member(b"./dup-ff", b"first\n")
    out += member(b"./dup-ff", b"second!\n", mode=0o600)
    out += member(b"./dup-fd", b"file\n")
    out += member(b"./dup-fd/", typeflag=b"5", mode=0o755)
    out += member(b"./dup-fd/inside", b"i\n")
    out += member(b"./dup-df/", typeflag=b"5", mode=0o755)
    out += member(b"./dup-df/x", b"gone\n")
    out += member(b"./dup-df", b"now a file\n")
    out += member(b"./dup-hl/", typeflag=b"5", mode=0o755)
    out += member(b"./dup-hl/child", b"hard linked child\n")
    out += member(b"./hl-outside", typeflag=b"1", linkname=b"./dup-hl/child")
    out += member(b"./dup-hl", b"dir replaced\n")
    out += member(b"./target", b"one\n")
    out += member(b"./t-link", typeflag=b"1", linkname=b"target")
    out += member(b"./target", b"two, replaced\n")
    out += END
    return bytes(out)


def refused() -> dict[str, bytes]:
    """Archives containerd's archive.Apply refuses, so the meta writer must refuse them too."""
    return {
        "refused-self-link.tar": member(b"./self", b"self\n")
        + member(b"./self", typeflag=b"1", linkname=b"./self") + END,
        "refused-dumpdir.tar": member(b"./d", b"data of a GNU dumpdir\n", typeflag=b"D") + END,
        "refused-volume.tar": member(b"label", typeflag=b"V") + member(b"f", b"f\n") + END,
        "refused-contiguous.tar": member(b"c", b"contiguous\n", typeflag=b"7") + END,
        "refused-zero-gap.tar": member(b"a", b"a\n") + bytes(BLOCK) + member(b"b", b"b\n") + END,
        "refused-missing-link.tar": member(b"l", typeflag=b"1", linkname=b"nowhere") + END,
        "refused-dir-link.tar": member(b"d/", typeflag=b"5") + member(b"l", typeflag=b"1",
                                                                   linkname=b"d") + END,
        "refused-truncated.tar": member(b"f", b"x" * 1000)[:BLOCK + 700],
        "refused-whiteout-name.tar": member(b"a/.wh..", b"") + END,
    }


def whiteouts() -> bytes:
    out = bytearray()
    out += member(b"./", typeflag=b"5", mode=0o755)
    out += member(b"./etc/", typeflag=b"5", mode=0o755)
    out += member(b"./etc/.wh.removed", mtime=T0 + 5, uid=3)
    out += member(b"./etc/kept", b"kept\n")
    out += member(b"./opaque/", typeflag=b"5", mode=0o755)
    out += member(b"./opaque/.wh..wh..opq")
    out += member(b"./opaque/new", b"new\n")
    out += member(b"./.wh.top")
    out += member(b"./deep/er/.wh.x")
    out += END
    return bytes(out)


def root_variants() -> dict[str, bytes]:
    big_root = bytearray()
    for i in range(150):
        big_root += member(b"r%03d-%s" % (i, b"n" * 20), b"")
    big_root += END
    return {
        "empty.tar": END,
        "no-end-marker.tar": member(b"./only", b"no end\n"),
        "no-root-entry.tar": member(b"top/dir/file", b"implicit parents\n")
        + member(b"gw/", typeflag=b"5", mode=0o775) + member(b"gw/sub/x", b"x") + END,
        "big-root.tar": bytes(big_root),
        "trailing-garbage.tar": member(b"f", b"f\n") + END + b"garbage after the end" * 30,
    }


def big_sparse(path: Path) -> None:
    """A 5 GiB member (> 4 GiB: extended inode, one chunk) written as a sparse file."""
    size = 5 << 30
    with open(path, "wb") as f:
        f.write(header(b"huge", size=size))
        f.write(b"head")
        f.seek(BLOCK + size - 4)
        f.write(b"tail")
        f.write(bytes(-size % BLOCK))
        f.write(member(b"after", b"after the huge file\n") + END)


def corpus() -> dict[str, bytes]:
    """Every small corpus tar that containerd applies, by file name (deterministic)."""
    return {
        "tarfile-pax.tar": tarfile_pax(),
        "tarfile-gnu.tar": tarfile_gnu(),
        "raw-features.tar": raw_features(),
        "whiteouts.tar": whiteouts(),
        **root_variants(),
    }


def write_corpus(outdir: Path, *, big: bool = False) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in {**corpus(), **refused()}.items():
        path = outdir / name
        path.write_bytes(data)
        paths.append(path)
    if big:
        path = outdir / "big-5g.tar"
        big_sparse(path)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--big", action="store_true", help="also write a sparse 5 GiB tar")
    args = parser.parse_args(argv)
    for path in write_corpus(args.outdir, big=args.big):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
