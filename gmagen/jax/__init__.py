"""gmagen for JAX: ``gma`` with a custom VJP (recompute in the backward pass)."""

from .functional import gma

__all__ = ["gma"]
