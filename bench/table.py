"""Plain-text tables for benchmark output (what `make bench` prints).

* :class:`Table` — free columns (diagnosis, micro-benchmarks).
* :class:`Compare` — one side-by-side scenario: metric | pyflanneld | upstream | ratio | goal | met.
  A cell's value is a list of repeats (shown as median, with the range when there are several), a
  :class:`Failed` (the run did not get there: text shown, judged as such) or None (not measured).
  Without upstream the upstream and ratio columns are left out and ratio goals say "needs upstream".
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Failed:
    """A measurement that did not complete, e.g. Failed("490 of 5,000 after 60 s")."""

    text: str


Value = Sequence[float] | float | Failed | None


@dataclass(frozen=True)
class Goal:
    """A goal: its text and a judge (ours, theirs) → True/False, or None when it cannot be judged.

    ``ours``/``theirs`` are medians, or None for a Failed/absent value (``theirs_failed`` tells which).
    """

    text: str
    judge: Callable[[float | None, float | None, bool], bool | None]
    needs_upstream: bool = False


def at_most(limit: float, text: str) -> Goal:
    """Ours ≤ limit (absolute)."""
    return Goal(text, lambda ours, theirs, failed: ours is not None and ours <= limit)


def ratio_at_most(k: float) -> Goal:
    """Ours ≤ k × upstream's (upstream failing to get there counts as met when ours got there)."""
    def judge(ours, theirs, failed):
        if theirs is None:
            return (ours is not None) if failed else None
        return ours is not None and ours <= k * theirs
    return Goal(f"≤ {k:g}× upstream" if k != 1 else "≤ upstream", judge, True)


def ratio_at_least(k: float) -> Goal:
    """Ours ≥ k × upstream's."""
    def judge(ours, theirs, failed):
        if theirs is None:
            return (ours is not None) if failed else None
        return ours is not None and ours >= k * theirs
    return Goal(f"≥ {k:g}× upstream" if k != 1 else "≥ upstream", judge, True)


def _num(v: Value) -> float | None:
    if v is None or isinstance(v, Failed):
        return None
    if isinstance(v, int | float):
        return float(v)
    return median(list(v)) if len(v) else None


class Compare:
    """One scenario side by side: ``t.row("idle CPU", [0.12, 0.10], [0.0], at_most(0.01, "≤ 1 %"), pct)``."""

    def __init__(self, title: str, upstream: bool) -> None:
        self.title = title
        self.upstream = upstream
        self.table = Table(title, ["metric", "pyflanneld", "upstream", "ratio", "goal", "met"] if upstream
                           else ["metric", "pyflanneld", "goal", "met"])
        self.results: list[tuple[str, bool | None]] = []

    def row(self, metric: str, ours: Value, theirs: Value = None, goal: Goal | None = None,
            fmt: Callable[[float], str] = str, ratio: bool = True) -> bool | None:
        """Add a row; returns whether the goal is met (None: no goal or cannot be judged).

        ``ratio=False`` leaves the ratio cell empty (counts, where a ratio says nothing)."""
        o, t = _num(ours), _num(theirs)
        met = None
        if goal is not None and (self.upstream or not goal.needs_upstream):
            met = goal.judge(o, t, isinstance(theirs, Failed))
        goal_text = "-" if goal is None else goal.text
        if goal is not None and goal.needs_upstream and not self.upstream:
            goal_text += " (needs upstream)"
        met_text = "-" if met is None else verdict(met)
        cells = [metric, cell(ours, fmt)]
        if self.upstream:
            cells += [cell(theirs, fmt), f"{o / t:.2f}×" if ratio and o is not None and t else "-"]
        self.table.add(*cells, goal_text, met_text)
        if goal is not None:
            self.results.append((metric, met))
        return met

    def note(self, text: str) -> None:
        self.table.note(text)

    def __str__(self) -> str:
        return str(self.table)


def cell(v: Value, fmt: Callable[[float], str]) -> str:
    """A value as shown: median (with min–max over repeats), a Failed's text, or "-"."""
    if v is None:
        return "-"
    if isinstance(v, Failed):
        return v.text
    if isinstance(v, int | float):
        return fmt(v)
    vals = list(v)
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(median(vals))} ({fmt(min(vals))}–{fmt(max(vals))})"


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- formats ----------------------------------------------------------------------------------------
def ms(seconds: float) -> str:
    v = seconds * 1000
    return f"{v:.1f} ms" if abs(v) >= 10 else f"{v:.3f} ms"


def secs(seconds: float) -> str:
    return f"{seconds:.2f} s"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 1024 / 1024:.1f} MiB"


def pct(fraction: float) -> str:
    return f"{fraction * 100:.1f} %"


def gbps(bits_per_s: float) -> str:
    return f"{bits_per_s / 1e9:.2f} Gbit/s"


def count(n: float) -> str:
    return f"{n:,.0f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"
