"""GMA the way a user would write it in eager PyTorch: the baseline of the benchmark.

Responsibilities with torch ops (expanded form, float32), then the associative
products; the causal variant in chunks (intra-chunk masked products, an
exclusive cumulative sum of chunk states).  Row norm, diagonal covariance.
"""

from __future__ import annotations

import torch


def responsibilities(x, mean, log_var, logit):
    """[B, N, H, K] float32."""
    prec = torch.exp(-log_var)  # [H, K, D]
    a = -0.5 * prec
    bm = mean * prec
    c = logit - 0.5 * (mean * mean * prec + log_var).sum(-1)  # [H, K]
    xf = x.float()
    logits = (torch.einsum("bnhd,hkd->bnhk", xf * xf, a) + torch.einsum("bnhd,hkd->bnhk", xf, bm)
              + c)
    return torch.softmax(logits, -1)


def eager_gma(q, k, v, mean, log_var, logit, causal=False, eps=1e-6, chunk=256):
    rq = responsibilities(q, mean, log_var, logit)
    rk = responsibilities(k, mean, log_var, logit)
    vf = v.float()
    if not causal:
        s = torch.einsum("bnhk,bnhd->bhkd", rk, vf)
        n = rk.sum(1)  # [B, H, K]
        num = torch.einsum("bnhk,bhkd->bnhd", rq, s)
        den = torch.einsum("bnhk,bhk->bnh", rq, n)[..., None] + eps
        return (num / den).to(v.dtype)
    B, N, H, K = rq.shape
    pad = (-N) % chunk
    if pad:
        rq, rk, vf = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (rq, rk, vf))
    C = chunk
    nc = (N + pad) // C
    rq = rq.view(B, nc, C, H, K)
    rk = rk.view(B, nc, C, H, K)
    vc = vf.view(B, nc, C, H, -1)
    ds = torch.einsum("bcnhk,bcnhd->bchkd", rk, vc)          # chunk states
    dn = rk.sum(2)                                           # [B, nc, H, K]
    s_in = torch.cumsum(ds, 1) - ds                          # exclusive prefix
    n_in = torch.cumsum(dn, 1) - dn
    att = torch.einsum("bcihk,bcjhk->bchij", rq, rk)
    att = att * torch.tril(torch.ones(C, C, device=q.device))
    num = torch.einsum("bchij,bcjhd->bcihd", att, vc) + torch.einsum("bcihk,bchkd->bcihd", rq, s_in)
    den = att.sum(-1).permute(0, 1, 3, 2) + torch.einsum("bcihk,bchk->bcih", rq, n_in) + eps
    y = (num / den[..., None]).reshape(B, nc * C, H, -1)[:, :N]
    return y.to(v.dtype)


def eager_gma_decode_step(q, k, v, mean, log_var, logit, state, eps=1e-6):
    """One new token [B, 1, H, D] against the state (S [B, H, K, Dv], n [B, H, K])."""
    s, n = state
    rq = responsibilities(q, mean, log_var, logit)[:, 0]  # [B, H, K]
    rk = responsibilities(k, mean, log_var, logit)[:, 0]
    s = s + rk[..., None] * v[:, 0, :, None, :].float()
    n = n + rk
    y = torch.einsum("bhk,bhkd->bhd", rq, s) / (torch.einsum("bhk,bhk->bh", rq, n)[..., None] + eps)
    return y[:, None].to(v.dtype), (s, n)
