"""gmagen: Gaussian Mixture Attention compiled from one IR to Triton, CUDA and TVM.

Re-exports only; see README.md for the API.
"""

from . import errors
from .compile import available_backends, compile, responsibilities
from .config import Config
from .dsl import ProgramBuilder, gma
from .errors import GMAError
from .load import load
from .tune import tune

__version__ = "0.1.0"

__all__ = ["Config", "GMAError", "ProgramBuilder", "__version__", "available_backends",
           "compile", "errors", "gma", "load", "responsibilities", "tune"]
