# causal decoding step(s) (row norm)
# variant: kind=decode, dtype=f32, q_covariance=shared, k_covariance=shared, same_mixture=True, norm=row, eps=1e-06, mask=True, init=True, precision=, D=64, Dv=64, K=64
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
    mask_ptr,
    mask_sb,
    mask_sn,
    m_mean_ptr,
    m_mean_sh,
    m_mean_sk,
    m_mean_sd,
    m_lv_ptr,
    m_lv_s0,
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
    # mixture m: coefficients of the expanded logits, base 2 (shared covariance)
    m_c = tl.load(m_logit_ptr + h * m_logit_sh + offs_k * m_logit_sk, mask=k_ok, other=0.0).to(tl.float32)
    m_prec = tl.exp(-tl.load(m_lv_ptr + h * m_lv_s0).to(tl.float64))
    # the x.x and rho terms are equal for every k and cancel in the softmax
    m_mu0 = tl.load(m_mean_ptr + h * m_mean_sh + offs_k[None, :] * m_mean_sk + offs_d0[:, None] * m_mean_sd, mask=dk_ok0, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_K]
    m_c -= (0.5 * tl.sum(m_mu0 * m_mu0 * m_prec, axis=0)).to(tl.float32)
    m_b0 = m_mu0 * m_prec * LOG2E  # multiplies x
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
        rq = tl.exp2(rq - tl.max(rq, 0))
        rq = rq / tl.sum(rq, 0)
        k0 = tl.load(k_base + row * k_sn + offs_d0 * k_sd).to(tl.float32)
        rk = m_c + tl.sum(k0[:, None] * m_b0, 0)
        rk = tl.exp2(rk - tl.max(rk, 0))
        rk = rk / tl.sum(rk, 0)
        rk = rk * (tl.load(mask_ptr + b64 * mask_sb + row * mask_sn) != 0).to(tl.float32)
        vt = tl.load(v_base + row * v_sn + offs_dv * v_sd, mask=dv_ok, other=0.0).to(tl.float32)
        mem += rk[:, None] * vt[None, :]  # inclusive: token t sees itself
        nk += rk
        y = tl.sum(rq[:, None] * mem, 0) / (tl.sum(rq * nk, 0) + EPS)
        tl.store(y_base + row * y_sn + offs_dv * y_sd, y.to(y_ptr.dtype.element_ty), mask=dv_ok)
    tl.store(st_ptr + bh64 * st_sbh + offs_k[:, None] * st_sk + offs_dv[None, :] * st_sdv, mem, mask=k_ok[:, None] & dv_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(nt_ptr + bh64 * nt_sbh + offs_k * nt_sk, nk, mask=k_ok)
