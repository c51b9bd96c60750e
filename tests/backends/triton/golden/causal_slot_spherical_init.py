# responsibility + slot_write over keys
# variant: kind=write, dtype=f32, q_covariance=spherical, k_covariance=spherical, same_mixture=True, norm=slot, eps=1e-06, mask=False, init=True, precision=, D=64, Dv=64, K=64
# config:  block_d=64, block_dv=64, block_n=64, decode_max_n=16, num_stages=2, num_warps=4, segments=0
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

D = tl.constexpr(64)
DV = tl.constexpr(64)
K = tl.constexpr(64)
BLOCK_D = tl.constexpr(64)
BLOCK_DV = tl.constexpr(64)
BLOCK_K = tl.constexpr(64)
EPS = tl.constexpr(1e-06)
DATA_DT = tl.constexpr(tl.float32)
WIDE_DT = tl.constexpr(tl.float32)
LOGIT_PRECISION = tl.constexpr("ieee")
DATA_PRECISION = tl.constexpr("ieee")


@triton.jit
def gma_write_fwd(
    k_ptr,
    k_sb,
    k_sn,
    k_sh,
    k_sd,
    v_ptr,
    v_sb,
    v_sn,
    v_sh,
    v_sd,
    mk_mean_ptr,
    mk_mean_sh,
    mk_mean_sk,
    mk_mean_sd,
    mk_lv_ptr,
    mk_lv_s0,
    mk_lv_s1,
    mk_logit_ptr,
    mk_logit_sh,
    mk_logit_sk,
    s_ptr,
    s_sp,
    s_sbh,
    s_sk,
    s_sdv,
    n_ptr,
    n_sp,
    n_sbh,
    n_sk,
    N,
    H,
    SEG,
    BLOCK_N: tl.constexpr,
):
    """grid: (B*H, segments, Dv blocks)"""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < BLOCK_K
    offs_d0 = 0 + tl.arange(0, BLOCK_D)
    dk_ok0 = k_ok[None, :]
    # mixture mk: coefficients of the expanded logits, base 2 (spherical covariance)
    mk_c = tl.load(mk_logit_ptr + h * mk_logit_sh + offs_k * mk_logit_sk, mask=k_ok, other=0.0).to(tl.float32)
    mk_rho = tl.load(mk_lv_ptr + h * mk_lv_s0 + offs_k * mk_lv_s1, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
    mk_prec = tl.exp(-mk_rho.to(tl.float64))
    mk_asq = (-0.5 * LOG2E) * mk_prec  # multiplies x.x
    mk_asq = (mk_asq - tl.sum(tl.where(k_ok, mk_asq, 0.0)) * (1.0 / K)).to(tl.float32)  # centred, see _coefficients
    mk_c -= 0.5 * D * mk_rho
    mk_mu0 = tl.load(mk_mean_ptr + h * mk_mean_sh + offs_k[None, :] * mk_mean_sk + offs_d0[:, None] * mk_mean_sd, mask=dk_ok0, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_K]
    mk_c -= (0.5 * tl.sum(mk_mu0 * mk_mu0 * mk_prec[None, :], axis=0)).to(tl.float32)
    mk_b0 = mk_mu0 * mk_prec[None, :] * LOG2E  # multiplies x
    mk_b0 = (mk_b0 - (tl.sum(tl.where(k_ok[None, :], mk_b0, 0.0), 1) * (1.0 / K))[:, None]).to(tl.float32)
    mk_c = tl.where(k_ok, mk_c * LOG2E, float('-inf'))
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < BLOCK_DV
    k_base = k_ptr + b64 * k_sb + h64 * k_sh
    v_base = v_ptr + b64 * v_sb + h64 * v_sh
    acc = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)  # S of this segment
    n_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    p = tl.program_id(1)
    start = p * SEG
    end = tl.minimum(start + SEG, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        rows = offs_n.to(tl.int64)
        k0 = tl.load(k_base + rows[:, None] * k_sn + offs_d0[None, :] * k_sd, mask=n_ok[:, None], other=0.0).to(tl.float32)
        rk = mk_c[None, :] + tl.dot(k0, mk_b0, input_precision=LOGIT_PRECISION)  # logits, base 2
        rk += (tl.sum(k0 * k0, 1))[:, None] * mk_asq[None, :]
        rk = tl.exp2(rk - tl.max(rk, 1)[:, None])
        rk = rk * (1.0 / tl.sum(rk, 1))[:, None]
        keep = n_ok
        rk = tl.where(keep[:, None], rk, 0.0)  # masked keys write nothing
        vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(rk.to(DATA_DT)), vt.to(DATA_DT), acc, input_precision=DATA_PRECISION)
        n_acc += tl.sum(rk, 0)
    out = s_ptr + p * s_sp + bh64 * s_sbh
    tl.store(out + offs_k[:, None] * s_sk + offs_dv[None, :] * s_sdv, acc, mask=k_ok[:, None] & dv_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(n_ptr + p * n_sp + bh64 * n_sbh + offs_k * n_sk, n_acc, mask=k_ok)


# causal chunked scan (slot norm)
# variant: kind=scan, dtype=f32, q_covariance=spherical, k_covariance=spherical, same_mixture=True, norm=slot, eps=1e-06, mask=False, init=True, precision=, D=64, Dv=64, K=64
# config:  block_d=64, block_dv=64, block_n=64, decode_max_n=16, num_stages=2, num_warps=4, segments=0
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

D = tl.constexpr(64)
DV = tl.constexpr(64)
K = tl.constexpr(64)
BLOCK_D = tl.constexpr(64)
BLOCK_DV = tl.constexpr(64)
BLOCK_K = tl.constexpr(64)
EPS = tl.constexpr(1e-06)
DATA_DT = tl.constexpr(tl.float32)
WIDE_DT = tl.constexpr(tl.float32)
LOGIT_PRECISION = tl.constexpr("ieee")
DATA_PRECISION = tl.constexpr("ieee")


@triton.jit
def gma_scan_fwd(
    q_ptr,
    q_sb,
    q_sn,
    q_sh,
    q_sd,
    k_ptr,
    k_sb,
    k_sn,
    k_sh,
    k_sd,
    v_ptr,
    v_sb,
    v_sn,
    v_sh,
    v_sd,
    m_mean_ptr,
    m_mean_sh,
    m_mean_sk,
    m_mean_sd,
    m_lv_ptr,
    m_lv_s0,
    m_lv_s1,
    m_logit_ptr,
    m_logit_sh,
    m_logit_sk,
    s0_ptr,
    s0_sb,
    s0_sh,
    s0_sk,
    s0_sdv,
    n0_ptr,
    n0_sb,
    n0_sh,
    n0_sk,
    ps_ptr,
    pn_ptr,
    y_ptr,
    y_sb,
    y_sn,
    y_sh,
    y_sd,
    st_ptr,
    st_sbh,
    st_sk,
    st_sdv,
    nt_ptr,
    nt_sbh,
    nt_sk,
    N,
    H,
    BH,
    SEG,
    BLOCK_N: tl.constexpr,
):
    """grid: (B*H, segments, Dv blocks)"""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < BLOCK_K
    offs_d0 = 0 + tl.arange(0, BLOCK_D)
    dk_ok0 = k_ok[None, :]
    # mixture m: coefficients of the expanded logits, base 2 (spherical covariance)
    m_c = tl.load(m_logit_ptr + h * m_logit_sh + offs_k * m_logit_sk, mask=k_ok, other=0.0).to(tl.float32)
    m_rho = tl.load(m_lv_ptr + h * m_lv_s0 + offs_k * m_lv_s1, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
    m_prec = tl.exp(-m_rho.to(tl.float64))
    m_asq = (-0.5 * LOG2E) * m_prec  # multiplies x.x
    m_asq = (m_asq - tl.sum(tl.where(k_ok, m_asq, 0.0)) * (1.0 / K)).to(tl.float32)  # centred, see _coefficients
    m_c -= 0.5 * D * m_rho
    m_mu0 = tl.load(m_mean_ptr + h * m_mean_sh + offs_k[None, :] * m_mean_sk + offs_d0[:, None] * m_mean_sd, mask=dk_ok0, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_K]
    m_c -= (0.5 * tl.sum(m_mu0 * m_mu0 * m_prec[None, :], axis=0)).to(tl.float32)
    m_b0 = m_mu0 * m_prec[None, :] * LOG2E  # multiplies x
    m_b0 = (m_b0 - (tl.sum(tl.where(k_ok[None, :], m_b0, 0.0), 1) * (1.0 / K))[:, None]).to(tl.float32)
    m_c = tl.where(k_ok, m_c * LOG2E, float('-inf'))
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < BLOCK_DV
    mem = tl.load(s0_ptr + b64 * s0_sb + h64 * s0_sh + offs_k[:, None] * s0_sk + offs_dv[None, :] * s0_sdv, mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
    nk = tl.load(n0_ptr + b64 * n0_sb + h64 * n0_sh + offs_k * n0_sk, mask=k_ok, other=0.0).to(tl.float32)
    p = tl.program_id(1)
    # state entering segment p: add the earlier segments' memories in order (deterministic)
    for pp in range(0, p):
        part = (pp * BH + bh64)
        mem += tl.load(ps_ptr + part * (K * DV) + offs_k[:, None] * DV + offs_dv[None, :], mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
        nk += tl.load(pn_ptr + part * K + offs_k, mask=k_ok, other=0.0)
    q_base = q_ptr + b64 * q_sb + h64 * q_sh
    k_base = k_ptr + b64 * k_sb + h64 * k_sh
    v_base = v_ptr + b64 * v_sb + h64 * v_sh
    y_base = y_ptr + b64 * y_sb + h64 * y_sh
    offs_c = tl.arange(0, BLOCK_N)
    causal = offs_c[:, None] >= offs_c[None, :]  # key j <= query i inside the chunk
    start = p * SEG
    end = tl.minimum(start + SEG, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_c
        n_ok = offs_n < end
        rows = offs_n.to(tl.int64)
        q0 = tl.load(q_base + rows[:, None] * q_sn + offs_d0[None, :] * q_sd, mask=n_ok[:, None], other=0.0).to(tl.float32)
        rq = m_c[None, :] + tl.dot(q0, m_b0, input_precision=LOGIT_PRECISION)  # logits, base 2
        rq += (tl.sum(q0 * q0, 1))[:, None] * m_asq[None, :]
        rq = tl.exp2(rq - tl.max(rq, 1)[:, None])
        rq = rq * (1.0 / tl.sum(rq, 1))[:, None]
        k0 = tl.load(k_base + rows[:, None] * k_sn + offs_d0[None, :] * k_sd, mask=n_ok[:, None], other=0.0).to(tl.float32)
        rk = m_c[None, :] + tl.dot(k0, m_b0, input_precision=LOGIT_PRECISION)  # logits, base 2
        rk += (tl.sum(k0 * k0, 1))[:, None] * m_asq[None, :]
        rk = tl.exp2(rk - tl.max(rk, 1)[:, None])
        rk = rk * (1.0 / tl.sum(rk, 1))[:, None]
        keep = n_ok
        rk = tl.where(keep[:, None], rk, 0.0)  # masked keys write nothing
        vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(DATA_DT)
        n_incl = nk[None, :] + tl.cumsum(rk, 0)  # n_k(i), inclusive
        w = rq * tl.where(k_ok[None, :], 1.0 / (tl.where(k_ok[None, :], n_incl, 1.0) + EPS), 0.0)  # slot norm weights
        att = tl.dot(w.to(WIDE_DT), tl.trans(rk.to(WIDE_DT)), input_precision=DATA_PRECISION)
        att = tl.where(causal, att, 0.0)
        y = tl.dot(att.to(WIDE_DT), vt.to(WIDE_DT), input_precision=DATA_PRECISION)
        y = tl.dot(w.to(WIDE_DT), mem.to(WIDE_DT), y, input_precision=DATA_PRECISION)
        tl.store(y_base + rows[:, None] * y_sn + offs_dv[None, :] * y_sd, y.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
        mem = tl.dot(tl.trans(rk.to(DATA_DT)), vt, mem, input_precision=DATA_PRECISION)
        nk += tl.sum(rk, 0)
    if p == tl.num_programs(1) - 1:
        tl.store(st_ptr + bh64 * st_sbh + offs_k[:, None] * st_sk + offs_dv[None, :] * st_sdv, mem, mask=k_ok[:, None] & dv_ok[None, :])
        if tl.program_id(2) == 0:
            tl.store(nt_ptr + bh64 * nt_sbh + offs_k * nt_sk, nk, mask=k_ok)


# causal decoding step(s) (slot norm)
# variant: kind=decode, dtype=f32, q_covariance=spherical, k_covariance=spherical, same_mixture=True, norm=slot, eps=1e-06, mask=False, init=True, precision=, D=64, Dv=64, K=64
# config:  block_d=64, block_dv=64, block_n=64, decode_max_n=16, num_stages=2, num_warps=4, segments=0
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

D = tl.constexpr(64)
DV = tl.constexpr(64)
K = tl.constexpr(64)
BLOCK_D = tl.constexpr(64)
BLOCK_DV = tl.constexpr(64)
BLOCK_K = tl.constexpr(64)
EPS = tl.constexpr(1e-06)
DATA_DT = tl.constexpr(tl.float32)
WIDE_DT = tl.constexpr(tl.float32)
LOGIT_PRECISION = tl.constexpr("ieee")
DATA_PRECISION = tl.constexpr("ieee")


@triton.jit
def gma_decode_fwd(
    q_ptr,
    q_sb,
    q_sn,
    q_sh,
    q_sd,
    k_ptr,
    k_sb,
    k_sn,
    k_sh,
    k_sd,
    v_ptr,
    v_sb,
    v_sn,
    v_sh,
    v_sd,
    m_mean_ptr,
    m_mean_sh,
    m_mean_sk,
    m_mean_sd,
    m_lv_ptr,
    m_lv_s0,
    m_lv_s1,
    m_logit_ptr,
    m_logit_sh,
    m_logit_sk,
    s0_ptr,
    s0_sb,
    s0_sh,
    s0_sk,
    s0_sdv,
    n0_ptr,
    n0_sb,
    n0_sh,
    n0_sk,
    y_ptr,
    y_sb,
    y_sn,
    y_sh,
    y_sd,
    st_ptr,
    st_sbh,
    st_sk,
    st_sdv,
    nt_ptr,
    nt_sbh,
    nt_sk,
    N,
    H,
):
    """grid: (B*H, 1, Dv blocks)"""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < BLOCK_K
    offs_d0 = 0 + tl.arange(0, BLOCK_D)
    dk_ok0 = k_ok[None, :]
    # mixture m: coefficients of the expanded logits, base 2 (spherical covariance)
    m_c = tl.load(m_logit_ptr + h * m_logit_sh + offs_k * m_logit_sk, mask=k_ok, other=0.0).to(tl.float32)
    m_rho = tl.load(m_lv_ptr + h * m_lv_s0 + offs_k * m_lv_s1, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
    m_prec = tl.exp(-m_rho.to(tl.float64))
    m_asq = (-0.5 * LOG2E) * m_prec  # multiplies x.x
    m_asq = (m_asq - tl.sum(tl.where(k_ok, m_asq, 0.0)) * (1.0 / K)).to(tl.float32)  # centred, see _coefficients
    m_c -= 0.5 * D * m_rho
    m_mu0 = tl.load(m_mean_ptr + h * m_mean_sh + offs_k[None, :] * m_mean_sk + offs_d0[:, None] * m_mean_sd, mask=dk_ok0, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_K]
    m_c -= (0.5 * tl.sum(m_mu0 * m_mu0 * m_prec[None, :], axis=0)).to(tl.float32)
    m_b0 = m_mu0 * m_prec[None, :] * LOG2E  # multiplies x
    m_b0 = (m_b0 - (tl.sum(tl.where(k_ok[None, :], m_b0, 0.0), 1) * (1.0 / K))[:, None]).to(tl.float32)
    m_c = tl.where(k_ok, m_c * LOG2E, float('-inf'))
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < BLOCK_DV
    mem = tl.load(s0_ptr + b64 * s0_sb + h64 * s0_sh + offs_k[:, None] * s0_sk + offs_dv[None, :] * s0_sdv, mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
    nk = tl.load(n0_ptr + b64 * n0_sb + h64 * n0_sh + offs_k * n0_sk, mask=k_ok, other=0.0).to(tl.float32)
    q_base = q_ptr + b64 * q_sb + h64 * q_sh
    k_base = k_ptr + b64 * k_sb + h64 * k_sh
    v_base = v_ptr + b64 * v_sb + h64 * v_sh
    y_base = y_ptr + b64 * y_sb + h64 * y_sh
    for t in range(0, N):
        row = tl.zeros([], dtype=tl.int64) + t  # 64-bit token offset
        q0 = tl.load(q_base + row * q_sn + offs_d0 * q_sd).to(tl.float32)
        rq = m_c + tl.sum(q0[:, None] * m_b0, 0)
        rq += (tl.sum(q0 * q0, 0)) * m_asq
        rq = tl.exp2(rq - tl.max(rq, 0))
        rq = rq / tl.sum(rq, 0)
        k0 = tl.load(k_base + row * k_sn + offs_d0 * k_sd).to(tl.float32)
        rk = m_c + tl.sum(k0[:, None] * m_b0, 0)
        rk += (tl.sum(k0 * k0, 0)) * m_asq
        rk = tl.exp2(rk - tl.max(rk, 0))
        rk = rk / tl.sum(rk, 0)
        vt = tl.load(v_base + row * v_sn + offs_dv * v_sd, mask=dv_ok, other=0.0).to(tl.float32)
        mem += rk[:, None] * vt[None, :]  # inclusive: token t sees itself
        nk += rk
        y = tl.sum((rq * tl.where(k_ok, 1.0 / (tl.where(k_ok, nk, 1.0) + EPS), 0.0))[:, None] * mem, 0)
        tl.store(y_base + row * y_sn + offs_dv * y_sd, y.to(y_ptr.dtype.element_ty), mask=dv_ok)
    tl.store(st_ptr + bh64 * st_sbh + offs_k[:, None] * st_sk + offs_dv[None, :] * st_sdv, mem, mask=k_ok[:, None] & dv_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(nt_ptr + bh64 * nt_sbh + offs_k * nt_sk, nk, mask=k_ok)
