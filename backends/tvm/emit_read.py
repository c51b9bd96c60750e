"""The read plan as TE: responsibilities of the queries fused with slot_read.

row:  y_i = sum_k r_ik S_k / (sum_k r_ik n_k + eps)
slot: y_i = sum_k r_ik / (n_k + eps) S_k
(``gmagen.ir.oracle.slot_read`` / ``_read``); y in the call's layout."""

from __future__ import annotations

from typing import Any

from tvm import te

from .prelude import Graph


def emit(kernel: Any, layout: str, dims: dict[str, int], present: frozenset,
         target_kind: str = "llvm", token_dtype: str = "float32", tile: int = 0,
         wide_tiles: bool = False, mma: int = 0) -> Graph:
    g = Graph("read", layout, dims, target_kind, token_dtype, tile=tile, wide_tiles=wide_tiles,
              mma_warps=mma)
    if tile:
        return _emit_tiled(g, kernel)
    op = kernel.main
    K, Dv = dims["K"], dims["Dv"]
    eps = float(op.eps)
    r = g.r_operand(kernel, "r", "q")
    s_mem, n_mem = g.memory(op.memory)
    k1 = te.reduce_axis((0, K), name="k")
    if op.norm == "slot":
        num = te.compute((g.B, g.H, g.N, Dv), lambda b, h, i, e: te.sum(
            r[b, h, i, k1] / (n_mem[b, h, k1] + eps) * s_mem[b, h, k1, e], axis=k1), name="num")
        g.stage(num, "bhn", "sum_k r_ik / (n_k + eps) S_k  [B, H, N, Dv]")

        def y_of(b, h, i, e):
            return num[b, h, i, e]
    else:
        num = te.compute((g.B, g.H, g.N, Dv), lambda b, h, i, e: te.sum(
            r[b, h, i, k1] * s_mem[b, h, k1, e], axis=k1), name="num")
        k2 = te.reduce_axis((0, K), name="k")
        den = te.compute((g.B, g.H, g.N), lambda b, h, i: te.sum(
            r[b, h, i, k2] * n_mem[b, h, k2], axis=k2), name="den")
        g.stage(num, "bhn", "sum_k r_ik S_k  [B, H, N, Dv]")
        g.stage(den, "bhn", "sum_k r_ik n_k  [B, H, N]")

        def y_of(b, h, i, e):
            return num[b, h, i, e] / (den[b, h, i] + eps)
    y = g.token_result("y", Dv, lambda b, h, i, e: g.to_token(y_of(b, h, i, e)))
    g.output(op.out, y, g.token_shape(Dv))
    return g


def _emit_tiled(g: Graph, kernel: Any) -> Graph:
    """cuda: per tile of tokens, the products with the memory are "gemm" stages
    over shared r (slot: r / (n + eps) first, one division per (token, k))."""
    op = kernel.main
    K, Dv = g.dims["K"], g.dims["Dv"]
    eps = float(op.eps)
    r = g.r_operand(kernel, "r", "q")
    s_mem, n_mem = g.memory(op.memory)
    k1 = te.reduce_axis((0, K), name="k")
    if op.norm == "slot":
        rn = g.per_token("q_rn", (K,), lambda ix, k: r[(*ix, k)] / (n_mem[ix[0], ix[1], k] + eps),
                         "r_ik / (n_k + eps)  [N, K]", "map")
        num = g.per_token("num", (Dv,), lambda ix, e: te.sum(
            rn[(*ix, k1)] * s_mem[ix[0], ix[1], k1, e], axis=k1),
            "sum_k r_ik / (n_k + eps) S_k  [N, Dv]", "gemm", (s_mem.op.name,))

        def y_of(b, h, i, e):
            return num[(*g.ix_of(b, h, i), e)]
    else:
        num = g.per_token("num", (Dv,), lambda ix, e: te.sum(
            r[(*ix, k1)] * s_mem[ix[0], ix[1], k1, e], axis=k1), "sum_k r_ik S_k  [N, Dv]",
            "gemm", (s_mem.op.name,))
        den = g.row_reduce("den", te.sum, lambda ix, k: r[(*ix, k)] * n_mem[ix[0], ix[1], k],
                           "sum_k r_ik n_k  [N]")

        def y_of(b, h, i, e):
            ix = g.ix_of(b, h, i)
            return num[(*ix, e)] / (den[ix] + eps)
    y = g.token_result("y", Dv, lambda b, h, i, e: g.to_token(y_of(b, h, i, e)), "out")
    g.output(op.out, y, g.token_shape(Dv))
    return g
