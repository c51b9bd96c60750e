"""gma_read_fwd: responsibility + slot_read over the queries.

Must match ``oracle.responsibility`` and ``oracle.slot_read``:
row:  y_i = sum_k r_ik S_k / (sum_k r_ik n_k + eps);  slot: y_i = sum_k r_ik S_k / (n_k + eps).
Block (b*h, p, Dv block) loads the memory tile S [K, BLOCK_DV] and n [K] once
and sweeps segment p of the queries.

Tensor cores (``mma=1``, mma.py): the logits as 3xTF32 MMAs, and y = w S with
both operands in bfloat16 (W): S_w, the memory rounded once per block, and
rq_w = r (row norm) or r / (n + eps) (slot norm, up to 1/eps: float16 would
overflow), float32 accumulation into y_s; the row norm's denominator stays a
float32 sum of the float32 responsibilities.
"""

from __future__ import annotations

from .mixture import coefficient_params, mixture_setup, responsibilities
from .mma import Operand, Term, product
from .prelude import (Code, Emitted, Tiles, Variant, bh_indices, finish, kernel_open, min_blocks,
                      segment_range, smem_declare, store_y_tile, token_base, token_params)


def kernel_params(v: Variant) -> list[str]:
    """gma_read_fwd's parameters (lower.py passes them by name), for every path."""
    params = token_params("q") + coefficient_params("mq", v.q_covariance)
    params += ["const A_t* __restrict__ s_ptr", "long long s_sb", "long long s_sh", "long long s_sk",
               "long long s_sdv", "const A_t* __restrict__ n_ptr", "long long n_sb",
               "long long n_sh", "long long n_sk"]
    return params + token_params("y", const=False) + ["long long N", "int H", "long long SEG"]


def emit(v: Variant, t: Tiles, config: dict) -> Emitted:
    if t.mma == 2:  # register fragments (frag.py)
        from . import emit_read_frag

        return emit_read_frag.emit(v, t, config)
    c = Code()
    mma = bool(t.mma)
    kernel_open(c, "gma_read_fwd", kernel_params(v), "(B*H, segments, Dv blocks)", min_blocks(v, t))
    smem_declare(c, v, t)
    bh_indices(c)
    segment_range(c)
    c("const int dv0 = blockIdx.z * BLOCK_DV;")
    token_base(c, "q", vec=mma)
    token_base(c, "y", const=False, vec=mma)
    mixture_setup(c, "mq", v.q_covariance, vec=mma)
    s_at = "s_ptr[b * s_sb + h * s_sh + k * s_sk + (long long)(dv0 + j) * s_sdv]"
    if mma:
        c("// the memory of (b, h): S_w [KPAD, BLOCK_DV] in W (MMA operand; zero rows k >= K), "
          "n_s [K]")
        c.open("for (int idx = tid; idx < KPAD * BLOCK_DV; idx += THREADS)")
        c("const int k = idx / BLOCK_DV, j = idx % BLOCK_DV;",
          f"S_w[k * BDH + j] = cvt_W(k < K && dv0 + j < DV ? to_f({s_at}) : 0.f);")
        c.close()
    else:
        c("// the memory of (b, h): S_s [K, BLOCK_DV], n_s [K]")
        c.open("for (int idx = tid; idx < K * BLOCK_DV; idx += THREADS)")
        c("const int k = idx / BLOCK_DV, j = idx % BLOCK_DV;",
          f"S_s[idx] = dv0 + j < DV ? to_f({s_at}) : 0.f;")
        c.close()
    c("for (int k = tid; k < K; k += THREADS) n_s[k] = to_f(n_ptr[b * n_sb + h * n_sh + k * n_sk]);")
    c.open("for (long long n0 = start; n0 < end; n0 += BLOCK_N)")
    copies = (("rq_w", "cvt_W"),) if mma and v.norm == "row" else ()
    # row norm: den_i = sum_k r_ik n_k + eps, in the softmax's last pass (n_s was loaded
    # before the token loop; the softmax is preceded by barriers)
    responsibilities(c, "rq_s", "q", "mq", v.q_covariance, keep="", mma=mma, copies=copies,
                     sizes=(t.num_threads, t.block_n, v.K), den=v.norm == "row")
    if v.norm == "slot" and mma:
        c("// slot norm: weights r_ik / (n_k + eps) into rq_w (W; zero columns k >= K)")
        c.open("for (int idx = tid; idx < BLOCK_N * KPAD; idx += THREADS)")
        c("const int i = idx / KPAD, k = idx % KPAD;",
          "rq_w[i * KH + k] = cvt_W(k < K ? rq_s[i * KP + k] * (1.f / (n_s[k] + EPS)) : 0.f);")
        c.close()
    elif v.norm == "slot":
        c("// slot norm: weights r_ik / (n_k + eps)")
        c.open("for (int idx = tid; idx < BLOCK_N * K; idx += THREADS)")
        c("const int i = idx / K, k = idx % K;",
          "rq_s[i * KP + k] *= 1.f / (n_s[k] + EPS);")
        c.close()
    c("__syncthreads();")
    value = "num / den_s[i]" if v.norm == "row" else "num"
    store = (f"if (row < end && dv0 + j < DV) store_T(y_base + row * y_sn + (long long)(dv0 + j) * "
             f"y_sd, {value});")
    if mma:
        product(c, "y_s [BLOCK_N, BLOCK_DV] = w S (W x W)", "y_s", "SP", "BLOCK_N / 16",
                "BLOCK_DV / 16", [Term(Operand("rq_w", "KH", "row"), Operand("S_w", "BDH", "row"),
                                       "KPAD", "W_t")])
        c("__syncthreads();")
        store_y_tile(c, v.norm == "row")
    else:
        c("// y [BLOCK_N, BLOCK_DV] = r S (owner (i, j))")
        c("const int j = tid % BLOCK_DV;")
        c.open("for (int i = tid / BLOCK_DV; i < BLOCK_N; i += THREADS / BLOCK_DV)")
        c("float num = 0.f;",
          "for (int k = 0; k < K; ++k) num = fmaf(rq_s[i * KP + k], S_s[k * BLOCK_DV + j], num);",
          "const long long row = n0 + i;")
        c(store)
        c.close()
    c.close()
    c.close()
    return finish(c, "gma_read_fwd", f"responsibility + slot_read ({v.norm} norm) over queries", v, t, config)
