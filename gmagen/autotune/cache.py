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
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from gmagen import knobs
from gmagen.errors import OptionError

# re-exported: callers import keys and entries from here too
from .keys import MAX_REJECTIONS, CacheKey, Entry, Hit, bucket, gpu_slug  # noqa: F401

__all__ = ["AutotuneCache", "CacheKey", "CacheWarning", "Entry", "Hit", "MAX_REJECTIONS",
           "SCHEMA", "bucket", "gpu_slug"]

SCHEMA = 1
# MIGRATIONS[n] turns a schema-n document into a schema-(n+1) one; a schema
# with no path to SCHEMA is ignored with a warning (retuning is cheap).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


class CacheWarning(UserWarning):
    """A cache file or entry was skipped; the message names the path and why."""


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
