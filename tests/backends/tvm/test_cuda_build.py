"""The same TE graphs built for {"kind": "cuda", "arch": "sm_90"} on a machine
without a GPU: tvm.compile succeeds and the generated CUDA source holds the
kernels (nothing is run; the cuda target is not callable through
gmagen.compile yet)."""

from __future__ import annotations

import pytest

import gmagen
from gmagen.config import Config
from gmagen.ir.passes.plan import plan_program

_TVM = gmagen.available_backends()["tvm"]
if not _TVM:
    pytest.skip(f"tvm backend unavailable: {_TVM.reason}", allow_module_level=True)
pytest.importorskip("tvm")

from gmagen.backends.tvm.lower import cuda_source  # noqa: E402

DIMS = {"D": 8, "Dv": 5, "K": 4}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_cuda_sm90_build(causal):
    plan = plan_program(gmagen.gma(causal, "slot" if causal else "row", "diag"))
    present = frozenset({"key_mask", "initial_state"})
    for kp in plan.kernels:
        src = cuda_source(kp, "bnhd", DIMS, present, Config(chunk=16), "sm_90")
        assert '__global__' in src and "blockIdx.x" in src and "threadIdx.x" in src, kp.name
        assert "main_kernel" in src, kp.name
        if kp.kind == "scan":
            assert "__expf" in src or "expf" in src
