"""Search strategies, found by name, each a module with ``tune(space, runner,
options)`` and an ``OPTIONS`` table of {name: (default, help)}.

Why modules and tables (KernelTuner's ``strategies/common.py``): the CLI can
list strategies and their options with defaults, and a typo in a name or an
option raises listing the valid ones instead of being silently ignored.
Options every strategy takes are in ``COMMON_OPTIONS``; "auto" picks
exhaustive search when the pruned space has at most ``exhaustive_max`` configs
and random sampling plus local search otherwise.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Optional, Union

from gmagen.errors import OptionError

from ..runner import Runner, TuneResult
from ..space import PrunedSpace, Space

__all__ = ["AUTO_OPTIONS", "COMMON_OPTIONS", "STRATEGIES", "get_strategy", "names",
           "resolve_options", "tune"]

STRATEGIES = {"exhaustive": "gmagen.autotune.strategies.exhaustive",
              "random_local": "gmagen.autotune.strategies.random_local"}

COMMON_OPTIONS: dict[str, tuple[Any, str]] = {
    "budget_s": (30.0, "seconds for the whole run, the final showdown included"),
    "batch": (8, "candidates timed together, interleaved, per round"),
    "repeats": (5, "timed launches per candidate per round"),
    "warmup": (1, "untimed launches per candidate before each timing"),
    "finalists": (3, "best candidates re-timed against the incumbent at the end"),
    "final_repeats": (15, "timed launches per finalist in the showdown"),
    "min_improvement": (0.01, "smallest relative gain that replaces the incumbent, "
                              "even where the measured noise is smaller"),
    "incumbent": (None, "config to beat (e.g. the cached one); None: the runner's default"),
}
AUTO_OPTIONS: dict[str, tuple[Any, str]] = {
    "exhaustive_max": (64, "auto: exhaustive search up to this many valid configs"),
}


def names() -> list[str]:
    return ["auto"] + sorted(STRATEGIES)


def get_strategy(name: str) -> ModuleType:
    """The strategy module called ``name``; raises listing the valid names."""
    if name not in STRATEGIES:
        raise OptionError(f"unknown autotune strategy {name!r}; strategies: "
                          + ", ".join(names()))
    return importlib.import_module(STRATEGIES[name])


def option_table(name: str) -> dict[str, tuple[Any, str]]:
    """Every option ``name`` takes, with (default, help)."""
    if name == "auto":
        table = dict(COMMON_OPTIONS, **AUTO_OPTIONS)
        for strategy in STRATEGIES:
            table.update(get_strategy(strategy).OPTIONS)
        return table
    return dict(COMMON_OPTIONS, **get_strategy(name).OPTIONS)


def resolve_options(name: str, options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Defaults filled in; an unknown option raises listing the valid ones."""
    table = option_table(name)
    unknown = sorted(set(options or {}) - set(table))
    if unknown:
        raise OptionError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} for autotune strategy {name!r}; "
                          f"options: {', '.join(sorted(table))}")
    return {key: (options or {}).get(key, default) for key, (default, _) in table.items()}


def as_pruned(space: Union[Space, PrunedSpace], runner: Runner) -> PrunedSpace:
    return space if isinstance(space, PrunedSpace) else space.prune(runner.limits)


def tune(space: Union[Space, PrunedSpace], runner: Runner, strategy: str = "auto",
         options: Optional[Mapping[str, Any]] = None) -> TuneResult:
    """Prune (if needed) and search with ``strategy`` ("auto" picks by size)."""
    resolved = resolve_options(strategy, options)
    pruned = as_pruned(space, runner)
    if strategy == "auto":
        small = pruned.enumerated and (pruned.size() or 0) <= int(resolved["exhaustive_max"])
        strategy = "exhaustive" if small else "random_local"
    module = get_strategy(strategy)
    table = option_table(strategy)
    return module.tune(pruned, runner, {k: v for k, v in resolved.items() if k in table})
