"""Exception hierarchy. Every error the library raises derives from HybridErofsError.

* HybridErofsError
  x InvalidInput (ValueError)          a file given by the user is not what it should be
    + IndexFormatError                 a zinfo checkpoint file is malformed
    + GzipFormatError                  a blob is not (valid) gzip, or is truncated
    + TarFormatError                   a tar stream is malformed
    + ErofsFormatError                 an EROFS image is malformed
    + InvalidReference                 a "registry/repo:tag@digest" string is malformed
    + BindingError                     index files that do not belong together or to the layer
  x TrustError                         an index found in a registry is not bound to the image
                                       and the node's policy refuses it; a bad signature
  x OutputError (OSError)              an output file could not be written
  x RegistryError                      a registry answered, but not as required (status, digest,
                                       media type, platform); `.transient` as for SourceIOError
    + AuthError                        credentials missing or refused, token server failure
  x SourceIOError (OSError, errno EIO) a byte source could not deliver its bytes
                                       (`.transient`, `.retry_after_s` from HTTP Retry-After)
  x CacheError (OSError)               the on-disk chunk cache directory is unusable
  x LayerVerificationError             a fully fetched layer is not what its index says
  x MountError (OSError)               mount/umount failed (mountpoint, kernel, daemon, state)
    + MountBusy                        the mount is in use; `.pids` name who uses it
  x SnapshotError                      a snapshotter request cannot be done (gRPC status `.code`)
    + SnapshotNotFound                 no snapshot of that key (NOT_FOUND)
    + SnapshotExists                   the key or target exists already (ALREADY_EXISTS)
    + SnapshotPrecondition             wrong kind, has children (FAILED_PRECONDITION)
    + SnapshotInvalid                  a malformed filter, field path or parent (INVALID_ARGUMENT)
    + SnapshotUnavailable              a lazily mounted layer below it is gone (UNAVAILABLE)
  x LayerFallback                      a layer cannot be mounted lazily: containerd applies it
"""

from __future__ import annotations

import errno


class HybridErofsError(Exception):
    """Base class of every error hybrid-erofs raises on purpose."""


class InvalidInput(HybridErofsError, ValueError):
    """Input supplied by the user (a file, a stream, an option) is unusable."""


class IndexFormatError(InvalidInput):
    """A zinfo checkpoint file is malformed or does not fit its blob."""


class GzipFormatError(InvalidInput):
    """A blob is not gzip, is truncated, or carries trailing garbage."""


class TarFormatError(InvalidInput):
    """A tar stream is malformed (bad checksum, truncated, absurd sizes)."""


class ErofsFormatError(InvalidInput):
    """An EROFS image is malformed (bad magic, checksum, inode or directory)."""


class InvalidReference(InvalidInput):
    """An image reference string does not follow the distribution grammar."""


class BindingError(InvalidInput):
    """Index files (meta, zinfo, sidecar) that do not belong together, or not to the layer
    they are used with; the message names both digests."""


class TrustError(HybridErofsError):
    """An index found by discovery is not bound to the image (nor signed by a trusted key)
    and the node's policy does not accept it; or a signature is invalid."""


class OutputError(HybridErofsError, OSError):
    """An output file could not be written (nothing partial is left behind)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "output error"


class RegistryError(HybridErofsError):
    """A registry answered, but not as required (HTTP status, digest, media type, platform).

    `transient` tells whether repeating the request may succeed (HTTP 408/429/5xx, resets).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class AuthError(RegistryError):
    """Credentials are missing or were refused, or the token server failed."""


class SourceIOError(HybridErofsError, OSError):
    """I/O failure below the exporter; maps to EIO for NBD and FUSE.

    `transient` tells whether retrying the same read may succeed; `retry_after_s` carries a
    server's `Retry-After` (seconds) when it sent one; `logged` says the failure was logged
    where it happened (exporters then log the EIO it causes at debug level: one line per
    event, not one per page the kernel asks again).
    """

    def __init__(
        self, message: str, *, transient: bool = False, retry_after_s: float | None = None,
        logged: bool = False,
    ) -> None:
        super().__init__(errno.EIO, message)
        self.transient = transient
        self.retry_after_s = retry_after_s
        self.logged = logged

    def __str__(self) -> str:
        return str(self.strerror)


def already_logged(exc: BaseException) -> bool:
    """True when the failure behind `exc` was logged where it happened (SourceIOError.logged)."""
    while exc is not None:
        if getattr(exc, "logged", False):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same request may succeed."""
    return bool(getattr(exc, "transient", False))


class CacheError(HybridErofsError, OSError):
    """The on-disk chunk cache cannot be opened (unwritable directory, bad permissions).

    Raised when a cache is opened; failures to store a chunk later only log a warning.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cache error"


class LayerVerificationError(HybridErofsError):
    """A layer fetched in full does not match its index (blob digest, diff_id, the index
    recomputed from the blob); the mount then fails every further read."""


class MountError(HybridErofsError, OSError):
    """A mount, umount or reattach failed; nothing of the attempt is left behind."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "mount error"


class MountBusy(MountError):
    """The mount is in use; `pids` lists the processes holding it (may be empty)."""

    def __init__(self, message: str, *, pids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.pids = pids


class SnapshotError(HybridErofsError):
    """A snapshotter request cannot be done; `code` names the gRPC status it travels as
    (containerd turns it back into its errdefs: NotFound, AlreadyExists, ...)."""

    code = "UNKNOWN"


class SnapshotNotFound(SnapshotError):
    """No snapshot has that key (or the parent named does not exist)."""

    code = "NOT_FOUND"


class SnapshotExists(SnapshotError):
    """The key exists already, or the layer is already prepared as the target snapshot."""

    code = "ALREADY_EXISTS"


class SnapshotPrecondition(SnapshotError):
    """The snapshot is of the wrong kind for the request, or has children."""

    code = "FAILED_PRECONDITION"


class SnapshotInvalid(SnapshotError, ValueError):
    """A malformed filter or field path, or a parent that is not committed."""

    code = "INVALID_ARGUMENT"


class SnapshotUnavailable(SnapshotError):
    """A lazily mounted layer below the snapshot no longer serves and could not be mounted
    again."""

    code = "UNAVAILABLE"


class LayerFallback(HybridErofsError):
    """A layer cannot (or may not) be mounted lazily; the snapshotter lets containerd download
    and apply it instead. The message says why; `reason` is a short key for counting
    (no-labels, no-index, untrusted, unsupported, index-error, mount-failed, conflict)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
