"""The CuPy backend's tuning space: knobs around the default, pruned by shared
memory (space.validate at the shape) and threads per block, without a GPU."""

from __future__ import annotations

import pytest

pytest.importorskip("cupy")

from gmagen.autotune import DeviceLimits  # noqa: E402
from gmagen.backends.cupy import space, tune  # noqa: E402
from gmagen.config import Config  # noqa: E402

H100 = DeviceLimits(name="H100", capability=(9, 0), sm_count=132, shared_memory_per_block=232448)


@pytest.mark.parametrize("kind", ["write", "read", "scan"])
def test_every_pruned_config_validates(kind):
    D, Dv, K = 64, 64, 64
    default = space.default_config(kind, D, Dv, K, "bf16")
    pruned = tune.tuning_space(kind, default, D, Dv, K, "bf16").prune(H100)
    configs = list(pruned)
    assert Config({k: default[k] for k in pruned.space.knobs}) in configs
    variant = tune.Variant(kind, D, Dv, K, "bf16", same_mixture=False)
    for c in configs:
        space.validate(kind, default.replace(**dict(c)), variant)  # raises if not
        assert c["block_dv"] <= 64 and c.get("d_chunk", 0) <= 64
    # register fragments (the 16-bit write and read default) keep all of D in shared
    # memory: d_chunk is no knob of theirs
    assert ("d_chunk" in pruned.space.knobs) == (default["mma"] != 2)


def test_small_limits_prune_big_tiles():
    small = DeviceLimits(name="small", capability=(8, 0), sm_count=8,
                         shared_memory_per_block=16 * 1024, max_threads_per_block=256)
    default = space.default_config("read", 64, 64, 64, "f32")
    big = tune.tuning_space("read", default, 64, 64, 64).prune(H100)
    few = tune.tuning_space("read", default.replace(block_n=8, block_dv=8, d_chunk=8,
                                                    num_threads=64), 64, 64, 64).prune(small)
    assert 0 < len(list(few)) < len(list(big))
    assert all(c["num_threads"] <= 256 for c in few)


@pytest.mark.parametrize("kind", ["write", "read", "scan"])
def test_segments_are_searched(kind):
    """Blocks per (b, h) along N: the heuristic (0) and explicit counts, every one a
    neighbour of every other (0 is no count between 1 and 2)."""
    default = space.default_config(kind, 64, 64, 64, "bf16")
    knobs = tune.tuning_space(kind, default, 64, 64, 64, "bf16").knobs
    seg = knobs["segments"]
    assert seg.default == 0 and {0, 1, 16} <= set(seg.values()) and not seg.ordered
    assert "segments" not in tune.tuning_space(
        "responsibility", space.default_config("responsibility", 64, 64, 64, "bf16"),
        64, 64, 64, "bf16").knobs
