"""Exhaustive search: every valid config, in batches, until the budget ends.

For small pruned spaces (the "auto" threshold), and to measure how far the
budgeted strategies land from the true best (the GPU "-exhaustive" rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from gmagen.errors import OptionError

from ..runner import Runner, Session, TuneResult
from ..space import PrunedSpace, Space

OPTIONS: dict[str, tuple[Any, str]] = {}


def tune(space: Union[Space, PrunedSpace], runner: Runner,
         options: Mapping[str, Any] | None = None) -> TuneResult:
    from . import as_pruned, resolve_options

    opts = resolve_options("exhaustive", options)
    pruned = as_pruned(space, runner)
    if not pruned.enumerated:
        raise OptionError(f"exhaustive search needs an enumerable space; this one has "
                          f"{pruned.space.size()} configs; use strategy 'random_local'")
    session = Session(pruned, runner, opts, "exhaustive")
    configs = list(pruned)
    step = max(1, int(opts["batch"]))
    for i in range(0, len(configs), step):
        session.evaluate(configs[i:i + step])
        if session.stopped:
            break
    return session.finish()
