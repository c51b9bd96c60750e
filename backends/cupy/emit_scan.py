"""gma_scan_fwd: the causal program as one chunked scan; responsibilities on the fly.

Must match ``oracle.responsibility`` and ``oracle.causal_scan``: query i reads
S(i) = S0 + sum_{j<=i} m_j r_jk v_j and n(i) likewise.  Block (b*h, p, Dv
block) owns segment p of the sequence.  It starts from the initial state plus
the partial memories of segments 0..p-1 (``gma_write_fwd``, added in order),
then walks its segment in chunks of BLOCK_N tokens: a masked BLOCK_N x BLOCK_N
product inside the chunk, the carried state S_s [K, BLOCK_DV], n_s [K] across
chunks.  R is never written to global memory.  The last segment stores the
final state.

    row:  y_i = (rq_i S + sum_{j<=i} a_ij v_j) / (rq_i n + sum_{j<=i} a_ij + eps),
          a_ij = rq_i . rk_j
    slot: w_ik = rq_ik / (n_k + sum_{j<=i} rk_jk + eps),
          y_i = w_i S + sum_{j<=i} (w_i . rk_j) v_j

Tensor cores (``mma=1``, mma.py), per chunk: the logits as 3xTF32 MMAs; row
norm: att = rq . rk^T in the token dtype T, num = att . v (T) + rq . S (W =
bfloat16), den from the float32 att and float32 rq . n; slot norm: w in
float32 on CUDA cores as above, then att = w . rk^T, y = att . v + w . S, all
in W (w and att carry 1/(n + eps), past float16's range).  Tiles of att above
the diagonal are skipped, and att . v stops at the diagonal tile.  The state
S_s stays float32 (S_s += rk^T v in T on tensor cores); S_w, its W copy, is
refreshed after each update.
"""

from __future__ import annotations

from .mixture import coefficient_params, mixture_setup, responsibilities
from .mma import Operand, Term, product, wide_is_token
from .prelude import (MASK_PARAMS, Code, Emitted, Tiles, Variant, bh_indices, finish, kernel_open,
                      load_v_tile, min_blocks, mixtures, segment_range, smem_declare,
                      state_store, state_update, store_y_tile, token_base, token_params)


def kernel_params(v: Variant) -> list[str]:
    """gma_scan_fwd's parameters (lower.py passes them by name), for every path."""
    params = token_params("q") + token_params("k") + token_params("v")
    if v.mask:
        params += MASK_PARAMS
    for m, cov, _ in mixtures(v):
        params += coefficient_params(m, cov)
    if v.init:
        params += ["const A_t* __restrict__ s0_ptr", "long long s0_sb", "long long s0_sh",
                   "long long s0_sk", "long long s0_sdv", "const A_t* __restrict__ n0_ptr",
                   "long long n0_sb", "long long n0_sh", "long long n0_sk"]
    params += ["const float* __restrict__ ps", "const float* __restrict__ pn"]
    params += token_params("y", const=False)
    return params + ["float* __restrict__ st_ptr", "long long st_sbh", "long long st_sk",
                     "long long st_sdv", "float* __restrict__ nt_ptr", "long long nt_sbh",
                     "long long nt_sk", "long long N", "int H", "long long BH", "long long SEG"]


def emit(v: Variant, t: Tiles, config: dict) -> Emitted:
    if t.mma == 2:  # register fragments (frag.py)
        from . import emit_scan_frag

        return emit_scan_frag.emit(v, t, config)
    mixes = mixtures(v)
    mq, cq = mixes[0][0], mixes[0][1]
    mk, ck = mixes[-1][0], mixes[-1][1]
    c = Code()
    kernel_open(c, "gma_scan_fwd", kernel_params(v), "(B*H, segments, Dv blocks)", min_blocks(v, t))
    smem_declare(c, v, t)
    bh_indices(c)
    segment_range(c)
    c("const int dv0 = blockIdx.z * BLOCK_DV;")
    for tok in ("q", "k", "v"):
        token_base(c, tok, vec=bool(t.mma))
    token_base(c, "y", const=False, vec=bool(t.mma))
    for m, cov, _ in mixes:
        mixture_setup(c, m, cov, vec=bool(t.mma))
    mma = bool(t.mma)
    c("// state entering segment seg: initial state, then segments 0..seg-1 in order"
      + ("; S_s [KPAD, BLOCK_DV] (stride SP), zero rows k >= K" if mma else ""))
    entering_state(c, v, "KS" if mma else "K",
                   ["S_s[k * SP + j] = a;" if mma else "S_s[idx] = a;"])
    if mma:
        c("__syncthreads();")
        _refresh_wide_state(c)
    c.open("for (long long n0 = start; n0 < end; n0 += BLOCK_N)")
    if mma:
        _chunk_mma(c, v, t, mq, cq, mk, ck)
    else:
        _chunk_fma(c, v, t, mq, cq, mk, ck)
    c.close()
    c("__syncthreads();")
    c.open("if (seg == gridDim.y - 1)")
    c("// the last segment holds the final state")
    state_store(c, "st", "nt", "bh * st_sbh", "bh * nt_sbh", bool(t.mma))
    c.close()
    c.close()
    return finish(c, "gma_scan_fwd", f"causal chunked scan ({v.norm} norm)", v, t, config)


# elements of the entering state each thread sums at once: their loads of one earlier
# segment's memory are in flight together (one L2 round trip per segment, not one per
# element), at GROUP registers
GROUP = 16


def entering_state(c: Code, v: Variant, rows: str, stores: list[str],
                   pad_n: bool = False) -> None:
    """The state entering segment seg, summed per element into ``a``: the initial
    state, then segments 0..seg-1's partial memories (``ps``, ``pn``) in order.
    ``rows`` of S (K, or a padded count whose rows k >= K get 0), each element
    stored by ``stores``; n_s [K] (``pad_n``: [KPAD], 0 for k >= K).

    Each thread takes GROUP elements (THREADS apart, so that a warp's loads are
    coalesced) at a time and walks the segments once for all of them: a loop of
    segments around one element at a time waited for every load in turn (at
    N=1024 on an H100, 16 segments: the scan took 204 us, Triton's 112 us).  The
    sum of each element keeps its order, so the result is the same to the bit."""
    total = f"{rows} * BLOCK_DV"
    c(f"constexpr int ES_GROUP = THREADS * {GROUP} < {total} ? {GROUP} : "
      f"({total} + THREADS - 1) / THREADS;")
    c.open(f"for (int base = 0; base < {total}; base += THREADS * ES_GROUP)")
    c("float acc[ES_GROUP];")

    def element(body: list[str], guard: str = "") -> None:
        c("#pragma unroll")
        c.open("for (int e = 0; e < ES_GROUP; ++e)")
        c("const int idx = base + e * THREADS + tid;",
          "const int k = idx / BLOCK_DV, j = idx % BLOCK_DV;",
          f"[[maybe_unused]] const bool ok = idx < {total} && "
          + ("dv0 + j < DV;" if rows == "K" else "k < K && dv0 + j < DV;"))
        if guard:
            c.open(guard)
        c(*body)
        if guard:
            c.close()
        c.close()

    if v.init:
        element(["acc[e] = ok ? to_f(s0_ptr[b * s0_sb + h * s0_sh + k * s0_sk + "
                 "(long long)(dv0 + j) * s0_sdv]) : 0.f;"])
    else:
        element(["acc[e] = 0.f;"])
    c.open("for (long long pp = 0; pp < seg; ++pp)")
    c("const float* part = ps + (pp * BH + bh) * (K * DV) + dv0;")
    element(["if (ok) acc[e] += part[(long long)k * DV + j];"])
    c.close()
    element(["const float a = acc[e];", *stores], guard=f"if (idx < {total})")
    c.close()
    n0 = "to_f(n0_ptr[b * n0_sb + h * n0_sh + k * n0_sk])" if v.init else "0.f"
    psum = "for (long long pp = 0; pp < seg; ++pp) a += pn[(pp * BH + bh) * K + k];"
    if pad_n:
        c.open("for (int k = tid; k < KPAD; k += THREADS)")
        c("float a = 0.f;")
        c.open("if (k < K)")
        if v.init:
            c(f"a = {n0};")
        c(psum)
        c.close()
        c("n_s[k] = a;")
    else:
        c.open("for (int k = tid; k < K; k += THREADS)")
        c(f"float a = {n0};", psum, "n_s[k] = a;")
    c.close()


def _refresh_wide_state(c: Code) -> None:
    c("// S_w [KPAD, BLOCK_DV]: the state in W, the operand of rq . S")
    c.open("for (int idx = tid; idx < KS * BLOCK_DV; idx += THREADS)")
    c("const int k = idx / BLOCK_DV, j = idx % BLOCK_DV;", "S_w[k * BDH + j] = cvt_W(S_s[k * SP + j]);")
    c.close()


def _chunk_mma(c: Code, v: Variant, t: Tiles, mq: str, cq: str, mk: str, ck: str) -> None:
    """One chunk on tensor cores (the module docstring: which product in which dtype)."""
    row = v.norm == "row"
    two = not wide_is_token(v)  # float16 tokens: separate T and W copies
    if row:
        q_copies = (("rq_t", "cvt_T"),) + ((("rq_w", "cvt_W"),) if two else ())
    else:
        q_copies = ()  # the slot weights w are written into rq_w below
    k_copies = (("rk_t", "cvt_T"),) + ((("rk_w", "cvt_W"),) if two and not row else ())
    sizes = (t.num_threads, t.block_n, v.K)
    responsibilities(c, "rq_s", "q", mq, cq, keep="", mma=True, copies=q_copies, sizes=sizes)
    responsibilities(c, "rk_s", "k", mk, ck, keep="mask" if v.mask else "range", mma=True,
                     copies=k_copies, sizes=sizes)
    load_v_tile(c, mma=True, wide=two and not row)
    if not row:
        c("// slot norm: rq_w <- w_ik = rq_ik / (n_k(i) + eps) in W, n_k(i) inclusive prefix "
          "(float32); zero columns k >= K")
        c.open("for (int k = tid; k < KPAD; k += THREADS)")
        c("float run = k < K ? n_s[k] : 0.f;")
        c.open("for (int i = 0; i < BLOCK_N; ++i)")
        c.open("if (k < K)")
        c("run += rk_s[i * KP + k];", "rq_w[i * KH + k] = cvt_W(rq_s[i * KP + k] * (1.f / (run + EPS)));")
        c.close(" else {")
        c.depth += 1
        c("rq_w[i * KH + k] = cvt_W(0.f);")
        c.close()
        c.close()
        c.close()
    c("__syncthreads();")
    a, b, dt = ("rq_t", "rk_t", "T_t") if row else ("rq_w", "rk_w", "W_t")
    product(c, f"intra-chunk affinities att_s [BLOCK_N, BLOCK_N] = {a} . {b}^T ({dt[0]})", "att_s",
            "BNP", "BLOCK_N / 16", "BLOCK_N / 16",
            [Term(Operand(a, "KH", "row"), Operand(b, "KH", "col"), "KPAD", dt)], skip_upper=True)
    c("__syncthreads();")
    att = "att_t" if row else "att_w"
    c(f"// {att}: att in {dt[0]} with j > i zeroed (the causal mask), the operand of att . v")
    c.open("for (int idx = tid; idx < BLOCK_N * BLOCK_N; idx += THREADS)")
    c("const int i = idx / BLOCK_N, jj = idx % BLOCK_N;",
      f"{att}[i * BNH + jj] = cvt_{dt[0]}(jj <= i ? att_s[i * BNP + jj] : 0.f);")
    c.close()
    if row:
        _row_denominators(c)
    c("__syncthreads();")
    vb = "v_t" if row else "v_w"
    product(c, f"y_s [BLOCK_N, BLOCK_DV] = {att} . {vb} ({dt[0]}, up to the diagonal tile) + "
            f"rq_w . S_w (W)", "y_s", "SP", "BLOCK_N / 16", "BLOCK_DV / 16",
            [Term(Operand(att, "BNH", "row"), Operand(vb, "BDH", "row"), "(mt + 1) * 16", dt),
             Term(Operand("rq_w", "KH", "row"), Operand("S_w", "BDH", "row"), "KPAD", "W_t")])
    c("__syncthreads();  // y_s complete; S_w and n_s were read")
    store_y_tile(c, row)
    state_update(c, v, t)
    c("__syncthreads();")
    _refresh_wide_state(c)


def _row_denominators(c: Code) -> None:
    """Row norm: den_s[i] = sum_{j<=i} a_ij + rq_i . n + eps, float32, one warp per row
    (both paths: att_s and rq_s hold float32 values either way)."""
    c("// row norm: den_i = sum_{j<=i} a_ij + rq_i . n + eps (one warp per row)")
    c.open("for (int i = warp; i < BLOCK_N; i += NWARPS)")
    c("float s = 0.f;",
      "for (int jj = lane; jj <= i; jj += 32) s += att_s[i * BNP + jj];",
      "for (int k = lane; k < K; k += 32) s = fmaf(rq_s[i * KP + k], n_s[k], s);",
      "s = warp_sum(s);",
      "if (lane == 0) den_s[i] = s + EPS;")
    c.close()


def _chunk_fma(c: Code, v: Variant, t: Tiles, mq: str, cq: str, mk: str, ck: str) -> None:
    """One chunk on CUDA cores: every product an FMA loop of one owner thread."""
    sizes = (t.num_threads, t.block_n, v.K)
    responsibilities(c, "rq_s", "q", mq, cq, keep="", sizes=sizes)
    responsibilities(c, "rk_s", "k", mk, ck, keep="mask" if v.mask else "range", sizes=sizes)
    load_v_tile(c)
    c("__syncthreads();")
    if v.norm == "slot":
        c("// slot norm: rq_s <- w_ik = rq_ik / (n_k(i) + eps), n_k(i) inclusive prefix")
        c.open("for (int k = tid; k < K; k += THREADS)")
        c("float run = n_s[k];")
        c.open("for (int i = 0; i < BLOCK_N; ++i)")
        c("run += rk_s[i * KP + k];", "rq_s[i * KP + k] *= 1.f / (run + EPS);")
        c.close()
        c.close()
        c("__syncthreads();")
    c("// intra-chunk affinities a_ij = rq_i . rk_j for j <= i, att_s [BLOCK_N, BLOCK_N]")
    c.open("for (int idx = tid; idx < BLOCK_N * BLOCK_N; idx += THREADS)")
    c("const int i = idx / BLOCK_N, jj = idx % BLOCK_N;",
      "float a = 0.f;",
      "if (jj <= i) for (int k = 0; k < K; ++k) a = fmaf(rq_s[i * KP + k], rk_s[jj * KP + k], a);",
      "att_s[i * BNP + jj] = a;")
    c.close()
    c("__syncthreads();")
    if v.norm == "row":
        _row_denominators(c)
        c("__syncthreads();")
    c("// y [BLOCK_N, BLOCK_DV] = att v + rq S (owner (i, j))")
    c.open()
    c("const int j = tid % BLOCK_DV;")
    c.open("for (int i = tid / BLOCK_DV; i < BLOCK_N; i += THREADS / BLOCK_DV)")
    c("float num = 0.f;",
      "for (int jj = 0; jj <= i; ++jj) num = fmaf(att_s[i * BNP + jj], v_s[jj * BLOCK_DV + j], num);",
      "for (int k = 0; k < K; ++k) num = fmaf(rq_s[i * KP + k], S_s[k * BLOCK_DV + j], num);",
      "const long long row = n0 + i;")
    value = "num / den_s[i]" if v.norm == "row" else "num"
    c(f"if (row < end && dv0 + j < DV) store_T(y_base + row * y_sn + (long long)(dv0 + j) * y_sd, "
      f"{value});")
    c.close()
    c.close()
    c("__syncthreads();  // S_s and n_s were read above")
    state_update(c, v, t)
