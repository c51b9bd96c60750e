"""Make a raw CUDA stream torch's current stream, for the length of a call.

Backends launch on the caller's stream (torch's current stream for torch
tensors, CuPy's for CuPy arrays) and allocate their outputs and scratch
buffers through torch, whose caching allocator ties every block to the
stream that was current when it was allocated.  So while a backend works,
torch's current stream must be the stream its kernels go to.

The trap this module exists for: ``torch.cuda.ExternalStream(0)`` is not the
legacy default stream.  torch's stream constructor reads a null pointer as "no
pointer given" and hands out a stream from its pool, which is created
non-blocking: nothing orders it with the default stream.  CuPy's default
stream (``cupy.cuda.Stream.null``) and torch's own default stream both have
pointer 0, so wrapping the pointer of the most common stream of all gave a
stream that races the caller's kernels (work torch enqueued there, such as a
fill of a fresh buffer, could land after the kernels that used the buffer).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager


def torch_stream(ptr: int, device: Any = None) -> ContextManager[Any]:
    """A context in which torch's current stream on ``device`` is the CUDA stream
    ``ptr`` (0 or 1: the legacy default stream).  Nothing changes where it already is."""
    import torch

    current = torch.cuda.current_stream(device)
    if int(current.cuda_stream) == int(ptr):
        return contextlib.nullcontext(current)
    # never ExternalStream(0): that is a fresh non-blocking pool stream.  1 is
    # cudaStreamLegacy, the same legacy default stream by its explicit handle, which
    # torch would misread as one of its own stream ids (odd ids are torch's, even ones
    # raw pointers: 2, cudaStreamPerThread, wraps fine)
    if int(ptr) in (0, 1):
        return torch.cuda.stream(torch.cuda.default_stream(device))
    return torch.cuda.stream(torch.cuda.ExternalStream(int(ptr), device=device))
