"""gma_write_fwd: responsibility + slot_write over the keys, one segment of N per block.

Must match ``oracle.responsibility`` and ``oracle.slot_write``: S_k = sum_j m_j r_jk v_j,
n_k = sum_j m_j r_jk, accumulated in float32.  Block (b*h, p, Dv block) sums
segment p into S_s [K, BLOCK_DV] / n_s [K] in shared memory and stores them
at partial p; with several segments ``gma_reduce`` adds the partials in
segment order, so the result is deterministic.  The causal scan reuses this
kernel for the states its segments start from.

Tensor cores (``mma=1``, mma.py): the logits as 3xTF32 MMAs, and S_s += rk^T v
with rk and v in the token dtype (rk_t, v_t), float32 accumulation in S_s;
n stays a float32 column sum of the float32 responsibilities.
"""

from __future__ import annotations

from .mixture import coefficient_params, mixture_setup, responsibilities
from .prelude import (MASK_PARAMS, Code, Emitted, Tiles, Variant, bh_indices, finish, kernel_open,
                      load_v_tile, min_blocks, segment_range, smem_declare, state_store,
                      state_update, state_zero, token_base, token_params)


def kernel_params(v: Variant) -> list[str]:
    """gma_write_fwd's parameters (lower.py passes them by name), for every path."""
    params = token_params("k") + token_params("v")
    if v.mask:
        params += MASK_PARAMS
    params += coefficient_params("mk", v.k_covariance)
    return params + ["float* __restrict__ s_ptr", "long long s_sp", "long long s_sbh",
                     "long long s_sk", "long long s_sdv", "float* __restrict__ n_ptr",
                     "long long n_sp", "long long n_sbh", "long long n_sk", "long long N", "int H",
                     "long long SEG"]


def emit(v: Variant, t: Tiles, config: dict) -> Emitted:
    if t.mma == 2:  # register fragments (frag.py)
        from . import emit_write_frag

        return emit_write_frag.emit(v, t, config)
    c = Code()
    kernel_open(c, "gma_write_fwd", kernel_params(v), "(B*H, segments, Dv blocks)", min_blocks(v, t))
    smem_declare(c, v, t)
    bh_indices(c)
    segment_range(c)
    c("const int dv0 = blockIdx.z * BLOCK_DV;")
    token_base(c, "k", vec=bool(t.mma))
    token_base(c, "v", vec=bool(t.mma))
    mixture_setup(c, "mk", v.k_covariance, vec=bool(t.mma))
    mma = bool(t.mma)
    state_zero(c, mma)
    c.open("for (long long n0 = start; n0 < end; n0 += BLOCK_N)")
    responsibilities(c, "rk_s", "k", "mk", v.k_covariance, keep="mask" if v.mask else "range",
                     mma=mma, copies=(("rk_t", "cvt_T"),) if mma else (),
                     sizes=(t.num_threads, t.block_n, v.K))
    load_v_tile(c, mma)
    c("__syncthreads();")
    state_update(c, v, t)
    c.close()
    c("__syncthreads();")
    state_store(c, "s", "n", "seg * s_sp + bh * s_sbh", "seg * n_sp + bh * n_sbh", mma)
    c.close()
    return finish(c, "gma_write_fwd", "responsibility + slot_write over keys", v, t, config)


def emit_reduce(v: Variant, t: Tiles, config: dict) -> Emitted:
    """gma_reduce: (S, n) = sum over segments of the partials [NSEG, BH, K, Dv] and
    [NSEG, BH, K] (contiguous), in segment order."""
    c = Code()
    params = ["const float* __restrict__ ps", "const float* __restrict__ pn",
              "float* __restrict__ s_ptr", "long long s_sbh", "long long s_sk", "long long s_sdv",
              "float* __restrict__ n_ptr", "long long n_sbh", "long long n_sk",
              "long long BH", "int NSEG"]
    kernel_open(c, "gma_reduce", params, "(B*H, ceil(K*DV / THREADS))")
    c("const long long bh = blockIdx.x;",
      "const int e = blockIdx.y * THREADS + threadIdx.x;  // element (k, dv) of the K x DV memory")
    c.open("if (e < K * DV)")
    c("float a = 0.f;",
      "for (int p = 0; p < NSEG; ++p) a += ps[((long long)p * BH + bh) * (K * DV) + e];",
      "s_ptr[bh * s_sbh + (e / DV) * s_sk + (e % DV) * s_sdv] = a;")
    c.close()
    c.open("if (e < K)")
    c("float a = 0.f;",
      "for (int p = 0; p < NSEG; ++p) a += pn[((long long)p * BH + bh) * K + e];",
      "n_ptr[bh * n_sbh + e * n_sk] = a;")
    c.close()
    c.close()
    return finish(c, "gma_reduce", "sum of per-segment slot memories, in segment order", v, None, config)
