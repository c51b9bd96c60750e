"""Autotuning the Triton kernels: the search space of a plan kind.  The runner is
gmagen.autotune.torch_runner's (Triton's executables run on torch tensors); the
loop, checks, noise and cache live in gmagen.autotune.
"""

from __future__ import annotations

from gmagen.autotune import Choice, DeviceLimits, Rule, Space
from gmagen.config import Config

from . import space as _space

TUNED = ("block_n", "block_d", "block_dv", "num_warps", "num_stages")


def tuning_space(kind: str, default: Config, D: int, Dv: int, K: int,
                 dtype: str = "f32") -> Space:
    """The tuned knobs of ``kind`` (KNOBS in space.py, tiles no wider than the head,
    none that space.check_for_dtype refuses for ``dtype``) around ``default``;
    segments and decode_max_n keep their defaults."""
    knobs = {}
    for name in TUNED:
        allowed = _space.KNOBS[kind].get(name)
        if not allowed or name not in default:
            continue
        cap = {"block_d": _space.pow2_at_least(D), "block_dv": _space.pow2_at_least(Dv)}
        values = [v for v in allowed if v <= cap.get(name, v)] or [default[name]]
        if name == "block_dv" and kind == "scan" and dtype in ("f16", "bf16"):
            values = [v for v in values if v >= _space.SCAN_MIN_BLOCK_DV_16BIT]
        if default[name] not in values:
            values.append(default[name])
        knobs[name] = Choice(sorted(values), default=default[name])
    Kp = _space.pow2_at_least(K)

    def fits(c: Config, limits: DeviceLimits) -> bool:
        # a lower bound of what one stage keeps in shared memory: the token tile and
        # the mixture coefficients (float32); Triton's real number is only known after
        # compiling, and compile failures are rejected by the loop anyway
        bn, bd, bdv = c.get("block_n", 64), c.get("block_d", 64), c.get("block_dv", 64)
        stage = 4 * (bn * bd + 2 * bd * Kp + bn * bdv)
        return stage * max(1, c.get("num_stages", 1)) <= limits.shared_memory_per_block

    def threads(c: Config, limits: DeviceLimits) -> bool:
        return c.get("num_warps", 4) * limits.warp_size <= limits.max_threads_per_block

    rules = [Rule("tiles fit shared memory", tuple(k for k in ("block_n", "block_d", "block_dv",
                                                              "num_stages") if k in knobs), fits),
             Rule("threads per block", ("num_warps",), threads)]
    return Space(knobs, tuple(r for r in rules if all(k in knobs for k in r.knobs)))
