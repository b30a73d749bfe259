"""Byte formatting: memplan prints binary units (GiB/MiB) and says so; it never mixes in GB."""

GIB = 1024**3
MIB = 1024**2


def gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < MIB:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / MIB:,.1f} MiB" if n < GIB else gib(n)


def count(n: int) -> str:
    """Parameter or token counts, compact: 6,738.4M."""
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'20GiB', '24 GB', '512MiB' or a byte count -> bytes (GiB = 2**30, GB = 10**9, as accelerate's
    convert_file_size_to_int reads max_memory strings)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.I)
    if not m:
        raise ValueError(f"size {text!r}: use a number with a unit, e.g. 40GiB or 24GB")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()])
