"""Byte sizes as people write them ("20GiB", "13.3GB", "512MiB", 1024) and back.

Both unit families are accepted because both are in use: spec sheets and DESIGN.md
speak decimal GB (1e9), allocators and budgets speak binary GiB (2**30). Mixing them
up is a 7% error at 80 GB, so the unit is always explicit in what we print.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def cdiv(a: int, b: int) -> int:
    """How many b-sized pieces hold a: blocks for tokens, groups for channels."""
    return -(-a // b)


def parse_size(value: object) -> int:
    """Bytes in `value`; raises ValueError saying what is wrong.

    Accepts non-negative ints and strings of a number with an optional unit
    (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; case-insensitive). Fractions of a byte
    are rounded down, since a budget is a ceiling.
    """
    if isinstance(value, bool):  # bool is an int subclass; `memory: yes` is a mistake
        raise ValueError(f"expected a size like '20GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '20GiB', got {value!r}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as a size; write e.g. '20GiB', '512MiB', '13.3GB' or 1024")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:  # the regex should make this unreachable
        raise ValueError(f"cannot read {value!r} as a size") from None
    # Decimal, not float: "13.3GB" must be exactly 13_300_000_000 bytes.
    return int(number * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """Binary units, three significant-ish digits: '20.0 GiB', '800.0 KiB', '512 B'."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
    return f"{sign}{n} B"


def format_size_both(n: int) -> str:
    """Binary and decimal side by side, for figures people compare with spec sheets."""
    return f"{format_size(n)} ({n / 1e9:.2f} GB)"
