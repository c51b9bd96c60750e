"""Backward kernels of causal GMA, one program per chunk of C = BLOCK_N tokens.

Must match ``oracle_grad.causal_scan_vjp`` + ``responsibility_vjp``.  Three kernels:

  gma_scan_bwd_chunks  per chunk: sum_j w_j v_j^T and sum_j w_j (w = m r_k), whose
                       exclusive prefix (plus S0) is the state entering each chunk
  gma_scan_bwd_state   per chunk: what its queries add to the gradient of the state,
                       sum_i rho_i dy_i^T and -sum_i zeta_i (see below); their
                       exclusive suffix (plus the final state's cotangent) is the
                       gradient of the state leaving each chunk
  gma_scan_bwd         per chunk: dq, dk, dv and the chunk's mixture sums

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
    return params + COEF_ARGS + extra + ["N", "H", "BH", "NCH", "CPS", "BLOCK_N: tl.constexpr"]


def _head(c: Code) -> None:
    """Indices and the head's coefficients; then the loop over this program's chunks
    (CPS chunks per program, so per-program partial sums stay few)."""
    coefficient_loads(c)
    c("kv = offs_k[:, None] * DV + offs_dv[None, :]",
      "kv_ok = k_ok[:, None] & dv_ok[None, :]",
      "ii = tl.arange(0, BLOCK_N)",
      "tri = (ii[:, None] >= ii[None, :]).to(tl.float32)  # M_ij = [i >= j]",
      "p = tl.program_id(1)")
    for t in ("q", "k", "v", "dy"):
        token_base(c, t)


def _loop(c: Code) -> None:
    c("for ch in range(p * CPS, tl.minimum(p * CPS + CPS, NCH)):")
    c.indent()
    c("ch64 = tl.zeros([], dtype=tl.int64) + ch  # (the interpreter hands out Python ints)",
      "offs_n = ch * BLOCK_N + tl.arange(0, BLOCK_N)",
      "n_ok = offs_n < N",
      "rows = offs_n.to(tl.int64)",
      "state = ch64 * BH + bh64  # row of the per-chunk state arrays")


def _chunk_start(c: Code, v: Variant, queries: bool) -> None:
    """The chunk's w = m r_k and v (and r_q)."""
    for t, r in (("k", "rk"),) + ((("q", "rq"),) if queries else ()):
        responsibilities(c, t, f"x{t}", r)
    key_keep(c, v.mask)
    c("w = tl.where(keep[:, None], rk, 0.0)  # [BLOCK_N, BLOCK_K], what each key writes",
      "vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)")


def _chunk_reads(c: Code, v: Variant) -> None:
    """The queries' read of the inclusive state: rho, zeta, dRq (module docstring)."""
    c("rq = tl.where(n_ok[:, None], rq, 0.0)",
      "g = tl.load(dy_base + rows[:, None] * dy_sn + offs_dv[None, :] * dy_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # dL/dy",
      "s_in = tl.load(sin_ptr + state * (K * DV) + kv, mask=kv_ok, other=0.0)",
      "n_in = tl.load(nin_ptr + state * K + offs_k, mask=k_ok, other=0.0)",
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


def _grid_doc() -> str:
    return "(B*H, programs of CPS chunks)"


def emit_chunks(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    kernel_start(c, "gma_scan_bwd_chunks", _params(v, ["cs_ptr", "cn_ptr"]), _grid_doc())
    _head(c)
    _loop(c)
    _chunk_start(c, v, queries=False)
    c("tl.store(cs_ptr + state * (K * DV) + kv, tl.dot(tl.trans(w), vt, "
      "input_precision='ieee'), mask=kv_ok)",
      "tl.store(cn_ptr + state * K + offs_k, tl.sum(w, 0), mask=k_ok)")
    return header("gma_scan_bwd_chunks", "per-chunk slot_write sums (states entering each "
                  "chunk)", v.describe(), config) + c.text()


def emit_state(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    kernel_start(c, "gma_scan_bwd_state", _params(v, ["sin_ptr", "nin_ptr", "qs_ptr", "qn_ptr"]),
                 _grid_doc())
    _head(c)
    _loop(c)
    _chunk_start(c, v, queries=True)
    _chunk_reads(c, v)
    c("tl.store(qs_ptr + state * (K * DV) + kv, tl.dot(tl.trans(rho), g, "
      "input_precision='ieee'), mask=kv_ok)  # sum_i rho_i dy_i^T",
      "tl.store(qn_ptr + state * K + offs_k, -tl.sum(zeta, 0), mask=k_ok)")
    return header("gma_scan_bwd_state", f"per-chunk state gradient from the queries ({v.norm} "
                  "norm)", v.describe(), config) + c.text()


def emit_grads(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    params = _params(v, ["sin_ptr", "nin_ptr", "gs_ptr", "gn_ptr", "pa_ptr", "pb_ptr", "pc_ptr",
                         *token_args("dq"), *token_args("dk"), *token_args("dv")])
    kernel_start(c, "gma_scan_bwd", params, _grid_doc())
    _head(c)
    for t in ("dq", "dk", "dv"):
        token_base(c, t)
    c("acc_a = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)  # mixture sums of this program",
      "acc_b = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)",
      "acc_c = tl.zeros([BLOCK_K], dtype=tl.float32)")
    _loop(c)
    _chunk_start(c, v, queries=True)
    _chunk_reads(c, v)
    c("q_next = tl.load(gs_ptr + state * (K * DV) + kv, mask=kv_ok, other=0.0)  # dL/dS leaving",
      "n_next = tl.load(gn_ptr + state * K + offs_k, mask=k_ok, other=0.0)",
      "aff_rho = tl.dot(rho, tl.trans(w), input_precision=DATA_PRECISION) * tri  # rho_i . w_j",
      "gv = tl.dot(tl.trans(aff_rho), g, input_precision=DATA_PRECISION) + "
      "tl.dot(w, q_next, input_precision=DATA_PRECISION)",
      "tl.store(dv_base + rows[:, None] * dv_sn + offs_dv[None, :] * dv_sd, "
      "gv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])",
      "dw = (tl.dot(vt, tl.trans(q_next), input_precision=DATA_PRECISION) + n_next[None, :]"
      " + tl.dot(tl.trans(pv), rho, input_precision=DATA_PRECISION)"
      " - tl.dot(tl.trans(tri), zeta, input_precision='ieee'))",
      "drk = tl.where(keep[:, None], dw, 0.0)  # through w = m r_k")
    for t, r, dr in (("q", "rq", "drq"), ("k", "rk", "drk")):
        c(f"dl = {r} * ({dr} - tl.sum({dr} * {r}, 1)[:, None])",
          "dl = tl.where(k_ok[None, :] & n_ok[:, None], dl, 0.0)",
          f"dx = (2.0 * x{t} * tl.dot(dl, tl.trans(a2), input_precision=DATA_PRECISION) + "
          "tl.dot(dl, tl.trans(b2), input_precision=DATA_PRECISION)) * INV_LOG2E",
          f"tl.store(d{t}_base + rows[:, None] * d{t}_sn + offs_d[None, :] * d{t}_sd, "
          f"dx.to(d{t}_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])",
          f"acc_a += tl.dot(tl.trans(dl), x{t} * x{t}, input_precision=DATA_PRECISION)",
          f"acc_b += tl.dot(tl.trans(dl), x{t}, input_precision=DATA_PRECISION)",
          "acc_c += tl.sum(dl, 0)")
    c.dedent()
    _store_partials(c)
    return header("gma_scan_bwd", f"gradients through causal_scan ({v.norm} norm) and both "
                  "responsibilities", v.describe(), config) + c.text()
