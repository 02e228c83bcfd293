"""`index`: one pass over a local layer (gzip or plain tar) writes the zinfo and the EROFS meta.

The gzip checkpoint builder hands every uncompressed byte to the meta builder; outputs are
written atomically only after the whole pass succeeded.
"""

from __future__ import annotations

import gc
import hashlib
import io
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..device import RegistryOptions, is_local
from ..errors import GzipFormatError, InvalidInput, SourceIOError, TarFormatError
from ..filekind import HEAD_SIZE, NOT_LAYERS, detect_format, identify, not_gzip_message
from ..gzindex.build import DEFAULT_SPAN, build_index
from ..gzindex.format import dump_index
from ..gzindex.sidecar import Sidecar, dump_sidecar, sha256_digest, sidecar_path
from ..oci.layout import is_layout_reference, open_layout_blob
from ..outfile import OutputSet, check_writable
from ..source import ByteSource
from ..sources.registry import iter_blob, open_registry_blob
from ..trust.binding import stamp_meta

READ_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class IndexReport:
    """What `index_layer` did; `to_json()` is the `--json` output (docs/formats.md)."""

    layer: str
    format: str  # "gzip" or "tar"
    blob_size: int
    blob_digest: str  # "sha256:<hex>"
    layer_size: int
    checkpoints: int
    span: int
    members: int
    zinfo: str | None
    zinfo_size: int
    meta: str | None
    meta_size: int
    entries: int
    elapsed_s: float
    engine: str
    layer_digest: str | None = None  # the layer data's sha256, when it was computed
    zinfo_digest: str | None = None
    meta_digest: str | None = None
    sidecar: str | None = None
    sidecar_digest: str | None = None
    sidecar_size: int = 0

    @property
    def mb_per_s(self) -> float:
        """Uncompressed MB (10^6 bytes) per second."""
        return self.layer_size / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        layer: dict[str, object] = {"size": self.layer_size}
        if self.layer_digest is not None:
            layer["digest"] = self.layer_digest
        return {
            "source": self.layer, "format": self.format,
            "blob": {"digest": self.blob_digest, "size": self.blob_size},
            "layer": layer,
            "zinfo": None if self.zinfo is None else {
                "path": self.zinfo, "digest": self.zinfo_digest, "size": self.zinfo_size,
                "span": self.span, "checkpoints": self.checkpoints, "members": self.members},
            "meta": None if self.meta is None else {
                "path": self.meta, "digest": self.meta_digest, "size": self.meta_size,
                "entries": self.entries},
            "sidecar": None if self.sidecar is None else {
                "path": self.sidecar, "digest": self.sidecar_digest, "size": self.sidecar_size},
            "engine": self.engine, "elapsed_s": round(self.elapsed_s, 3),
        }


class _PeekReader:
    """readinto() that first serves bytes already read for format detection."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = memoryview(head)
        self._stream = stream

    def readinto(self, buffer: memoryview) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._stream.readinto(buffer) or 0  # type: ignore[attr-defined]


class _ChunkStream(io.RawIOBase):
    """A readable binary stream over an iterator of byte chunks (a registry blob download)."""

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed:
            self._on_close()
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _open_remote(reference: str, registry: RegistryOptions) -> tuple[BinaryIO, str, int]:
    """Stream a registry layer once (no copy on disk); its digest is checked by the caller
    against the sha256 the index pass computes anyway. An `oci:DIR[:TAG]` blob is read from
    its file in the layout."""
    blob: ByteSource
    if is_layout_reference(reference):
        blob, descriptor = open_layout_blob(reference, layer=registry.layer, blob=registry.blob,
                                            platform=registry.platform)
    else:
        blob, descriptor = open_registry_blob(
            reference, layer=registry.layer, blob=registry.blob, platform=registry.platform,
            username=registry.username, password=registry.password, insecure=registry.insecure,
            transport=registry.transport,
        )
    if not descriptor.digest.startswith("sha256:"):
        blob.close()
        raise InvalidInput(f"{reference}: layer digest {descriptor.digest} is not sha256")
    stream = io.BufferedReader(_ChunkStream(iter_blob(blob, verify=False), blob.close), READ_SIZE)
    return stream, descriptor.digest, descriptor.size


def _open_input(layer: str) -> tuple[BinaryIO, int | None]:
    if layer == "-":
        return sys.stdin.buffer, None
    path = Path(layer)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError as exc:
        raise InvalidInput(f"{layer}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidInput(f"{layer}: is a directory, not a layer file") from exc
    except OSError as exc:
        raise InvalidInput(f"{layer}: cannot open: {exc.strerror}") from exc
    size = os.fstat(handle.fileno()).st_size
    return handle, size if path.is_file() else None


def open_layer_stream(layer: str, registry: RegistryOptions | None = None
                      ) -> tuple[BinaryIO, str | None, int | None]:
    """The blob of `layer` as a stream read once: a local file, "-" (stdin), a registry
    layer (streamed, nothing stored) or an `oci:` layout's blob; the digest the bytes must
    have when a manifest names it (checked by the caller, which hashes them anyway), and the
    size when known."""
    if is_local(layer):
        stream, size = _open_input(layer)
        return stream, None, size
    return _open_remote(layer, registry or RegistryOptions())


def _read_head(stream: BinaryIO, size: int) -> bytes:
    parts: list[bytes] = []
    have = 0
    while have < size:
        chunk = stream.read(size - have)
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _same_file(a: str, b: Path) -> bool:
    try:
        return a != "-" and os.path.samefile(a, b)
    except OSError:
        return False


def index_layer(
    layer: str,
    *,
    zinfo: str | os.PathLike[str] | None,
    meta: str | os.PathLike[str] | None,
    span: int = DEFAULT_SPAN,
    every_member: bool = False,
    aufs: bool = False,
    uuid: bytes | None = None,
    build_time: int | None = None,
    engine: str = "auto",
    progress: Callable[[int], None] | None = None,
    registry: RegistryOptions | None = None,
    diff_id: str | None = None,
    root_owner: tuple[int, int] | None = None,
) -> IndexReport:
    """Index `layer` (a path, "-" for stdin, or a registry reference) in one pass.

    Writes `zinfo` (SOCI zinfo v2; gzip input only) and/or `meta` (EROFS tar-index image),
    each atomically, only once the whole input was read without error; the zinfo's sidecar
    last (it records the digests of both, so its presence means the set is complete).

    `diff_id`: the layer data's expected sha256 (the image config's rootfs.diff_ids entry);
    a layer whose uncompressed bytes hash otherwise is refused. `root_owner`: uid/gid of the
    root directory (containerd ignores a "./" entry) [default: 0, 0].
    """
    if zinfo is None and meta is None:
        raise InvalidInput(f"{layer}: nothing to write: give -o ZINFO and/or --meta FILE")
    outputs = [Path(p) for p in (zinfo, meta) if p is not None]
    if len(outputs) == 2 and os.path.abspath(outputs[0]) == os.path.abspath(outputs[1]):
        raise InvalidInput(f"{outputs[0]}: the zinfo and the meta cannot be the same file")
    for out in outputs:
        if is_local(layer) and _same_file(layer, out):
            raise InvalidInput(f"{out}: is the input layer itself; refusing to overwrite it")
        check_writable(out)

    stream, expected_digest, input_size = open_layer_stream(layer, registry)
    worker: _SinkThread | None = None
    hasher: _DiffIdHasher | None = None
    sidecar: Sidecar | None = None
    try:
        head = _read_head(stream, HEAD_SIZE)
        kind = detect_format(head)
        if kind not in ("gzip", "tar") or identify(head, input_size) in NOT_LAYERS:
            # Not a layer at all (an EROFS image starts with a zero block, like a tar's end).
            raise GzipFormatError(not_gzip_message("<stdin>" if layer == "-" else layer, head,
                                                   input_size))
        builder = (_meta_builder(aufs=aufs, uuid=uuid, build_time=build_time,
                                 root_owner=root_owner) if meta else None)
        # The meta builder runs on its own thread: inflate releases the GIL, so parsing the
        # tar overlaps decompression on a second core.
        worker = _SinkThread(builder) if builder is not None else None
        sink = worker.feed if worker is not None else None
        if diff_id is not None:
            hasher = _DiffIdHasher(diff_id, sink)
            sink = hasher.feed
        started = time.perf_counter()
        if kind == "tar":
            if zinfo is not None:
                raise InvalidInput(
                    f"{layer}: uncompressed tar: a zinfo is only for gzip layers; use --meta alone"
                )
            blob_size, digest = _pass_plain(head, stream, sink, progress)
            layer_size, checkpoints, members, engine_name = blob_size, 0, 0, "none"
            index_bytes = b""
        else:
            result = build_index(_PeekReader(head, stream), span=span, every_member=every_member,
                                 sink=sink, engine=engine, progress=progress,
                                 name="<stdin>" if layer == "-" else layer)
            blob_size, digest, layer_size = result.blob_size, result.blob_sha256, result.layer_size
            if expected_digest is not None and expected_digest != f"sha256:{digest}":
                raise SourceIOError(
                    f"{layer}: blob digest mismatch: {expected_digest} was expected, "
                    f"the bytes received hash to sha256:{digest}"
                )
            checkpoints, members, engine_name = len(result.index), result.members, result.engine
            index_bytes = dump_index(result.index)
            sidecar = Sidecar(
                blob_digest=f"sha256:{digest}", blob_size=blob_size, layer_size=layer_size,
                span=span, checkpoints=checkpoints, zinfo_digest=sha256_digest(index_bytes),
                zinfo_size=len(index_bytes), spans=result.span_digests,
                tool=f"hybrid-erofs {_version()}", every_member=every_member,
            )
        if hasher is not None:
            hasher.check(f"{layer}: layer {expected_digest or digest}")
        if worker is not None:
            worker.close()
        meta_bytes = builder.finish() if builder is not None else b""
        elapsed = time.perf_counter() - started
    except TarFormatError as exc:
        raise TarFormatError(f"{'<stdin>' if layer == '-' else layer}: {exc}") from exc
    finally:
        if hasher is not None:
            hasher.close()
        if worker is not None:
            worker.abort()
        if stream is not sys.stdin.buffer:
            stream.close()

    blob_digest = f"sha256:{digest}"
    if meta is not None:
        meta_bytes = stamp_meta(meta_bytes, blob_digest)  # the meta names its layer
    sidecar_bytes = b""
    if zinfo is not None:
        assert sidecar is not None  # a zinfo is only made from gzip input
        if meta is not None:
            sidecar = replace(sidecar, meta_digest=sha256_digest(meta_bytes),
                              meta_size=len(meta_bytes),
                              whiteouts="overlay" if aufs else "tar")
        if hasher is not None:
            sidecar = replace(sidecar, layer_digest=hasher.digest)
        sidecar_bytes = dump_sidecar(sidecar)
    # One set: everything is written under temporary names first; the sidecar, which names
    # the digests of the zinfo and the meta, is renamed into place first, so a crash at any
    # point leaves either the old files or files that the readers' checks refuse together.
    with OutputSet() as files:
        if zinfo is not None:
            files.add(sidecar_path(zinfo), sidecar_bytes)
            files.add(zinfo, index_bytes)
        if meta is not None:
            files.add(meta, meta_bytes)
        files.commit()
    return IndexReport(
        layer=layer, format=kind if kind == "tar" else "gzip", blob_size=blob_size,
        blob_digest=blob_digest, layer_size=layer_size, checkpoints=checkpoints, span=span,
        members=members, zinfo=None if zinfo is None else str(zinfo), zinfo_size=len(index_bytes),
        meta=None if meta is None else str(meta), meta_size=len(meta_bytes),
        entries=getattr(builder, "entries", 0), elapsed_s=elapsed, engine=engine_name,
        layer_digest=hasher.digest if hasher is not None else (
            blob_digest if kind == "tar" else None),
        zinfo_digest=sha256_digest(index_bytes) if zinfo is not None else None,
        meta_digest=sha256_digest(meta_bytes) if meta is not None else None,
        sidecar=str(sidecar_path(zinfo)) if zinfo is not None else None,
        sidecar_digest=sha256_digest(sidecar_bytes) if zinfo is not None else None,
        sidecar_size=len(sidecar_bytes),
    )


class _Consumer(Protocol):
    """What `_SinkThread` feeds: the meta builder."""

    def feed(self, chunk: memoryview) -> None: ...

    def skip(self, length: int) -> None: ...

    @property
    def needed_offset(self) -> int: ...


class _SinkThread:
    """Feeds the layer data to `consumer` on a worker thread.

    Only bytes the consumer may look at are copied (the producer's buffer is reused): after
    each chunk the worker publishes the consumer's `needed_offset`, and the producer turns
    the bytes before it (file contents, ~70% of a typical layer) into a skip count.  The
    published value lags behind the queue but never overshoots, so the skip is always safe.
    The rest is copied into one of `depth` reused buffers (fresh 1 MiB allocations cost
    page faults), which also bounds how far the producer runs ahead.

    The cyclic GC is paused until `close`/`abort`: the builder makes ~10 long-lived objects per
    tar entry and no garbage cycles, and each full collection would walk all of them (on
    whichever thread allocates, the inflate thread included).

    An exception in the consumer is raised again in the producer at its next `feed` or at
    `close`, so a bad tar stops the pass early.
    """

    def __init__(self, consumer: _Consumer, *, depth: int = 8) -> None:
        self._consumer = consumer
        # (bytes to skip, buffer, bytes of it to feed); None stops the worker.
        self._queue: queue.SimpleQueue[tuple[int, bytearray | None, int] | None] = \
            queue.SimpleQueue()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(bytearray())
        self._error: BaseException | None = None
        self._offset = 0  # layer data handed over so far
        self._needed = 0  # the consumer's needed_offset after its last chunk
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._thread = threading.Thread(target=self._run, name="meta-builder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = self._consumer
        while True:
            item = self._queue.get()
            if item is None:
                return
            skip, buffer, length = item
            try:
                if self._error is None:
                    if skip:
                        consumer.skip(skip)
                    if buffer is not None:
                        consumer.feed(memoryview(buffer)[:length])
                    self._needed = consumer.needed_offset
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc
            finally:
                if buffer is not None:
                    self._free.put(buffer)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def feed(self, chunk: memoryview) -> None:
        self._raise()
        start = self._offset
        self._offset = start + len(chunk)
        skip = min(max(self._needed - start, 0), len(chunk))
        length = len(chunk) - skip
        if not length:
            self._queue.put((skip, None, 0))
            return
        buffer = self._free.get()
        if len(buffer) < length:
            buffer.extend(bytes(length - len(buffer)))
        buffer[:length] = chunk[skip:]
        self._queue.put((skip, buffer, length))

    def close(self) -> None:
        """Wait until every chunk was consumed; raise the consumer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._resume_gc()
        self._raise()

    def abort(self) -> None:
        """Stop the thread without raising (cleanup after another error)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        self._resume_gc()

    def _resume_gc(self) -> None:
        if self._gc_was_enabled:
            self._gc_was_enabled = False
            gc.enable()


def _pass_plain(head: bytes, stream: BinaryIO, sink: Callable[[memoryview], None] | None,
                progress: Callable[[int], None] | None) -> tuple[int, str]:
    """Feed an uncompressed tar to the sink; return its size and sha256."""
    hasher = hashlib.sha256(head)
    total = len(head)
    if sink is not None:
        sink(memoryview(head))
    while True:
        chunk = stream.read(READ_SIZE)
        if not chunk:
            break
        hasher.update(chunk)
        total += len(chunk)
        if sink is not None:
            sink(memoryview(chunk))
        if progress is not None:
            progress(total)
    return total, hasher.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hybrid-erofs")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _meta_builder(*, aufs: bool, uuid: bytes | None, build_time: int | None,  # type: ignore[no-untyped-def]
                  root_owner: tuple[int, int] | None):
    from ..erofs.writer import MetaBuilder

    uid, gid = root_owner if root_owner is not None else (None, None)
    return MetaBuilder(aufs=aufs, uuid=uuid, build_time=build_time, root_uid=uid, root_gid=gid)


class _DiffIdHasher:
    """sha256 of the layer data (to compare with the config's diff_id) on its own thread.

    Hashing 1 MiB releases the GIL, but done inline it would serialize with inflate (~30% of
    the pass); copies go to a worker instead, at most `depth` in flight.
    """

    def __init__(self, expected: str, inner: Callable[[memoryview], None] | None, *,
                 depth: int = 8) -> None:
        algorithm, _, self._expected = expected.partition(":")
        if algorithm != "sha256" or len(self._expected) != 64:
            raise InvalidInput(f"diff_id {expected!r} is not a sha256 digest")
        self._hash = hashlib.sha256()
        self._inner = inner
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="diff-id")
        self._pending: deque[Future[None]] = deque()
        self._depth = depth

    def feed(self, chunk: memoryview) -> None:
        if len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._hash.update, bytes(chunk)))
        if self._inner is not None:
            self._inner(chunk)

    @property
    def digest(self) -> str:
        """"sha256:<hex>" of everything fed (after `check`)."""
        return f"sha256:{self._hash.hexdigest()}"

    def check(self, subject: str) -> None:
        while self._pending:
            self._pending.popleft().result()
        actual = self._hash.hexdigest()
        if actual != self._expected:
            raise InvalidInput(
                f"{subject}: corrupt or mislabelled layer: its uncompressed data hashes to "
                f"sha256:{actual}, the image config's diff_id is sha256:{self._expected}"
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["IndexReport", "index_layer", "open_layer_stream"]
