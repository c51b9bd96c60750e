# responsibility + slot_write over keys
# variant: kind=write, dtype=f32, q_covariance=diag, k_covariance=diag, same_mixture=True, norm=row, eps=0.0, mask=True, init=False, precision=, D=64, Dv=64, K=64
# config:  block_d=64, block_dv=64, block_n=64, num_stages=2, num_warps=4, segments=0
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
    mask_ptr,
    mask_sb,
    mask_sn,
    mk_mean_ptr,
    mk_mean_sh,
    mk_mean_sk,
    mk_mean_sd,
    mk_lv_ptr,
    mk_lv_s0,
    mk_lv_s1,
    mk_lv_s2,
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
    # mixture mk: coefficients of the expanded logits, base 2 (diag covariance)
    mk_c = tl.load(mk_logit_ptr + h * mk_logit_sh + offs_k * mk_logit_sk, mask=k_ok, other=0.0).to(tl.float32)
    mk_mu0 = tl.load(mk_mean_ptr + h * mk_mean_sh + offs_k[None, :] * mk_mean_sk + offs_d0[:, None] * mk_mean_sd, mask=dk_ok0, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_K]
    mk_rho0 = tl.load(mk_lv_ptr + h * mk_lv_s0 + offs_k[None, :] * mk_lv_s1 + offs_d0[:, None] * mk_lv_s2, mask=dk_ok0, other=0.0).to(tl.float32)
    mk_prec0 = tl.exp(-mk_rho0.to(tl.float64))  # float64: see mixture_prologue
    mk_a0 = (-0.5 * LOG2E) * mk_prec0  # multiplies x*x
    mk_c -= (0.5 * tl.sum(mk_mu0 * mk_mu0 * mk_prec0 + mk_rho0, axis=0)).to(tl.float32)
    mk_b0 = mk_mu0 * mk_prec0 * LOG2E  # multiplies x
    mk_a0 = (mk_a0 - (tl.sum(tl.where(k_ok[None, :], mk_a0, 0.0), 1) * (1.0 / K))[:, None]).to(tl.float32)
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
        rk = mk_c[None, :] + tl.dot(k0, mk_b0, input_precision=LOGIT_PRECISION) + tl.dot(k0 * k0, mk_a0, input_precision=LOGIT_PRECISION)  # logits, base 2
        rk = tl.exp2(rk - tl.max(rk, 1)[:, None])
        rk = rk * (1.0 / tl.sum(rk, 1))[:, None]
        keep = n_ok & (tl.load(mask_ptr + b64 * mask_sb + rows * mask_sn, mask=n_ok, other=0) != 0)
        rk = tl.where(keep[:, None], rk, 0.0)  # masked keys write nothing
        vt = tl.load(v_base + rows[:, None] * v_sn + offs_dv[None, :] * v_sd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(rk.to(DATA_DT)), vt.to(DATA_DT), acc, input_precision=DATA_PRECISION)
        n_acc += tl.sum(rk, 0)
    out = s_ptr + p * s_sp + bh64 * s_sbh
    tl.store(out + offs_k[:, None] * s_sk + offs_dv[None, :] * s_sdv, acc, mask=k_ok[:, None] & dv_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(n_ptr + p * n_sp + bh64 * n_sbh + offs_k * n_sk, n_acc, mask=k_ok)


# sum of per-segment slot memories
# variant: kind=reduce, dtype=f32, q_covariance=diag, k_covariance=diag, same_mixture=True, norm=row, eps=0.0, mask=True, init=False, precision=, D=64, Dv=64, K=64
# config:  block_d=64, block_dv=64, block_n=64, num_stages=2, num_warps=4, segments=0
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
def gma_reduce(
    ps_ptr,
    pn_ptr,
    s_ptr,
    s_sbh,
    s_sk,
    s_sdv,
    n_ptr,
    n_sbh,
    n_sk,
    H,
    BH,
    NSEG,
):
    """grid: (B*H, 1, Dv blocks)"""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < BLOCK_DV
    acc = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
    n_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    tile = offs_k[:, None] * DV + offs_dv[None, :]
    for p in range(0, NSEG):
        base = (p * BH + bh64) * (K * DV)
        acc += tl.load(ps_ptr + base + tile, mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
        n_acc += tl.load(pn_ptr + (p * BH + bh64) * K + offs_k, mask=k_ok, other=0.0)
    tl.store(s_ptr + bh64 * s_sbh + offs_k[:, None] * s_sk + offs_dv[None, :] * s_sdv, acc, mask=k_ok[:, None] & dv_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(n_ptr + bh64 * n_sbh + offs_k * n_sk, n_acc, mask=k_ok)


# responsibility + slot_read (row norm) over queries
# variant: kind=read, dtype=f32, q_covariance=diag, k_covariance=diag, same_mixture=True, norm=row, eps=1e-06, mask=False, init=False, precision=, D=64, Dv=64, K=64
# config:  block_d=64, block_dv=64, block_n=64, num_stages=2, num_warps=4, segments=0
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
def gma_read_fwd(
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
    s_ptr,
    s_sb,
    s_sh,
    s_sk,
    s_sdv,
    n_ptr,
    n_sb,
    n_sh,
    n_sk,
    y_ptr,
    y_sb,
    y_sn,
    y_sh,
    y_sd,
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
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < BLOCK_DV
    mem = tl.load(s_ptr + b64 * s_sb + h64 * s_sh + offs_k[:, None] * s_sk + offs_dv[None, :] * s_sdv, mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_DV]
    nk = tl.load(n_ptr + b64 * n_sb + h64 * n_sh + offs_k * n_sk, mask=k_ok, other=0.0).to(tl.float32)
    mem_op = mem.to(WIDE_DT)
    q_base = q_ptr + b64 * q_sb + h64 * q_sh
    y_base = y_ptr + b64 * y_sb + h64 * y_sh
    p = tl.program_id(1)
    start = p * SEG
    end = tl.minimum(start + SEG, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        rows = offs_n.to(tl.int64)
        q0 = tl.load(q_base + rows[:, None] * q_sn + offs_d0[None, :] * q_sd, mask=n_ok[:, None], other=0.0).to(tl.float32)
        rq = mq_c[None, :] + tl.dot(q0, mq_b0, input_precision=LOGIT_PRECISION) + tl.dot(q0 * q0, mq_a0, input_precision=LOGIT_PRECISION)  # logits, base 2
        rq = tl.exp2(rq - tl.max(rq, 1)[:, None])
        rq = rq * (1.0 / tl.sum(rq, 1))[:, None]
        num = tl.dot(rq.to(WIDE_DT), mem_op, input_precision=DATA_PRECISION)
        den = tl.sum(rq * nk[None, :], 1) + EPS
        y = num / den[:, None]
        tl.store(y_base + rows[:, None] * y_sn + offs_dv[None, :] * y_sd, y.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
