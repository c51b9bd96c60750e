"""The CuPy backend's launch layer on the CPU, with the kernel function faked: the
arguments of a generated kernel are converted by their declared C types, in the
declared order (the parsing is cached per signature), and a missing argument or
a grid past CUDA's limits is an error before anything is launched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("cupy", reason="cupy is not installed")
torch = pytest.importorskip("torch")

from gmagen.backends.cupy import emit_write, launch, space  # noqa: E402
from gmagen.backends.cupy.prelude import Variant  # noqa: E402
from gmagen.errors import UnsupportedFeature  # noqa: E402


def _write_kernel():
    v = Variant("write", 64, 64, 64, "f32")
    cfg = space.default_config("write", 64, 64, 64, "f32", variant=v)
    # no opt-in to more shared memory (that asks the driver, which this machine lacks)
    return dataclasses.replace(emit_write.emit(v, space.tiles_of(cfg), dict(cfg)), smem=0)


def _args(emitted, tensor) -> dict:
    out = {}
    for i, decl in enumerate(emitted.params):
        name = decl.split()[-1]
        out[name] = tensor if "*" in decl and i % 2 else (4096 + i if "*" in decl else i + 0.5
                                                         if decl.startswith("float") else i)
    return out


def test_arguments_follow_the_declared_types_and_order():
    emitted = _write_kernel()
    tensor = torch.zeros(3)
    args = _args(emitted, tensor)
    seen = []

    def fn(grid, block, params, shared_mem, stream):
        seen.append((grid, block, params, shared_mem, stream))
    for _ in range(2):  # the second launch takes the cached parse
        launch.launch(fn, emitted, (4, 2, 1), args, stream="s", device=0)
    assert seen[0][:2] == ((4, 2, 1), (emitted.threads, 1, 1)) and seen[0][3:] == (0, "s")
    params = seen[1][2]
    assert len(params) == len(emitted.params)
    for decl, got in zip(emitted.params, params):
        value = args[decl.split()[-1]]
        if "*" in decl:
            want = tensor.data_ptr() if value is tensor else value
            assert type(got) is np.uint64 and int(got) == want, decl
        elif decl.startswith("long long"):
            assert type(got) is np.int64 and int(got) == value, decl
        elif decl.startswith("int"):
            assert type(got) is np.int32 and int(got) == value, decl
        else:
            assert type(got) is np.float32 and float(got) == np.float32(value), decl


def test_missing_arguments_and_bad_grids_are_refused():
    emitted = _write_kernel()
    args = _args(emitted, torch.zeros(3))
    missing = emitted.params[3].split()[-1]
    del args[missing]
    never = []
    with pytest.raises(TypeError, match=f"no value for parameter '{missing}'"):
        launch.launch(never.append, emitted, (1, 1, 1), args, stream=None, device=0)
    args = _args(emitted, torch.zeros(3))
    with pytest.raises(UnsupportedFeature, match="axis 1 must lie in 1..65535"):
        launch.launch(never.append, emitted, (1, 70000, 1), args, stream=None, device=0)
    assert never == []


@pytest.mark.parametrize("kind,N,block_n,fixed,blocks,sms,want", [
    ("scan", 1024, 64, 0, 64, 132, 4),      # 2 per SM, whole waves: 264 // 64 = 4
    ("scan", 65536, 64, 0, 64, 132, 4),
    ("write", 1024, 32, 0, 48, 132, 5),     # 5 asked: 32 tiles -> 5 x 7 (the last one 4)
    ("write", 4096, 32, 0, 512, 132, 1),    # more (b, h) than the wave holds
    ("read", 65536, 64, 0, 64, 132, 17),    # 8 per SM
    ("read", 100, 64, 0, 1, 132, 2),        # never past N's tiles
    ("write", 10 * 64, 64, 4, 64, 132, 4),  # fixed: 4 x 3 tiles (the last one 1)
    ("write", 10 * 64, 64, 6, 64, 132, 5),  # 6 asked: 2 tiles each, so 5 (no empty one)
    ("scan", 1, 64, 0, 4096, 132, 1),
])
def test_segment_count(kind, N, block_n, fixed, blocks, sms, want):
    from gmagen.backends.cupy.lower import cdiv, segment_count

    P = segment_count(kind, N, block_n, fixed, blocks, sms)
    assert P == want
    tiles = cdiv(N, block_n)
    seg = cdiv(tiles, P)
    assert (P - 1) * seg < tiles <= P * seg  # every segment holds tokens
