"""The scan plan as TE: responsibilities of queries and keys fused with
causal_scan, in chunks of C tokens (``gmagen.ir.oracle.causal_scan``).

Per (b, h), with chunk c = i // C holding tokens [c C, c C + C):

  dS_c = sum_{j in c} m_j r_jk v_j,  dn_c = sum_{j in c} m_j r_jk       [B, H, NC, K, (Dv)]
  S_in(c) = S0 + sum_{c' < c} dS_c'  (exclusive prefix over chunks: a sequential
            loop per (b, h, k, dv) written with TVM's IRBuilder, the one stage that is
            not a te.compute; the (b, h) pairs run in parallel)
  slot:  q_i = r_i / (n_in(c) + sum_{j in c, j <= i} m_j r_j + eps), row: q_i = r_i
  A_ij = q_i . m_j r_j for j in c, j <= i (a masked C x C product, never N x N)
  y_i  = sum_j A_ij v_j + q_i S_in(c)      (row: / (sum_j A_ij + q_i . n_in(c) + eps))
  final state = S_in(NC - 1) + dS_{NC-1}

That is the CPU graph (stages [B, H, N, *]).  The cuda graph (``tile``: the tokens in
tiles of C, ``_emit_tiled``) is the same algebra as three kernels: the chunk partials
(the write plan's segment kernel with one chunk per segment), the prefix with the final
state (``state_prefix``), and one thread block per chunk for y with everything per
token in shared memory (``schedule_cuda.py``).

N = 0 never reaches the built function (lower.py passes the state through)."""

from __future__ import annotations

from typing import Any

from tvm import te, tirx

from .prelude import ACC_TILE, F32, Graph

GPU_THREADS = 128  # threads per block of the chunk prefix on a GPU (state_prefix)


def chunk_prefix(delta: Any, init: Any, name: str) -> Any:
    """out[b, h, c] = init[b, h] + sum_{c' < c} delta[b, h, c'] for delta [B, H, NC, *X]
    (init [B, H, *X], or None for zeros): a te.extern whose body is a sequential
    loop over chunks, parallel over (b, h) (the CPU graph; the cuda graph's prefix is
    ``state_prefix``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    shape = delta.shape
    B, H, NC, rest = shape[0], shape[1], shape[2], [int(x) for x in shape[3:]]

    def body(ins: list, outs: list) -> Any:
        with IRBuilder() as ib:
            x = T.buffer_proxy(ins[0])
            s0 = T.buffer_proxy(ins[1]) if init is not None else None
            out = T.buffer_proxy(outs[0])

            def scan(b: Any, h: Any, idx: list) -> None:
                out[(b, h, 0, *idx)] = s0[(b, h, *idx)] if s0 is not None else 0.0
                with T.serial(0, NC - 1) as c:
                    out[(b, h, c + 1, *idx)] = out[(b, h, c, *idx)] + x[(b, h, c, *idx)]

            with T.parallel(0, B * H) as bh:
                with T.grid(*rest) as idx:
                    idx = [idx] if isinstance(idx, tirx.Var) else list(idx)
                    scan(tirx.indexdiv(bh, H), tirx.indexmod(bh, H), idx)
        return ib.get()

    inputs = [delta] + ([init] if init is not None else [])
    return te.extern(shape, inputs, body, name=name, dtype="float32")


def state_prefix(part: Any, s0: Any, n0: Any, gpu: bool, Dv: int) -> tuple:
    """(S_in [B, H, NC, K, W], S_end [B, H, K, Dv], n_end [B, H, K]) of the chunk
    partials part [B, H, NC, K, W] (column Dv: n; W >= Dv + 1, columns past Dv zero
    padding that stays zero): S_in[c] = state0 + sum_(c' < c)
    part[c'] (exclusive, state0 = (s0, n0) or zeros), the end state the inclusive sum
    over all chunks.  A te.extern: per (b, h, k, e) a sequential loop over the chunks
    with the running sum in a register (O(NC) per element).  On the CPU parallel over
    (b, h); on a GPU one thread per element (blockIdx.y: (b, h), blockIdx.x x
    threadIdx.x: the K x (Dv + 1) elements), so the loads of consecutive threads are
    contiguous and every thread's NC loads are independent of its sums."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    B, H, NC, K, W = part.shape
    K, W = int(K), int(W)
    size = K * W
    threads = min(size, GPU_THREADS)

    def body(ins: list, outs: list) -> Any:
        with IRBuilder() as ib:
            x = T.buffer_proxy(ins[0])
            init = [T.buffer_proxy(t) for t in ins[1:]]
            out, s_end, n_end = (T.buffer_proxy(t) for t in outs)

            def scan(b: Any, h: Any, flat: Any) -> None:
                k, e = tirx.indexdiv(flat, W), tirx.indexmod(flat, W)
                acc = T.decl_buffer((1,), "float32", scope="local")  # the running sum
                zero = tirx.const(0.0, "float32")
                if init:
                    with T.If(e < Dv):
                        with T.Then():
                            T.buffer_store(acc, init[0][b, h, k, e], [0])
                        with T.Else():
                            T.buffer_store(acc, tirx.if_then_else(e == Dv, init[1][b, h, k],
                                                                  zero), [0])
                else:
                    T.buffer_store(acc, zero, [0])
                with T.serial(0, NC) as c:
                    out[b, h, c, k, e] = acc[0]
                    T.buffer_store(acc, acc[0] + x[b, h, c, k, e], [0])
                with T.If(e < Dv):
                    with T.Then():
                        s_end[b, h, k, e] = acc[0]
                    with T.Else():
                        with T.If(e == Dv):
                            with T.Then():
                                n_end[b, h, k] = acc[0]

            if gpu:
                with T.thread_binding(0, B * H, thread="blockIdx.y") as bh:
                    with T.thread_binding(0, (size + threads - 1) // threads,
                                          thread="blockIdx.x") as bx:
                        with T.thread_binding(0, threads, thread="threadIdx.x") as tx:
                            flat = bx * threads + tx
                            with T.If(flat < size):
                                with T.Then():
                                    scan(tirx.indexdiv(bh, H), tirx.indexmod(bh, H), flat)
            else:
                with T.parallel(0, B * H) as bh:
                    with T.serial(0, size) as flat:
                        scan(tirx.indexdiv(bh, H), tirx.indexmod(bh, H), flat)
        return ib.get()

    inputs = [part] + ([s0, n0] if s0 is not None else [])
    shapes = [part.shape, (B, H, K, Dv), (B, H, K)]
    # named buffers: the three outputs of one extern would all be called S_in
    names = ["S_in", "S_final", "n_final"]
    bufs = [tirx.decl_buffer(shape, "float32", name) for shape, name in zip(shapes, names)]
    return te.extern(shapes, inputs, body, name="S_in", dtype=["float32"] * 3,
                     out_buffers=bufs)


def emit(kernel: Any, layout: str, dims: dict[str, int], present: frozenset,
         chunk: int, target_kind: str = "llvm", token_dtype: str = "float32",
         tile: bool = False, wide_tiles: bool = False, mma: int = 0) -> Graph:
    g = Graph("scan", layout, dims, target_kind, token_dtype, tile=chunk if tile else 0,
              wide_tiles=wide_tiles, mma_warps=mma)
    if tile:
        return _emit_tiled(g, kernel, present)
    op = kernel.main
    K, Dv, C = dims["K"], dims["Dv"], chunk
    eps = float(op.eps)
    B, N, H = g.B, g.N, g.H
    NC = tirx.indexdiv(N + (C - 1), C)
    rq = g.r_operand(kernel, "rq", "q")
    rk = g.r_operand(kernel, "rk", "k")
    v = g.tokens(op.v, Dv)
    mask = g.key_mask(op.key_mask if op.key_mask in present else None)
    w = g.weights(rk, mask, "k")
    init = op.initial_state if op.initial_state in present else None
    s0, n0 = g.memory(init) if init is not None else (None, None)

    def guard(cond, value):
        """value where cond holds, else 0 (TE's reduction ``where`` would skip the
        init of a reduction whose first term is masked; if_then_else reads value
        only where cond holds)."""
        return tirx.if_then_else(cond, value, tirx.const(0.0, "float32"))

    def chunk_of(i):
        return tirx.indexdiv(i, C)

    def pos_of(i):
        return tirx.indexmod(i, C)

    # what each chunk writes
    t1 = te.reduce_axis((0, C), name="t")
    ds = te.compute((B, H, NC, K, Dv), lambda b, h, c, k, e: te.sum(
        guard(c * C + t1 < N, w(b, h, c * C + t1, k) * v(b, c * C + t1, h, e)), axis=t1),
        name="dS")
    t2 = te.reduce_axis((0, C), name="t")
    dn = te.compute((B, H, NC, K), lambda b, h, c, k: te.sum(
        guard(c * C + t2 < N, w(b, h, c * C + t2, k)), axis=t2), name="dn")
    g.stage(ds, "bh", f"dS_c = sum_(j in chunk c) m_j r_jk v_j  [B, H, NC, K, Dv], C = {C}")
    g.stage(dn, "bh", "dn_c = sum_(j in chunk c) m_j r_jk  [B, H, NC, K]")
    # the state entering each chunk: exclusive prefix over chunks (+ initial state)
    ps = chunk_prefix(ds, s0, "S_in")
    pn = chunk_prefix(dn, n0, "n_in")
    g.notes.append("S_in, n_in: " + ("S0 + " if s0 is not None else "")
                   + "exclusive prefix of dS, dn over chunks (te.extern: a sequential loop "
                   "over chunks, parallel over (b, h))")

    def s_in(b, h, c, k, e):
        return ps[b, h, c, k, e]

    def n_in(b, h, c, k):
        return pn[b, h, c, k]
    # the queries' side: slot norm divides by n_k(i), inclusive of token i
    if op.norm == "slot":
        j0 = te.reduce_axis((0, C), name="j")
        wc = te.compute((B, H, N, K), lambda b, h, i, k: te.sum(
            guard(j0 <= pos_of(i), w(b, h, chunk_of(i) * C + j0, k)), axis=j0), name="w_cum")
        g.stage(wc, "bhn", "sum_(j in chunk, j <= i) m_j r_jk  [B, H, N, K]")
        qn = te.compute((B, H, N, K), lambda b, h, i, k: rq[b, h, i, k] / (
            n_in(b, h, chunk_of(i), k) + wc[b, h, i, k] + eps), name="q_norm")
        g.stage(qn, "bhn", "r_ik / (n_k(i) + eps)  [B, H, N, K]")
    else:
        qn = rq
    kk = te.reduce_axis((0, K), name="k")
    a = te.compute((B, H, N, C), lambda b, h, i, j: te.sum(
        guard(j <= pos_of(i), qn[b, h, i, kk] * w(b, h, chunk_of(i) * C + j, kk)), axis=kk),
        name="A")
    g.stage(a, "bhn", "A_ij = q_i . m_j r_j, j in chunk, j <= i  [B, H, N, C]")
    j1 = te.reduce_axis((0, C), name="j")
    intra = te.compute((B, H, N, Dv), lambda b, h, i, e: te.sum(
        guard(j1 <= pos_of(i), a[b, h, i, j1] * v(b, chunk_of(i) * C + j1, h, e)), axis=j1),
        name="y_intra")
    k1 = te.reduce_axis((0, K), name="k")
    inter = te.compute((B, H, N, Dv), lambda b, h, i, e: te.sum(
        qn[b, h, i, k1] * s_in(b, h, chunk_of(i), k1, e), axis=k1), name="y_inter")
    g.stage(intra, "bhn", "sum_(j in chunk, j <= i) A_ij v_j  [B, H, N, Dv]")
    g.stage(inter, "bhn", "q_i . S_in(chunk of i)  [B, H, N, Dv]")
    if op.norm == "row":
        j2 = te.reduce_axis((0, C), name="j")
        k2 = te.reduce_axis((0, K), name="k")
        den_intra = te.compute((B, H, N), lambda b, h, i: te.sum(a[b, h, i, j2], axis=j2),
                               name="den_intra")  # A_ij = 0 for j > i
        den_inter = te.compute((B, H, N), lambda b, h, i: te.sum(
            qn[b, h, i, k2] * n_in(b, h, chunk_of(i), k2), axis=k2), name="den_inter")
        g.stage(den_intra, "bhn", "sum_j A_ij  [B, H, N]")
        g.stage(den_inter, "bhn", "q_i . n_in(chunk of i)  [B, H, N]")

        def y_of(b, h, i, e):
            return (intra[b, h, i, e] + inter[b, h, i, e]) / (
                den_intra[b, h, i] + den_inter[b, h, i] + eps)
    else:
        def y_of(b, h, i, e):
            return intra[b, h, i, e] + inter[b, h, i, e]
    y = g.token_result("y", Dv, lambda b, h, i, e: g.to_token(y_of(b, h, i, e)))
    # the state after the last token
    s_end = te.compute((B, H, K, Dv), lambda b, h, k, e: s_in(b, h, NC - 1, k, e)
                       + ds[b, h, NC - 1, k, e], name="S_final")
    n_end = te.compute((B, H, K), lambda b, h, k: n_in(b, h, NC - 1, k) + dn[b, h, NC - 1, k],
                       name="n_final")
    g.stage(s_end, "bh", "final state S [B, H, K, Dv]")
    g.stage(n_end, "bh", "final state n [B, H, K]")
    g.output(op.out, y, g.token_shape(Dv))
    g.output(op.state_out, s_end, ("B", "H", K, Dv), "S")
    g.output(op.state_out, n_end, ("B", "H", K), "n")
    return g


def _emit_tiled(g: Graph, kernel: Any, present: frozenset) -> Graph:
    """cuda: token tiles of C tokens (``Graph.tile`` = chunk), two tiled kernels and
    the prefix between them:

      group "part":  part_c [K, W] = sum_(j in c) r_jk [m_j v_j, m_j, 0...]
                     (emit_write.segment_partials, one tile per segment; W: Dv + 1
                     rounded up to the accumulator tile, as in the write plan)
      state_prefix:  S_in(c) [K, W] (column Dv: n_in), and the final state
      group "y":     per chunk c, tiles in shared memory:
                     slot: wc_ik = sum_(j <= i) m_j r_jk, q_i = r_i / (n_in + wc_i + eps)
                     A_ij = q_i . r_j                       [C, C]
                     intra_i = sum_(j <= i) A_ij [m_j v_j, m_j]  [C, W]
                     inter_i = q_i S_in(c)                  [C, W]
                     row: y_i = (intra + inter)[:Dv] / ((intra + inter)[Dv] + eps)
                          (W columns, those past Dv zero)
                     slot: y_i = intra_i + inter_i (W = Dv)

    The key mask and the tokens past N live in the tile of [m_j v_j, m_j] only
    (zero rows), so A itself needs no mask but the causal j <= i."""
    from .emit_write import segment_partials, value_tile

    op = kernel.main
    K, Dv, C = g.dims["K"], g.dims["Dv"], g.tile
    eps = float(op.eps)
    mask = g.key_mask(op.key_mask if op.key_mask in present else None)
    init = op.initial_state if op.initial_state in present else None
    s0, n0 = g.memory(init) if init is not None else (None, None)
    # what each chunk writes (the keys' responsibilities are computed again in the
    # y kernel: recomputing [C, K] costs less than a global [B, H, N, K] buffer)
    g.group = "part"
    # [v, 1] rounded up to whole accumulator tiles (Graph.segment_columns: why); the
    # chunk partials' own may be wider (mma)
    W = -(-(Dv + 1) // ACC_TILE) * ACC_TILE
    W_part, mma = g.segment_columns("S_chunk")
    rk_part = g.r_operand(kernel, "rk", "kp", mma=mma)
    vx_part = value_tile(g, op.v, mask, "v_part", W_part)
    part = segment_partials(g, rk_part, vx_part, 1, "S_chunk")
    ps, s_end, n_end = state_prefix(part, s0, n0, g.target_kind != "llvm", Dv)
    g.notes.append("S_in: " + ("S0 + " if s0 is not None else "")
                   + "exclusive prefix of S_chunk over chunks, [B, H, NC, K, Dv + 1] (te.extern:"
                   " a sequential loop over chunks per element); its other outputs are the "
                   "final state")
    g.group = "y"
    rq = g.r_operand(kernel, "rq", "q")
    rk = g.r_operand(kernel, "rk", "k")
    vx = value_tile(g, op.v, mask, "v_ext", W)

    wide = g.widen

    def guard(cond: Any, value: Any) -> Any:
        return tirx.if_then_else(cond, value, tirx.const(0.0, F32))

    # S_in(c) of the tile's chunk, [K, Dv + 1] in shared memory: a per-tile stage (no
    # token axis: (b, h, t) lead it like the per-token stages)
    st = te.compute((g.B, g.H, g.tiles, K, W), lambda b, h, t, k, e: ps[b, h, t, k, e],
                    name="S_tile")
    g.stage(st, "bhti", f"S_in(c), n_in(c) of the tile's chunk  [K, {W}]", "fill")
    # The causal mask j <= i of the in-chunk products is a [C, C] factor of its own
    # ("map" stages, C x C selects), not a select in the products (C x C x K or
    # C x C x W: in the sm_90 SASS one ISETP and one FSEL or a branch per FFMA)
    if op.norm == "slot":
        m_tri = g.per_token("m_tri", (C,), lambda ix, j: guard(
            j <= ix[3], wide(vx[ix[0], ix[1], ix[2], j, Dv])),
            "m_j if j <= i else 0  [C, C]", "map")
        j0 = te.reduce_axis((0, C), name="j")
        wc = g.per_token("w_cum", (K,), lambda ix, k: te.sum(
            m_tri[(*ix, j0)] * rk[ix[0], ix[1], ix[2], j0, k], axis=j0),
            "sum_(j in chunk, j <= i) m_j r_jk  [C, K]", "gemm")
        qn = g.per_token("q_norm", (K,), lambda ix, k: rq[(*ix, k)] / (
            st[ix[0], ix[1], ix[2], k, Dv] + wc[(*ix, k)] + eps),
            "r_ik / (n_k(i) + eps)  [C, K]", "map")
        width = Dv
    else:
        qn, width = rq, W
    kk = te.reduce_axis((0, K), name="k")
    a = g.per_token("A", (C,), lambda ix, j: te.sum(
        qn[(*ix, kk)] * rk[ix[0], ix[1], ix[2], j, kk], axis=kk),
        "A_ij = q_i . r_j  [C, C] (j <= i applied in A_causal)", "gemm")
    a_causal = g.per_token("A_causal", (C,), lambda ix, j: guard(j <= ix[3], a[(*ix, j)]),
                           "A_ij if j <= i else 0  [C, C] (A is finite for every j)", "map")
    j1 = te.reduce_axis((0, C), name="j")
    intra = g.per_token("y_intra", (width,), lambda ix, e: te.sum(
        a_causal[(*ix, j1)] * wide(vx[ix[0], ix[1], ix[2], j1, e]), axis=j1),
        "sum_(j <= i) A_ij [m_j v_j, m_j]  [C, W]", "gemm")
    k1 = te.reduce_axis((0, K), name="k")
    inter = g.per_token("y_inter", (width,), lambda ix, e: te.sum(
        qn[(*ix, k1)] * st[ix[0], ix[1], ix[2], k1, e], axis=k1),
        "q_i . S_in(c)  [C, W]", "gemm")

    def y_of(b, h, i, e):
        ix = g.ix_of(b, h, i)
        num = intra[(*ix, e)] + inter[(*ix, e)]
        if op.norm == "row":
            return num / (intra[(*ix, Dv)] + inter[(*ix, Dv)] + eps)
        return num
    y = g.token_result("y", Dv, lambda b, h, i, e: g.to_token(y_of(b, h, i, e)), "out")
    g.group = ""
    g.output(op.out, y, g.token_shape(Dv))
    g.output(op.state_out, s_end, ("B", "H", K, Dv), "S")
    g.output(op.state_out, n_end, ("B", "H", K), "n")
    return g
