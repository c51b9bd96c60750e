"""gma_scan_fwd: the causal program as one chunked scan; responsibilities on the fly.

Must match ``oracle.responsibility`` and ``oracle.causal_scan``: query i reads
S(i) = S0 + sum_{j<=i} m_j r_jk v_j and n(i) likewise.  Program (bh, p, dv
block) owns segment p of the sequence.  It starts from the initial state plus
the partial memories of segments 0..p-1 (``gma_write_fwd``, summed in order),
then walks its segment in chunks of BLOCK_N tokens: a masked BLOCK_N x BLOCK_N
product inside the chunk, the carried K x Dv state across chunks.  R is never
written to memory.  The last segment writes the final state.
"""

from __future__ import annotations

from .prelude import (causal_inputs, causal_start, Code, header, kernel_start, key_keep,
                      load_tokens, mixtures, responsibilities,
                      token_args, token_base)
from .variant import Variant


def emit(v: Variant, config: dict) -> str:
    s = v.shape
    mixes = mixtures(v)
    mq = mixes[0][0]
    mk = mixes[-1][0]
    c = Code()
    c(*v.constants(), "", "")
    params = causal_inputs(v)
    params += ["ps_ptr", "pn_ptr"] + token_args("y")
    params += ["st_ptr", "st_sbh", "st_sk", "st_sdv", "nt_ptr", "nt_sbh", "nt_sk",
               "N", "H", "BH", "SEG", "BLOCK_N: tl.constexpr"]
    kernel_start(c, "gma_scan_fwd", params, "(B*H, segments, Dv blocks)")
    causal_start(c, v, s)
    tile_ok = "k_ok[:, None] & dv_ok[None, :]"
    c("p = tl.program_id(1)",
      "# state entering segment p: add the earlier segments' memories in order (deterministic)",
      "for pp in range(0, p):")
    c.indent()
    c("part = (pp * BH + bh64)",
      f"mem += tl.load(ps_ptr + part * (K * DV) + offs_k[:, None] * DV + offs_dv[None, :], "
      f"mask={tile_ok}, other=0.0)",
      "nk += tl.load(pn_ptr + part * K + offs_k, mask=k_ok, other=0.0)")
    c.dedent()
    for t in ("q", "k", "v", "y"):
        token_base(c, t)
    c("offs_c = tl.arange(0, BLOCK_N)",
      "causal = offs_c[:, None] >= offs_c[None, :]  # key j <= query i inside the chunk",
      "start = p * SEG",
      "end = tl.minimum(start + SEG, N)",
      "for n0 in range(start, end, BLOCK_N):")
    c.indent()
    c("offs_n = n0 + offs_c", "n_ok = offs_n < end", "rows = offs_n.to(tl.int64)")
    load_tokens(c, "q", s)
    responsibilities(c, "rq", "q", mq, v.q_covariance, s)
    load_tokens(c, "k", s)
    responsibilities(c, "rk", "k", mk, v.k_covariance, s)
    key_keep(c, v.mask)
    c("rk = tl.where(keep[:, None], rk, 0.0)  # masked keys write nothing",
      "vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(DATA_DT)")
    if v.norm == "row":
        c("att = tl.dot(rq.to(DATA_DT), tl.trans(rk.to(DATA_DT)), input_precision=DATA_PRECISION)",
          "att = tl.where(causal, att, 0.0)  # [BLOCK_N, BLOCK_N]",
          "num = tl.dot(att.to(DATA_DT), vt, input_precision=DATA_PRECISION)",
          "num = tl.dot(rq.to(WIDE_DT), mem.to(WIDE_DT), num, input_precision=DATA_PRECISION)",
          "den = tl.sum(att, 1) + tl.sum(rq * nk[None, :], 1) + EPS",
          "y = num / den[:, None]")
    else:
        c("n_incl = nk[None, :] + tl.cumsum(rk, 0)  # n_k(i), inclusive",
          "w = rq * tl.where(k_ok[None, :], 1.0 / (tl.where(k_ok[None, :], n_incl, 1.0) + EPS), 0.0)  # slot norm weights",
          "att = tl.dot(w.to(WIDE_DT), tl.trans(rk.to(WIDE_DT)), input_precision=DATA_PRECISION)",
          "att = tl.where(causal, att, 0.0)",
          "y = tl.dot(att.to(WIDE_DT), vt.to(WIDE_DT), input_precision=DATA_PRECISION)",
          "y = tl.dot(w.to(WIDE_DT), mem.to(WIDE_DT), y, input_precision=DATA_PRECISION)")
    c("tl.store(y_base + rows[:, None] * y_sn + offs_dv[None, :] * y_sd, "
      "y.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])",
      "mem = tl.dot(tl.trans(rk.to(DATA_DT)), vt, mem, input_precision=DATA_PRECISION)",
      "nk += tl.sum(rk, 0)")
    c.dedent()
    c("if p == tl.num_programs(1) - 1:")
    c.indent()
    c(f"tl.store(st_ptr + bh64 * st_sbh + offs_k[:, None] * st_sk + offs_dv[None, :] * st_sdv, "
      f"mem, mask={tile_ok})",
      "if tl.program_id(2) == 0:")
    c.indent()
    c("tl.store(nt_ptr + bh64 * nt_sbh + offs_k * nt_sk, nk, mask=k_ok)")
    return header("gma_scan_fwd", f"causal chunked scan ({v.norm} norm)", v.describe(),
                  config) + c.text()
