"""Plain-text tables for benchmark output (what `make bench` prints)."""

from __future__ import annotations

import statistics

from lab.measure import percentile  # noqa: F401  (one nearest-rank percentile for lab and bench)


class Table:
    """t = Table("title", ["metric", "value", "goal"]); t.add("start", "0.4 s", "≤ 1 s"); print(t)"""

    def __init__(self, title: str, columns: list[str]) -> None:
        self.title = title
        self.columns = columns
        self.rows: list[list[str]] = []
        self.notes: list[str] = []

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def note(self, text: str) -> None:
        self.notes.append(text)

    def __str__(self) -> str:
        widths = [max(len(r[i]) if i < len(r) else 0 for r in [self.columns, *self.rows])
                  for i in range(len(self.columns))]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"

        out = [f"## {self.title}", "", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        out += [""] + [f"* {n}" for n in self.notes] if self.notes else []
        return "\n".join(out) + "\n"


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"
