"""Memory sizes as people write them (``"16G"``, ``"512M"``) and back."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

#: 1024-based multipliers, as JupyterHub's ``mem_limit`` and Docker read them
UNITS: dict[str, int] = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

_SIZE_RE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[KMGT])(?:IB?|B)?|B)?\Z")

#: what a size looks like, for error messages
SIZE_EXPECTED = (
    'a size such as "16G" or "512M" (a number with an optional K, M, G or T suffix, '
    "1024-based; a bare number is bytes)"
)


def parse_size(text: str) -> int:
    """Parse a memory size into bytes: ``"16G"`` -> 17179869184.

    Suffixes ``K``, ``M``, ``G`` and ``T`` (case-insensitive, optionally followed by ``B``
    or ``iB``) are powers of 1024; a bare number is bytes. Fractions are allowed when the
    result is a whole number of bytes (``"1.5G"``). Raises :class:`ValueError` when
    ``text`` is not a size or is zero.
    """
    match = _SIZE_RE.match(text.strip().upper())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only decimals
        raise ValueError(f"not a size: {text!r}") from exc
    value = number * UNITS[match["unit"] or ""]
    if value != value.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r}")
    if value <= 0:
        raise ValueError(f"size must be greater than zero: {text!r}")
    return int(value)


def format_size(size: int) -> str:
    """The shortest exact spelling of ``size`` bytes: 17179869184 -> ``"16G"``."""
    for unit in ("T", "G", "M", "K"):
        multiplier = UNITS[unit]
        if size >= multiplier and size % multiplier == 0:
            return f"{size // multiplier}{unit}"
    return str(size)
