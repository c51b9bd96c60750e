"""Ahead-of-time export (target llvm): ``kernel.export(path, *specs)`` writes
libraries that ``gmagen.load(path)`` runs in a fresh process with TVM's
runtime alone (``TVM_USE_RUNTIME_LIB=1``: no libtvm_compiler), checked there
against the numpy oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gmagen
from gmagen.errors import OptionError

_TVM = gmagen.available_backends()["tvm"]
if not _TVM:
    pytest.skip(f"tvm backend unavailable: {_TVM.reason}", allow_module_level=True)
pytest.importorskip("tvm")

from gmagen.backends.tvm.export import MANIFEST, export  # noqa: E402

DIMS = {"D": 8, "Dv": 5, "K": 4}   # as test_tvm_backend.py: built functions are reused

# runs in the fresh process: only gmagen.load and TVM's runtime
SCRIPT = r"""
import json, sys
import numpy as np
import tvm
assert tvm.base._RUNTIME_ONLY, "TVM's compiler library was loaded"
import gmagen
from gmagen.load import load

cases = json.loads(sys.argv[1])
for case in cases:
    run = load(case["path"])
    rng = np.random.default_rng(case["seed"])
    B, N, H, D, Dv, K = case["shape"]
    bhnd = case["layout"] == "bhnd"
    tok = lambda X: rng.normal(size=(B, H, N, X) if bhnd else (B, N, H, X)).astype(np.float32)
    q, k, v = tok(D), tok(D), tok(Dv)
    mix = [rng.normal(0, .5, (H, K, D)), rng.normal(0, .1, (H, K, D)), rng.normal(0, .1, (H, K))]
    mix = [m.astype(np.float32) for m in mix]
    extra = {}
    if case["mask"]:
        extra["key_mask"] = rng.random((B, N)) < .75
    if case["init"]:
        n0 = rng.uniform(.5, 8, (B, H, K))
        extra["initial_state"] = ((n0[..., None] * rng.normal(size=(B, H, K, Dv))).astype(
            np.float32), n0.astype(np.float32))
    y, (S, n) = run(q, k, v, *mix, return_state=True, layout=case["layout"], **extra)
    ref = gmagen.compile(gmagen.gma(case["causal"], case["norm"], "diag",
                                    layout=case["layout"]), "numpy")
    f64 = lambda a: tuple(f64(x) for x in a) if isinstance(a, tuple) else (
        a.astype(np.float64) if a.dtype == np.float32 else a)
    yr, (Sr, nr) = ref(*(f64(a) for a in (q, k, v, *mix)), return_state=True,
                       layout=case["layout"], **{n_: f64(a) for n_, a in extra.items()})
    for got, want, what in ((y, yr, "y"), (S, Sr, "S"), (n, nr, "n")):
        assert got.dtype == np.float32 and got.shape == want.shape, what
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        assert err <= 1e-4, (case, what, err)
leaked = [m for m in sys.modules if m.startswith("gmagen.backends.tvm.")
          and m != "gmagen.backends.tvm.runtime"]
assert not leaked, leaked  # no emitter, schedule or TVM build step ran
print("ok", len(cases))
"""


def export_kernel(kernel, path, *specs):
    method = getattr(kernel, "export", None)
    return method(path, *specs) if method is not None else export(kernel, path, *specs)


def test_export_llvm_and_load_in_fresh_runtime_only_process(tmp_path, rng):
    cases = []
    # a causal kernel exported for two specializations (mask + state; bhnd, no mask)
    causal = gmagen.compile(gmagen.gma(True, "row", "diag"), backend="tvm", target="llvm")
    path = export_kernel(causal, str(tmp_path / "causal"),
                         {**DIMS, "key_mask": True, "initial_state": True},
                         {**DIMS, "layout": "bhnd"})
    cases += [dict(path=path, causal=True, norm="row", layout="bnhd", mask=True, init=True,
                   shape=(2, 37, 3, 8, 5, 4), seed=1),
              dict(path=path, causal=True, norm="row", layout="bhnd", mask=False, init=False,
                   shape=(1, 70, 2, 8, 5, 4), seed=2)]
    # a bidirectional kernel: what it has run so far (two plans, write then read)
    bidir = gmagen.compile(gmagen.gma(False, "slot", "diag"), backend="tvm", target="llvm")
    inputs = [rng.normal(size=s).astype(np.float32) for s in
              ((2, 9, 3, 8), (2, 9, 3, 8), (2, 9, 3, 5), (3, 4, 8), (3, 4, 8), (3, 4))]
    bidir(*inputs, key_mask=np.ones((2, 9), bool))
    path = export_kernel(bidir, str(tmp_path / "bidir"))
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    assert [s["plan"] for s in manifest["specializations"][0]["steps"]] == ["gma_write",
                                                                          "gma_read"]
    cases.append(dict(path=path, causal=False, norm="slot", layout="bnhd", mask=True,
                      init=False, shape=(2, 37, 3, 8, 5, 4), seed=3))
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"ok {len(cases)}"


def test_load_refuses_unexported_specialization(tmp_path, rng):
    from gmagen.errors import DTypeError, ShapeError
    from gmagen.load import load

    kern = gmagen.compile(gmagen.gma(True, "row", "diag"), backend="tvm", target="llvm")
    run = load(export_kernel(kern, str(tmp_path / "k"), DIMS))
    q = rng.normal(size=(1, 4, 3, 8)).astype(np.float32)
    v = rng.normal(size=(1, 4, 3, 5)).astype(np.float32)
    mix = [rng.normal(size=s).astype(np.float32) for s in ((3, 4, 8), (3, 4, 8), (3, 4))]
    y = run(q, q, v, *mix)
    assert y.shape == (1, 4, 3, 5) and y.dtype == np.float32
    with pytest.raises(ShapeError, match="no exported specialization"):
        run(q, q, v[..., :4], *mix)             # Dv = 4 was not exported
    with pytest.raises(DTypeError):
        run(q.astype(np.float64), q.astype(np.float64), v.astype(np.float64), *mix)
    with pytest.raises(OptionError, match="gmagen_tvm.json"):
        load(str(tmp_path))


def test_export_refusals(tmp_path):
    kern = gmagen.compile(gmagen.gma(False, "row", "diag"), backend="tvm", target="llvm")
    with pytest.raises(OptionError, match="not run yet"):
        export_kernel(kern, str(tmp_path / "a"))
    with pytest.raises(OptionError, match="unknown spec"):
        export_kernel(kern, str(tmp_path / "a"), {**DIMS, "Q": 1})
    with pytest.raises(OptionError, match="lacks"):
        export_kernel(kern, str(tmp_path / "a"), {"D": 8})
    numpy_kernel = gmagen.compile(gmagen.gma(False, "row", "diag"), "numpy")
    with pytest.raises(OptionError, match="backend"):
        export(numpy_kernel, str(tmp_path / "b"), DIMS)
