"""Float64 NumPy gradients (vector-Jacobian products) of the IR: the reference for
every backend's backward pass (GMA_SPEC "Gradients").

Mirrors ``oracle.py`` name for name with a ``_vjp`` suffix: each function takes
an op's forward inputs and the cotangent of its results, and returns the
cotangents of its float operands.  Arrays are in logical layout [B, N, H, X];
``run_vjp`` handles the program's layout at the boundary.  A memory cotangent
is the pair (dS [rows, H, K, Dv], dn [rows, H, K]), like the memory itself.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import ops as _ops
from . import oracle as _oracle
from .program import Program
from .types import MemoryType, TensorType, is_float
from .verify import verify

Memory = tuple[np.ndarray, np.ndarray]
_f64 = _oracle._f64


# -- responsibility --------------------------------------------------------------

def _reduce_log_var(d_full: np.ndarray, covariance: str) -> np.ndarray:
    """Sum the [H, K, D] gradient of rho over the axes the parameter broadcasts on."""
    if covariance == "diag":
        return d_full
    if covariance == "spherical":
        return d_full.sum(-1)
    if covariance == "shared":
        return d_full.sum((-2, -1))
    raise ValueError(f"covariance={covariance!r}, expected one of {_ops.COVARIANCES}")


def responsibility_vjp(x: np.ndarray, mean: np.ndarray, log_var: np.ndarray,
                       logit: np.ndarray, dr: np.ndarray, covariance: str = "diag"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """VJP of r = softmax_k(l), l_k = alpha_k - 1/2 sum_d [(x_d - mu_kd)^2 e^-rho_kd + rho_kd].

    GMA_SPEC "Gradients": dl = r * (dr - sum_k dr r) (softmax backward), then
    with p = e^-rho:  dx_d = -sum_k dl_k (x_d - mu_kd) p_kd,
    dmu_kd = sum dl_k (x_d - mu_kd) p_kd,  drho_kd = 1/2 sum dl_k ((x_d - mu_kd)^2 p_kd - 1),
    dalpha_k = sum dl_k (sums over tokens).  Returns (dx, dmean, dlog_var, dlogit),
    dlog_var shaped like log_var (diag [H, K, D], spherical [H, K], shared [H])."""
    x, mean, log_var, logit, dr = (_f64(a) for a in (x, mean, log_var, logit, dr))
    r = _oracle.responsibility(x, mean, log_var, logit, covariance)  # recomputed, not stored
    dl = r * (dr - (dr * r).sum(-1, keepdims=True))  # [B, N, H, K]
    rho = _oracle._log_var_full(log_var, covariance, mean.shape)
    prec = np.exp(-rho)  # [H, K, D]
    dl_sum = dl.sum((0, 1))  # [H, K]
    dx = np.zeros_like(x)
    dmean = np.zeros(mean.shape)
    drho = np.zeros(mean.shape)
    # the unexpanded (x - mu) form, one d at a time, as the forward: memory stays at
    # [B, N, H, K] and large |x| loses nothing to cancellation
    for d in range(x.shape[-1]):
        diff = x[..., d, None] - mean[None, None, :, :, d]  # [B, N, H, K]
        dl_diff = dl * diff
        dx[..., d] = -(dl_diff * prec[None, None, :, :, d]).sum(-1)
        dmean[:, :, d] = dl_diff.sum((0, 1)) * prec[:, :, d]
        drho[:, :, d] = 0.5 * ((dl_diff * diff).sum((0, 1)) * prec[:, :, d] - dl_sum)
    return dx, dmean, _reduce_log_var(drho, covariance), dl_sum.copy()


# -- reading the memory ----------------------------------------------------------

def _read_vjp(r: np.ndarray, s: np.ndarray, n: np.ndarray, dy: np.ndarray, norm: str,
              eps: float, per_token: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VJP of ``oracle._read`` for r [C, H, K], dy [C, H, Dv] and a memory that is
    either per token (s [C, H, K, Dv], n [C, H, K]; the scan's prefixes) or shared
    (s [1, H, K, Dv], n [1, H, K]).  Returns dr [C, H, K] and ds, dn per token or,
    when shared, summed over the tokens ([H, K, Dv], [H, K])."""
    tok = "c" if per_token else ""
    if norm == "row":
        # y_i = num_i / u_i,  u_i = sum_k r_ik n_k + eps  (GMA_SPEC "Gradients", row)
        u = (r * n).sum(-1)[..., None] + eps  # [C, H, 1]
        y = np.einsum("chk,chkd->chd", r, np.broadcast_to(s, r.shape + s.shape[-1:])) / u
        g = dy / u  # dL/dnum  [C, H, Dv]
        gy = (dy * y).sum(-1, keepdims=True) / u  # -dL/du  [C, H, 1]
        dr = np.einsum("chd,chkd->chk", g, np.broadcast_to(s, r.shape + s.shape[-1:])) - gy * n
        ds = np.einsum(f"chk,chd->{tok}hkd", r, g)
        dn = -gy * r
    elif norm == "slot":
        # y_i = sum_k a_ik S_k,  a_ik = r_ik / (n_k + eps)
        inv = 1.0 / (n + eps)  # [C|1, H, K]
        da = np.einsum("chd,chkd->chk", dy, np.broadcast_to(s, r.shape + s.shape[-1:]))
        dr = da * inv
        ds = np.einsum(f"chk,chd->{tok}hkd", r * inv, dy)
        dn = -da * r * inv * inv
    else:
        raise ValueError(f"norm={norm!r}, expected one of {_ops.NORMS}")
    return dr, ds, (dn if per_token else dn.sum(0))


def _zeros_memory(rows: int, h: int, k: int, dv: int) -> Memory:
    return np.zeros((rows, h, k, dv)), np.zeros((rows, h, k))


def _memory_cotangent(dmem: Optional[tuple], shape: tuple[int, int, int, int]) -> Memory:
    """A (dS, dn) pair as float64 copies; None (or a None half) means zeros."""
    ds, dn = (None, None) if dmem is None else dmem
    ds = np.zeros(shape) if ds is None else np.array(ds, dtype=np.float64)
    dn = np.zeros(shape[:-1]) if dn is None else np.array(dn, dtype=np.float64)
    return ds, dn


def slot_write_vjp(r: np.ndarray, v: np.ndarray, dS: Optional[np.ndarray],
                   dn: Optional[np.ndarray], key_mask: Optional[np.ndarray] = None,
                   cu_seqlens: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """VJP of S_k = sum_j m_j r_jk v_j, n_k = sum_j m_j r_jk (GMA_SPEC "Gradients"):
    dr_jk = m_j (v_j . dS_k + dn_k),  dv_j = sum_k m_j r_jk dS_k.  Returns (dr, dv);
    masked keys and tokens outside every packed sequence get zeros."""
    r, v = _f64(r), _f64(v)
    w = _oracle._weights(r, key_mask)
    b, n, h, k = r.shape
    segs = _oracle._segments(cu_seqlens, b, n)
    ds, dn = _memory_cotangent((dS, dn), (len(segs), h, k, v.shape[-1]))
    dw = np.zeros_like(r)
    dv = np.zeros_like(v)
    for row, lo, hi in segs:
        bi = 0 if cu_seqlens is not None else row
        dw[bi, lo:hi] = np.einsum("nhd,hkd->nhk", v[bi, lo:hi], ds[row]) + dn[row]
        dv[bi, lo:hi] = np.einsum("nhk,hkd->nhd", w[bi, lo:hi], ds[row])
    return _oracle._weights(dw, key_mask), dv


def slot_read_vjp(r: np.ndarray, memory: Memory, dy: np.ndarray,
                  cu_seqlens: Optional[np.ndarray] = None, norm: str = "row",
                  eps: float = _ops.DEFAULT_EPS) -> tuple[np.ndarray, Memory]:
    """VJP of slot_read. row, with u_i = sum_k r_ik n_k + eps (GMA_SPEC "Gradients"):
    dS = R^T (G / u), dn_k = -sum_i r_ik (G_i . y_i) / u_i, dR = (G / u) S^T - ((G . y) / u) n^T.
    slot, with a_ik = r_ik / (n_k + eps): dR = (G S^T) / (n + eps), dS = a^T G,
    dn_k = -sum_i (G_i . S_k) r_ik / (n_k + eps)^2.  Returns (dr, (dS, dn))."""
    r, dy = _f64(r), _f64(dy)
    s_mem, n_mem = (_f64(a) for a in memory)
    b, n, h, k = r.shape
    dr = np.zeros_like(r)
    ds, dn = np.zeros_like(s_mem), np.zeros_like(n_mem)
    for row, lo, hi in _oracle._segments(cu_seqlens, b, n):
        bi = 0 if cu_seqlens is not None else row
        dr[bi, lo:hi], ds[row], dn[row] = _read_vjp(
            r[bi, lo:hi], s_mem[row][None], n_mem[row][None], dy[bi, lo:hi], norm, eps,
            per_token=False)
    return dr, (ds, dn)


# -- the causal scan -----------------------------------------------------------

def _chunk_starts(w: np.ndarray, v: np.ndarray, s0: np.ndarray,
                  n0: np.ndarray) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(c0, c1, S, n before the chunk) for each chunk of one sequence (w [L, H, K],
    v [L, H, Dv]): the forward pass keeping only chunk boundaries, as a kernel
    keeps its chunk states."""
    starts = []
    s_run, n_run = s0, n0
    for c0 in range(0, len(w), _oracle.SCAN_CHUNK):
        c1 = min(c0 + _oracle.SCAN_CHUNK, len(w))
        starts.append((c0, c1, s_run, n_run))
        s_run = s_run + np.einsum("chk,chd->hkd", w[c0:c1], v[c0:c1])
        n_run = n_run + w[c0:c1].sum(0)
    return starts


def _suffix_sum(a: np.ndarray) -> np.ndarray:
    """out[j] = sum_{i >= j} a[i] along axis 0."""
    return np.cumsum(a[::-1], axis=0)[::-1]


def _scan_sequence_vjp(rq: np.ndarray, w: np.ndarray, v: np.ndarray, dy: np.ndarray,
                       s0: np.ndarray, n0: np.ndarray, gs: np.ndarray, gn: np.ndarray,
                       norm: str, eps: float) -> tuple[np.ndarray, ...]:
    """Backward of one sequence (rq, w [L, H, K], v, dy [L, H, Dv]) in reverse chunk
    order.  (gs, gn) enter as the final state's cotangent and leave as the
    initial state's: S(i) = S0 + sum_{j<=i} w_j v_j, so d(w_j v_j) = dS_final +
    sum_{i>=j} dS(i), and dS0 collects every dS(i).  Returns drq, dw, dv, gs, gn."""
    drq, dw, dv = np.zeros_like(rq), np.zeros_like(w), np.zeros_like(v)
    for c0, c1, s_start, n_start in reversed(_chunk_starts(w, v, s0, n0)):
        wc, vc = w[c0:c1], v[c0:c1]  # [C, H, K], [C, H, Dv]
        s_pref = s_start + np.cumsum(wc[..., None] * vc[:, :, None, :], axis=0)  # [C, H, K, Dv]
        n_pref = n_start + np.cumsum(wc, axis=0)  # [C, H, K]
        drq[c0:c1], ds_tok, dn_tok = _read_vjp(rq[c0:c1], s_pref, n_pref, dy[c0:c1], norm,
                                               eps, per_token=True)
        gs_tok = gs + _suffix_sum(ds_tok)  # dL/d(w_j v_j), [C, H, K, Dv]
        gn_tok = gn + _suffix_sum(dn_tok)  # dL/dw_j through n, [C, H, K]
        dw[c0:c1] = np.einsum("chkd,chd->chk", gs_tok, vc) + gn_tok
        dv[c0:c1] = np.einsum("chk,chkd->chd", wc, gs_tok)
        gs, gn = gs_tok[0], gn_tok[0]
    return drq, dw, dv, gs, gn


def causal_scan_vjp(rq: np.ndarray, rk: np.ndarray, v: np.ndarray, dy: Optional[np.ndarray],
                    dstate: Optional[tuple] = None, key_mask: Optional[np.ndarray] = None,
                    initial_state: Optional[Memory] = None,
                    cu_seqlens: Optional[np.ndarray] = None, norm: str = "row",
                    eps: float = _ops.DEFAULT_EPS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[Memory]]:
    """VJP of causal_scan: the chain rule of slot_write + slot_read (GMA_SPEC
    "Gradients") with a reverse-order scan of the state gradient, chunk by chunk
    (memory bounded by oracle.SCAN_CHUNK, never N x N).  ``dstate`` is the
    cotangent (dS, dn) of the returned final state (None: zeros).  Returns
    (drq, drk, dv, dinitial_state); dinitial_state is None when initial_state is."""
    rq, rk, v = _f64(rq), _f64(rk), _f64(v)
    dy = np.zeros(v.shape) if dy is None else _f64(dy)
    w = _oracle._weights(rk, key_mask)
    b, n, h, k = rq.shape
    segs = _oracle._segments(cu_seqlens, b, n)
    shape = (len(segs), h, k, v.shape[-1])
    s0, n0 = (_zeros_memory(*shape) if initial_state is None
              else (_f64(initial_state[0]), _f64(initial_state[1])))
    ds_state, dn_state = _memory_cotangent(dstate, shape)
    drq, dw, dv = np.zeros_like(rq), np.zeros_like(w), np.zeros_like(v)
    for row, lo, hi in segs:
        bi = 0 if cu_seqlens is not None else row
        sl = (bi, slice(lo, hi))
        # a zero-length sequence passes its state through: dS0 = dS_final
        drq[sl], dw[sl], dv[sl], ds_state[row], dn_state[row] = _scan_sequence_vjp(
            rq[sl], w[sl], v[sl], dy[sl], s0[row], n0[row], ds_state[row], dn_state[row],
            norm, eps)
    dinit = None if initial_state is None else (ds_state, dn_state)
    return drq, _oracle._weights(dw, key_mask), dv, dinit


# -- whole programs ----------------------------------------------------------------



def _op_vjp(op: _ops.Op, args: dict[str, object], cts: dict[str, object]) -> dict[str, object]:
    """Cotangents of an op's float operands (field -> value), given its arguments
    and the cotangents of its results (field -> value, None: zeros)."""
    attrs = _ops.attrs(op)
    if isinstance(op, _ops.Responsibility):
        grads = responsibility_vjp(args["x"], args["mean"], args["log_var"], args["logit"],
                                   cts["out"], **attrs)
        return dict(zip(("x", "mean", "log_var", "logit"), grads))
    if isinstance(op, _ops.SlotWrite):
        dmem = cts["out"] or (None, None)
        dr, dv = slot_write_vjp(args["r"], args["v"], *dmem, args["key_mask"],
                                args["cu_seqlens"])
        return {"r": dr, "v": dv}
    if isinstance(op, _ops.SlotRead):
        dy = cts["out"] if cts["out"] is not None else np.zeros(
            args["r"].shape[:3] + args["memory"][0].shape[-1:])
        dr, dmem = slot_read_vjp(args["r"], args["memory"], dy, args["cu_seqlens"], **attrs)
        return {"r": dr, "memory": dmem}
    if isinstance(op, _ops.CausalScan):
        drq, drk, dv, dinit = causal_scan_vjp(
            args["rq"], args["rk"], args["v"], cts["out"], cts["state_out"], args["key_mask"],
            args["initial_state"], args["cu_seqlens"], **attrs)
        return {"rq": drq, "rk": drk, "v": dv, "initial_state": dinit}
    raise TypeError(f"no VJP for op {op!r}")


def _add(a: object, b: object) -> object:
    """Sum of two cotangents of one value (arrays, or (S, n) pairs)."""
    if a is None:
        return b
    if isinstance(a, tuple):
        return (a[0] + b[0], a[1] + b[1])  # type: ignore[index]
    return a + b  # type: ignore[operator]


def _zeros_like_value(value: object) -> object:
    if isinstance(value, tuple):
        return (np.zeros(np.shape(value[0])), np.zeros(np.shape(value[1])))
    return np.zeros(np.shape(value))


def _seed(program: Program, types: dict, env: dict, cotangents: dict[str, object]) -> dict:
    """Cotangents of the outputs and the state, in logical layout, float64."""
    allowed = program.outputs + ((program.state,) if program.state else ())
    seeds: dict[str, object] = {}
    for name, ct in cotangents.items():
        if name not in allowed:
            raise KeyError(f"cotangent for {name!r}: not an output or the state of program "
                           f"{program.name!r}, expected one of {allowed}")
        if ct is None:
            continue
        if isinstance(types[name], MemoryType):
            ct = _memory_cotangent(ct, np.shape(env[name][0]))  # type: ignore[index]
        else:
            ct = _f64(ct)
            if types[name].rank == 4:
                ct = _oracle._to_logical(ct, program.layout)
        seeds[name] = ct
    return seeds


def run_vjp(program: Program, inputs: dict[str, object],
            cotangents: dict[str, object]) -> dict[str, object]:
    """Gradients of L = sum over outputs (and the state) of <value, cotangent>
    with respect to every input of ``program``.

    ``cotangents`` maps output names (and ``program.state``) to arrays in the
    program's layout, or (dS, dn) pairs for a memory; missing ones are zeros.
    Re-runs the forward with the oracle, then walks the ops in reverse,
    summing the cotangents of a value read by several ops.  Returns one entry
    per input: float tensors as float64 arrays in the program's layout, a memory
    input as a (dS, dn) pair (None when not given), None for non-float inputs
    (key_mask, cu_seqlens)."""
    types = verify(program)
    env = _oracle.interpret(program, inputs)
    grads = _seed(program, types, env, cotangents)
    for op in reversed(program.ops):
        cts = {f: grads.get(v) for f, v in _ops.results(op).items()}
        if all(ct is None for ct in cts.values()):
            continue  # nothing downstream depends on this op
        args = {f: (None if v is None else env[v]) for f, v in _ops.operands(op).items()}
        for field, ct in _op_vjp(op, args, cts).items():
            value = getattr(op, field)
            if ct is not None and value is not None:
                grads[value] = _add(grads.get(value), ct)
    out: dict[str, object] = {}
    for inp in program.inputs:
        t = inp.type
        floating = isinstance(t, MemoryType) or is_float(t.dtype)
        if not floating or env[inp.name] is None:
            out[inp.name] = None
            continue
        g = grads.get(inp.name)
        g = _zeros_like_value(env[inp.name]) if g is None else g
        if isinstance(t, TensorType) and t.rank == 4:
            g = _oracle._to_logical(g, program.layout)  # the swap is its own inverse
        out[inp.name] = g
    return out
