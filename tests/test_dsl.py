"""The program builder: non-canonical programs run end to end, option errors."""

from __future__ import annotations

import numpy as np
import pytest

import gmagen
from gmagen.dsl import ProgramBuilder, gma_qk_mixtures
from gmagen.errors import GMAError, OptionError
from gmagen.ir import TensorType, oracle

TOL64 = 1e-10


def _two_norms(layout: str = "bnhd"):
    """Two reads of one memory with different norms; both outputs returned."""
    b = ProgramBuilder("two_norms", layout=layout)
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", dim="Dv")
    mix = b.mixture(covariance="spherical")
    mem = b.slot_write(b.responsibility(k, mix), v, key_mask=b.key_mask())
    rq = b.responsibility(q, mix)
    return b.build(b.slot_read(rq, mem, norm="row", eps=1e-5),
                   b.slot_read(rq, mem, norm="slot", eps=1e-3), state=mem)


def test_two_reads_different_norms(rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 2, 23, 3, 4, 5, 6, "spherical", mask=True)
    kern = gmagen.compile(_two_norms(), backend="numpy")
    y_row, y_slot = gma_ref.call(kern, inputs)
    common = dict(causal=False, covariance="spherical")
    gma_ref.assert_close(y_row, gma_ref.quadratic_gma(**inputs, **common, norm="row", eps=1e-5),
                         TOL64, "row")
    gma_ref.assert_close(y_slot, gma_ref.quadratic_gma(**inputs, **common, norm="slot",
                                                       eps=1e-3), TOL64, "slot")
    # by hand from the oracle's op functions
    mix = (inputs["mean"], inputs["log_var"], inputs["logit"])
    mem = oracle.slot_write(oracle.responsibility(inputs["k"], *mix, "spherical"), inputs["v"],
                            inputs["key_mask"])
    rq = oracle.responsibility(inputs["q"], *mix, "spherical")
    gma_ref.assert_close(y_slot, oracle.slot_read(rq, mem, norm="slot", eps=1e-3), TOL64)
    (y_row2, _), state = gma_ref.call(kern, inputs, return_state=True)
    gma_ref.assert_close(y_row2, y_row, TOL64)
    gma_ref.assert_close(state[0], mem[0], TOL64, "S")


def test_two_reads_bhnd(rng, gma_ref):
    inputs = gma_ref.make_inputs(rng, 2, 9, 2, 3, 4, 3, "spherical")
    y_ref = gma_ref.call(gmagen.compile(_two_norms()), inputs)
    swapped = {n: (np.swapaxes(x, 1, 2) if n in "qkv" else x) for n, x in inputs.items()}
    y = gma_ref.call(gmagen.compile(_two_norms("bhnd")), swapped)
    for got, ref in zip(y, y_ref):
        gma_ref.assert_close(np.swapaxes(got, 1, 2), ref, TOL64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("covariance", ["diag", "shared"])
def test_qk_mixtures(causal, norm, covariance, rng, gma_ref):
    H, D, K = 2, 3, 4
    inputs = gma_ref.make_inputs(rng, 2, 31, H, D, 5, K, covariance, mask=True, prefix="q_")
    inputs.update(gma_ref.make_mixture(rng, H, K, D, covariance, prefix="k_"))
    kern = gmagen.compile(gma_qk_mixtures(causal, norm, covariance), backend="numpy")
    y = gma_ref.call(kern, inputs)
    q_mix = [inputs[f"q_{n}"] for n in ("mean", "log_var", "logit")]
    k_mix = tuple(inputs[f"k_{n}"] for n in ("mean", "log_var", "logit"))
    ref = gma_ref.quadratic_gma(inputs["q"], inputs["k"], inputs["v"], *q_mix, causal=causal,
                                norm=norm, covariance=covariance, key_mask=inputs["key_mask"],
                                k_mixture=k_mix)
    gma_ref.assert_close(y, ref, TOL64)
    # swapping the key mixture for the query one must change the result
    same = gma_ref.quadratic_gma(inputs["q"], inputs["k"], inputs["v"], *q_mix, causal=causal,
                                 norm=norm, covariance=covariance, key_mask=inputs["key_mask"])
    assert gma_ref.rel_err(y, same) > 1e-6


BAD_OPTIONS = [
    pytest.param(dict(norm="column"), "norm", ["'row'", "'slot'", "'column'"], id="norm"),
    pytest.param(dict(covariance="full"), "covariance",
                 ["'diag'", "'spherical'", "'shared'", "'full'"], id="covariance"),
    pytest.param(dict(causal="yes"), "causal", ["True", "False", "'yes'"], id="causal"),
    pytest.param(dict(causal=1), "causal", ["True or False"], id="causal-int"),
    pytest.param(dict(eps=-1), "eps", [">= 0", "-1"], id="eps-negative"),
    pytest.param(dict(eps=float("nan")), "eps", ["nan"], id="eps-nan"),
    pytest.param(dict(eps="1e-6"), "eps", ["float"], id="eps-str"),
    pytest.param(dict(layout="nhd"), "layout", ["'bnhd'", "'bhnd'"], id="layout"),
]


@pytest.mark.parametrize("kwargs, arg, needles", BAD_OPTIONS)
@pytest.mark.parametrize("build", [gmagen.gma, gma_qk_mixtures], ids=["gma", "qk_mixtures"])
def test_option_errors(build, kwargs, arg, needles):
    with pytest.raises(OptionError) as info:
        build(**kwargs)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, GMAError)
    msg = str(err)
    assert msg.startswith(f"{arg}="), msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_builder_errors():
    b = ProgramBuilder("p")
    b.tokens("q")
    with pytest.raises(OptionError, match="'q' is used twice"):
        b.tokens("q")
    with pytest.raises(OptionError, match="norm="):
        b.slot_read(b.tokens("x"), b.initial_state(), norm="col")
    with pytest.raises(OptionError, match="eps="):
        b.causal_scan(b.tokens("a"), b.tokens("c"), b.tokens("v"), eps=-0.5)
    with pytest.raises(OptionError, match="covariance="):
        b.mixture(covariance="full")
    with pytest.raises(OptionError, match="layout="):
        ProgramBuilder("p", layout="BNHD")


def test_builder_fresh_names_do_not_clash():
    b = ProgramBuilder("p")
    q, v = b.tokens("q"), b.tokens("v", dim="Dv")
    mix = b.mixture()
    r1, r2 = b.responsibility(q, mix), b.responsibility(q, mix)
    assert r1.name != r2.name
    y1, s1 = b.causal_scan(r1, r2, v)
    y2, s2 = b.causal_scan(r2, r1, v)
    assert len({y1.name, s1.name, y2.name, s2.name}) == 4
    b.build(y1, y2)  # verifies


def test_gma_default_arguments():
    p = gmagen.gma()
    assert p.name == "gma_bidirectional_row_diag" and p.layout == "bnhd"
    assert p.ops[-1].eps == 1e-6 and isinstance(p.ops[-1].eps, float)
    assert [i.name for i in p.inputs if not i.optional] == ["q", "k", "v", "mean", "log_var",
                                                             "logit"]
    assert gmagen.gma(eps=0).ops[-1].eps == 0.0


def _given_r(layout: str):
    """Responsibilities passed in (e.g. from gmagen.responsibilities) instead of computed."""
    b = ProgramBuilder("given_r", layout=layout)
    r = b.input("r", TensorType("acc", ("B", "N", "H", "K")), "responsibility")
    v = b.tokens("v", dim="Dv")
    return b.build(b.slot_read(r, b.slot_write(r, v), norm="slot"))


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_responsibilities_fed_back_in_layout(layout, rng, gma_ref):
    """Every rank-4 tensor follows the layout, inputs as well as results: R
    computed in "bhnd" goes straight back into a "bhnd" program."""
    inputs = gma_ref.make_inputs(rng, 2, 11, 3, 4, 5, 6)
    mix = (inputs["mean"], inputs["log_var"], inputs["logit"])
    to_layout = (lambda a: a) if layout == "bnhd" else (lambda a: np.swapaxes(a, 1, 2))
    r = gmagen.responsibilities(to_layout(inputs["k"]), *mix, layout=layout)
    assert r.shape == to_layout(np.zeros((2, 11, 3, 6))).shape
    ref = gma_ref.quadratic_gma(inputs["k"], inputs["k"], inputs["v"], *mix, causal=False,
                                norm="slot")
    program = _given_r(layout)
    y = gmagen.compile(program, backend="numpy")(r, to_layout(inputs["v"]))
    gma_ref.assert_close(to_layout(y), ref, TOL64, "kernel")
    y_oracle = oracle.run(program, {"r": r, "v": to_layout(inputs["v"])})["y"]
    gma_ref.assert_close(to_layout(y_oracle), ref, TOL64, "oracle.run")
