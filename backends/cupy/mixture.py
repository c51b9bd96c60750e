"""The mixture side of every kernel of the CuPy backend: its parameters, the
coefficients of its logits, and the responsibilities computed from them.

Responsibilities use GMA_SPEC's expanded form, in base 2 so that the softmax
can use exp2f, with the coefficients of the Triton backend
(backends/triton/prelude.py, ``mixture_prologue``):

    l2_k(x) = c_k + sum_d x_d b_kd + sum_d x_d^2 a_kd     (diag)
    l2_k(x) = c_k + sum_d x_d b_kd + |x|^2 asq_k           (spherical)
    l2_k(x) = c_k + sum_d x_d b_kd                         (shared)

``gma_coefficients`` (emit_coefficients.py, where the formulas are) computes
them once per call and mixture into a float32 scratch buffer that every kernel
of the call reads: a and b [H, K, D], c and asq [H, K], the precisions exp(-rho)
in float64, a, b and asq centred over k (a term equal for every k cancels in
the softmax), rounded to float32 after centring.

Why not the direct form c_k - sum_d (x_d - mu_kd)^2 w_kd, w = log2(e)/2
exp(-rho), which has no x*x and x terms to cancel: its w, rounded to float32,
carries an error of 6e-8 of the precision itself.  With large inputs (|x_d| ~
20, D = 64: |x - mu|^2 ~ 2.6e4) the logits are ~ -1.8e4, resolved by float32 to
~1e-3, and the error of w multiplies |x - mu|^2 coherently over d (spherical and
shared covariance, one w per k, worst); near-tied components then move
responsibilities by up to ~8.6e-4 (a NumPy float32 emulation), past the
float32 contract.  Rounded after centring, the coefficients carry an error
relative to the spread of the precisions over k, not to the precisions, and
the products they enter are that much smaller.

On tensor cores (``mma=1``, 16-bit tokens) the same expanded products run as
3xTF32 MMAs (mma.py): plain tf32 keeps 11 bits, far from what these
cancelling sums need; with b and a split into tf32 hi + lo, and x exact in
tf32, the products keep ~2^-21 of each term, close to float32.

Why a separate kernel: centring needs every k of a column, and a, b take
2 K D floats per head (512 KB at K = D = 256), too many for shared memory;
recomputing them in float64 per block would repeat K x D double exps in every
block.  Written once (~K D floats per mixture and head, L2-resident), they are
streamed through shared memory per D chunk, like the tokens.
"""

from __future__ import annotations

from .prelude import Code


def mixture_params(m: str, covariance: str) -> list[str]:
    """The parameters of mixture ``m`` as the caller gives them (any strides); only
    ``gma_coefficients`` reads them."""
    lv_rank = {"diag": 3, "spherical": 2, "shared": 1}[covariance]
    return ([f"const P_t* __restrict__ {m}_mean", f"long long {m}_mean_sh", f"long long {m}_mean_sk",
             f"long long {m}_mean_sd", f"const P_t* __restrict__ {m}_lv"]
            + [f"long long {m}_lv_s{i}" for i in range(lv_rank)]
            + [f"const P_t* __restrict__ {m}_logit", f"long long {m}_logit_sh",
               f"long long {m}_logit_sk"])


def coefficient_arrays(covariance: str) -> list[tuple[str, str]]:
    """(name, shape) of the float32 coefficients ``gma_coefficients`` writes for one
    mixture (contiguous, in this order in one scratch buffer)."""
    return ([("a", "HKD")] if covariance == "diag" else []) + [("b", "HKD"), ("c", "HK")] + \
        ([("asq", "HK")] if covariance == "spherical" else [])


def coefficient_params(m: str, covariance: str) -> list[str]:
    """Mixture ``m`` as the main kernels read it: its coefficients (see
    coefficient_arrays), float32, contiguous, written by ``gma_coefficients``."""
    return [f"const float* __restrict__ {m}_{name}" for name, _ in coefficient_arrays(covariance)]


def mixture_setup(c: Code, m: str, covariance: str, vec: bool = False) -> None:
    """Per-head constants of mixture ``m`` into shared memory: ``{m}_c_s`` [K] (base 2)
    and, spherical, ``{m}_asq_s`` [K] (the centred coefficient of |x|^2).  ``vec``
    (MMA kernels): also ``{m}_b_h`` (``{m}_a_h``), head h's tables, and ``{m}_vec``,
    true when they are 16-byte aligned (their float4 loads in responsibilities)."""
    c(f"// mixture {m} ({covariance} covariance): base-2 constants of head h (gma_coefficients)")
    c.open("for (int k = tid; k < K; k += THREADS)")
    c(f"{m}_c_s[k] = {m}_c[h * K + k];")
    if covariance == "spherical":
        c(f"{m}_asq_s[k] = {m}_asq[h * K + k];")
    c.close()
    if not vec:
        return
    tables = ["a", "b"] if covariance == "diag" else ["b"]
    for x in tables:
        c(f"[[maybe_unused]] const float* const {m}_{x}_h = {m}_{x} + h * K * D;  // head h")
    aligned = " | ".join(f"reinterpret_cast<unsigned long long>({m}_{x}_h)" for x in tables)
    c(f"[[maybe_unused]] const bool {m}_vec = (({aligned}) & 15) == 0;  // float4 rows (D % 4 == 0)")


def softmax_threads_per_row(threads: int, block_n: int, K: int) -> int:
    """Lanes that share one row of the softmax (a power of two <= 32): enough for
    one pass over the BLOCK_N rows, and at least K / 16 so that no lane walks
    more than ~16 components; the rows of a group are reduced with shuffles."""
    want = max(1, threads // block_n, -(-K // 16))
    tpr = 1
    while tpr < want and tpr < 32:
        tpr *= 2
    return tpr


def responsibilities(c: Code, r: str, t: str, m: str, covariance: str, keep: str,
                     mma: bool = False, copies: tuple[tuple[str, str], ...] = (),
                     sizes: tuple[int, int, int] = (256, 64, 64), den: bool = False) -> None:
    """``{r}`` [BLOCK_N, KP] = softmax over k of the logits of token rows n0 + i
    (rows at or past ``end`` read as zeros).  ``keep``: "" (every row normalized),
    "range" (rows past ``end`` zeroed) or "mask" (and rows whose key_mask is False).

    The logits are the expanded form of the module docstring: per D chunk, x.b (and
    (x*x).a for diag) for each (row, k), and |x|^2 per row for spherical; shared
    covariance needs x.b only.  CUDA cores (``mma`` False): x*x is formed in
    registers, one multiply and two FMAs per (row, k, d), the operation count of the
    direct form's (x - mu)^2 w, with no extra shared-memory tile or load.  Tensor
    cores (``mma``): the same products as 3xTF32 MMAs (mma.py), accumulated in
    ``{r}`` over the D chunks; coefficient rows k >= K are zero, and ``copies``
    ((buffer, converter) pairs, e.g. ("rk_t", "cvt_T")) receive the normalized
    responsibilities as [BLOCK_N, KPAD] MMA operands, zeros in columns k >= K.

    The softmax runs SM_TPR lanes per row (softmax_threads_per_row of ``sizes`` =
    (THREADS, BLOCK_N, K), the kernel's constants; any power of two <= 32 is
    correct), all rows of the tile at once: the latency of max, exp2 and sum is
    paid once per pass, not once per row of a warp.  ``den`` (slot_read, row
    norm): also den_s[i] = sum_k r_ik n_k + eps, reduced in the same group."""
    c(f"// responsibilities of {t} rows [n0, n0 + BLOCK_N): {r} [BLOCK_N, K] (mixture {m})")
    c("__syncthreads();  // earlier readers of the tiles below are done")
    if not mma:
        c(f"for (int idx = tid; idx < BLOCK_N * K; idx += THREADS) {r}[(idx / K) * KP + idx % K] = 0.f;")
    if covariance == "spherical":
        c("for (int i = tid; i < BLOCK_N; i += THREADS) xx_s[i] = 0.f;")
    c.open("for (int d0 = 0; d0 < D; d0 += DC)")
    c("__syncthreads();")
    if mma:
        c(f"// 16-byte vectors when {t}'s rows allow ({t}_vec) and D % 8 == 0 (DC % 8 == 0: "
          "8 columns are all in or all out); x_s rows are 16-byte aligned (DCP % 4 == 0)")
        c.open(f"if (D % 8 == 0 && {t}_vec)")
        c.open("for (int idx = tid; idx < BLOCK_N * (DC / 8); idx += THREADS)")
        c("const int i = idx / (DC / 8), d = (idx % (DC / 8)) * 8;",
          "const long long row = n0 + i;",
          "float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};",
          f"if (row < end && d0 + d < D) unpack8(*reinterpret_cast<const uint4*>({t}_base + "
          f"row * {t}_sn + d0 + d), f);",
          "*reinterpret_cast<float4*>(x_s + i * DCP + d) = make_float4(f[0], f[1], f[2], f[3]);",
          "*reinterpret_cast<float4*>(x_s + i * DCP + d + 4) = make_float4(f[4], f[5], f[6], f[7]);")
        c.close()
        c.close(" else {")
        c.depth += 1
    c.open("for (int idx = tid; idx < BLOCK_N * DC; idx += THREADS)")
    c("const int i = idx / DC, d = idx % DC;",
      "const long long row = n0 + i;",
      f"x_s[i * DCP + d] = (row < end && d0 + d < D) ? "
      f"to_f({t}_base[row * {t}_sn + (long long)(d0 + d) * {t}_sd]) : 0.f;")
    c.close()
    if mma:
        c.close()
    rows = "KPAD" if mma else "K"
    c(f"// the coefficients of columns [d0, d0 + DC): b_s (and a_s) [{rows}, DC]"
      + ("; rows k >= K are zero" if mma else ""))
    if mma:
        coefs = ["b", "a"] if covariance == "diag" else ["b"]
        c("// float4 when D % 4 == 0 and the tables are 16-byte aligned (rows of D floats: "
          "4 columns are all in or all out); b_s, a_s rows are 16-byte aligned (DCP % 4 == 0)")
        c.open(f"if (D % 4 == 0 && {m}_vec)")
        c.open("for (int idx = tid; idx < KPAD * (DC / 4); idx += THREADS)")
        c("const int k = idx / (DC / 4), d = (idx % (DC / 4)) * 4;",
          "const bool ok = k < K && d0 + d < D;",
          "const int at = k * D + d0 + d;  // within head h: K D <= 65536")
        for x in coefs:
            c(f"*reinterpret_cast<float4*>({x}_s + k * DCP + d) = ok ? "
              f"*reinterpret_cast<const float4*>({m}_{x}_h + at) : make_float4(0.f, 0.f, 0.f, 0.f);")
        c.close()
        c.close(" else {")
        c.depth += 1
    c.open(f"for (int idx = tid; idx < {rows} * DC; idx += THREADS)")
    c("const int k = idx / DC, d = idx % DC;",
      "const bool ok = " + ("k < K && d0 + d < D;" if mma else "d0 + d < D;"),
      "const long long at = (h * K + k) * D + d0 + d;",
      f"b_s[k * DCP + d] = ok ? {m}_b[at] : 0.f;")
    if covariance == "diag":
        c(f"a_s[k * DCP + d] = ok ? {m}_a[at] : 0.f;")
    c.close()
    if mma:
        c.close()
    c("__syncthreads();")
    if mma:
        from .mma import Operand, Term, product

        terms = [Term(Operand("x_s", "DCP", "row", "round"), Operand("b_s", "DCP", "col", "hi_lo"),
                      "DC", "tf32")]
        if covariance == "diag":
            terms.append(Term(Operand("x_s", "DCP", "row", "square"),
                              Operand("a_s", "DCP", "col", "hi_lo"), "DC", "tf32"))
        what = f"logits {r} [BLOCK_N, KPAD] += x . b^T" + \
            (" + (x*x) . a^T" if covariance == "diag" else "") + \
            " (3xTF32: x exact in tf32, b and a split hi + lo)"
        product(c, what, r, "KP", "BLOCK_N / 16", "KPAD / 16", terms, init="d0 == 0")
    else:
        c.open("for (int idx = tid; idx < BLOCK_N * K; idx += THREADS)")
        c("const int i = idx / K, k = idx % K;",
          "const float* xr = x_s + i * DCP;",
          "const float* br = b_s + k * DCP;")
        if covariance == "diag":
            c("const float* ar = a_s + k * DCP;",
              "float lb = 0.f, la = 0.f;  // x.b and (x*x).a: two independent FMA chains",
              "#pragma unroll 8")
            c.open("for (int d = 0; d < DC; ++d)")
            c("const float xv = xr[d];", "lb = fmaf(xv, br[d], lb);", "la = fmaf(xv * xv, ar[d], la);")
            c.close()
            c(f"{r}[i * KP + k] += lb + la;")
        else:
            c("float l = 0.f;", "#pragma unroll 8",
              "for (int d = 0; d < DC; ++d) l = fmaf(xr[d], br[d], l);",
              f"{r}[i * KP + k] += l;")
        c.close()
    if covariance == "spherical":
        c("// |x|^2 of each row (owner thread per row)")
        c.open("for (int i = tid; i < BLOCK_N; i += THREADS)")
        c("const float* xr = x_s + i * DCP;", "float s = 0.f;", "#pragma unroll 8",
          "for (int d = 0; d < DC; ++d) s = fmaf(xr[d], xr[d], s);", "xx_s[i] += s;")
        c.close()
    c.close()
    c("__syncthreads();")
    logit = {"diag": f"{m}_c_s[k] + {r}[i * KP + k]",
             "spherical": f"{m}_c_s[k] + {r}[i * KP + k] + {m}_asq_s[k] * xx_s[i]",
             "shared": f"{m}_c_s[k] + {r}[i * KP + k]"}[covariance]
    tpr = softmax_threads_per_row(*sizes)
    c(f"// softmax over k (base 2): SM_TPR = {tpr} lanes per row (an aligned group of a warp), "
      "rows in passes of THREADS / SM_TPR",
      "{")
    c.depth += 1
    c(f"constexpr int SM_TPR = {tpr};")
    c.open("for (int i0 = 0; i0 < BLOCK_N; i0 += THREADS / SM_TPR)")
    c("const int i = i0 + tid / SM_TPR, sub = tid % SM_TPR;",
      "const bool live = i < BLOCK_N;  // every lane reaches the shuffles below")
    c("float mx = -__int_as_float(0x7f800000);  // -inf")
    c.open("if (live) for (int k = sub; k < K; k += SM_TPR)")
    c(f"const float l = {logit};", f"{r}[i * KP + k] = l;", "mx = fmaxf(mx, l);")
    c.close()
    c("#pragma unroll",
      "for (int o = SM_TPR / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));",
      "float sum = 0.f;")
    c.open("if (live) for (int k = sub; k < K; k += SM_TPR)")
    c(f"const float e = exp2f({r}[i * KP + k] - mx);", f"{r}[i * KP + k] = e;", "sum += e;")
    c.close()
    c("#pragma unroll",
      "for (int o = SM_TPR / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);")
    if keep:
        c("const long long row = n0 + i;")
        cond = "live && row < end"
        if keep == "mask":
            cond += " && mask_ptr[b * mask_sb + row * mask_sn] != 0"
        c(f"const float inv = ({cond}) ? 1.f / sum : 0.f;  // dropped keys write nothing")
    else:
        c("const float inv = 1.f / sum;")
    if den:
        c("float dn = 0.f;  // row norm: sum_k r_ik n_k")
    if mma:
        c.open("if (live) for (int k = sub; k < KPAD; k += SM_TPR)")
        c(f"const float p = k < K ? {r}[i * KP + k] * inv : 0.f;  // padded components: 0",
          f"{r}[i * KP + k] = p;")
        for buf, cvt in copies:
            c(f"{buf}[i * KH + k] = {cvt}(p);")
    else:
        c.open("if (live) for (int k = sub; k < K; k += SM_TPR)")
        c(f"const float p = {r}[i * KP + k] * inv;", f"{r}[i * KP + k] = p;")
    if den:
        c("if (k < K) dn = fmaf(p, n_s[k], dn);")
    c.close()
    if den:
        c("#pragma unroll",
          "for (int o = SM_TPR / 2; o > 0; o >>= 1) dn += __shfl_xor_sync(0xffffffffu, dn, o);",
          "if (live && sub == 0) den_s[i] = dn + EPS;")
    c.close()
    c.close()
    c("__syncthreads();")
