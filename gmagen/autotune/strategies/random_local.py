"""Random sampling plus local search, under a time budget.

Why this one: tile spaces are small-dimensional with smooth-ish landscapes
(neighbouring block sizes time alike), so a few random draws find the good
region and best-first steps to neighbours (half/double a block, +-1 stage)
climb it; when the best few configs have no unseen neighbours left, fresh
random draws restart the climb elsewhere.  Seeded, so reruns propose the same
candidates.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Optional, Union

from gmagen.config import Config

from ..runner import Runner, Session, TuneResult
from ..space import PrunedSpace, Space

OPTIONS: dict[str, tuple[Any, str]] = {
    "seed": (0, "seed of the random draws"),
    "initial": (8, "random configs drawn before the first local step"),
    "beam": (3, "local search expands the best unexpanded among this many best configs"),
    "max_evals": (None, "stop after this many candidates (None: only the budget stops)"),
    "patience": (None, "stop after this many candidates without a new best (None: never)"),
}


def _random_batch(pruned: PrunedSpace, session: Session, rng: random.Random,
                  n: int) -> list[Config]:
    if pruned.configs is not None:  # enumerated: draw among the unseen, exactly
        unseen = [c for c in pruned.configs if not session.seen(c)]
        return rng.sample(unseen, min(n, len(unseen)))
    out: list[Config] = []
    for _ in range(50 * n):
        c = pruned.draw(rng)
        if not session.seen(c) and c not in out:
            out.append(c)
            if len(out) == n:
                break
    return out


def _centre(session: Session, expanded: set[Config], beam: int) -> Optional[Config]:
    for c in session.best(beam):
        if c not in expanded:
            return c
    return None


def tune(space: Union[Space, PrunedSpace], runner: Runner,
         options: Mapping[str, Any] | None = None) -> TuneResult:
    from . import as_pruned, resolve_options

    opts = resolve_options("random_local", options)
    pruned = as_pruned(space, runner)
    session = Session(pruned, runner, opts, "random_local")
    rng = random.Random(opts["seed"])
    step = max(1, int(opts["batch"]))
    max_evals = opts["max_evals"]
    expanded: set[Config] = set()

    # start around the incumbent, then random draws
    first = [c for c in pruned.neighbours(session.incumbent) if not session.seen(c)]
    first += _random_batch(pruned, session, rng, max(0, int(opts["initial"]) - len(first)))
    expanded.add(session.incumbent)
    for i in range(0, len(first), step):
        session.evaluate(first[i:i + step])
    patience = opts["patience"]
    best, best_at = session.best(1), len(session.results)
    while not session.stopped:
        if max_evals is not None and len(session.results) >= int(max_evals):
            break
        if session.best(1) != best:
            best, best_at = session.best(1), len(session.results)
        elif patience is not None and len(session.results) - best_at >= int(patience):
            break
        centre = _centre(session, expanded, int(opts["beam"]))
        if centre is not None:
            expanded.add(centre)
            todo = [c for c in pruned.neighbours(centre) if not session.seen(c)]
        else:
            todo = _random_batch(pruned, session, rng, step)
            if not todo:
                break  # every valid config seen
        for i in range(0, len(todo), step):
            batch = todo[i:i + step]
            if max_evals is not None:
                batch = batch[:max(0, int(max_evals) - len(session.results))]
            if batch and not session.stopped:
                session.evaluate(batch)
    return session.finish()
