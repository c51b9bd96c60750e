"""gma_read_fwd: responsibility + slot_read over the queries.

Must match ``oracle.responsibility`` and ``oracle.slot_read``:
row:  y_i = sum_k r_ik S_k / (sum_k r_ik n_k + eps);  slot: y_i = sum_k r_ik S_k / (n_k + eps).
Program (bh, p, dv block) loads the memory once and sweeps segment p of the queries.
"""

from __future__ import annotations

from .prelude import (Code, common_prologue, dv_range, header, kernel_start, load_tokens,
                      mixture_args, mixture_prologue, responsibilities, token_args, token_base)
from .variant import Variant


def emit(v: Variant, config: dict) -> str:
    s = v.shape
    c = Code()
    c(*v.constants(), "", "")
    params = token_args("q") + mixture_args("mq", v.q_covariance)
    params += ["s_ptr", "s_sb", "s_sh", "s_sk", "s_sdv", "n_ptr", "n_sb", "n_sh", "n_sk"]
    params += token_args("y") + ["N", "H", "SEG", "BLOCK_N: tl.constexpr"]
    kernel_start(c, "gma_read_fwd", params, "(B*H, segments, Dv blocks)")
    common_prologue(c, s)
    mixture_prologue(c, "mq", v.q_covariance, s)
    dv_range(c, s)
    c("mem = tl.load(s_ptr + b64 * s_sb + h64 * s_sh + offs_k[:, None] * s_sk + offs_dv[None, :]"
      " * s_sdv, mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_DV]",
      "nk = tl.load(n_ptr + b64 * n_sb + h64 * n_sh + offs_k * n_sk, mask=k_ok, other=0.0)"
      ".to(tl.float32)",
      "mem_op = mem.to(WIDE_DT)")
    if v.norm == "slot":
        c("inv_n = tl.where(k_ok, 1.0 / (tl.where(k_ok, nk, 1.0) + EPS), 0.0)  # slot norm: 1 / (n_k + eps)")
    token_base(c, "q")
    token_base(c, "y")
    c("p = tl.program_id(1)",
      "start = p * SEG",
      "end = tl.minimum(start + SEG, N)",
      "for n0 in range(start, end, BLOCK_N):")
    c.indent()
    c("offs_n = n0 + tl.arange(0, BLOCK_N)", "n_ok = offs_n < end", "rows = offs_n.to(tl.int64)")
    load_tokens(c, "q", s)
    responsibilities(c, "rq", "q", "mq", v.q_covariance, s)
    if v.norm == "row":
        c("num = tl.dot(rq.to(WIDE_DT), mem_op, input_precision=DATA_PRECISION)",
          "den = tl.sum(rq * nk[None, :], 1) + EPS",
          "y = num / den[:, None]")
    else:
        c("y = tl.dot((rq * inv_n[None, :]).to(WIDE_DT), mem_op, input_precision=DATA_PRECISION)")
    c("tl.store(y_base + rows[:, None] * y_sn + offs_dv[None, :] * y_sd, y.to(y_ptr.dtype.element_ty), "
      "mask=n_ok[:, None] & dv_ok[None, :])")
    return header("gma_read_fwd", f"responsibility + slot_read ({v.norm} norm) over queries",
                  v.describe(), config) + c.text()
