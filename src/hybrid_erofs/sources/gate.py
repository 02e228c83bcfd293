"""GateSource: the top of a mount's device stack, where trust is decided at run time. Once
closed (verification found the index does not describe the layer), every read fails with EIO.

It also carries the layer's trust state for `status`: how its index was obtained and whether
it was verified against the layer (trust/verifier.py, docs/security.md).
"""

from __future__ import annotations

import threading
import time

from ..errors import SourceIOError
from ..metrics.samples import Sample, gauge
from ..source import ByteSource, FileRanged, check_range, read_into

# How a layer's index was obtained (docs/security.md).
LOCAL = "local"  # files named on the command line, or indexed on this node
BOUND = "bound"  # named by digest in the image's manifest (the image digest covers it)
SIGNED = "signed"  # an artifact signed by a key this node trusts
UNBOUND = "unbound"  # an artifact anyone with push rights could attach (explicit opt-in)
TRUST_KINDS = (LOCAL, BOUND, SIGNED, UNBOUND)

# What is known of it at run time.
NOT_VERIFIED = "not-verified"
VERIFYING = "verifying"
VERIFIED = "verified"
FAILED = "failed"


class GateSource:
    """`inner` until `close_gate(reason)`; from then on every read raises SourceIOError.

    Args:
        inner: the device (meta || layer data); owned, closed by `close()`.
        trust: how the index was obtained (LOCAL, BOUND, SIGNED or UNBOUND).
        name: how errors name the device.

    Thread-safe: a read that already passed the gate finishes; later ones fail.
    """

    def __init__(self, inner: ByteSource, *, trust: str = LOCAL, name: str = "device") -> None:
        if trust not in TRUST_KINDS:
            raise ValueError(f"'trust' must be one of {', '.join(TRUST_KINDS)} (got {trust!r})")
        self._inner = inner
        self._name = name
        self.trust = trust
        self.state = NOT_VERIFIED
        self.detail = ""
        self.changed = time.time()
        self._lock = threading.Lock()
        self._closed_reason: str | None = None

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def inner(self) -> ByteSource:
        return self._inner

    @property
    def is_closed(self) -> bool:
        return self._closed_reason is not None

    def _check_open(self) -> None:
        reason = self._closed_reason
        if reason is not None:
            # Closing the gate was logged once; the EIOs it causes are not logged again.
            raise SourceIOError(f"{self._name}: reads refused: {reason}", logged=True)

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        self._check_open()
        return self._inner.pread(length, offset)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        check_range(self, len(buffer), offset)
        self._check_open()
        read_into(self._inner, buffer, offset)

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        """FileRanged pass-through (stored spans and the meta go to the kernel by splice),
        refused like a read once the gate is closed."""
        check_range(self, length, offset)
        self._check_open()
        if not isinstance(self._inner, FileRanged):
            return None
        return self._inner.file_range(length, offset)

    def set_state(self, state: str, detail: str = "") -> None:
        with self._lock:
            if self.state == FAILED:
                return  # a failure is final
            self.state, self.detail, self.changed = state, detail, time.time()

    def close_gate(self, reason: str) -> None:
        """Fail every later read with EIO, for good."""
        with self._lock:
            self._closed_reason = reason
            self.state, self.detail, self.changed = FAILED, reason, time.time()

    def metric_samples(self) -> list[Sample]:
        """Gauges for /metrics (metrics.Reporting): alert on index_verification_failed."""
        return [gauge("index_unbound", float(self.trust == UNBOUND),
                      "1 when the layer's index is not bound to its image (opt-in)"),
                gauge("index_verified", float(self.state == VERIFIED),
                      "1 when the layer's index was verified against the layer"),
                gauge("index_verification_failed", float(self.state == FAILED),
                      "1 when the index was found not to describe the layer (reads fail)")]

    def to_json(self) -> dict[str, object]:
        return {"index": self.trust, "state": self.state, "detail": self.detail,
                "changed": self.changed}

    def close(self) -> None:
        self._inner.close()


__all__ = ["BOUND", "FAILED", "LOCAL", "NOT_VERIFIED", "SIGNED", "TRUST_KINDS", "UNBOUND",
           "VERIFIED", "VERIFYING", "GateSource"]
