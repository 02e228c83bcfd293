"""Exception hierarchy. Every error the library raises derives from HybridErofsError.

* HybridErofsError
  x InvalidInput (ValueError)          a file given by the user is not what it should be
    + IndexFormatError                 a zinfo checkpoint file is malformed
    + GzipFormatError                  a blob is not (valid) gzip, or is truncated
    + TarFormatError                   a tar stream is malformed
    + ErofsFormatError                 an EROFS image is malformed
  x OutputError (OSError)              an output file could not be written
  x SourceIOError (OSError, errno EIO) a byte source could not deliver its bytes
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


class OutputError(HybridErofsError, OSError):
    """An output file could not be written (nothing partial is left behind)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "output error"


class SourceIOError(HybridErofsError, OSError):
    """I/O failure below the exporter; maps to EIO for NBD and FUSE.

    `transient` tells whether retrying the same read may succeed.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(errno.EIO, message)
        self.transient = transient

    def __str__(self) -> str:
        return str(self.strerror)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same request may succeed."""
    return bool(getattr(exc, "transient", False))
