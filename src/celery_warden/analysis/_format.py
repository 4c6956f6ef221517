"""Numbers as a person reads them in a finding's ``reason``: sizes, durations, counts."""

from __future__ import annotations

__all__ = [
    "bytes_unit",
    "format_bytes",
    "format_count",
    "format_duration",
    "format_interval",
    "format_signed_bytes",
]

_UNITS = (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0))


def bytes_unit(size_bytes: float) -> tuple[str, float]:
    """Return the binary unit that suits ``size_bytes`` and its size in bytes.

    >>> bytes_unit(20_000)
    ('KiB', 1024.0)
    """
    for name, factor in _UNITS:
        if abs(size_bytes) >= factor:
            return name, factor
    return "B", 1.0


def format_bytes(
    size_bytes: float, unit: tuple[str, float] | None = None, decimals: int = 1, sign: str = ""
) -> str:
    """Return ``size_bytes`` in a binary unit (``unit`` forces one); ``sign="+"`` shows it.

    >>> format_bytes(20_580)
    '20.1 KiB'
    """
    name, factor = unit or bytes_unit(size_bytes)
    places = 0 if name == "B" else decimals
    return f"{size_bytes / factor:{sign}.{places}f} {name}"


def format_signed_bytes(size_bytes: float) -> str:
    """Return growth with its sign, in MiB unless it is below a tenth of one.

    >>> format_signed_bytes(200_000), format_signed_bytes(-10_240)
    ('+0.2 MiB', '-10.0 KiB')
    """
    unit = ("MiB", 1024.0**2) if abs(size_bytes) >= 0.05 * 1024**2 else bytes_unit(size_bytes)
    return format_bytes(size_bytes, unit, sign="+")


def format_interval(value: float, low: float, high: float) -> tuple[str, str]:
    """Return ``value`` and ``low-high`` in one unit, with enough decimals to tell them apart.

    >>> format_interval(20_580, 19_660, 21_500)
    ('20.1 KiB', '19.2-21.0 KiB')
    """
    unit = bytes_unit(value)
    width = (high - low) / unit[1]
    decimals = 1 if width >= 0.1 else 2 if width >= 0.01 else 3
    lows = format_bytes(low, unit, decimals).split()[0]
    return format_bytes(value, unit, decimals), f"{lows}-{format_bytes(high, unit, decimals)}"


def format_duration(seconds: float) -> str:
    """Return a duration in the unit a person would say it in.

    >>> format_duration(2400)
    '40 min'
    """
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_count(count: float) -> str:
    """Return a count with thousands separators, rounded to a whole number.

    >>> format_count(1600)
    '1,600'
    """
    return f"{round(count):,}"
