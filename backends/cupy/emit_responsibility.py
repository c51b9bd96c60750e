"""gma_responsibility_fwd: R [B, N, H, K] (float32) for ``gmagen.responsibilities``.

Must match ``oracle.responsibility``.  Block (token tile, b*h) computes the
responsibilities of BLOCK_N rows and stores them through R's strides.  With
``mma=1`` (16-bit tokens) the logits are 3xTF32 tensor-core products (mma.py).
"""

from __future__ import annotations

from .mixture import coefficient_params, mixture_setup, responsibilities
from .prelude import (Code, Emitted, Tiles, Variant, bh_indices, finish, kernel_open, min_blocks,
                      smem_declare, token_base, token_params)


def emit(v: Variant, t: Tiles, config: dict) -> Emitted:
    c = Code()
    params = (token_params("q") + coefficient_params("mq", v.q_covariance)
              + ["float* __restrict__ r_ptr", "long long r_sb", "long long r_sn", "long long r_sh",
                 "long long r_sk", "long long N", "int H"])
    kernel_open(c, "gma_responsibility_fwd", params, "(token tiles, B*H)", min_blocks(v, t))
    smem_declare(c, v, t)
    bh_indices(c, "y")
    c("const long long n0 = (long long)blockIdx.x * BLOCK_N;", "const long long end = N;")
    token_base(c, "q", vec=bool(t.mma))
    mixture_setup(c, "mq", v.q_covariance, vec=bool(t.mma))
    responsibilities(c, "rq_s", "q", "mq", v.q_covariance, keep="", mma=bool(t.mma),
                     sizes=(t.num_threads, t.block_n, v.K))
    c.open("for (int idx = tid; idx < BLOCK_N * K; idx += THREADS)")
    c("const int i = idx / K, k = idx % K;", "const long long row = n0 + i;",
      "if (row < N) r_ptr[b * r_sb + h * r_sh + row * r_sn + k * r_sk] = rq_s[i * KP + k];")
    c.close()
    c.close()
    return finish(c, "gma_responsibility_fwd", "responsibility of each token", v, t, config)
