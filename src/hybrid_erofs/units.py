"""Sizes, rates and durations as people read them: binary units everywhere (B, KiB, MiB, GiB,
TiB: powers of 1024; rates in the same units per second), and counted nouns in their plural."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_size(n: float) -> str:
    """512 -> '512 B', 92_900_000 -> '88.6 MiB'."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    """Bytes per second in the units of format_size: '35.2 MiB/s'."""
    return f"{format_size(bytes_per_s)}/s"


def format_duration(seconds: float) -> str:
    """'0s', '45s', '2m05s', '1h02m'."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 checkpoint', '2 checkpoints', '0 entries' (with plural='entries')."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


__all__ = ["counted", "format_duration", "format_rate", "format_size"]
