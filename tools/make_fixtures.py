"""Deterministic gzip test layers (each X.tar.gz next to its X.tar) plus malformed inputs, for tests and
benchmarks; `--oracle` regenerates the committed fixtures/gzip/ files with mkfs.erofs-oracle.
Script: `python tools/make_fixtures.py OUTDIR [--small]`; tests: `make_layers(outdir, small=True)`."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Fixed metadata so the same input files always give the same tar bytes.
MTIME = 1_700_000_000
SEED = 20261123
MANIFEST = "layers.json"
# Bumped whenever the recipes change, so a cached OUTDIR is rebuilt.
RECIPE_VERSION = 3

GOOD_LAYERS = (
    "rootfs",         # real files, gzip -6: stored + fixed + dynamic blocks
    "rootfs_pigz",    # same tar, pigz -6: one member, sync-flushed 128 KiB blocks
    "multimember",    # cat a.gz b.gz ...: members of 1 B .. 40 % of the tar, some with FNAME
                      # (the 1 B first member makes mkfs.erofs 1.9 fail; we must not)
    "estargz",        # one member per tar entry header and per 64 KiB of file data (zlib, like Go's gzip)
    "empty_members",  # zero-length members at the start, in the middle and at the end
    "zeros",          # one huge all-zero file: one span covers a huge output; the .tar is sparse
    "random",         # incompressible: stored blocks only
    "headers",        # two members with FEXTRA+FNAME+FCOMMENT+FHCRC (and FTEXT on the second)
)
BAD_INPUTS = (
    "not_gzip",          # a plain tar
    "truncated",         # first half of rootfs.tar.gz
    "truncated_header",  # first 6 bytes of a gzip member
    "trailing_garbage",  # a valid member followed by non-gzip text
    "trailing_zeros",    # a valid member followed by 1 KiB of zeros (gzip(1) and Python accept this)
    "corrupt",           # one byte of deflate data flipped mid-stream
    "not_deflate",       # gzip magic with CM=7
    "zstd",
    "xz",
    "bzip2",
    "empty",             # zero bytes (Python's gzip.decompress returns b"" for it)
)


@dataclass(frozen=True)
class Sizes:
    """Byte budgets of one generation mode."""

    rootfs: int
    mini: int
    zeros: int
    random: int


FULL = Sizes(rootfs=32 << 20, mini=256 << 10, zeros=200 << 20, random=8 << 20)
SMALL = Sizes(rootfs=1536 << 10, mini=128 << 10, zeros=16 << 20, random=1 << 20)

# Pools of real files: (roots, name filter, share of the budget).  Text, ELF binaries and
# already-compressed files, so gzip -6 emits dynamic, fixed and stored blocks.
# The running interpreter's stdlib stands in on machines without Debian's /usr/lib/python3.11.
_STDLIB = ("/usr/lib/python3.11" if os.path.isdir("/usr/lib/python3.11")
           else sysconfig.get_paths()["stdlib"])
POOLS: tuple[tuple[tuple[str, ...], Callable[[str], bool], float], ...] = (
    ((_STDLIB, "/usr/share/perl5", "/usr/share/doc"),
     lambda n: n.endswith((".py", ".pm", ".txt", ".html", "copyright", ".md")), 0.50),
    ((_STDLIB + "/lib-dynload", "/usr/bin", "/usr/lib/x86_64-linux-gnu"),
     lambda n: True, 0.35),
    (("/usr/share/doc", "/usr/share/python-wheels", "/usr/share/icons", "/usr/share/pixmaps"),
     lambda n: n.endswith((".gz", ".png", ".whl", ".zip", ".jpg", ".xz", ".bz2")), 0.15),
)


# --------------------------------------------------------------------------- real-file tar


def _candidates(roots: Iterable[str], keep: Callable[[str], bool]) -> Iterator[Path]:
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if keep(name):
                    yield Path(dirpath, name)


def select_files(budget: int, *, salt: str = "") -> list[Path]:
    """Real files from this machine totalling about `budget` bytes, chosen by a salted hash order.

    The choice only depends on which files exist, so it is stable on one machine; another
    machine gives a different (still deterministic) selection.
    """
    chosen: dict[Path, None] = {}
    for roots, keep, share in POOLS:
        want = int(budget * share)
        # Spread over the whole tree rather than taking the alphabetically first files.
        paths = sorted(_candidates(roots, keep),
                       key=lambda p: hashlib.sha1((salt + str(p)).encode()).digest())
        got = 0
        for path in paths:
            if got >= want:
                break
            try:
                st = path.lstat()
            except OSError:
                continue
            if path.is_symlink():
                if len(chosen) % 7 == 0:  # a few symlinks, as in real layers
                    chosen[path] = None
                continue
            if not path.is_file() or st.st_size > max(want // 4, 64 << 10) or not os.access(path, os.R_OK):
                continue
            if path not in chosen:
                chosen[path] = None
                got += st.st_size
    return sorted(chosen)


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = MTIME
    return info


def write_tar(path: Path, files: Iterable[Path], *, extra: Iterable[tuple[str, bytes]] = ()) -> None:
    """Write a reproducible PAX tar of real `files` (arcname = path without '/') and `extra` blobs.

    Entries are sorted by name, parents directories are added, owners and mtimes are fixed.
    """
    entries: dict[str, Path | bytes | None] = {}
    for file in files:
        entries[str(file).lstrip("/")] = file
    for name, data in extra:
        entries[name] = data
    for name in list(entries):
        parent = Path(name).parent
        while str(parent) != ".":
            entries.setdefault(str(parent), None)
            parent = parent.parent
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            value = entries[name]
            if value is None:
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(_normalise(info))
            elif isinstance(value, bytes):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(value), 0o644
                tar.addfile(_normalise(info), io.BytesIO(value))
            else:
                info = _normalise(tar.gettarinfo(str(value), name))
                if info.isreg():
                    with open(value, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


def write_sparse_zero_tar(path: Path, name: str, size: int) -> None:
    """A tar holding one all-zero file of `size` bytes, written with holes so it costs no disk."""
    info = _normalise(tarfile.TarInfo(name))
    info.size, info.mode = size, 0o644
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    data_end = len(header) + size + (-size % tarfile.BLOCKSIZE)
    # End-of-archive = two zero blocks, then zero padding to a whole 10 KiB record (as tarfile does).
    total = data_end + 2 * tarfile.BLOCKSIZE
    total += -total % tarfile.RECORDSIZE
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(total)


# --------------------------------------------------------------------------- gzip writers


def run_gzip(tool: str, src: Path, dst: Path) -> None:
    """`tool -6 -n -c src > dst` (gzip or pigz): no name, no mtime, so the output is reproducible."""
    with open(dst, "wb") as out:
        subprocess.run([tool, "-6", "-n", "-c", str(src)], stdout=out, check=True)


def gzip_bytes(data: bytes, *, name: str | None = None) -> bytes:
    """One member from gzip(1) -6; with `name`, the header carries FNAME and the fixed MTIME."""
    if name is None:
        return subprocess.run(["gzip", "-6", "-n", "-c"], input=data, stdout=subprocess.PIPE,
                              check=True).stdout
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"mkfix-{os.getpid()}" / name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(data)
        os.utime(tmp, (MTIME, MTIME))
        return subprocess.run(["gzip", "-6", "-c", str(tmp)], stdout=subprocess.PIPE,
                              check=True).stdout
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def gzip_member_all_fields(data: bytes, *, name: bytes, comment: bytes, extra: bytes,
                           text: bool = False) -> bytes:
    """One member with FEXTRA, FNAME, FCOMMENT and FHCRC set (RFC 1952 section 2.3), deflate level 6."""
    flags = 0x02 | 0x04 | 0x08 | 0x10 | (0x01 if text else 0)  # FHCRC FEXTRA FNAME FCOMMENT [FTEXT]
    header = bytearray(b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<I", MTIME) + b"\x00\x03")
    # FEXTRA: XLEN, then subfields SI1 SI2 LEN data (RFC 1952 section 2.3.1.1).
    subfield = b"HE" + struct.pack("<H", len(extra)) + extra
    header += struct.pack("<H", len(subfield)) + subfield
    header += name + b"\x00" + comment + b"\x00"
    # FHCRC: the two least significant bytes of the CRC-32 of all header bytes before it.
    header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    return bytes(header) + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def estargz_cuts(tar_path: Path, *, chunk: int = 64 << 10) -> list[int]:
    """Member boundaries like eStargz: at every entry header and every `chunk` of file data."""
    cuts = {0}
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
            cuts.add(info.offset)
            cuts.update(range(info.offset_data, info.offset_data + info.size, chunk))
        end = tar.offset
    cuts.add(end)  # the end-of-archive blocks get their own member
    return sorted(c for c in cuts if c < tar_path.stat().st_size)


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [*cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# --------------------------------------------------------------------------- layers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _count_members(blob: bytes) -> int:
    count, data = 0, blob
    while data:
        d = zlib.decompressobj(31)
        d.decompress(data)
        if not d.eof:
            break
        count += 1
        data = d.unused_data
    return count


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _python_verdict(path: Path) -> str:
    try:
        gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


def make_layers(outdir: str | os.PathLike[str], *, small: bool = True,
                verify: bool = True) -> dict[str, Path]:
    """Build every layer and bad input in `outdir`; return name -> path of the .tar.gz (or bad file).

    A good layer NAME is `NAME.tar.gz` with its decompressed bytes in `NAME.tar` (see `layer_tar`).
    Bad inputs are named `bad-NAME.*`.  `OUTDIR/layers.json` records sizes, member counts, sha256s
    and what Python's gzip.decompress says of each file.  An OUTDIR already built with the same
    mode and recipe is reused as is.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    mode = "small" if small else "full"
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        paths = {name: out / entry["file"] for name, entry in manifest["layers"].items()}
        if (manifest.get("mode") == mode and manifest.get("recipe") == RECIPE_VERSION
                and all(p.exists() for p in paths.values())):
            return paths
    sizes = SMALL if small else FULL
    rng = random.Random(SEED)
    layers: dict[str, Path] = {}

    def gz(name: str) -> Path:
        return out / f"{name}.tar.gz"

    def tar(name: str) -> Path:
        return out / f"{name}.tar"

    # (a) rootfs-like layer from real files, gzip -6; (b) the same tar through pigz.
    write_tar(tar("rootfs"), select_files(sizes.rootfs, salt="rootfs"))
    run_gzip("gzip", tar("rootfs"), gz("rootfs"))
    _link_or_copy(tar("rootfs"), tar("rootfs_pigz"))
    run_gzip("pigz", tar("rootfs"), gz("rootfs_pigz"))
    rootfs = tar("rootfs").read_bytes()

    # A small real-file tar for the header, bad-input and empty-member cases.
    write_tar(tar("headers"), select_files(sizes.mini, salt="mini"))
    mini = tar("headers").read_bytes()

    # (c) multi-member: tiny members (1, 10, 512, 17 B), two with FNAME, big ones in between.
    n = len(rootfs)
    cuts = sorted({0, 1, 11, 523, n * 2 // 5, n * 2 // 5 + 17, n * 3 // 5, n * 4 // 5})
    pieces = _pieces(rootfs, cuts)
    blob = b"".join(gzip_bytes(p, name=f"part{i}.tar" if i in (2, 5) else None)
                    for i, p in enumerate(pieces))
    gz("multimember").write_bytes(blob)
    _link_or_copy(tar("rootfs"), tar("multimember"))

    # eStargz-like: hundreds of small members, compressed by zlib rather than gzip(1).
    pieces = _pieces(rootfs, estargz_cuts(tar("rootfs")))
    gz("estargz").write_bytes(b"".join(gzip.compress(p, compresslevel=6, mtime=0) for p in pieces))
    _link_or_copy(tar("rootfs"), tar("estargz"))

    # Empty members (20-byte gzip of nothing) around and between real ones.
    empty = gzip_bytes(b"")
    half = len(mini) // 2
    gz("empty_members").write_bytes(
        empty + gzip_bytes(mini[:half]) + empty + empty + gzip_bytes(mini[half:]) + empty)
    tar("empty_members").write_bytes(mini)

    # (d) highly compressible: one sparse all-zero file.
    write_sparse_zero_tar(tar("zeros"), "var/lib/zeros.img", sizes.zeros)
    run_gzip("gzip", tar("zeros"), gz("zeros"))

    # (e) incompressible: seeded random bytes.
    write_tar(tar("random"), [], extra=[("data/random.bin", rng.randbytes(sizes.random))])
    run_gzip("gzip", tar("random"), gz("random"))

    # (f) header fields: two members, every optional field, different lengths.
    third = len(mini) // 3
    gz("headers").write_bytes(
        gzip_member_all_fields(mini[:third], name=b"headers.tar", comment=b"first member",
                               extra=b"hybrid-erofs fixture")
        + gzip_member_all_fields(mini[third:], name=b"x" * 300, comment=b"c" * 1000,
                                 extra=bytes(range(256)) * 8, text=True))

    for name in GOOD_LAYERS:
        layers[name] = gz(name)

    # Bad inputs.
    mini_gz = gzip_bytes(mini)
    rootfs_gz = gz("rootfs").read_bytes()
    corrupt = bytearray(mini_gz)
    corrupt[len(corrupt) // 2] ^= 0xFF
    not_deflate = bytearray(mini_gz)
    not_deflate[2] = 7
    bad: dict[str, tuple[str, bytes]] = {
        "not_gzip": ("tar", mini),
        "truncated": ("tar.gz", rootfs_gz[: len(rootfs_gz) // 2]),
        "truncated_header": ("tar.gz", mini_gz[:6]),
        "trailing_garbage": ("tar.gz", mini_gz + b"this is not a gzip member\n" * 4),
        "trailing_zeros": ("tar.gz", mini_gz + bytes(1024)),
        "corrupt": ("tar.gz", bytes(corrupt)),
        "not_deflate": ("tar.gz", bytes(not_deflate)),
        "zstd": ("tar.zst", _pipe(["zstd", "-q", "-3", "-c"], mini, b"\x28\xb5\x2f\xfd")),
        "xz": ("tar.xz", _pipe(["xz", "-6", "-c"], mini, b"\xfd7zXZ\x00")),
        "bzip2": ("tar.bz2", _pipe(["bzip2", "-9", "-c"], mini, b"BZh9")),
        "empty": ("tar.gz", b""),
    }
    for name in BAD_INPUTS:
        suffix, data = bad[name]
        path = out / f"bad-{name}.{suffix}"
        path.write_bytes(data)
        layers[name] = path

    entries: dict[str, dict[str, object]] = {}
    for name, path in layers.items():
        entry: dict[str, object] = {"file": path.name, "size": path.stat().st_size,
                                    "sha256": _sha256(path)}
        if name in GOOD_LAYERS:
            blob = path.read_bytes()
            entry.update(tar=tar(name).name, tar_size=tar(name).stat().st_size,
                         tar_sha256=_sha256(tar(name)), members=_count_members(blob))
            if verify:
                plain = gzip.decompress(blob)
                if hashlib.sha256(plain).hexdigest() != entry["tar_sha256"]:
                    raise SystemExit(f"{path}: gzip.decompress disagrees with {tar(name)}")
                del plain
            entry["python_gzip"] = "ok"
        else:
            entry["python_gzip"] = _python_verdict(path)
        entries[name] = entry
    manifest_path.write_text(json.dumps(
        {"mode": mode, "recipe": RECIPE_VERSION, "layers": entries}, indent=1) + "\n")
    return layers


def layer_tar(gz_path: Path) -> Path:
    """The decompressed tar that sits next to a good layer (`X.tar.gz` -> `X.tar`)."""
    return gz_path.with_suffix("")


def _pipe(argv: list[str], data: bytes, magic: bytes) -> bytes:
    """Compress with an external tool; without the tool, its magic number plus the data will do."""
    if shutil.which(argv[0]) is None:
        return magic + data
    return subprocess.run(argv, input=data, stdout=subprocess.PIPE, check=True).stdout


# --------------------------------------------------------------------------- committed fixtures


ORACLE_FILES = (
    "small.files", "small.tar.gz", "small.zinfo",
    "compressible.tar.gz", "compressible.zinfo", "compressible.v1.zinfo",
    "multimember.tar.gz", "multimember.zinfo",
)


def _oracle_zinfo(layer: Path, zinfo: Path, work: Path) -> None:
    """mkfs.erofs-oracle --tar=i --gzinfo=ZINFO META LAYER; META is thrown away."""
    meta = work / (layer.name + ".erofs")
    subprocess.run(["mkfs.erofs-oracle", "--quiet", "--tar=i", f"--gzinfo={zinfo}", str(meta),
                    str(layer)], check=True)
    meta.unlink()


def zinfo_v2_to_v1(v2: bytes) -> bytes:
    """SOCI v1 from v2: same header (count still includes checkpoint 0), records 1.. only.

    v1 files omit checkpoint 0, whose implied value is (in=10, out=0, bits=0, zero window).
    """
    count, _span = struct.unpack_from("<IQ", v2, 0)
    record = 8 + 8 + 1 + 32768
    if len(v2) != 12 + count * record:
        raise ValueError(f"not a v2 zinfo: {len(v2)} bytes for {count} checkpoints")
    first_in, first_out, first_bits = struct.unpack_from("<QQB", v2, 12)
    if (first_in, first_out, first_bits) != (10, 0, 0):
        raise ValueError(f"checkpoint 0 is ({first_in}, {first_out}, {first_bits}), "
                         "not the (10, 0, 0) v1 implies")
    return v2[:12] + v2[12 + record:]


PIN_FILE = "small.files"


def pinned_files(dest: Path, *, reselect: bool) -> list[Path]:
    """The real files of the committed layers, pinned in DEST/small.files ("sha256  path" lines).

    /usr changes whenever a package is installed, so a fresh selection would drift; the pin
    keeps regeneration byte-identical and fails loudly when a pinned file changed or vanished.
    """
    pin = dest / PIN_FILE
    if reselect or not pin.exists():
        files = select_files(1 << 20, salt="fixture")
        pin.write_text("".join(
            f"{'-' * 64 if p.is_symlink() else _sha256(p)}  {p}\n" for p in files))
        return files
    files, changed = [], []
    for line in pin.read_text().splitlines():
        digest, path = line.split("  ", 1)
        file = Path(path)
        files.append(file)
        if not file.is_symlink() and (not file.is_file() or _sha256(file) != digest):
            changed.append(path)
    if changed:
        raise SystemExit(f"{pin}: {len(changed)} pinned files changed or vanished on this machine "
                         f"(first: {changed[0]}); rerun with --reselect to pick new ones")
    return files


def make_oracle_fixtures(dest: Path, *, reselect: bool = False) -> dict[str, str]:
    """Regenerate fixtures/gzip/ (layers + mkfs.erofs-oracle zinfo files); return name -> sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    work = dest / ".work"
    work.mkdir(exist_ok=True)
    try:
        small_files = pinned_files(dest, reselect=reselect)
        # small: ~1 MiB of real files; at erofs' fixed 4 MiB span that is one checkpoint.
        write_tar(work / "small.tar", small_files)
        run_gzip("gzip", work / "small.tar", dest / "small.tar.gz")
        _oracle_zinfo(dest / "small.tar.gz", dest / "small.zinfo", work)

        # compressible: the same files plus 30 MiB of mostly zeros with a little text every
        # MiB, so the 4 MiB span gives several checkpoints while the blob stays small.
        text = b"".join(p.read_bytes() for p in small_files if p.suffix == ".py")[: 3 << 10]
        image = b"".join(text + bytes((1 << 20) - len(text)) for _ in range(30))
        write_tar(work / "compressible.tar", small_files, extra=[("var/lib/disk.img", image)])
        run_gzip("gzip", work / "compressible.tar", dest / "compressible.tar.gz")
        _oracle_zinfo(dest / "compressible.tar.gz", dest / "compressible.zinfo", work)
        v2 = (dest / "compressible.zinfo").read_bytes()
        (dest / "compressible.v1.zinfo").write_bytes(zinfo_v2_to_v1(v2))

        # multimember: small.tar in 6 members (1 B and 512 B among them); erofs puts a checkpoint
        # at each member start.  The first member is big: mkfs.erofs 1.9 fails ("failed to read
        # header block @ 0") when the first member holds less than one 512 B tar header.
        data = (work / "small.tar").read_bytes()
        n = len(data)
        cuts = [0, n // 4, n // 4 + 1, n // 4 + 513, n // 2, n // 2 + 100]
        (dest / "multimember.tar.gz").write_bytes(
            b"".join(gzip_bytes(p, name="part.tar" if i == 3 else None)
                     for i, p in enumerate(_pieces(data, cuts))))
        _oracle_zinfo(dest / "multimember.tar.gz", dest / "multimember.zinfo", work)

        for name in ("small", "compressible"):
            plain = gzip.decompress((dest / f"{name}.tar.gz").read_bytes())
            assert plain == (work / f"{name}.tar").read_bytes(), name
        assert gzip.decompress((dest / "multimember.tar.gz").read_bytes()) == data
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {name: _sha256(dest / name) for name in ORACLE_FILES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, nargs="?",
                        help="where to write the layers (default with --oracle: fixtures/gzip)")
    parser.add_argument("--small", action="store_true", help="small sizes (unit-test mode)")
    parser.add_argument("--oracle", action="store_true",
                        help="regenerate the committed fixtures/gzip/ files with mkfs.erofs-oracle")
    parser.add_argument("--reselect", action="store_true",
                        help="with --oracle: pick new real files instead of fixtures/gzip/small.files")
    args = parser.parse_args(argv)
    if args.oracle:
        dest = args.outdir or Path(__file__).resolve().parent.parent / "fixtures" / "gzip"
        for name, digest in make_oracle_fixtures(dest, reselect=args.reselect).items():
            print(f"{digest}  {name}  {(dest / name).stat().st_size}")
        return 0
    if args.outdir is None:
        parser.error("OUTDIR is required")
    layers = make_layers(args.outdir, small=args.small)
    manifest = json.loads((args.outdir / MANIFEST).read_text())["layers"]
    for name, path in layers.items():
        entry = manifest[name]
        extra = (f"tar {entry['tar_size']:>11}  members {entry['members']:>5}"
                 if "tar_size" in entry else entry["python_gzip"][:60])
        print(f"{name:17} {path.name:28} {entry['size']:>11}  {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
