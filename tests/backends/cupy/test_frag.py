"""The CuPy backend's register-fragment path (config knob ``mma=2``, frag.py), on
the CPU: which piece products the logits keep and that they are as good as
float32 (a NumPy emulation of the bfloat16 splits), the defaults and the
validation errors, the generated source (mma.sync / ldmatrix, no WMMA), and
NVRTC compiles of explicit configs without spills.  Numbers on the GPU:
tests/gpu/test_cupy_cuda.py (test_fragment_configs, test_fragments_match_wmma)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cupy", reason="cupy is not installed: the cupy backend cannot be tested")

from gmagen.backends.cupy import emit_read, emit_scan, emit_write, frag, space  # noqa: E402
from gmagen.backends.cupy.launch import build  # noqa: E402
from gmagen.backends.cupy.prelude import Tiles, Variant  # noqa: E402
from gmagen.config import Config  # noqa: E402
from gmagen.errors import OptionError  # noqa: E402

EMIT = {"write": emit_write.emit, "read": emit_read.emit, "scan": emit_scan.emit}


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return (b & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _split(x: np.ndarray, n: int) -> list[np.ndarray]:
    """split_bf16 of frag.HELPERS: each piece the rounding of what is left (float32)."""
    out, rest = [], np.asarray(x, np.float32)
    for _ in range(n):
        p = _bf16(rest)
        out.append(p)
        rest = (rest - p).astype(np.float32)
    return out


@pytest.mark.parametrize("dtype,cov,n_terms", [("bf16", "diag", 8), ("f16", "diag", 11),
                                               ("bf16", "shared", 3), ("f16", "spherical", 5)])
def test_kept_terms(dtype, cov, n_terms):
    v = Variant("read", 64, 64, 64, dtype)
    terms = frag.terms(v, cov)
    assert len(terms) == n_terms
    cps, tps = frag.coefficient_pieces(cov), frag.token_pieces(v, cov)
    exps = [cps[c].exp + tps[t].exp for c, t in terms]
    assert exps == sorted(exps) and min(exps) == -16  # the small products first
    for c, t in terms:
        assert {"b": "x", "a": "xx"}[cps[c].of] == tps[t].of


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_piece_products_are_float32_grade(dtype):
    """The kept piece products of x . b + (x*x) . a, summed exactly, differ from the
    float64 value of the float32 coefficients by < 2^-21 of sum |x b| + |x*x a|
    (3xTF32 keeps ~2^-21 too); plain bfloat16 operands would be ~2^-8 off."""
    rng = np.random.default_rng(5)
    rnd = _bf16 if dtype == "bf16" else _f16
    x = rnd(rng.normal(size=(256, 64)).astype(np.float32) * 6)
    b = rng.normal(size=(64, 64)).astype(np.float32) * 300
    a = -np.exp(rng.normal(size=(64, 64))).astype(np.float32) * 50
    v = Variant("read", 64, 64, 64, dtype)
    pieces = {}
    for name, arr in (("b", b), ("a", a)):
        for i, p in enumerate(_split(arr, 3)):
            pieces[f"{name}{i + 1}"] = p.astype(np.float64)
    xs = [x] if dtype == "bf16" else _split(x, 2)
    xx = (x.astype(np.float32) * x).astype(np.float32)  # exact for 16-bit x
    xxs = _split(xx, 2 if dtype == "bf16" else 3)
    for i, p in enumerate(xs):
        pieces[f"x{i + 1}"] = p.astype(np.float64)
    for i, p in enumerate(xxs):
        pieces[f"xx{i + 1}"] = p.astype(np.float64)
    assert np.array_equal(sum(pieces[f"x{i + 1}"] for i in range(len(xs))), x)  # exact splits
    assert np.array_equal(sum(pieces[f"xx{i + 1}"] for i in range(len(xxs))), xx)
    cps, tps = frag.coefficient_pieces("diag"), frag.token_pieces(v, "diag")
    got = sum(pieces[tps[t].name] @ pieces[cps[c].name].T for c, t in frag.terms(v, "diag"))
    x64, xx64 = x.astype(np.float64), xx.astype(np.float64)
    exact = x64 @ b.astype(np.float64).T + xx64 @ a.astype(np.float64).T
    scale = np.abs(x64) @ np.abs(b.astype(np.float64)).T + xx64 @ np.abs(a.astype(np.float64)).T
    assert np.max(np.abs(got - exact) / scale) < 2.0 ** -21
    coarse = _bf16(x).astype(np.float64) @ _bf16(b).astype(np.float64).T
    assert np.max(np.abs(coarse - x64 @ b.astype(np.float64).T)
                  / (np.abs(x64) @ np.abs(b.astype(np.float64)).T)) > 2.0 ** -12


def test_defaults():
    for kind in ("write", "read", "scan"):
        for dtype in ("bf16", "f16"):
            # (the scan of one mixture: two diagonal mixtures' tables pass the shared memory)
            cfg = space.default_config(kind, 64, 64, 64, dtype, variant=Variant(kind, 64, 64, 64, dtype))
            assert cfg["mma"] == 2, (kind, dtype, cfg)
            assert not frag.problems(Variant(kind, 64, 64, 64, dtype), space.tiles_of(cfg))
        # K > 128 or tables past the shared memory: WMMA (the scan at K = 256: CUDA cores)
        assert space.default_config(kind, 64, 64, 256, "bf16")["mma"] == (0 if kind == "scan" else 1)
        assert space.default_config(kind, 256, 256, 64, "bf16")["mma"] == 1
    sc = space.default_config("scan", 64, 64, 64, "bf16", variant=Variant("scan", 64, 64, 64, "bf16"))
    assert (sc["num_threads"], sc["block_n"], sc["block_dv"]) == (128, 64, 64)
    # two diagonal mixtures' tables (q and k) pass the shared memory; float16 slot norm: WMMA
    assert space.default_config("scan", 64, 64, 64, "bf16", variant=Variant(
        "scan", 64, 64, 64, "bf16", same_mixture=False))["mma"] == 1
    assert space.default_config("scan", 64, 64, 64, "f16", variant=Variant(
        "scan", 64, 64, 64, "f16", norm="slot"))["mma"] == 1
    w = space.default_config("write", 64, 64, 64, "bf16")
    assert (w["num_threads"], w["block_n"], w["block_dv"]) == (128, 32, 64)  # KW 4 x TG 1
    s = frag.shape(Variant("write", 64, 64, 64), space.tiles_of(w))
    assert (s.kw, s.tg, s.tok) == (4, 1, 32)
    s = frag.shape(Variant("write", 64, 64, 80), space.tiles_of(Config(num_threads=96)))
    assert (s.kw, s.mk, s.kpad) == (3, 2, 96)  # K = 80: 5 tiles of 16 -> 3 warps x 2


@pytest.mark.parametrize("kind,over,match", [
    ("write", dict(num_threads=192), r"multiple of the 4 warps along K"),
    ("write", dict(num_threads=256, block_n=16),
     r"block_n=16 must be a multiple of 16 x 2 token groups"),
    ("read", dict(block_n=32), r"block_n=32 must be 16 or 32 x the 4 warps"),
    ("read", dict(block_dv=8), r"block_dv=8 with mma=2: expected a multiple of 16"),
])
def test_invalid_configs_name_the_knob(kind, over, match):
    v = Variant(kind, 64, 64, 64, "bf16")
    cfg = space.default_config(kind, 64, 64, 64, "bf16").replace(**over)
    with pytest.raises(OptionError, match=match):
        space.validate(kind, cfg, v)


def test_refused_outside_its_range():
    cfg = Config(block_n=64, block_dv=64, num_threads=128, mma=2)
    with pytest.raises(OptionError, match=r"K=129 pads to 144 > 128"):
        space.validate("read", cfg, Variant("read", 64, 64, 129, "bf16"))
    with pytest.raises(OptionError, match=r"expected mma=0 for f32 tokens"):
        space.validate("read", cfg, Variant("read", 64, 64, 64, "f32"))
    with pytest.raises(OptionError, match=r"mma=2 is not allowed"):
        space.validate("responsibility", Config(block_n=64, num_threads=128, mma=2),
                       Variant("responsibility", 64, 64, 64, "bf16"))
    with pytest.raises(OptionError, match=r"block_n=32 must be 16 x the 4 warps \(each warp owns"):
        space.validate("scan", cfg.replace(block_n=32), Variant("scan", 64, 64, 64, "bf16"))
    with pytest.raises(OptionError, match=r"slot norm's weights need bfloat16 copies"):
        space.validate("scan", cfg, Variant("scan", 64, 64, 64, "f16", norm="slot"))
    with pytest.raises(OptionError, match=r"accumulator registers per thread, at most 160"):
        space.validate("scan", cfg, Variant("scan", 64, 64, 128, "bf16", norm="slot"))


@pytest.mark.parametrize("kind", ["write", "read"])
@pytest.mark.parametrize("cov", ["diag", "spherical", "shared"])
def test_source_structure(kind, cov):
    v = Variant(kind, 64, 64, 64, "bf16", q_covariance=cov, k_covariance=cov, eps=1e-6,
                mask=kind == "write", norm="slot" if cov == "shared" else "row")
    cfg = space.default_config(kind, 64, 64, 64, "bf16", variant=v)
    src = EMIT[kind](v, space.tiles_of(cfg), dict(cfg)).source
    assert "wmma" not in src and "<mma.h>" not in src and "mma=2" in src.splitlines()[3]
    assert "// tensor cores: mma.sync on register fragments" in src
    n_mma = len(frag.terms(v, cov))
    body = src[src.index('extern "C"'):]
    assert body.count("mma_bf16(acc") == 2 * n_mma  # two n-tiles per kept term
    assert "ldsm_x4_t(" in body  # v (write) / S (read) as B through ldmatrix.trans
    assert "c_s[k] = k < K ? mk_c[h * K + k] : -__int_as_float(0x7f800000);" in src or \
        "c_s[k] = k < K ? mq_c[h * K + k] : -__int_as_float(0x7f800000);" in src
    if kind == "write":
        assert "mask_ptr[b * mask_sb + row * mask_sn] != 0" in body
        assert "if (KW > 1) __syncthreads();" in body  # the one (max, sum) exchange
    else:
        assert "__syncthreads();" not in body[body.index("for (long long n0"):]  # warps alone
        assert ("1.f / (n_s[k] + EPS)" in body) == (v.norm == "slot")


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("block_n,mt", [(64, 1), (128, 2)])
def test_read_steps_of_one_or_two_tiles(block_n, mt, dtype):
    """The read kernel on raw token rows: the pieces split in registers from each A
    fragment (one ldmatrix of the rows per tile and k step), no piece tile; with two
    16-token tiles per warp step each B fragment of the coefficients feeds both."""
    v = Variant("read", 64, 64, 64, dtype, eps=1e-6)
    cfg = space.default_config("read", 64, 64, 64, dtype, variant=v).replace(block_n=block_n)
    space.validate("read", cfg, v)
    t = space.tiles_of(cfg)
    assert frag.shape(v, t).mk == mt
    src = emit_read.emit(v, t, dict(cfg)).source
    body = src[src.index('extern "C"'):]
    loop = body[body.index("for (long long n0"):]
    n_terms = len(frag.terms(v, "diag"))
    assert f"constexpr int MT = {mt};" in src
    assert loop.count("ldsm_x4(xr, xt") == mt  # raw rows of each tile
    assert loop.count("ldsm_x4(bf[p], coef_s") == 1  # one B load serves every tile
    assert sum(loop.count(f"mma_bf16(acc[{m}][2 * j]") for m in range(mt)) == mt * n_terms
    assert loop.count("float yacc[BLOCK_DV / 8][4];") == mt
    assert "__syncthreads();" not in loop  # the warps run alone
    tile = next(b for b in frag.buffers(v, t) if b[0] == "tok_s")
    assert tile[1] == "T_t"  # raw tokens, not bfloat16 pieces


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kind,dtype,shape,cfg", [
    ("write", "bf16", (64, 64, 64), None),
    ("write", "f16", (20, 33, 7), dict(block_n=32, block_dv=32, num_threads=64)),
    ("write", "bf16", (64, 64, 80), dict(block_n=16, block_dv=32, num_threads=96)),
    ("write", "bf16", (16, 8, 1), dict(block_n=16, block_dv=16, num_threads=32)),
    ("read", "bf16", (64, 64, 64), None),
    ("read", "f16", (40, 72, 24), dict(block_n=128, block_dv=16, num_threads=256)),
    ("read", "bf16", (32, 64, 128), None),
    ("read", "bf16", (64, 64, 64), dict(block_n=128)),  # two 16-token tiles per warp step
    ("read", "f16", (40, 72, 24), dict(block_n=64, num_threads=64)),
])
def test_compiles_without_spills(kind, dtype, shape, cfg, arch):
    D, Dv, K = shape
    for cov in ("diag", "spherical"):
        v = Variant(kind, D, Dv, K, dtype, q_covariance=cov, k_covariance=cov, eps=1e-6,
                    mask=kind == "write")
        full = space.default_config(kind, D, Dv, K, dtype, variant=v, mma=2).replace(**(cfg or {}))
        assert full["mma"] == 2
        space.validate(kind, full, v)
        emitted = EMIT[kind](v, space.tiles_of(full), dict(full))
        res = build(emitted, arch).resources[emitted.name]
        print(f"{kind} {dtype} D={D} Dv={Dv} K={K} {cov} {dict(full)} {arch}: "
              f"{res.registers} registers, {res.spill_stores} B spilled")
        assert res.spill_stores == 0 and res.spill_loads == 0, res


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("cov", ["diag", "spherical", "shared"])
def test_scan_source_structure(norm, cov):
    """The scan on fragments: both responsibilities from raw token tiles (pieces split
    in registers, no piece tiles), three block barriers per chunk, S in registers."""
    v = Variant("scan", 64, 64, 64, "bf16", q_covariance=cov, k_covariance=cov, eps=1e-6,
                mask=True, init=True, norm=norm)
    cfg = space.default_config("scan", 64, 64, 64, "bf16", variant=v)
    assert cfg["mma"] == 2
    src = emit_scan.emit(v, space.tiles_of(cfg), dict(cfg)).source
    assert "wmma" not in src and "// tensor cores: mma.sync on register fragments" in src
    body = src[src.index('extern "C"'):]
    loop = body[body.index("for (long long n0"):body.index("the state leaving the segment")]
    assert loop.count("__syncthreads();") == 3
    assert loop.count("mma_bf16(acck") == loop.count("mma_bf16(accq") == 2 * len(frag.terms(v, cov))
    assert loop.count("unpack_T2(xr[r])") == 2  # keys and queries
    assert "mask_ptr[b * mask_sb + (r0 + g) * mask_sn] != 0" in loop
    assert ("__shfl_up_sync" in loop) == (norm == "slot")  # the slot norm's prefix of rk
    assert "float sacc[MS][BLOCK_DV / 8][4];" in body and "s0_ptr[" in body


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype,shape,norm,cfg", [
    ("bf16", (64, 64, 64), "row", None),
    ("bf16", (64, 64, 64), "slot", None),
    ("f16", (64, 64, 64), "row", None),
    ("bf16", (20, 33, 7), "slot", dict(block_n=32, block_dv=32, num_threads=64)),
    ("bf16", (32, 64, 128), "row", dict(block_dv=32)),
    ("f16", (128, 128, 32), "row", None),
])
def test_scan_compiles_without_spills(dtype, shape, norm, cfg, arch):
    D, Dv, K = shape
    for cov in ("diag", "spherical"):
        v = Variant("scan", D, Dv, K, dtype, q_covariance=cov, k_covariance=cov, eps=1e-6,
                    mask=True, init=True, norm=norm)
        full = space.default_config("scan", D, Dv, K, dtype, variant=v, mma=2).replace(**(cfg or {}))
        assert full["mma"] == 2
        space.validate("scan", full, v)
        emitted = emit_scan.emit(v, space.tiles_of(full), dict(full))
        res = build(emitted, arch).resources[emitted.name]
        print(f"scan {dtype} {norm} D={D} Dv={Dv} K={K} {cov} {dict(full)} {arch}: "
              f"{res.registers} registers, {res.spill_stores} B spilled")
        assert res.spill_stores == 0 and res.spill_loads == 0, res


def test_shared_memory_layout():
    """Buffers are 128-byte aligned and disjoint, except the write kernel's final S, n,
    which reuse the coefficients' memory (dead after the token loop)."""
    for kind in ("write", "read"):
        v = Variant(kind, 64, 64, 64, "bf16", q_covariance="spherical", k_covariance="spherical")
        t = Tiles(block_n=64, block_dv=64, num_threads=256 if kind == "write" else 128, mma=2)
        bufs = frag.buffers(v, t)
        size = {"float": 4, "float2": 8}
        spans = [(n, off, off + c * size.get(ct, 2)) for n, ct, c, off in bufs]
        for n, lo, _ in spans:
            assert lo % 128 == 0 or n == "n_s", n
        for i, (n1, a0, a1) in enumerate(spans):
            for n2, b0, b1 in spans[i + 1:]:
                if {n1, n2} & {"S_s", "n_s"} and "coef_s" in {n1, n2} | {"S_s", "n_s"}:
                    if {n1, n2} <= {"coef_s", "S_s", "n_s"}:
                        continue
                assert a1 <= b0 or b1 <= a0, (n1, n2)
        assert frag.smem_bytes(v, t) <= space.SMEM_LIMIT


def test_partial_wmma_config_completes_from_the_wmma_default():
    """A config without ``mma`` whose tiles are the WMMA path's (a user's, or a cache entry
    tuned before mma=2) is completed from the mma=1 default, not turned into an invalid
    mma=2 config; one that fits mma=2 keeps the mma=2 default."""
    from gmagen.adapters import checks
    from gmagen.backends.registry import _load
    from gmagen.ir.passes.plan import plan_program

    import gmagen

    program = gmagen.gma()
    plan = plan_program(program)
    read = next(kp for kp in plan.kernels if kp.kind == "read")
    dims = {"B": 1, "N": 128, "H": 1, "D": 64, "Dv": 64, "K": 64, "S": 1}
    binding = checks.Binding("numpy", ("cuda", 0), "bnhd", dims,
                             {"T": "bf16", "P": "f32", "acc": "f32"},
                             {i.name: "f32" for i in program.inputs}, frozenset(), ())
    be = _load("cupy")
    exe = be.lower(read, binding, Config(block_n=64, num_threads=256, d_chunk=16),
                   {"arch": "sm_90"})
    assert exe.config["mma"] == 1 and exe.config["num_threads"] == 256
    exe = be.lower(read, binding, Config(block_dv=32), {"arch": "sm_90"})
    assert exe.config["mma"] == 2 and exe.config["block_dv"] == 32


def test_scan_configs_complete_from_their_path():
    """The causal plan: the default is the fragment scan with the write kernel's own
    fragment tiles for the segment memories; a config naming mma=1 or 0 completes
    from that path's default (not from the mma=2 tiles, which do not fit it)."""
    from gmagen.adapters import checks
    from gmagen.backends.registry import _load
    from gmagen.ir.passes.plan import plan_program

    import gmagen

    program = gmagen.gma(causal=True)
    scan = next(kp for kp in plan_program(program).kernels if kp.kind == "scan")
    dims = {"B": 1, "N": 128, "H": 1, "D": 64, "Dv": 64, "K": 64, "S": 1}
    binding = checks.Binding("numpy", ("cuda", 0), "bnhd", dims,
                             {"T": "bf16", "P": "f32", "acc": "f32"},
                             {i.name: "f32" for i in program.inputs}, frozenset(), ())
    be = _load("cupy")
    exe = be.lower(scan, binding, Config(), {"arch": "sm_90"})
    assert exe.config["mma"] == 2 and exe.config["num_threads"] == 128
    assert exe.unit_configs["write"]["mma"] == 2 and exe.unit_configs["write"]["num_threads"] == 128
    for mma in (1, 0):
        exe = be.lower(scan, binding, Config(mma=mma), {"arch": "sm_90"})
        assert exe.config["mma"] == mma and exe.config == exe.unit_configs["write"]
        assert exe.config == space.default_config("scan", 64, 64, 64, "bf16", mma=mma)
