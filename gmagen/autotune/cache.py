"""The autotune cache: tuned configs per GPU and problem, in one JSON file per GPU.

Why this shape: users copy caches between machines, run many processes at
once and upgrade gmagen, so the file says which schema and GPU it belongs to,
every write is a read-merge-write under a file lock ending in an atomic
rename (no process loses another's entries, no reader sees half a file), and
anything unreadable -- corrupt, truncated, a newer or older schema, another
GPU's file -- is skipped with one warning naming the path and the reason: a
bad cache may cost speed, never correctness or a crash.

Lookup order: exact key in the user cache, then in the shipped caches
(package data ``gmagen.autotune_cache``); then, if allowed, the nearest shape
bucket; then, only when asked (``similar_gpu=True``), another GPU of the same
compute capability.  The :class:`Hit` says which of these matched.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from gmagen import knobs
from gmagen.config import Config
from gmagen.errors import OptionError

__all__ = ["AutotuneCache", "CacheKey", "CacheWarning", "Entry", "Hit", "SCHEMA", "bucket",
           "gpu_slug"]

SCHEMA = 1
# MIGRATIONS[n] turns a schema-n document into a schema-(n+1) one; a schema
# with no path to SCHEMA is ignored with a warning (retuning is cheap).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}
MAX_REJECTIONS = 20   # rejected candidates kept per entry, for reports


class CacheWarning(UserWarning):
    """A cache file or entry was skipped; the message names the path and why."""


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

class _Invalid(Exception):
    """A cache file that must be ignored; the message is the reason."""


def _check_document(data: Any, expect_gpu: Optional[str]) -> tuple[dict, dict[str, Any]]:
    """(gpu block, raw entries) of a decoded file, migrated; raises _Invalid."""
    if not isinstance(data, dict):
        raise _Invalid(f"top level is a {type(data).__name__}, expected an object")
    schema = data.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise _Invalid(f"no integer 'schema' field (got {schema!r})")
    if schema > SCHEMA:
        raise _Invalid(f"schema {schema} is newer than this gmagen's {SCHEMA}; upgrade gmagen")
    while schema < SCHEMA:
        if schema not in MIGRATIONS:
            raise _Invalid(f"old schema {schema} (this gmagen reads {SCHEMA}) has no migration; "
                           "retune or delete the file")
        try:
            data = MIGRATIONS[schema](data)
        except Exception as exc:  # a broken old file, not a broken gmagen
            raise _Invalid(f"migrating schema {schema} failed: {type(exc).__name__}: {exc}") \
                from None
        schema += 1
    gpu = data.get("gpu")
    if not isinstance(gpu, dict) or not isinstance(gpu.get("name"), str):
        raise _Invalid("no 'gpu' object with a 'name'")
    if expect_gpu is not None and gpu["name"] != expect_gpu:
        raise _Invalid(f"made on GPU {gpu['name']!r}, not {expect_gpu!r}")
    raw = data.get("entries")
    if not isinstance(raw, dict):
        raise _Invalid("no 'entries' object")
    return gpu, raw


@dataclass
class CacheFile:
    """A checked cache file whose entries are parsed on demand: an exact
    lookup parses one entry (the 50 ms load target holds for big files)."""

    path: Path
    gpu: dict
    raw: dict[str, Any]
    _all: Optional[dict[CacheKey, Entry]] = None

    def _entry(self, text: str, value: Any) -> Entry:
        key_gpu = text.split("|gpu=", 1)[-1].split("|", 1)[0]
        if key_gpu != self.gpu["name"]:
            raise ValueError(f"key for GPU {key_gpu!r} in a file of {self.gpu['name']!r}")
        return Entry.from_json(value)

    def keys(self, prefix: str = "") -> Iterator[tuple[CacheKey, str]]:
        """Parsed keys (with their text) of entries whose key starts with
        ``prefix``; unparsable keys are left to :meth:`entries` to report."""
        for text in self.raw:
            if text.startswith(prefix):
                try:
                    yield CacheKey.parse(text), text
                except (ValueError, TypeError):
                    continue

    def lookup(self, key: Union[CacheKey, str]) -> Optional[Entry]:
        text = str(key)
        if text not in self.raw:
            return None
        try:
            return self._entry(text, self.raw[text])
        except (ValueError, TypeError) as exc:
            warnings.warn(f"gmagen autotune cache {self.path}: skipped a malformed entry "
                          f"{text[:60]!r}: {exc}", CacheWarning, stacklevel=4)
            return None

    def entries(self) -> dict[CacheKey, Entry]:
        """Every well-formed entry; malformed ones dropped with one warning."""
        if self._all is None:
            self._all, problems = {}, []
            for text, value in self.raw.items():
                try:
                    self._all[CacheKey.parse(text)] = self._entry(text, value)
                except (ValueError, TypeError) as exc:
                    problems.append(f"{text[:60]!r}: {exc}")
            if problems:
                warnings.warn(f"gmagen autotune cache {self.path}: skipped {len(problems)} "
                              f"malformed entr{'y' if len(problems) == 1 else 'ies'}: "
                              f"{problems[0]}", CacheWarning, stacklevel=4)
        return self._all


def read_file(path: Path, expect_gpu: Optional[str] = None) -> CacheFile:
    """A cache file checked down to its entries' envelope; raises _Invalid
    with the reason."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Invalid(f"unreadable: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"not valid JSON, corrupt or truncated ({exc})") from None
    gpu, raw = _check_document(data, expect_gpu)
    return CacheFile(path, gpu, raw)


def write_file(path: Path, gpu: Mapping[str, Any], entries: Mapping[CacheKey, Entry]) -> None:
    """Write atomically: a temp file in the same directory, fsync, rename."""
    doc = {"schema": SCHEMA, "gpu": dict(gpu),
           "entries": {str(k): e.to_json() for k, e in sorted(entries.items(), key=lambda i:
                                                                   str(i[0]))}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path, timeout: float) -> Iterator[None]:
    """An inter-process lock on ``path`` + ".lock" (filelock; fcntl if absent)."""
    lock_path = str(path) + ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import filelock
    except ImportError:
        filelock = None
    if filelock is not None:
        with filelock.FileLock(lock_path, timeout=timeout):
            yield
        return
    import fcntl  # POSIX without the filelock package (an optional dependency)

    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _warn(path: Path, reason: str) -> None:
    warnings.warn(f"gmagen autotune cache {path} ignored: {reason}", CacheWarning, stacklevel=4)


def default_directory() -> Path:
    """``knobs.cache_dir() / "autotune"`` (GMAGEN_CACHE_DIR or platformdirs)."""
    return knobs.cache_dir() / "autotune"


def shipped_directories() -> list[Path]:
    """The package-data directory ``gmagen.autotune_cache`` (repo: autotune_cache/)."""
    from importlib import resources

    try:
        root = Path(str(resources.files("gmagen.autotune_cache")))
    except (ModuleNotFoundError, TypeError):
        return []
    return [root] if root.is_dir() else []


# -- the cache --------------------------------------------------------------------

class AutotuneCache:
    """The user cache directory (read-write) plus shipped directories (read-only).

    Checked files are memoised by (path, inode, size, mtime), so a lookup in a
    warm process costs a ``stat`` per file and a broken file warns once."""

    def __init__(self, directory: Optional[Path] = None,
                 shipped: Optional[Iterable[Path]] = None, *, lock_timeout: float = 60.0):
        self.directory = Path(directory) if directory is not None else default_directory()
        self.shipped = [Path(p) for p in shipped] if shipped is not None \
            else shipped_directories()
        self.lock_timeout = lock_timeout
        self._memo: dict[tuple, Optional[CacheFile]] = {}

    def path_for(self, gpu: str) -> Path:
        return self.directory / f"{gpu_slug(gpu)}.json"

    def _sources(self) -> list[tuple[str, Path]]:
        return [("user", self.directory)] + [("shipped", d) for d in self.shipped]

    def load(self, path: Path, expect_gpu: Optional[str] = None) -> Optional[CacheFile]:
        """One checked file; None (with one warning) when it must be ignored."""
        try:
            st = path.stat()
        except OSError:
            return None
        memo_key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, expect_gpu)
        if memo_key not in self._memo:
            try:
                self._memo[memo_key] = read_file(path, expect_gpu)
            except _Invalid as exc:
                _warn(path, str(exc))
                self._memo[memo_key] = None
        return self._memo[memo_key]

    def get(self, key: CacheKey, *, nearest: bool = True,
            similar_gpu: bool = False) -> Optional[Hit]:
        """The best stored match for ``key``, or None.

        Order: exact (user, then shipped); nearest shape bucket of the same GPU
        (if ``nearest``); then, only if ``similar_gpu``, another GPU with the
        same compute capability (exact bucket first)."""
        name = gpu_slug(key.gpu) + ".json"
        strict = [(src, f) for src, d in self._sources()
                  if (f := self.load(d / name, key.gpu)) is not None]
        for src, f in strict:
            entry = f.lookup(key)
            if entry is not None:
                return Hit(key, key, entry, src, str(f.path), "exact")
        if nearest:
            shape_free = str(key).split("|n_bucket=")[0] + "|"  # buckets are the last fields
            hit = self._nearest(key, strict, lambda k: k.same_but_shape(key), "nearest-bucket",
                                prefix=shape_free)
            if hit:
                return hit
        if not similar_gpu:
            return None
        others = [(src, f) for src, d in self._sources() for p in sorted(d.glob("*.json"))
                  if p.name != name and (f := self.load(p)) is not None]
        hit = self._nearest(key, others, lambda k: k.same_but_gpu(key), "similar-gpu")
        if hit is None and nearest:
            hit = self._nearest(key, others, lambda k: k.same_but_gpu(key, shape=False),
                                "similar-gpu+nearest-bucket")
        return hit

    @staticmethod
    def _nearest(key: CacheKey, files: list[tuple[str, CacheFile]],
                 accept: Callable[[CacheKey], bool], match: str,
                 prefix: str = "") -> Optional[Hit]:
        ranked = []
        for rank, (src, f) in enumerate(files):
            for k, text in f.keys(prefix):
                if accept(k):
                    # nearest bucket (ties: the larger one), nearest SM count, user first
                    order = (key.bucket_distance(k), -k.n_bucket, -k.bh_bucket,
                             abs(k.sm_count - key.sm_count), rank, text)
                    ranked.append((order, k, src, f))
        for _, k, src, f in sorted(ranked, key=lambda item: item[0]):
            entry = f.lookup(k)  # parsed only now; a malformed one warns and is passed over
            if entry is not None:
                return Hit(key, k, entry, src, str(f.path), match)
        return None

    def put(self, key: CacheKey, entry: Entry) -> Path:
        """Add (or replace) one entry: read-merge-write under the file lock."""
        return self.update({key: entry})

    def update(self, new: Mapping[CacheKey, Entry]) -> Path:
        gpus = {k.gpu for k in new}
        if len(gpus) != 1:
            raise OptionError(f"one GPU per update, got {sorted(gpus)}")
        first = next(iter(new))
        path = self.path_for(first.gpu)
        with file_lock(path, self.lock_timeout):
            entries: dict[CacheKey, Entry] = {}
            gpu = first.gpu_json()
            if path.exists():
                try:
                    current = read_file(path, first.gpu)
                    gpu, entries = current.gpu, dict(current.entries())
                except _Invalid as exc:
                    aside = path.with_name(path.name + ".bad")
                    os.replace(path, aside)
                    _warn(path, f"{exc}; moved to {aside.name} and started afresh")
            entries.update(new)
            write_file(path, gpu, entries)
        return path

    def entries(self, gpu: str) -> dict[str, dict[CacheKey, Entry]]:
        """What each source holds for one GPU: {"user": ..., "shipped": ...}."""
        out: dict[str, dict[CacheKey, Entry]] = {}
        for src, d in self._sources():
            f = self.load(d / f"{gpu_slug(gpu)}.json", gpu)
            out.setdefault(src, {}).update(f.entries() if f else {})
        return out

    def export(self, path: Path, gpu: str,
               keys: Optional[Iterable[CacheKey]] = None) -> int:
        """Write this GPU's user entries (or just ``keys``) to ``path`` for
        shipping; returns the number written."""
        entries = self.entries(gpu)["user"]
        if keys is not None:
            wanted = set(keys)
            entries = {k: e for k, e in entries.items() if k in wanted}
        gpu_block = next(iter(entries)).gpu_json() if entries else {"name": gpu}
        write_file(Path(path), gpu_block, entries)
        return len(entries)
