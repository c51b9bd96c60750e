"""Config knobs of the TVM backend, their defaults, and validity checks.

Every plan kind takes the same knobs, so that one config may be given for a
whole program (the scan alone reads ``chunk``):

  block_n   tokens per tile of each per-token loop nest; the tiles of all
            (b, h) pairs are the parallel loop on the CPU
  chunk     tokens per causal chunk C (masked C x C products inside a chunk,
            a K x Dv state carried across chunks); on cuda also the scan's
            token tile (one thread block per chunk), block_n unused there
"""

from __future__ import annotations

from gmagen.config import Config
from gmagen.errors import OptionError

KNOBS = {
    "block_n": "tokens per tile of the per-token loops, a positive int (the tiles of all "
               "(b, h) pairs run in parallel)",
    "chunk": "tokens per causal chunk C, a positive int (masked C x C products inside a "
             "chunk, a K x Dv state carried across chunks)",
    "num_threads": "threads per thread block of the cuda schedule (tokens x elements of "
                   "one (b, h) pair tiled over them), a positive int <= 1024",
    "write_tiles": "cuda: token tiles (of block_n) per segment of the write plan's "
                   "reduction (one thread block per segment and (b, h); the segments' "
                   "partial S, n are summed in order), a positive int",
    "min_blocks": "cuda: thread blocks per SM each kernel's registers are capped for "
                  "(__launch_bounds__(threads, min_blocks)), 0 leaves them to nvcc",
    "vector": "cuda: 1 reads the products' operands from shared memory a vector at a time "
              "(the logit tables stored transposed, rows 16-byte aligned), 0 a scalar at a "
              "time",
    "wide_tiles": "cuda: 1 stages 16-bit token tiles (x, [m v, m]) in shared memory as "
                  "float32, widened once as they are loaded (twice their shared memory; "
                  "where that is past the arch's limit per block the kernel is built with "
                  "0), 0 in the tokens' dtype, widened at every read by a product",
    "mma": "cuda, 16-bit tokens: 1 computes the responsibilities' logits on tensor cores "
           "(WMMA, bfloat16 pieces of the tokens and coefficients whose products sum to the "
           "float32 logits; where the pieces fit 48 KiB of static shared memory, and in the "
           "write kernels where its accumulators fit whole warps), 0 in float32 SIMT; "
           "experimental, not yet checked on a GPU",
}
DEFAULTS = Config(block_n=32, chunk=32, num_threads=128, write_tiles=64, min_blocks=0, vector=0,
                  wide_tiles=0, mma=0)
# cuda: tiles of 64 tokens over 256 threads (4 x 4 accumulators per thread of the
# [64, K] logits and [64, Dv] products at K = Dv = 64); the scan's tile is its chunk,
# so chunks of 64 as well (the [C, C] product then fills the 256 threads too).
# write_tiles 8: at 64 a short sequence had one segment per (b, h), and the block ran
# 64 tile iterations, most of them past N (N = 1024: 64 blocks, 3.1 ms).  min_blocks 3:
# the write kernel in 72-85 registers for three blocks per SM (nvcc alone took 96-124,
# one or two; 4 spills).  See the README's TVM section for the measurements.
# vector 1, wide_tiles 1 (H100 at 3c2b26c, N = 65536, bf16: bidirectional 12.66 ms with
# neither, 10.92 with vector, 10.08 with both; causal 37.39, 23.27, 21.49).
# mma 0: the tensor-core logits (mma=1) build and compile for sm_80 / sm_90 and match the
# oracle on the CPU (tests/backends/tvm), but the GPU has not yet passed them end to end
# (the GPU runs of this session found three bugs, fixed since: see the README); the
# default moves to 1 only with GPU tests and timings behind it.
CUDA_DEFAULTS = DEFAULTS.replace(block_n=64, chunk=64, num_threads=256, write_tiles=8,
                                 min_blocks=3, vector=1, wide_tiles=1)


def default_config(kind: str, target: str = "llvm") -> Config:
    """llvm: measured on 2 CPU cores only roughly (tiles of 16..64 tokens were within
    20%); cuda: CUDA_DEFAULTS (not tuned)."""
    return CUDA_DEFAULTS if target == "cuda" else DEFAULTS


# cuda: the tile of a plan kind must hold at least 2 tokens (TVM 0.27 fails to
# lower a one-token tile: "Check failed: it != scope.buffer_binding..."); the scan
# tiles by its chunk, the other plans by block_n
_CUDA_TILE_KNOB = {"scan": "chunk", "read": "block_n", "write": "block_n",
                   "responsibility": "block_n"}


def validate(config: Config, target: str = "llvm", kind: str = "") -> Config:
    """The config with defaults filled in; OptionError naming a bad knob (``kind``:
    the plan kind, for the checks that depend on it)."""
    unknown = sorted(set(config) - set(KNOBS))
    if unknown:
        valid = "; ".join(f"{k}: {why}" for k, why in KNOBS.items())
        raise OptionError(f"tvm backend: unknown config knob(s) {', '.join(map(repr, unknown))}; "
                          f"valid knobs: {valid}")
    full = default_config("", target).replace(**dict(config))
    for key in KNOBS:
        value = full[key]
        if (isinstance(value, bool) or not isinstance(value, int)
                or value < (0 if key in ("min_blocks", "vector", "wide_tiles", "mma") else 1)
                or (key == "num_threads" and value > 1024)
                or (key in ("vector", "wide_tiles", "mma") and value > 1)
                or (key == "min_blocks" and value > 32)):  # 32: the most blocks an SM holds
            raise OptionError(f"tvm backend: config knob {key}={value!r} is not allowed; "
                              f"expected {KNOBS[key]}; default {DEFAULTS[key]}")
    if target == "cuda" and full["mma"] and full["num_threads"] % 32:
        raise OptionError(f"tvm backend: config knob mma=1 needs num_threads a multiple of 32 "
                          f"(one warp per tensor-core tile), got num_threads="
                          f"{full['num_threads']}")
    tile = _CUDA_TILE_KNOB.get(kind) if target == "cuda" else None
    if tile is not None and full["mma"] and full[tile] % 16:
        raise OptionError(f"tvm backend: config knob mma=1 needs {tile} a multiple of 16 "
                          f"(tokens in 16 x 16 tensor-core tiles), got {tile}={full[tile]}")
    if tile is not None and full[tile] < 2:
        raise OptionError(f"tvm backend: config knob {tile}={full[tile]!r} is not allowed on "
                          f"cuda for the {kind} plan; expected at least 2 (tokens per tile); "
                          f"default {CUDA_DEFAULTS[tile]}")
    return full
