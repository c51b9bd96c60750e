"""The write plan as TE: responsibilities of the keys fused with slot_write.

S [B, H, K, Dv] = sum_j m_j r_jk v_j and n [B, H, K] = sum_j m_j r_jk, one
reduction over the tokens per (b, h, k) (``gmagen.ir.oracle.slot_write``)."""

from __future__ import annotations

from typing import Any

from tvm import te

from .prelude import Graph


def emit(kernel: Any, layout: str, dims: dict[str, int], present: frozenset,
         target_kind: str = "llvm", token_dtype: str = "float32") -> Graph:
    g = Graph("write", layout, dims, target_kind, token_dtype)
    op = kernel.main
    K, Dv = dims["K"], dims["Dv"]
    r = g.r_operand(kernel, "r", "k")
    v = g.tokens(op.v, Dv)
    mask = g.key_mask(op.key_mask if op.key_mask in present else None)
    w = g.weights(r, mask, "k")
    j1 = te.reduce_axis((0, g.N), name="j")
    s_mem = te.compute((g.B, g.H, K, Dv),
                       lambda b, h, k, e: te.sum(w(b, h, j1, k) * v(b, j1, h, e), axis=j1),
                       name="S")
    j2 = te.reduce_axis((0, g.N), name="j")
    n_mem = te.compute((g.B, g.H, K), lambda b, h, k: te.sum(w(b, h, j2, k), axis=j2), name="n")
    g.stage(s_mem, "bh", "S = sum_j m_j r_jk v_j  [B, H, K, Dv]")
    g.stage(n_mem, "bh", "n = sum_j m_j r_jk  [B, H, K]")
    g.output(op.out, s_mem, ("B", "H", K, Dv), "S")
    g.output(op.out, n_mem, ("B", "H", K), "n")
    return g
