"""The standalone responsibility plan as TE: R [B, N, H, K] (call's layout).

Must match ``gmagen.ir.oracle.responsibility`` (responsibility_logits + the
stable softmax)."""

from __future__ import annotations

from typing import Any

from .prelude import Graph


def emit(kernel: Any, layout: str, dims: dict[str, int], target_kind: str = "llvm",
         token_dtype: str = "float32", tile: int = 0, wide_tiles: bool = False,
         mma: int = 0) -> Graph:
    g = Graph("responsibility", layout, dims, target_kind, token_dtype, tile=tile,
              wide_tiles=wide_tiles, mma_warps=mma)
    op = kernel.main
    r = g.responsibility(op, "x")
    K = dims["K"]

    def at(b, h, n, k):
        return r[(*g.ix_of(b, h, n), k)]
    out = g.token_result("R", K, at, "out")
    g.output(op.out, out, g.token_shape(K))
    return g
