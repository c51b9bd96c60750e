"""Cache keys, files, locking and lookup order."""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmagen.autotune import AutotuneCache, CacheKey, CacheWarning, Entry, bucket, gpu_slug
from gmagen.autotune import cache as cache_mod
from gmagen.config import Config

H100 = "NVIDIA H100 80GB HBM3"


def key(**changes) -> CacheKey:
    base = CacheKey.make(backend="triton", backend_version="3.2.0", gpu=H100, capability=(9, 0),
                         sm_count=132, program="abc123", dtypes=("bf16", "bf16"), D=64, Dv=64,
                         K=64, layout="bnhd", N=4096, BH=64, gmagen_version="0.1.0")
    return replace(base, **changes)


def entry(block_n: int = 64, time_ms: float = 1.0) -> Entry:
    return Entry(config=Config(block_n=block_n, num_warps=4), time_ms=time_ms,
                 default_time_ms=1.5, noise_ms=0.01, tried=10, rejected=1)


@pytest.fixture
def cache(tmp_path) -> AutotuneCache:
    return AutotuneCache(tmp_path / "user", shipped=[tmp_path / "shipped"])


def test_key_string_is_stable():
    assert str(key()) == ("gmagen_version=0.1.0|backend=triton|backend_version=3.2.0|"
                          "gpu=NVIDIA H100 80GB HBM3|capability=9.0|sm_count=132|program=abc123|"
                          "dtypes=bf16,bf16|D=64|Dv=64|K=64|layout=bnhd|n_bucket=4096|bh_bucket=64")
    assert CacheKey.parse(str(key())) == key()


def test_keys_differ_in_every_field():
    changes = dict(gmagen_version="0.2.0", backend="cupy", backend_version="3.3.0",
                   gpu="NVIDIA H200", capability="9.1", sm_count=114, program="def456",
                   dtypes=("f32", "f32"), D=128, Dv=32, K=16, layout="bhnd", n_bucket=8192,
                   bh_bucket=128)
    keys = {str(key())} | {str(key(**{k: v})) for k, v in changes.items()}
    assert len(keys) == len(changes) + 1


def test_buckets_and_slug():
    assert [bucket(n) for n in (0, 1, 2, 3, 63, 64, 65, 65536)] == [1, 1, 2, 4, 64, 64, 128, 65536]
    assert key(n_bucket=bucket(3000)) == key()  # N 3000 and 4096 share a bucket
    assert gpu_slug(H100) == "nvidia-h100-80gb-hbm3"


@settings(max_examples=50, deadline=None)
@given(gpu=st.text(st.characters(blacklist_characters="|\n", blacklist_categories=("Cs",)),
                   min_size=1, max_size=30),
       n=st.integers(1, 2**20), dtypes=st.lists(st.sampled_from(["f32", "bf16", "f16"]),
                                                min_size=1, max_size=3))
def test_key_round_trip(gpu, n, dtypes):
    k = key(gpu=gpu, n_bucket=bucket(n), dtypes=tuple(dtypes))
    assert CacheKey.parse(str(k)) == k


def test_put_then_get_and_file_layout(cache):
    cache.put(key(), entry())
    hit = cache.get(key())
    assert hit.match == "exact" and hit.source == "user" and hit.config == entry().config
    doc = json.loads(cache.path_for(H100).read_text())
    assert doc["schema"] == cache_mod.SCHEMA and doc["gpu"]["name"] == H100
    assert doc["gpu"]["sm_count"] == 132
    stored = doc["entries"][str(key())]
    assert {"config", "time_ms", "default_time_ms", "noise_ms", "tried", "rejected", "date",
            "gmagen_version", "commit"} <= set(stored)


def test_default_directory_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GMAGEN_CACHE_DIR", str(tmp_path / "x"))
    assert AutotuneCache(shipped=[]).directory == tmp_path / "x" / "autotune"


def _writer(directory: str, worker: int, n: int) -> None:
    c = AutotuneCache(Path(directory), shipped=[])
    for i in range(n):
        c.put(key(program=f"p{worker}-{i}"), entry(block_n=16 * (worker + 1)))


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    workers, n = 4, 15
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    doc = json.loads((tmp_path / f"{gpu_slug(H100)}.json").read_text())  # valid JSON
    assert len(doc["entries"]) == workers * n
    fresh = AutotuneCache(tmp_path, shipped=[])
    for w in range(workers):
        for i in range(n):
            assert fresh.get(key(program=f"p{w}-{i}")).config["block_n"] == 16 * (w + 1)
    assert not list(tmp_path.glob("*.tmp"))


BAD_FILES = {
    "truncated": lambda good: good[: len(good) // 2],
    "garbage": lambda good: "\x00\x01not json",
    "list": lambda good: "[1, 2]",
    "no-schema": lambda good: json.dumps({k: v for k, v in json.loads(good).items()
                                          if k != "schema"}),
    "newer-schema": lambda good: good.replace('"schema": 1', '"schema": 99'),
    "older-schema": lambda good: good.replace('"schema": 1', '"schema": 0'),
    "foreign-gpu": lambda good: good.replace(H100, "NVIDIA A100-SXM4-80GB"),
}
REASONS = {"truncated": "not valid JSON", "garbage": "not valid JSON", "list": "top level",
           "no-schema": "schema", "newer-schema": "newer", "older-schema": "old schema 0",
           "foreign-gpu": "made on GPU"}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_warns_once_and_is_ignored(cache, kind):
    cache.put(key(), entry())
    path = cache.path_for(H100)
    path.write_text(BAD_FILES[kind](path.read_text()))
    fresh = AutotuneCache(cache.directory, shipped=[])
    with pytest.warns(CacheWarning, match=REASONS[kind]) as record:
        assert fresh.get(key()) is None
    assert str(path) in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # memoised: no second warning
        assert fresh.get(key()) is None
    # writing moves the bad file aside and starts afresh
    with pytest.warns(CacheWarning, match="moved to"):
        fresh.put(key(), entry(block_n=32))
    assert fresh.get(key()).config["block_n"] == 32
    assert path.with_name(path.name + ".bad").exists()


def test_old_schema_migrated_when_a_migration_exists(cache, monkeypatch):
    cache.put(key(), entry())
    path = cache.path_for(H100)
    doc = json.loads(path.read_text())
    doc["schema"] = 0
    doc["slots"] = doc.pop("entries")  # pretend schema 0 called them "slots"
    path.write_text(json.dumps(doc))

    def migrate(old: dict) -> dict:
        new = dict(old, schema=1)
        new["entries"] = new.pop("slots")
        return new

    monkeypatch.setitem(cache_mod.MIGRATIONS, 0, migrate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AutotuneCache(cache.directory, shipped=[]).get(key()).config == entry().config


def test_malformed_entry_skipped_others_kept(cache):
    cache.put(key(), entry())
    cache.put(key(program="other"), entry(block_n=128))
    path = cache.path_for(H100)
    doc = json.loads(path.read_text())
    doc["entries"][str(key(program="other"))]["time_ms"] = "fast"
    doc["entries"]["not a key"] = {}
    path.write_text(json.dumps(doc))
    fresh = AutotuneCache(cache.directory, shipped=[])
    assert fresh.get(key()).config == entry().config  # exact: parses only its own entry
    with pytest.warns(CacheWarning, match="malformed entry.*time_ms"):
        assert fresh.get(key(program="other"), nearest=False) is None
    with pytest.warns(CacheWarning, match="skipped 2 malformed entries"):
        assert list(fresh.entries(H100)["user"]) == [key()]


def test_shipped_consulted_after_user(tmp_path):
    shipped = AutotuneCache(tmp_path / "shipped", shipped=[])
    shipped.put(key(), entry(block_n=16))
    shipped.put(key(program="only-shipped"), entry(block_n=256))
    c = AutotuneCache(tmp_path / "user", shipped=[tmp_path / "shipped"])
    hit = c.get(key())
    assert hit.source == "shipped" and hit.config["block_n"] == 16
    c.put(key(), entry(block_n=32))
    hit = c.get(key())
    assert hit.source == "user" and hit.config["block_n"] == 32
    assert c.get(key(program="only-shipped")).source == "shipped"


def test_package_shipped_dir_is_the_default():
    dirs = cache_mod.shipped_directories()
    assert dirs and dirs[0].name == "autotune_cache"


def test_strict_gpu_by_default_similar_on_request(cache):
    pcie = key(gpu="NVIDIA H100 PCIe", sm_count=114)
    cache.put(pcie, entry(block_n=128))
    cache.put(key(gpu="NVIDIA A100-SXM4-80GB", capability="8.0", sm_count=108), entry(16))
    assert cache.get(key()) is None
    hit = cache.get(key(), similar_gpu=True)
    assert hit.match == "similar-gpu" and hit.found == pcie and hit.config["block_n"] == 128
    assert "NVIDIA H100 PCIe" in hit.describe()
    # another capability never counts as similar
    assert cache.get(key(capability="8.9"), similar_gpu=True) is None


def test_nearest_bucket_fallback(cache):
    cache.put(key(n_bucket=1024), entry(block_n=32))
    cache.put(key(n_bucket=65536), entry(block_n=128))
    cache.put(key(n_bucket=2048, program="other"), entry(block_n=16))
    hit = cache.get(key(n_bucket=2048))
    assert hit.match == "nearest-bucket" and hit.found.n_bucket == 1024
    assert "N~1024" in hit.describe() and "asked N~2048" in hit.describe()
    assert cache.get(key(n_bucket=32768)).config["block_n"] == 128
    cache.put(key(n_bucket=4096), entry(block_n=64))
    assert cache.get(key(n_bucket=2048)).found.n_bucket == 4096  # a tie goes to the larger
    assert cache.get(key(n_bucket=2048), nearest=False) is None
    assert cache.get(key(n_bucket=2048, D=128)) is None  # other shape fields must match
    # exact in the shipped cache beats nearest in the user cache
    AutotuneCache(cache.shipped[0], shipped=[]).put(key(n_bucket=2048), entry(block_n=64))
    hit = cache.get(key(n_bucket=2048))
    assert hit.match == "exact" and hit.source == "shipped"


def test_export_writes_a_shippable_file(cache, tmp_path):
    cache.put(key(), entry())
    cache.put(key(program="b"), entry(block_n=128))
    out = tmp_path / "export" / f"{gpu_slug(H100)}.json"
    assert cache.export(out, H100, keys=[key()]) == 1
    shipped_user = AutotuneCache(tmp_path / "empty", shipped=[out.parent])
    assert shipped_user.get(key()).source == "shipped"
    assert shipped_user.get(key(program="b"), nearest=False) is None
    assert os.path.getsize(out) > 0


def test_shipped_files_load_cleanly_and_hold_valid_configs():
    """Every file in autotune_cache/ (package data, made with `gmagen tune --export`
    on the device): schema current, one GPU per file, every entry parses (no
    CacheWarning) and its config passes the backend's knob validation, so a
    shipped entry can never hand a kernel a knob it no longer has."""
    import importlib
    import warnings

    from gmagen.config import Config

    files = sorted(cache_mod.shipped_directories()[0].glob("*.json"))
    assert files, "no shipped caches"
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            f = cache_mod.read_file(path)
            entries = f.entries()
        assert entries and path.stem == gpu_slug(f.gpu["name"]), path
        for k, e in entries.items():
            assert k.gpu == f.gpu["name"]
            space = importlib.import_module(f"gmagen.backends.{k.backend}.space")
            kind = k.program.rsplit(":", 1)[-1].removeprefix("gma_")
            if k.backend == "tvm":  # its knobs depend on the target: entries are cuda's
                space.validate(Config(e.config), "cuda", kind)
            else:
                space.validate(kind, Config(e.config))
