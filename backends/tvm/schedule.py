"""The schedule of an emitted graph as a function of the config: an
``s_tir.Schedule`` whose trace (``str(sch.trace)``) is printed in the source.

CPU (llvm): every stage's loop nest is brought to (b, h, ...) order (results
in layout bnhd are computed in (b, h, n) order and written strided), the
(b, h) loops are fused into one parallel loop, and the token loop inside is
split into tiles of ``block_n`` tokens.  Reductions stay innermost and serial
(float32 accumulation in token order, like the oracle's sums).  The mixture's
coefficient tables (``Graph._mixture``: [H, K, D] at most, float64 then rounded)
are not in ``g.stages``: they stay at root, serial loops run once per call.
Fusing the token tiles into the parallel loop as well made ``tvm.compile`` 3x slower
(index arithmetic over symbolic N in CompactBufferAllocation and
FlattenBuffer: 3.1 s vs 1.1 s for the scan plan) for no gain at test sizes.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir

from gmagen.config import Config

from .prelude import Graph


def schedule(g: Graph, func: Any, config: Config, target_kind: str) -> Any:
    """The scheduled ``s_tir.Schedule`` of ``func`` (the PrimFunc of ``g``)."""
    if target_kind == "cuda":
        if not g.tile:  # every plan's cuda graph is tiled (lower._emit)
            raise ValueError(f"tvm backend: the cuda schedule needs a tiled graph ({g.kind})")
        from .schedule_cuda import schedule_tiled

        return schedule_tiled(g, func, config)
    if target_kind != "llvm":
        raise ValueError(f"tvm backend: no schedule for target kind {target_kind!r}")
    sch = s_tir.Schedule(func)
    block_n = int(config["block_n"])
    for name in g.inline:
        sch.compute_inline(sch.get_sblock(name))
    for stage in g.stages:
        block = sch.get_sblock(stage.name)
        loops = sch.get_loops(block)
        if stage.loops == "bnh":  # (b, n, h) -> (b, h, n)
            sch.reorder(loops[2], loops[1])
            loops = sch.get_loops(block)
        if stage.loops in ("bhn", "bnh"):
            sch.split(loops[2], [None, block_n])
        sch.parallel(sch.fuse(loops[0], loops[1]))
    return sch

