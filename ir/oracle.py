"""Float64 NumPy interpreter of the IR: the reference every backend is checked against.

One function per op of ``ops.py``, same names, written as directly from
GMA_SPEC.md as possible (the logits in the unexpanded (x - mu)^2 form, so
large-magnitude inputs lose nothing to cancellation).  Arrays are in logical
layout [B, N, H, X]; ``run`` handles the program's layout at the boundary.
A memory value is the pair (S [rows, H, K, Dv], n [rows, H, K]).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import ops as _ops
from .program import Program
from .types import MemoryType, TensorType
from .verify import verify

Memory = tuple[np.ndarray, np.ndarray]
SCAN_CHUNK = 64  # tokens per step of the oracle's chunked scan (bounds its memory)


def _f64(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if a is None else np.asarray(a, dtype=np.float64)


def _log_var_full(log_var: np.ndarray, covariance: str, shape_hkd: tuple[int, int, int]) -> np.ndarray:
    """Broadcast rho to [H, K, D] (spherical: over d; shared: over k and d)."""
    h, k, d = shape_hkd
    if covariance == "diag":
        return log_var
    if covariance == "spherical":
        return np.broadcast_to(log_var[:, :, None], (h, k, d))
    if covariance == "shared":
        return np.broadcast_to(log_var[:, None, None], (h, k, d))
    raise ValueError(f"covariance={covariance!r}, expected one of {_ops.COVARIANCES}")


def responsibility_logits(x: np.ndarray, mean: np.ndarray, log_var: np.ndarray,
                          logit: np.ndarray, covariance: str = "diag") -> np.ndarray:
    """l_k(x) = alpha_k - 1/2 sum_d [(x_d - mu_kd)^2 exp(-rho_kd) + rho_kd]; [B, N, H, K]."""
    x, mean, log_var, logit = (_f64(a) for a in (x, mean, log_var, logit))
    rho = _log_var_full(log_var, covariance, mean.shape)
    prec = np.exp(-rho)  # [H, K, D]
    logits = np.broadcast_to(logit - 0.5 * rho.sum(-1), x.shape[:3] + (mean.shape[1],)).copy()
    for d in range(x.shape[-1]):  # loop over D keeps memory at [B, N, H, K]
        diff = x[..., d, None] - mean[None, None, :, :, d]
        logits -= 0.5 * diff * diff * prec[None, None, :, :, d]
    return logits


def responsibility(x: np.ndarray, mean: np.ndarray, log_var: np.ndarray, logit: np.ndarray,
                   covariance: str = "diag") -> np.ndarray:
    """r(x) = softmax_k(l(x)), stable (row max subtracted); [B, N, H, K]."""
    logits = responsibility_logits(x, mean, log_var, logit, covariance)
    logits -= logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def _weights(r: np.ndarray, key_mask: Optional[np.ndarray]) -> np.ndarray:
    """m_j r_jk: masked keys write nothing."""
    if key_mask is None:
        return r
    return r * np.asarray(key_mask, dtype=bool)[:, :, None, None]


def _segments(cu_seqlens: Optional[np.ndarray], b: int, n: int) -> list[tuple[int, int, int]]:
    """(row, start, end): one per batch entry, or one per packed sequence."""
    if cu_seqlens is None:
        return [(i, 0, n) for i in range(b)]
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    return [(s, int(cu[s]), int(cu[s + 1])) for s in range(len(cu) - 1)]


def slot_write(r: np.ndarray, v: np.ndarray, key_mask: Optional[np.ndarray] = None,
               cu_seqlens: Optional[np.ndarray] = None) -> Memory:
    """S_k = sum_j m_j r_jk v_j [rows, H, K, Dv]; n_k = sum_j m_j r_jk [rows, H, K]."""
    r, v = _f64(r), _f64(v)
    w = _weights(r, key_mask)
    b, n, h, k = r.shape
    segs = _segments(cu_seqlens, b, n)
    s_mem = np.zeros((len(segs), h, k, v.shape[-1]))
    n_mem = np.zeros((len(segs), h, k))
    for row, lo, hi in segs:
        bi = 0 if cu_seqlens is not None else row
        s_mem[row] = np.einsum("nhk,nhd->hkd", w[bi, lo:hi], v[bi, lo:hi])
        n_mem[row] = w[bi, lo:hi].sum(0)
    return s_mem, n_mem


def _read(r: np.ndarray, s: np.ndarray, n: np.ndarray, norm: str, eps: float) -> np.ndarray:
    """One read with per-token memory: r [..., H, K], s [..., H, K, Dv], n [..., H, K]."""
    if norm == "row":
        num = np.einsum("...hk,...hkd->...hd", r, s)
        den = (r * n).sum(-1)[..., None] + eps
        return num / den
    if norm == "slot":
        return np.einsum("...hk,...hkd->...hd", r / (n + eps), s)
    raise ValueError(f"norm={norm!r}, expected one of {_ops.NORMS}")


def slot_read(r: np.ndarray, memory: Memory, cu_seqlens: Optional[np.ndarray] = None,
              norm: str = "row", eps: float = _ops.DEFAULT_EPS) -> np.ndarray:
    """row: sum_k r_ik S_k / (sum_k r_ik n_k + eps); slot: sum_k r_ik S_k / (n_k + eps)."""
    r = _f64(r)
    s_mem, n_mem = (_f64(a) for a in memory)
    b, n, h, k = r.shape
    y = np.zeros((b, n, h, s_mem.shape[-1]))
    for row, lo, hi in _segments(cu_seqlens, b, n):
        bi = 0 if cu_seqlens is not None else row
        y[bi, lo:hi] = _read(r[bi, lo:hi], s_mem[row][None], n_mem[row][None], norm, eps)
    return y


def causal_scan(rq: np.ndarray, rk: np.ndarray, v: np.ndarray,
                key_mask: Optional[np.ndarray] = None,
                initial_state: Optional[Memory] = None,
                cu_seqlens: Optional[np.ndarray] = None,
                norm: str = "row", eps: float = _ops.DEFAULT_EPS) -> tuple[np.ndarray, Memory]:
    """Query i reads S(i) = S0 + sum_{j<=i} m_j r_jk v_j, n(i) likewise (inclusive).

    Returns y [B, N, H, Dv] and the state after the last token of each row."""
    rq, rk, v = _f64(rq), _f64(rk), _f64(v)
    w = _weights(rk, key_mask)
    b, n, h, k = rq.shape
    dv = v.shape[-1]
    segs = _segments(cu_seqlens, b, n)
    if initial_state is None:
        s_state, n_state = np.zeros((len(segs), h, k, dv)), np.zeros((len(segs), h, k))
    else:
        s_state, n_state = (np.array(a, dtype=np.float64) for a in initial_state)
    y = np.zeros((b, n, h, dv))
    for row, lo, hi in segs:
        bi = 0 if cu_seqlens is not None else row
        s_run, n_run = s_state[row].copy(), n_state[row].copy()
        for c0 in range(lo, hi, SCAN_CHUNK):
            c1 = min(c0 + SCAN_CHUNK, hi)
            wc = w[bi, c0:c1]  # [C, H, K]
            s_pref = s_run + np.cumsum(wc[..., None] * v[bi, c0:c1, :, None, :], axis=0)
            n_pref = n_run + np.cumsum(wc, axis=0)
            y[bi, c0:c1] = _read(rq[bi, c0:c1], s_pref, n_pref, norm, eps)
            s_run, n_run = s_pref[-1], n_pref[-1]
        s_state[row], n_state[row] = s_run, n_run
    return y, (s_state, n_state)


# -- interpreter ------------------------------------------------------------

def _to_logical(a: np.ndarray, layout: str) -> np.ndarray:
    return a if layout == "bnhd" else np.swapaxes(a, 1, 2)


def interpret(program: Program, inputs: dict[str, object]) -> dict[str, object]:
    """Every value of ``program`` (inputs and op results) in logical layout
    [B, N, H, X]; missing optional inputs are None.  ``run`` and the gradient
    walk of ``oracle_grad`` both start from it."""
    env: dict[str, object] = {}
    for inp in program.inputs:
        value = inputs.get(inp.name)
        if value is None:
            if not inp.optional:
                raise KeyError(f"input {inp.name!r} is required")
            env[inp.name] = None
            continue
        if isinstance(inp.type, MemoryType):
            env[inp.name] = (_f64(value[0]), _f64(value[1]))  # type: ignore[index]
        elif inp.type.rank == 4:  # per-token [B, N, H, X], whatever its role
            env[inp.name] = _to_logical(np.asarray(value), program.layout)
        else:
            env[inp.name] = np.asarray(value)
    for op in program.ops:
        args = {f: (None if v is None else env[v]) for f, v in _ops.operands(op).items()}
        out = globals()[_ops.op_name(op)](**args, **_ops.attrs(op))
        res = list(_ops.results(op).values())
        if len(res) == 1:
            env[res[0]] = out
        else:
            for name, value in zip(res, out):
                env[name] = value
    return env


def run(program: Program, inputs: dict[str, object]) -> dict[str, object]:
    """Interpret ``program`` on NumPy inputs (missing optional inputs: absent).

    Per-token tensors (every rank-4 tensor, input or result: q, k, v,
    responsibilities) are read and written in ``program.layout``. Returns every
    output and the state (if the program names one), tensors as float64 arrays
    and memories as (S, n) pairs."""
    types = verify(program)
    env = interpret(program, inputs)
    result: dict[str, object] = {}
    for name in program.outputs + ((program.state,) if program.state else ()):
        value = env[name]
        t = types[name]
        if isinstance(t, TensorType) and t.rank == 4:
            value = _to_logical(value, program.layout)  # the swap is its own inverse
        result[name] = value
    return result
