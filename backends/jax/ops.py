"""GMA's four ops in jax.numpy / lax (GMA_SPEC.md "The four operations").

One function per op of ``gmagen.ir.ops``, with the names and arguments of
``gmagen.ir.oracle`` (plus a keyword-only ``chunk``): pure functions of jnp
arrays, usable under jax.jit, jax.grad and jax.vmap on any JAX device.  Arrays
are in logical layout [B, N, H, X]; a memory is the pair (S [rows, H, K, Dv],
n [rows, H, K]), rows = B, or the number of packed sequences with cu_seqlens.

Precision: every op computes in the accumulation dtype -- float32 for
f16/bf16/f32 inputs, float64 when an input is float64 (only possible with x64
enabled) -- and every contraction runs at Precision.HIGHEST (no TF32/bf16
passes on GPUs or TPUs).  causal_scan returns y in v's dtype; the other ops
return the accumulation dtype.

Nothing of size N x N exists: causal_scan is a lax.scan over chunks of C
tokens, a masked C x C product inside a chunk and a carried (S, n) across
chunks.  Packed input (cu_seqlens, B = 1) uses segment ids, a per-token
sequence index, so it stays jittable: the carry is reset at sequence starts.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from gmagen.errors import ShapeError
from gmagen.ir import ops as _ops

Memory = tuple[jax.Array, jax.Array]
DEFAULT_CHUNK = 64  # tokens per lax.scan step (Config knob "chunk")
HIGHEST = lax.Precision.HIGHEST


def acc_dtype(*arrays: Optional[jax.Array]) -> jnp.dtype:
    """float64 if any input is float64 (x64 enabled), else float32."""
    wide = any(a is not None and jnp.dtype(a.dtype) == jnp.float64 for a in arrays)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _ein(spec: str, *operands: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *operands, precision=HIGHEST)


# -- responsibility ---------------------------------------------------------------
# The logits in the expanded form, centred over k:
#
#   l_k(x) = x^2 . A_k + x . B_k + c_k,  A_k = -1/2 prec_k,  B_k = prec_k mu_k,
#   c_k = alpha_k - 1/2 sum_d (mu_kd^2 prec_kd + rho_kd),
#
# with every term that is the same for all k left out (it cancels in the softmax):
# x and the means are taken relative to the means' centre over k, and the
# precisions relative to P_d = exp(-mean_k rho_kd) through
# prec_kd - P_d = P_d expm1(mean_k rho_kd - rho_kd), whose difference of
# log-variances is exact in float32 and whose expm1 keeps full relative precision.
# A_k is then of the size of the precisions' spread over k, not of exp(-rho) (~3e3
# for GMA_SPEC's sharp components), so what float32 rounds is that much smaller:
# the float64-coefficient route of the torch, Triton and CuPy backends, in float32
# alone (JAX has no float64 without x64).  The centre and P_d are constants to
# autodiff (the softmax does not depend on them).
#
# Measured: float32 vs the float64 oracle, relative error of causal row-norm y
# with a key mask (gmagen check's cases: B=2 N=63 H=3 K=4 Dv=5), "fail" = share of
# draws past the 1e-4 tolerance; sharp: log_var ~ N(-8, 0.1), large: q and k x 20.
#
#   case, D, draws          this form                 (x - mu)^2 prec, float32 (before)
#   sharp diag, 8, 600      max 4.2e-5                max 9.8e-5 (gmagen check: 1.14e-4)
#   sharp spherical, 8, 300 max 2.0e-5                max 1.0e-4, fail 0.3%
#   sharp diag, 16, 300     max 3.0e-5                max 1.4e-4, fail 0.7%
#   sharp diag, 32, 200     max 7.1e-5                max 2.1e-4, fail 1%
#   sharp diag, 64, 200     max 1.4e-4, fail 2.5%     max 4.2e-4, fail 3.5%
#   large diag, 64, 200     max 9.7e-6                max 1.3e-4, fail 1%
#   plain diag, 64, 100     max 3.6e-7                max 9.5e-7
#
# Sharp components at D = 64 still miss 1e-4 on a few draws: logits ~1e4 in
# float32, the limit every float32 backend shares.  The two contractions over D
# are matmuls, so neither the forward pass nor autodiff ever forms
# [..., H, K, D] (the unexpanded form needs a loop over D for that).


def _precision_offset(log_var: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(P, E): exp(-rho) = P (1 + E), P = exp(-mean over ``axis`` of rho) the same
    for every k, E = expm1(mean rho - rho) exact to float32's relative precision."""
    centre = lax.stop_gradient(jnp.mean(log_var, axis=axis, keepdims=True))
    return jnp.exp(-centre), jnp.expm1(centre - log_var)


def responsibility_logits(x: jax.Array, mean: jax.Array, log_var: jax.Array,
                          logit: jax.Array, covariance: str = "diag") -> jax.Array:
    """l_k(x) = alpha_k - 1/2 sum_d [(x_d - mu_kd)^2 exp(-rho_kd) + rho_kd] up to a
    term that is the same for every k (the softmax over k drops it); [B, N, H, K]."""
    acc = acc_dtype(x, mean, log_var, logit)
    x, mean, log_var, logit = (a.astype(acc) for a in (x, mean, log_var, logit))
    centre = lax.stop_gradient(jnp.mean(mean, axis=1))       # [H, D]
    x, mean = x - centre, mean - centre[:, None]
    if covariance == "diag":
        p, e = _precision_offset(log_var, 1)                 # [H, 1, D], [H, K, D]
        prec = p + p * e
        logits = _ein("...hd,hkd->...hk", x * x, -0.5 * p * e)
        rho = jnp.sum(log_var, axis=-1)
    elif covariance == "spherical":
        p, e = _precision_offset(log_var, 1)                 # [H, 1], [H, K]
        prec = jnp.broadcast_to((p + p * e)[:, :, None], mean.shape)
        logits = jnp.sum(x * x, axis=-1, keepdims=True) * (-0.5 * p * e)
        rho = log_var * mean.shape[-1]
    elif covariance == "shared":  # one precision for every k: the x^2 term cancels
        prec = jnp.broadcast_to(jnp.exp(-log_var)[:, None, None], mean.shape)
        logits, rho = jnp.zeros((), acc), jnp.zeros((), acc)
    else:
        raise ValueError(f"covariance={covariance!r}, expected one of {_ops.COVARIANCES}")
    c = logit - 0.5 * (jnp.sum(mean * mean * prec, axis=-1) + rho)
    return logits + _ein("...hd,hkd->...hk", x, mean * prec) + c


def responsibility(x: jax.Array, mean: jax.Array, log_var: jax.Array, logit: jax.Array,
                   covariance: str = "diag") -> jax.Array:
    """r(x) = softmax_k(l(x)), stable (row max subtracted); [B, N, H, K] in acc dtype."""
    return jax.nn.softmax(responsibility_logits(x, mean, log_var, logit, covariance), axis=-1)


# -- helpers ------------------------------------------------------------------------

def _weights(r: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
    """m_j r_jk: masked keys write nothing."""
    if key_mask is None:
        return r
    return jnp.where(key_mask.astype(bool)[:, :, None, None], r, 0)


def _check_packed(b: int, op: str) -> None:
    if b != 1:
        raise ShapeError(f"{op}: cu_seqlens is given, so the tokens must be packed with "
                         f"batch size 1, got B={b}")


def _segment_ids(cu_seqlens: jax.Array, n: int) -> jax.Array:
    """[1, N] int32: the packed sequence of each token (zero-length ones get none)."""
    cu = cu_seqlens.astype(jnp.int32)
    seg = jnp.searchsorted(cu[1:], jnp.arange(n, dtype=jnp.int32), side="right")
    return jnp.minimum(seg, cu.shape[0] - 2).astype(jnp.int32)[None]


def _chunks(x: jax.Array, c: int, axis: int, edge: bool = False) -> jax.Array:
    """Pad the token ``axis`` to a multiple of ``c`` (zeros, or the last value with
    ``edge``) and split it into chunks, the chunk index first: [..., N, ...] ->
    [ceil(N / C), ..., C, ...]."""
    n = x.shape[axis]
    pad = -n % c
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, mode="edge" if edge else "constant")
    x = x.reshape(x.shape[:axis] + ((n + pad) // c, c) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unchunk(y: jax.Array, axis: int, n: int) -> jax.Array:
    """Inverse of ``_chunks`` for a result: [M, ..., C, ...] -> [..., N, ...]."""
    y = jnp.moveaxis(y, 0, axis)
    y = y.reshape(y.shape[:axis] + (y.shape[axis] * y.shape[axis + 1],) + y.shape[axis + 2:])
    return lax.slice_in_dim(y, 0, n, axis=axis)


def _scan(body: Callable, carry: Any, xs: tuple) -> tuple:
    """lax.scan over the chunk axis; one chunk is a plain call (no loop to compile)."""
    if xs[0].shape[0] == 1:
        carry, ys = body(carry, tuple(x[0] for x in xs))
        return carry, jax.tree_util.tree_map(lambda y: y[None], ys)
    return lax.scan(body, carry, xs)


def _valid(b: int, n: int) -> jax.Array:
    """[B, N] True: real tokens; the padding ``_chunks`` adds gets False."""
    return jnp.ones((b, n), bool)


def _segment_write(w: jax.Array, v: jax.Array, seg: jax.Array, rows: int,
                   chunk: int) -> Memory:
    """Per-sequence sums of packed input (B = 1): scatter-add of each chunk's
    outer products w_j v_j^T ([C, H, K, Dv] at a time) into [rows, H, K, Dv]."""
    _, n, h, k = w.shape
    mem = (jnp.zeros((rows, h, k, v.shape[-1]), w.dtype), jnp.zeros((rows, h, k), w.dtype))
    if n == 0:
        return mem
    c = min(chunk, n)

    def body(mem: Memory, xs: tuple) -> tuple:
        wc, vc, sc = xs  # [1, C, H, K] (padding: 0), [1, C, H, Dv], [1, C]
        return (mem[0].at[sc[0]].add(wc[0, :, :, :, None] * vc[0, :, :, None, :]),
                mem[1].at[sc[0]].add(wc[0])), None

    return _scan(body, mem, (_chunks(w, c, 1), _chunks(v, c, 1), _chunks(seg, c, 1, True)))[0]


# -- slot_write, slot_read ------------------------------------------------------------

def slot_write(r: jax.Array, v: jax.Array, key_mask: Optional[jax.Array] = None,
               cu_seqlens: Optional[jax.Array] = None, *,
               chunk: int = DEFAULT_CHUNK) -> Memory:
    """S_k = sum_j m_j r_jk v_j [rows, H, K, Dv]; n_k = sum_j m_j r_jk [rows, H, K]."""
    acc = acc_dtype(r, v)
    w, v = _weights(r.astype(acc), key_mask), v.astype(acc)
    if cu_seqlens is None:
        return _ein("bnhk,bnhd->bhkd", w, v), jnp.sum(w, axis=1)
    _check_packed(w.shape[0], "slot_write")
    seg = _segment_ids(cu_seqlens, w.shape[1])
    return _segment_write(w, v, seg, cu_seqlens.shape[0] - 1, chunk)


def _norm_check(norm: str) -> None:
    if norm not in _ops.NORMS:
        raise ValueError(f"norm={norm!r}, expected one of {_ops.NORMS}")


def slot_read(r: jax.Array, memory: Memory, cu_seqlens: Optional[jax.Array] = None,
              norm: str = "row", eps: float = _ops.DEFAULT_EPS, *,
              chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """row: sum_k r_ik S_k / (sum_k r_ik n_k + eps); slot: sum_k r_ik S_k / (n_k + eps)."""
    _norm_check(norm)
    acc = acc_dtype(r, *memory)
    r = r.astype(acc)
    s_mem, n_mem = (a.astype(acc) for a in memory)
    b, n, _, _ = r.shape
    if cu_seqlens is None:
        if norm == "row":
            den = _ein("bnhk,bhk->bnh", r, n_mem) + eps
            return _ein("bnhk,bhkd->bnhd", r, s_mem) / den[..., None]
        return _ein("bnhk,bhkd->bnhd", r / (n_mem[:, None] + eps), s_mem)
    _check_packed(b, "slot_read")
    seg = _segment_ids(cu_seqlens, n)
    if n == 0:
        return jnp.zeros(r.shape[:3] + s_mem.shape[-1:], acc)
    c = min(chunk, n)

    def body(_: None, xs: tuple) -> tuple:  # each token reads its sequence's memory row
        rc, sc, valid = (x[0] for x in xs)  # [C, H, K], [C], [C]
        s_tok, n_tok = s_mem[sc], n_mem[sc]  # [C, H, K, Dv], [C, H, K]
        if norm == "row":
            den = jnp.where(valid[:, None], jnp.sum(rc * n_tok, axis=-1) + eps, 1)
            return None, (_ein("thk,thkd->thd", rc, s_tok) / den[..., None])[None]
        den = jnp.where(valid[:, None, None], n_tok + eps, 1)
        return None, _ein("thk,thkd->thd", rc / den, s_tok)[None]

    xs = (_chunks(r, c, 1), _chunks(seg, c, 1, True), _chunks(_valid(b, n), c, 1))
    return _unchunk(_scan(body, None, xs)[1], 1, n)


# -- causal_scan ----------------------------------------------------------------------
# Layout inside the scan: head-major [B, H, C, X] chunks, and the state S with n
# appended as one more value column, SN [B, H, K, Dv+1] (v gets a ones column):
# one product then reads S and n together, and one writes both.

def _scan_chunk(carry: tuple, xs: tuple, *, init: Optional[jax.Array], norm: str,
                eps: float) -> tuple:
    """One chunk of C tokens.  carry: SN [B, H, K, Dv+1] of the sequence seg_run
    [B] after the previous chunk; xs: rq, w (masked rk) [B, H, C, K], v1 (v | 1)
    [B, H, C, Dv+1], seg, valid [B, C].  ``init``: packed input's initial SN per
    sequence [rows, H, K, Dv+1], read by tokens whose sequence starts inside
    this chunk (None: zero)."""
    sn_run, seg_run = carry
    rq, w, v1, seg, valid = xs
    c, dv = rq.shape[2], v1.shape[-1] - 1
    same = (seg == seg_run[:, None])[:, None, :, None]  # [B, 1, C, 1]: continues the carry
    within = jnp.tril(jnp.ones((c, c), bool)) & (seg[:, :, None] == seg[:, None, :])  # [B, C, C]
    init_tok = None if init is None else jnp.swapaxes(init[seg], 1, 2)  # [B, H, C, K, Dv+1]
    if norm == "slot":  # q' = r / (n_k(i) + eps), n_k(i) inclusive
        n_base = jnp.where(same, sn_run[:, :, None, :, dv], 0)  # [B, H, C, K]
        if init_tok is not None:
            n_base = jnp.where(same, n_base, init_tok[..., dv])
        n_i = n_base + _ein("bij,bhjk->bhik", within.astype(w.dtype), w)
        qr = rq / jnp.where(valid[:, None, :, None], n_i + eps, 1)
    else:
        qr = rq
    a = jnp.where(within[:, None], _ein("bhik,bhjk->bhij", qr, w), 0)  # [B, H, C, C]
    y = _ein("bhix,bhxd->bhid", jnp.concatenate([jnp.where(same, qr, 0), a], axis=-1),
             jnp.concatenate([sn_run, v1], axis=-2))  # [B, H, C, Dv+1]
    if init_tok is not None:
        y = y + _ein("bhik,bhikd->bhid", jnp.where(same, 0, qr), init_tok)
    if norm == "row":  # the last column is sum_k r_ik n_k(i)
        y = y[..., :dv] / jnp.where(valid[:, None], y[..., dv] + eps, 1)[..., None]
    else:
        y = y[..., :dv]
    # carry on the state of the sequence of the chunk's last token
    last = seg[:, -1]
    base = jnp.where((last == seg_run)[:, None, None, None], sn_run,
                     0 if init is None else init[last])
    wl = jnp.where((seg == last[:, None])[:, None, :, None], w, 0)
    return (base + _ein("bhjk,bhjd->bhkd", wl, v1), last), y


def causal_scan(rq: jax.Array, rk: jax.Array, v: jax.Array,
                key_mask: Optional[jax.Array] = None,
                initial_state: Optional[Memory] = None,
                cu_seqlens: Optional[jax.Array] = None,
                norm: str = "row", eps: float = _ops.DEFAULT_EPS, *,
                chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, Memory]:
    """Query i reads S(i) = S0 + sum_{j<=i} m_j r_jk v_j, n(i) likewise (inclusive).

    Returns y [B, N, H, Dv] (v's dtype) and the state after the last token of
    each row (acc dtype): batch rows, or packed sequences with cu_seqlens."""
    _norm_check(norm)
    acc = acc_dtype(rq, rk, v, *(initial_state or ()))
    y_dtype = v.dtype
    w = _weights(rk.astype(acc), key_mask)
    rq, v = rq.astype(acc), v.astype(acc)
    b, n, h, k = rq.shape
    dv = v.shape[-1]
    rows = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if cu_seqlens is not None:
        _check_packed(b, "causal_scan")
    if initial_state is None:
        init = jnp.zeros((rows, h, k, dv + 1), acc)
    else:
        s0, n0 = (a.astype(acc) for a in initial_state)
        init = jnp.concatenate([s0, n0[..., None]], axis=-1)  # SN [rows, H, K, Dv+1]
    if n == 0:
        return jnp.zeros((b, 0, h, dv), y_dtype), (init[..., :dv], init[..., dv])
    if cu_seqlens is None:  # one sequence per batch row, carried from the initial state
        seg, carry, table = jnp.zeros((b, n), jnp.int32), (init, jnp.zeros((b,), jnp.int32)), None
    else:  # packed: no sequence carried yet; each starts from its row of the table
        seg = _segment_ids(cu_seqlens, n)
        carry = (jnp.zeros((b, h, k, dv + 1), acc), jnp.full((b,), -1, jnp.int32))
        table = None if initial_state is None else init
    c = min(chunk, n)
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), acc)], axis=-1)
    xs = tuple(_chunks(jnp.swapaxes(x, 1, 2), c, 2) for x in (rq, w, v1))  # [M, B, H, C, X]
    xs += (_chunks(seg, c, 1, edge=True), _chunks(_valid(b, n), c, 1))
    (sn, _), y = _scan(partial(_scan_chunk, init=table, norm=norm, eps=eps), carry, xs)
    y = jnp.swapaxes(_unchunk(y, 2, n), 1, 2).astype(y_dtype)  # [B, N, H, Dv]
    if cu_seqlens is not None:  # every sequence's final state (the carry has the last one)
        s_add, n_add = _segment_write(w, v, seg, rows, chunk)
        return y, (init[..., :dv] + s_add, init[..., dv] + n_add)
    return y, (sn[..., :dv], sn[..., dv])
