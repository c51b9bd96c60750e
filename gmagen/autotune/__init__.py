"""gmagen.autotune: search spaces, strategies, the tuning loop and the cache.

Why a separate package with no GPU code: what decides a winner (pruning,
checks, interleaved timing, noise, the incumbent rule) and what keeps the
cache sane (keys, locking, warnings) must be testable on a CPU with a fake
runner; backends supply a Runner and a Space, ``gmagen.compile`` calls
:func:`select_config`.

Modes (``gmagen.compile(..., autotune=...)``):
  "cached"   user cache, then shipped caches (exact key, then nearest shape
             bucket), else None = the backend's default; never tunes
  "on-miss"  as "cached" for an exact key; on a miss, tune once and store
  "off"      None: the backend's default, caches untouched
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

from gmagen.config import Config
from gmagen.errors import OptionError

from .cache import AutotuneCache, CacheKey, CacheWarning, Entry, Hit, bucket, gpu_slug
from .runner import ErrorConfig, Measurement, Runner, Session, TuneResult, measure
from .space import (Choice, DeviceLimits, EmptySpaceError, IntRange, PowerOfTwo, PrunedSpace,
                    Rule, Space)
from .strategies import get_strategy, resolve_options, tune

__all__ = ["AutotuneCache", "CACHED", "CacheKey", "CacheWarning", "Choice", "DeviceLimits",
           "EmptySpaceError", "Entry", "ErrorConfig", "Hit", "IntRange", "MODES", "Measurement",
           "OFF", "ON_MISS", "PowerOfTwo", "PrunedSpace", "Rule", "Runner", "Selection",
           "Session", "Space", "TuneResult", "bucket", "check_mode", "default_cache", "get_strategy", "gpu_slug", "measure",
           "resolve_options", "select", "select_config", "tune"]

CACHED, ON_MISS, OFF = "cached", "on-miss", "off"
MODES = (CACHED, ON_MISS, OFF)

log = logging.getLogger("gmagen.autotune")


@dataclass(frozen=True)
class Selection:
    """The config to compile with (None: the backend's default) and where it
    came from: "user"/"shipped" cache, "tuned" now, "default" or "off"."""

    config: Optional[Config]
    source: str
    hit: Optional[Hit] = None
    tuned: Optional[TuneResult] = None

    def describe(self) -> str:
        if self.hit is not None:
            return self.hit.describe()
        if self.source == "tuned" and self.tuned is not None:
            return f"{self.config} tuned now: {self.tuned.decision}"
        return {"default": "no cached config: the backend's default",
                "off": "autotune off: the backend's default"}.get(self.source, self.source)


_CACHES: dict[str, AutotuneCache] = {}


def default_cache() -> AutotuneCache:
    """The cache ``gmagen.compile`` consults: the user cache directory of now
    (GMAGEN_CACHE_DIR is read on each call) and the shipped caches."""
    from .cache import default_directory

    directory = default_directory()
    if str(directory) not in _CACHES:
        _CACHES[str(directory)] = AutotuneCache(directory)
    return _CACHES[str(directory)]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise OptionError(f"autotune={mode!r}; expected one of " + ", ".join(map(repr, MODES)))
    return mode


def _accepted(hit: Optional[Hit], validate: Optional[Callable[[Config], Any]]) -> Optional[Hit]:
    """A cached config the backend no longer accepts is a miss, not an error."""
    if hit is None or validate is None:
        return hit
    try:
        ok = validate(hit.config)
    except Exception as exc:  # validate raises OptionError naming the knob
        log.warning("ignoring cached config %s: %s", hit.describe(), exc)
        return None
    if ok is False:
        log.warning("ignoring cached config %s: rejected by the backend", hit.describe())
        return None
    return hit


def select(key: CacheKey, mode: str, tune_fn: Callable[[], Union[TuneResult, Entry, None]],
           cache: AutotuneCache, *, similar_gpu: bool = False, nearest: bool = True,
           validate: Optional[Callable[[Config], Any]] = None,
           commit: Optional[str] = None) -> Selection:
    """The config for ``key`` under ``mode``, with its provenance.

    ``tune_fn`` is called only in "on-miss" mode on an exact miss; it returns
    a TuneResult (stored as an Entry), an Entry, or None (nothing stored).
    ``validate(config)`` may reject stale cached configs (return False or
    raise)."""
    check_mode(mode)
    if mode == OFF:
        return Selection(None, "off")
    if mode == ON_MISS:
        hit = _accepted(cache.get(key, nearest=False, similar_gpu=False), validate)
        if hit is not None:
            return Selection(hit.config, hit.source, hit)
        result = tune_fn()
        if result is None:
            return Selection(None, "default")
        entry = result.to_entry(commit=commit) if isinstance(result, TuneResult) else result
        cache.put(key, entry)
        tuned = result if isinstance(result, TuneResult) else None
        return Selection(entry.config, "tuned", tuned=tuned)
    hit = _accepted(cache.get(key, nearest=nearest, similar_gpu=similar_gpu), validate)
    if hit is not None:
        if hit.match != "exact":
            log.info("autotune: %s", hit.describe())
        return Selection(hit.config, hit.source, hit)
    return Selection(None, "default")


def select_config(key: CacheKey, mode: str,
                  tune_fn: Callable[[], Union[TuneResult, Entry, None]],
                  cache: AutotuneCache, **kwargs: Any) -> Optional[Config]:
    """:func:`select`'s config alone: None means the backend's default."""
    return select(key, mode, tune_fn, cache, **kwargs).config
