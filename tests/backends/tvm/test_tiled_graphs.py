"""The cuda plans' tiled graphs (per-token stages in tiles of block_n tokens, the
write plan's segment partials, the scan's chunk partials, prefix and per-chunk y:
``Graph.tile``, emit_read / emit_write / emit_responsibility / emit_scan) checked against the float64 oracle without a GPU: built for
llvm with the CPU schedule (``lower.TILED_ON_CPU``).  What this checks is the
TE of the cuda path (zero padding past N, key mask and the column of ones in the
[v, 1] tile, segment sums, slot / row norms, both layouts); the cuda schedule
itself (thread bindings, shared memory) runs only on a GPU
(tests/gpu/test_tvm_cuda.py)."""

from __future__ import annotations

import pytest

import gmagen

_TVM = gmagen.available_backends()["tvm"]
if not _TVM:
    pytest.skip(f"tvm backend unavailable: {_TVM.reason}", allow_module_level=True)
pytest.importorskip("tvm")

from gmagen.backends.tvm import lower  # noqa: E402

from .test_tvm_backend import TOL, f64, init_state, make_case, run  # noqa: E402

# N = 70 with block_n 16 and 2 tiles per segment: 5 tiles, 3 segments, the last
# segment half empty and the last tile of 6 tokens
SHAPE = (2, 70, 3, 8, 5, 4)
CONFIG = {"block_n": 16, "write_tiles": 2}


@pytest.fixture
def tiled(monkeypatch):
    monkeypatch.setattr(lower, "TILED_ON_CPU", True)


def check_against_oracle(kern, program, inputs, gma_ref):
    """y and the final state (S, n) of ``kern`` vs the float64 oracle's."""
    ref = gmagen.compile(program, "numpy")
    y, (S, n) = run(kern, inputs)
    yr, (Sr, nr) = run(ref, {k: f64(v) for k, v in inputs.items()})
    gma_ref.assert_close(y, yr, TOL, "y")
    gma_ref.assert_close(S, Sr, TOL, "S")
    gma_ref.assert_close(n, nr, TOL, "n")


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm,cov", [("row", "diag"), ("slot", "spherical"),
                                      ("row", "shared")])
def test_tiled_bidirectional(norm, cov, mask, layout, tiled, rng, gma_ref):
    inputs = make_case(rng, gma_ref, SHAPE, cov, mask, hard="bhnd" if layout == "bhnd" else "")
    kern = gmagen.compile(gmagen.gma(False, norm, cov, layout=layout), backend="tvm",
                          target="llvm", config=CONFIG)
    ref = gmagen.compile(gmagen.gma(False, norm, cov, layout=layout), "numpy")
    assert "S_seg" in kern.source and "bhti" not in kern.source
    y, (S, n) = run(kern, inputs, layout)
    yr, (Sr, nr) = run(ref, {k: f64(v) for k, v in inputs.items()}, layout)
    gma_ref.assert_close(y, yr, TOL, "y")
    gma_ref.assert_close(S, Sr, TOL, "S")
    gma_ref.assert_close(n, nr, TOL, "n")


@pytest.mark.parametrize("N", [1, 16, 37])
def test_tiled_lengths(N, tiled, rng, gma_ref):
    shape = (2, N, 3, 8, 5, 4)
    inputs = make_case(rng, gma_ref, shape, "diag", True)
    kern = gmagen.compile(gmagen.gma(False, "row", "diag"), backend="tvm", target="llvm",
                          config=CONFIG)
    ref = gmagen.compile(gmagen.gma(False, "row", "diag"), "numpy")
    y, (S, n) = run(kern, inputs)
    yr, (Sr, nr) = run(ref, {k: f64(v) for k, v in inputs.items()})
    gma_ref.assert_close(y, yr, TOL, "y")
    gma_ref.assert_close(S, Sr, TOL, "S")


@pytest.mark.parametrize("K", [8, 9, 13], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_tiled_row_reductions_in_parts(K, causal, tiled, rng, gma_ref):
    """At K >= 8 a tile's max, sum (and the read's den) over k run in 4 parts of k,
    then over the parts (prelude.Graph.row_reduce): K = 8 in parts of 2, K = 9 and
    13 in parts of 3 and 4 with the last part short (its missing k are -inf for
    the max, 0 for the sums)."""
    shape = (2, 70, 3, 8, 5, K)
    inputs = make_case(rng, gma_ref, shape, "diag", True)
    program = gmagen.gma(causal, "row", "diag")
    kern = gmagen.compile(program, backend="tvm", target="llvm",
                          config=SCAN_CONFIG if causal else CONFIG)
    assert "_max_part" in kern.source and "_sum_part" in kern.source
    check_against_oracle(kern, program, inputs, gma_ref)


def test_tiled_responsibilities(tiled, rng, gma_ref):
    inputs = make_case(rng, gma_ref, SHAPE, "diag")
    mix = (inputs["mean"], inputs["log_var"], inputs["logit"])
    r = gmagen.responsibilities(inputs["q"], *mix, backend="tvm", target="llvm", config=CONFIG)
    ref = gmagen.responsibilities(*(f64(t) for t in (inputs["q"], *mix)))
    gma_ref.assert_close(r, ref, TOL, "R")


# the scan's tile is its chunk: N = 70 in chunks of 16, the last of 6 tokens
SCAN_CONFIG = {"chunk": 16}


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("mask,init", [(False, False), (True, False), (True, True)],
                         ids=["nomask", "mask", "mask-init"])
@pytest.mark.parametrize("norm,cov", [("row", "diag"), ("slot", "spherical"),
                                      ("slot", "shared"), ("row", "shared")])
def test_tiled_scan(norm, cov, mask, init, layout, tiled, rng, gma_ref):
    """y and the final state of the tiled scan (chunk partials S_chunk, their
    prefix S_in, per chunk the C x C product and the state's term) vs the oracle,
    from zeros or from an initial state."""
    B, N, H, D, Dv, K = SHAPE
    inputs = make_case(rng, gma_ref, SHAPE, cov, mask, hard="bhnd" if layout == "bhnd" else "")
    extra = {"initial_state": init_state(rng, B, H, K, Dv)} if init else {}
    kern = gmagen.compile(gmagen.gma(True, norm, cov, layout=layout), backend="tvm",
                          target="llvm", config=SCAN_CONFIG)
    ref = gmagen.compile(gmagen.gma(True, norm, cov, layout=layout), "numpy")
    assert "S_chunk" in kern.source and "y_intra" in kern.source
    y, (S, n) = run(kern, inputs, layout, **extra)
    yr, (Sr, nr) = run(ref, {k: f64(v) for k, v in inputs.items()}, layout,
                       **{k: f64(v) for k, v in extra.items()})
    gma_ref.assert_close(y, yr, TOL, "y")
    gma_ref.assert_close(S, Sr, TOL, "S")
    gma_ref.assert_close(n, nr, TOL, "n")


@pytest.mark.parametrize("N,chunk", [(1, 16), (16, 16), (37, 16), (37, 64), (37, 1)])
def test_tiled_scan_lengths(N, chunk, tiled, rng, gma_ref):
    """One token, exactly one chunk, a partial last chunk, one chunk longer than
    the sequence, chunks of one token."""
    B, _, H, D, Dv, K = SHAPE
    inputs = make_case(rng, gma_ref, (B, N, H, D, Dv, K), "diag", True)
    state = init_state(rng, B, H, K, Dv)
    kern = gmagen.compile(gmagen.gma(True, "slot", "diag"), backend="tvm", target="llvm",
                          config={"chunk": chunk})
    ref = gmagen.compile(gmagen.gma(True, "slot", "diag"), "numpy")
    y, (S, n) = run(kern, inputs, initial_state=state)
    yr, (Sr, nr) = run(ref, {k: f64(v) for k, v in inputs.items()}, initial_state=f64(state))
    gma_ref.assert_close(y, yr, TOL, "y")
    gma_ref.assert_close(S, Sr, TOL, "S")
    gma_ref.assert_close(n, nr, TOL, "n")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("norm,cov", [("row", "diag"), ("slot", "spherical"),
                                      ("row", "shared")])
def test_tiled_mma_logits(norm, cov, causal, tiled, rng, gma_ref):
    """mma=1: the logits from bfloat16 pieces of the tokens and coefficients
    (prelude.Graph._mma_logits), here with float32 tokens (3 pieces each of x and
    x*x) and TE's plain loops for the product that cuda runs on tensor cores: the
    pieces, their pairing and the padding of D and K to 16 vs the oracle at the
    float32 tolerance.  D = 8, K = 5: both padded."""
    inputs = make_case(rng, gma_ref, SHAPE, cov, True)
    program = gmagen.gma(causal, norm, cov)
    config = dict(SCAN_CONFIG if causal else CONFIG, mma=1)
    kern = gmagen.compile(program, backend="tvm", target="llvm", config=config)
    check_against_oracle(kern, program, inputs, gma_ref)
    assert "_xp" in kern.source and "_pieces" in kern.source  # (the call's specialization)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_tiled_mma_segment_layout(causal, tiled, rng, gma_ref):
    """mma=1 with the segment kernels' accumulator tiles reshaped for whole warps
    (Graph.segment_layout): K = 64 over 128 threads takes 16 x 8 tiles of 4 x 2, so
    the [v, 1] tile is 16 columns wide (Dv + 1 = 16) and the write kernel's (and the
    scan's chunk partials') logits come from the pieces too."""
    shape = (2, 70, 3, 8, 15, 64)
    inputs = make_case(rng, gma_ref, shape, "diag", True)
    program = gmagen.gma(causal, "row", "diag")
    config = dict(SCAN_CONFIG if causal else CONFIG, mma=1, num_threads=128)
    kern = gmagen.compile(program, backend="tvm", target="llvm", config=config)
    check_against_oracle(kern, program, inputs, gma_ref)
    assert ("kp_xp" if causal else "k_xp") in kern.source  # (the call's specialization)
