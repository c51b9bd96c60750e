"""gma_coefficients: the centred coefficients of one mixture's expanded logits, base 2.

Must match ``oracle.responsibility`` through the kernels that read them, and
the Triton backend's coefficients formula for formula
(backends/triton/prelude.py, ``mixture_prologue`` and ``_coefficients``).  For
head h, with prec = exp(-rho) and LOG2E = log2(e):

    a_kd  = -LOG2E/2 prec_kd                           (diag)   multiplies x_d^2
    asq_k = -LOG2E/2 prec_k                            (spherical) multiplies |x|^2
    b_kd  = mu_kd prec_kd LOG2E                                  multiplies x_d
    c_k   = LOG2E (alpha_k - 1/2 sum_d (mu_kd^2 prec_kd + rho_kd))

spherical: prec_kd = prec_k and the rho term is D rho_k; shared: one prec, and
the x.x and rho terms, equal for every k, are dropped (they cancel in the
softmax).  a (for each d), b (for each d) and asq are centred: their mean over
k is subtracted, which changes no responsibility.  The precisions, the
coefficients and the centring are float64; each value is rounded to float32
once, after centring, so its error is relative to the spread of the
precisions over k, not to the precisions themselves (mixture.py's docstring
says why that matters).  c is not centred: it multiplies nothing.

Outputs, float32 and contiguous: a, b [H, K, D], c, asq [H, K] (lower.py
allocates them in one scratch buffer per mixture and call; every kernel of the
call reads them).  Grid (H, DB + KB):

  blocks y < DB   own 32 columns d of a and b: lane = d, warp w sums the
                  k = w, w + NWARPS, ... in order; the NWARPS partial sums
                  are added in warp order, then the centred values are written
  blocks y >= DB  own NWARPS rows k of c (and asq): one warp per k, lanes over
                  d, then a fixed shuffle tree

Every sum has a fixed order, so the coefficients are deterministic.  No tiles
and no config: one source per (covariance, D, K, parameter dtype).
"""

from __future__ import annotations

from .mixture import mixture_params
from .prelude import Code, Emitted, Tiles, Variant, finish, kernel_open

_DOUBLE = r"""
constexpr int DB = (D + 31) / 32;  // column blocks (a, b)
[[maybe_unused]] constexpr int KB = (K + NWARPS - 1) / NWARPS;  // row blocks (c, asq)
constexpr double LOG2E_D = 1.4426950408889634;

GMA_DEVICE double to_d(double x) { return x; }
template <class X> GMA_DEVICE double to_d(X x) { return static_cast<double>(to_f(x)); }

GMA_DEVICE double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
"""


def coefficient_variant(D: int, K: int, param_dtype: str, covariance: str) -> Variant:
    """The Variant of the coefficient kernel of one mixture: only D, K, the
    parameter dtype and the covariance matter (Dv and the token dtype are fixed, so
    every plan of a call shares one compiled unit)."""
    return Variant("coefficients", D, 1, K, "f32", param_dtype, q_covariance=covariance,
                   k_covariance=covariance)


def emit(v: Variant, t: Tiles | None = None, config: dict | None = None) -> Emitted:
    """Source of gma_coefficients for mixture covariance ``v.q_covariance``; ``t`` and
    ``config`` are ignored (the emitter signature of the other kernels)."""
    cov = v.q_covariance
    c = Code()
    c(*_DOUBLE.strip("\n").splitlines(), "")
    params = mixture_params("m", cov) + [f"float* __restrict__ {name}_ptr"
                                         for name in (["a"] if cov == "diag" else [])
                                         + ["b", "c"] + (["asq"] if cov == "spherical" else [])]
    kernel_open(c, "gma_coefficients", params, "(H, DB + KB)")
    c("const long long h = blockIdx.x;",
      "const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;")
    mu = "to_d(m_mean[h * m_mean_sh + k * m_mean_sk + d * m_mean_sd])"
    if cov == "diag":
        rho = "to_d(m_lv[h * m_lv_s0 + k * m_lv_s1 + d * m_lv_s2])"
        prec = "prec"
    elif cov == "spherical":
        c("__shared__ double prec_s[K];",
          "for (int k = tid; k < K; k += THREADS) "
          "prec_s[k] = exp(-to_d(m_lv[h * m_lv_s0 + k * m_lv_s1]));",
          "__syncthreads();")
        prec = "prec_s[k]"
    else:
        c("const double prec = exp(-to_d(m_lv[h * m_lv_s0]));  // one precision for every k")
        prec = "prec"

    coefs = ("a", "b") if cov == "diag" else ("b",)
    c.open("if (blockIdx.y < DB)")
    c(f"// columns d: {' and '.join(coefs)} [K] centred over k",
      "const int d = blockIdx.y * 32 + lane;")
    for x in coefs:
        c(f"__shared__ double sum_{x}_s[NWARPS][32];  // partial sums over k of each warp",
          f"double sum_{x} = 0.0;")
    c.open("if (d < D) for (int k = warp; k < K; k += NWARPS)")
    if cov == "diag":
        c(f"const double prec = exp(-{rho});", "sum_a += (-0.5 * LOG2E_D) * prec;")
    c(f"sum_b += {mu} * {prec} * LOG2E_D;")
    c.close()
    c(*[f"sum_{x}_s[warp][lane] = sum_{x};" for x in coefs], "__syncthreads();")
    for x in coefs:
        c(f"double mean_{x} = 0.0;",
          f"for (int w = 0; w < NWARPS; ++w) mean_{x} += sum_{x}_s[w][lane];",
          f"mean_{x} *= 1.0 / K;")
    c.open("if (d < D) for (int k = warp; k < K; k += NWARPS)")
    c("const long long at = (h * K + k) * D + d;")
    if cov == "diag":
        c(f"const double prec = exp(-{rho});  // recomputed: the value summed above",
          "a_ptr[at] = static_cast<float>((-0.5 * LOG2E_D) * prec - mean_a);  // rounded once")
    c(f"b_ptr[at] = static_cast<float>({mu} * {prec} * LOG2E_D - mean_b);")
    c.close()
    c.close(" else {")
    c.depth += 1
    c("// rows k: c (and asq), one warp per k",
      "const int k = (blockIdx.y - DB) * NWARPS + warp;")
    c.open("if (k < K)")  # warp-uniform: the shuffles below see every lane
    c("double s = 0.0;")
    c.open("for (int d = lane; d < D; d += 32)")
    c(f"const double mu = {mu};")
    if cov == "diag":
        c(f"const double rho = {rho};")
    c({"diag": "s += mu * mu * exp(-rho) + rho;",
       "spherical": "s += mu * mu;", "shared": "s += mu * mu;"}[cov])
    c.close()
    c("s = warp_sum(s);")
    c.open("if (lane == 0)")
    c("const double alpha = to_d(m_logit[h * m_logit_sh + k * m_logit_sk]);")
    if cov == "spherical":
        c("const double rho = to_d(m_lv[h * m_lv_s0 + k * m_lv_s1]);",
          "c_ptr[h * K + k] = static_cast<float>(LOG2E_D * (alpha - 0.5 * (s * prec_s[k] + D * rho)));",
          "double mean_asq = 0.0;",
          "for (int j = 0; j < K; ++j) mean_asq += (-0.5 * LOG2E_D) * prec_s[j];",
          "mean_asq *= 1.0 / K;",
          "asq_ptr[h * K + k] = static_cast<float>((-0.5 * LOG2E_D) * prec_s[k] - mean_asq);")
    elif cov == "shared":
        c("c_ptr[h * K + k] = static_cast<float>(LOG2E_D * (alpha - 0.5 * s * prec));")
    else:
        c("c_ptr[h * K + k] = static_cast<float>(LOG2E_D * (alpha - 0.5 * s));")
    c.close()
    c.close()
    c.close()
    c.close()
    return finish(c, "gma_coefficients", f"centred base-2 logit coefficients ({cov} covariance), "
                  f"float64, rounded last", v, None, {})
