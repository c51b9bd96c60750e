"""The write plan as TE: responsibilities of the keys fused with slot_write.

S [B, H, K, Dv] = sum_j m_j r_jk v_j and n [B, H, K] = sum_j m_j r_jk, one
reduction over the tokens per (b, h, k) (``gmagen.ir.oracle.slot_write``)."""

from __future__ import annotations

from typing import Any

from tvm import te, tirx

from .prelude import Graph


def emit(kernel: Any, layout: str, dims: dict[str, int], present: frozenset,
         target_kind: str = "llvm", token_dtype: str = "float32", tile: int = 0,
         segment_tiles: int = 1, wide_tiles: bool = False, mma: int = 0) -> Graph:
    g = Graph("write", layout, dims, target_kind, token_dtype, tile=tile, wide_tiles=wide_tiles,
              mma_warps=mma)
    if tile:
        return _emit_tiled(g, kernel, present, segment_tiles)
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


def _emit_tiled(g: Graph, kernel: Any, present: frozenset, segment_tiles: int) -> Graph:
    """cuda: segments of ``segment_tiles`` token tiles per (b, h); per segment

        S_seg [K, Dv + 1] = sum_(j in segment) r_jk [m_j v_j, m_j]

    (a tile of [v, 1] with masked keys and tokens past N zeroed: column Dv is n),
    then S and n sum the segments in order."""
    op = kernel.main
    K, Dv = g.dims["K"], g.dims["Dv"]
    B, H = g.B, g.H
    g.tile_multiple = segment_tiles  # whole segments of tile slots: no guard in the sum
    width, mma = g.segment_columns("S_seg")
    r = g.r_operand(kernel, "r", "k", mma=mma)
    mask = g.key_mask(op.key_mask if op.key_mask in present else None)
    vx = value_tile(g, op.v, mask, "v_ext", width)
    part = segment_partials(g, r, vx, segment_tiles, "S_seg")
    nseg = part.shape[2]
    s1 = te.reduce_axis((0, nseg), name="s")
    s_mem = te.compute((B, H, K, Dv), lambda b, h, k, e: te.sum(part[b, h, s1, k, e], axis=s1),
                       name="S")
    s2 = te.reduce_axis((0, nseg), name="s")
    n_mem = te.compute((B, H, K), lambda b, h, k: te.sum(part[b, h, s2, k, Dv], axis=s2),
                       name="n")
    g.stage(s_mem, "bh", "S = sum over segments (in order)  [B, H, K, Dv]")
    g.stage(n_mem, "bh", "n = sum over segments (in order)  [B, H, K]")
    g.output(op.out, s_mem, ("B", "H", K, Dv), "S")
    g.output(op.out, n_mem, ("B", "H", K), "n")
    return g


def value_tile(g: Graph, v_name: str, mask: Any, name: str, width: int = 0) -> Any:
    """The tiled stage [m_j v_j, m_j] [*token_lead, Dv + 1] in the token dtype: masked
    keys and tokens past N are zeros (they add nothing to S or n); ``width`` > Dv + 1
    appends columns of zeros."""
    Dv = g.dims["Dv"]
    width = max(width, Dv + 1)
    raw = g.input(v_name, g.token_shape(Dv), dtype=g.token_dtype)
    zero, one = tirx.const(0, g.tile_dtype), tirx.const(1, g.tile_dtype)

    def load(ix, e):
        b, h, n = ix[0], ix[1], g.n_of(ix)
        keep = n < g.N
        if mask is not None:
            keep = tirx.all(keep, mask(b, n))
        v = raw[b, n, h, e] if g.layout == "bnhd" else raw[b, h, n, e]
        v = g.to_tile(v)
        if width > Dv + 1:
            keep = tirx.all(keep, e <= Dv)
        return tirx.if_then_else(keep, tirx.if_then_else(e < Dv, v, one), zero)
    cols = "Dv + 1" if width == Dv + 1 else f"{width}: Dv + 1 and zeros"
    return g.per_token(name, (width,), load, f"[m_j v_j, m_j] tile  [N, {cols}] "
                       f"({g.tile_dtype}; zeros past N)", "fill")


def segment_partials(g: Graph, r: Any, vx: Any, segment_tiles: int, name: str) -> Any:
    """The "out" stage [B, H, NSEG, K, W] = sum_(j in segment) r_jk vx_j over
    segments of ``segment_tiles`` tiles (the write kernel of the cuda schedule:
    ``schedule_cuda._Sched.segment_output``; W: the columns of vx, Dv + 1 or more);
    the scan takes one tile per segment."""
    K, TPS = g.dims["K"], segment_tiles
    W = int(vx.shape[-1])
    if g.tile_multiple % TPS:
        raise ValueError(f"tvm backend: segments of {TPS} tiles need tile slots in multiples "
                         f"of {TPS} (Graph.tile_multiple={g.tile_multiple})")
    span = g.tile * g.tile_multiple  # tokens per group of tile slots
    nseg = tirx.indexdiv(g.N + (span - 1), span)
    if g.tile_multiple > TPS:
        nseg = nseg * (g.tile_multiple // TPS)
    jt = te.reduce_axis((0, TPS), name="jt")
    ji = te.reduce_axis((0, g.tile), name="ji")

    def term(b, h, s, k, e):
        t = s * TPS + jt
        v = vx[b, h, t, ji, e]
        v = g.widen(v)
        # no guard: the segments cover whole tile slots (Graph.tiles), and the slots
        # past the last tile hold zero rows of vx (tokens past N) and finite r, so they
        # add nothing.  (A guard t < tiles here was loop-invariant, but nvcc kept a
        # select or a predicated multiply and an add on every product.)
        return r[b, h, t, ji, k] * v
    part = te.compute((g.B, g.H, nseg, K, W), lambda b, h, s, k, e: te.sum(
        term(b, h, s, k, e), axis=[jt, ji]), name=name)
    g.stage(part, "bhs", f"{name} = sum_(j in segment) r_jk [m_j v_j, m_j]  [B, H, NSEG, K, "
            f"{W}], segments of {TPS} tiles", "out")
    return part
