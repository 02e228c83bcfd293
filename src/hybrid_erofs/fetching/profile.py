"""Prefetch profiles: the spans of one layer that a container read while it started, in the
order it first read them, for the zinfo they number. Stored per layer beside the zinfo in an
image index directory (`sha256-<hex>.prefetch.json`), listed in index.json with its digest,
and published in the index artifact with the rest, so it is bound the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import IndexFormatError
from ..gzindex.sidecar import load_sidecar, sidecar_path

log = logging.getLogger(__name__)

FORMAT = "hybrid-erofs/prefetch-profile"
VERSION = 1


@dataclass(frozen=True, slots=True)
class PrefetchProfile:
    """Span numbers of one layer's zinfo (identified by its sha256), first read first."""

    blob: str  # the layer's blob digest
    zinfo_sha256: str
    spans: tuple[int, ...]
    command: tuple[str, ...] = ()  # what was run to record it (information only)
    # When each span was first read: ms since the image's first read (all layers of one
    # `profile` run share the clock), one per span; None in older profiles.
    first_read_ms: tuple[int, ...] | None = None

    def timed(self) -> list[tuple[float, int]]:
        """(when, span) per span, first read first: `first_read_ms`, or without it the
        span's place in the profile (a profile's own order, interleaved with the others)."""
        if self.first_read_ms is None:
            return [(float(place), n) for place, n in enumerate(self.spans)]
        return [(float(ms), n) for ms, n in zip(self.first_read_ms, self.spans, strict=True)]


def dump_profile(profile: PrefetchProfile) -> bytes:
    data = {"format": FORMAT, "version": VERSION, "blob": profile.blob,
            "zinfo_sha256": profile.zinfo_sha256, "spans": list(profile.spans),
            "command": list(profile.command)}
    if profile.first_read_ms is not None:
        data["first_read_ms"] = list(profile.first_read_ms)
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def parse_profile(data: bytes, *, name: str) -> PrefetchProfile:
    """Parse a profile; IndexFormatError naming the file otherwise."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise IndexFormatError(f"{name}: not a prefetch profile (format {FORMAT!r})")
        if raw.get("version") != VERSION:
            raise IndexFormatError(f"{name}: prefetch profile version {raw.get('version')!r} "
                                   f"is not supported (this tool reads version {VERSION})")
        spans = raw["spans"]
        if not isinstance(spans, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in spans):
            raise IndexFormatError(f"{name}: 'spans' must be a list of span numbers")
        times = raw.get("first_read_ms")  # optional (profiles before it have none)
        if times is not None and (
                not isinstance(times, list) or len(times) != len(spans) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in times)):
            raise IndexFormatError(f"{name}: 'first_read_ms' must be a list of milliseconds, "
                                   f"one per span")
        return PrefetchProfile(blob=str(raw["blob"]), zinfo_sha256=str(raw["zinfo_sha256"]),
                               spans=tuple(spans),
                               command=tuple(str(arg) for arg in raw.get("command", ())),
                               first_read_ms=tuple(times) if times is not None else None)
    except IndexFormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{name}: malformed prefetch profile: {exc!r}") from exc


def profile_spans(path: Path | None, *, zinfo: Path | None) -> Sequence[int]:
    """The spans a mount fetches first: those of the profile at `path` when it numbers the
    spans of `zinfo` (same sha256: the one its sidecar names when it has one, so the zinfo
    itself need not be here yet, gzindex/lazy.py); none otherwise (a warning says why)."""
    profile = usable_profile(path, zinfo=zinfo)
    return profile.spans if profile is not None else ()


def usable_profile(path: Path | None, *, zinfo: Path | None) -> PrefetchProfile | None:
    """The profile at `path` when it numbers the spans of `zinfo` (profile_spans)."""
    if path is None or zinfo is None:
        return None
    try:
        profile = parse_profile(path.read_bytes(), name=str(path))
        side = sidecar_path(zinfo)
        zinfo_sha256 = (load_sidecar(side).zinfo_digest.removeprefix("sha256:")
                        if side.exists() else hashlib.sha256(zinfo.read_bytes()).hexdigest())
    except (OSError, IndexFormatError) as exc:
        log.warning("%s: prefetch profile not used: %s", path, exc)
        return None
    if profile.zinfo_sha256 != zinfo_sha256:
        log.warning("%s: prefetch profile not used: it numbers the spans of another zinfo",
                    path)
        return None
    return profile


__all__ = ["FORMAT", "VERSION", "PrefetchProfile", "dump_profile", "parse_profile",
           "profile_spans", "usable_profile"]
