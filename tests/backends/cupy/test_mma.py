"""The CuPy backend's tensor-core path (config knob ``mma``), on the CPU: the
knob's defaults and validation errors, the shared-memory layout rules of
mma.py (32-byte aligned buffers, 16-byte strides, no overlap but the staging
aliases), the structure of the generated products (precision per product,
padded K, the causal skips), and NVRTC compiles of explicit MMA configs
(small tiles, few and many warps; without spills up to 256 threads).  Numbers need a GPU:
tests/gpu/test_cupy_cuda.py."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("cupy", reason="cupy is not installed: the cupy backend cannot be tested")

import gmagen  # noqa: E402
from gmagen.backends.cupy import (emit_read, emit_responsibility, emit_scan, emit_write,  # noqa: E402
                                  mma, space)
from gmagen.backends.cupy.launch import build  # noqa: E402
from gmagen.backends.cupy.prelude import Tiles, Variant  # noqa: E402
from gmagen.errors import OptionError  # noqa: E402

EMIT = {"responsibility": emit_responsibility.emit, "write": emit_write.emit,
        "read": emit_read.emit, "scan": emit_scan.emit}
KINDS = tuple(EMIT)


def _source(v: Variant, **over) -> str:
    """The WMMA path's (mma=1) default source of ``v`` (16-bit tokens), ``over``
    replacing knobs; test_frag.py covers mma=2."""
    cfg = space.default_config(v.kind, v.D, v.Dv, v.K, v.dtype, variant=v, mma=1).replace(**over)
    space.validate(v.kind, cfg, v)
    return EMIT[v.kind](v, space.tiles_of(cfg), dict(cfg)).source


@pytest.mark.parametrize("kind", KINDS)
def test_default_is_mma_for_16_bit(kind):
    frag = 2 if kind in ("write", "read") else 1  # register fragments serve write and read
    for dtype, want in (("f16", frag), ("bf16", frag), ("f32", 0)):
        assert space.default_config(kind, 64, 64, 64, dtype)["mma"] == want, (kind, dtype)
        assert space.default_config(kind, 64, 64, 64, dtype, mma=1)["mma"] == min(want, 1)
    # the causal scan's smallest MMA tiles need more than SMEM_LIMIT at K = 256: CUDA cores
    big = Variant("scan", 256, 256, 256, "bf16", same_mixture=False, eps=1e-6)
    assert space.default_config("scan", 256, 256, 256, "bf16", variant=big)["mma"] == 0
    assert space.default_config("read", 256, 256, 256, "bf16")["mma"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_mma_refused_for_float32(kind):
    v = Variant(kind, 64, 64, 64, "f32", same_mixture=False)
    cfg = space.default_config(kind, 64, 64, 64, "f32").replace(mma=1)
    with pytest.raises(OptionError, match=r"config mma=1: .*expected mma=0 for f32 tokens, got mma=1"):
        space.validate(kind, cfg, v)
    space.validate(kind, cfg.replace(mma=0), v)  # the CUDA-core path is the float32 one


def test_mma_knob_values_and_tile_multiples():
    v = Variant("write", 64, 64, 64, "bf16")
    base = space.default_config("write", 64, 64, 64, "bf16", mma=1)
    with pytest.raises(OptionError, match=r"mma=3 is not allowed; expected one of \(0, 1, 2\)"):
        space.validate("write", base.replace(mma=3), v)
    resp = Variant("responsibility", 64, 64, 64, "bf16")
    with pytest.raises(OptionError, match=r"mma=2 is not allowed; expected one of \(0, 1\)"):
        space.validate("responsibility", space.default_config(
            "responsibility", 64, 64, 64, "bf16").replace(mma=2), resp)
    for knob, value, step in (("block_n", 8, 16), ("block_dv", 8, 16), ("d_chunk", 12, 8)):
        with pytest.raises(OptionError, match=rf"{knob}={value} with mma=1: expected a multiple "
                                              rf"of {step}.*got {value}; or pass mma=0"):
            space.validate("write", base.replace(**{knob: value}), v)
        space.validate("write", base.replace(**{knob: value}, mma=0), v)  # fine on CUDA cores


def test_mma_zero_keeps_the_fma_source():
    """mma=0 for 16-bit tokens is the CUDA-core kernel: no WMMA anywhere."""
    for kind in KINDS:
        v = Variant(kind, 64, 64, 64, "bf16", eps=1e-6, mask=kind in ("write", "scan"))
        tiles = dict(block_n=32) if kind == "responsibility" else dict(block_n=32, block_dv=32)
        src = _source(v, mma=0, **tiles)
        assert "wmma" not in src and "<mma.h>" not in src and "config:  " in src
        assert "mma=0" in src.splitlines()[3]


SHAPES = [(64, 64, 64), (20, 33, 7), (96, 100, 48), (16, 16, 1), (256, 256, 256), (128, 64, 130)]


@pytest.mark.parametrize("kind,dtype,norm", [(k, d, n) for k, d, n in
                                             itertools.product(KINDS, ("f16", "bf16"), ("row", "slot"))
                                             if n == "row" or k in ("read", "scan")])
def test_buffers_aligned_and_disjoint(kind, dtype, norm):
    """Every buffer starts 32-byte aligned; buffers alive at the same time do not
    overlap (the staging tiles x/b/a/xx share memory only with the output tiles
    att/y, which live after the logits; W copies of bf16 tokens alias T copies)."""
    stage = {"x_s", "b_s", "a_s", "xx_s"}
    post = {"att_s", "att_t", "att_w", "y_s"}
    for (D, Dv, K), (bn, bdv, dc) in itertools.product(SHAPES, [(16, 16, 8), (32, 64, 32),
                                                                 (64, 32, 16)]):
        v = Variant(kind, D, Dv, K, dtype, q_covariance="diag", k_covariance="spherical",
                    same_mixture=False, norm=norm)
        bufs = mma.buffers(v, Tiles(bn, bdv, dc, 256, 1))
        for b in bufs:
            assert b.offset % 8 == 0, b
        real = [b for b in bufs if not b.alias]
        for x, y in itertools.combinations(real, 2):
            apart = x.offset + x.floats <= y.offset or y.offset + y.floats <= x.offset
            shared = {x.name, y.name} <= stage | post and not {x.name, y.name} <= post \
                and not {x.name, y.name} <= stage
            assert apart or shared, (x, y)
        names = {b.name for b in bufs}
        if dtype == "bf16" and kind == "scan":
            assert {b.name: b.alias for b in bufs if b.alias} == (
                {"rq_w": "rq_t"} if norm == "row" else {"rk_w": "rk_t", "v_w": "v_t"})
        if dtype == "f16" and kind == "scan":
            assert not any(b.alias for b in bufs)
            assert ({"rq_t", "rq_w"} if norm == "row" else {"rk_w", "v_w"}) <= names


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("cov", ["diag", "spherical", "shared"])
def test_mma_source_structure(dtype, cov):
    """Which product runs in which precision (mma.py's docstring)."""
    other = "T_t" if dtype == "bf16" else "W_t"
    for kind in KINDS:
        for norm in (("row", "slot") if kind in ("read", "scan") else ("row",)):
            v = Variant(kind, 64, 64, 64, dtype, q_covariance=cov, k_covariance=cov, norm=norm,
                        eps=1e-6, same_mixture=False)
            src = _source(v)
            assert "#include <mma.h>" in src and "// tensor cores: WMMA" in src
            assert "typedef __nv_bfloat16 W_t;" in src and "mma=1" in src.splitlines()[3]
            # logits: 3xTF32, x*x split only for diag
            assert "Acc32 acc;" in src and "split_tf32(b0_hi, b0_lo);" in src
            assert ("square_split_tf32(a1_hi, a1_lo);" in src) == (cov == "diag")
            assert "if (d0 == 0) wmma::fill_fragment(acc, 0.f);" in src
            assert ("xx_s[i] += s;" in src) == (cov == "spherical")
            if kind == "write":
                assert "FragA16<T_t, wmma::col_major> a_tile0;" in src  # rk^T v in T
                assert "wmma::load_matrix_sync(acc, c_tile, SP, wmma::mem_row_major);" in src
            if kind == "read":
                assert "FragA16<W_t, wmma::row_major>" in src and "S_w[k * BDH + j] = cvt_W(" in src
                assert "FragA16<T_t" not in src or dtype == "bf16"
            if kind == "scan":
                att = "T_t" if norm == "row" else "W_t"
                body = src[src.index("// intra-chunk affinities"):]
                assert f"FragA16<{att}, wmma::row_major> a_tile0;" in body
                assert "if (nt > mt) continue;" in src and "kk < (mt + 1) * 16" in src
                assert "FragB16<W_t, wmma::row_major> b_tile1;" in body  # rq . S in W
                assert "S_w[k * BDH + j] = cvt_W(S_s[k * SP + j]);" in src
                assert "FragA16<T_t, wmma::col_major> a_tile0;" in src  # S += rk^T v in T
                if norm == "slot":
                    assert "rq_w[i * KH + k] = cvt_W(rq_s[i * KP + k] * (1.f / (run + EPS)));" in src
            assert other in src or kind == "responsibility"


def test_padded_components_are_zero():
    """K = 7 pads to KPAD = 16: coefficient rows k >= K load zeros, the copies of r
    hold zeros there, and the softmax runs over k < K only."""
    v = Variant("scan", 20, 33, 7, "f16", eps=1e-6, mask=True)
    src = _source(v)
    assert "constexpr int KPAD = 16;" in src
    assert "const bool ok = k < K && d0 + d < D;" in src
    assert "const float p = k < K ? rk_s[i * KP + k] * inv : 0.f;" in src
    assert "rk_t[i * KH + k] = cvt_T(p);" in src
    assert "if (live) for (int k = sub; k < K; k += SM_TPR) {" in src
    assert "if (live) for (int k = sub; k < KPAD; k += SM_TPR) {" in src


MMA_CONFIGS = [dict(block_n=16, block_dv=16, d_chunk=8, num_threads=64),
               dict(block_n=32, block_dv=32, d_chunk=16, num_threads=512),
               dict(block_n=64, block_dv=128, d_chunk=64, num_threads=128)]


@pytest.mark.parametrize("cfg", MMA_CONFIGS, ids=["small-2warps", "mid-16warps", "wide-4warps"])
@pytest.mark.parametrize("kind", KINDS)
def test_explicit_mma_configs_compile(kind, cfg):
    dtype = "f16" if kind in ("write", "scan") else "bf16"
    if kind == "scan":
        cfg = {**cfg, "block_n": min(cfg["block_n"], 32)}
    for norm in (("row", "slot") if kind == "scan" else ("row",)):
        v = Variant(kind, 40, 72, 24, dtype, q_covariance="spherical", k_covariance="diag",
                    norm=norm, eps=1e-6, same_mixture=False, mask=kind != "read")
        c = gmagen.Config(cfg)
        if kind == "responsibility":
            c = gmagen.Config({k: x for k, x in cfg.items() if k != "block_dv"})
        full = space.default_config(kind, 40, 72, 24, dtype, variant=v, mma=1).replace(**dict(c))
        space.validate(kind, full, v)
        emitted = EMIT[kind](v, space.tiles_of(full), dict(full))
        compiled = build(emitted, "sm_90")
        res = compiled.resources[emitted.name]
        if cfg["num_threads"] <= 256:  # 512 threads leave 128 registers: the scan spills a little
            assert res.spill_stores == 0 and res.spill_loads == 0, (cfg, compiled.log)
        assert "wmma.mma.sync" in compiled.ptx and ".tf32" in compiled.ptx


def test_compile_api_knob():
    """Through gmagen.compile without a GPU (arch=): the example specialization of
    kernel.source is float32, so mma=1 is refused naming the knob; mma=0 lowers."""
    kern = _compile_only(gmagen.gma(causal=True), {"mma": 1})
    with pytest.raises(OptionError, match="expected mma=0 for f32 tokens, got mma=1"):
        kern.source
    src = _compile_only(gmagen.gma(), {"mma": 0}).source
    assert "wmma" not in src and "mma=0" in src


def _compile_only(program, config):
    """gmagen.compile(arch="sm_90") where it allows compile-only lowering, else the
    same Kernel built directly (gmagen.compile refuses unavailable backends)."""
    from gmagen.errors import BackendUnavailable

    try:
        return gmagen.compile(program, backend="cupy", arch="sm_90", config=config)
    except BackendUnavailable:
        from gmagen.backends.registry import _load
        from gmagen.ir.passes.plan import plan_program
        from gmagen.kernel import Kernel

        be = _load("cupy")
        return Kernel(program, plan_program(program), be, gmagen.Config(config),
                      be.check_options({"arch": "sm_90"}))


def _between(src: str, start: str, end: str) -> str:
    body = src[src.index(start):]
    return body[:body.index(end)]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_vector_loads_only_under_the_guard(dtype):
    """16-byte token loads and stores (8 tokens, uint4) and float4 coefficient loads
    happen only inside their runtime guards (unit stride, row stride a multiple of
    8, 16-byte aligned base; D or DV a multiple of 8); the scalar path that serves
    every other layout stays, with its 64-bit strided offsets."""
    for kind in KINDS:
        v = Variant(kind, 64, 64, 64, dtype, eps=1e-6, same_mixture=False, mask=kind == "write")
        src = _source(v)
        toks = {"responsibility": ["q"], "write": ["k", "v"], "read": ["q", "y"],
                "scan": ["q", "k", "v", "y"]}[kind]
        for tok in toks:
            assert (f"const bool {tok}_vec = {tok}_sd == 1 && ({tok}_sn & 7) == 0 && "
                    f"(reinterpret_cast<unsigned long long>({tok}_base) & 15) == 0;") in src
        for tok in toks:
            if tok in ("q", "k"):  # the logits' x chunk
                guarded = _between(src, f"if (D % 8 == 0 && {tok}_vec) {{", "} else {")
                assert f"unpack8(*reinterpret_cast<const uint4*>({tok}_base + row * {tok}_sn + d0 + d), f);" in guarded
                assert (f"to_f({tok}_base[row * {tok}_sn + (long long)(d0 + d) * {tok}_sd])"
                        in src)
            if tok == "v":
                guarded = _between(src, "if (DV % 8 == 0 && v_vec) {", "} else {")
                assert "*reinterpret_cast<const uint4*>(v_base + row * v_sn + dv0 + j)" in guarded
                assert "v_base[row * v_sn + (long long)(dv0 + j) * v_sd]" in src
            if tok == "y":
                guarded = _between(src, "if (DV % 8 == 0 && y_vec) {", "} else {")
                assert "*reinterpret_cast<uint4*>(y_base + row * y_sn + dv0 + j) = pack8(f);" in guarded
                assert "store_T(y_base + row * y_sn + (long long)(dv0 + j) * y_sd," in src
        # every uint4 / float4 global access sits in a guarded block
        body = src[src.index('extern "C"'):]
        for line in body.splitlines():
            if "reinterpret_cast<const uint4*>(" in line or "reinterpret_cast<uint4*>(y_base" in line:
                assert "_base + row * " in line, line
        m = "mk" if kind == "write" else "mq"
        guarded = _between(src, f"if (D % 4 == 0 && {m}_vec) {{", "} else {")
        assert f"*reinterpret_cast<const float4*>({m}_b_h + at)" in guarded
        assert f"{m}_b[at]" in src  # the scalar coefficient path
    f32 = EMIT["write"](Variant("write", 64, 64, 64, "f32"),
                        space.tiles_of(space.default_config("write", 64, 64, 64, "f32")), {}).source
    assert "uint4" not in f32 and "_vec" not in f32.split('extern "C"')[1]


def test_grouped_softmax():
    """The softmax runs SM_TPR lanes per row (a power of two <= 32); the shuffles are
    outside the per-row guards (every lane of a warp reaches them); the read kernel's
    row-norm denominator is reduced in the same pass."""
    from gmagen.backends.cupy.mixture import softmax_threads_per_row as tpr

    assert tpr(256, 64, 64) == 4 and tpr(256, 32, 64) == 8 and tpr(256, 16, 256) == 16
    assert tpr(64, 128, 1) == 1 and tpr(512, 8, 64) == 32 and tpr(64, 128, 256) == 16
    for kind in KINDS:
        for dtype in ("f32", "bf16"):
            v = Variant(kind, 64, 64, 64, dtype, eps=1e-6, same_mixture=False)
            cfg = space.default_config(kind, 64, 64, 64, dtype, variant=v, mma=1)
            src = EMIT[kind](v, space.tiles_of(cfg), dict(cfg)).source
            t = space.tiles_of(cfg)
            assert f"constexpr int SM_TPR = {tpr(t.num_threads, t.block_n, 64)};" in src
            soft = _between(src, "constexpr int SM_TPR", "__syncthreads();")
            for line in soft.splitlines():
                if "__shfl_xor_sync" in line:
                    assert line.strip().startswith("for (int o = SM_TPR / 2; o > 0; o >>= 1)"), line
            assert ("den_s[i] = dn + EPS;" in soft) == (kind == "read")
            assert "den_i = sum_k r_ik n_k + eps (one warp per row)" not in src


def test_two_blocks_per_sm():
    """Default WMMA (mma=1) bf16 responsibility / write / read kernels are compiled for two blocks
    per SM (<= 128 registers at 256 threads); the causal scan and float32 kernels for one."""
    for kind, want in (("responsibility", 2), ("write", 2), ("read", 2), ("scan", 1)):
        for dtype, w in (("bf16", want), ("f32", 1)):
            v = Variant(kind, 64, 64, 64, dtype, eps=1e-6)
            assert f"__launch_bounds__(THREADS, {w})" in _source(v), (kind, dtype)
            if w == 2:
                emitted = EMIT[kind](v, space.tiles_of(space.default_config(kind, 64, 64, 64, dtype,
                                                                            variant=v, mma=1)), {})
                res = build(emitted, "sm_90").resources[emitted.name]
                assert res.registers <= 128 and res.spill_stores == 0, res


def test_column_sum_parts():
    """n += colsum(rk): NP lanes per k, a power of two <= min(32, BLOCK_N) with K NP <=
    THREADS, reduced by shuffles that every lane reaches."""
    from gmagen.backends.cupy.prelude import column_sum_parts as parts

    assert parts(256, 64, 64) == 4 and parts(256, 32, 256) == 1 and parts(512, 8, 1) == 8
    assert parts(64, 128, 1) == 32 and parts(64, 16, 7) == 8
    for kind in ("write", "scan"):
        for dtype in ("f32", "bf16"):
            src = _source(Variant(kind, 64, 64, 64, dtype, eps=1e-6))
            body = _between(src, "constexpr int NP", "n_s[k] += a;")
            assert "if (k < K) for (int i = p; i < BLOCK_N; i += NP) a += rk_s[i * KP + k];" in body
            assert "for (int o = NP / 2; o > 0; o >>= 1) a += __shfl_xor_sync(" in body
