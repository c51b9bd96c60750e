"""``GaussianMixtureAttention``: an nn.Module drop-in for an attention block."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from gmagen.dsl import check_choice
from gmagen.errors import ShapeError
from gmagen.ir import ops as _ops

from .functional import gma


class GaussianMixtureAttention(nn.Module):
    """Multi-head GMA over a [B, N, embed_dim] sequence (batch first).

    q, k, v and output projections as in ``nn.MultiheadAttention``; per head, a
    learnable K-component Gaussian mixture shared by queries and keys.

    Initialisation (``reset_parameters``):
      projections  xavier_uniform_, biases zero (as nn.MultiheadAttention), so
                   projected unit-variance tokens stay ~unit variance per dim;
      mean         N(0, 1) per component and dim: spread like the tokens;
      log_var      log(sqrt(head_dim)): variance sqrt(D), the mixture's analogue
                   of attention's 1/sqrt(D) temperature.  With unit variances the
                   logits of two components differ by ~sqrt(2D) and responsibilities
                   start near one-hot (few gradients); with variance sqrt(D) they
                   differ by ~1 and start soft;
      logit        0: equal mixture weights.

    forward(x, key_padding_mask=None, initial_state=None, return_state=False):
    ``key_padding_mask`` [B, N] bool follows nn.MultiheadAttention: True marks
    padding, whose keys write nothing.  Causal layers stream: pass the state a
    previous call returned as ``initial_state``."""

    def __init__(self, embed_dim: int, num_heads: int, num_components: int = 64, *,
                 head_dim: Optional[int] = None, value_dim: Optional[int] = None,
                 causal: bool = False, norm: str = "row", covariance: str = "diag",
                 eps: float = _ops.DEFAULT_EPS, bias: bool = True, backend: Optional[str] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("num_components", num_components)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f"GaussianMixtureAttention: {name}={value!r}, expected an int >= 1")
        if head_dim is None and embed_dim % num_heads:
            raise ShapeError(f"GaussianMixtureAttention: embed_dim={embed_dim} is not divisible by "
                             f"num_heads={num_heads}; pass head_dim")
        check_choice("norm", norm, _ops.NORMS)
        check_choice("covariance", covariance, _ops.COVARIANCES)
        self.embed_dim, self.num_heads, self.num_components = embed_dim, num_heads, num_components
        self.head_dim = head_dim or embed_dim // num_heads
        self.value_dim = value_dim or self.head_dim
        self.causal, self.norm, self.covariance, self.eps = causal, norm, covariance, eps
        self.backend = backend
        fk = {"device": device, "dtype": dtype}
        H, K, D, Dv = num_heads, num_components, self.head_dim, self.value_dim
        self.q_proj = nn.Linear(embed_dim, H * D, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, H * D, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, H * Dv, bias=bias, **fk)
        self.out_proj = nn.Linear(H * Dv, embed_dim, bias=bias, **fk)
        # mixture parameters stay float32 (or the float64 of a float64 layer): they
        # enter the logits, which 16-bit storage would blur
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        lv_shape = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[covariance]
        self.mean = nn.Parameter(torch.empty(H, K, D, device=device, dtype=pdt))
        self.log_var = nn.Parameter(torch.empty(lv_shape, device=device, dtype=pdt))
        self.logit = nn.Parameter(torch.empty(H, K, device=device, dtype=pdt))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        with torch.no_grad():
            self.mean.normal_(0.0, 1.0)
            self.log_var.fill_(0.5 * math.log(self.head_dim))
            self.logit.zero_()

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                initial_state: Optional[tuple[Tensor, Tensor]] = None,
                return_state: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ShapeError(f"GaussianMixtureAttention: x has shape {list(x.shape)}, expected "
                             f"[B, N, embed_dim={self.embed_dim}]")
        B, N, _ = x.shape
        H, D, Dv = self.num_heads, self.head_dim, self.value_dim
        q = self.q_proj(x).view(B, N, H, D)
        k = self.k_proj(x).view(B, N, H, D)
        v = self.v_proj(x).view(B, N, H, Dv)
        key_mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, N) or key_padding_mask.dtype != torch.bool:
                raise ShapeError(f"GaussianMixtureAttention: key_padding_mask has shape "
                                 f"{list(key_padding_mask.shape)} and dtype {key_padding_mask.dtype}"
                                 f", expected [B, N] = [{B}, {N}] bool (True = padding)")
            key_mask = ~key_padding_mask
        out = gma(q, k, v, self.mean, self.log_var, self.logit, causal=self.causal,
                  norm=self.norm, eps=self.eps, key_mask=key_mask, initial_state=initial_state,
                  return_state=return_state, backend=self.backend)
        y, state = out if return_state else (out, None)
        y = self.out_proj(y.reshape(B, N, H * Dv))
        return (y, state) if return_state else y

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_components={self.num_components}, head_dim={self.head_dim}, "
                f"value_dim={self.value_dim}, causal={self.causal}, norm={self.norm!r}, "
                f"covariance={self.covariance!r}, backend={self.backend!r}")
