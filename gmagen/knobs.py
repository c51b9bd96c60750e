"""Every GMAGEN_* environment variable, typed, in one place.

Nothing else in gmagen reads ``os.environ`` for its own settings: a knob is
read here, on each access, so tests may set variables at run time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

_LOG_LEVELS = ("debug", "info", "warning", "error")


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def log_level() -> str:
    """GMAGEN_LOG: debug | info | warning (default) | error."""
    level = _get("GMAGEN_LOG", "warning").lower()
    return level if level in _LOG_LEVELS else "warning"


def cache_dir() -> Path:
    """GMAGEN_CACHE_DIR, else the platform's user cache dir (platformdirs)."""
    explicit = _get("GMAGEN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    try:
        import platformdirs
    except ImportError:  # core depends on NumPy alone; platformdirs is optional
        return Path.home() / ".cache" / "gmagen"
    return Path(platformdirs.user_cache_dir("gmagen", appauthor=False))


def triton_interpret() -> str:
    """GMAGEN_TRITON_INTERPRET: "auto" (Triton's interpreter when there is no CUDA
    device), "1" (always interpret, CPU tensors), "0" (never)."""
    value = _get("GMAGEN_TRITON_INTERPRET", "auto").lower()
    return value if value in ("auto", "0", "1") else "auto"


def check_seed() -> int | None:
    """GMAGEN_SEED: fixes the random inputs of ``gmagen check`` (default: fresh)."""
    value = _get("GMAGEN_SEED")
    return int(value) if value else None


def tune_workers() -> int | None:
    """GMAGEN_TUNE_WORKERS: processes that compile tuning candidates at once on a
    GPU (0: compile serially in the tuning process); None when unset (the
    tuner's default).  Not a non-negative int: an error naming the variable."""
    value = _get("GMAGEN_TUNE_WORKERS")
    if not value:
        return None
    try:
        workers = int(value)
    except ValueError:
        workers = -1
    if workers < 0:
        from .errors import OptionError

        raise OptionError(f"GMAGEN_TUNE_WORKERS={value!r}: expected a non-negative int "
                          "(0 compiles tuning candidates serially)")
    return workers


def configure_logging() -> logging.Logger:
    """The ``gmagen`` logger at the level GMAGEN_LOG asks for."""
    logger = logging.getLogger("gmagen")
    logger.setLevel(getattr(logging, log_level().upper()))
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[gmagen %(levelname)s] %(message)s"))
        logger.addHandler(handler)
    return logger
