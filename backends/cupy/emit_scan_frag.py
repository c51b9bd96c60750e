"""gma_scan_fwd with register fragments (``mma=2``, frag.py): the causal program's
chunked scan, responsibilities on the fly (emit_scan.py's docstring has the math).

Block (b*h, segment, Dv block), NWARPS warps, chunks of BLOCK_N = 16 NWARPS
tokens; warp w owns tokens [16 w, 16 w + 16) of a chunk.  Per chunk:

  1. rk of its tokens: the raw key rows into the warp's tile, the logits in
     registers (frag.emit_logit_products, pieces split in registers), the
     softmax over k within the warp; dropped keys (past end, masked) get 0.
     rk (T) into the shared rk tile, its column sums (slot norm: its inclusive
     prefix over the warp's rows, kept in registers) into nred_s; v rows into
     the shared v tile.
  2. rq of its tokens the same way (registers only).
  -- barrier: every warp's rk, v and column sums are published --
  3. row norm: att = rq . rk^T (T) for the tiles up to the diagonal, the causal
     mask on the diagonal tile, den = sum_j att + rq . n + eps (float32);
     slot norm: w = rq / (n + earlier warps' sums + the prefix + eps)
     (float32), att = w . rk^T (W).
  4. y = att . v + rq . S_w (W; slot: w . S_w), row norm / den, to global
     memory through the warp's tile.
  -- barrier: S_w, n_s, rk and v were read --
  5. S += rk^T v on the warps' own 16-row tiles of S (float32 accumulators that
     live in registers for the whole segment), S_w (W) refreshed from them, n
     += the warps' column sums in a fixed order.
  -- barrier --

Precision is that of the WMMA path (mma=1): logits float32-grade (frag.py),
att and att . v in the token dtype T (slot: W), rq . S in W = bfloat16, the
denominators and n in float32, S accumulated in float32.
"""

from __future__ import annotations

from . import frag
from .emit_scan import entering_state, kernel_params
from .prelude import (Code, Emitted, Tiles, Variant, bh_indices, finish, kernel_open,
                      segment_range, state_store, token_base)

_FULL = "0xffffffffu"


def emit(v: Variant, t: Tiles, config: dict) -> Emitted:
    c = Code()
    mixes = frag.scan_mixtures(v)
    _, qcov, qs = mixes[0]
    _, kcov, ks = mixes[-1]
    row = v.norm == "row"
    mma_T, pack_T = frag._mma_T(v)
    # the products with rq (att, att . v): T in the row norm; the slot norm's weights
    # reach 1/eps, past float16's range: W (bfloat16; float16 slot takes mma=1)
    mma_A, pack_A = (mma_T, pack_T) if row else ("mma_bf16", "pack_bf16")
    spherical = "spherical" in (qcov, kcov)
    blocks = 2 if 2 * (frag.smem_bytes(v, t) + 1024) <= 228 * 1024 and t.num_threads <= 128 else 1
    kernel_open(c, "gma_scan_fwd", kernel_params(v), "(B*H, segments, Dv blocks)", blocks)
    frag.declare(c, v, t)
    c("const int g = lane >> 2, tq = lane & 3;  // fragment row (and + 8), column pair")
    bh_indices(c)
    segment_range(c)
    c("const int dv0 = blockIdx.z * BLOCK_DV;")
    for tok in ("q", "k", "v"):
        token_base(c, tok, vec=True)
    token_base(c, "y", const=False, vec=True)
    for m, cov, sfx in mixes:
        frag.emit_coefficients(c, m, cov, sfx=sfx)
    _entering_state(c, v)
    c("T_t* const xt = tok_s + warp * PER_WARP;  // this warp's token rows, then its y tile")
    if spherical:
        c("float* const xsq = xsq_s + warp * 16;")
    c.open("for (long long n0 = start; n0 < end; n0 += BLOCK_N)")
    c("const long long r0 = n0 + 16 * warp;  // this warp's first token")
    # 1. keys
    _rows_to_tile(c, "k", "xt", "DPAD", "", "D", "DH")
    _responsibilities(c, v, kcov, "acck", ks, "k")
    keep = "r0 + g{0} < end"
    if v.mask:
        keep += " && mask_ptr[b * mask_sb + (r0 + g{0}) * mask_sn] != 0"
    c("// dropped keys (past end" + (", masked" if v.mask else "") + ") get rk = 0",
      f"const float ksc0 = ({keep.format('')}) ? kinv0 : 0.f;",
      f"const float ksc1 = ({keep.format(' + 8')}) ? kinv1 : 0.f;",
      "#pragma unroll")
    c.open("for (int nt = 0; nt < KPAD / 8; ++nt)")
    c("acck[nt][0] *= ksc0; acck[nt][1] *= ksc0; acck[nt][2] *= ksc1; acck[nt][3] *= ksc1;",
      "unsigned* const rk0 = reinterpret_cast<unsigned*>(rk_t + (16 * warp + g) * KH "
      "+ nt * 8 + 2 * tq);",
      f"rk0[0] = {pack_T}(acck[nt][0], acck[nt][1]);",
      f"rk0[4 * KH] = {pack_T}(acck[nt][2], acck[nt][3]);  // row g + 8")
    c.close()
    _column_sums(c, v)
    c("// values: the warp's rows of v_t [BLOCK_N, BLOCK_DV] (zeros outside)")
    _rows_to_tile(c, "v", "v_t + 16 * warp * VH", "BLOCK_DV", "dv0 + ", "DV", "VH", sync=False)
    c("__syncwarp();  // the key tile's fragments are loaded")
    # 2. queries
    _rows_to_tile(c, "q", "xt", "DPAD", "", "D", "DH")
    _responsibilities(c, v, qcov, "accq", qs, "q")
    c("#pragma unroll",
      "for (int nt = 0; nt < KPAD / 8; ++nt) { accq[nt][0] *= qinv0; accq[nt][1] *= qinv0; "
      "accq[nt][2] *= qinv1; accq[nt][3] *= qinv1; }")
    c("__syncthreads();  // every warp's rk, v and column sums")
    # 3. affinities
    if row:
        c("// row norm: rq . n of rows g, g + 8 (n entering the chunk)",
          "float dq0 = 0.f, dq1 = 0.f;",
          "#pragma unroll")
        c.open("for (int nt = 0; nt < KPAD / 8; ++nt)")
        c("#pragma unroll")
        c.open("for (int e = 0; e < 2; ++e)")
        c("const float nk = n_s[nt * 8 + 2 * tq + e];",
          "dq0 = fmaf(accq[nt][e], nk, dq0);", "dq1 = fmaf(accq[nt][e + 2], nk, dq1);")
        c.close()
        c.close()
    else:
        c("// slot norm: w_ik = rq_ik / (n_k(i) + eps), n_k(i) = n_k + the earlier warps' sums "
          "+ the inclusive prefix of this warp's rows (acck); 0 for k >= K",
          "#pragma unroll")
        c.open("for (int nt = 0; nt < KPAD / 8; ++nt)")
        c("#pragma unroll")
        c.open("for (int e = 0; e < 2; ++e)")
        c("const int k = nt * 8 + 2 * tq + e;",
          "float base = n_s[k];",
          "for (int w = 0; w < warp; ++w) base += nred_s[w * KPAD + k];",
          "accq[nt][e] = k < K ? accq[nt][e] / (base + acck[nt][e] + EPS) : 0.f;",
          "accq[nt][e + 2] = k < K ? accq[nt][e + 2] / (base + acck[nt][e + 2] + EPS) : 0.f;")
        c.close()
        c.close()
    a_name = "rq" if row else "w"
    c(f"// att [16, BLOCK_N] = {a_name} . rk^T ({'T' if row else 'W'}): tiles j <= warp "
      "(the later tokens are in the future), B = rk rows through ldmatrix",
      "float att[BLOCK_N / 8][4];",
      "#pragma unroll",
      "for (int nt = 0; nt < BLOCK_N / 8; ++nt) att[nt][0] = att[nt][1] = att[nt][2] = "
      "att[nt][3] = 0.f;",
      "#pragma unroll")
    c.open("for (int kk = 0; kk < KPAD / 16; ++kk)")
    _a_from_acc(c, "a", "accq", "kk", pack_A)
    c("#pragma unroll")
    c.open("for (int j = 0; j < BLOCK_N / 16; ++j)")
    c.open("if (j <= warp)")
    c("unsigned bf[4];",
      "ldsm_x4(bf, rk_t + (j * 16 + ((lane >> 4) << 3) + (lane & 7)) * KH + kk * 16 "
      "+ ((lane >> 3) & 1) * 8);",
      f"{mma_A}(att[2 * j], a, bf[0], bf[1]);",
      f"{mma_A}(att[2 * j + 1], a, bf[2], bf[3]);")
    c.close()
    c.close()
    c.close()
    c("// the causal mask on the diagonal tile: token j > i gets 0",
      "#pragma unroll")
    c.open("for (int nt = 0; nt < BLOCK_N / 8; ++nt)")
    c.open("if (nt / 2 == warp)")
    c("const int cc = (nt & 1) * 8 + 2 * tq;",
      "if (cc > g) att[nt][0] = 0.f;", "if (cc + 1 > g) att[nt][1] = 0.f;",
      "if (cc > g + 8) att[nt][2] = 0.f;", "if (cc + 1 > g + 8) att[nt][3] = 0.f;")
    c.close()
    c.close()
    if row:
        c("// den_i = sum_{j<=i} a_ij + rq_i . n + eps (float32)",
          "float den0 = 0.f, den1 = 0.f;",
          "#pragma unroll",
          "for (int nt = 0; nt < BLOCK_N / 8; ++nt) { den0 += att[nt][0] + att[nt][1]; "
          "den1 += att[nt][2] + att[nt][3]; }",
          f"den0 += dq0; den1 += dq1;",
          f"den0 += __shfl_xor_sync({_FULL}, den0, 1); den0 += __shfl_xor_sync({_FULL}, den0, 2);",
          f"den1 += __shfl_xor_sync({_FULL}, den1, 1); den1 += __shfl_xor_sync({_FULL}, den1, 2);",
          "const float f0 = 1.f / (den0 + EPS), f1 = 1.f / (den1 + EPS);")
    else:
        c("const float f0 = 1.f, f1 = 1.f;")
    # 4. y
    c(f"// y [16, BLOCK_DV] = att . v (up to the diagonal tile) + {a_name} . S_w (W)",
      "float yacc[BLOCK_DV / 8][4];",
      "#pragma unroll",
      "for (int nd = 0; nd < BLOCK_DV / 8; ++nd) yacc[nd][0] = yacc[nd][1] = yacc[nd][2] = "
      "yacc[nd][3] = 0.f;",
      "#pragma unroll")
    c.open("for (int j = 0; j < BLOCK_N / 16; ++j)")
    c.open("if (j <= warp)")
    _a_from_acc(c, "a", "att", "j", pack_A)
    c("#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 16; ++nd)")
    c("unsigned vb[4];",
      "ldsm_x4_t(vb, v_t + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VH + nd * 16 "
      "+ (lane >> 4) * 8);",
      f"{mma_A}(yacc[2 * nd], a, vb[0], vb[1]);",
      f"{mma_A}(yacc[2 * nd + 1], a, vb[2], vb[3]);")
    c.close()
    c.close()
    c.close()
    c("#pragma unroll")
    c.open("for (int kk = 0; kk < KPAD / 16; ++kk)")
    _a_from_acc(c, "a", "accq", "kk", "pack_bf16")
    c("#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 16; ++nd)")
    c("unsigned sb[4];",
      "ldsm_x4_t(sb, S_w + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VH + nd * 16 "
      "+ (lane >> 4) * 8);",
      "mma_bf16(yacc[2 * nd], a, sb[0], sb[1]);",
      "mma_bf16(yacc[2 * nd + 1], a, sb[2], sb[3]);")
    c.close()
    c.close()
    _store_y(c)
    c("__syncthreads();  // S_w, n_s, rk_t and v_t were read")
    # 5. state
    c("// S += rk^T v on this warp's tiles of S: A = rk^T through ldmatrix.trans of the rk "
      f"rows, B = v ({mma_T})",
      "#pragma unroll")
    c.open("for (int ms = 0; ms < MS; ++ms)")
    c("const int mt = warp * MS + ms;")
    c.open("if (mt < KPAD / 16)")
    c("#pragma unroll")
    c.open("for (int j = 0; j < BLOCK_N / 16; ++j)")
    c("unsigned a[4];",
      "ldsm_x4_t(a, rk_t + (j * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * KH + mt * 16 "
      "+ ((lane >> 3) & 1) * 8);",
      "#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 16; ++nd)")
    c("unsigned vb[4];",
      "ldsm_x4_t(vb, v_t + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VH + nd * 16 "
      "+ (lane >> 4) * 8);",
      f"{mma_T}(sacc[ms][2 * nd], a, vb[0], vb[1]);",
      f"{mma_T}(sacc[ms][2 * nd + 1], a, vb[2], vb[3]);")
    c.close()
    c.close()
    c("#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 8; ++nd)")
    c("W_t* const s0 = S_w + (mt * 16 + g) * VH + nd * 8 + 2 * tq;",
      "s0[0] = cvt_W(sacc[ms][nd][0]); s0[1] = cvt_W(sacc[ms][nd][1]);",
      "s0[8 * VH] = cvt_W(sacc[ms][nd][2]); s0[8 * VH + 1] = cvt_W(sacc[ms][nd][3]);")
    c.close()
    c.close()
    c.close()
    c("// n += the warps' column sums, warp 0, 1, ... in turn (deterministic)",
      "for (int k = tid; k < KPAD; k += THREADS) {",
      "  float a = n_s[k];",
      "  for (int w = 0; w < NWARPS; ++w) a += nred_s[w * KPAD + k];",
      "  n_s[k] = a;",
      "}",
      "__syncthreads();")
    c.close()  # chunk loop
    c("// the state leaving the segment: the warps' tiles of S into S_s (where the chunk "
      "tiles were)")
    _state_tiles(c, "S_s[(mt * 16 + g + 8 * (r >> 1)) * SP + nd * 8 + 2 * tq + (r & 1)] = "
                 "sacc[ms][nd][r];")
    c("__syncthreads();")
    c.open("if (seg == gridDim.y - 1)")
    c("// the last segment holds the final state")
    state_store(c, "st", "nt", "bh * st_sbh", "bh * nt_sbh", mma=True)
    c.close()
    c.close()
    return finish(c, "gma_scan_fwd", f"causal chunked scan ({v.norm} norm; register "
                  "fragments, mma.sync)", v, t, config)


def _entering_state(c: Code, v: Variant) -> None:
    """S_s [KPAD, BLOCK_DV] (float32) and n_s: the initial state plus segments
    0..seg-1's partial memories, in order; then the warps' tiles of S (sacc) and its
    W copy S_w.  S_s aliases the chunk tiles: a barrier ends its life."""
    c("// state entering segment seg: initial state, then segments 0..seg-1 in order; "
      "zero rows k >= K")
    entering_state(c, v, "KPAD", ["S_s[k * SP + j] = a;", "S_w[k * VH + j] = cvt_W(a);"],
                   pad_n=True)
    c("__syncthreads();",
      "// S rows mt * 16 + g (+ 8), columns nd * 8 + 2 tq (+ 1) of this warp's tiles mt",
      "float sacc[MS][BLOCK_DV / 8][4];")
    _state_tiles(c, "sacc[ms][nd][r] = mt < KPAD / 16 ? S_s[(mt * 16 + g + 8 * (r >> 1)) * SP "
                 "+ nd * 8 + 2 * tq + (r & 1)] : 0.f;", guard=False)
    c("__syncthreads();  // S_s is dead: the chunk tiles take its place")


def _state_tiles(c: Code, line: str, guard: bool = True) -> None:
    c("#pragma unroll")
    c.open("for (int ms = 0; ms < MS; ++ms)")
    c("const int mt = warp * MS + ms;")
    if guard:
        c.open("if (mt < KPAD / 16)")
    c("#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 8; ++nd)")
    c("#pragma unroll", f"for (int r = 0; r < 4; ++r) {line}")
    c.close()
    if guard:
        c.close()
    c.close()


def _rows_to_tile(c: Code, t: str, tile: str, cols: str, col0: str, limit: str, stride: str,
                  sync: bool = True) -> None:
    """This warp's 16 rows r0.. of token tensor ``t`` (columns ``col0`` + [0, cols)) into
    ``tile`` (row stride ``stride``), zeros past end and past ``limit``: 16-byte vectors
    where the rows allow (``{t}_vec``), else element by element."""
    c(f"// {t} rows r0 .. r0 + 15 -> {tile.split(' ')[0]} (zeros outside)")
    c.open(f"if ({limit} % 8 == 0 && {t}_vec)")
    c.open(f"for (int idx = lane; idx < 16 * ({cols} / 8); idx += 32)")
    c(f"const int i = idx / ({cols} / 8), d = (idx % ({cols} / 8)) * 8;",
      "const long long row = r0 + i;",
      f"*reinterpret_cast<uint4*>({tile} + i * {stride} + d) = (row < end && {col0}d < {limit}) "
      f"? *reinterpret_cast<const uint4*>({t}_base + row * {t}_sn + {col0}d) "
      ": make_uint4(0u, 0u, 0u, 0u);")
    c.close()
    c.close(" else {")
    c.depth += 1
    c.open(f"for (int idx = lane; idx < 16 * {cols}; idx += 32)")
    c(f"const int i = idx / {cols}, d = idx % {cols};",
      "const long long row = r0 + i;",
      f"({tile})[i * {stride} + d] = (row < end && {col0}d < {limit}) ? "
      f"{t}_base[row * {t}_sn + (long long)({col0}d) * {t}_sd] : cvt_T(0.f);")
    c.close()
    c.close()
    if sync:
        c("__syncwarp();")


def _responsibilities(c: Code, v: Variant, cov: str, acc: str, sfx: str, p: str) -> None:
    """``acc[KPAD / 8][4]``: exp2(l - max) of the warp's 16 rows in ``xt`` against mixture
    ``sfx`` (coef{sfx}_s ...); ``{p}inv0``, ``{p}inv1``: one over the rows' sums."""
    if cov == "spherical":
        c("// |x|^2 per row (spherical)",
          "if (lane < 16) { float s = 0.f; for (int d = 0; d < D; ++d) { const float x = "
          "to_f(xt[lane * DH + d]); s = fmaf(x, x, s); } xsq[lane] = s; }",
          "__syncwarp();")
    c(f"float {acc}[KPAD / 8][4];  // L [16, KPAD]: rows lane / 4 (+ 8), columns k",
      "#pragma unroll",
      f"for (int nt = 0; nt < KPAD / 8; ++nt) {acc}[nt][0] = {acc}[nt][1] = {acc}[nt][2] = "
      f"{acc}[nt][3] = 0.f;")
    frag.emit_logit_products(c, v, cov, acc, "xt", "0", "0", f"coef{sfx}_s", "0", "KPAD * DH",
                             a_is_coef=False, nt="KPAD / 8", a_raw=True)
    frag.emit_row_softmax(c, acc, f"c{sfx}_s", f"asq{sfx}_s" if cov == "spherical" else "",
                          "xsq" if cov == "spherical" else "", p=p)


def _column_sums(c: Code, v: Variant) -> None:
    """nred_s[warp][k]: the sum of rk over this warp's rows; slot norm: acck becomes
    its inclusive prefix over the rows (shuffles up the 8 row groups, then the lower
    half's total into the upper half)."""
    c("#pragma unroll")
    c.open("for (int nt = 0; nt < KPAD / 8; ++nt)")
    c("#pragma unroll")
    c.open("for (int e = 0; e < 2; ++e)")
    if v.norm == "row":
        c("float s = acck[nt][e] + acck[nt][e + 2];",
          f"s += __shfl_xor_sync({_FULL}, s, 4);",
          f"s += __shfl_xor_sync({_FULL}, s, 8);",
          f"s += __shfl_xor_sync({_FULL}, s, 16);",
          "if (lane < 4) nred_s[warp * KPAD + nt * 8 + 2 * lane + e] = s;")
    else:
        c("float lo = acck[nt][e], hi = acck[nt][e + 2];",
          "#pragma unroll")
        c.open("for (int off = 4; off < 32; off *= 2)")
        c(f"const float a = __shfl_up_sync({_FULL}, lo, off), "
          f"b = __shfl_up_sync({_FULL}, hi, off);",
          "if (lane >= off) { lo += a; hi += b; }")
        c.close()
        c(f"hi += __shfl_sync({_FULL}, lo, 28 + tq);  // rows 0..7's total",
          "acck[nt][e] = lo; acck[nt][e + 2] = hi;",
          f"const float all = __shfl_sync({_FULL}, hi, 28 + tq);",
          "if (lane < 4) nred_s[warp * KPAD + nt * 8 + 2 * lane + e] = all;")
    c.close()
    c.close()


def _a_from_acc(c: Code, a: str, acc: str, j: str, pack: str) -> None:
    """A fragment (16 x 16, k step ``j``) from the accumulators of n-tiles 2j, 2j + 1."""
    c(f"const unsigned {a}[4] = {{{pack}({acc}[2 * {j}][0], {acc}[2 * {j}][1]), "
      f"{pack}({acc}[2 * {j}][2], {acc}[2 * {j}][3]),",
      f"                      {pack}({acc}[2 * {j} + 1][0], {acc}[2 * {j} + 1][1]), "
      f"{pack}({acc}[2 * {j} + 1][2], {acc}[2 * {j} + 1][3])}};")


def _store_y(c: Code) -> None:
    """yacc (times f0 / f1) through the warp's tile to rows r0.. of y."""
    c("__syncwarp();  // every lane's fragments of the query tile are loaded: the tile is free",
      "#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 8; ++nd)")
    c("const int j = nd * 8 + 2 * tq;",
      "xt[g * VH + j] = cvt_T(yacc[nd][0] * f0); xt[g * VH + j + 1] = cvt_T(yacc[nd][1] * f0);",
      "xt[(g + 8) * VH + j] = cvt_T(yacc[nd][2] * f1); "
      "xt[(g + 8) * VH + j + 1] = cvt_T(yacc[nd][3] * f1);")
    c.close()
    c("__syncwarp();")
    c.open("if (DV % 8 == 0 && y_vec)")
    c.open("for (int idx = lane; idx < 16 * (BLOCK_DV / 8); idx += 32)")
    c("const int i = idx / (BLOCK_DV / 8), j = (idx % (BLOCK_DV / 8)) * 8;",
      "const long long row = r0 + i;",
      "if (row < end && dv0 + j < DV) *reinterpret_cast<uint4*>(y_base + row * y_sn + dv0 + j) = "
      "*reinterpret_cast<const uint4*>(xt + i * VH + j);")
    c.close()
    c.close(" else {")
    c.depth += 1
    c.open("for (int idx = lane; idx < 16 * BLOCK_DV; idx += 32)")
    c("const int i = idx / BLOCK_DV, j = idx % BLOCK_DV;",
      "const long long row = r0 + i;",
      "if (row < end && dv0 + j < DV) y_base[row * y_sn + (long long)(dv0 + j) * y_sd] = "
      "xt[i * VH + j];")
    c.close()
    c.close()
