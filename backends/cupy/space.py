"""Tile knobs per plan kind, the default heuristic, and validity checks.

Knobs (a Config; ``str()`` pastes back into ``gmagen.compile(config=...)``):

  block_n      tokens per tile (the chunk length C of the causal scan)
  block_dv     Dv columns per block (a grid axis when Dv > block_dv)
  d_chunk      D columns staged in shared memory per step of the logits
  num_threads  threads per block
  segments     blocks per (b, h) along N; 0 = enough to fill the GPU
  mma          2: tensor cores on register fragments (mma.sync, frag.py; the
               write, read and scan kernels, K <= 128), 1: tensor cores (WMMA) on
               shared-memory tiles for the big products (mma.py), 0: CUDA-core
               FMA.  Default for float16/bfloat16 tokens: 2 where its tiles fit,
               else 1; float32 tokens take 0 only (their products stay exact
               float32 FMA: tf32 would break the 1e-4 contract).  With mma>=1,
               block_n and block_dv are multiples of 16 and d_chunk of 8 (the
               MMA tile); mma=2 sets the warps' roles from num_threads
               (frag.shape) and ignores d_chunk (all of D is in shared memory).

Every tile lives in shared memory (layout: ``prelude.smem_buffers``, MMA:
``mma.buffers``); the default shrinks tiles until a block needs at most
SMEM_LIMIT bytes, which every GPU from sm_80 on grants to one block (past
48 KB the launch opts in).  When even the smallest MMA tiles do not fit (the
causal scan at K ~ 256), the default is mma=0; an explicit mma=1 is then
refused like any config that does not fit.
"""

from __future__ import annotations

from gmagen.config import Config
from gmagen.errors import OptionError

from . import frag
from .prelude import Tiles, Variant, smem_bytes

SMEM_LIMIT = 96 * 1024
MAX_K = 256

KNOBS: dict[str, dict[str, tuple]] = {
    "responsibility": {"block_n": (8, 16, 32, 64, 128), "d_chunk": (), "num_threads": (64, 128, 256, 512),
                       "mma": (0, 1)},
    "write": {"block_n": (8, 16, 32, 64, 128), "block_dv": (8, 16, 32, 64, 128), "d_chunk": (),
              "num_threads": (32, 64, 96, 128, 192, 256, 384, 512), "segments": (),
              "mma": (0, 1, 2)},
    "read": {"block_n": (8, 16, 32, 64, 128), "block_dv": (8, 16, 32, 64, 128), "d_chunk": (),
             "num_threads": (32, 64, 128, 256, 512), "segments": (), "mma": (0, 1, 2)},
    "scan": {"block_n": (8, 16, 32, 64), "block_dv": (8, 16, 32, 64, 128), "d_chunk": (),
             "num_threads": (64, 128, 256, 512), "segments": (), "mma": (0, 1, 2)},
}

MMA_DTYPES = ("f16", "bf16")


def pow2_at_least(x: int, lo: int = 8) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def tiles_of(config: Config) -> Tiles:
    return Tiles(block_n=int(config.get("block_n", 64)), block_dv=int(config.get("block_dv", 64)),
                 d_chunk=int(config.get("d_chunk", 32)),
                 num_threads=int(config.get("num_threads", 256)), mma=int(config.get("mma", 0)))


def default_config(kind: str, D: int, Dv: int, K: int, dtype: str = "f32",
                   variant: Variant | None = None, mma: int | None = None) -> Config:
    """16-bit tokens: the register-fragment tiles (mma=2, write and read, see
    _fragments) where they fit, else the largest WMMA tiles (mma=1) that fit
    SMEM_LIMIT: start from block_n 64 (scan: 32), block_dv 64, d_chunk 32 and
    halve d_chunk, block_dv, block_n in turn (floors 16, 16, 8); else CUDA cores
    (mma=0, the float32 path).  ``mma``: the default tiles of that one path (an
    unavailable path falls through to the next: 2, 1, 0)."""
    v = variant or Variant("scan" if kind == "scan" else kind, D, Dv, K, dtype,
                           same_mixture=False)
    cfg = None
    if dtype in MMA_DTYPES and kind in ("write", "read", "scan") and mma in (None, 2):
        cfg = _fragments(kind, Dv, v)
    if cfg is None and dtype in MMA_DTYPES and mma in (None, 1):
        cfg = _shrink(kind, Dv, D, v, mma=1)
    if cfg is None:
        cfg = _shrink(kind, Dv, D, v, mma=0) or {}
    if kind == "responsibility":
        return Config(block_n=cfg["block_n"], d_chunk=cfg["d_chunk"], num_threads=256,
                      mma=cfg["mma"])
    return Config(cfg, segments=0)


def _shrink(kind: str, Dv: int, D: int, v: Variant, mma: int) -> dict | None:
    cfg = {"block_n": 32 if kind == "scan" else 64,
           "block_dv": min(pow2_at_least(Dv, 16 if mma else 8), 64),
           "d_chunk": min(pow2_at_least(D), 32), "num_threads": 256, "mma": mma}
    order = ["d_chunk", "block_dv", "block_n", "d_chunk", "block_n", "block_dv", "block_n"]
    floor = {"d_chunk": 8, "block_dv": 16, "block_n": 16 if mma else 8}
    i = 0
    while smem_bytes(v, tiles_of(Config(cfg))) > SMEM_LIMIT and i < 50:
        knob = order[i % len(order)]
        if cfg[knob] > floor[knob]:
            cfg[knob] //= 2
        i += 1
    if mma and smem_bytes(v, tiles_of(Config(cfg))) > SMEM_LIMIT:
        return None
    return cfg


def _fragments(kind: str, Dv: int, v: Variant) -> dict | None:
    """The mma=2 default (frag.py), or None where it does not serve this shape: write,
    warps KW along K times token groups of TOK = 32 tokens (16 when KW <= 2) in a
    64-token tile; read and scan, 4 warps of 16 tokens; block_dv 64 (32 when a warp
    holds two 16-row tiles of K); smaller tiles until the shared memory (and the
    scan's accumulator registers) fit."""
    probe = frag.shape(v, Tiles(num_threads=32))
    if probe.kpad > frag.MAX_KPAD:
        return None
    bdv = min(pow2_at_least(Dv, 16), 32 if kind == "write" and probe.mk > 1 else 64)
    if kind == "write":
        tok = 32 if probe.kw >= 3 and probe.mk == 1 else 16  # MK = 2: twice the rows
        # <= 8 warps; 32-token warps: one token group (K = 64: 4 warps, block_n 32, 237
        # registers), two blocks per SM whose barriers overlap: on an H100 at N=65536 this ran
        # the write in 2.70 ms against 2.95 for 8 warps x block_n 64 (8 segments each), and
        # 128 threads x block_n 64 (2.52 ms) needs 255 registers and spills
        tg = max(1, 8 // probe.kw if tok == 16 and probe.kw >= 3 else (1 if tok == 32 else 64 // tok))
        cfg = {"block_n": tok * tg, "block_dv": bdv, "d_chunk": 32,
               "num_threads": 32 * probe.kw * tg, "mma": 2}
    else:
        cfg = {"block_n": 64, "block_dv": bdv, "d_chunk": 32, "num_threads": 128, "mma": 2}
    for _ in range(8):
        t = tiles_of(Config(cfg))
        if not frag.problems(v, t) and smem_bytes(v, t) <= SMEM_LIMIT:
            return cfg
        warps = cfg["num_threads"] // 32
        if kind == "write" and warps // probe.kw > 1 and warps > 2:  # half the token groups
            cfg["num_threads"] //= 2
            cfg["block_n"] //= 2
        elif kind in ("read", "scan") and warps > 2:  # one warp hides no latency: mma=1 then
            cfg["num_threads"] //= 2
            cfg["block_n"] //= 2
        elif cfg["block_dv"] > 16:
            cfg["block_dv"] //= 2
        else:
            return None
    return None


def validate(kind: str, config: Config, v: Variant | None = None) -> Config:
    """Every knob known and allowed for ``kind``, and the tiles fit; raises naming
    the knob."""
    knobs = KNOBS[kind]
    for key, value in config.items():
        if key not in knobs:
            raise OptionError(f"cupy {kind} kernel has no config knob {key!r}; knobs: "
                              + ", ".join(sorted(knobs)))
        allowed = knobs[key]
        if allowed and value not in allowed:
            raise OptionError(f"cupy {kind} config {key}={value!r} is not allowed; expected one "
                              f"of {allowed}")
        if not allowed and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise OptionError(f"cupy {kind} config {key}={value!r}: expected an int >= 0")
    t = tiles_of(config)
    if "d_chunk" in config and not 1 <= t.d_chunk <= 128:
        raise OptionError(f"cupy {kind} config d_chunk={t.d_chunk}: expected 1..128")
    if t.mma:
        if v is not None and v.dtype not in MMA_DTYPES:
            raise OptionError(f"cupy {kind} config mma=1: tensor cores serve float16/bfloat16 "
                              f"tokens only; expected mma=0 for {v.dtype} tokens, got mma=1 (the "
                              f"float32 products stay exact FMA)")
        for knob, value, step in (("block_n", t.block_n, 16), ("block_dv", t.block_dv, 16),
                                  ("d_chunk", t.d_chunk, 8)):
            if knob in config and value % step:
                raise OptionError(f"cupy {kind} config {knob}={value} with mma={t.mma}: expected a "
                                  f"multiple of {step} (the tensor-core tile), got {value}; "
                                  f"or pass mma=0")
    if t.mma == 2:
        if kind not in ("write", "read", "scan"):
            raise OptionError(f"cupy {kind} config mma=2: register fragments serve the write, "
                              f"read and scan kernels; expected mma=0 or 1 for {kind}")
        if v is not None:
            why = frag.problems(v, t)
            if why:
                raise OptionError(f"cupy {kind} config {dict(config)} with mma=2 does not fit "
                                  f"D={v.D}, Dv={v.Dv}, K={v.K}, {v.dtype}: " + "; ".join(why)
                                  + "; or pass mma=1")
    elif kind != "responsibility" and t.block_dv > t.num_threads:
        raise OptionError(f"cupy {kind} config block_dv={t.block_dv} exceeds "
                          f"num_threads={t.num_threads}")
    if v is not None and smem_bytes(v, t) > SMEM_LIMIT:
        raise OptionError(f"cupy {kind} config {config}: a block needs {smem_bytes(v, t)} bytes "
                          f"of shared memory at D={v.D}, Dv={v.Dv}, K={v.K}, more than "
                          f"{SMEM_LIMIT}; try smaller block_n, block_dv or d_chunk")
    return config
