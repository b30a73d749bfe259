"""Plain-text tables for the CLI, drawn with the box characters rich uses (heavy head, light body).

The estimate's default output is drawn here rather than by rich: importing rich and laying out its
tables cost about a third of a cold `memplan estimate` (benchmarks/README.md), and these tables
need nothing rich does beyond fixed columns and wrapping one text column.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from dataclasses import dataclass

PIPED_WIDTH = 130  # wide enough for the formulas when output goes to a file or a pipe
SECTION = None  # a row that draws a rule across the table


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # right-justified (numbers)
    wrap: bool = False  # the column that gives up width when the table is too wide


def width() -> int:
    """The terminal's width (COLUMNS wins), or PIPED_WIDTH when stdout is not a terminal."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    if sys.stdout.isatty():
        return shutil.get_terminal_size((PIPED_WIDTH, 24)).columns
    return PIPED_WIDTH


def _widths(columns: list[Column], rows: list[list[str] | None], total: int) -> list[int]:
    natural = [max([len(c.header)] + [len(r[i]) for r in rows if r is not None]) for i, c in enumerate(columns)]
    frame = 3 * len(columns) + 1  # "│ " + " │ " between cells + " │"
    over = sum(natural) + frame - total
    if over <= 0:
        return natural
    wrapping = [i for i, c in enumerate(columns) if c.wrap]
    out = list(natural)
    for i in wrapping:
        give = min(over, out[i] - max(12, len(columns[i].header)))
        if give > 0:
            out[i] -= give
            over -= give
    return out


def _cell_lines(text: str, w: int, col: Column) -> list[str]:
    if not col.wrap or len(text) <= w:
        return [text]
    return textwrap.wrap(text, w, break_long_words=True, break_on_hyphens=False) or [""]


def render(columns: list[Column], rows: list[list[str] | None], title: str = "", caption: str = "",
           total: int | None = None) -> str:
    total = total or width()
    ws = _widths(columns, rows, total)

    def rule(left: str, mid: str, right: str, fill: str) -> str:
        return left + mid.join(fill * (w + 2) for w in ws) + right

    def line(cells: list[str], bar: str) -> str:
        parts = []
        for text, w, col in zip(cells, ws, columns):
            parts.append(text.rjust(w) if col.right else text.ljust(w))
        return bar + " " + f" {bar} ".join(parts) + " " + bar

    out = []
    if title:
        out += textwrap.wrap(title, total) or [""]
    out.append(rule("┏", "┳", "┓", "━"))
    out.append(line([c.header for c in columns], "┃"))
    out.append(rule("┡", "╇", "┩", "━"))
    for row in rows:
        if row is SECTION:
            out.append(rule("├", "┼", "┤", "─"))
            continue
        wrapped = [_cell_lines(text, w, col) for text, w, col in zip(row, ws, columns)]
        for k in range(max(len(x) for x in wrapped)):
            out.append(line([x[k] if k < len(x) else "" for x in wrapped], "│"))
    out.append(rule("└", "┴", "┘", "─"))
    if caption:
        out += textwrap.wrap(caption, total)
    return "\n".join(out)


def paragraph(text: str, total: int | None = None, indent: str = "") -> str:
    """A note, wrapped to the width."""
    return "\n".join(textwrap.wrap(text, total or width(), subsequent_indent=indent)) or text
