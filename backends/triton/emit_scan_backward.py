"""Backward kernels of causal GMA: chunks of C = BLOCK_N tokens, CPS chunks per program.

Must match ``oracle_grad.causal_scan_vjp`` + ``responsibility_vjp``.  A program
owns a segment of consecutive chunks (a multiple of GROUP) and carries state
through it in registers, so what lives in memory between kernels is one state per
GROUP chunks (the state entering the group, relative to its segment: 1/GROUP of
the size of v in float32 when C = K) plus a few per-segment sums:

  gma_scan_bwd_chunks  forward over the segment: the state entering each group of
                       chunks relative to the segment start (sum_j w_j v_j^T and
                       sum_j w_j over the segment's earlier keys, w = m r_k), and
                       the segment's total; the host's exclusive prefix of the
                       totals (plus S0) is the state entering each segment
  gma_scan_bwd_q       forward over the segment, carrying the state: dq, the
                       queries' mixture sums, and what the segment's queries add
                       to the state gradient, sum_i rho_i dy_i^T and -sum_i zeta_i
                       (below); the host's exclusive suffix of those (plus the
                       final state's cotangent) is the gradient of the state
                       leaving each segment
  gma_scan_bwd_k       backward over the segment's groups, carrying the state
                       gradient: per group, the stored state entering it and the
                       keys of its chunks give the state entering each chunk
                       (written to this program's scratch, GROUP states); then,
                       last chunk first, dk, dv and the keys' mixture sums

Inside a chunk (i, j tokens of the chunk, M_ij = [i >= j], S(i), n(i) the
inclusive state, dy = dL/dy):
    T_ik  = dy_i . S_k(i) = dy S_in^T + ((dy v^T) * M) w
    row:  u_i = r_i . n(i) + eps,  rho_i = r_i / u_i,  zeta_i = r_i (dy_i . y_i) / u_i,
          dRq_i = T_i / u_i - (dy_i . y_i) / u_i n(i)
    slot: rho_ik = r_ik / (n_k(i) + eps),  zeta_ik = r_ik T_ik / (n_k(i) + eps)^2,
          dRq_ik = T_ik / (n_k(i) + eps)
    keys: dW_j = Q_next v_j + N_next + sum_{i>=j} (dy_i . v_j) rho_i - sum_{i>=j} zeta_i
          dv_j = Q_next^T w_j + sum_{i>=j} (rho_i . w_j) dy_i
with Q_next, N_next the gradient of the state leaving the chunk.  Responsibilities
and the mixture's coefficients are handled as in ``emit_backward``.
"""

from __future__ import annotations

from .emit_backward import (COEF_ARGS, _constants, _store_partials, coefficient_loads,
                            responsibilities)
from .prelude import Code, header, kernel_start, key_keep, token_args, token_base
from .variant import Variant


def _params(v: Variant, extra: list[str]) -> list[str]:
    params = token_args("q") + token_args("k") + token_args("v") + token_args("dy")
    if v.mask:
        params += ["mask_ptr", "mask_sb", "mask_sn"]
    return params + COEF_ARGS + extra + ["N", "H", "BH", "NCH", "CPS", "BLOCK_N: tl.constexpr",
                                         "GROUP: tl.constexpr"]


def _head(c: Code) -> None:
    """Indices, the head's coefficients and this program's chunks [lo, hi)."""
    coefficient_loads(c)
    c("kv = offs_k[:, None] * DV + offs_dv[None, :]",
      "kv_ok = k_ok[:, None] & dv_ok[None, :]",
      "ii = tl.arange(0, BLOCK_N)",
      "tri = (ii[:, None] >= ii[None, :]).to(tl.float32)  # M_ij = [i >= j]",
      "p = tl.program_id(1)",
      "seg = (tl.zeros([], dtype=tl.int64) + p) * BH + bh64  # row of the per-segment arrays",
      "lo = p * CPS  # CPS is a multiple of GROUP: segments start on a group",
      "hi = tl.minimum(lo + CPS, tl.cdiv(NCH, GROUP) * GROUP)  # padding chunks are all masked")
    for t in ("q", "k", "v", "dy"):
        token_base(c, t)


def _at_chunk(c: Code, ch: str) -> None:
    """Rows of chunk ``ch`` and the row of its group in the per-group state arrays."""
    c(f"ch = {ch}",
      "ch64 = tl.zeros([], dtype=tl.int64) + ch  # (the interpreter hands out Python ints)",
      "offs_n = ch * BLOCK_N + tl.arange(0, BLOCK_N)",
      "n_ok = offs_n < N",
      "rows = offs_n.to(tl.int64)",
      "state = (ch64 // GROUP) * BH + bh64")


def _loop(c: Code) -> None:
    """The forward loop over the program's chunks."""
    c("for step in range(0, hi - lo):")
    c.indent()
    _at_chunk(c, "lo + step")


def _chunk_start(c: Code, v: Variant, queries: bool) -> None:
    """The chunk's w = m r_k and v (and r_q)."""
    for t, r in (("k", "rk"),) + ((("q", "rq"),) if queries else ()):
        responsibilities(c, t, f"x{t}", r)
    key_keep(c, v.mask)
    c("w = tl.where(keep[:, None], rk, 0.0)  # [BLOCK_N, BLOCK_K], what each key writes",
      "vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)")


def _segment_state(c: Code) -> None:
    """The state entering this program's segment (host prefix of the segment totals)."""
    c("seg_s = tl.load(ss_ptr + seg * (K * DV) + kv, mask=kv_ok, other=0.0)",
      "seg_n = tl.load(sn_ptr + seg * K + offs_k, mask=k_ok, other=0.0)")


def _chunk_reads(c: Code, v: Variant, s_in: str, n_in: str) -> None:
    """The queries' read of the inclusive state: rho, zeta, dRq (module docstring),
    given the state entering the chunk."""
    c("rq = tl.where(n_ok[:, None], rq, 0.0)",
      "g = tl.load(dy_base + rows[:, None] * dy_sn + offs_dv[None, :] * dy_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # dL/dy",
      f"s_in = {s_in}",
      f"n_in = {n_in}",
      "n_i = n_in[None, :] + tl.dot(tri, w, input_precision='ieee')  # n(i) [BLOCK_N, BLOCK_K]",
      "pv = tl.dot(g, tl.trans(vt), input_precision=DATA_PRECISION) * tri  # dy_i . v_j",
      "t_ik = tl.dot(g, tl.trans(s_in), input_precision=DATA_PRECISION) + "
      "tl.dot(pv, w, input_precision=DATA_PRECISION)  # dy_i . S_k(i)")
    if v.norm == "row":
        c("aff = tl.dot(rq, tl.trans(w), input_precision=DATA_PRECISION) * tri  # r_qi . w_j",
          "u = tl.sum(rq * n_i, 1) + EPS",
          "y = (tl.dot(rq, s_in, input_precision=DATA_PRECISION) + "
          "tl.dot(aff, vt, input_precision=DATA_PRECISION)) / u[:, None]",
          "gy = tl.sum(g * y, 1) / u",
          "rho = rq / u[:, None]",
          "zeta = rq * gy[:, None]",
          "drq = t_ik / u[:, None] - gy[:, None] * n_i")
    else:
        c("inv = tl.where(k_ok[None, :], 1.0 / (n_i + EPS), 0.0)",
          "rho = rq * inv",
          "zeta = rq * t_ik * inv * inv",
          "drq = t_ik * inv")


def _token_grad(c: Code, t: str, r: str, dr: str) -> None:
    """Softmax backward of ``dr``; the token gradient; this program's mixture sums."""
    c(f"dl = {r} * ({dr} - tl.sum({dr} * {r}, 1)[:, None])",
      "dl = tl.where(k_ok[None, :] & n_ok[:, None], dl, 0.0)",
      f"dx = (2.0 * x{t} * tl.dot(dl, tl.trans(a2), input_precision=DATA_PRECISION) + "
      "tl.dot(dl, tl.trans(b2), input_precision=DATA_PRECISION)) * INV_LOG2E",
      f"tl.store(d{t}_base + rows[:, None] * d{t}_sn + offs_d[None, :] * d{t}_sd, "
      f"dx.to(d{t}_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])",
      f"acc_a += tl.dot(tl.trans(dl), x{t} * x{t}, input_precision=DATA_PRECISION)",
      f"acc_b += tl.dot(tl.trans(dl), x{t}, input_precision=DATA_PRECISION)",
      "acc_c += tl.sum(dl, 0)")


def _key_chunk(c: Code, v: Variant, s_in: str, n_in: str) -> None:
    """dk, dv of one chunk given the state entering it and q_next / n_next, the state
    gradient leaving it; then the state gradient leaving the chunk before."""
    _chunk_start(c, v, queries=True)
    _chunk_reads(c, v, s_in, n_in)
    c("aff_rho = tl.dot(rho, tl.trans(w), input_precision=DATA_PRECISION) * tri  # rho_i . w_j",
      "gv = tl.dot(tl.trans(aff_rho), g, input_precision=DATA_PRECISION) + "
      "tl.dot(w, q_next, input_precision=DATA_PRECISION)",
      "tl.store(dv_base + rows[:, None] * dv_sn + offs_dv[None, :] * dv_sd, "
      "gv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])",
      "dw = (tl.dot(vt, tl.trans(q_next), input_precision=DATA_PRECISION) + n_next[None, :]"
      " + tl.dot(tl.trans(pv), rho, input_precision=DATA_PRECISION)"
      " - tl.dot(tl.trans(tri), zeta, input_precision='ieee'))",
      "drk = tl.where(keep[:, None], dw, 0.0)  # through w = m r_k")
    _token_grad(c, "k", "rk", "drk")
    c("q_next += tl.dot(tl.trans(rho), g, input_precision='ieee')  # now leaving the chunk before",
      "n_next -= tl.sum(zeta, 0)")


def _mixture_accumulators(c: Code) -> None:
    c("acc_a = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)  # mixture sums of this program",
      "acc_b = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)",
      "acc_c = tl.zeros([BLOCK_K], dtype=tl.float32)")


_GRID = "(B*H, programs of CPS chunks)"


def emit_chunks(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    kernel_start(c, "gma_scan_bwd_chunks", _params(v, ["rs_ptr", "rn_ptr", "ts_ptr", "tn_ptr"]),
                 _GRID)
    _head(c)
    c("carry_s = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)  # relative to the segment",
      "carry_n = tl.zeros([BLOCK_K], dtype=tl.float32)")
    _loop(c)
    c("first = step % GROUP == 0  # the state entering each group",
      "tl.store(rs_ptr + state * (K * DV) + kv, carry_s, mask=kv_ok & first)",
      "tl.store(rn_ptr + state * K + offs_k, carry_n, mask=k_ok & first)")
    _chunk_start(c, v, queries=False)
    c("carry_s += tl.dot(tl.trans(w), vt, input_precision='ieee')",
      "carry_n += tl.sum(w, 0)")
    c.dedent()
    c("tl.store(ts_ptr + seg * (K * DV) + kv, carry_s, mask=kv_ok)  # the segment's total",
      "tl.store(tn_ptr + seg * K + offs_k, carry_n, mask=k_ok)")
    return header("gma_scan_bwd_chunks", "states entering each group of chunks, relative to "
                  "its segment",
                  v.describe(), config) + c.text()


def emit_queries(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    params = _params(v, ["ss_ptr", "sn_ptr", "qs_ptr", "qn_ptr",
                         "pa_ptr", "pb_ptr", "pc_ptr", *token_args("dq")])
    kernel_start(c, "gma_scan_bwd_q", params, _GRID)
    _head(c)
    token_base(c, "dq")
    _segment_state(c)
    _mixture_accumulators(c)
    c("acc_s = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)  # what the queries add to dL/dS",
      "acc_n = tl.zeros([BLOCK_K], dtype=tl.float32)",
      "carry_s = seg_s  # the state entering the chunk",
      "carry_n = seg_n")
    _loop(c)
    _chunk_start(c, v, queries=True)
    _chunk_reads(c, v, "carry_s", "carry_n")
    c("acc_s += tl.dot(tl.trans(rho), g, input_precision='ieee')  # sum_i rho_i dy_i^T",
      "acc_n -= tl.sum(zeta, 0)")
    _token_grad(c, "q", "rq", "drq")
    c("carry_s += tl.dot(tl.trans(w), vt, input_precision='ieee')",
      "carry_n += tl.sum(w, 0)")
    c.dedent()
    c("tl.store(qs_ptr + seg * (K * DV) + kv, acc_s, mask=kv_ok)",
      "tl.store(qn_ptr + seg * K + offs_k, acc_n, mask=k_ok)")
    _store_partials(c)
    return header("gma_scan_bwd_q", f"dq, and the queries' share of the state gradient ({v.norm} "
                  "norm)", v.describe(), config) + c.text()


def emit_keys(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    params = _params(v, ["rs_ptr", "rn_ptr", "ss_ptr", "sn_ptr", "gs_ptr", "gn_ptr", "xs_ptr",
                         "xn_ptr", "pa_ptr", "pb_ptr", "pc_ptr", *token_args("dk"),
                         *token_args("dv")])
    kernel_start(c, "gma_scan_bwd_k", params, _GRID)
    _head(c)
    for t in ("dk", "dv"):
        token_base(c, t)
    _segment_state(c)
    _mixture_accumulators(c)
    c("q_next = tl.load(gs_ptr + seg * (K * DV) + kv, mask=kv_ok, other=0.0)  # dL/dS leaving",
      "n_next = tl.load(gn_ptr + seg * K + offs_k, mask=k_ok, other=0.0)")
    c("scratch = (p * BH + bh64) * GROUP  # this program's GROUP states entering chunks",
      "for step in range(0, (hi - lo) // GROUP):")
    c.indent()
    c("g0 = hi - GROUP * (step + 1)  # the group's first chunk")
    _at_chunk(c, "g0")
    c("s_cur = seg_s + tl.load(rs_ptr + state * (K * DV) + kv, mask=kv_ok, other=0.0)",
      "n_cur = seg_n + tl.load(rn_ptr + state * K + offs_k, mask=k_ok, other=0.0)",
      "tl.store(xs_ptr + scratch * (K * DV) + kv, s_cur, mask=kv_ok)",
      "tl.store(xn_ptr + scratch * K + offs_k, n_cur, mask=k_ok)",
      "for j in range(0, GROUP - 1):  # the states entering the group's later chunks")
    c.indent()
    _at_chunk(c, "g0 + j")
    _chunk_start(c, v, queries=False)
    c("s_cur += tl.dot(tl.trans(w), vt, input_precision='ieee')",
      "n_cur += tl.sum(w, 0)",
      "tl.store(xs_ptr + (scratch + j + 1) * (K * DV) + kv, s_cur, mask=kv_ok)",
      "tl.store(xn_ptr + (scratch + j + 1) * K + offs_k, n_cur, mask=k_ok)")
    c.dedent()
    c("tl.debug_barrier()  # the scratch written above is read by other threads below",
      "for jj in range(0, GROUP):")
    c.indent()
    c("j = GROUP - 1 - jj  # last chunk first: the state gradient flows backwards")
    _at_chunk(c, "g0 + j")
    _key_chunk(c, v, "tl.load(xs_ptr + (scratch + j) * (K * DV) + kv, mask=kv_ok, other=0.0)",
               "tl.load(xn_ptr + (scratch + j) * K + offs_k, mask=k_ok, other=0.0)")
    c.dedent()
    c("tl.debug_barrier()  # before the next group overwrites the scratch")
    c.dedent()
    _store_partials(c)
    return header("gma_scan_bwd_k", f"dk and dv, the state gradient carried backwards ({v.norm} "
                  "norm)", v.describe(), config) + c.text()
