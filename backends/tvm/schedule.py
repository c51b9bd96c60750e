"""The schedule of an emitted graph as a function of the config: an
``s_tir.Schedule`` whose trace (``str(sch.trace)``) is printed in the source.

CPU (llvm): in each stage's loop nest the token loop is split into tiles of
``block_n`` tokens and the loops outside it ((b, h) or (b,) plus the tile loop)
are fused into one parallel loop; stages without a token loop (per-(b, h) or
per-chunk reductions) parallelize their leading spatial loops.  Reductions
stay innermost and serial (float32 accumulation in token order, like the
oracle's sums).
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir

from gmagen.config import Config

from .prelude import Graph


def schedule(g: Graph, func: Any, config: Config, target_kind: str) -> Any:
    """The scheduled ``s_tir.Schedule`` of ``func`` (the PrimFunc of ``g``)."""
    sch = s_tir.Schedule(func)
    block_n = int(config["block_n"])
    for name in g.inline:
        sch.compute_inline(sch.get_sblock(name))
    for stage in g.stages:
        block = sch.get_sblock(stage.name)
        loops = sch.get_loops(block)
        if stage.token is not None:
            outer, _ = sch.split(loops[stage.token], [None, block_n])
            lead = list(loops[:stage.token]) + [outer]
        else:
            lead = list(loops[:stage.parallel])
        fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        if target_kind == "llvm":
            sch.parallel(fused)
        else:
            raise ValueError(f"tvm backend: no schedule for target kind {target_kind!r}")
    return sch
