"""Cache keys and entries of the autotuner: what identifies a tuned problem
(gmagen and backend versions, GPU, program, dtypes, dims, layout, and power-of-two
buckets of N and B*H) and what is stored for it.  Plain data, no files: the
files, locking and lookup order are in ``cache.py``."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from gmagen.config import Config
from gmagen.errors import OptionError

MAX_REJECTIONS = 20   # rejected candidates kept per entry, for reports


def bucket(n: int) -> int:
    """The power-of-two bucket of a size: the smallest 2**k >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (the file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def current_version() -> str:
    import gmagen  # at call time: gmagen/__init__ may still be importing us

    return gmagen.__version__


# -- keys -----------------------------------------------------------------------

_TEXT_FIELDS = ("gmagen_version", "backend", "backend_version", "gpu", "capability", "program",
                "layout")
_SHAPE_FIELDS = ("n_bucket", "bh_bucket")
_GPU_FIELDS = ("gpu", "sm_count")


@dataclass(frozen=True)
class CacheKey:
    """Everything a tuned config depends on.  ``str(key)`` is stable across
    processes and versions of Python; :meth:`parse` reads it back."""

    gmagen_version: str
    backend: str
    backend_version: str
    gpu: str
    capability: str          # "9.0"
    sm_count: int
    program: str             # Program hash
    dtypes: tuple[str, ...]
    D: int
    Dv: int
    K: int
    layout: str
    n_bucket: int
    bh_bucket: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or "|" in value or "\n" in value:
                raise OptionError(f"cache key {name}={value!r}: expected a string without '|'")
        for d in self.dtypes:
            if not isinstance(d, str) or not d or set(d) & set("|,"):
                raise OptionError(f"cache key dtype {d!r}: expected a name without '|' or ','")
        for name in ("sm_count", "D", "Dv", "K", "n_bucket", "bh_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise OptionError(f"cache key {name}={value!r}: expected an int >= 0")

    @classmethod
    def make(cls, *, backend: str, backend_version: str, gpu: str, capability: Any,
             sm_count: int, program: str, dtypes: Iterable[str], D: int, Dv: int, K: int,
             layout: str, N: int, BH: int, gmagen_version: Optional[str] = None) -> "CacheKey":
        """A key from raw sizes: N and B*H go into power-of-two buckets; the
        capability may be ``(9, 0)`` or ``"9.0"``."""
        if isinstance(capability, tuple):
            capability = f"{capability[0]}.{capability[1]}"
        return cls(gmagen_version=gmagen_version or current_version(),
                   backend=backend, backend_version=backend_version, gpu=gpu,
                   capability=str(capability), sm_count=sm_count, program=program,
                   dtypes=tuple(dtypes), D=D, Dv=Dv, K=K, layout=layout,
                   n_bucket=bucket(N), bh_bucket=bucket(BH))

    def __str__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            parts.append(f"{f.name}={','.join(value) if f.name == 'dtypes' else value}")
        return "|".join(parts)

    @classmethod
    def parse(cls, text: str) -> "CacheKey":
        """Inverse of ``str``; raises ValueError on anything else."""
        items = dict(part.split("=", 1) for part in text.split("|") if "=" in part)
        names = [f.name for f in fields(cls)]
        if sorted(items) != sorted(names) or text.count("|") != len(names) - 1:
            raise ValueError(f"cache key {text[:80]!r}: expected fields {', '.join(names)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = items[f.name]
            if f.name == "dtypes":
                values[f.name] = tuple(raw.split(",")) if raw else ()
            elif f.name in _TEXT_FIELDS:
                values[f.name] = raw
            else:
                values[f.name] = int(raw)
        return cls(**values)

    def _without(self, names: tuple[str, ...]) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in names)

    def same_but_shape(self, other: "CacheKey") -> bool:
        return self._without(_SHAPE_FIELDS) == other._without(_SHAPE_FIELDS)

    def same_but_gpu(self, other: "CacheKey", *, shape: bool = True) -> bool:
        skip = _GPU_FIELDS + (() if shape else _SHAPE_FIELDS)
        return self._without(skip) == other._without(skip)

    def bucket_distance(self, other: "CacheKey") -> float:
        """Steps between shape buckets, in powers of two (N and B*H added)."""
        return (abs(math.log2(self.n_bucket or 1) - math.log2(other.n_bucket or 1))
                + abs(math.log2(self.bh_bucket or 1) - math.log2(other.bh_bucket or 1)))

    def gpu_json(self) -> dict[str, Any]:
        return {"name": self.gpu, "capability": self.capability, "sm_count": self.sm_count}


# -- entries ----------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One tuned result: the config and what tuning it measured."""

    config: Config
    time_ms: float
    default_time_ms: float
    noise_ms: float
    tried: int
    rejected: int
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds"))
    gmagen_version: str = field(default_factory=current_version)
    commit: Optional[str] = None
    strategy: str = ""
    rejections: tuple[dict, ...] = ()   # up to MAX_REJECTIONS {config, kind, message}

    @property
    def speedup(self) -> float:
        return self.default_time_ms / self.time_ms if self.time_ms > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.to_json()
        out["rejections"] = list(self.rejections[:MAX_REJECTIONS])
        return out

    @classmethod
    def from_json(cls, data: Any) -> "Entry":
        """Raises ValueError (or TypeError) on a malformed entry."""
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError("entry has no config object")
        config = Config(data["config"])
        numbers = {}
        for name in ("time_ms", "default_time_ms", "noise_ms"):
            value = data.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                    or not math.isfinite(value):
                raise ValueError(f"entry {name}={value!r}: expected a finite number >= 0")
            numbers[name] = float(value)
        counts = {name: int(data.get(name, 0)) for name in ("tried", "rejected")}
        rejections = data.get("rejections", [])
        if not isinstance(rejections, list):
            raise ValueError("entry rejections: expected a list")
        return cls(config=config, **numbers, **counts, date=str(data.get("date", "")),
                   gmagen_version=str(data.get("gmagen_version", "")),
                   commit=data.get("commit"), strategy=str(data.get("strategy", "")),
                   rejections=tuple(r for r in rejections if isinstance(r, dict)))


@dataclass(frozen=True)
class Hit:
    """A lookup result: ``found`` may differ from ``key`` in shape bucket
    (``match`` "nearest-bucket") or GPU ("similar-gpu")."""

    key: CacheKey
    found: CacheKey
    entry: Entry
    source: str        # "user" | "shipped"
    path: str
    match: str         # "exact" | "nearest-bucket" | "similar-gpu" | "similar-gpu+nearest-bucket"

    @property
    def config(self) -> Config:
        return self.entry.config

    def describe(self) -> str:
        text = f"{self.config} from the {self.source} cache {self.path} ({self.match}"
        if "nearest-bucket" in self.match:
            text += f": tuned for N~{self.found.n_bucket}, B*H~{self.found.bh_bucket}; asked " \
                    f"N~{self.key.n_bucket}, B*H~{self.key.bh_bucket}"
        if "similar-gpu" in self.match:
            text += f": tuned on {self.found.gpu}"
        return text + ")"


# -- files ------------------------------------------------------------------------
