"""gmagen for PyTorch: ``gma`` (a custom op with autograd, traceable by
torch.compile) and ``GaussianMixtureAttention`` (an nn.Module attention block)."""

from gmagen.backends.registry import backend_availability as _availability

# torch's custom-op machinery imports triton; without a GPU the triton backend must
# first set TRITON_INTERPRET (read once, at triton's import), or later triton calls
# in this process would find triton unusable.  Probing here does that.
_availability("triton")

from .functional import gma  # noqa: E402
from .layer import GaussianMixtureAttention  # noqa: E402

__all__ = ["GaussianMixtureAttention", "gma"]
