"""Register-fragment tensor-core kernels of the CuPy backend (config knob ``mma=2``).

``mma=1`` (mma.py) runs every product through WMMA on tiles in shared memory:
the logits go to shared memory, the softmax reads them back, and copies of the
responsibilities are written for the next product.  ``mma=2`` keeps the
products' accumulators in registers with ``mma.sync.m16n8k16`` and loads the
operands with ``ldmatrix``, so that the logits, the softmax over k and the
responsibilities that feed the next product never leave the registers (the
layout flash-attention uses: an accumulator fragment of one MMA is, converted
to 16 bits, the A fragment of the next).  It serves gma_write_fwd,
gma_read_fwd and gma_scan_fwd for 16-bit tokens and K <= 128.

Logits in bfloat16 pieces.  The expanded logits cancel (mixture.py), so they need
~float32 products; the Triton backend uses 3xTF32.  Here every operand is split
into bfloat16 pieces whose sum is exact, and the products of pieces whose
magnitudes multiply to more than 2^-24 of the term are kept (bfloat16 products
are exact in the float32 accumulator):

  coefficients  b = b1 + b2 + b3, a = a1 + a2 + a3   (magnitudes 1, 2^-8, 2^-16)
  bf16 tokens   x exact;            x*x = xx1 + xx2 (exact: 16 significant bits)
  f16 tokens    x = x1 + x2 (exact: 11 bits); x*x = xx1 + xx2 + xx3 (22 bits)

bf16: 3 MMAs for x.b and 5 for (x*x).a per 16 columns of D; f16: 5 and 6.  The
dropped terms are below 2^-24 of each product, and the splits are exact, so the
logits are as good as a float32 FMA chain (3xTF32 drops ~2^-22).

write (gma_write_fwd): warps = KW x TG.  Warp (kw, tg) owns MK 16-row tiles of
the K axis (rows kw*MK*16 ...) and TOK tokens (tg*TOK ...) of each BLOCK_N tile,
and computes the transposed logits L^T [16 MK, TOK] = B . x^T + A . (x*x)^T, so
that its accumulator is, as 16-bit pairs, the A operand of S += r^T v.  The
softmax over k spans the KW warps of a token group: each warp reduces its rows
(registers, then shuffles over the 8 row groups of a fragment), publishes
(max, sum of exp2) per token, and after one barrier every warp rescales its
exp2 values by exp2(m_w - M) / total: one exchange, no second exp2.  S and n
accumulate in registers over the segment; the TG token groups' partials are
added in shared memory in a fixed order (tg = 0, 1, ...) at the end, so
results are deterministic.

read (gma_read_fwd): every warp sweeps its own 16-token steps (no block barrier
in the token loop): L [16, KPAD] = x . B^T + (x*x) . A^T in registers, the
softmax over k within the warp (shuffles over the 4 lanes of a row), and
y = w S with w's accumulator as the A operand and S (bfloat16, once per block)
as B through ``ldmatrix.trans``.  y goes through the warp's shared tile (its
token pieces are dead by then) to 16-byte stores.

scan (gma_scan_fwd, emit_scan_frag.py): every warp owns 16 tokens of a chunk
of 16 NWARPS; it computes rk and rq of its tokens like read (the pieces of its
raw token tile built in registers from the ldmatrix fragments, so that the
tile holds x alone), publishes rk (16 bits) and its column sums, and after one
barrier computes its rows of the intra-chunk product and y; the state S [KPAD,
BLOCK_DV] stays in float32 registers across chunks, its 16-row tiles split
among the warps (MS per warp), with a 16-bit copy in shared memory for rq . S.

Shared memory: coefficient pieces [KPAD, DH] (DH = DPAD + 8 16-bit elements, so
that the 8 rows of an ``ldmatrix`` fall in different banks), split once per
block from gma_coefficients' float32 tables; token pieces [rows, DH]; v or S
[rows, BLOCK_DV + 8].  Padded components (k >= K) have zero coefficients and
c = -inf, so they get r = 0; padded columns of D are zero in x and in the
coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prelude import Code, Tiles, Variant

MAX_KPAD = 128  # accumulator registers: L^T (write) and L (read) hold 16 MK resp. KPAD columns


def pad16(x: int) -> int:
    return -(-x // 16) * 16


@dataclass(frozen=True)
class Piece:
    """A bfloat16 piece of an operand: ``name`` (shared tile), its magnitude
    exponent (0, -8, -16) and what it is a piece of ("x" or "xx")."""

    name: str
    of: str
    exp: int


def token_pieces(v: Variant, covariance: str) -> list[Piece]:
    if v.dtype == "bf16":
        pieces = [Piece("x1", "x", 0)]
        if covariance == "diag":
            pieces += [Piece("xx1", "xx", 0), Piece("xx2", "xx", -8)]
    else:  # f16: 11 significant bits, x*x 22
        pieces = [Piece("x1", "x", 0), Piece("x2", "x", -8)]
        if covariance == "diag":
            pieces += [Piece("xx1", "xx", 0), Piece("xx2", "xx", -8), Piece("xx3", "xx", -16)]
    return pieces


def coefficient_pieces(covariance: str) -> list[Piece]:
    pieces = [Piece("b1", "b", 0), Piece("b2", "b", -8), Piece("b3", "b", -16)]
    if covariance == "diag":
        pieces += [Piece("a1", "a", 0), Piece("a2", "a", -8), Piece("a3", "a", -16)]
    return pieces


def terms(v: Variant, covariance: str) -> list[tuple[int, int]]:
    """(coefficient piece, token piece) index pairs whose product is kept: x with b,
    x*x with a, magnitude >= 2^-16 of the term; smallest first (they are added to
    the accumulator before the large ones)."""
    cps, tps = coefficient_pieces(covariance), token_pieces(v, covariance)
    pairs = [(ci, ti) for ci, cp in enumerate(cps) for ti, tp in enumerate(tps)
             if {"b": "x", "a": "xx"}[cp.of] == tp.of and cp.exp + tp.exp >= -16]
    return sorted(pairs, key=lambda p: cps[p[0]].exp + tps[p[1]].exp)


# --------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    """Derived sizes of one mma=2 kernel (see the module docstring)."""

    kpad: int   # K padded to KW * MK * 16 (write) or 16 (read)
    dpad: int
    kw: int     # write: warps along K
    mk: int     # write: 16-row tiles of K per warp; scan: of the state S per warp;
                # read: 16-token tiles per warp and step
    tg: int     # write: token groups
    tok: int    # write: tokens per warp and tile

    @property
    def dh(self) -> int:
        return self.dpad + 8


def shape(v: Variant, t: Tiles) -> Shape:
    tiles = pad16(v.K) // 16
    mk = -(-tiles // 4)
    kw = -(-tiles // mk)
    warps = t.num_threads // 32
    if v.kind == "write":
        tg = max(1, warps // kw)
        return Shape(kw * mk * 16, pad16(v.D), kw, mk, tg, t.block_n // tg)
    if v.kind == "scan":
        return Shape(pad16(v.K), pad16(v.D), 1, -(-tiles // max(1, warps)), warps, 16)
    return Shape(pad16(v.K), pad16(v.D), 1, max(1, t.block_n // (16 * warps)), warps, 16)


def scan_registers(v: Variant, t: Tiles) -> int:
    """Accumulator registers per thread of the scan kernel: rq (and, slot norm, the
    prefix of rk beside it; row norm: rk dies before rq), the chunk's affinities,
    y, and the thread's part of S."""
    s = shape(v, t)
    return (s.kpad // 2 * (2 if v.norm == "slot" else 1) + t.block_n // 2 + t.block_dv // 2
            + s.mk * t.block_dv // 2)


SCAN_REGISTERS = 160  # past this ptxas spills at 2 blocks of 128 threads (255 registers)


def problems(v: Variant, t: Tiles) -> list[str]:
    """Why ``t`` cannot run ``v`` with mma=2 (empty when it can)."""
    out = []
    if v.kind not in ("write", "read", "scan"):
        out.append(f"mma=2 serves the write, read and scan kernels, not {v.kind}")
        return out
    if v.dtype not in ("f16", "bf16"):
        out.append(f"mma=2 needs float16/bfloat16 tokens, got {v.dtype}")
    s = shape(v, t)
    if s.kpad > MAX_KPAD:
        out.append(f"mma=2 holds all K in registers: K={v.K} pads to {s.kpad} > {MAX_KPAD}")
    warps = t.num_threads // 32
    if t.block_dv % 16:
        out.append(f"block_dv={t.block_dv} must be a multiple of 16")
    if v.kind == "write":
        if warps % s.kw:
            out.append(f"num_threads={t.num_threads}: the warps must be a multiple of the "
                       f"{s.kw} warps along K (K={v.K})")
        elif t.block_n % (16 * s.tg):
            out.append(f"block_n={t.block_n} must be a multiple of 16 x {s.tg} token groups")
        elif s.tok > 64:
            out.append(f"block_n={t.block_n}: {s.tok} tokens per warp, at most 64")
        elif s.mk * (t.block_dv // 8) * 4 + s.mk * (s.tok // 8) * 4 > 128:
            out.append(f"block_dv={t.block_dv}, block_n={t.block_n}: "
                       f"{s.mk * (t.block_dv + s.tok) // 2} accumulator registers per thread, "
                       f"at most 128")
    elif v.kind == "scan":
        if t.block_n != 16 * warps:
            out.append(f"block_n={t.block_n} must be 16 x the {warps} warps (each warp owns 16 "
                       f"tokens of a chunk)")
        if v.norm == "slot" and v.dtype == "f16":
            out.append("the slot norm's weights need bfloat16 copies of rk and v beside the "
                       "float16 ones (mma=1 keeps them)")
        if scan_registers(v, t) > SCAN_REGISTERS:
            out.append(f"K={v.K}, block_n={t.block_n}, block_dv={t.block_dv}: "
                       f"{scan_registers(v, t)} accumulator registers per thread, at most "
                       f"{SCAN_REGISTERS}")
    else:
        if t.block_n not in (16 * warps, 32 * warps):
            out.append(f"block_n={t.block_n} must be 16 or 32 x the {warps} warps (each warp "
                       f"reads 16 or 32 tokens per step)")
        elif (s.mk * s.kpad + t.block_dv) // 2 > 128:
            out.append(f"K={v.K}, block_n={t.block_n}, block_dv={t.block_dv}: "
                       f"{(s.mk * s.kpad + t.block_dv) // 2} accumulator registers per thread, "
                       f"at most 128")
    return out


def scan_mixtures(v: Variant) -> list[tuple[str, str, str]]:
    """(parameter prefix, covariance, buffer suffix) of the scan's mixtures: one for
    queries and keys, or the queries' and the keys' own."""
    if v.same_mixture:
        return [("m", v.q_covariance, "")]
    return [("mq", v.q_covariance, "q"), ("mk", v.k_covariance, "k")]


def _align(x: int) -> int:
    return -(-x // 128) * 128


def buffers(v: Variant, t: Tiles) -> list[tuple[str, str, int, int]]:
    """(name, ctype, count, byte offset) of the dynamic shared memory."""
    s = shape(v, t)
    cov = v.k_covariance if v.kind == "write" else v.q_covariance
    ncp, ntp = len(coefficient_pieces(cov)), len(token_pieces(v, cov))
    vh = t.block_dv + 8
    out: list[tuple[str, str, int, int]] = []
    at = 0

    def add(name: str, ctype: str, count: int, size: int) -> None:
        nonlocal at
        out.append((name, ctype, count, at))
        at = _align(at + count * size)

    if v.kind == "write":
        coef = ncp * s.kpad * s.dh * 2
        state = s.kpad * (t.block_dv + 4) * 4 + s.kpad * 4
        region = max(coef, state)  # the partial states are added where the coefficients were
        out.append(("coef_s", "W_t", ncp * s.kpad * s.dh, 0))
        out.append(("S_s", "float", s.kpad * (t.block_dv + 4), 0))
        out.append(("n_s", "float", s.kpad, s.kpad * (t.block_dv + 4) * 4))
        at = _align(region)
        add("tok_s", "W_t", ntp * t.block_n * s.dh, 2)
        add("v_t", "T_t", t.block_n * vh, 2)
        add("red_s", "float2", s.kw * t.block_n, 8)
        add("c_s", "float", s.kpad, 4)
        if cov == "spherical":
            add("asq_s", "float", s.kpad, 4)
            add("xsq_s", "float", t.block_n, 4)
    elif v.kind == "scan":
        warps = t.num_threads // 32
        for _, mcov, sfx in scan_mixtures(v):
            add(f"coef{sfx}_s", "W_t", len(coefficient_pieces(mcov)) * s.kpad * s.dh, 2)
            add(f"c{sfx}_s", "float", s.kpad, 4)
            if mcov == "spherical":
                add(f"asq{sfx}_s", "float", s.kpad, 4)
        add("S_w", "W_t", s.kpad * vh, 2)
        add("n_s", "float", s.kpad, 4)
        add("nred_s", "float", warps * s.kpad, 4)
        if any(mcov == "spherical" for _, mcov, _ in scan_mixtures(v)):
            add("xsq_s", "float", 16 * warps, 4)
        # the chunk's tiles; the float state S_s (entering the first chunk, leaving the
        # last) where they are, outside the chunk loop
        per_warp = _align(max(16 * s.dh * 2, 16 * vh * 2))
        kh = s.kpad + 8
        tiles = warps * per_warp + _align(t.block_n * kh * 2) + _align(t.block_n * vh * 2)
        out.append(("S_s", "float", s.kpad * (t.block_dv + 4), at))
        out.append(("tok_s", "T_t", warps * per_warp // 2, at))
        out.append(("rk_t", "T_t", t.block_n * kh, at + warps * per_warp))
        out.append(("v_t", "T_t", t.block_n * vh, at + warps * per_warp + _align(t.block_n * kh * 2)))
        at += _align(max(tiles, s.kpad * (t.block_dv + 4) * 4))
    else:
        warps = t.num_threads // 32
        add("coef_s", "W_t", ncp * s.kpad * s.dh, 2)
        add("S_w", "W_t", s.kpad * vh, 2)
        add("n_s", "float", s.kpad, 4)
        add("c_s", "float", s.kpad, 4)
        if cov == "spherical":
            add("asq_s", "float", s.kpad, 4)
            add("xsq_s", "float", s.mk * 16 * warps, 4)
        # per warp: its token rows (raw: the pieces are split in registers), then
        # (aliased) its y tile
        per_warp = _align(max(s.mk * 16 * s.dh * 2, s.mk * 16 * vh * 2))
        out.append(("tok_s", "T_t", warps * per_warp // 2, at))
        at += warps * per_warp
    return out


def smem_bytes(v: Variant, t: Tiles) -> int:
    return max(off + count * {"float": 4, "float2": 8}.get(ct, 2) for _, ct, count, off in buffers(v, t))


def constants(v: Variant, t: Tiles) -> list[str]:
    s = shape(v, t)
    cov = v.k_covariance if v.kind == "write" else v.q_covariance
    out = [f"constexpr int KPAD = {s.kpad};  // K padded with zero-coefficient components",
           f"constexpr int DPAD = {s.dpad};  // D padded to the MMA's k (zero columns)",
           "constexpr int DH = DPAD + 8;  // row stride (16-bit) of token and coefficient tiles",
           "constexpr int VH = BLOCK_DV + 8;  // row stride (16-bit) of v / S tiles",
           "[[maybe_unused]] constexpr int SP = BLOCK_DV + 4;  // row stride of the float state",
           f"[[maybe_unused]] constexpr int NCP = {len(coefficient_pieces(cov))};  // coefficient pieces",
           f"[[maybe_unused]] constexpr int NTP = {len(token_pieces(v, cov))};  // token pieces"]
    if v.kind == "write":
        out += ["constexpr int XC = (BLOCK_N * (DPAD / 8) + THREADS - 1) / THREADS;  "
                "// prefetched 16-byte vectors of k per thread",
                "constexpr int VC = (BLOCK_N * (BLOCK_DV / 8) + THREADS - 1) / THREADS;  // of v"]
        out += [f"constexpr int KW = {s.kw};  // warps along K",
                f"constexpr int MK = {s.mk};  // 16-row tiles of K per warp",
                f"constexpr int TG = {s.tg};  // token groups (warps along the tile)",
                f"constexpr int TOK = {s.tok};  // tokens per warp and tile"]
    elif v.kind == "scan":
        out += [f"constexpr int MS = {s.mk};  // 16-row tiles of the state S per warp",
                "constexpr int KH = KPAD + 8;  // row stride (16-bit) of the rk tile",
                "constexpr int PER_WARP = %d;  // 16-bit elements of a warp's token / y tile"
                % (_align(max(16 * s.dh * 2, 16 * (t.block_dv + 8) * 2)) // 2)]
    else:
        out.append(f"constexpr int MT = {s.mk};  // 16-token tiles per warp and step")
        out.append("constexpr int XC = (16 * MT * (DPAD / 8) + 31) / 32;  // prefetched 16-byte "
                   "vectors of q per lane")
        out.append("constexpr int PER_WARP = %d;  // 16-bit elements of a warp's tile"
                   % (_align(max(s.mk * 16 * s.dh * 2, s.mk * 16 * (t.block_dv + 8) * 2)) // 2))
    return out


def declare(c: Code, v: Variant, t: Tiles) -> None:
    """The kernel's shared buffers (``buffers``) and its thread indices."""
    c("extern __shared__ __align__(128) unsigned char smem_raw[];")
    for name, ctype, count, off in buffers(v, t):
        c(f"{ctype}* const {name} = reinterpret_cast<{ctype}*>(smem_raw + {off});  "
          f"// {count} x {ctype}")
    c("const int tid = threadIdx.x;", "const int lane = tid & 31;", "const int warp = tid >> 5;")


HELPERS = r"""
// mma.sync / ldmatrix (PTX, sm_80+): fragments of m16n8k16 (16-bit A, B; float32 C)
GMA_DEVICE unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
GMA_DEVICE void ldsm_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
GMA_DEVICE void ldsm_x4_t(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
GMA_DEVICE void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
GMA_DEVICE void mma_f16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
GMA_DEVICE unsigned pack_bf16(float lo, float hi) {
  __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&p);
}
GMA_DEVICE unsigned pack_f16(float lo, float hi) {
  __half2 p = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&p);
}
// two 16-bit tokens of a fragment register as floats (the lower column first), and
// two bfloat16 pieces into one register
GMA_DEVICE float2 unpack_T2(unsigned u) {
  const T_t* p = reinterpret_cast<const T_t*>(&u);
  return make_float2(to_f(p[0]), to_f(p[1]));
}
GMA_DEVICE unsigned pack_w2(W_t lo, W_t hi) {
  return static_cast<unsigned>(__bfloat16_as_ushort(lo))
         | (static_cast<unsigned>(__bfloat16_as_ushort(hi)) << 16);
}
// 2^x on the SFU alone (ex2.approx.ftz: relative error ~2^-22, -inf -> 0, results below
// 2^-126 flush to zero); exp2f adds a compare and two multiplies per call to keep subnormal
// results, which the softmax's responsibilities (relative to 1) do not need
GMA_DEVICE float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// x = p[0] + p[1] + ... in bfloat16 pieces (each the rounding of what is left)
template <int NP> GMA_DEVICE void split_bf16(float x, W_t (&p)[NP]) {
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    p[i] = __float2bfloat16_rn(x);
    x -= __bfloat162float(p[i]);
  }
}
"""


# --------------------------------------------------------------------------- code pieces

def _mma_T(v: Variant) -> tuple[str, str]:
    """(mma, pack) of products in the token dtype."""
    return ("mma_bf16", "pack_bf16") if v.dtype == "bf16" else ("mma_f16", "pack_f16")


def emit_coefficients(c: Code, m: str, covariance: str, kpad_rows: str = "KPAD",
                      sfx: str = "") -> None:
    """coef_s: head h's a and b split into bfloat16 pieces [NCP][KPAD][DH] (zero outside
    K x D); c_s (and asq_s) [KPAD] with -inf (0) for the padded components (``sfx``:
    the buffers coef{sfx}_s, c{sfx}_s, asq{sfx}_s of a scan with two mixtures)."""
    cps = coefficient_pieces(covariance)
    c("// coefficients of head h (gma_coefficients' float32 tables) in bfloat16 pieces:",
      "// coef_s[piece][k][d]; zero for k >= K or d >= D")
    c.open(f"for (int idx = tid; idx < {kpad_rows} * DPAD; idx += THREADS)")
    c("const int k = idx / DPAD, d = idx % DPAD;",
      "const bool ok = k < K && d < D;",
      "const int at = (int)h * K * D + k * D + d;")
    for table in ("b", "a") if covariance == "diag" else ("b",):
        base = next(i for i, p in enumerate(cps) if p.of == table)
        c(f"W_t {table}p[3];", f"split_bf16(ok ? {m}_{table}[at] : 0.f, {table}p);")
        for j in range(3):
            c(f"coef{sfx}_s[({base + j} * KPAD + k) * DH + d] = {table}p[{j}];")
    c.close()
    c.open("for (int k = tid; k < KPAD; k += THREADS)")
    c(f"c{sfx}_s[k] = k < K ? {m}_c[h * K + k] : -__int_as_float(0x7f800000);  "
      "// padded: -inf, r = 0")
    if covariance == "spherical":
        c(f"asq{sfx}_s[k] = k < K ? {m}_asq[h * K + k] : 0.f;")
    c.close()


def emit_fetch(c: Code, t: str, rows: str, row0: str, cols: str, col0: str, limit: str,
               reg: str, count: str, ids: str, step: str) -> None:
    """Prefetch: 16-byte vectors of token rows ``row0 + i`` (i < ``rows``), columns
    ``col0 + 8 m`` (8 m < ``cols``), into registers ``reg[count]`` (work item ``ids + j
    step``; zeros at or past ``end`` and past ``limit`` columns).  Issued before a
    tile's products, consumed after them: the global latency hides behind the MMAs.
    Only on the vector path (the caller guards with ``{t}_vec``)."""
    c("#pragma unroll")
    c.open(f"for (int j = 0; j < {count}; ++j)")
    c(f"const int idx = {ids} + j * {step};",
      f"const int i = idx / ({cols} / 8), d = (idx % ({cols} / 8)) * 8;",
      f"const long long row = {row0} + i;",
      f"{reg}[j] = (idx < {rows} * ({cols} / 8) && row < end && {col0}d < {limit}) ? "
      f"*reinterpret_cast<const uint4*>({t}_base + row * {t}_sn + {col0}d) : "
      "make_uint4(0u, 0u, 0u, 0u);")
    c.close()


def emit_token_pieces(c: Code, v: Variant, covariance: str, t: str, rows: str, row0: str,
                      tile: str, stride: str, ids: str, step: str, xsq: str = "",
                      reg: str = "", count: str = "", sync: str = "") -> None:
    """Token rows ``row0 + i`` (i < ``rows``; zeros at or past ``end`` and in columns
    >= D) into the pieces of ``tile`` (piece p at ``tile + p * stride``, row stride DH);
    work items ``ids`` .. by ``step``.  The vector path (``{t}_vec``, D % 8 == 0) takes
    the rows from the registers ``reg[count]`` that emit_fetch filled.  Spherical:
    ``xsq`` [rows] = |x|^2 (float32), after ``sync`` (the barrier that publishes the
    pieces written by other threads)."""
    tps = token_pieces(v, covariance)
    xs = [p for p in tps if p.of == "x"]
    xxs = [p for p in tps if p.of == "xx"]

    def store(i: str, d: str, val: str) -> list[str]:
        out = [f"const float xv = {val};"]
        if len(xs) == 1:
            out.append(f"{tile}[{i} * DH + {d}] = __float2bfloat16_rn(xv);  // exact")
        else:
            out += [f"W_t xp[{len(xs)}];", "split_bf16(xv, xp);"]
            out += [f"{tile}[{tps.index(p)} * {stride} + {i} * DH + {d}] = xp[{j}];"
                    for j, p in enumerate(xs)]
        if xxs:
            out += [f"W_t qp[{len(xxs)}];", "split_bf16(xv * xv, qp);  // exact in float32"]
            out += [f"{tile}[{tps.index(p)} * {stride} + {i} * DH + {d}] = qp[{j}];"
                    for j, p in enumerate(xxs)]
        return out

    c(f"// {t} rows -> bfloat16 pieces " + ", ".join(p.name for p in tps)
      + " (exact splits; zeros outside)")
    c.open(f"if (D % 8 == 0 && {t}_vec)")
    c("// 8 columns of a row per work item: each piece one 16-byte store")
    c("#pragma unroll")
    c.open(f"for (int j = 0; j < {count}; ++j)")
    c(f"const int idx = {ids} + j * {step};",
      f"if (idx >= {rows} * (DPAD / 8)) break;",
      "const int i = idx / (DPAD / 8), d = (idx % (DPAD / 8)) * 8;",
      "float f[8];",
      f"unpack8({reg}[j], f);  // zeros outside (emit_fetch)",
      f"unsigned pk[{len(tps)}][4];  // the pieces, two columns per register",
      "#pragma unroll")
    c.open("for (int e = 0; e < 4; ++e)")
    c("const float x0 = f[2 * e], x1 = f[2 * e + 1];")
    _pack_pieces(c, tps, "pk[{}][e]", "x0", "x1",
                 "pack_w2(__float2bfloat16_rn(x0), __float2bfloat16_rn(x1))")
    c.close()
    c("#pragma unroll",
      f"for (int p = 0; p < {len(tps)}; ++p)",
      f"  *reinterpret_cast<uint4*>({tile} + p * {stride} + i * DH + d) = "
      "make_uint4(pk[p][0], pk[p][1], pk[p][2], pk[p][3]);")
    c.close()
    c.close(" else {")
    c.depth += 1
    c.open(f"for (int idx = {ids}; idx < {rows} * DPAD; idx += {step})")
    c("const int i = idx / DPAD, d = idx % DPAD;",
      f"const long long row = {row0} + i;")
    for line in store("i", "d", f"(row < end && d < D) ? to_f({t}_base[row * {t}_sn + (long long)d "
                                f"* {t}_sd]) : 0.f"):
        c(line)
    c.close()
    c.close()
    if xsq:
        c(f"{sync}  // the pieces of every row are written")
        c(f"// |x|^2 per row (spherical), from the exact bfloat16 pieces")
        c.open(f"for (int i = {ids}; i < {rows}; i += {step})")
        c("float s = 0.f;")
        c.open("for (int d = 0; d < D; ++d)")
        c("float xv = 0.f;")
        for p in xs:
            c(f"xv += __bfloat162float({tile}[{tps.index(p)} * {stride} + i * DH + d]);")
        c("s = fmaf(xv, xv, s);")
        c.close()
        c(f"{xsq}[i] = s;")
        c.close()


def emit_logit_products(c: Code, v: Variant, covariance: str, acc: str, a_tile: str,
                        a_row: str, a_stride: str, b_tile: str, b_row: str, b_stride: str,
                        a_is_coef: bool, nt: str, a_raw: bool = False, m_tiles: int = 0) -> None:
    """``acc[nt][4]`` (+)= sum of the kept piece products over DPAD: A fragments from
    ``a_tile`` (16 rows at ``a_row``, piece p at + p * a_stride), B fragments (n-tile pairs,
    rows ``b_row`` + 16 j) from ``b_tile``.  ``a_is_coef``: the coefficient pieces are A
    (write: L^T) or B (read: L).  ``a_raw`` (read, scan): ``a_tile`` holds the tokens
    themselves (T) and their pieces are split from the loaded fragment in registers.
    ``m_tiles`` (read, raw): ``acc[m][nt][4]`` for m_tiles 16-row tiles of A (rows
    ``a_row`` + 16 m), each B fragment loaded once for all of them."""
    tl = terms(v, covariance)
    na = len(coefficient_pieces(covariance)) if a_is_coef else len(token_pieces(v, covariance))
    nb = len(token_pieces(v, covariance)) if a_is_coef else len(coefficient_pieces(covariance))
    ms = list(range(max(1, m_tiles)))
    accs = [f"{acc}[{m}]" for m in ms] if m_tiles else [acc]
    afs = [f"af[{m}]" for m in ms] if m_tiles else ["af"]
    # one k step at a time: the fragments of every step at once would not fit the registers
    c("#pragma unroll 1")
    c.open("for (int ks = 0; ks < DPAD / 16; ++ks)")
    c(f"unsigned af{f'[{len(ms)}]' if m_tiles else ''}[{na}][4];  "
      "// A fragments: rows lane % 16, columns (lane / 16) * 8")
    for m, af in zip(ms, afs):
        row = f"{a_row} + {16 * m}" if m else a_row
        if a_raw:
            _raw_token_fragments(c, v, covariance, a_tile, row, af)
        else:
            c("#pragma unroll")
            c(f"for (int p = 0; p < {na}; ++p) ldsm_x4({af}[p], {a_tile} + p * {a_stride} + "
              f"({row} + (lane & 15)) * DH + ks * 16 + (lane >> 4) * 8);")
    c("#pragma unroll")
    c.open(f"for (int j = 0; j < {nt} / 2; ++j)")
    c(f"unsigned bf[{nb}][4];  // B fragments of n-tiles 2j, 2j + 1")
    c("#pragma unroll")
    c(f"for (int p = 0; p < {nb}; ++p) ldsm_x4(bf[p], {b_tile} + p * {b_stride} + "
      f"({b_row} + j * 16 + ((lane >> 4) << 3) + (lane & 7)) * DH + ks * 16 + ((lane >> 3) & 1) * 8);")
    for ci, ti in tl:
        ai, bi = (ci, ti) if a_is_coef else (ti, ci)
        for a, af in zip(accs, afs):
            c(f"mma_bf16({a}[2 * j], {af}[{ai}], bf[{bi}][0], bf[{bi}][1]);",
              f"mma_bf16({a}[2 * j + 1], {af}[{ai}], bf[{bi}][2], bf[{bi}][3]);")
    c.close()
    c.close()


def _raw_token_fragments(c: Code, v: Variant, covariance: str, tile: str, row: str,
                         af: str = "af") -> None:
    """``af``[piece][4]: the token pieces (token_pieces) of one A fragment, split in
    registers from the raw tokens' fragment (the same exact splits as
    emit_token_pieces: a register holds two columns, each split alone)."""
    tps = token_pieces(v, covariance)
    c("{")
    c.depth += 1
    c("unsigned xr[4];  // the tokens (T) of this fragment",
      f"ldsm_x4(xr, {tile} + ({row} + (lane & 15)) * DH + ks * 16 + (lane >> 4) * 8);",
      "#pragma unroll")
    c.open("for (int r = 0; r < 4; ++r)")
    c("const float2 f = unpack_T2(xr[r]);")
    _pack_pieces(c, tps, af + "[{}][r]", "f.x", "f.y", "xr[r]")
    c.close()
    c.depth -= 1
    c("}")


def _pack_pieces(c: Code, tps: list[Piece], dst: str, lo: str, hi: str, own: str) -> None:
    """``dst.format(piece index)`` = the bfloat16 pieces ``tps`` of two adjacent columns
    (floats ``lo``, ``hi``), one register each (the lower column in the low half):
    x split alone, x*x squared then split (exact in float32).  ``own``: the register
    of the pair when x is its own piece (bfloat16 tokens)."""
    for of in ("x", "xx"):
        ps = [p for p in tps if p.of == of]
        if not ps:
            continue
        if of == "x" and len(ps) == 1:
            c(f"{dst.format(tps.index(ps[0]))} = {own};  // bfloat16 tokens are their own piece")
            continue
        a, b = (lo, hi) if of == "x" else (f"{lo} * {lo}", f"{hi} * {hi}")
        c("{", f"  W_t lo[{len(ps)}], hi[{len(ps)}];"
          + ("  // x*x: exact in float32" if of == "xx" else ""),
          f"  split_bf16({a}, lo);", f"  split_bf16({b}, hi);")
        for j, p in enumerate(ps):
            c(f"  {dst.format(tps.index(p))} = pack_w2(lo[{j}], hi[{j}]);")
        c("}")


def emit_row_softmax(c: Code, acc: str, cs: str, asq: str = "", xsq: str = "",
                     p: str = "") -> None:
    """Logits ``acc[KPAD / 8][4]`` of 16 token rows (lane / 4 and lane / 4 + 8, the
    columns k among the 4 lanes of a row) + ``cs[k]`` (spherical: + ``asq[k]`` times
    the row's ``xsq``) -> exp2(l - row max) in place; ``{p}inv0``, ``{p}inv1``: one
    over the two rows' sums (the caller scales)."""
    m0, m1, s0, s1 = (f"{p}{n}" for n in ("m0", "m1", "s0", "s1"))
    if xsq:
        c(f"const float {p}xsq0 = {xsq}[lane >> 2], {p}xsq1 = {xsq}[(lane >> 2) + 8];")
    c(f"// softmax over k: rows lane / 4 ({m0}) and lane / 4 + 8 ({m1}), among the 4 lanes "
      "of a row",
      f"float {m0} = -__int_as_float(0x7f800000), {m1} = {m0};",
      "#pragma unroll")
    c.open("for (int nt = 0; nt < KPAD / 8; ++nt)")
    c("#pragma unroll")
    c.open("for (int e = 0; e < 2; ++e)")
    c("const int k = nt * 8 + (lane & 3) * 2 + e;")
    if xsq:
        c(f"{acc}[nt][e] += {cs}[k] + {asq}[k] * {p}xsq0;",
          f"{acc}[nt][e + 2] += {cs}[k] + {asq}[k] * {p}xsq1;")
    else:
        c(f"{acc}[nt][e] += {cs}[k];", f"{acc}[nt][e + 2] += {cs}[k];")
    c(f"{m0} = fmaxf({m0}, {acc}[nt][e]);", f"{m1} = fmaxf({m1}, {acc}[nt][e + 2]);")
    c.close()
    c.close()
    c(f"{m0} = fmaxf({m0}, __shfl_xor_sync(0xffffffffu, {m0}, 1));",
      f"{m0} = fmaxf({m0}, __shfl_xor_sync(0xffffffffu, {m0}, 2));",
      f"{m1} = fmaxf({m1}, __shfl_xor_sync(0xffffffffu, {m1}, 1));",
      f"{m1} = fmaxf({m1}, __shfl_xor_sync(0xffffffffu, {m1}, 2));",
      f"float {s0} = 0.f, {s1} = 0.f;",
      "#pragma unroll")
    c.open("for (int nt = 0; nt < KPAD / 8; ++nt)")
    c(f"{acc}[nt][0] = ex2({acc}[nt][0] - {m0}); {acc}[nt][1] = ex2({acc}[nt][1] - {m0});",
      f"{acc}[nt][2] = ex2({acc}[nt][2] - {m1}); {acc}[nt][3] = ex2({acc}[nt][3] - {m1});",
      f"{s0} += {acc}[nt][0] + {acc}[nt][1];", f"{s1} += {acc}[nt][2] + {acc}[nt][3];")
    c.close()
    c(f"{s0} += __shfl_xor_sync(0xffffffffu, {s0}, 1); "
      f"{s0} += __shfl_xor_sync(0xffffffffu, {s0}, 2);",
      f"{s1} += __shfl_xor_sync(0xffffffffu, {s1}, 1); "
      f"{s1} += __shfl_xor_sync(0xffffffffu, {s1}, 2);",
      f"const float {p}inv0 = __fdividef(1.f, {s0}), {p}inv1 = __fdividef(1.f, {s1});  "
      "// sums >= 1 (the max adds exp2(0))")
