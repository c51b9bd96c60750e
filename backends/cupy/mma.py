"""Tensor-core products of the CuPy backend (config knob ``mma=1``, 16-bit tokens).

With ``mma=1`` the big products of every kernel run on tensor cores through
WMMA (``nvcuda::wmma`` from <mma.h>, sm_80+), float32 accumulation, over
tiles in shared memory; everything else (softmax, norms, |x|^2, n) stays on
CUDA cores in float32.  One helper, :func:`product`, emits

    C [16 MT, 16 NT] (+)= sum over terms of A [16 MT, KD] . B [KD, 16 NT]

with one warp per 16 x 16 tile of C (tile t = warp, warp + NWARPS, ...): a
fixed owner and a fixed order of the k steps, so results are deterministic.
C is a float32 tile in shared memory (loaded, or zero, before the terms and
stored after them), A and B are shared tiles read row- or column-major.

Precision per product (the Triton backend's choices, backends/triton/variant.py
``constants``; T = token dtype, W = bfloat16):

  logits  x . b^T, (x*x) . a^T   tf32 with a hi/lo split ("3xTF32", ~float32):
                                 b, a = hi + lo, both tf32; x (16-bit) is exact
                                 in tf32 (f16 has tf32's 11 significant bits,
                                 bf16 8), so x . b takes 2 MMAs (x b_hi + x b_lo);
                                 x*x (exact in float32) needs the split too:
                                 xx_hi a_hi + xx_hi a_lo + xx_lo a_hi (the
                                 dropped xx_lo a_lo is ~2^-22 of the product).
                                 Plain tf32 (11 bits) flips near-tied components:
                                 the logits cancel (mixture.py's docstring).
  slot_write  S += r^T v         T x T: r in [0, 1] and v in their own dtype.
  slot_read   y = w S            W x W: S (float32 state) and the slot weights
                                 r / (n + eps) (up to 1/eps) overflow float16.
  causal scan att = rq . rk^T    T x T (row norm); W x W (slot norm: w . rk^T)
              att . v            T x T (row); W x W (slot: att carries 1/(n+eps))
              rq . S             W x W
              S += rk^T v        T x T

Shared-memory layout (:func:`buffers`): every buffer starts 32-byte aligned
(WMMA's pointer rule); row strides are multiples of 16 bytes (WMMA's ldm)
plus 16 bytes, so that the 8 rows one fragment load touches at a time fall
in different banks: float tiles ``X + 4``, 16-bit tiles ``X + 8`` with X a
multiple of 16 (K -> KPAD, BLOCK_N, BLOCK_DV) or 8 (DC).  K is padded to KPAD
(a multiple of 16) with zero columns (coefficients of k >= K are zero, copies
of r hold 0 there, so padded components enter no softmax and no product);
BLOCK_N, BLOCK_DV (multiples of 16) and DC (of 8) are config constraints
(space.validate).  Rows past the sequence are computed, then dropped: keys
past ``end`` have r = 0, queries past it are not stored.  The logit staging
tiles are dead once both responsibilities of a chunk are computed, so the
scan's and the read's output tiles share their memory.

Global memory: token tiles (the logits' x chunk, v, y) move as 16-byte vectors
of 8 tokens (``unpack8`` / ``pack8``) when the block's rows allow it (a runtime
flag ``{t}_vec``: unit element stride, row stride a multiple of 8, 16-byte
aligned (b, h) base; and D resp. DV a multiple of 8), the coefficient tables
as float4 when 16-byte aligned and D % 4 == 0; any other layout takes the
scalar path with its 64-bit strided offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prelude import Code, Tiles, Variant, mixtures

WIDE = "bf16"  # dtype W of the operands of products with the state S and slot weights


def pad16(x: int) -> int:
    return -(-x // 16) * 16


def wide_is_token(v: Variant) -> bool:
    """W = T: bfloat16 tokens; their W copies are their T copies (aliases)."""
    return v.dtype == WIDE


# --------------------------------------------------------------------------- header

def constants(v: Variant, t: Tiles) -> list[str]:
    """Row strides of the MMA layout (the module docstring says why +4 / +8)."""
    return [f"[[maybe_unused]] constexpr int KPAD = {pad16(v.K)};  // K rounded up to the MMA tile; "
            "columns >= K hold zeros",
            "[[maybe_unused]] constexpr int KS = KPAD;  // rows of the state tile S_s",
            "[[maybe_unused]] constexpr int KP = KPAD + 4;  // row stride (floats) of float [BLOCK_N, K] tiles",
            "[[maybe_unused]] constexpr int KH = KPAD + 8;  // row stride (16-bit) of T/W [BLOCK_N, K] tiles",
            "[[maybe_unused]] constexpr int DCP = DC + 4;",
            "[[maybe_unused]] constexpr int BNP = BLOCK_N + 4;",
            "[[maybe_unused]] constexpr int BNH = BLOCK_N + 8;",
            "[[maybe_unused]] constexpr int SP = BLOCK_DV + 4;  // row stride of float [., BLOCK_DV] tiles",
            "[[maybe_unused]] constexpr int BDH = BLOCK_DV + 8;  // row stride of T/W [., BLOCK_DV] tiles"]


INCLUDE = "#include <mma.h>"

# 16-byte token vectors, shared with the register-fragment kernels (frag.py)
VECTORS = r"""
// 16-byte vectors of 8 tokens (T_t is 16-bit in every MMA kernel): element m in bits
// [16 (m % 2), 16 (m % 2) + 16) of word m / 2 (little endian, the order in memory)
GMA_DEVICE void unpack8(const uint4 u, float* f) {
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    f[2 * m] = to_f(T_from_bits(static_cast<unsigned short>(w[m] & 0xffffu)));
    f[2 * m + 1] = to_f(T_from_bits(static_cast<unsigned short>(w[m] >> 16)));
  }
}

GMA_DEVICE uint4 pack8(const float* f) {
  unsigned w[4];
#pragma unroll
  for (int m = 0; m < 4; ++m)
    w[m] = static_cast<unsigned>(T_bits(cvt_T(f[2 * m])))
           | (static_cast<unsigned>(T_bits(cvt_T(f[2 * m + 1]))) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}
"""

HELPERS = r"""
// tensor cores (WMMA): fragment types and the tf32 split
using namespace nvcuda;
template <class L> using FragA32 = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, L>;
template <class L> using FragB32 = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, L>;
template <class X, class L> using FragA16 = wmma::fragment<wmma::matrix_a, 16, 16, 16, X, L>;
template <class X, class L> using FragB16 = wmma::fragment<wmma::matrix_b, 16, 16, 16, X, L>;
typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> Acc32;   // tf32 products
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc16;  // 16-bit products

// round to tf32 (the MMA reads the top 19 bits of each float)
template <class F> GMA_DEVICE void round_tf32(F& f) {
#pragma unroll
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
}

// hi = tf32(x), lo = tf32(x - hi): x = hi + lo to ~2^-22 (the "3xTF32" operands)
template <class F> GMA_DEVICE void split_tf32(F& hi, F& lo) {
#pragma unroll
  for (int e = 0; e < hi.num_elements; ++e) {
    const float x = hi.x[e];
    hi.x[e] = wmma::__float_to_tf32(x);
    lo.x[e] = wmma::__float_to_tf32(x - hi.x[e]);
  }
}

// the same for x*x (exact in float32 for 16-bit x) of the loaded x
template <class F> GMA_DEVICE void square_split_tf32(F& hi, F& lo) {
#pragma unroll
  for (int e = 0; e < hi.num_elements; ++e) {
    const float x = hi.x[e] * hi.x[e];
    hi.x[e] = wmma::__float_to_tf32(x);
    lo.x[e] = wmma::__float_to_tf32(x - hi.x[e]);
  }
}
"""


# --------------------------------------------------------------------------- shared memory

@dataclass(frozen=True)
class Buffer:
    """One dynamic shared-memory buffer of an MMA kernel: ``count`` elements of
    ``ctype`` at ``offset`` floats (a multiple of 8: 32-byte aligned); ``alias``:
    another buffer's name when the two are the same memory (W copies of bfloat16
    tokens)."""

    name: str
    ctype: str  # float | T_t | W_t
    count: int
    offset: int
    alias: str = ""

    @property
    def floats(self) -> int:
        return self.count if self.ctype == "float" else -(-self.count // 2)


def _floats(ctype: str, count: int) -> int:
    n = count if ctype == "float" else -(-count // 2)
    return -(-n // 8) * 8  # 32-byte steps


def buffers(v: Variant, t: Tiles) -> list[Buffer]:
    """The MMA kernels' shared memory, in order (see the module docstring)."""
    kpad = pad16(v.K)
    kp, kh, dcp = kpad + 4, kpad + 8, t.d_chunk + 4
    bn, bnp, bnh = t.block_n, t.block_n + 4, t.block_n + 8
    sp, bdh = t.block_dv + 4, t.block_dv + 8
    mixes = mixtures(v)
    covs = {cov for _, cov, _ in mixes}
    # logit staging: a D chunk of the tokens and of the coefficients (one mixture at a time)
    stage = [("x_s", "float", bn * dcp), ("b_s", "float", kpad * dcp)]
    if "diag" in covs:
        stage.append(("a_s", "float", kpad * dcp))
    if "spherical" in covs:
        stage.append(("xx_s", "float", bn))
    # output tiles, alive only after the logits of a chunk: they share the staging memory
    post: list[tuple[str, str, int]] = []
    if v.kind == "read":
        post = [("y_s", "float", bn * sp)]
    elif v.kind == "scan":
        post = [("att_s", "float", bn * bnp),
                ("att_t" if v.norm == "row" else "att_w", "T_t" if v.norm == "row" else "W_t",
                 bn * bnh),
                ("y_s", "float", bn * sp)]
    keep: list[tuple[str, str, int]] = []
    for m, cov, _ in mixes:
        keep.append((f"{m}_c_s", "float", v.K))
        if cov == "spherical":
            keep.append((f"{m}_asq_s", "float", v.K))
    aliases: dict[str, str] = {}
    wide_copy = not wide_is_token(v)
    if v.kind == "responsibility":
        keep.append(("rq_s", "float", bn * kp))
    elif v.kind == "write":
        keep += [("rk_s", "float", bn * kp), ("rk_t", "T_t", bn * kh), ("v_t", "T_t", bn * bdh),
                 ("S_s", "float", kpad * sp), ("n_s", "float", v.K)]
    elif v.kind == "read":
        keep += [("rq_s", "float", bn * kp), ("rq_w", "W_t", bn * kh), ("S_w", "W_t", kpad * bdh),
                 ("n_s", "float", v.K)]
        if v.norm == "row":
            keep.append(("den_s", "float", bn))
    elif v.kind == "scan":
        keep += [("rq_s", "float", bn * kp), ("rk_s", "float", bn * kp)]
        if v.norm == "row":
            keep.append(("rq_t", "T_t", bn * kh))
        keep += [("rq_w", "W_t", bn * kh), ("rk_t", "T_t", bn * kh)]
        if v.norm == "slot":
            keep.append(("rk_w", "W_t", bn * kh))
        keep.append(("v_t", "T_t", bn * bdh))
        if v.norm == "slot":
            keep.append(("v_w", "W_t", bn * bdh))
        keep += [("S_s", "float", kpad * sp), ("S_w", "W_t", kpad * bdh), ("n_s", "float", v.K)]
        if v.norm == "row":
            keep.append(("den_s", "float", bn))
        if not wide_copy:  # bfloat16 tokens: the W copies are the T copies
            aliases = {"rq_w": "rq_t", "rk_w": "rk_t", "v_w": "v_t"}
            if v.norm == "slot":  # no T copy of rq: rq_w is the one
                aliases.pop("rq_w")
    out: list[Buffer] = []
    at = 0
    region = at
    for name, ctype, count in stage:
        out.append(Buffer(name, ctype, count, at))
        at += _floats(ctype, count)
    end_stage, at = at, region
    for name, ctype, count in post:
        out.append(Buffer(name, ctype, count, at))
        at += _floats(ctype, count)
    at = max(at, end_stage)
    for name, ctype, count in keep:
        if name in aliases:
            out.append(Buffer(name, ctype, count, next(b.offset for b in out
                                                          if b.name == aliases[name]),
                              alias=aliases[name]))
            continue
        out.append(Buffer(name, ctype, count, at))
        at += _floats(ctype, count)
    return out


def smem_floats(v: Variant, t: Tiles) -> int:
    return max((b.offset + _floats(b.ctype, b.count) for b in buffers(v, t)), default=0)


def declare(c: Code, v: Variant, t: Tiles) -> None:
    c("extern __shared__ __align__(128) float smem[];")
    for b in buffers(v, t):
        if b.alias:
            c(f"{b.ctype}* const {b.name} = {b.alias};  // W_t is T_t: the same copy")
        elif b.ctype == "float":
            c(f"float* const {b.name} = smem + {b.offset};  // {b.count} floats")
        else:
            c(f"{b.ctype}* const {b.name} = reinterpret_cast<{b.ctype}*>(smem + {b.offset});  "
              f"// {b.count} x {b.ctype}")


# --------------------------------------------------------------------------- products

@dataclass(frozen=True)
class Operand:
    """A shared-memory tile: element (r, c) at ``ptr[r * ld + c]`` ("row") or
    ``ptr[c * ld + r]`` ("col").  ``split`` (tf32 terms): "round" (the value is
    rounded to tf32; exact for 16-bit tokens), "hi_lo" (3xTF32 operand) or
    "square" (the square of the stored value, split hi/lo)."""

    ptr: str
    ld: str
    layout: str = "row"
    split: str = "round"


@dataclass(frozen=True)
class Term:
    """A [M, KD] . B [KD, N] in ``dtype`` ("tf32", "T_t" or "W_t"); ``kd``: a C
    expression of the reduction length (a multiple of the MMA's k, may use mt)."""

    a: Operand
    b: Operand
    kd: str
    dtype: str


def _tile(o: Operand, rows: str, cols: str) -> str:
    """Pointer to the tile at (rows, cols) of operand ``o``."""
    if o.layout == "row":
        return f"{o.ptr} + ({rows}) * {o.ld} + {cols}"
    return f"{o.ptr} + ({cols}) * {o.ld} + {rows}"


def _layout(o: Operand) -> str:
    return "wmma::row_major" if o.layout == "row" else "wmma::col_major"


def product(c: Code, what: str, out: str, ld: str, mt: str, nt: str, terms: list[Term],
            init: str = "zero", skip_upper: bool = False) -> None:
    """C [16 mt, 16 nt] at ``out`` (float, row stride ``ld``) (+)= sum of ``terms``,
    one warp per 16 x 16 tile.  ``init``: "zero", "load" (accumulate into C) or a
    C condition (zero where true, else load).  ``skip_upper``: tiles above the
    diagonal (nt > mt) are neither computed nor stored (a causal product whose
    readers mask them).  Every call is preceded by a barrier that publishes A, B
    (and C) and must be followed by one before C is read."""
    tf32 = {tm.dtype == "tf32" for tm in terms}
    assert len(tf32) == 1, "tf32 and 16-bit terms have different accumulators"
    is32 = tf32.pop()
    step = 8 if is32 else 16
    acc = "Acc32" if is32 else "Acc16"
    c(f"// {what}: one warp per 16x16 tile of C, float32 accumulation")
    c.open(f"for (int t = warp; t < ({mt}) * ({nt}); t += NWARPS)")
    c(f"const int mt = t / ({nt}), nt = t % ({nt});")
    if skip_upper:
        c("if (nt > mt) continue;  // above the diagonal: masked by every reader")
    c(f"float* const c_tile = {out} + (mt * 16) * {ld} + nt * 16;", f"{acc} acc;")
    if init == "zero":
        c("wmma::fill_fragment(acc, 0.f);")
    elif init == "load":
        c(f"wmma::load_matrix_sync(acc, c_tile, {ld}, wmma::mem_row_major);")
    else:
        c(f"if ({init}) wmma::fill_fragment(acc, 0.f);",
          f"else wmma::load_matrix_sync(acc, c_tile, {ld}, wmma::mem_row_major);")
    groups: list[list[Term]] = []  # terms of one reduction length share a k loop
    for tm in terms:
        if groups and groups[-1][0].kd == tm.kd:
            groups[-1].append(tm)
        else:
            groups.append([tm])
    for group in groups:
        _loop(c, group, step)
    c(f"wmma::store_matrix_sync(c_tile, acc, {ld}, wmma::mem_row_major);")
    c.close()


def _loop(c: Code, terms: list[Term], step: int) -> None:
    """One k loop over ``terms`` (equal kd): each distinct operand tile is loaded
    once per step (x of the logits serves x . b and (x*x) . a)."""
    # tf32 (the logits): ~20 fragment registers per k step, one step at a time keeps the
    # kernels within 128 registers (two blocks per SM, prelude.min_blocks)
    c("#pragma unroll 1" if terms[0].dtype == "tf32" else "#pragma unroll 2")
    c.open(f"for (int kk = 0; kk < {terms[0].kd}; kk += {step})")
    loaded: dict[tuple, str] = {}

    def load(side: str, o: Operand, ptr: str) -> str:
        """The fragment variable holding the raw tile (loaded on first use)."""
        key = (side, o.ptr, o.ld, o.layout)
        if key not in loaded:
            name = f"{side}_tile{len(loaded)}"
            frag = (f"{'FragA32' if side == 'a' else 'FragB32'}<{_layout(o)}>"
                    if terms[0].dtype == "tf32" else
                    f"{'FragA16' if side == 'a' else 'FragB16'}<{terms[0].dtype}, {_layout(o)}>")
            c(f"{frag} {name};", f"wmma::load_matrix_sync({name}, {ptr}, {o.ld});")
            loaded[key] = name
        return loaded[key]

    for i, tm in enumerate(terms):
        a = load("a", tm.a, _tile(tm.a, "mt * 16", "kk"))
        b = load("b", tm.b, _tile(tm.b, "kk", "nt * 16"))
        if tm.dtype != "tf32":
            c(f"wmma::mma_sync(acc, {a}, {b}, acc);")
            continue
        names = {}
        for side, o, raw in (("a", tm.a, a), ("b", tm.b, b)):
            frag = f"{'FragA32' if side == 'a' else 'FragB32'}<{_layout(o)}>"
            hi, lo = f"{side}{i}_hi", f"{side}{i}_lo"
            if o.split == "round":
                c(f"{frag} {hi} = {raw};", f"round_tf32({hi});")
                names[side] = (hi, None)
            else:
                fn = "split_tf32" if o.split == "hi_lo" else "square_split_tf32"
                c(f"{frag} {hi} = {raw}, {lo};", f"{fn}({hi}, {lo});")
                names[side] = (hi, lo)
        (a_hi, a_lo), (b_hi, b_lo) = names["a"], names["b"]
        # the small products first, then the big one
        if b_lo:
            c(f"wmma::mma_sync(acc, {a_hi}, {b_lo}, acc);")
        if a_lo:
            c(f"wmma::mma_sync(acc, {a_lo}, {b_hi}, acc);")
        c(f"wmma::mma_sync(acc, {a_hi}, {b_hi}, acc);")
    c.close()
