"""Pieces of CUDA C++ shared by every emitter of the CuPy backend.

A generated kernel is one translation unit: a header comment, the dtype
typedefs, the size constants of its specialization (``constexpr``), the device
helpers below, and one ``extern "C" __global__`` kernel whose body the
emitters write from these building blocks.  All arithmetic is float32, except
in ``gma_coefficients`` and in the tensor-core products of ``mma=1`` kernels
(16-bit tokens; mma.py: tf32 and 16-bit operands, float32 accumulation).

Responsibilities (mixture.py) use GMA_SPEC's expanded form in base 2, with
coefficients that ``gma_coefficients`` (emit_coefficients.py) computes once per
call.

Work is laid out over one block of THREADS threads: a token tile of BLOCK_N
rows, the D axis streamed through shared memory in chunks of DC columns (x and
the chunk of a and b), the responsibilities of a tile [BLOCK_N, K] in shared
memory, the state [K, BLOCK_DV] in shared memory.  Loops over tile elements
stride by THREADS, so every size is legal; every element has exactly one owner
thread, so sums happen in a fixed order and results are deterministic.  With
``mma=1`` the products instead run one warp per 16 x 16 output tile (mma.py;
fixed owner and order as well), over the layout of ``mma.buffers``: K padded
to 16 with zeros, 16-byte strides, 16-bit copies of r, v and S as operands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LOG2E = 1.4426950408889634

# IR dtype -> CUDA type, and the header that declares it.
CUDA_TYPE = {"f32": "float", "f64": "double", "f16": "__half", "bf16": "__nv_bfloat16"}
HEADERS = {"f16": "cuda_fp16.h", "bf16": "cuda_bf16.h"}


@dataclass(frozen=True)
class Variant:
    """Plan attributes + call specialization: everything a source depends on
    besides the tile config."""

    kind: str                 # responsibility | write | reduce | read | scan | coefficients
    D: int
    Dv: int
    K: int
    dtype: str = "f32"        # tokens q, k, v and y
    param_dtype: str = "f32"  # mean, log_var, logit
    state_dtype: str = "f32"  # memory read by gma_read_fwd / initial state of the scan
    q_covariance: str = "diag"
    k_covariance: str = "diag"
    same_mixture: bool = True
    norm: str = "row"
    eps: float = 1e-6
    mask: bool = False
    init: bool = False

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tiles:
    """The tile config of one kernel, resolved (see space.py)."""

    block_n: int = 64
    block_dv: int = 64
    d_chunk: int = 32
    num_threads: int = 256
    mma: int = 0  # 1: tensor cores for the big products (mma.py), 0: CUDA-core FMA


def pad_odd(x: int) -> int:
    """Row stride of a shared tile read across rows by one warp: an odd number of
    floats puts consecutive rows in different banks."""
    return x if x % 2 else x + 1


def mixtures(v: Variant) -> list[tuple[str, str, str]]:
    """(prefix, covariance, tokens) of the mixtures a kernel reads."""
    if v.kind == "write":
        return [("mk", v.k_covariance, "k")]
    if v.kind in ("read", "responsibility"):
        return [("mq", v.q_covariance, "q")]
    if v.kind == "scan":
        if v.same_mixture:
            return [("m", v.q_covariance, "qk")]
        return [("mq", v.q_covariance, "q"), ("mk", v.k_covariance, "k")]
    return []


def smem_buffers(v: Variant, t: Tiles) -> list[tuple[str, int]]:
    """(name, floats) of the CUDA-core kernels' dynamic shared memory, in order
    (the MMA kernels': mma.buffers)."""
    if v.kind in ("reduce", "coefficients"):
        return []
    dcp = pad_odd(t.d_chunk)
    kp = pad_odd(v.K)
    mixes = mixtures(v)
    covs = {cov for _, cov, _ in mixes}
    # D chunk of the tokens and of the coefficients (one mixture at a time)
    bufs = [("x_s", t.block_n * dcp), ("b_s", v.K * dcp)]
    if "diag" in covs:
        bufs.append(("a_s", v.K * dcp))
    if "spherical" in covs:
        bufs.append(("xx_s", t.block_n))
    for m, cov, _ in mixes:
        bufs.append((f"{m}_c_s", v.K))
        if cov == "spherical":
            bufs.append((f"{m}_asq_s", v.K))
    if v.kind == "responsibility":
        return bufs + [("rq_s", t.block_n * kp)]
    state = [("S_s", v.K * t.block_dv), ("n_s", v.K)]
    if v.kind == "write":
        return bufs + [("rk_s", t.block_n * kp), ("v_s", t.block_n * t.block_dv)] + state
    if v.kind == "read":
        den = [("den_s", t.block_n)] if v.norm == "row" else []
        return bufs + [("rq_s", t.block_n * kp)] + den + state
    # scan
    return (bufs + [("rq_s", t.block_n * kp), ("rk_s", t.block_n * kp),
                   ("v_s", t.block_n * t.block_dv), ("att_s", t.block_n * pad_odd(t.block_n))]
                   + ([("den_s", t.block_n)] if v.norm == "row" else []) + state)


def smem_bytes(v: Variant, t: Tiles) -> int:
    if t.mma == 2 and v.kind in ("write", "read", "scan"):
        from . import frag

        return frag.smem_bytes(v, t)
    if t.mma and v.kind not in ("reduce", "coefficients"):
        from . import mma

        return 4 * mma.smem_floats(v, t)
    return 4 * sum(n for _, n in smem_buffers(v, t))


@dataclass(frozen=True)
class Emitted:
    """One generated kernel: its name, source, parameter declarations (in order;
    launch.py converts arguments by their C type) and launch shape."""

    name: str
    source: str = field(repr=False)
    params: tuple[str, ...] = field(repr=False)
    threads: int
    smem: int  # dynamic shared memory bytes


class Code:
    """Indented source lines (and the parameters of the kernel being written)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0
        self.params: list[str] = []

    def __call__(self, *lines: str) -> "Code":
        for line in lines:
            self.lines.append(("  " * self.depth + line) if line else "")
        return self

    def open(self, line: str = "") -> "Code":
        """``line {`` (a bare ``{`` without a line) and indent."""
        self(f"{line} {{" if line else "{")
        self.depth += 1
        return self

    def close(self, tail: str = "") -> "Code":
        self.depth -= 1
        self("}" + tail)
        return self

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# --------------------------------------------------------------------------- file head

_HELPERS = r"""
#define GMA_DEVICE __device__ __forceinline__

GMA_DEVICE float to_f(float x) { return x; }
GMA_DEVICE float to_f(double x) { return static_cast<float>(x); }
GMA_DEVICE float to_f(unsigned char x) { return static_cast<float>(x); }
{conversions}
GMA_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

GMA_DEVICE float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
"""

_CONVERSIONS = {
    "f16": "GMA_DEVICE float to_f(__half x) { return __half2float(x); }\n",
    "bf16": "GMA_DEVICE float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }\n",
}

_CVT = {"f16": "__float2half_rn", "bf16": "__float2bfloat16_rn"}

# 16-bit token <-> its bits (the 16-byte vector loads and stores of the MMA kernels)
_BITS = {"f16": ("__half_as_ushort", "__ushort_as_half"),
         "bf16": ("__bfloat16_as_ushort", "__ushort_as_bfloat16")}

_STORE = {"f32": "*p = v;", "f64": "*p = static_cast<double>(v);", "f16": "*p = __float2half_rn(v);",
          "bf16": "*p = __float2bfloat16_rn(v);"}


def finish(c: Code, name: str, description: str, v: Variant, t: Tiles | None,
           config: dict) -> Emitted:
    """Header + body of kernel ``name`` as an :class:`Emitted`."""
    return Emitted(name, header(name, description, v, t, config) + c.text(), tuple(c.params),
                   t.num_threads if t is not None else 256, smem_bytes(v, t) if t is not None else 0)


def header(kernel_name: str, description: str, v: Variant, t: Tiles | None, config: dict,
           arch_note: str = "") -> str:
    """Comment header + includes + typedefs + constants + helpers."""
    from gmagen import __version__

    from .nvrtc import nvrtc_version

    lines = [f"// gmagen {__version__} / NVRTC {nvrtc_version()}{arch_note}: {kernel_name}",
             f"// {description}",
             "// variant: " + ", ".join(f"{k}={val}" for k, val in v.describe().items()),
             "// config:  " + ", ".join(f"{k}={val}" for k, val in sorted(config.items()))]
    if t is not None:
        lines.append(f"// shared memory: {smem_bytes(v, t)} bytes (dynamic)")
    mma = bool(t is not None and t.mma and v.kind not in ("reduce", "coefficients"))
    fragments = mma and t is not None and t.mma == 2
    if mma:
        from . import frag as _frag
        from . import mma as _mma

        lines.append("// tensor cores: mma.sync on register fragments, float32 accumulation "
                     "(frag.py's docstring)" if fragments else
                     "// tensor cores: WMMA, float32 accumulation (mma.py's docstring: precision "
                     "per product)")
    used = {v.dtype, v.param_dtype, v.state_dtype} | ({"bf16"} if mma else set()) \
        | ({"f16"} if fragments else set())  # frag.HELPERS has float16 and bfloat16 MMAs
    for dt in ("f16", "bf16"):
        if dt in used:
            lines.append(f"#include <{HEADERS[dt]}>")
    if mma and not fragments:
        lines.append(_mma.INCLUDE)
    lines += ["",
              f"typedef {CUDA_TYPE[v.dtype]} T_t;      // tokens q, k, v and y",
              f"typedef {CUDA_TYPE[v.param_dtype]} P_t;      // mixture parameters",
              f"typedef {CUDA_TYPE[v.state_dtype]} A_t;      // memory / initial state"]
    if mma:
        lines.append(f"typedef {CUDA_TYPE[_mma.WIDE]} W_t;  // operands of products with S and "
                     f"slot weights (float16 overflows)")
    lines += ["",
              f"[[maybe_unused]] constexpr int D = {v.D};",
              f"[[maybe_unused]] constexpr int DV = {v.Dv};",
              f"[[maybe_unused]] constexpr int K = {v.K};",
              *([] if mma else [f"[[maybe_unused]] constexpr int KP = {pad_odd(v.K)};  "
                                f"// row stride of [BLOCK_N, K] tiles"]),
              f"[[maybe_unused]] constexpr float EPS = {float(v.eps)!r}f;",
              f"[[maybe_unused]] constexpr float LOG2E = {LOG2E!r}f;",
              f"[[maybe_unused]] constexpr float HALF_LOG2E = {LOG2E / 2!r}f;"]
    if t is not None:
        lines += [f"[[maybe_unused]] constexpr int THREADS = {t.num_threads};",
                  "[[maybe_unused]] constexpr int NWARPS = THREADS / 32;",
                  f"[[maybe_unused]] constexpr int BLOCK_N = {t.block_n};",
                  f"[[maybe_unused]] constexpr int BLOCK_DV = {t.block_dv};",
                  f"[[maybe_unused]] constexpr int DC = {t.d_chunk};   // D columns per shared-memory chunk"]
        if fragments:
            lines += _frag.constants(v, t)
        elif mma:
            lines += _mma.constants(v, t)
        else:
            lines += [f"[[maybe_unused]] constexpr int DCP = {pad_odd(t.d_chunk)};",
                      f"[[maybe_unused]] constexpr int BNP = {pad_odd(t.block_n)};"]
    else:
        lines += ["[[maybe_unused]] constexpr int THREADS = 256;",
                  "[[maybe_unused]] constexpr int NWARPS = THREADS / 32;"]
    conv = "".join(_CONVERSIONS[d] for d in ("f16", "bf16") if d in used)
    helpers = _HELPERS.replace("{conversions}", conv)
    store = f"GMA_DEVICE void store_T(T_t* p, float v) {{ {_STORE[v.dtype]} }}\n"
    if mma:
        store += (f"GMA_DEVICE T_t cvt_T(float v) {{ return {_CVT[v.dtype]}(v); }}\n"
                  f"GMA_DEVICE W_t cvt_W(float v) {{ return {_CVT[_mma.WIDE]}(v); }}\n"
                  f"GMA_DEVICE unsigned short T_bits(T_t v) {{ return {_BITS[v.dtype][0]}(v); }}\n"
                  f"GMA_DEVICE T_t T_from_bits(unsigned short b) {{ return {_BITS[v.dtype][1]}(b); }}\n"
                  + _mma.VECTORS + (_frag.HELPERS if fragments else _mma.HELPERS))
    return "\n".join(lines) + "\n" + helpers + "\n" + store + "\n"


# --------------------------------------------------------------------------- parameters

def token_params(t: str, const: bool = True) -> list[str]:
    q = "const T_t* __restrict__" if const else "T_t* __restrict__"
    return [f"{q} {t}_ptr", f"long long {t}_sb", f"long long {t}_sn", f"long long {t}_sh",
            f"long long {t}_sd"]


MASK_PARAMS = ["const unsigned char* __restrict__ mask_ptr", "long long mask_sb", "long long mask_sn"]


def min_blocks(v: Variant, t: Tiles) -> int:
    """Blocks per SM the kernel is compiled for (``__launch_bounds__``' second
    argument).  Tensor-core kernels of <= 256 threads whose shared memory lets two
    blocks share an SM even on sm_80 (164 KB per SM, 1 KB reserved per block) ask
    for 2, which caps ptxas at 65536 / (2 THREADS) registers: latency-bound phases
    (global loads, barriers, the softmax) of one block then overlap the other's
    products.  Everything else, the causal scan included: 1 (no cap below 255)."""
    if not t.mma or t.num_threads > 256 or v.kind not in ("responsibility", "write", "read"):
        return 1  # the causal scan needs ~150 registers: capped at 128 it spills
    return 2 if 2 * (smem_bytes(v, t) + 1024) <= 164 * 1024 else 1


def kernel_open(c: Code, name: str, params: list[str], grid_doc: str, blocks: int = 1) -> None:
    c.params = list(params)
    c(f'extern "C" __global__ void __launch_bounds__(THREADS, {blocks}) {name}(')
    for i, p in enumerate(params):
        c(f"    {p}{',' if i < len(params) - 1 else ') {'}")
    c.depth += 1
    c(f"// grid: {grid_doc}; block: THREADS")


def smem_declare(c: Code, v: Variant, t: Tiles) -> None:
    if t.mma:
        from . import mma

        mma.declare(c, v, t)
    else:
        c("extern __shared__ __align__(16) float smem[];")
        offset = 0
        for name, count in smem_buffers(v, t):
            c(f"float* const {name} = smem + {offset};  // {count} floats")
            offset += count
    c("const int tid = threadIdx.x;", "const int lane = tid & 31;", "const int warp = tid >> 5;")


def bh_indices(c: Code, axis: str = "x") -> None:
    c(f"const long long bh = blockIdx.{axis};", "const long long b = bh / H;",
      "const long long h = bh % H;")


def segment_range(c: Code) -> None:
    c("const long long seg = blockIdx.y;",
      "const long long start = seg * SEG;",
      "const long long end = start + SEG < N ? start + SEG : N;")


def token_base(c: Code, t: str, const: bool = True, vec: bool = False) -> None:
    """``{t}_base``: the (b, h) row of token tensor ``t``; ``vec`` (MMA kernels, 16-bit
    tokens): also ``{t}_vec``, true when every row of (b, h) starts 16-byte aligned
    and its elements are contiguous, so that 8 tokens at a column multiple of 8 are
    one 16-byte vector (the strides are the caller's: any other layout takes the
    scalar path)."""
    q = "const T_t*" if const else "T_t*"
    c(f"{q} const {t}_base = {t}_ptr + b * {t}_sb + h * {t}_sh;  // 64-bit offsets")
    if vec:
        c(f"[[maybe_unused]] const bool {t}_vec = {t}_sd == 1 && ({t}_sn & 7) == 0 && "
          f"(reinterpret_cast<unsigned long long>({t}_base) & 15) == 0;  // 16-byte rows")


# --------------------------------------------------------------------------- state

def load_v_tile(c: Code, mma: bool = False, wide: bool = False) -> None:
    """``v_s`` [BLOCK_N, BLOCK_DV]: values of rows n0 + i, columns dv0 + j (zeros outside).
    MMA kernels: ``v_t`` in the token dtype (a copy, no rounding) and, ``wide``,
    ``v_w`` in W (the slot-norm scan's att . v)."""
    if not mma:
        c("// values: v_s [BLOCK_N, BLOCK_DV]")
        c.open("for (int idx = tid; idx < BLOCK_N * BLOCK_DV; idx += THREADS)")
        c("const int i = idx / BLOCK_DV, j = idx % BLOCK_DV;",
          "const long long row = n0 + i;",
          "v_s[idx] = (row < end && dv0 + j < DV) ? "
          "to_f(v_base[row * v_sn + (long long)(dv0 + j) * v_sd]) : 0.f;")
        c.close()
        return
    c("// values: v_t [BLOCK_N, BLOCK_DV] (MMA operand, row stride BDH; zeros outside)"
      + ("; v_w: the same in W" if wide else ""))
    c("// 16-byte vectors when v's rows allow (v_vec) and DV % 8 == 0: 8 columns are all"
      " in or all out")
    c.open("if (DV % 8 == 0 && v_vec)")
    c.open("for (int idx = tid; idx < BLOCK_N * (BLOCK_DV / 8); idx += THREADS)")
    c("const int i = idx / (BLOCK_DV / 8), j = (idx % (BLOCK_DV / 8)) * 8;",
      "const long long row = n0 + i;",
      "const uint4 u = (row < end && dv0 + j < DV) ? *reinterpret_cast<const uint4*>("
      "v_base + row * v_sn + dv0 + j) : make_uint4(0u, 0u, 0u, 0u);",
      "*reinterpret_cast<uint4*>(v_t + i * BDH + j) = u;  // rows 16-byte aligned (BDH % 8 == 0)")
    if wide:
        c("float f[8];", "unpack8(u, f);",
          "#pragma unroll", "for (int m = 0; m < 8; ++m) v_w[i * BDH + j + m] = cvt_W(f[m]);")
    c.close()
    c.close(" else {")
    c.depth += 1
    v_tile_scalar(c, "BDH", wide)
    c.close()


def v_tile_scalar(c: Code, stride: str, wide: bool = False) -> None:
    """The scalar path of a 16-bit v tile: ``v_t`` [BLOCK_N, BLOCK_DV] (row stride
    ``stride``) one token at a time, any strides, zeros outside (and ``v_w`` in W)."""
    c.open("for (int idx = tid; idx < BLOCK_N * BLOCK_DV; idx += THREADS)")
    c("const int i = idx / BLOCK_DV, j = idx % BLOCK_DV;",
      "const long long row = n0 + i;",
      "const T_t x = (row < end && dv0 + j < DV) ? "
      "v_base[row * v_sn + (long long)(dv0 + j) * v_sd] : cvt_T(0.f);",
      f"v_t[i * {stride} + j] = x;")
    if wide:
        c(f"v_w[i * {stride} + j] = cvt_W(to_f(x));")
    c.close()


def store_y_tile(c: Code, row_norm: bool) -> None:
    """MMA kernels: y rows n0 + i, columns dv0 + j from y_s [BLOCK_N, BLOCK_DV] (float,
    stride SP), divided by den_s[i] for the row norm; 16-byte vectors of 8 tokens
    when y's rows allow (y_vec) and DV % 8 == 0, else one token at a time."""
    value = "y_s[i * SP + j] / den_s[i]" if row_norm else "y_s[i * SP + j]"
    c(f"// y = {value} (rows < end, columns < DV)")
    c.open("if (DV % 8 == 0 && y_vec)")
    c.open("for (int idx = tid; idx < BLOCK_N * (BLOCK_DV / 8); idx += THREADS)")
    c("const int i = idx / (BLOCK_DV / 8), j = (idx % (BLOCK_DV / 8)) * 8;",
      "const long long row = n0 + i;")
    c.open("if (row < end && dv0 + j < DV)")
    c("const float4 lo = *reinterpret_cast<const float4*>(y_s + i * SP + j);  // SP % 4 == 0",
      "const float4 hi = *reinterpret_cast<const float4*>(y_s + i * SP + j + 4);",
      "float f[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};")
    if row_norm:
        c("const float den = den_s[i];", "#pragma unroll", "for (int m = 0; m < 8; ++m) f[m] = f[m] / den;")
    c("*reinterpret_cast<uint4*>(y_base + row * y_sn + dv0 + j) = pack8(f);")
    c.close()
    c.close()
    c.close(" else {")
    c.depth += 1
    c.open("for (int idx = tid; idx < BLOCK_N * BLOCK_DV; idx += THREADS)")
    c("const int i = idx / BLOCK_DV, j = idx % BLOCK_DV;",
      "const long long row = n0 + i;",
      f"if (row < end && dv0 + j < DV) store_T(y_base + row * y_sn + (long long)(dv0 + j) * y_sd, "
      f"{value});")
    c.close()
    c.close()


def state_zero(c: Code, mma: bool = False) -> None:
    if mma:  # S_s [KPAD, BLOCK_DV], stride SP: padded rows k >= K stay 0
        c("for (int idx = tid; idx < KS * BLOCK_DV; idx += THREADS) "
          "S_s[(idx / BLOCK_DV) * SP + idx % BLOCK_DV] = 0.f;")
    else:
        c("for (int idx = tid; idx < K * BLOCK_DV; idx += THREADS) S_s[idx] = 0.f;")
    c("for (int k = tid; k < K; k += THREADS) n_s[k] = 0.f;")


def column_sum_parts(threads: int, block_n: int, K: int) -> int:
    """Lanes per k of the column sum n += colsum(rk) (a power of two <= 32 and <=
    BLOCK_N): as many as THREADS allows for K columns."""
    parts = 1
    while parts * 2 <= min(32, block_n) and K * parts * 2 <= threads:
        parts *= 2
    return parts


def state_update(c: Code, v: Variant, t: Tiles) -> None:
    """S_s[k, j] += sum_i rk_s[i, k] v_s[i, j];  n_s[k] += sum_i rk_s[i, k].
    MMA: S_s += rk_t^T v_t on tensor cores (token dtype, float32 accumulation);
    n from the float32 responsibilities."""
    mma = bool(t.mma)
    if mma:
        from .mma import Operand, Term, product

        product(c, "state update S_s [KPAD, BLOCK_DV] += rk^T v (token dtype)", "S_s", "SP",
                "KPAD / 16", "BLOCK_DV / 16",
                [Term(Operand("rk_t", "KH", "col"), Operand("v_t", "BDH", "row"), "BLOCK_N",
                      "T_t")], init="load")
        c("// n += colsum(rk) in float32 (owner k: fixed order)")
    else:
        c("// state update: S += rk^T v, n += colsum(rk)  (owner (k, j): fixed order)")
        c.open()
        c("const int j = tid % BLOCK_DV;")
        c.open("for (int k = tid / BLOCK_DV; k < K; k += THREADS / BLOCK_DV)")
        c("float a = 0.f;", "#pragma unroll 4")
        c("for (int i = 0; i < BLOCK_N; ++i) a = fmaf(rk_s[i * KP + k], v_s[i * BLOCK_DV + j], a);",
          "S_s[k * BLOCK_DV + j] += a;")
        c.close()
        c.close()
    parts = column_sum_parts(t.num_threads, t.block_n, v.K)
    c(f"// n_s[k] += sum_i rk_s[i, k]: NP = {parts} lanes per k (an aligned group of a warp) "
      "sum rows p, p + NP, ..., then a shuffle tree (fixed order)")
    c.open()
    c(f"constexpr int NP = {parts};")
    c.open("for (int e0 = 0; e0 < K * NP; e0 += THREADS)")
    c("const int k = (e0 + tid) / NP, p = tid % NP;", "float a = 0.f;")
    c("if (k < K) for (int i = p; i < BLOCK_N; i += NP) a += rk_s[i * KP + k];")
    c("#pragma unroll",
      "for (int o = NP / 2; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);  // every lane",
      "if (k < K && p == 0) n_s[k] += a;")
    c.close()
    c.close()


def state_store(c: Code, s: str, n: str, base_s: str, base_n: str, mma: bool = False) -> None:
    """Write S_s / n_s to float32 ``{s}`` at ``base_s + k * {s}_sk + dv * {s}_sdv`` (and
    n from the first Dv block only)."""
    c.open("for (int idx = tid; idx < K * BLOCK_DV; idx += THREADS)")
    c("const int k = idx / BLOCK_DV, j = idx % BLOCK_DV;")
    at = "S_s[k * SP + j]" if mma else "S_s[idx]"
    c(f"if (dv0 + j < DV) {s}_ptr[{base_s} + k * {s}_sk + (long long)(dv0 + j) * {s}_sdv] = {at};")
    c.close()
    c.open("if (blockIdx.z == 0)")
    c(f"for (int k = tid; k < K; k += THREADS) {n}_ptr[{base_n} + k * {n}_sk] = n_s[k];")
    c.close()
