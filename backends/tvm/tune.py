"""Autotuning the TVM backend's cuda kernels: the search space of a plan kind.
The runner is gmagen.autotune.torch_runner's (the cuda executables take and
return torch tensors); the loop, checks, noise and cache live in
gmagen.autotune.  Tuning needs TVM's compiler and a GPU in one process: each
candidate is a TVM build (plus nvcc to cubin), which TVM's runtime alone cannot do.
"""

from __future__ import annotations

from gmagen.autotune import Choice, DeviceLimits, Rule, Space
from gmagen.config import Config
from gmagen.errors import OptionError

from . import space as _space

# The tile of a plan kind (space._CUDA_TILE_KNOB): tokens per thread block's tile
TILES = (16, 32, 64, 128)
THREADS = (64, 128, 256, 512)
WRITE_TILES = (2, 4, 8, 16, 32)  # tiles per segment of the write plan's reduction
MIN_BLOCKS = (0, 1, 2, 3, 4)      # __launch_bounds__ blocks per SM; 0: nvcc's choice
VECTOR = (0, 1)                   # scalar or vector operand loads of the products
WIDE_TILES = (0, 1)               # 16-bit token tiles staged as they are or as float32
MMA = (0, 1)                      # the logits in float32 SIMT or on tensor cores (pieces)


def tuning_space(kind: str, default: Config, D: int, Dv: int, K: int,
                 dtype: str = "f32") -> Space:
    """The cuda knobs of ``kind`` around ``default`` (space.CUDA_DEFAULTS): its tile
    (``chunk`` for the scan, ``block_n`` for the others: the knob the schedule reads),
    ``num_threads``, ``min_blocks``, ``vector``, the write's ``write_tiles``, and for 16-bit
    tokens ``wide_tiles`` and ``mma`` (no-ops on float32 tokens; mma=1 with a tile not a
    multiple of 16 or threads not a multiple of 32 is refused by validate).  Pruned before
    anything is built: threads per block within the device's limit, and a config
    space.validate refuses.  Shared memory is TVM's to lay out (its merged dynamic
    allocation is known only after lowering): a candidate past the device's limit
    fails its build with UnsupportedFeature, before it runs, and the tuner rejects
    and reports it.  D, Dv, K and dtype are the specialization's (the space itself
    does not depend on them)."""
    tile = _space._CUDA_TILE_KNOB.get(kind, "block_n")
    values = {tile: TILES, "num_threads": THREADS, "min_blocks": MIN_BLOCKS,
              "vector": VECTOR}
    if kind == "write":
        values["write_tiles"] = WRITE_TILES
    if dtype != "f32":
        values["wide_tiles"] = WIDE_TILES
        values["mma"] = MMA
    knobs = {}
    for name, allowed in values.items():
        have = tuple(allowed) if default[name] in allowed else tuple(sorted((*allowed, default[name])))
        knobs[name] = Choice(have, default=default[name])

    def valid(c: Config, limits: DeviceLimits) -> bool:
        try:
            _space.validate(default.replace(**dict(c)), "cuda", kind)
        except OptionError:
            return False
        return True

    def threads(c: Config, limits: DeviceLimits) -> bool:
        return int(c.get("num_threads", default["num_threads"])) <= limits.max_threads_per_block

    names = tuple(knobs)
    return Space(knobs, (Rule("knobs allowed (space.validate)", names, valid),
                         Rule("threads per block", ("num_threads",), threads)))
