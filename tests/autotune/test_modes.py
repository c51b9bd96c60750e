"""select_config: "cached" never tunes, "on-miss" tunes once, "off" is off."""

from __future__ import annotations

import pytest

from gmagen.autotune import (CACHED, MODES, OFF, ON_MISS, AutotuneCache, CacheKey, Entry, select,
                             select_config)
from gmagen.autotune.strategies import exhaustive
from gmagen.config import Config
from gmagen.errors import OptionError

from .fakes import BOWL_BEST, FakeRunner, tile_space

KEY = CacheKey.make(backend="triton", backend_version="3.2.0", gpu="Fake H100", capability="9.0",
                    sm_count=132, program="p", dtypes=("f32",), D=64, Dv=64, K=16,
                    layout="bnhd", N=1000, BH=8)


@pytest.fixture
def cache(tmp_path) -> AutotuneCache:
    return AutotuneCache(tmp_path / "user", shipped=[tmp_path / "shipped"])


def never() -> None:
    raise AssertionError("the tuner must not run in this mode")


class CountingTuner:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return exhaustive.tune(tile_space(), FakeRunner(), {"budget_s": 1000})


def test_modes_listed():
    assert MODES == ("cached", "on-miss", "off")
    with pytest.raises(OptionError, match="'cached', 'on-miss', 'off'"):
        select_config(KEY, "always", never, AutotuneCache(shipped=[]))


def test_cached_never_tunes(cache):
    assert select_config(KEY, CACHED, never, cache) is None
    assert select(KEY, CACHED, never, cache).source == "default"
    AutotuneCache(cache.shipped[0], shipped=[]).put(KEY, Entry(Config(block_n=32), 1, 2, 0, 1, 0))
    sel = select(KEY, CACHED, never, cache)
    assert sel.config == Config(block_n=32) and sel.source == "shipped"
    cache.put(KEY, Entry(Config(block_n=16), 1, 2, 0, 1, 0))
    assert select(KEY, CACHED, never, cache).source == "user"


def test_cached_uses_nearest_bucket_and_reports_it(cache):
    from dataclasses import replace

    cache.put(replace(KEY, n_bucket=4096), Entry(Config(block_n=128), 1, 2, 0, 1, 0))
    sel = select(KEY, CACHED, never, cache)
    assert sel.config == Config(block_n=128) and sel.hit.match == "nearest-bucket"
    assert "nearest-bucket" in sel.describe()
    assert select_config(KEY, CACHED, never, cache, nearest=False) is None


def test_on_miss_tunes_once_then_hits(cache):
    tuner = CountingTuner()
    first = select(KEY, ON_MISS, tuner, cache, commit="abc1234")
    assert tuner.calls == 1 and first.source == "tuned" and first.config == BOWL_BEST
    assert "beats the incumbent" in first.describe()
    again = select(KEY, ON_MISS, tuner, cache)
    assert tuner.calls == 1 and again.source == "user" and again.config == BOWL_BEST
    # a fresh process (new cache object) and "cached" mode see it too
    fresh = AutotuneCache(cache.directory, shipped=[])
    assert select_config(KEY, CACHED, never, fresh) == BOWL_BEST
    stored = fresh.get(KEY).entry
    assert stored.commit == "abc1234" and stored.strategy == "exhaustive"
    assert stored.default_time_ms > stored.time_ms and stored.tried == 60


def test_on_miss_ignores_nearest_bucket(cache):
    from dataclasses import replace

    cache.put(replace(KEY, n_bucket=4096), Entry(Config(block_n=128), 1, 2, 0, 1, 0))
    tuner = CountingTuner()
    assert select_config(KEY, ON_MISS, tuner, cache) == BOWL_BEST and tuner.calls == 1


def test_on_miss_tuner_may_give_up(cache):
    assert select(KEY, ON_MISS, lambda: None, cache).source == "default"
    assert cache.get(KEY) is None


def test_off_ignores_caches(cache):
    cache.put(KEY, Entry(Config(block_n=16), 1, 2, 0, 1, 0))
    assert select_config(KEY, OFF, never, cache) is None


def test_stale_cached_config_rejected_by_validate(cache):
    cache.put(KEY, Entry(Config(block_n=7), 1, 2, 0, 1, 0))

    def validate(config: Config) -> None:
        if config["block_n"] == 7:
            raise OptionError("block_n=7 is not allowed")

    assert select_config(KEY, CACHED, never, cache, validate=validate) is None
    tuner = CountingTuner()
    assert select_config(KEY, ON_MISS, tuner, cache, validate=validate) == BOWL_BEST
    assert tuner.calls == 1
