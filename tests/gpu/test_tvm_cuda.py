"""TVM backend, target cuda, on a GPU vs the float64 oracle: every variant
(causal x norm x covariance x key mask, causal also from an initial state) in
f32 / f16 / bf16 at GMA_SPEC's tolerances, torch tensors.

Two ways to get the kernels, whichever the GPU machine allows:
- in process: ``gmagen.compile(p, "tvm", target="cuda")`` where TVM's compiler
  is installed (nvcc compiles the kernels to cubin);
- exported: where only TVM's runtime is (the GPU machine's stripped package),
  set GMAGEN_TVM_EXPORTS to a directory written on a CPU machine by
  ``python tests/gpu/test_tvm_cuda.py export DIR [sm_90]``; the tests then run
  ``gmagen.load(DIR/<variant>)`` with the runtime alone.
Skipped without CUDA (torch) or without tvm.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

B, N, H, D, Dv, K = 2, 77, 3, 16, 8, 4
TOL = {"f32": 1e-4, "f16": 1e-2, "bf16": 2e-2}   # GMA_SPEC forward
NORMS, COVS = ("row", "slot"), ("diag", "spherical", "shared")
VARIANTS = [(c, n, cov, m, i) for c in (False, True) for n in NORMS for cov in COVS
            for m in (False, True) for i in ((False, True) if c and m else (False,))]


def variant_name(causal, norm, cov, mask, init, dtype):
    return "-".join(["causal" if causal else "bidir", norm, cov] + ["mask"] * mask
                    + ["init"] * init + [dtype])


def _export_all(out: str, arch: str) -> None:
    """On a CPU machine with TVM's compiler and nvcc: one library per variant."""
    import gmagen
    from gmagen.backends.tvm.export import export

    for causal, norm, cov, mask, init in VARIANTS:
        kern = gmagen.compile(gmagen.gma(causal, norm, cov), backend="tvm",
                              target={"kind": "cuda", "arch": arch})
        for dtype in TOL:
            path = os.path.join(out, variant_name(causal, norm, cov, mask, init, dtype))
            export(kern, path, {"D": D, "Dv": Dv, "K": K, "dtype": dtype, "key_mask": mask,
                                "initial_state": init})
            print(path, flush=True)
    for causal, norm in BENCH_VARIANTS:
        kern = gmagen.compile(gmagen.gma(causal, norm, "diag"), backend="tvm",
                              target={"kind": "cuda", "arch": arch})
        for dtype in ("f32", "bf16"):
            path = os.path.join(out, bench_name(causal, norm, dtype))
            export(kern, path, {**BENCH, "dtype": dtype, "key_mask": True})
            print(path, flush=True)
    for causal, norm, dims in LARGE:
        kern = gmagen.compile(gmagen.gma(causal, norm, "diag"), backend="tvm",
                              target={"kind": "cuda", "arch": arch})
        path = os.path.join(out, large_name(causal, norm, dims))
        export(kern, path, {"D": dims, "Dv": dims, "K": dims, "dtype": "bf16", "key_mask": True})
        print(path, flush=True)


# the benchmark's D = Dv = K = 64 (full 64-token tiles, 4 x 4 register tiles, the
# write plan's 272 threads) at N = 5000: two write segments of 4096 tokens, the last
# tile of 8 tokens
BENCH = {"D": 64, "Dv": 64, "K": 64}
BENCH_N = 5000
BENCH_VARIANTS = [(False, "row"), (False, "slot"), (True, "row")]


def bench_name(causal, norm, dtype):
    return f"bench-{'causal' if causal else 'bidir'}-{norm}-diag-mask-{dtype}"


# the largest shapes whose kernels fit an sm_90 block's shared memory (launch.py
# refuses the others at build time): bidirectional at D = Dv = K = 256 (its write
# kernel splits the K x (Dv + 1) accumulator tiles over blockIdx.z), causal at 128
LARGE = [(False, "row", 256), (False, "slot", 256), (True, "row", 128)]
LARGE_N = 300


def large_name(causal, norm, dims):
    return f"large-{'causal' if causal else 'bidir'}-{norm}-diag-mask-{dims}-bf16"


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "export":
    _export_all(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "sm_90")
    sys.exit(0)

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tvm")

import gmagen  # noqa: E402

pytestmark = pytest.mark.gpu
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
EXPORTS = os.environ.get("GMAGEN_TVM_EXPORTS")
if not EXPORTS and not gmagen.available_backends()["tvm"]:
    pytest.skip(f"tvm cannot build here ({gmagen.available_backends()['tvm'].reason}) and "
                f"GMAGEN_TVM_EXPORTS is not set", allow_module_level=True)


def _inputs(rng, covariance, dtype, mask, init, N=N, D=D, Dv=Dv, K=K):
    lv = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}[covariance]
    tokens = [rng.normal(size=(B, N, H, X)) for X in (D, D, Dv)]
    mix = [rng.normal(0, .5, (H, K, D)), rng.normal(0, .1, lv), rng.normal(0, .1, (H, K))]
    # round the tokens to the dtype first: the oracle sees the same values
    tokens = [torch.tensor(t, dtype=TORCH[dtype]).double().numpy() for t in tokens]
    extra = {}
    if mask:
        extra["key_mask"] = rng.random((B, N)) < .75
    if init:
        n0 = rng.uniform(.5, 8, (B, H, K))
        extra["initial_state"] = (n0[..., None] * rng.normal(size=(B, H, K, Dv)) / 2, n0)
    return tokens, mix, extra


def _cuda(x, dtype=torch.float32):
    if isinstance(x, tuple):
        return tuple(_cuda(a, dtype) for a in x)
    if x.dtype == np.bool_:
        return torch.tensor(x, device="cuda")
    return torch.tensor(x, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_name(*v, "") [:-1] for v in VARIANTS])
def test_variant(variant, dtype, config=None):
    causal, norm, cov, mask, init = variant
    rng = np.random.default_rng(hash((variant, dtype)) % 2**32)
    tokens, mix, extra = _inputs(rng, cov, dtype, mask, init)
    if EXPORTS and config is None:
        from gmagen.load import load

        run = load(os.path.join(EXPORTS, variant_name(*variant, dtype)))
    else:
        run = gmagen.compile(gmagen.gma(causal, norm, cov), backend="tvm", target="cuda",
                             config=config)
    args = [_cuda(t, TORCH[dtype]) for t in tokens] + [_cuda(m) for m in mix]
    y, (S, n) = run(*args, return_state=True, **{k: _cuda(v) for k, v in extra.items()})
    torch.cuda.synchronize()
    ref = gmagen.compile(gmagen.gma(causal, norm, cov), "numpy")
    yr, (Sr, nr) = ref(*tokens, *mix, return_state=True, **extra)
    assert y.dtype == TORCH[dtype] and y.is_cuda
    for got, want, what in ((y, yr, "y"), (S, Sr, "S"), (n, nr, "n")):
        got = got.double().cpu().numpy()
        assert not np.isnan(got).any(), what
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
        assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_name(*v, "") [:-1] for v in VARIANTS])
def test_variant_vector_loads(variant, dtype):
    """Config knob vector=1 (operands read as vectors, tables stored transposed):
    in-process builds only (it is not among the exported libraries)."""
    if not gmagen.available_backends()["tvm"]:
        pytest.skip("vector=1 is built in-process; here TVM runs exported libraries only")
    test_variant(variant, dtype, {"vector": 1})


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_name(*v, "") [:-1] for v in VARIANTS])
def test_variant_wide_tiles(variant, dtype):
    """Config knob wide_tiles=1 (16-bit token tiles staged as float32), with vector=1
    (the pair the A/B measures): in-process builds only."""
    if not gmagen.available_backends()["tvm"]:
        pytest.skip("wide_tiles=1 is built in-process; here TVM runs exported libraries only")
    test_variant(variant, dtype, {"vector": 1, "wide_tiles": 1})


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_name(*v, "") [:-1] for v in VARIANTS])
def test_variant_mma(variant, dtype):
    """Config knob mma=1 (the logits on tensor cores from bfloat16 pieces; K = 4 and
    D = 16 here: one 16 x 16 tile of K per 16 tokens, K padded), with the cuda
    defaults: in-process builds only."""
    if not gmagen.available_backends()["tvm"]:
        pytest.skip("mma=1 is built in-process; here TVM runs exported libraries only")
    test_variant(variant, dtype, {"vector": 1, "wide_tiles": 1, "mma": 1})


def _check_shape(causal, norm, dtype, name, N, dims, seed, config=None):
    rng = np.random.default_rng(seed)
    tokens, mix, extra = _inputs(rng, "diag", dtype, True, False, N=N, **dims)
    if EXPORTS and config is None:
        from gmagen.load import load

        run = load(os.path.join(EXPORTS, name))
    else:
        run = gmagen.compile(gmagen.gma(causal, norm, "diag"), backend="tvm", target="cuda",
                             config=config)
    args = [_cuda(t, TORCH[dtype]) for t in tokens] + [_cuda(m) for m in mix]
    y, (S, n) = run(*args, return_state=True, **{k: _cuda(v) for k, v in extra.items()})
    torch.cuda.synchronize()
    ref = gmagen.compile(gmagen.gma(causal, norm, "diag"), "numpy")
    yr, (Sr, nr) = ref(*tokens, *mix, return_state=True, **extra)
    for got, want, what in ((y, yr, "y"), (S, Sr, "S"), (n, nr, "n")):
        got = got.double().cpu().numpy()
        assert not np.isnan(got).any(), what
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
        assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("variant", BENCH_VARIANTS, ids=lambda v: str(v))
def test_bench_shape(variant, dtype):
    causal, norm = variant
    _check_shape(causal, norm, dtype, bench_name(causal, norm, dtype), BENCH_N, BENCH, 7)


@pytest.mark.parametrize("variant", BENCH_VARIANTS, ids=lambda v: str(v))
def test_bench_shape_vector_loads(variant):
    if not gmagen.available_backends()["tvm"]:
        pytest.skip("vector=1 is built in-process; here TVM runs exported libraries only")
    causal, norm = variant
    _check_shape(causal, norm, "bf16", "", BENCH_N, BENCH, 7, {"vector": 1})


@pytest.mark.parametrize("variant", BENCH_VARIANTS, ids=lambda v: str(v))
def test_bench_shape_wide_tiles(variant):
    if not gmagen.available_backends()["tvm"]:
        pytest.skip("wide_tiles=1 is built in-process; here TVM runs exported libraries only")
    causal, norm = variant
    _check_shape(causal, norm, "bf16", "", BENCH_N, BENCH, 7, {"vector": 1, "wide_tiles": 1})


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("variant", BENCH_VARIANTS, ids=lambda v: str(v))
def test_bench_shape_mma(variant, dtype):
    if not gmagen.available_backends()["tvm"]:
        pytest.skip("mma=1 is built in-process; here TVM runs exported libraries only")
    causal, norm = variant
    _check_shape(causal, norm, dtype, "", BENCH_N, BENCH, 7,
                 {"vector": 1, "wide_tiles": 1, "mma": 1})


@pytest.mark.parametrize("variant", LARGE, ids=lambda v: str(v))
def test_large_shape_mma(variant):
    """mma=1 at the largest shapes: where the token pieces do not fit a block's shared
    memory the kernel is built without them (a preference, like wide_tiles)."""
    if not gmagen.available_backends()["tvm"]:
        pytest.skip("mma=1 is built in-process; here TVM runs exported libraries only")
    causal, norm, dims = variant
    _check_shape(causal, norm, "bf16", "", LARGE_N, {"D": dims, "Dv": dims, "K": dims}, 11,
                 {"vector": 1, "wide_tiles": 1, "mma": 1})


@pytest.mark.parametrize("variant", LARGE, ids=lambda v: str(v))
def test_large_shape(variant):
    causal, norm, dims = variant
    _check_shape(causal, norm, "bf16", large_name(causal, norm, dims), LARGE_N,
                 {"D": dims, "Dv": dims, "K": dims}, 11)
