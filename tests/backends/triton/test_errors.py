"""What the Triton backend refuses on the CPU, and how it says so: 16-bit inputs
(the interpreter computes float32 only), packed variable-length input, unknown
or disallowed config knobs, unknown options."""

from __future__ import annotations

import pytest

import gmagen
from gmagen.config import Config
from gmagen.errors import DTypeError, OptionError, UnsupportedFeature

_TRITON = gmagen.available_backends()["triton"]
if not _TRITON:
    pytest.skip(f"triton backend unavailable: {_TRITON.reason}", allow_module_level=True)

import torch  # noqa: E402  (after the backend's probe, see conftest)

SHAPE = (2, 9, 2, 8, 6, 3)
LOW = [pytest.param(torch.float16, r"\b(f16|float16)\b", id="f16"),
       pytest.param(torch.bfloat16, r"\b(bf16|bfloat16)\b", id="bf16")]


def _inputs(rng, gma_ref, tri, shape=SHAPE, dtype=torch.float32, mask: bool = False) -> dict:
    inputs = tri.make_case(rng, gma_ref, shape, "diag", mask)
    for name in ("q", "k", "v"):
        inputs[name] = inputs[name].to(dtype)
    return inputs


@pytest.mark.parametrize("dtype, pattern", LOW)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_low_precision_on_cpu(causal, dtype, pattern, rng, gma_ref, tri):
    inputs = _inputs(rng, gma_ref, tri, dtype=dtype)
    kern = gmagen.compile(gmagen.gma(causal), backend="triton")
    with pytest.raises(DTypeError, match=pattern) as info:
        tri.run(kern, inputs)
    assert "float32" in str(info.value)  # what to use instead


@pytest.mark.parametrize("dtype, pattern", LOW)
def test_low_precision_responsibilities(dtype, pattern, rng, gma_ref, tri):
    inputs = _inputs(rng, gma_ref, tri)
    with pytest.raises(DTypeError, match=pattern):
        gmagen.responsibilities(inputs["q"].to(dtype), inputs["mean"], inputs["log_var"],
                                inputs["logit"], backend="triton")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_cu_seqlens_unsupported(causal, rng, gma_ref, tri):
    B, N, H, D, Dv, K = SHAPE
    inputs = _inputs(rng, gma_ref, tri, shape=(1, N, H, D, Dv, K))
    kern = gmagen.compile(gmagen.gma(causal), backend="triton")
    cu = torch.tensor([0, 4, N], dtype=torch.int32)
    with pytest.raises(UnsupportedFeature, match="cu_seqlens"):
        tri.run(kern, inputs, cu_seqlens=cu)
    y, _ = tri.run(kern, inputs)  # the same kernel still runs unpacked input
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("config", [
    pytest.param({"block_m": 32}, id="everywhere"),
    pytest.param({"gma_read": {"block_m": 32}}, id="one-kernel"),
])
def test_unknown_knob(config, rng, gma_ref, tri):
    kern = gmagen.compile(gmagen.gma(), backend="triton", config=config)
    with pytest.raises(OptionError, match="block_m") as info:
        tri.run(kern, _inputs(rng, gma_ref, tri))
    assert "block_n" in str(info.value)  # lists the valid knobs


def test_scan_knob_on_bidirectional(rng, gma_ref, tri):
    """decode_max_n is a knob of the causal scan only."""
    kern = gmagen.compile(gmagen.gma(), backend="triton", config={"decode_max_n": 0})
    with pytest.raises(OptionError, match="decode_max_n"):
        tri.run(kern, _inputs(rng, gma_ref, tri))


@pytest.mark.parametrize("knob, value", [("block_n", 48), ("block_d", 8), ("num_warps", 3),
                                         ("segments", -1), ("decode_max_n", "16")])
def test_disallowed_knob_value(knob, value, rng, gma_ref, tri):
    kern = gmagen.compile(gmagen.gma(causal=True), backend="triton",
                          config=gmagen.Config({knob: value}))
    with pytest.raises(OptionError, match=knob):
        tri.run(kern, _inputs(rng, gma_ref, tri))


def test_config_string_round_trip(rng, gma_ref, tri):
    """str(kernel.config) pastes back into compile(config=...)."""
    inputs = _inputs(rng, gma_ref, tri, shape=(2, 40, 2, 8, 6, 3), mask=True)
    kern = gmagen.compile(gmagen.gma(causal=True), backend="triton",
                          config={"block_n": 16, "segments": 3})
    y, _ = tri.run(kern, inputs)
    again = gmagen.compile(gmagen.gma(causal=True), backend="triton", config=str(kern.config))
    y2, _ = tri.run(again, inputs)
    assert again.config == kern.config and torch.equal(y, y2)


@pytest.mark.parametrize("options, word", [({"precision": "fp8"}, "fp8"),
                                           ({"precison": "tf32"}, "precison")])
def test_unknown_option(options, word):
    with pytest.raises(OptionError, match=word) as info:
        gmagen.compile(gmagen.gma(), backend="triton", **options)
    assert "precision" in str(info.value)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_scan_narrow_dv_tiles_refused_for_16_bit(dtype):
    """Scan Dv tiles < 64 with 16-bit tokens computed garbage on an H100 (space.py's
    SCAN_MIN_BLOCK_DV_16BIT): the default widens them, the tuner never proposes
    them, and an explicit config is refused naming the knob and the bound."""
    from gmagen.backends.triton import space, tune

    for Dv in (16, 32, 64):
        assert space.default_config("scan", 64, Dv, 64, dtype)["block_dv"] == 64
        assert space.default_config("scan", 64, Dv, 64, "f32")["block_dv"] == min(64, max(16, Dv))
        default = space.default_config("scan", 64, Dv, 64, dtype)
        assert tune.tuning_space("scan", default, 64, Dv, 64, dtype).knobs["block_dv"].values() \
            == (64,)
    with pytest.raises(OptionError, match=r"block_dv=32 with %s tokens: expected block_dv >= 64"
                       % dtype):
        space.check_for_dtype("scan", space.default_config("scan", 64, 64, 64, dtype).replace(
            block_dv=32), dtype)
    space.check_for_dtype("scan", space.default_config("scan", 64, 64, 64, "f32").replace(
        block_dv=32), "f32")                                  # float32: right, allowed
    space.check_for_dtype("write", Config(block_dv=32), dtype)  # bidirectional: allowed
