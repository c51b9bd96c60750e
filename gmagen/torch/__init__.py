"""gmagen for PyTorch: ``gma`` (a custom op with autograd, traceable by
torch.compile) and ``GaussianMixtureAttention`` (an nn.Module attention block)."""

from .functional import gma
from .layer import GaussianMixtureAttention

__all__ = ["GaussianMixtureAttention", "gma"]
