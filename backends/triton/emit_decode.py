"""gma_decode_fwd: a few new tokens (autoregressive decoding) against the carried state.

Must match ``oracle.causal_scan`` for small N.  Program (bh, dv block) keeps the
K x Dv state in registers and walks the tokens one at a time with
vector-matrix arithmetic in float32: no chunk, no tensor-core tile, cost
independent of the context length.
"""

from __future__ import annotations

from .prelude import (causal_inputs, causal_start, Code, header, kernel_start,
                      mixtures, token_args, token_base)
from .variant import Variant


def _logits(c: Code, out: str, t: str, m: str, cov: str, s) -> None:
    for i in range(s.d_chunks):
        mask = ", mask=d_ok{0}, other=0.0".format(i) if s.mask_d else ""
        c(f"{t}{i} = tl.load({t}_base + row * {t}_sn + offs_d{i} * {t}_sd{mask}).to(tl.float32)")
    terms = [f"{m}_c"]
    for i in range(s.d_chunks):
        terms.append(f"tl.sum({t}{i}[:, None] * {m}_b{i}, 0)")
        if cov == "diag":
            terms.append(f"tl.sum(({t}{i} * {t}{i})[:, None] * {m}_a{i}, 0)")
    c(f"{out} = " + " + ".join(terms))
    if cov == "spherical":
        xx = " + ".join(f"tl.sum({t}{i} * {t}{i}, 0)" for i in range(s.d_chunks))
        c(f"{out} += ({xx}) * {m}_asq")
    c(f"{out} = tl.exp2({out} - tl.max({out}, 0))", f"{out} = {out} / tl.sum({out}, 0)")


def emit(v: Variant, config: dict) -> str:
    s = v.shape
    mixes = mixtures(v)
    mq, mk = mixes[0][0], mixes[-1][0]
    c = Code()
    c(*v.constants(), "", "")
    params = causal_inputs(v)
    params += token_args("y") + ["st_ptr", "st_sbh", "st_sk", "st_sdv", "nt_ptr", "nt_sbh",
                                 "nt_sk", "N", "H"]
    kernel_start(c, "gma_decode_fwd", params, "(B*H, 1, Dv blocks)")
    causal_start(c, v, s)
    tile_ok = "k_ok[:, None] & dv_ok[None, :]"
    for t in ("q", "k", "v", "y"):
        token_base(c, t)
    c("for t in range(0, N):")
    c.indent()
    c("row = tl.zeros([], dtype=tl.int64) + t  # 64-bit token offset")
    _logits(c, "rq", "q", mq, v.q_covariance, s)
    _logits(c, "rk", "k", mk, v.k_covariance, s)
    if v.mask:
        c("rk = rk * (tl.load(mask_ptr + b64 * mask_sb + row * mask_sn) != 0).to(tl.float32)")
    c("vt = tl.load(v_base + row * v_sn + offs_dv * v_sd, mask=dv_ok, other=0.0).to(tl.float32)",
      "mem += rk[:, None] * vt[None, :]  # inclusive: token t sees itself",
      "nk += rk")
    if v.norm == "row":
        c("y = tl.sum(rq[:, None] * mem, 0) / (tl.sum(rq * nk, 0) + EPS)")
    else:
        c("y = tl.sum((rq * tl.where(k_ok, 1.0 / (tl.where(k_ok, nk, 1.0) + EPS), 0.0))[:, None] * mem, 0)")
    c("tl.store(y_base + row * y_sn + offs_dv * y_sd, y.to(y_ptr.dtype.element_ty), mask=dv_ok)")
    c.dedent()
    c(f"tl.store(st_ptr + bh64 * st_sbh + offs_k[:, None] * st_sk + offs_dv[None, :] * st_sdv, "
      f"mem, mask={tile_ok})",
      "if tl.program_id(2) == 0:")
    c.indent()
    c("tl.store(nt_ptr + bh64 * nt_sbh + offs_k * nt_sk, nk, mask=k_ok)")
    return header("gma_decode_fwd", f"causal decoding step(s) ({v.norm} norm)", v.describe(),
                  config) + c.text()
