"""gma_read_fwd with register fragments (``mma=2``, frag.py):
row:  y_i = sum_k r_ik S_k / (sum_k r_ik n_k + eps);  slot: y_i = sum_k r_ik S_k / (n_k + eps).

Block (b*h, segment, Dv block): the coefficient pieces, S (bfloat16, W: the
weights of the slot norm reach 1/eps and S is unbounded, float16 would
overflow) and n once; then every warp sweeps steps of MT x 16 tokens
(block_n / warps) on its own (no block barrier in the token loop): its raw
token rows into its shared tile, L [16 MT, KPAD] in registers (the pieces of
each A fragment split in registers; each B fragment of the coefficients serves
the MT tiles, so MT = 2 halves the shared-memory traffic per token), the softmax
over k among the 4 lanes of a row, y = w S with w's accumulator as the A
operand, y through the warp's tile to global memory.
"""

from __future__ import annotations

from . import frag
from .emit_read import kernel_params
from .prelude import (Code, Emitted, Tiles, Variant, bh_indices, finish, kernel_open,
                      segment_range, token_base)


def emit(v: Variant, t: Tiles, config: dict) -> Emitted:
    c = Code()
    cov = v.q_covariance
    pack_T = frag._mma_T(v)[1]
    s = frag.shape(v, t)
    # two blocks per SM where sm_90's shared memory allows; <= 128 threads, so that the
    # register cap (65536 / (2 THREADS) >= 256) costs nothing (the prefetch takes ~20)
    blocks = 2 if 2 * (frag.smem_bytes(v, t) + 1024) <= 228 * 1024 and t.num_threads <= 128 else 1
    kernel_open(c, "gma_read_fwd", kernel_params(v), "(B*H, segments, Dv blocks)", blocks)
    frag.declare(c, v, t)
    bh_indices(c)
    segment_range(c)
    c("const int dv0 = blockIdx.z * BLOCK_DV;")
    token_base(c, "q", vec=True)
    token_base(c, "y", const=False, vec=True)
    frag.emit_coefficients(c, "mq", cov)
    s_at = "s_ptr[b * s_sb + h * s_sh + k * s_sk + (long long)(dv0 + j) * s_sdv]"
    c("// the memory of (b, h): S_w [KPAD, BLOCK_DV] in W (zero outside), n_s [KPAD] (0 for k >= K)")
    c.open("for (int idx = tid; idx < KPAD * BLOCK_DV; idx += THREADS)")
    c("const int k = idx / BLOCK_DV, j = idx % BLOCK_DV;",
      f"S_w[k * VH + j] = cvt_W(k < K && dv0 + j < DV ? to_f({s_at}) : 0.f);")
    c.close()
    c("for (int k = tid; k < KPAD; k += THREADS) "
      "n_s[k] = k < K ? to_f(n_ptr[b * n_sb + h * n_sh + k * n_sk]) : 0.f;")
    c("__syncthreads();")
    c("T_t* const xt = tok_s + warp * PER_WARP;  // this warp's token rows, then its y tile")
    if cov == "spherical":
        c("float* const xsq = xsq_s + warp * 16 * MT;")
    c("// this warp's first 16 MT rows into registers (vector path; see emit_fetch)",
      "uint4 qr[XC];")
    c.open("if (D % 8 == 0 && q_vec)")
    frag.emit_fetch(c, "q", "16 * MT", "start + 16 * MT * warp", "DPAD", "", "D", "qr", "XC",
                    "lane", "32")
    c.close()
    c.open("for (long long n0 = start + 16 * MT * warp; n0 < end; n0 += 16 * MT * NWARPS)")
    c("__syncwarp();  // the previous step's y tile is read")
    c("// q rows n0 .. n0 + 16 MT - 1 -> xt, as they are (zeros outside)")
    c.open("if (D % 8 == 0 && q_vec)")
    c("#pragma unroll")
    c.open("for (int j = 0; j < XC; ++j)")
    c("const int idx = lane + j * 32;",
      "if (idx < 16 * MT * (DPAD / 8)) *reinterpret_cast<uint4*>(xt + (idx / (DPAD / 8)) * DH "
      "+ (idx % (DPAD / 8)) * 8) = qr[j];")
    c.close()
    c.close(" else {")
    c.depth += 1
    c.open("for (int idx = lane; idx < 16 * MT * DPAD; idx += 32)")
    c("const int i = idx / DPAD, d = idx % DPAD;",
      "const long long row = n0 + i;",
      "xt[i * DH + d] = (row < end && d < D) ? q_base[row * q_sn + (long long)d * q_sd] "
      ": cvt_T(0.f);")
    c.close()
    c.close()
    c("// the next step's rows: in flight during this step's products")
    c.open("if (D % 8 == 0 && q_vec && n0 + 16 * MT * NWARPS < end)")
    frag.emit_fetch(c, "q", "16 * MT", "n0 + 16 * MT * NWARPS", "DPAD", "", "D", "qr", "XC",
                    "lane", "32")
    c.close()
    c("__syncwarp();")
    if cov == "spherical":
        c("// |x|^2 per row (spherical)",
          "if (lane < 16 * MT) { float s = 0.f; for (int d = 0; d < D; ++d) { const float x = "
          "to_f(xt[lane * DH + d]); s = fmaf(x, x, s); } xsq[lane] = s; }",
          "__syncwarp();")
    c("// logits L [16 MT, KPAD]: tile m rows 16 m + lane / 4 (+ 8), columns k (2 (lane % 4), "
      "+ 1)",
      "float acc[MT][KPAD / 8][4];",
      "#pragma unroll",
      "for (int m = 0; m < MT; ++m)",
      "#pragma unroll",
      "  for (int nt = 0; nt < KPAD / 8; ++nt) acc[m][nt][0] = acc[m][nt][1] = acc[m][nt][2] = "
      "acc[m][nt][3] = 0.f;")
    frag.emit_logit_products(c, v, cov, "acc", "xt", "0", "0", "coef_s", "0", "KPAD * DH",
                             a_is_coef=False, nt="KPAD / 8", a_raw=True, m_tiles=s.mk)
    c("__syncwarp();  // every lane's fragments of the token rows are loaded: the tile is free")
    for m in range(s.mk):
        _tile_output(c, v, cov, m, pack_T)
    c("__syncwarp();")
    c.open("if (DV % 8 == 0 && y_vec)")
    c.open("for (int idx = lane; idx < 16 * MT * (BLOCK_DV / 8); idx += 32)")
    c("const int i = idx / (BLOCK_DV / 8), j = (idx % (BLOCK_DV / 8)) * 8;",
      "const long long row = n0 + i;",
      "if (row < end && dv0 + j < DV) *reinterpret_cast<uint4*>(y_base + row * y_sn + dv0 + j) = "
      "*reinterpret_cast<const uint4*>(xt + i * VH + j);")
    c.close()
    c.close(" else {")
    c.depth += 1
    c.open("for (int idx = lane; idx < 16 * MT * BLOCK_DV; idx += 32)")
    c("const int i = idx / BLOCK_DV, j = idx % BLOCK_DV;",
      "const long long row = n0 + i;",
      "if (row < end && dv0 + j < DV) y_base[row * y_sn + (long long)(dv0 + j) * y_sd] = "
      "xt[i * VH + j];")
    c.close()
    c.close()
    c.close()  # token loop
    c.close()
    return finish(c, "gma_read_fwd", "responsibility + slot_read over queries (register "
                  "fragments, mma.sync)", v, t, config)


def _tile_output(c: Code, v: Variant, cov: str, m: int, pack_T: str) -> None:
    """Tile m of the step: the softmax of acc[m], the norm, y [16, BLOCK_DV] = w S into
    rows 16 m .. of the warp's tile."""
    a, p = f"acc[{m}]", f"t{m}"
    c(f"// tile {m}: rows 16 * {m} + lane / 4 (+ 8)")
    c("{")
    c.depth += 1
    frag.emit_row_softmax(c, a, "c_s", "asq_s" if cov == "spherical" else "",
                          f"(xsq + {16 * m})" if cov == "spherical" else "", p=p)
    if v.norm == "row":
        c("float d0 = 0.f, d1 = 0.f;  // row norm: sum_k r_ik n_k")
    c("#pragma unroll")
    c.open("for (int nt = 0; nt < KPAD / 8; ++nt)")
    c("#pragma unroll")
    c.open("for (int e = 0; e < 2; ++e)")
    c("const int k = nt * 8 + (lane & 3) * 2 + e;",
      f"{a}[nt][e] *= {p}inv0;", f"{a}[nt][e + 2] *= {p}inv1;")
    if v.norm == "row":
        c(f"d0 = fmaf({a}[nt][e], n_s[k], d0);", f"d1 = fmaf({a}[nt][e + 2], n_s[k], d1);")
    else:
        c("// slot norm: weights r_ik / (n_k + eps); padded components stay 0",
          "const float wk = k < K ? 1.f / (n_s[k] + EPS) : 0.f;",
          f"{a}[nt][e] *= wk;", f"{a}[nt][e + 2] *= wk;")
    c.close()
    c.close()
    if v.norm == "row":
        c("d0 += __shfl_xor_sync(0xffffffffu, d0, 1); d0 += __shfl_xor_sync(0xffffffffu, d0, 2);",
          "d1 += __shfl_xor_sync(0xffffffffu, d1, 1); d1 += __shfl_xor_sync(0xffffffffu, d1, 2);",
          "const float f0 = 1.f / (d0 + EPS), f1 = 1.f / (d1 + EPS);")
    else:
        c("const float f0 = 1.f, f1 = 1.f;")
    c("// y [16, BLOCK_DV] = w S: A = w from the accumulator (W), B = S_w through ldmatrix.trans",
      "float yacc[BLOCK_DV / 8][4];",
      "#pragma unroll",
      "for (int nd = 0; nd < BLOCK_DV / 8; ++nd) yacc[nd][0] = yacc[nd][1] = yacc[nd][2] = "
      "yacc[nd][3] = 0.f;",
      "#pragma unroll")
    c.open("for (int j = 0; j < KPAD / 16; ++j)")
    c(f"const unsigned a[4] = {{pack_bf16({a}[2 * j][0], {a}[2 * j][1]), "
      f"pack_bf16({a}[2 * j][2], {a}[2 * j][3]),",
      f"                      pack_bf16({a}[2 * j + 1][0], {a}[2 * j + 1][1]), "
      f"pack_bf16({a}[2 * j + 1][2], {a}[2 * j + 1][3])}};",
      "#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 16; ++nd)")
    c("unsigned sb[4];",
      "ldsm_x4_t(sb, S_w + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VH + nd * 16 "
      "+ (lane >> 4) * 8);",
      "mma_bf16(yacc[2 * nd], a, sb[0], sb[1]);",
      "mma_bf16(yacc[2 * nd + 1], a, sb[2], sb[3]);")
    c.close()
    c.close()
    c("#pragma unroll")
    c.open("for (int nd = 0; nd < BLOCK_DV / 8; ++nd)")
    c(f"const int j = nd * 8 + (lane & 3) * 2, i = {16 * m} + (lane >> 2);  "
      "// two columns: one 4-byte store",
      f"*reinterpret_cast<unsigned*>(xt + i * VH + j) = {pack_T}(yacc[nd][0] * f0, "
      "yacc[nd][1] * f0);",
      f"*reinterpret_cast<unsigned*>(xt + (i + 8) * VH + j) = {pack_T}(yacc[nd][2] * f1, "
      "yacc[nd][3] * f1);")
    c.close()
    c.depth -= 1
    c("}")
