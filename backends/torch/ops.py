"""The IR's four ops as plain torch operations: the portable path (any torch
device) and the readable reference beside the generated kernels.

One function per op of ``gmagen.ir.ops``, same names and arguments as
``gmagen.ir.oracle`` (GMA_SPEC.md, "The four operations").  Tensors are in
logical layout [B, N, H, X], any strides; a memory is the pair
(S [rows, H, K, Dv], n [rows, H, K]), rows = B or, with ``cu_seqlens``, the
number of packed sequences.

Precision: every op computes in its accumulation dtype, float64 when any of its
float inputs is float64 and float32 otherwise (f16 / bf16 / f32 inputs are
upcast first), and returns results in that dtype; the executable casts y back
to the token dtype.  float32 matrix products follow torch's global setting:
with TF32 allowed on CUDA (``torch.backends.cuda.matmul.allow_tf32`` or
``torch.set_float32_matmul_precision("high")``) y was off by ~1.3e-3 (H100,
N = 4096, D = Dv = K = 64), outside the float32 contract of 1e-4; by default
(IEEE float32) 3e-6.  Differentiable by torch autograd: no op writes in place
into a tensor that may require grad.  Nothing of size N x N is built: the
causal scan works in chunks of C tokens (a masked C x C product inside a
chunk, a K x Dv state carried across chunks).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from gmagen.ir import ops as _ops

Memory = tuple[torch.Tensor, torch.Tensor]
SCAN_CHUNK = 64  # default tokens per chunk of the causal scan (config knob "chunk")

# What each op calls, for the executable's ``source`` text.
TORCH_CALLS = {
    "responsibility": "x, mu centered at mean_k(mu); torch.exp; torch.einsum('bnhd,hkd->bnhk') "
                      "for x @ Bm^T and x*x @ A^T (diag; spherical: |x|^2 * A); "
                      "torch.softmax(dim=-1)",
    "slot_write": "torch.einsum('bnhk,bnhd->bhkd') and Tensor.sum(1), one per packed sequence",
    "slot_read": "torch.einsum('bnhk,bhkd->bnhd'), torch.einsum('bnhk,bhk->bnh') (row norm)",
    "causal_scan": "torch.nn.functional.pad and reshape to [B, H, N/C, C, X]; torch.matmul "
                   "(chunk states W^T V, masked C x C products Q W^T, Q S_in); torch.cumsum "
                   "over chunks (carried state) and inside chunks (slot norm)",
}


def acc_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any float input is float64, else float32 (GMA_SPEC: states
    accumulate in float32; the float64 path keeps float64 inputs exact)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _log_var_full(log_var: torch.Tensor, covariance: str, shape_hkd: Sequence[int]) -> torch.Tensor:
    """rho broadcast to [H, K, D] (spherical: over d; shared: over k and d)."""
    h, k, d = shape_hkd
    if covariance == "diag":
        return log_var
    if covariance == "spherical":
        return log_var[:, :, None].expand(h, k, d)
    if covariance == "shared":
        return log_var[:, None, None].expand(h, k, d)
    raise ValueError(f"covariance={covariance!r}, expected one of {_ops.COVARIANCES}")


def _logits(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, logit: torch.Tensor,
            covariance: str = "diag") -> torch.Tensor:
    """l_k(x) up to a per-row constant, [B, N, H, K], in GMA_SPEC's expanded form
    l = (x*x) @ A^T + x @ Bm^T + c (A = -exp(-rho)/2, Bm = mu exp(-rho),
    c = alpha - 1/2 sum_d (mu^2 exp(-rho) + rho)), on x and mu centered at each
    head's mean of the K means.

    Why the expanded form, not the oracle's (x - mu)^2 loop over D: it is two
    matrix products, and autograd keeps only [B, N, H, D] tensors for the
    backward pass, where the unexpanded form (chunked over D or N or not) saves
    [B, N, H, K, D] differences.  Its float32 rounding error is
    ~eps * sum_d (x_d^2 + |x_d mu_kd| + mu_kd^2) exp(-rho_kd) instead of
    ~eps * sum_d (x_d - mu_kd)^2 exp(-rho_kd); the coefficients are therefore
    formed in float64 and centred over k before rounding (as the Triton and CuPy
    backends do): sharp variances (rho ~ -8) at D = 8, 900 draws of gmagen
    check's sharp case, max 4.7e-5 (coefficients in float32: 1.03e-4, and 1.24e-4
    at check seed 1052735681, past the 1e-4 contract).  Earlier measurements
    against the float64 oracle (y, relative Frobenius, B2 N63 H3 Dv5 K4, 400
    draws each), float32 coefficients: |x| ~ 20
    at D = 8: 3.3e-5 (unexpanded: 2.8e-5); at D = 16 both reach ~1.2e-4 on 0.2% of sharp
    draws, and from D = 20 on both miss 1e-4 on a few percent: a float32 limit
    of logits ~1e4 (see tests/backends/triton/conftest.py), not of the form.
    Uncentered, the expansion loses digits when tokens and means sit far from
    the origin (means ~ 30 + N(0, .5), tokens near them: 4.8e-4, unexpanded
    3.5e-7); centering at mean_k(mu) brings that to 3.6e-7 for one [B, N, H, D]
    subtraction.  Means spread far apart with tokens halfway between keep a
    ~2x larger error (spread 10: 4.5e-6 vs 2.5e-6).  Pass float64 inputs when
    float32 is not enough.

    The x*x term is the same for every k under "shared" covariance and is left
    out (it would only cost digits); spherical needs just |x|^2 per token."""
    acc = acc_dtype(x, mean, log_var, logit)
    # the coefficients ([H, K, D]: cheap) in float64, centred over k and only then
    # rounded to acc: a term equal for every k cancels in the softmax, and what is
    # left is of the size of the coefficients' spread over k, not of exp(-rho)
    # itself (~3e3 for sharp components), so its rounding error is that much smaller
    wide = torch.float64
    mean, log_var, logit = (t.to(wide) for t in (mean, log_var, logit))
    # the logits do not depend on the center, so no gradient needs to flow through it
    center = mean.detach().mean(1)                            # [H, D]
    x, mean = x.to(acc) - center.to(acc), mean - center[:, None]
    rho = _log_var_full(log_var, covariance, mean.shape)     # [H, K, D]
    prec = torch.exp(-rho)                                    # [H, K, D]

    def centred(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(1, keepdim=True)).to(acc)
    c = logit - 0.5 * (mean * mean * prec + rho).sum(-1)     # [H, K]
    logits = torch.einsum("bnhd,hkd->bnhk", x, centred(mean * prec)) + centred(c)
    if covariance == "diag":
        logits = logits + torch.einsum("bnhd,hkd->bnhk", x * x, centred(-0.5 * prec))
    elif covariance == "spherical":
        asq = centred(-0.5 * torch.exp(-log_var))             # [H, K]
        logits = logits + (x * x).sum(-1, keepdim=True) * asq
    return logits


def responsibility(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor,
                   logit: torch.Tensor, covariance: str = "diag") -> torch.Tensor:
    """r(x) = softmax_k(l(x)) (stable: torch.softmax subtracts the row max); [B, N, H, K]."""
    return torch.softmax(_logits(x, mean, log_var, logit, covariance), dim=-1)


def _weights(r: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """m_j r_jk: masked keys write nothing."""
    if key_mask is None:
        return r
    return r * key_mask.to(device=r.device, dtype=r.dtype)[:, :, None, None]


def _segments(cu_seqlens: Optional[torch.Tensor], b: int, n: int) -> list[tuple[int, int, int]]:
    """(row, start, end): one per batch entry, or one per packed sequence."""
    if cu_seqlens is None:
        return [(i, 0, n) for i in range(b)]
    cu = [int(c) for c in cu_seqlens.tolist()]  # device offsets: one host read
    return [(s, cu[s], cu[s + 1]) for s in range(len(cu) - 1)]


def slot_write(r: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
               cu_seqlens: Optional[torch.Tensor] = None) -> Memory:
    """S_k = sum_j m_j r_jk v_j [rows, H, K, Dv]; n_k = sum_j m_j r_jk [rows, H, K]."""
    acc = acc_dtype(r, v)
    r, v = r.to(acc), v.to(acc)
    w = _weights(r, key_mask)
    if cu_seqlens is None:
        return torch.einsum("bnhk,bnhd->bhkd", w, v), w.sum(1)
    _, n, h, k = r.shape
    segs = _segments(cu_seqlens, 1, n)
    if not segs:
        return r.new_zeros((0, h, k, v.shape[-1])), r.new_zeros((0, h, k))
    s_mem = torch.stack([torch.einsum("nhk,nhd->hkd", w[0, lo:hi], v[0, lo:hi])
                         for _, lo, hi in segs])
    n_mem = torch.stack([w[0, lo:hi].sum(0) for _, lo, hi in segs])
    return s_mem, n_mem


def _read(r: torch.Tensor, s: torch.Tensor, n: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """One read of memory rows s [B, H, K, Dv], n [B, H, K] by r [B, N, H, K]."""
    if norm == "row":
        num = torch.einsum("bnhk,bhkd->bnhd", r, s)
        den = torch.einsum("bnhk,bhk->bnh", r, n)[..., None] + eps
        return num / den
    if norm == "slot":
        return torch.einsum("bnhk,bhkd->bnhd", r / (n[:, None] + eps), s)
    raise ValueError(f"norm={norm!r}, expected one of {_ops.NORMS}")


def slot_read(r: torch.Tensor, memory: Memory, cu_seqlens: Optional[torch.Tensor] = None,
              norm: str = "row", eps: float = _ops.DEFAULT_EPS) -> torch.Tensor:
    """row: sum_k r_ik S_k / (sum_k r_ik n_k + eps); slot: sum_k r_ik S_k / (n_k + eps)."""
    s_mem, n_mem = memory
    acc = acc_dtype(r, s_mem, n_mem)
    r, s_mem, n_mem = r.to(acc), s_mem.to(acc), n_mem.to(acc)
    if cu_seqlens is None:
        return _read(r, s_mem, n_mem, norm, eps)
    b, n, h, _ = r.shape
    pieces = [_read(r[:, lo:hi], s_mem[row:row + 1], n_mem[row:row + 1], norm, eps)
              for row, lo, hi in _segments(cu_seqlens, b, n) if hi > lo]
    if not pieces:
        return r.new_zeros((b, n, h, s_mem.shape[-1]))
    return torch.cat(pieces, dim=1)


def _chunked(t: torch.Tensor, c: int, pad: int) -> torch.Tensor:
    """[B, N, H, X] -> [B, H, N/C, C, X], zero tokens appended up to a multiple of C."""
    b, _, h, x = t.shape
    t = t.transpose(1, 2)
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
    return t.reshape(b, h, -1, c, x)


def _scan(rq: torch.Tensor, w: torch.Tensor, v: torch.Tensor, s0: torch.Tensor,
          n0: torch.Tensor, norm: str, eps: float, chunk: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal read of one batch of rows: rq, w [B, N, H, K], v [B, N, H, Dv], the
    state entering s0 [B, H, K, Dv], n0 [B, H, K] -> y [B, N, H, Dv], final state."""
    b, n, h, k = rq.shape
    dv = v.shape[-1]
    if n == 0:  # nothing to read or write: the state passes through (a copy, not an alias)
        return rq.new_zeros((b, 0, h, dv)), s0.clone(), n0.clone()
    c = min(chunk, n)
    pad = -n % c
    q_c, w_c, v_c = _chunked(rq, c, pad), _chunked(w, c, pad), _chunked(v, c, pad)
    # what each chunk writes, and the state entering it (exclusive prefix over chunks)
    ds = w_c.transpose(-1, -2) @ v_c                          # [B, H, NC, K, Dv]
    dn = w_c.sum(-2)                                          # [B, H, NC, K]
    s_in = s0[:, :, None] + torch.cumsum(
        torch.cat([torch.zeros_like(ds[:, :, :1]), ds[:, :, :-1]], dim=2), dim=2)
    n_in = n0[:, :, None] + torch.cumsum(
        torch.cat([torch.zeros_like(dn[:, :, :1]), dn[:, :, :-1]], dim=2), dim=2)
    if norm == "slot":  # r_ik / (n_k(i) + eps), n_k(i) inclusive of token i
        q_c = q_c / (n_in[..., None, :] + torch.cumsum(w_c, dim=-2) + eps)
    elif norm != "row":
        raise ValueError(f"norm={norm!r}, expected one of {_ops.NORMS}")
    causal = torch.ones(c, c, dtype=torch.bool, device=rq.device).tril()
    a = (q_c @ w_c.transpose(-1, -2)).masked_fill(~causal, 0.0)   # [B, H, NC, C, C]
    y = a @ v_c + q_c @ s_in                                  # [B, H, NC, C, Dv]
    if norm == "row":  # sum_k r_ik n_k(i) = r_i . n_in + sum_{j <= i} A_ij
        den = a.sum(-1, keepdim=True) + (q_c * n_in[..., None, :]).sum(-1, keepdim=True)
        y = y / (den + eps)
    y = y.reshape(b, h, -1, dv)[:, :, :n].transpose(1, 2)    # [B, N, H, Dv]
    return y, s_in[:, :, -1] + ds[:, :, -1], n_in[:, :, -1] + dn[:, :, -1]


def causal_scan(rq: torch.Tensor, rk: torch.Tensor, v: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None,
                initial_state: Optional[Memory] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                norm: str = "row", eps: float = _ops.DEFAULT_EPS, *,
                chunk: int = SCAN_CHUNK) -> tuple[torch.Tensor, Memory]:
    """Query i reads S(i) = S0 + sum_{j<=i} m_j r_jk v_j, n(i) likewise (inclusive),
    in chunks of ``chunk`` tokens.  Returns y [B, N, H, Dv] and the state after
    the last token of each row (each packed sequence with ``cu_seqlens``)."""
    state = tuple(initial_state) if initial_state is not None else (None, None)
    acc = acc_dtype(rq, rk, v, *state)
    rq, rk, v = rq.to(acc), rk.to(acc), v.to(acc)
    w = _weights(rk, key_mask)
    b, n, h, k = rq.shape
    dv = v.shape[-1]
    segs = _segments(cu_seqlens, b, n)
    if initial_state is None:
        s0, n0 = rq.new_zeros((len(segs), h, k, dv)), rq.new_zeros((len(segs), h, k))
    else:
        s0, n0 = (a.to(device=rq.device, dtype=acc) for a in initial_state)
    if cu_seqlens is None:
        y, s_end, n_end = _scan(rq, w, v, s0, n0, norm, eps, chunk)
        return y, (s_end, n_end)
    ys, s_rows, n_rows = [], [], []
    for row, lo, hi in segs:  # one state row per packed sequence
        y, s_end, n_end = _scan(rq[:, lo:hi], w[:, lo:hi], v[:, lo:hi], s0[row:row + 1],
                                n0[row:row + 1], norm, eps, chunk)
        ys.append(y)
        s_rows.append(s_end)
        n_rows.append(n_end)
    if not segs:
        return rq.new_zeros((b, n, h, dv)), (s0, n0)
    return torch.cat(ys, dim=1), (torch.cat(s_rows), torch.cat(n_rows))
