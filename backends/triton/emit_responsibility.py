"""gma_responsibility_fwd: R [B, N, H, K] for ``gmagen.responsibilities``.

Must match ``oracle.responsibility``.
"""

from __future__ import annotations

from .prelude import (Code, common_prologue, header, kernel_start, load_tokens, mixture_args,
                      mixture_prologue, responsibilities, token_args, token_base)
from .variant import Variant


def emit(v: Variant, config: dict) -> str:
    s = v.shape
    c = Code()
    c(*v.constants(), "", "")
    params = (token_args("q") + mixture_args("mq", v.q_covariance)
              + ["r_ptr", "r_sb", "r_sn", "r_sh", "r_sk", "N", "H", "BLOCK_N: tl.constexpr"])
    kernel_start(c, "gma_responsibility_fwd", params, "(B*H, token blocks)")
    common_prologue(c, s)
    mixture_prologue(c, "mq", v.q_covariance, s)
    token_base(c, "q")
    c("offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)",
      "n_ok = offs_n < N",
      "rows = offs_n.to(tl.int64)")
    load_tokens(c, "q", s)
    responsibilities(c, "rq", "q", "mq", v.q_covariance, s)
    c("tl.store(r_ptr + b64 * r_sb + h64 * r_sh + rows[:, None] * r_sn + offs_k[None, :] * r_sk, "
      "rq, mask=n_ok[:, None] & k_ok[None, :])")
    return header("gma_responsibility_fwd", "responsibility of each token", v.describe(),
                  config) + c.text()
