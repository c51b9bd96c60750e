"""Knobs, spaces and pruning against fake device limits."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmagen.autotune import (Choice, DeviceLimits, EmptySpaceError, IntRange, PowerOfTwo, Rule,
                             Space)
from gmagen.config import Config
from gmagen.errors import OptionError

from .fakes import tile_space


def test_knob_values_and_neighbours():
    p = PowerOfTwo(16, 128, 64)
    assert p.values() == (16, 32, 64, 128)
    assert p.neighbours(64) == (32, 128) and p.neighbours(16) == (32,)
    c = Choice(("a", "b", "c"), ordered=False)
    assert c.default == "a" and c.neighbours("b") == ("a", "c")
    assert Choice((2, 4, 8), 4).neighbours(2) == (4,)
    r = IntRange(1, 7, 3, step=2)
    assert r.values() == (1, 3, 5, 7) and r.neighbours(3) == (1, 5) and not r.contains(2)


@pytest.mark.parametrize("make", [lambda: PowerOfTwo(16, 128, 48), lambda: PowerOfTwo(24, 64, 32),
                                  lambda: Choice((1, 2), 3), lambda: Choice(()),
                                  lambda: IntRange(1, 4, 9)])
def test_bad_knobs_raise(make):
    with pytest.raises(OptionError):
        make()


def test_rule_on_unknown_knob_raises_listing_knobs():
    with pytest.raises(OptionError, match="block_m.*block_n"):
        Space({"block_n": PowerOfTwo(16, 64, 16)}, (Rule("x", ("block_m",), lambda c, lim: True),))


def test_prune_by_shared_memory():
    space = tile_space()
    big = space.prune(DeviceLimits.fake())
    small_limits = DeviceLimits.fake(shared_memory_per_block=48 * 1024)
    small = space.prune(small_limits)
    assert big.size() == space.size() == 60
    assert 0 < small.size() < big.size()
    for config in small:
        assert 2 * config["block_n"] * 64 * config["num_stages"] <= 48 * 1024
    assert Config(block_n=256, num_warps=4, num_stages=4) not in set(small)


def test_prune_to_nothing_names_rule_and_knobs():
    limits = DeviceLimits.fake(name="Tiny GPU", shared_memory_per_block=1024)
    with pytest.raises(EmptySpaceError) as info:
        tile_space().prune(limits)
    text = str(info.value)
    assert "Tiny GPU" in text and "shared memory" in text
    assert "block_n" in text and "num_stages" in text and "60 of 60" in text
    assert isinstance(info.value, OptionError)


def test_large_space_stays_lazy_and_draws_valid():
    limits = DeviceLimits.fake(shared_memory_per_block=48 * 1024)
    pruned = tile_space(block_d=True).prune(limits, enumerate_max=10)
    assert not pruned.enumerated and pruned.size() is None
    rng = random.Random(1)
    for _ in range(50):
        assert pruned.contains(pruned.draw(rng))
    with pytest.raises(OptionError, match="too large"):
        list(pruned)


def test_fingerprint_stable_and_sensitive():
    assert tile_space().fingerprint() == tile_space().fingerprint()
    assert tile_space().fingerprint() != tile_space(block_d=True).fingerprint()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), smem_kb=st.integers(1, 256), lazy=st.booleans())
def test_prune_never_returns_an_invalid_config(seed, smem_kb, lazy):
    space = tile_space(block_d=True)
    limits = DeviceLimits.fake(shared_memory_per_block=smem_kb * 1024)
    try:
        pruned = space.prune(limits, enumerate_max=10 if lazy else 4096, samples=200, seed=seed)
    except EmptySpaceError:
        # only when no config at all fits: the smallest needs 2 * 16 * 64 bytes
        assert smem_kb * 1024 < 2 * 16 * 64
        return
    rng = random.Random(seed)
    configs = list(pruned) if pruned.enumerated else [pruned.draw(rng) for _ in range(20)]
    for config in configs:
        assert space.is_valid(config, limits)
        for n in pruned.neighbours(config):
            assert space.is_valid(n, limits)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_neighbours_stay_in_space_one_knob_apart(seed):
    space = tile_space(block_d=True)
    config = space.draw(random.Random(seed))
    assert space.contains(config)
    for n in space.neighbours(config):
        assert space.contains(n)
        assert sum(n[k] != config[k] for k in space.knobs) == 1
