"""Autotuning the CuPy kernels: the search space of a plan kind.  The runner is
gmagen.autotune.torch_runner's (with torch installed, CuPy's executables take
and return torch tensors); the loop, checks, noise and cache live in
gmagen.autotune.
"""

from __future__ import annotations

from gmagen.autotune import Choice, DeviceLimits, Rule, Space
from gmagen.config import Config
from gmagen.errors import OptionError

from . import space as _space
from .prelude import Variant

D_CHUNKS = (8, 16, 32, 64)
SEGMENTS = (0, 1, 2, 4, 8, 16, 32, 64)  # 0: the heuristic (space.py); more are clamped to N's tiles


def tuning_space(kind: str, default: Config, D: int, Dv: int, K: int,
                 dtype: str = "f32") -> Space:
    """The tile knobs of ``kind`` (KNOBS in space.py; tiles no wider than the head)
    around ``default``; a config is valid when space.validate accepts it for this
    shape (shared memory within the block's limit, block_dv <= num_threads).
    segments (blocks per (b, h) along N) is a knob too: the default fills the GPU
    with 8 blocks per SM, which at small N or few heads is rarely best for the
    causal scan (each segment sums the memories of the segments before it) or for
    the write's reduction; its values are unordered, as 0 (the heuristic) is no
    count.  mma keeps its default (16-bit tokens: tensor cores; compare with mma=0
    by hand, never silently)."""
    caps = {"block_dv": _space.pow2_at_least(Dv), "d_chunk": _space.pow2_at_least(D)}
    knobs = {}
    for name in ("block_n", "block_dv", "d_chunk", "num_threads"):
        if name not in default or (name == "d_chunk" and default.get("mma") == 2):
            continue  # mma=2 keeps all of D in shared memory: d_chunk changes nothing
        allowed = _space.KNOBS[kind].get(name) or (D_CHUNKS if name == "d_chunk" else ())
        values = [v for v in allowed if v <= caps.get(name, v)] or [default[name]]
        if default[name] not in values:
            values.append(default[name])
        knobs[name] = Choice(sorted(values), default=default[name])
    if "segments" in default:
        values = tuple(dict.fromkeys((int(default["segments"]),) + SEGMENTS))
        knobs["segments"] = Choice(values, default=int(default["segments"]), ordered=False)
    # one mixture (the canonical program): a config that needs more (two mixtures' tables)
    # fails to lower and the tuner rejects it, reported
    variant = Variant("scan" if kind == "scan" else kind, D, Dv, K, dtype)

    def valid(c: Config, limits: DeviceLimits) -> bool:
        try:
            _space.validate(kind, default.replace(**dict(c)), variant)
        except OptionError:
            return False
        return _space.smem_bytes(variant, _space.tiles_of(default.replace(**dict(c)))) \
            <= limits.shared_memory_per_block

    def threads(c: Config, limits: DeviceLimits) -> bool:
        return int(c.get("num_threads", 256)) <= limits.max_threads_per_block

    names = tuple(knobs)
    return Space(knobs, (Rule("tiles fit the block (space.validate)", names, valid),
                         Rule("threads per block", ("num_threads",), threads)))
