"""Tile knobs per plan kind, the default heuristic, and validity checks.

The autotuner (its own issue) searches these; ``default_config`` is what runs
when nothing is tuned.  Knobs:

  block_n      tokens per tile (the chunk length C of the causal scan)
  block_d      D chunk per logits product (power of two >= 16)
  block_dv     Dv columns per program (a grid axis when Dv > block_dv)
  num_warps, num_stages   Triton launch options
  segments     programs per (b, h) along N; 0 = enough to fill the GPU
  decode_max_n causal calls with N <= this use the decoding kernel
"""

from __future__ import annotations

from gmagen.config import Config
from gmagen.errors import OptionError

KNOBS: dict[str, dict[str, tuple]] = {
    "responsibility": {"block_n": (16, 32, 64, 128), "block_d": (16, 32, 64, 128),
                       "num_warps": (2, 4, 8)},
    "write": {"block_n": (16, 32, 64, 128, 256), "block_d": (16, 32, 64, 128),
              "block_dv": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4),
              "segments": ()},
    "read": {"block_n": (16, 32, 64, 128, 256), "block_d": (16, 32, 64, 128),
             "block_dv": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4),
             "segments": ()},
    "scan": {"block_n": (16, 32, 64, 128), "block_d": (16, 32, 64, 128),
             "block_dv": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3),
             "segments": (), "decode_max_n": ()},
}


# The causal scan with 16-bit tokens, 4 warps, 64-token chunks and a Dv tile
# narrower than 64 computes garbage (|y| ~ 1e30) or faults with an illegal
# address on an H100 (Triton 3.6, sm_90); the same tiles in float32, with 8 or 2
# warps, or with chunks of 16 or 32 are right (tests/gpu/test_triton_configs.py
# found it; probe matrix in the commit message).  A Triton code-generation bug
# for the warp-group MMA with an N = 16/32 operand is the likely cause; it was not
# isolated further.  So 16-bit scans use Dv tiles of at least 64 (a narrower Dv is
# masked), which every GPU test covers, on every Triton version until re-checked.
SCAN_MIN_BLOCK_DV_16BIT = 64


def pow2_at_least(x: int, lo: int = 16) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def default_config(kind: str, D: int, Dv: int, K: int, dtype: str) -> Config:
    """Heuristic for Hopper-class GPUs; also valid in the interpreter.

    From a sweep on an H100 (bf16, B=4, H=16, D=Dv=K=64, N=65536): block_n 64,
    4 warps, 2 stages was best for write/read (2.52 ms vs 2.72 for the best
    128-token tile) and for the scan (4.66 ms; 32-token chunks 8.95 ms)."""
    big = max(D, K, Dv) > 64
    block_d = min(pow2_at_least(D), 32 if K > 64 else 64)
    block_dv = min(pow2_at_least(Dv), 64)
    if kind == "responsibility":
        return Config(block_n=64, block_d=block_d, num_warps=4)
    cfg = {"block_n": 64, "block_d": block_d, "block_dv": block_dv,
           "num_warps": 8 if big else 4, "num_stages": 2, "segments": 0}
    if big:  # keep shared memory under the 228 KB of an H100 SM for K, D up to 256
        cfg.update(block_n=32, num_stages=1)
    if kind == "scan":
        cfg.update(decode_max_n=16)
        if dtype in ("f16", "bf16"):
            cfg.update(block_dv=max(block_dv, SCAN_MIN_BLOCK_DV_16BIT))
    return Config(cfg)


def check_for_dtype(kind: str, config: Config, dtype: str) -> None:
    """Raise for a config that is known wrong for this token dtype on CUDA."""
    if kind == "scan" and dtype in ("f16", "bf16") and \
            int(config.get("block_dv", SCAN_MIN_BLOCK_DV_16BIT)) < SCAN_MIN_BLOCK_DV_16BIT:
        raise OptionError(
            f"triton scan config block_dv={config['block_dv']} with {dtype} tokens: expected "
            f"block_dv >= {SCAN_MIN_BLOCK_DV_16BIT} (narrower Dv tiles give wrong results on "
            f"sm_90 with Triton 3.6; see SCAN_MIN_BLOCK_DV_16BIT in backends/triton/space.py)")


def validate(kind: str, config: Config) -> Config:
    """Every knob known and allowed for ``kind``; raises naming the knob."""
    knobs = KNOBS[kind]
    for key, value in config.items():
        if key not in knobs:
            raise OptionError(f"triton {kind} kernel has no config knob {key!r}; knobs: "
                              + ", ".join(sorted(knobs)))
        allowed = knobs[key]
        if allowed and value not in allowed:
            raise OptionError(f"triton {kind} config {key}={value!r} is not allowed; expected one "
                              f"of {allowed}")
        if not allowed and (not isinstance(value, int) or value < 0):
            raise OptionError(f"triton {kind} config {key}={value!r}: expected an int >= 0")
    return config
