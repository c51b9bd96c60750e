"""gma_write_fwd with register fragments (``mma=2``, frag.py): S_k = sum_j m_j r_jk v_j,
n_k = sum_j m_j r_jk over one segment of the keys, per block (b*h, segment, Dv block).

Warp (kw, tg): K rows [16 MK kw, 16 MK (kw + 1)), tokens [TOK tg, TOK (tg + 1)) of
each tile.  Per tile: the token pieces and v into shared memory (one barrier),
L^T = c + B . x^T + A . (x*x)^T in registers, the softmax over k (one exchange of
(max, sum) between the KW warps of a token group, one barrier), then S += r^T v
with r^T the logits' own accumulator in 16 bits (the token dtype, like the
Triton backend's DATA_DT), n += the float32 row sums.  The token groups' S and n
are added in shared memory at the end, tg = 0, 1, ... in turn.
"""

from __future__ import annotations

from . import frag
from .emit_write import kernel_params
from .prelude import (Code, Emitted, Tiles, Variant, bh_indices, finish, kernel_open,
                      segment_range, state_store, token_base, v_tile_scalar)


def emit(v: Variant, t: Tiles, config: dict) -> Emitted:
    c = Code()
    cov = v.k_covariance
    mma_T, pack_T = frag._mma_T(v)
    s = frag.shape(v, t)
    # one block per SM in the launch bounds (no register cap below 255): under the cap of
    # two 256-thread blocks (128) ptxas (CUDA 13) spills 8-64 bytes, depending on the
    # variant and arch; at ~170 registers an SM still runs 8 warps of this kernel
    blocks = 1
    kernel_open(c, "gma_write_fwd", kernel_params(v), "(B*H, segments, Dv blocks)", blocks)
    frag.declare(c, v, t)
    c("const int kw = warp % KW, tg = warp / KW;  // K rows 16 MK kw.., tokens TOK tg.. of a tile",
      "const int krow0 = kw * MK * 16, tok0 = tg * TOK;")
    bh_indices(c)
    segment_range(c)
    c("const int dv0 = blockIdx.z * BLOCK_DV;")
    token_base(c, "k", vec=True)
    token_base(c, "v", vec=True)
    frag.emit_coefficients(c, "mk", cov)
    c("float sacc[MK][BLOCK_DV / 8][4];  // S rows krow0 + 16 mt + lane / 4 (+ 8), "
      "columns 8 nd + 2 (lane % 4) (+ 1)",
      "float nacc[MK][2];  // n of the same rows, this lane's tokens",
      "#pragma unroll",
      "for (int mt = 0; mt < MK; ++mt) {",
      "  nacc[mt][0] = nacc[mt][1] = 0.f;",
      "#pragma unroll",
      "  for (int nd = 0; nd < BLOCK_DV / 8; ++nd)",
      "    sacc[mt][nd][0] = sacc[mt][nd][1] = sacc[mt][nd][2] = sacc[mt][nd][3] = 0.f;",
      "}")
    c("// the first tile's k and v rows into registers (vector path; see emit_fetch)",
      "uint4 kr[XC], vr[VC];")
    c.open("if (D % 8 == 0 && k_vec)")
    frag.emit_fetch(c, "k", "BLOCK_N", "start", "DPAD", "", "D", "kr", "XC", "tid", "THREADS")
    c.close()
    c.open("if (DV % 8 == 0 && v_vec)")
    frag.emit_fetch(c, "v", "BLOCK_N", "start", "BLOCK_DV", "dv0 + ", "DV", "vr", "VC", "tid",
                    "THREADS")
    c.close()
    c.open("for (long long n0 = start; n0 < end; n0 += BLOCK_N)")
    c("__syncthreads();  // the previous tile's readers are done (and coef_s is written)")
    frag.emit_token_pieces(c, v, cov, "k", "BLOCK_N", "n0", "tok_s", "BLOCK_N * DH", "tid",
                           "THREADS", xsq="xsq_s" if cov == "spherical" else "",
                           reg="kr", count="XC", sync="__syncthreads();")
    c("// values: v_t [BLOCK_N, BLOCK_DV] (zeros outside)")
    c.open("if (DV % 8 == 0 && v_vec)")
    c("#pragma unroll")
    c.open("for (int j = 0; j < VC; ++j)")
    c("const int idx = tid + j * THREADS;",
      "if (idx < BLOCK_N * (BLOCK_DV / 8)) *reinterpret_cast<uint4*>(v_t + (idx / (BLOCK_DV / 8)) "
      "* VH + (idx % (BLOCK_DV / 8)) * 8) = vr[j];")
    c.close()
    c.close(" else {")
    c.depth += 1
    v_tile_scalar(c, "VH")
    c.close()
    c("// the next tile's rows: in flight during this tile's products")
    c.open("if (n0 + BLOCK_N < end)")
    c.open("if (D % 8 == 0 && k_vec)")
    frag.emit_fetch(c, "k", "BLOCK_N", "n0 + BLOCK_N", "DPAD", "", "D", "kr", "XC", "tid",
                    "THREADS")
    c.close()
    c.open("if (DV % 8 == 0 && v_vec)")
    frag.emit_fetch(c, "v", "BLOCK_N", "n0 + BLOCK_N", "BLOCK_DV", "dv0 + ", "DV", "vr", "VC",
                    "tid", "THREADS")
    c.close()
    c.close()
    c("__syncthreads();")
    c("// logits L^T [16 MK, TOK]: rows k (lane / 4, + 8), columns tokens (2 (lane % 4), + 1)",
      "float acc[MK][TOK / 8][4];",
      "#pragma unroll",
      "for (int mt = 0; mt < MK; ++mt) {",
      "#pragma unroll",
      "  for (int nt = 0; nt < TOK / 8; ++nt) {",
      "    acc[mt][nt][0] = acc[mt][nt][1] = 0.f;",
      "    acc[mt][nt][2] = acc[mt][nt][3] = 0.f;",
      "  }",
      "}")
    c("#pragma unroll")
    c.open("for (int mt = 0; mt < MK; ++mt)")
    frag.emit_logit_products(c, v, cov, "acc[mt]", "coef_s", "krow0 + mt * 16", "KPAD * DH",
                             "tok_s", "tok0", "BLOCK_N * DH", a_is_coef=True, nt="TOK / 8")
    c.close()
    c("// + c_k" + (" + asq_k |x|^2" if cov == "spherical" else "")
      + "; per token (column): the max over this warp's rows, exp2 and their sum.  Each "
      "step runs over every column before the next, so that a round's shuffles are in "
      "flight together (one column after another is a chain of 6 shuffle latencies each)")
    c("float cm[TOK / 8][2], cs[TOK / 8][2];  // per column: max, then sum of exp2(l - max)")
    c("#pragma unroll")
    c.open("for (int nt = 0; nt < TOK / 8; ++nt)")
    c("#pragma unroll")
    c.open("for (int e = 0; e < 2; ++e)")
    c("float m = -__int_as_float(0x7f800000);")
    if cov == "spherical":
        c("const float xsq = xsq_s[tok0 + nt * 8 + (lane & 3) * 2 + e];")
    c("#pragma unroll")
    c.open("for (int mt = 0; mt < MK; ++mt)")
    c("const int k = krow0 + mt * 16 + (lane >> 2);")
    if cov == "spherical":
        c("acc[mt][nt][e] += c_s[k] + asq_s[k] * xsq;",
          "acc[mt][nt][e + 2] += c_s[k + 8] + asq_s[k + 8] * xsq;")
    else:
        c("acc[mt][nt][e] += c_s[k];", "acc[mt][nt][e + 2] += c_s[k + 8];")
    c("m = fmaxf(m, fmaxf(acc[mt][nt][e], acc[mt][nt][e + 2]));")
    c.close()
    c("cm[nt][e] = m;")
    c.close()
    c.close()
    _column_rounds(c, "cm[nt][e] = fmaxf(cm[nt][e], __shfl_xor_sync(0xffffffffu, cm[nt][e], o));")
    c("#pragma unroll")
    c.open("for (int nt = 0; nt < TOK / 8; ++nt)")
    c("#pragma unroll")
    c.open("for (int e = 0; e < 2; ++e)")
    c("float sum = 0.f;",
      "#pragma unroll")
    c.open("for (int mt = 0; mt < MK; ++mt)")
    c("acc[mt][nt][e] = ex2(acc[mt][nt][e] - cm[nt][e]);",
      "acc[mt][nt][e + 2] = ex2(acc[mt][nt][e + 2] - cm[nt][e]);",
      "sum += acc[mt][nt][e] + acc[mt][nt][e + 2];")
    c.close()
    c("cs[nt][e] = sum;")
    c.close()
    c.close()
    _column_rounds(c, "cs[nt][e] += __shfl_xor_sync(0xffffffffu, cs[nt][e], o);")
    c.open("if (KW > 1 && lane < 4)")
    c("#pragma unroll")
    c.open("for (int nt = 0; nt < TOK / 8; ++nt)")
    c("#pragma unroll",
      "for (int e = 0; e < 2; ++e) red_s[kw * BLOCK_N + tok0 + nt * 8 + lane * 2 + e] = "
      "make_float2(cm[nt][e], cs[nt][e]);")
    c.close()
    c.close()
    c("if (KW > 1) __syncthreads();  // every warp's (max, sum) of each token")
    c("// r = exp2(l - M) / total: this warp's exp2(l - m_w) times exp2(m_w - M) / total; "
      "dropped keys (past end" + (", masked" if v.mask else "") + ") get r = 0.  total >= 1 "
      "(the warp holding M adds exp2(0)): the fast division is exact enough")
    c("#pragma unroll")
    c.open("for (int nt = 0; nt < TOK / 8; ++nt)")
    c("#pragma unroll")
    c.open("for (int e = 0; e < 2; ++e)")
    c("const int i = tok0 + nt * 8 + (lane & 3) * 2 + e;",
      "const long long row = n0 + i;")
    keep = "row < end"
    if v.mask:
        keep += " && mask_ptr[b * mask_sb + row * mask_sn] != 0"
    c(f"const bool keep = {keep};",
      "float scale;")
    c.open("if (KW == 1)")
    c("scale = __fdividef(1.f, cs[nt][e]);")
    c.close(" else {")
    c.depth += 1
    c("float M = red_s[i].x;",
      "#pragma unroll",
      "for (int w = 1; w < KW; ++w) M = fmaxf(M, red_s[w * BLOCK_N + i].x);",
      "float total = 0.f;",
      "#pragma unroll",
      "for (int w = 0; w < KW; ++w) total += red_s[w * BLOCK_N + i].y * "
      "ex2(red_s[w * BLOCK_N + i].x - M);",
      "scale = __fdividef(ex2(cm[nt][e] - M), total);")
    c.close()
    c("if (!keep) scale = 0.f;",
      "#pragma unroll")
    c.open("for (int mt = 0; mt < MK; ++mt)")
    c("acc[mt][nt][e] *= scale;", "acc[mt][nt][e + 2] *= scale;",
      "nacc[mt][0] += acc[mt][nt][e];", "nacc[mt][1] += acc[mt][nt][e + 2];")
    c.close()
    c.close()
    c.close()
    c(f"// S += r^T v: A = r^T from the accumulator ({pack_T}), B = v through ldmatrix.trans",
      "#pragma unroll")
    c.open("for (int j = 0; j < TOK / 16; ++j)")
    c("#pragma unroll")
    c.open("for (int mt = 0; mt < MK; ++mt)")
    c(f"const unsigned a[4] = {{{pack_T}(acc[mt][2 * j][0], acc[mt][2 * j][1]), "
      f"{pack_T}(acc[mt][2 * j][2], acc[mt][2 * j][3]),",
      f"                      {pack_T}(acc[mt][2 * j + 1][0], acc[mt][2 * j + 1][1]), "
      f"{pack_T}(acc[mt][2 * j + 1][2], acc[mt][2 * j + 1][3])}};",
      "#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 16; ++nd)")
    c("unsigned vb[4];",
      "ldsm_x4_t(vb, v_t + (tok0 + j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VH + nd * 16 "
      "+ (lane >> 4) * 8);",
      f"{mma_T}(sacc[mt][2 * nd], a, vb[0], vb[1]);",
      f"{mma_T}(sacc[mt][2 * nd + 1], a, vb[2], vb[3]);")
    c.close()
    c.close()
    c.close()
    c.close()  # token loop
    c("// n: the 4 lanes of a row hold disjoint tokens",
      "#pragma unroll",
      "for (int mt = 0; mt < MK; ++mt)",
      "#pragma unroll",
      "  for (int r = 0; r < 2; ++r) {",
      "    nacc[mt][r] += __shfl_xor_sync(0xffffffffu, nacc[mt][r], 1);",
      "    nacc[mt][r] += __shfl_xor_sync(0xffffffffu, nacc[mt][r], 2);",
      "  }")
    c("// the token groups' partial S and n, added in shared memory in a fixed order "
      "(S_s, n_s alias the coefficients)")
    c.open("for (int g = 0; g < TG; ++g)")
    c("__syncthreads();")
    c.open("if (tg == g)")
    c("#pragma unroll")
    c.open("for (int mt = 0; mt < MK; ++mt)")
    c("const int k = krow0 + mt * 16 + (lane >> 2);",
      "#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 8; ++nd)")
    c("float* const s0 = S_s + k * SP + nd * 8 + (lane & 3) * 2;",
      "float* const s1 = s0 + 8 * SP;")
    c.open("if (g == 0)")
    c("s0[0] = sacc[mt][nd][0]; s0[1] = sacc[mt][nd][1];",
      "s1[0] = sacc[mt][nd][2]; s1[1] = sacc[mt][nd][3];")
    c.close(" else {")
    c.depth += 1
    c("s0[0] += sacc[mt][nd][0]; s0[1] += sacc[mt][nd][1];",
      "s1[0] += sacc[mt][nd][2]; s1[1] += sacc[mt][nd][3];")
    c.close()
    c.close()
    c.open("if ((lane & 3) == 0)")
    c("n_s[k] = (g == 0 ? 0.f : n_s[k]) + nacc[mt][0];",
      "n_s[k + 8] = (g == 0 ? 0.f : n_s[k + 8]) + nacc[mt][1];")
    c.close()
    c.close()
    c.close()
    c.close()
    c("__syncthreads();")
    state_store(c, "s", "n", "seg * s_sp + bh * s_sbh", "seg * n_sp + bh * n_sbh", mma=True)
    c.close()
    return finish(c, "gma_write_fwd", "responsibility + slot_write over keys (register "
                  "fragments, mma.sync)", v, t, config)


def _column_rounds(c: Code, step: str) -> None:
    """``step`` (of ``nt``, ``e``, ``o``) over the 8 row groups of a fragment (lanes
    xor 4, 8, 16): each round over every column of the tile."""
    c("#pragma unroll")
    c.open("for (int o = 4; o < 32; o <<= 1)")
    c("#pragma unroll")
    c.open("for (int nt = 0; nt < TOK / 8; ++nt)")
    c("#pragma unroll", f"for (int e = 0; e < 2; ++e) {step}")
    c.close()
    c.close()
