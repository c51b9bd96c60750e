"""The verifier: every malformed program is rejected with a message naming the
op and the operand (STYLE.md "Errors")."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

import gmagen
from gmagen.dsl import ProgramBuilder, gma_qk_mixtures, responsibilities_program
from gmagen.errors import VerifyError
from gmagen.ir import (CausalScan, Input, MemoryType, Program, Responsibility, SlotRead,
                       SlotWrite, TensorType, verify)


def _retype(p: Program, name: str, dtype: str, shape: tuple) -> Program:
    inputs = tuple(replace(i, type=TensorType(dtype, shape)) if i.name == name else i
                   for i in p.inputs)
    return replace(p, inputs=inputs)


def _op(p: Program, index: int, **changes) -> Program:
    ops = list(p.ops)
    ops[index] = replace(ops[index], **changes)
    return replace(p, ops=tuple(ops))


def _two_mixtures(causal: bool) -> Program:
    """Queries and keys routed through mixtures with different K (J vs K)."""
    b = ProgramBuilder("two_k")
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", "Dv")
    rq = b.responsibility(q, b.mixture("q_", K="J"))
    rk = b.responsibility(k, b.mixture("k_", K="K"))
    if causal:
        b._emit(CausalScan("y", "state", rq.name, rk.name, v.name))
        return Program("two_k", tuple(b._inputs), tuple(b._ops), ("y",), "state")
    b._emit(SlotWrite("memory", rk.name, v.name))
    b._emit(SlotRead("y", rq.name, "memory"))
    return Program("two_k", tuple(b._inputs), tuple(b._ops), ("y",), "memory")


def _continue(packed_first: bool) -> Program:
    """Two scans, the second continuing the first's state."""
    b = ProgramBuilder("two_scans")
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", "Dv")
    mix = b.mixture()
    cu = b.cu_seqlens()
    rq, rk = b.responsibility(q, mix), b.responsibility(k, mix)
    _, state = b.causal_scan(rq, rk, v, cu_seqlens=cu if packed_first else None)
    y, _ = b.causal_scan(rq, rk, v, initial_state=state)
    return Program("two_scans", tuple(b._inputs), tuple(b._ops), (y.name,))


BIDIR = gmagen.gma()
CAUSAL = gmagen.gma(causal=True)
# indices into BIDIR.ops: 0 rk = responsibility(k), 1 slot_write, 2 rq, 3 slot_read
# indices into CAUSAL.ops: 0 rq, 1 rk, 2 causal_scan
BAD = {
    "log_var-rank-spherical": (
        _retype(gmagen.gma(covariance="spherical"), "log_var", "P", ("H", "K", "D")),
        ["responsibility", "log_var", "[H, K]", "spherical"]),
    "log_var-rank-diag": (_retype(BIDIR, "log_var", "P", ("H",)),
                          ["responsibility", "log_var", "[H, K, D]", "diag"]),
    "log_var-K": (_retype(BIDIR, "log_var", "P", ("H", "J", "D")),
                  ["responsibility", "log_var", "K differs"]),
    "mean-H": (_retype(BIDIR, "mean", "P", ("G", "K", "D")), ["responsibility", "mean", "H"]),
    "k-D": (_retype(BIDIR, "k", "T", ("B", "N", "H", "E")),
            ["responsibility", "%rk", "D differs", "x has E"]),
    "logit-K": (_retype(BIDIR, "logit", "P", ("H", "J")), ["responsibility", "logit", "K"]),
    "logit-rank": (_retype(BIDIR, "logit", "P", ("H",)), ["responsibility", "logit", "[H, K]"]),
    "v-N": (_retype(BIDIR, "v", "T", ("B", "M", "H", "Dv")), ["slot_write", "v", "N differs"]),
    "v-int": (_retype(BIDIR, "v", "i32", ("B", "N", "H", "Dv")), ["slot_write", "v", "float"]),
    "q-int": (_retype(BIDIR, "q", "i64", ("B", "N", "H", "D")), ["responsibility", "x", "float"]),
    "scan-K": (_two_mixtures(True), ["causal_scan", "rq", "rk", "K differs"]),
    "read-K": (_two_mixtures(False), ["slot_read", "memory", "K differs"]),
    "scan-v-H": (_retype(CAUSAL, "v", "T", ("B", "N", "G", "Dv")), ["causal_scan", "v", "H"]),
    "undefined": (_op(BIDIR, 1, v="nope"), ["slot_write", "v=%nope", "not defined"]),
    "use-before-def": (replace(BIDIR, ops=(BIDIR.ops[1], BIDIR.ops[0]) + BIDIR.ops[2:]),
                       ["slot_write", "r=%rk", "not defined"]),
    "ssa-twice": (_op(BIDIR, 2, out="rk"), ["responsibility", "%rk", "defined twice"]),
    "ssa-shadows-input": (_op(BIDIR, 2, out="q"), ["responsibility", "%q", "defined twice"]),
    "ssa-scan-results": (replace(_op(CAUSAL, 2, state_out="y"), state="y"),
                         ["causal_scan", "%y", "twice"]),
    "norm-read": (_op(BIDIR, 3, norm="column"), ["slot_read", "norm='column'", "row", "slot"]),
    "norm-scan": (_op(CAUSAL, 2, norm="col"), ["causal_scan", "norm='col'", "row", "slot"]),
    "eps-negative": (_op(BIDIR, 3, eps=-1e-6), ["slot_read", "eps"]),
    "eps-nan": (_op(CAUSAL, 2, eps=float("nan")), ["causal_scan", "eps"]),
    "covariance": (_op(BIDIR, 0, covariance="full"), ["responsibility", "covariance='full'"]),
    "optional-as-required": (_op(BIDIR, 1, v="key_mask"),
                             ["slot_write", "v=%key_mask", "optional", "required"]),
    "optional-state-as-required": (_op(CAUSAL, 2, rk="initial_state"),
                                   ["causal_scan", "rk=%initial_state", "optional"]),
    "required-missing": (_op(BIDIR, 1, v=None), ["slot_write", "required operand v"]),
    "memory-is-tensor": (_op(BIDIR, 3, memory="rk"), ["slot_read", "memory=%rk", "memory"]),
    "r-is-memory": (_op(BIDIR, 3, r="memory"), ["slot_read", "r=%memory", "tensor"]),
    "mask-dtype": (_retype(BIDIR, "key_mask", "f32", ("B", "N")),
                   ["slot_write", "key_mask", "bool"]),
    "mask-shape": (_retype(CAUSAL, "key_mask", "bool", ("B", "M")),
                   ["causal_scan", "key_mask", "N"]),
    "cu_seqlens-dtype": (_retype(BIDIR, "cu_seqlens", "f32", ("S1",)),
                         ["slot_write", "cu_seqlens", "i32"]),
    "initial_state-K": (replace(CAUSAL, inputs=tuple(
        replace(i, type=MemoryType(("S", "H", "J", "Dv"))) if i.name == "initial_state" else i
        for i in CAUSAL.inputs)), ["causal_scan", "initial_state", "K"]),
    "read-unpacked": (_op(BIDIR, 3, cu_seqlens=None),
                      ["slot_read", "memory=%memory", "cu_seqlens=%cu_seqlens", "none"]),
    "scan-continues-packed": (_continue(packed_first=True),
                              ["causal_scan", "initial_state=%state", "cu_seqlens"]),
    "no-outputs": (replace(BIDIR, outputs=()), ["no outputs"]),
    "output-undefined": (replace(BIDIR, outputs=("zz",)), ["output %zz", "never defined"]),
    "state-undefined": (replace(BIDIR, state="zz"), ["%zz", "never defined"]),
    "state-is-tensor": (replace(BIDIR, state="y"), ["state %y", "expected a memory"]),
    "output-is-optional-input": (replace(BIDIR, outputs=("y", "key_mask")),
                                 ["output %key_mask", "optional"]),
    "input-twice": (replace(BIDIR, inputs=BIDIR.inputs + BIDIR.inputs[:1]),
                    ["input %q", "declared twice"]),
    "input-role": (replace(BIDIR, inputs=(replace(BIDIR.inputs[0], role="query"),)
                           + BIDIR.inputs[1:]), ["%q", "role 'query'"]),
    "layout": (replace(BIDIR, layout="nbhd"), ["layout='nbhd'", "bnhd", "bhnd"]),
}


@pytest.mark.parametrize("program, needles", [pytest.param(*v, id=k) for k, v in BAD.items()])
def test_verify_rejects(program, needles):
    with pytest.raises(VerifyError) as info:
        verify(program)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_verify_message_shape():
    """What, where, expected, got: the op, its result, the operand, both dims."""
    with pytest.raises(VerifyError) as info:
        verify(BAD["k-D"][0])
    assert str(info.value).startswith("responsibility (defining %rk): D differs")


VALID = [pytest.param(gmagen.gma(c, n, cov), id=f"{'causal' if c else 'bidir'}-{n}-{cov}")
         for c, n, cov in itertools.product((False, True), ("row", "slot"),
                                            ("diag", "spherical", "shared"))]
VALID += [pytest.param(gma_qk_mixtures(c), id=f"qk-mixtures-{'causal' if c else 'bidir'}")
          for c in (False, True)]
VALID += [pytest.param(responsibilities_program(cov), id=f"responsibilities-{cov}")
          for cov in ("diag", "spherical", "shared")]


@pytest.mark.parametrize("program", VALID)
def test_verify_types(program):
    types = verify(program)
    for name in program.outputs:
        t = types[name]
        assert isinstance(t, TensorType) and t.shape[:3] == ("B", "N", "H")
    if program.state is not None:
        assert types[program.state] == MemoryType(("S", "H", "K", "Dv"))
    for inp in program.inputs:
        assert types[inp.name] == inp.type


def test_verify_continued_scan():
    verify(_continue(packed_first=False))


def test_verify_fixed_dims():
    p = gmagen.gma(True, D=16, Dv=8, K=4)
    types = verify(p)
    assert types["y"] == TensorType("T", ("B", "N", "H", 8))
    assert types["state"] == MemoryType(("S", "H", 4, 8))
    assert types["rq"] == TensorType("acc", ("B", "N", "H", 4))
    # an int dim matches only the same int
    with pytest.raises(VerifyError, match="D differs"):
        verify(_retype(p, "k", "T", ("B", "N", "H", 15)))


def test_input_and_op_value_objects_are_hashable():
    """Plans and caches key on ops; frozen dataclasses must stay hashable."""
    assert len({*BIDIR.ops, *BIDIR.ops}) == len(BIDIR.ops)
    assert hash(Input("x", TensorType("T", ("B",)))) == hash(Input("x", TensorType("T", ("B",))))
    assert Responsibility("r", "x", "m", "l", "a") != Responsibility("r", "x", "m", "l", "a",
                                                                     "shared")
