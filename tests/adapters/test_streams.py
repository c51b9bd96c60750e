"""gmagen.adapters.streams.torch_stream without a GPU: torch.cuda's stream functions
replaced by fakes that record what was asked for.  Pointer 0 must become torch's
default stream, never ExternalStream(0) (a fresh non-blocking pool stream in torch,
which raced the caller's kernels; the GPU tests test_default_stream_buffers and
test_cupy_default_stream check the real thing)."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

from gmagen.adapters.streams import torch_stream  # noqa: E402


class _Stream:
    def __init__(self, ptr: int) -> None:
        self.cuda_stream = ptr


@pytest.fixture
def made(monkeypatch):
    """torch.cuda with a current stream of pointer 77 and a default stream of 0;
    returns the pointers ExternalStream was called with."""
    made: list[int] = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream(77))
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: _Stream(0))
    monkeypatch.setattr(torch.cuda, "ExternalStream",
                        lambda ptr, device=None: made.append(ptr) or _Stream(ptr))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext(s))
    return made


@pytest.mark.parametrize("ptr", [0, 1])  # NULL and cudaStreamLegacy
def test_legacy_default_stream_is_torchs_default(made, ptr):
    with torch_stream(ptr) as s:
        assert s.cuda_stream == 0
    assert made == []


def test_other_pointers_are_wrapped(made):
    with torch_stream(0x5000) as s:
        assert s.cuda_stream == 0x5000
    assert made == [0x5000]


def test_current_stream_is_kept(made):
    with torch_stream(77) as s:
        assert s.cuda_stream == 77
    assert made == []
