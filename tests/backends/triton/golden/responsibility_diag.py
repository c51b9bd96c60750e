# responsibility of each token
# variant: kind=responsibility, dtype=f32, q_covariance=diag, k_covariance=diag, same_mixture=True, norm=row, eps=0.0, mask=False, init=False, precision=, D=64, Dv=64, K=64
# config:  block_d=64, block_n=64, num_warps=4
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

D = tl.constexpr(64)
DV = tl.constexpr(64)
K = tl.constexpr(64)
BLOCK_D = tl.constexpr(64)
BLOCK_DV = tl.constexpr(64)
BLOCK_K = tl.constexpr(64)
EPS = tl.constexpr(0.0)
DATA_DT = tl.constexpr(tl.float32)
WIDE_DT = tl.constexpr(tl.float32)
LOGIT_PRECISION = tl.constexpr("ieee")
DATA_PRECISION = tl.constexpr("ieee")


@triton.jit
def gma_responsibility_fwd(
    q_ptr,
    q_sb,
    q_sn,
    q_sh,
    q_sd,
    mq_mean_ptr,
    mq_mean_sh,
    mq_mean_sk,
    mq_mean_sd,
    mq_lv_ptr,
    mq_lv_s0,
    mq_lv_s1,
    mq_lv_s2,
    mq_logit_ptr,
    mq_logit_sh,
    mq_logit_sk,
    r_ptr,
    r_sb,
    r_sn,
    r_sh,
    r_sk,
    N,
    H,
    BLOCK_N: tl.constexpr,
):
    """grid: (B*H, token blocks)"""
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
    # mixture mq: coefficients of the expanded logits, base 2 (diag covariance)
    mq_c = tl.load(mq_logit_ptr + h * mq_logit_sh + offs_k * mq_logit_sk, mask=k_ok, other=0.0).to(tl.float32)
    mq_mu0 = tl.load(mq_mean_ptr + h * mq_mean_sh + offs_k[None, :] * mq_mean_sk + offs_d0[:, None] * mq_mean_sd, mask=dk_ok0, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_K]
    mq_rho0 = tl.load(mq_lv_ptr + h * mq_lv_s0 + offs_k[None, :] * mq_lv_s1 + offs_d0[:, None] * mq_lv_s2, mask=dk_ok0, other=0.0).to(tl.float32)
    mq_prec0 = tl.exp(-mq_rho0.to(tl.float64))  # float64: see mixture_prologue
    mq_a0 = (-0.5 * LOG2E) * mq_prec0  # multiplies x*x
    mq_c -= (0.5 * tl.sum(mq_mu0 * mq_mu0 * mq_prec0 + mq_rho0, axis=0)).to(tl.float32)
    mq_b0 = mq_mu0 * mq_prec0 * LOG2E  # multiplies x
    mq_a0 = (mq_a0 - (tl.sum(tl.where(k_ok[None, :], mq_a0, 0.0), 1) * (1.0 / K))[:, None]).to(tl.float32)
    mq_b0 = (mq_b0 - (tl.sum(tl.where(k_ok[None, :], mq_b0, 0.0), 1) * (1.0 / K))[:, None]).to(tl.float32)
    mq_c = tl.where(k_ok, mq_c * LOG2E, float('-inf'))
    q_base = q_ptr + b64 * q_sb + h64 * q_sh
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    q0 = tl.load(q_base + rows[:, None] * q_sn + offs_d0[None, :] * q_sd, mask=n_ok[:, None], other=0.0).to(tl.float32)
    rq = mq_c[None, :] + tl.dot(q0, mq_b0, input_precision=LOGIT_PRECISION) + tl.dot(q0 * q0, mq_a0, input_precision=LOGIT_PRECISION)  # logits, base 2
    rq = tl.exp2(rq - tl.max(rq, 1)[:, None])
    rq = rq * (1.0 / tl.sum(rq, 1))[:, None]
    tl.store(r_ptr + b64 * r_sb + h64 * r_sh + rows[:, None] * r_sn + offs_k[None, :] * r_sk, rq, mask=n_ok[:, None] & k_ok[None, :])
