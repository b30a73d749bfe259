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
