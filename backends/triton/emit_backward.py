"""Backward kernels of bidirectional GMA: gma_read_bwd (queries) and gma_write_bwd (keys).

Must match ``oracle_grad.slot_read_vjp`` + ``responsibility_vjp`` (queries) and
``oracle_grad.slot_write_vjp`` + ``responsibility_vjp`` (keys).  Both recompute
the responsibilities from the tokens (nothing of size N x K was saved) and take
the mixture as dense coefficients A, Bm [H, K, D] and c [H, K] of the expanded
logits, built by the caller for any covariance, centred over k and scaled to
base 2 (see ``backward.coefficients``).  With dl = r * (dR - rowsum(dR * r))
(softmax backward, natural log units):

    dx = 2 x * (dl @ A) + dl @ Bm          dA += dl^T (x * x)   dBm += dl^T x   dc += sum dl

Row sums of dl are zero, so centring A and Bm over k changes none of these.
Queries (row norm, u_i = r_i . n + eps, G = dy):
    dS += r^T (G / u)    dn -= r^T ((G . y) / u)    dR = (G / u) S^T - ((G . y) / u) n^T
Queries (slot norm, y = r (S / (n + eps))):  dSn += r^T G,  dR = G (S / (n + eps))^T;
the caller turns dSn into dS and dn.
Keys (dS, dn the full memory gradient):  dv = r dS,  dR = v dS^T + dn  (masked keys: 0).

Each program sweeps one segment of N and writes its partial sums; the caller
adds the partials in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

from .prelude import LOG2E, Code, header, kernel_start, key_keep, token_args, token_base
from .variant import Variant

COEF_ARGS = ["a_ptr", "b_ptr", "c_ptr"]  # contiguous [H, K, D], [H, K, D], [H, K] float32


def _constants(v: Variant) -> list[str]:
    s = v.shape
    logit_prec = v.precision or ("tf32x3" if v.wide else "ieee")
    data_prec = "tf32" if v.wide else (v.precision or "ieee")
    return [f"D = tl.constexpr({s.D})", f"DV = tl.constexpr({s.Dv})", f"K = tl.constexpr({s.K})",
            f"BLOCK_D = tl.constexpr({s.block_d})", f"BLOCK_DV = tl.constexpr({s.block_dv})",
            f"BLOCK_K = tl.constexpr({s.block_k})", f"EPS = tl.constexpr({float(v.eps)!r})",
            f"INV_LOG2E = tl.constexpr({1.0 / LOG2E!r})",
            f'LOGIT_PRECISION = tl.constexpr("{logit_prec}")',
            f'DATA_PRECISION = tl.constexpr("{data_prec}")']


def coefficient_loads(c: Code) -> None:
    """Index vectors and the head's coefficients, transposed to [BLOCK_D, BLOCK_K]."""
    c("offs_k = tl.arange(0, BLOCK_K)", "k_ok = offs_k < K",
      "offs_d = tl.arange(0, BLOCK_D)", "d_ok = offs_d < D",
      "offs_dv = tl.arange(0, BLOCK_DV)", "dv_ok = offs_dv < DV",
      "dk_ok = d_ok[:, None] & k_ok[None, :]",
      "coef = h64 * (K * D) + offs_k[None, :] * D + offs_d[:, None]",
      "a2 = tl.load(a_ptr + coef, mask=dk_ok, other=0.0)  # [BLOCK_D, BLOCK_K], base 2",
      "b2 = tl.load(b_ptr + coef, mask=dk_ok, other=0.0)",
      "c2 = tl.load(c_ptr + h64 * K + offs_k, mask=k_ok, other=float('-inf'))")


def responsibilities(c: Code, t: str, x: str, r: str) -> None:
    """``{x}`` [BLOCK_N, BLOCK_D] float32 rows of token tensor ``t`` and their
    responsibilities ``{r}`` (rows ``rows``, valid ``n_ok``)."""
    c(f"{x} = tl.load({t}_base + rows[:, None] * {t}_sn + offs_d[None, :] * {t}_sd, "
      "mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]",
      f"{r} = tl.dot({x} * {x}, a2, input_precision=LOGIT_PRECISION) + tl.dot({x}, b2, "
      "input_precision=LOGIT_PRECISION) + c2[None, :]  # logits, base 2",
      f"{r} = tl.exp2({r} - tl.max({r}, 1)[:, None])",
      f"{r} = {r} * (1.0 / tl.sum({r}, 1))[:, None]")


def _prologue(c: Code) -> None:
    """Coefficients, the mixture sums of this program, and its segment of N."""
    coefficient_loads(c)
    c("acc_a = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)  # dL/dA of this segment",
      "acc_b = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)",
      "acc_c = tl.zeros([BLOCK_K], dtype=tl.float32)",
      "p = tl.program_id(1)", "start = p * SEG", "end = tl.minimum(start + SEG, N)")


def _tile_start(c: Code, t: str) -> None:
    """Rows of this tile, the token tile ``x`` and its responsibilities ``r``."""
    c("offs_n = n0 + tl.arange(0, BLOCK_N)", "n_ok = offs_n < end", "rows = offs_n.to(tl.int64)")
    responsibilities(c, t, "x", "r")
    c("xx = x * x")


def _tile_end(c: Code, t: str) -> None:
    """Softmax backward of ``dr``, the token gradient, the mixture sums."""
    c("dl = r * (dr - tl.sum(dr * r, 1)[:, None])  # natural-log logits",
      "dl = tl.where(k_ok[None, :], dl, 0.0)",
      "dx = (2.0 * x * tl.dot(dl, tl.trans(a2), input_precision=DATA_PRECISION) + "
      "tl.dot(dl, tl.trans(b2), input_precision=DATA_PRECISION)) * INV_LOG2E",
      f"tl.store(d{t}_base + rows[:, None] * d{t}_sn + offs_d[None, :] * d{t}_sd, "
      f"dx.to(d{t}_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])",
      "acc_a += tl.dot(tl.trans(dl), xx, input_precision=DATA_PRECISION)",
      "acc_b += tl.dot(tl.trans(dl), x, input_precision=DATA_PRECISION)",
      "acc_c += tl.sum(dl, 0)")


def _store_partials(c: Code) -> None:
    c("part = p * BH + bh64",
      "kd = offs_k[:, None] * D + offs_d[None, :]",
      "kd_ok = k_ok[:, None] & d_ok[None, :]",
      "tl.store(pa_ptr + part * (K * D) + kd, acc_a, mask=kd_ok)",
      "tl.store(pb_ptr + part * (K * D) + kd, acc_b, mask=kd_ok)",
      "tl.store(pc_ptr + part * K + offs_k, acc_c, mask=k_ok)")


def emit_read(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    params = (token_args("q") + token_args("dy") + token_args("dq") + COEF_ARGS
              + ["s_ptr", "n_ptr", "ps_ptr", "pn_ptr", "pa_ptr", "pb_ptr", "pc_ptr",
                 "N", "H", "BH", "SEG", "BLOCK_N: tl.constexpr"])
    kernel_start(c, "gma_read_bwd", params, "(B*H, segments)")
    _prologue(c)
    c("kv = offs_k[:, None] * DV + offs_dv[None, :]",
      "kv_ok = k_ok[:, None] & dv_ok[None, :]",
      "mem = tl.load(s_ptr + bh64 * (K * DV) + kv, mask=kv_ok, other=0.0)  # [BLOCK_K, BLOCK_DV]",
      "nk = tl.load(n_ptr + bh64 * K + offs_k, mask=k_ok, other=0.0)")
    if v.norm == "slot":
        c("mem = mem * tl.where(k_ok, 1.0 / (nk + EPS), 0.0)[:, None]  # S / (n + eps)")
    c("acc_s = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)",
      "acc_n = tl.zeros([BLOCK_K], dtype=tl.float32)")
    for t in ("q", "dy", "dq"):
        token_base(c, t)
    c("for n0 in range(start, end, BLOCK_N):")
    c.indent()
    _tile_start(c, "q")
    c("r = tl.where(n_ok[:, None], r, 0.0)",
      "g = tl.load(dy_base + rows[:, None] * dy_sn + offs_dv[None, :] * dy_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # dL/dy")
    if v.norm == "row":
        c("u = tl.sum(r * nk[None, :], 1) + EPS",
          "y = tl.dot(r, mem, input_precision=DATA_PRECISION) / u[:, None]",
          "gu = g / u[:, None]",
          "gy = tl.sum(g * y, 1) / u",
          "acc_s += tl.dot(tl.trans(r), gu, input_precision=DATA_PRECISION)",
          "acc_n -= tl.sum(r * gy[:, None], 0)",
          "dr = tl.dot(gu, tl.trans(mem), input_precision=DATA_PRECISION) - gy[:, None] * nk[None, :]")
    else:
        c("acc_s += tl.dot(tl.trans(r), g, input_precision=DATA_PRECISION)  # dL/d(S / (n + eps))",
          "dr = tl.dot(g, tl.trans(mem), input_precision=DATA_PRECISION)")
    _tile_end(c, "q")
    c.dedent()
    c("tl.store(ps_ptr + (p * BH + bh64) * (K * DV) + kv, acc_s, mask=kv_ok)",
      "tl.store(pn_ptr + (p * BH + bh64) * K + offs_k, acc_n, mask=k_ok)")
    _store_partials(c)
    return header("gma_read_bwd", f"gradients through slot_read ({v.norm} norm) and the query "
                  "responsibilities", v.describe(), config) + c.text()


def emit_write(v: Variant, config: dict) -> str:
    c = Code()
    c(*_constants(v), "", "")
    params = token_args("k") + token_args("v") + token_args("dk") + token_args("dv")
    if v.mask:
        params += ["mask_ptr", "mask_sb", "mask_sn"]
    params += COEF_ARGS + ["ds_ptr", "dn_ptr", "pa_ptr", "pb_ptr", "pc_ptr",
                           "N", "H", "BH", "SEG", "BLOCK_N: tl.constexpr"]
    kernel_start(c, "gma_write_bwd", params, "(B*H, segments)")
    _prologue(c)
    c("kv = offs_k[:, None] * DV + offs_dv[None, :]",
      "dmem = tl.load(ds_ptr + bh64 * (K * DV) + kv, mask=k_ok[:, None] & dv_ok[None, :], "
      "other=0.0)  # dL/dS [BLOCK_K, BLOCK_DV]",
      "dnk = tl.load(dn_ptr + bh64 * K + offs_k, mask=k_ok, other=0.0)  # dL/dn")
    for t in ("k", "v", "dk", "dv"):
        token_base(c, t)
    c("for n0 in range(start, end, BLOCK_N):")
    c.indent()
    _tile_start(c, "k")
    key_keep(c, v.mask)
    c("r = tl.where(keep[:, None], r, 0.0)  # masked keys wrote nothing",
      "vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)",
      "gv = tl.dot(r, dmem, input_precision=DATA_PRECISION)  # dL/dv",
      "tl.store(dv_base + rows[:, None] * dv_sn + offs_dv[None, :] * dv_sd, "
      "gv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])",
      "dr = tl.dot(vt, tl.trans(dmem), input_precision=DATA_PRECISION) + dnk[None, :]")
    _tile_end(c, "k")
    c.dedent()
    _store_partials(c)
    return header("gma_write_bwd", "gradients through slot_write and the key responsibilities",
                  v.describe(), config) + c.text()
