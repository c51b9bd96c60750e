"""The fusion planner and dead-op elimination (ir/passes)."""

from __future__ import annotations

import pytest

import gmagen
from gmagen.dsl import ProgramBuilder, gma_qk_mixtures, responsibilities_program
from gmagen.errors import VerifyError
from gmagen.ir import (CausalScan, Responsibility, SlotRead, SlotWrite, eliminate_dead_ops,
                       plan_program)


def _kinds(program):
    return [k.kind for k in plan_program(program).kernels]


@pytest.mark.parametrize("norm", ["row", "slot"])
@pytest.mark.parametrize("covariance", ["diag", "spherical", "shared"])
def test_bidirectional_is_write_then_read(norm, covariance):
    plan = plan_program(gmagen.gma(False, norm, covariance))
    write, read = plan.kernels
    assert [write.name, read.name] == ["gma_write", "gma_read"]
    assert [type(op) for op in write.ops] == [Responsibility, SlotWrite]
    assert [type(op) for op in read.ops] == [Responsibility, SlotRead]
    assert write.responsibility_of("r").x == "k" and read.responsibility_of("r").x == "q"
    assert write.outputs == ("memory",) and read.outputs == ("y",)
    # the memory crosses kernels; the responsibilities never do (recomputed inside)
    assert "memory" in read.inputs and not {"rq", "rk"} & set(read.inputs + write.inputs)
    assert set(write.inputs) == {"k", "mean", "log_var", "logit", "v", "key_mask", "cu_seqlens"}
    assert read.main.norm == norm


def test_causal_is_one_scan():
    plan = plan_program(gmagen.gma(True, "slot"))
    (scan,) = plan.kernels
    assert scan.name == "gma_scan"
    assert [type(op) for op in scan.ops] == [Responsibility, Responsibility, CausalScan]
    assert scan.responsibility_of("rq").x == "q" and scan.responsibility_of("rk").x == "k"
    assert scan.outputs == ("y", "state")
    assert "initial_state" in scan.inputs


def test_responsibilities_program_is_one_kernel():
    (kern,) = plan_program(responsibilities_program()).kernels
    assert kern.name == "gma_responsibility" and kern.outputs == ("r",)


def test_two_reads_of_one_memory():
    b = ProgramBuilder("two_reads")
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", dim="Dv")
    mix = b.mixture()
    mem = b.slot_write(b.responsibility(k, mix), v)
    rq = b.responsibility(q, mix)
    y1, y2 = b.slot_read(rq, mem, norm="row"), b.slot_read(rq, mem, norm="slot")
    plan = plan_program(b.build(y1, y2))
    assert [k.kind for k in plan.kernels] == ["write", "read", "read"]
    assert [k.main.norm for k in plan.kernels[1:]] == ["row", "slot"]
    # each read recomputes rq instead of storing it
    assert all(k.responsibility_of("r").x == "q" for k in plan.kernels[1:])


def test_shared_responsibility_is_fused_once():
    """Self-attention (rq is rk): one responsibility in the scan kernel."""
    b = ProgramBuilder("self_scan")
    x, v = b.tokens("x"), b.tokens("v", dim="Dv")
    r = b.responsibility(x, b.mixture())
    y, _ = b.causal_scan(r, r, v)
    (scan,) = plan_program(b.build(y)).kernels
    assert [type(op) for op in scan.ops] == [Responsibility, CausalScan]


def test_responsibility_output_gets_its_own_kernel():
    b = ProgramBuilder("with_r")
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", dim="Dv")
    mix = b.mixture()
    rq = b.responsibility(q, mix)
    mem = b.slot_write(b.responsibility(k, mix), v)
    assert _kinds(b.build(b.slot_read(rq, mem), rq)) == ["responsibility", "write", "read"]


def test_dead_ops_dropped():
    b = ProgramBuilder("dead")
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", dim="Dv")
    mix = b.mixture()
    b.responsibility(v, b.mixture("unused_", D="Dv"))           # dead
    rk = b.responsibility(k, mix)
    mem = b.slot_write(rk, v)
    b.slot_write(rk, v, name="dead_memory")                    # dead
    y = b.slot_read(b.responsibility(q, mix), mem)
    b.causal_scan(rk, rk, v)                                    # dead
    program = b.build(y)
    live = eliminate_dead_ops(program)
    assert [op.out for op in live.ops] == ["rk", "memory", "rq", "y"]
    assert live.inputs == program.inputs and live.outputs == program.outputs
    plan = plan_program(program)
    assert [k.kind for k in plan.kernels] == ["write", "read"]
    assert plan.program.ops == live.ops


def test_state_keeps_its_ops_alive():
    p = gmagen.gma(False)
    assert eliminate_dead_ops(p).ops == p.ops
    p = gmagen.gma(True)
    assert eliminate_dead_ops(p).ops == p.ops


def test_qk_mixtures_plan_fuses_each_mixture():
    write, read = plan_program(gma_qk_mixtures()).kernels
    assert write.responsibility_of("r").mean == "k_mean"
    assert read.responsibility_of("r").mean == "q_mean"


def test_plan_verifies_first():
    from dataclasses import replace

    with pytest.raises(VerifyError):
        plan_program(replace(gmagen.gma(), outputs=("nope",)))


def test_compiled_kernel_carries_the_plan():
    kern = gmagen.compile(gmagen.gma(True), backend="numpy")
    assert [k.name for k in kern.plan.kernels] == ["gma_scan"]
    text = str(kern.plan)
    assert "gma_scan" in text and "causal_scan(" in text
