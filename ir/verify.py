"""Structural and type checks of a Program.

``verify(program)`` returns the type of every value, or raises ``VerifyError``
naming the op, the operand, what was expected and what was found.  Shapes are
compared symbolically: a dim matches only the same symbol or the same int.
"""

from __future__ import annotations

from typing import Callable, Optional

from gmagen.errors import VerifyError

from . import ops as _ops
from .program import ROLES, Program
from .types import LAYOUTS, Dim, MemoryType, TensorType, ValueType, is_float

_LOG_VAR_SHAPES = {"diag": "[H, K, D]", "spherical": "[H, K]", "shared": "[H]"}


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class _OpChecker:
    """Checks one op's operands against each other, with messages naming them."""

    def __init__(self, op: _ops.Op, env: dict[str, ValueType]):
        self.op = op
        self.name = _ops.op_name(op)
        self.env = env

    def fail(self, msg: str) -> VerifyError:
        return VerifyError(f"{self.name} (defining %{next(iter(_ops.results(self.op).values()))}): {msg}")

    def tensor(self, field: str, rank: int, what: str) -> TensorType:
        value = getattr(self.op, field)
        t = self.env[value]
        if not isinstance(t, TensorType):
            raise self.fail(f"operand {field}=%{value} is {t}, expected a tensor {what}")
        if t.rank != rank:
            raise self.fail(f"operand {field}=%{value} has shape {_fmt(t.shape)}, expected {what}")
        return t

    def memory(self, field: str) -> MemoryType:
        value = getattr(self.op, field)
        t = self.env[value]
        if not isinstance(t, MemoryType):
            raise self.fail(f"operand {field}=%{value} is {t}, expected a memory mem[S, H, K, Dv]")
        return t

    def same(self, what: str, a: Dim, b: Dim, where_a: str, where_b: str) -> None:
        if a != b:
            raise self.fail(f"{what} differs: {where_a} has {a}, {where_b} has {b}")

    def float_dtype(self, field: str, t: TensorType) -> None:
        if not is_float(t.dtype):
            raise self.fail(f"operand {field} has dtype {t.dtype}, expected a float")

    def optional_mask(self, b: Dim, n: Dim) -> None:
        if getattr(self.op, "key_mask", None) is None:
            return
        m = self.tensor("key_mask", 2, "bool [B, N]")
        if m.dtype != "bool":
            raise self.fail(f"operand key_mask has dtype {m.dtype}, expected bool")
        self.same("B", m.shape[0], b, "key_mask", "the tokens")
        self.same("N", m.shape[1], n, "key_mask", "the tokens")

    def optional_seqlens(self) -> None:
        if getattr(self.op, "cu_seqlens", None) is None:
            return
        c = self.tensor("cu_seqlens", 1, "int [S+1]")
        if c.dtype not in ("i32", "i64"):
            raise self.fail(f"operand cu_seqlens has dtype {c.dtype}, expected i32 or i64")


def _responsibility(c: _OpChecker) -> dict[str, ValueType]:
    op: _ops.Responsibility = c.op  # type: ignore[assignment]
    if op.covariance not in _ops.COVARIANCES:
        raise c.fail(f"covariance={op.covariance!r}, expected one of {_ops.COVARIANCES}")
    x = c.tensor("x", 4, "[B, N, H, D]")
    c.float_dtype("x", x)
    b, n, h, d = x.shape
    mean = c.tensor("mean", 3, "[H, K, D]")
    c.float_dtype("mean", mean)
    c.same("H", mean.shape[0], h, "mean", "x")
    c.same("D", mean.shape[2], d, "mean", "x")
    k = mean.shape[1]
    lv_rank = {"diag": 3, "spherical": 2, "shared": 1}[op.covariance]
    lv = c.tensor("log_var", lv_rank, f"{_LOG_VAR_SHAPES[op.covariance]} for "
                  f"covariance={op.covariance!r}")
    c.float_dtype("log_var", lv)
    expected_lv = (h, k, d)[:lv_rank]
    for i, name in enumerate(("H", "K", "D")[:lv_rank]):
        c.same(name, lv.shape[i], expected_lv[i], "log_var", "mean")
    logit = c.tensor("logit", 2, "[H, K]")
    c.float_dtype("logit", logit)
    c.same("H", logit.shape[0], h, "logit", "mean")
    c.same("K", logit.shape[1], k, "logit", "mean")
    return {op.out: TensorType("acc", (b, n, h, k))}


def _tokens_and_values(c: _OpChecker, r_field: str) -> tuple[Dim, Dim, Dim, Dim, Dim]:
    r = c.tensor(r_field, 4, "[B, N, H, K] responsibilities")
    v = c.tensor("v", 4, "[B, N, H, Dv]")
    c.float_dtype("v", v)
    for i, name in enumerate(("B", "N", "H")):
        c.same(name, v.shape[i], r.shape[i], "v", r_field)
    return r.shape[0], r.shape[1], r.shape[2], r.shape[3], v.shape[3]


def _slot_write(c: _OpChecker) -> dict[str, ValueType]:
    op: _ops.SlotWrite = c.op  # type: ignore[assignment]
    b, n, h, k, dv = _tokens_and_values(c, "r")
    c.optional_mask(b, n)
    c.optional_seqlens()
    return {op.out: MemoryType(("S", h, k, dv))}


def _check_norm(c: _OpChecker, norm: str, eps: float) -> None:
    if norm not in _ops.NORMS:
        raise c.fail(f"norm={norm!r}, expected one of {_ops.NORMS}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise c.fail(f"eps={eps!r}, expected a float >= 0")


def _slot_read(c: _OpChecker) -> dict[str, ValueType]:
    op: _ops.SlotRead = c.op  # type: ignore[assignment]
    _check_norm(c, op.norm, op.eps)
    r = c.tensor("r", 4, "[B, N, H, K] responsibilities")
    mem = c.memory("memory")
    c.same("H", mem.shape[1], r.shape[2], "memory", "r")
    c.same("K", mem.shape[2], r.shape[3], "memory", "r")
    c.optional_seqlens()
    return {op.out: TensorType("T", (r.shape[0], r.shape[1], r.shape[2], mem.shape[3]))}


def _causal_scan(c: _OpChecker) -> dict[str, ValueType]:
    op: _ops.CausalScan = c.op  # type: ignore[assignment]
    _check_norm(c, op.norm, op.eps)
    b, n, h, k, dv = _tokens_and_values(c, "rk")
    rq = c.tensor("rq", 4, "[B, N, H, K] responsibilities")
    for i, name in enumerate(("B", "N", "H", "K")):
        c.same(name, rq.shape[i], (b, n, h, k)[i], "rq", "rk")
    c.optional_mask(b, n)
    c.optional_seqlens()
    state = MemoryType(("S", h, k, dv))
    if op.initial_state is not None:
        init = c.memory("initial_state")
        for i, name in enumerate(("H", "K", "Dv")):
            c.same(name, init.shape[i + 1], state.shape[i + 1], "initial_state", "the scan")
    return {op.out: TensorType("T", (b, n, h, dv)), op.state_out: state}


_CHECKS: dict[type, Callable[[_OpChecker], dict[str, ValueType]]] = {
    _ops.Responsibility: _responsibility,
    _ops.SlotWrite: _slot_write,
    _ops.SlotRead: _slot_read,
    _ops.CausalScan: _causal_scan,
}


def _check_packing(op: _ops.Op, name: str, packed_by: dict[str, Optional[str]]) -> None:
    """A memory written from packed sequences has one row per sequence (S), not per
    batch entry: whoever reads or continues it must use the same cu_seqlens."""
    if isinstance(op, _ops.SlotWrite):
        packed_by[op.out] = op.cu_seqlens
    elif isinstance(op, _ops.CausalScan):
        packed_by[op.state_out] = op.cu_seqlens
    field = {_ops.SlotRead: "memory", _ops.CausalScan: "initial_state"}.get(type(op))
    memory = getattr(op, field) if field else None
    if memory in packed_by and packed_by[memory] != op.cu_seqlens:
        wrote, reads = (f"%{v}" if v else "none" for v in (packed_by[memory], op.cu_seqlens))
        raise VerifyError(f"{name}: operand {field}=%{memory} was written with cu_seqlens="
                          f"{wrote}, but this op has cu_seqlens={reads}; pass the same "
                          f"cu_seqlens to both")


def _check_name(where: str, what: str, name: object) -> None:
    """Names reach the text form (``%name``) and generated source: ASCII identifiers only."""
    if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
        raise VerifyError(f"{where}: {what} {name!r} is not an identifier "
                          f"(letters, digits and _, not starting with a digit)")


def verify(program: Program) -> dict[str, ValueType]:
    """Check ``program``; return the type of every value (inputs and results)."""
    where = f"program {program.name!r}"
    _check_name(where, "the program name", program.name)
    if program.layout not in LAYOUTS:
        raise VerifyError(f"{where}: layout={program.layout!r}, expected one of {LAYOUTS}")
    env: dict[str, ValueType] = {}
    optional_inputs: set[str] = set()
    packed_by: dict[str, Optional[str]] = {}  # memory -> cu_seqlens it was written with
    for inp in program.inputs:
        _check_name(where, "input name", inp.name)
        if inp.name in env:
            raise VerifyError(f"{where}: input %{inp.name} is declared twice")
        if inp.role not in ROLES:
            raise VerifyError(f"{where}: input %{inp.name} has role {inp.role!r}, expected one of {ROLES}")
        env[inp.name] = inp.type
        if inp.optional:
            optional_inputs.add(inp.name)
    for op in program.ops:
        name = _ops.op_name(op)
        if type(op) not in _CHECKS:
            raise VerifyError(f"{where}: unknown op {op!r}")
        opt_fields = set(_ops.optional_operands(type(op)))
        for field, value in _ops.operands(op).items():
            if value is None:
                if field not in opt_fields:
                    raise VerifyError(f"{name}: required operand {field} is missing")
                continue
            if value not in env:
                raise VerifyError(f"{name}: operand {field}=%{value} is not defined before use")
            if value in optional_inputs and field not in opt_fields:
                raise VerifyError(f"{name}: operand {field}=%{value} is an optional input, "
                                  f"but {field} is a required operand")
        new = _CHECKS[type(op)](_OpChecker(op, env))
        # from the op's fields, not ``new``: a dict would hide y == state (SSA)
        defined = list(_ops.results(op).values())
        for value in defined:
            _check_name(name, "result name", value)
            if value in env or defined.count(value) > 1:
                raise VerifyError(f"{name}: result %{value} is defined twice (SSA)")
        env.update(new)
        _check_packing(op, name, packed_by)
    if not program.outputs:
        raise VerifyError(f"{where}: no outputs")
    for out in program.outputs + ((program.state,) if program.state else ()):
        if out not in env:
            raise VerifyError(f"{where}: output %{out} is never defined")
        if out in optional_inputs:
            raise VerifyError(f"{where}: output %{out} is an optional input")
    if program.state is not None and not isinstance(env[program.state], MemoryType):
        raise VerifyError(f"{where}: state %{program.state} is {env[program.state]}, "
                          f"expected a memory")
    return env
