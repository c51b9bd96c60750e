"""The CuPy backend's CUDA emitters, on the CPU: every kernel of every variant
generates source that NVRTC compiles (sm_90: every variant in f32 and bf16,
one per kernel kind in f16; sm_80: every kernel kind x dtype; gma_coefficients
for every covariance and parameter dtype), ptxas reports no local-memory
spills for the default configs, the header names the variant and the config,
the responsibilities use the centred expanded form, and lowering through
``gmagen`` works without a GPU given ``arch=``.  16-bit kernels default to
tensor cores (mma=1); their CUDA-core path (mma=0) compiles too (every kernel
kind x 16-bit dtype x arch, and every bf16 variant on sm_90), and the MMA
sources have the structure mma.py describes (products, precisions, padding).

Registers and spills of each kernel are printed (``pytest -s``) and, with
GMAGEN_CUPY_RESOURCES=path, written as JSON.  Compiles go through the NVRTC
disk cache (knobs.cache_dir()/cupy), so a second run takes seconds; the first
compiles in two worker processes.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

pytest.importorskip("cupy", reason="cupy is not installed: the cupy backend cannot be tested")

import gmagen  # noqa: E402
from gmagen.dsl import gma_qk_mixtures  # noqa: E402
from gmagen.backends.cupy import (emit_coefficients, emit_read, emit_responsibility,  # noqa: E402
                                  emit_scan, emit_write, space)
from gmagen.backends.cupy.launch import build  # noqa: E402
from gmagen.backends.cupy.prelude import Variant, smem_bytes  # noqa: E402
from gmagen.errors import BackendUnavailable, OptionError  # noqa: E402

DTYPES = ("f32", "f16", "bf16")
COVS = ("diag", "spherical", "shared")
EMIT = {"responsibility": emit_responsibility.emit, "write": emit_write.emit,
        "reduce": emit_write.emit_reduce, "read": emit_read.emit, "scan": emit_scan.emit,
        "coefficients": emit_coefficients.emit}
DIMS = (64, 64, 64)
coefficients = emit_coefficients.coefficient_variant


def _variants() -> list[Variant]:
    """Every variant in f32 and bf16; f16 differs from bf16 only in its load/store
    conversions, so it gets one kernel per kind (keeps the cold run near a minute)."""
    D, Dv, K = DIMS
    out = [Variant("reduce", D, Dv, K)]
    for dt, cov in itertools.product(("f32", "bf16"), COVS):
        out.append(coefficients(D, K, dt, cov))
        out.append(Variant("responsibility", D, Dv, K, dt, q_covariance=cov))
        for mask in (False, True):
            out.append(Variant("write", D, Dv, K, dt, k_covariance=cov, mask=mask))
        for norm in ("row", "slot"):
            out.append(Variant("read", D, Dv, K, dt, q_covariance=cov, norm=norm, eps=1e-6))
            for mask, init in ((False, False), (True, True)):
                if dt == "bf16" and not mask:
                    continue
                out.append(Variant("scan", D, Dv, K, dt, q_covariance=cov, k_covariance=cov,
                                   norm=norm, eps=1e-6, mask=mask, init=init))
    out += [Variant("responsibility", D, Dv, K, "f16", q_covariance="shared"),
            Variant("write", D, Dv, K, "f16", k_covariance="spherical", mask=True),
            Variant("read", D, Dv, K, "f16", norm="slot", eps=1e-6),
            Variant("scan", D, Dv, K, "f16", norm="slot", mask=True, init=True, eps=1e-6)]
    return out


def _sm80_variants() -> list[Variant]:
    """One per kernel kind and dtype (the whole matrix runs for sm_90)."""
    D, Dv, K = DIMS
    out = [Variant("reduce", D, Dv, K)] + [coefficients(D, K, "f32", cov) for cov in COVS]
    for dt in DTYPES:
        out += [Variant("responsibility", D, Dv, K, dt, q_covariance="spherical"),
                Variant("write", D, Dv, K, dt, mask=True),
                Variant("read", D, Dv, K, dt, norm="slot", q_covariance="shared", eps=1e-6),
                Variant("scan", D, Dv, K, dt, mask=True, init=True, eps=1e-6),
                Variant("scan", D, Dv, K, dt, norm="slot", same_mixture=False, eps=1e-6)]
    return out


# big heads: the default config must shrink its tiles into shared memory, still without spills
BIG = [Variant("scan", 256, 256, 256, "bf16", mask=True, init=True, same_mixture=False, eps=1e-6),
       Variant("write", 256, 256, 256, "bf16", mask=True),
       Variant("read", 256, 256, 256, "bf16", eps=1e-6),
       Variant("responsibility", 256, 256, 256, "f32"),
       Variant("scan", 20, 33, 1, "f32", norm="slot", eps=1e-6),
       Variant("scan", 96, 100, 48, "f16", eps=1e-6, q_covariance="spherical",
               k_covariance="spherical"),
       coefficients(256, 256, "bf16", "diag"), coefficients(20, 1, "f32", "spherical"),
       coefficients(96, 48, "f16", "shared"), coefficients(256, 256, "f32", "spherical")]

def _fma_variants() -> list[Variant]:
    """16-bit kernels on CUDA cores (mma=0): every bf16 variant of a main kernel,
    one per kind in f16 (the sm_80 list adds one per kind and dtype)."""
    return [v for v in _variants() if v.dtype != "f32" and v.kind not in ("reduce", "coefficients")]


def _sm80_fma_variants() -> list[Variant]:
    return [v for v in _sm80_variants() if v.dtype != "f32"
            and v.kind not in ("reduce", "coefficients")]


# (variant, arch, mma): mma None = the default config (tensor cores for 16-bit tokens)
CASES = [(v, "sm_90", None) for v in _variants()] + [(v, "sm_80", None) for v in _sm80_variants()] + \
        [(v, "sm_90", None) for v in BIG] + [(v, "sm_90", 0) for v in _fma_variants()] + \
        [(v, "sm_80", 0) for v in _sm80_fma_variants()]


def _config(v: Variant, mma: int | None = None):
    if v.kind == "coefficients":
        return gmagen.Config()  # no tiles: one source for every config
    kind = "write" if v.kind == "reduce" else v.kind
    if mma is None or v.kind == "reduce":
        return space.default_config(kind, v.D, v.Dv, v.K, v.dtype, variant=v)
    # the CUDA-core path's default: what float32 tokens of the same shape get
    fma = space.default_config(kind, v.D, v.Dv, v.K, "f32",
                               variant=Variant(**{**v.describe(), "dtype": "f32"}))
    return fma.replace(mma=mma)


def _emit(v: Variant, mma: int | None = None):
    cfg = _config(v, mma)
    return EMIT[v.kind](v, space.tiles_of(cfg), dict(cfg))


def _compile(case: tuple) -> None:
    v, arch, mma = case
    build(_emit(v, mma), arch)


@pytest.fixture(scope="module", autouse=True)
def _precompiled():
    """Fill the NVRTC disk cache in two processes (the tests below then hit it)."""
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_compile, CASES, chunksize=4))
    yield


_TABLE: list[dict] = []


def _case_id(case: tuple) -> str:
    v, arch, mma = case
    if v.kind == "coefficients":
        return "-".join([v.kind, f"D{v.D}-K{v.K}", v.param_dtype, v.q_covariance, arch])
    tags = [v.kind, f"D{v.D}-Dv{v.Dv}-K{v.K}", v.dtype]
    if v.kind in ("responsibility", "read", "scan"):
        tags.append(v.q_covariance + ("" if v.same_mixture else "-qk"))
    elif v.kind == "write":
        tags.append(v.k_covariance)
    if v.kind in ("read", "scan"):
        tags.append(v.norm)
    tags += [t for t, on in (("mask", v.mask), ("init", v.init)) if on]
    if mma is not None:
        tags.append(f"mma{mma}")
    return "-".join(tags + [arch])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_compiles_without_spills(case):
    v, arch, mma = case
    emitted = _emit(v, mma)
    compiled = build(emitted, arch)
    assert compiled.cubin.startswith(b"\x7fELF")
    res = compiled.resources[emitted.name]
    row = {"case": _case_id(case), "kernel": emitted.name, "registers": res.registers,
           "spill_stores": res.spill_stores, "spill_loads": res.spill_loads,
           "stack": res.stack_frame, "smem": emitted.smem, "config": str(_config(v, mma))}
    _TABLE.append(row)
    print(f"\n{row['case']:60s} regs {res.registers:3d} spills {res.spill_stores}/"
          f"{res.spill_loads} stack {res.stack_frame} smem {emitted.smem}")
    out = os.environ.get("GMAGEN_CUPY_RESOURCES")
    if out:
        with open(out, "w") as f:
            json.dump(_TABLE, f, indent=1)
    assert res.spill_stores == 0 and res.spill_loads == 0, compiled.log
    assert emitted.smem <= space.SMEM_LIMIT
    # the header names the kernel, the variant and the config
    head = emitted.source.splitlines()[:5]
    assert emitted.name in head[0] and head[2].startswith("// variant: kind=" + v.kind)
    assert head[3].startswith("// config:")
    assert "block_n=" in head[3] or v.kind in ("reduce", "coefficients")


def test_variant_changes_source():
    """Variants are emitter parameters: each attribute changes the generated text."""
    base = Variant("scan", 64, 64, 64, eps=1e-6)
    src = _emit(base).source
    for change in (dict(norm="slot"), dict(q_covariance="shared", k_covariance="shared"),
                   dict(mask=True), dict(init=True), dict(dtype="bf16"), dict(same_mixture=False)):
        other = Variant(**{**base.describe(), **change})
        assert _emit(other).source != src, change
    assert "mask_ptr" in _emit(Variant("scan", 64, 64, 64, mask=True)).source
    assert "mask_ptr" not in src and "s0_ptr" not in src


def test_default_config_fits_shared_memory():
    for D, Dv, K in [(16, 16, 1), (64, 64, 64), (128, 128, 256), (256, 256, 256), (20, 33, 7)]:
        for kind in ("responsibility", "write", "read", "scan"):
            v = Variant(kind, D, Dv, K, same_mixture=False)
            cfg = space.default_config(kind, D, Dv, K, variant=v)
            assert smem_bytes(v, space.tiles_of(cfg)) <= space.SMEM_LIMIT, (kind, D, Dv, K, cfg)


def test_validate_rejects_bad_knobs():
    with pytest.raises(OptionError, match="no config knob"):
        space.validate("scan", gmagen.Config(block_m=3))
    with pytest.raises(OptionError, match="shared memory"):
        space.validate("scan", gmagen.Config(block_n=64, block_dv=128, d_chunk=64),
                       Variant("scan", 256, 256, 256))


def _kernel_without_device(program, **options):
    """gmagen.compile when it allows compile-only lowering, else the same Kernel
    built directly (gmagen.compile refuses unavailable backends)."""
    try:
        return gmagen.compile(program, backend="cupy", **options)
    except BackendUnavailable:
        from gmagen.backends.registry import _load
        from gmagen.ir.passes.plan import plan_program
        from gmagen.kernel import Kernel

        be = _load("cupy")
        return Kernel(program, plan_program(program), be, None, be.check_options(options))


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_source_without_gpu(causal):
    kern = _kernel_without_device(gmagen.gma(causal=causal, norm="slot"), arch="sm_90")
    src = kern.source
    names = ["gma_write_fwd", "gma_scan_fwd"] if causal else ["gma_write_fwd", "gma_reduce",
                                                              "gma_read_fwd"]
    for name in names:
        assert f"// gmagen {gmagen.__version__}" in src and f"void __launch_bounds__(THREADS, 1) {name}(" in src
    assert "// config:  block_dv=" in src and "norm=slot" in src


def test_compile_api_without_gpu():
    """What the issue asks: gmagen.compile(prog, backend="cupy", arch=...) on a CPU machine."""
    kern = gmagen.compile(gmagen.gma(), backend="cupy", arch="sm_90")
    assert "gma_read_fwd" in kern.source
    # without arch and without a device it says how to compile anyway
    if not gmagen.available_backends()["cupy"]:
        with pytest.raises(BackendUnavailable):
            gmagen.compile(gmagen.gma(), backend="cupy")


@pytest.mark.parametrize("cov", COVS)
def test_expanded_logits(cov):
    """Responsibilities read the centred coefficients gma_coefficients writes (no
    mixture parameter and no exp in the main kernels), with x*x formed in
    registers for diag and |x|^2 per row for spherical; the coefficients are
    float64 until they are stored."""
    for kind in ("responsibility", "write", "read", "scan"):
        v = Variant(kind, 64, 64, 64, q_covariance=cov, k_covariance=cov, same_mixture=False)
        src = _emit(v).source
        body = src[src.index('extern "C"'):]
        prefixes = {"responsibility": ["mq"], "write": ["mk"], "read": ["mq"], "scan": ["mq", "mk"]}
        for m in prefixes[kind]:
            assert f"const float* __restrict__ {m}_b" in body and f"{m}_c[h * K + k]" in body
            assert (f"{m}_a[at]" in body) == (cov == "diag"), (kind, m)
            assert (f"{m}_asq[h * K + k]" in body) == (cov == "spherical"), (kind, m)
        assert "_mean" not in body and "_lv" not in body and "expf" not in body
        assert ("la = fmaf(xv * xv, ar[d], la);" in body) == (cov == "diag")
        assert ("xx_s[i] += s;" in body) == (cov == "spherical")
    src = _emit(coefficients(64, 64, "bf16", cov)).source
    assert "exp(-to_d(m_lv[" in src and "expf" not in src
    assert "b_ptr[at] = static_cast<float>(" in src and "- mean_b);" in src
    if cov == "spherical":
        assert "asq_ptr[h * K + k] = static_cast<float>((-0.5 * LOG2E_D) * prec_s[k] - mean_asq);" in src


def test_coefficients_once_per_mixture():
    """One gma_coefficients launch per mixture: a scan with its own key mixture
    computes two; with one mixture, one serves queries and keys."""
    for program, count in ((gmagen.gma(causal=True), 1), (gma_qk_mixtures(causal=True), 2),
                           (gmagen.gma(), 2)):  # bidirectional: write (keys) and read (queries)
        kern = _kernel_without_device(program, arch="sm_90")
        assert kern.source.count("void __launch_bounds__(THREADS, 1) gma_coefficients(") == count
