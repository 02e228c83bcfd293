"""oci/transit.py and oci/artifact.fetch_gzip_blob_file: index files that travel as gzip blobs.
Deterministic compression; the blob's digest checked before anything is inflated; inflating
bounded by the size the index records; a bomb, a truncated or trailing stream, other bytes:
each one error line naming the blob, and no file (nor temporary) left behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from pathlib import Path

import pytest

from hybrid_erofs.errors import IndexFormatError, RegistryError
from hybrid_erofs.indexing.imageindex import (
    GZIP_TRANSIT,
    META_GZIP_MEDIA_TYPE,
    META_MEDIA_TYPE,
)
from hybrid_erofs.oci.artifact import fetch_gzip_blob_file
from hybrid_erofs.oci.client import Descriptor
from hybrid_erofs.oci.transit import gzip_file, inflate_to, inflated, is_gzip_of
from tests.unit.test_artifact import PushRegistry, _client, digest_of

PLAIN = b"".join(b"inode %06d " % n + bytes(200) for n in range(3000))  # meta-like
N = len(PLAIN)  # 639,000


def _plain(data: bytes = PLAIN) -> Descriptor:
    return Descriptor(META_MEDIA_TYPE, digest_of(data), len(data))


def test_gzip_file_is_deterministic_and_inflates_back(tmp_path: Path) -> None:
    source = tmp_path / "m.erofs"
    source.write_bytes(PLAIN)
    gzip_file(source, tmp_path / "a.gz")
    gzip_file(source, tmp_path / "b.gz")
    packed = (tmp_path / "a.gz").read_bytes()
    assert packed == (tmp_path / "b.gz").read_bytes()
    assert len(packed) < len(PLAIN) // 10
    assert packed[:2] == b"\x1f\x8b" and packed[4:8] == bytes(4)  # gzip, mtime 0
    assert gzip.decompress(packed) == PLAIN
    assert is_gzip_of(tmp_path / "a.gz", digest=digest_of(PLAIN), size=len(PLAIN))
    assert not is_gzip_of(tmp_path / "a.gz", digest=digest_of(b"x"), size=len(PLAIN))
    assert not is_gzip_of(tmp_path / "missing.gz", digest=digest_of(PLAIN), size=len(PLAIN))
    assert b"".join(inflated(io.BytesIO(packed), digest=digest_of(PLAIN), size=len(PLAIN),
                             subject="s")) == PLAIN


def test_media_types() -> None:
    assert GZIP_TRANSIT["meta"] == META_GZIP_MEDIA_TYPE == META_MEDIA_TYPE + "+gzip"
    assert GZIP_TRANSIT["zinfo"] == "application/vnd.hybrid-erofs.zinfo.v2+gzip"


class CountingReader(io.BytesIO):
    """How many compressed bytes were read."""

    consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.consumed += len(data)
        return data


PACKED = gzip.compress(PLAIN, mtime=0)
BOMB = gzip.compress(bytes(256 << 20), mtime=0)  # 256 MiB of zeros in about 250 KiB


@pytest.mark.parametrize("data, size, digest, message", [
    (PACKED[:len(PACKED) // 2], len(PLAIN), None, r"truncated gzip stream \(\d+ bytes "
                                                  rf"inflated, {N} expected\)"),
    (PACKED[:-4], len(PLAIN), None, "truncated gzip stream"),
    (PACKED + b"\0", len(PLAIN), None, "data after the end of the gzip stream"),
    (PACKED + PACKED, len(PLAIN), None, "data after the end of the gzip stream"),
    (PACKED, len(PLAIN) - 1, None, f"inflates to more than the {N - 1} bytes the index "
                                   "records"),
    (PACKED, len(PLAIN) + 1, None, f"inflates to {N} bytes, the index records {N + 1}"),
    (PACKED, len(PLAIN), "sha256:" + "0" * 64, f"inflates to {N} bytes hashing to sha256:"),
    (b"", len(PLAIN), None, r"truncated gzip stream \(0 bytes"),
    (zlib.compress(PLAIN), len(PLAIN), None, "not a valid gzip stream after 0 inflated bytes"),
    (PACKED[:100] + bytes(50) + PACKED[150:], len(PLAIN), None, "not a valid gzip stream"),
    (BOMB, len(PLAIN), None, f"inflates to more than the {N} bytes"),
], ids=["half", "no-trailer", "trailing-byte", "two-members", "one-byte-more",
        "one-byte-short", "other-digest", "empty", "zlib-not-gzip", "corrupt", "bomb"])
def test_bad_streams_are_one_error_and_no_file(tmp_path: Path, data: bytes, size: int,
                                               digest: str | None, message: str) -> None:
    target = tmp_path / "out" / "m.erofs"
    target.parent.mkdir()
    reader = CountingReader(data)
    with pytest.raises(IndexFormatError, match=message) as caught:
        inflate_to(reader, target, digest=digest or digest_of(PLAIN), size=size,
                   subject="blob sha256:abc (m.erofs)")
    assert str(caught.value).startswith("blob sha256:abc (m.erofs): ")
    assert "\n" not in str(caught.value)
    assert list(target.parent.iterdir()) == []  # no file, no temporary
    if data is BOMB:  # stopped at the bound, long before the end of the bomb
        assert reader.consumed <= 4 << 20


def _served(tmp_path: Path, blob: bytes) -> tuple[PushRegistry, Descriptor]:
    fake = PushRegistry()
    fake.blobs[digest_of(blob)] = blob
    (tmp_path / "cache").mkdir()
    return fake, Descriptor(META_GZIP_MEDIA_TYPE, digest_of(blob), len(blob))


def test_fetch_inflates_and_keeps_the_plain_file(tmp_path: Path) -> None:
    fake, compressed = _served(tmp_path, PACKED)
    target = tmp_path / "cache" / "m.erofs"
    with _client(fake) as client:
        assert fetch_gzip_blob_file(client, compressed, _plain(), target) == target
        assert target.read_bytes() == PLAIN  # stored uncompressed
        assert fake.count("GET", "/blobs/") == 1
        fetch_gzip_blob_file(client, compressed, _plain(), target)
        assert fake.count("GET", "/blobs/") == 1  # already there: not fetched again
        target.write_bytes(b"stale")
        fetch_gzip_blob_file(client, compressed, _plain(), target)
        assert target.read_bytes() == PLAIN and fake.count("GET", "/blobs/") == 2
    assert [p.name for p in target.parent.iterdir()] == ["m.erofs"]


def test_a_tampered_blob_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    """The registry serves other bytes than the bound digest: refused when the download
    ends, before a byte is inflated (here they would even inflate to the right file)."""
    fake, compressed = _served(tmp_path, PACKED)
    fake.blobs[compressed.digest] = gzip.compress(PLAIN, compresslevel=1, mtime=0)[
        :len(PACKED)].ljust(len(PACKED), b"\0")
    target = tmp_path / "cache" / "m.erofs"
    with _client(fake) as client, pytest.raises(
            RegistryError, match=rf"^{compressed.digest}: blob digest mismatch"):
        fetch_gzip_blob_file(client, compressed, _plain(), target)
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("blob, message", [
    (BOMB, f"inflates to more than the {N} bytes the index records"),
    (PACKED[:-100], "truncated gzip stream"),
    (gzip.compress(PLAIN[:-1] + b"X", mtime=0), f"inflates to {N} bytes hashing to"),
], ids=["bomb", "truncated", "other-file"])
def test_a_bound_blob_that_is_not_the_file_is_one_error(tmp_path: Path, blob: bytes,
                                                        message: str) -> None:
    fake, compressed = _served(tmp_path, blob)
    target = tmp_path / "cache" / "m.erofs"
    with _client(fake) as client, pytest.raises(IndexFormatError, match=message) as caught:
        fetch_gzip_blob_file(client, compressed, _plain(), target)
    assert str(caught.value).startswith(f"blob {compressed.digest} (m.erofs): ")
    assert list(target.parent.iterdir()) == []


def test_a_plain_size_over_the_limit_is_refused_before_fetching(tmp_path: Path) -> None:
    fake, compressed = _served(tmp_path, PACKED)
    with _client(fake) as client, pytest.raises(RegistryError, match="more than the limit"):
        fetch_gzip_blob_file(client, compressed, _plain(), tmp_path / "cache" / "m",
                             max_size=len(PLAIN) - 1)
    assert fake.count("GET", "/blobs/") == 0


def test_hashlib_names_match() -> None:
    assert digest_of(PLAIN) == "sha256:" + hashlib.sha256(PLAIN).hexdigest()
