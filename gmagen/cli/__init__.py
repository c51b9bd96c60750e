"""The ``gmagen`` command line: ``main.py`` dispatches, one module per verb.

Output goes through :func:`console` and :func:`print_table`: rich when it is
installed (the ``cli`` extra), plain aligned text otherwise, so the core keeps
NumPy as its only dependency.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional, Sequence


def console() -> Any:
    """A rich Console on stdout, or None without rich. Off a terminal (CI logs,
    pipes) it is wide, so case ids are not wrapped."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(width=None if sys.stdout.isatty() else 180, highlight=False)


def echo(text: str = "", style: Optional[str] = None) -> None:
    con = console()
    if con is None:
        print(text)
    else:
        con.print(text, style=style, markup=False)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                row_styles: Optional[Sequence[str]] = None) -> None:
    con = console()
    if con is None:
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
        print(title)
        for row in [list(columns)] + [list(r) for r in rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):  # only the last (free text) column wraps
        table.add_column(column, no_wrap=i < len(columns) - 1, overflow="fold")
    for i, row in enumerate(rows):
        style = row_styles[i] if row_styles else None
        table.add_row(*(Text(cell) for cell in row), style=style)  # Text: no markup parsing
    con.print(table)


class Steps:
    """A progress bar of ``total`` steps (rich), or "[i/total]" lines without rich;
    :meth:`advance` takes a step and prints its line above the bar."""

    def __init__(self, progress: Any, task: Any, total: int):
        self._progress, self._task, self.total, self.done = progress, task, total, 0

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def advance(self, text: str) -> None:
        self.done += 1
        if self._progress is None:
            print(f"[{self.done}/{self.total}] {text}", flush=True)
        else:
            self._progress.update(self._task, advance=1)
            self._progress.console.print(text, markup=False, highlight=False)


@contextlib.contextmanager
def steps(total: int, description: str) -> Iterator[Steps]:
    con = console()
    if con is None:
        yield Steps(None, None, total)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=con) as progress:
        yield Steps(progress, progress.add_task(description, total=total), total)
