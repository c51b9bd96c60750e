"""gma_write_fwd: responsibility + slot_write over the keys, one segment of N per program.

Must match ``oracle.responsibility`` and ``oracle.slot_write``: S_k = sum_j m_j r_jk v_j,
n_k = sum_j m_j r_jk, accumulated in float32.  Program (bh, p, dv block) sums
segment p; with several segments ``gma_reduce`` adds the partials in a fixed
order, so the result is deterministic.  The causal scan reuses this kernel for
the states its segments start from.
"""

from __future__ import annotations

from .prelude import (Code, common_prologue, dv_range, header, kernel_start, key_keep,
                      load_tokens, mixture_args, mixture_prologue, responsibilities, token_args,
                      token_base)
from .variant import Variant


def emit(v: Variant, config: dict) -> str:
    s = v.shape
    c = Code()
    c(*v.constants(), "", "")
    params = token_args("k") + token_args("v")
    if v.mask:
        params += ["mask_ptr", "mask_sb", "mask_sn"]
    params += mixture_args("mk", v.k_covariance)
    params += ["s_ptr", "s_sp", "s_sbh", "s_sk", "s_sdv", "n_ptr", "n_sp", "n_sbh", "n_sk",
               "N", "H", "SEG", "BLOCK_N: tl.constexpr"]
    kernel_start(c, "gma_write_fwd", params, "(B*H, segments, Dv blocks)")
    common_prologue(c, s)
    mixture_prologue(c, "mk", v.k_covariance, s)
    dv_range(c, s)
    token_base(c, "k")
    token_base(c, "v")
    c("acc = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)  # S of this segment",
      "n_acc = tl.zeros([BLOCK_K], dtype=tl.float32)",
      "p = tl.program_id(1)",
      "start = p * SEG",
      "end = tl.minimum(start + SEG, N)",
      "for n0 in range(start, end, BLOCK_N):")
    c.indent()
    c("offs_n = n0 + tl.arange(0, BLOCK_N)", "n_ok = offs_n < end", "rows = offs_n.to(tl.int64)")
    load_tokens(c, "k", s)
    responsibilities(c, "rk", "k", "mk", v.k_covariance, s)
    key_keep(c, v.mask)
    c("rk = tl.where(keep[:, None], rk, 0.0)  # masked keys write nothing",
      "vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, "
      "mask=n_ok[:, None] & dv_ok[None, :], other=0.0)",
      "acc = tl.dot(tl.trans(rk.to(DATA_DT)), vt.to(DATA_DT), acc, input_precision=DATA_PRECISION)",
      "n_acc += tl.sum(rk, 0)")
    c.dedent()
    c("out = s_ptr + p * s_sp + bh64 * s_sbh",
      "tl.store(out + offs_k[:, None] * s_sk + offs_dv[None, :] * s_sdv, acc, "
      "mask=k_ok[:, None] & dv_ok[None, :])",
      "if tl.program_id(2) == 0:")
    c.indent()
    c("tl.store(n_ptr + p * n_sp + bh64 * n_sbh + offs_k * n_sk, n_acc, mask=k_ok)")
    return header("gma_write_fwd", "responsibility + slot_write over keys", v.describe(),
                  config) + c.text()


def emit_reduce(v: Variant, config: dict) -> str:
    """gma_reduce: (S, n) = sum over segments of the partials, in segment order."""
    s = v.shape
    c = Code()
    c(*v.constants(), "", "")
    params = ["ps_ptr", "pn_ptr", "s_ptr", "s_sbh", "s_sk", "s_sdv", "n_ptr", "n_sbh", "n_sk",
              "H", "BH", "NSEG"]
    kernel_start(c, "gma_reduce", params, "(B*H, 1, Dv blocks)")
    c("offs_k = tl.arange(0, BLOCK_K)", "k_ok = offs_k < K")
    dv_range(c, s)
    c("acc = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)",
      "n_acc = tl.zeros([BLOCK_K], dtype=tl.float32)",
      "tile = offs_k[:, None] * DV + offs_dv[None, :]",
      "for p in range(0, NSEG):")
    c.indent()
    c("base = (p * BH + bh64) * (K * DV)",
      "acc += tl.load(ps_ptr + base + tile, mask=k_ok[:, None] & dv_ok[None, :], other=0.0)",
      "n_acc += tl.load(pn_ptr + (p * BH + bh64) * K + offs_k, mask=k_ok, other=0.0)")
    c.dedent()
    c("tl.store(s_ptr + bh64 * s_sbh + offs_k[:, None] * s_sk + offs_dv[None, :] * s_sdv, acc, "
      "mask=k_ok[:, None] & dv_ok[None, :])",
      "if tl.program_id(2) == 0:")
    c.indent()
    c("tl.store(n_ptr + bh64 * n_sbh + offs_k * n_sk, n_acc, mask=k_ok)")
    return header("gma_reduce", "sum of per-segment slot memories", v.describe(), config) + c.text()
