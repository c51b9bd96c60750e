"""Config knobs of the TVM backend, their defaults, and validity checks.

Every plan kind takes the same knobs, so that one config may be given for a
whole program (the scan alone reads ``chunk``):

  block_n   tokens per tile of each per-token loop nest; the tiles of all
            (b, h) pairs are the parallel loop on the CPU
  chunk     tokens per causal chunk C (masked C x C products inside a chunk,
            a K x Dv state carried across chunks)
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
}
DEFAULTS = Config(block_n=32, chunk=32, num_threads=128)


def default_config(kind: str) -> Config:
    """Measured on 2 CPU cores only roughly: tiles of 16..64 tokens were within 20%."""
    return DEFAULTS


def validate(config: Config) -> Config:
    """The config with defaults filled in; OptionError naming a bad knob."""
    unknown = sorted(set(config) - set(KNOBS))
    if unknown:
        valid = "; ".join(f"{k}: {why}" for k, why in KNOBS.items())
        raise OptionError(f"tvm backend: unknown config knob(s) {', '.join(map(repr, unknown))}; "
                          f"valid knobs: {valid}")
    full = DEFAULTS.replace(**dict(config))
    for key in KNOBS:
        value = full[key]
        if (isinstance(value, bool) or not isinstance(value, int) or value < 1
                or (key == "num_threads" and value > 1024)):
            raise OptionError(f"tvm backend: config knob {key}={value!r} is not allowed; "
                              f"expected {KNOBS[key]}; default {DEFAULTS[key]}")
    return full
