"""Python builder for GMA programs; ``gma()`` is written with it.

    b = ProgramBuilder("my_gma")
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", dim="Dv")
    mix = b.mixture()
    mem = b.slot_write(b.responsibility(k, mix), v, key_mask=b.key_mask())
    y = b.slot_read(b.responsibility(q, mix), mem, norm="row")
    program = b.build(y, state=mem)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from gmagen.errors import OptionError
from gmagen.ir import ops as _ops
from gmagen.ir.program import Input, Program
from gmagen.ir.types import LAYOUTS, Dim, MemoryType, TensorType
from gmagen.ir.verify import verify

_LOG_VAR_DIMS = {"diag": ("H", "K", "D"), "spherical": ("H", "K"), "shared": ("H",)}


@dataclass(frozen=True)
class Value:
    """Handle on an IR value while a program is being built."""

    name: str


@dataclass(frozen=True)
class Mixture:
    """The three parameter inputs of one Gaussian mixture."""

    mean: Value
    log_var: Value
    logit: Value
    covariance: str


def check_choice(arg: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise OptionError(f"{arg}={value!r} is not allowed; expected one of "
                          + ", ".join(repr(a) for a in allowed))


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise OptionError(f"eps={eps!r} is not allowed; expected a float >= 0 (default 1e-6)")
    return float(eps)


class ProgramBuilder:
    """Accumulates inputs and ops; ``build`` returns a verified Program."""

    def __init__(self, name: str, layout: str = "bnhd"):
        check_choice("layout", layout, LAYOUTS)
        self.name = name
        self.layout = layout
        self._inputs: list[Input] = []
        self._ops: list[_ops.Op] = []
        self._names: set[str] = set()

    def _fresh(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._names:
            i += 1
            name = f"{hint}{i}"
        self._names.add(name)
        return name

    def input(self, name: str, type_: Union[TensorType, MemoryType], role: str,
              optional: bool = False) -> Value:
        if name in self._names:
            raise OptionError(f"input name {name!r} is used twice in program {self.name!r}")
        self._names.add(name)
        self._inputs.append(Input(name, type_, role, optional))
        return Value(name)

    # -- inputs ------------------------------------------------------------
    def tokens(self, name: str, dim: Dim = "D") -> Value:
        """A token tensor T[B, N, H, dim] (q and k: dim D; v: dim Dv)."""
        return self.input(name, TensorType("T", ("B", "N", "H", dim)), "token")

    def mixture(self, prefix: str = "", covariance: str = "diag", K: Dim = "K",
                D: Dim = "D") -> Mixture:
        """mean P[H, K, D], log_var P[H, K, D] | P[H, K] | P[H], logit P[H, K]."""
        check_choice("covariance", covariance, _ops.COVARIANCES)
        dims = {"H": "H", "K": K, "D": D}
        lv_shape = tuple(dims[d] for d in _LOG_VAR_DIMS[covariance])
        return Mixture(
            self.input(f"{prefix}mean", TensorType("P", ("H", K, D)), "mixture"),
            self.input(f"{prefix}log_var", TensorType("P", lv_shape), "mixture"),
            self.input(f"{prefix}logit", TensorType("P", ("H", K)), "mixture"),
            covariance,
        )

    def key_mask(self, name: str = "key_mask") -> Value:
        """Optional bool[B, N]; True = real token, False keys write nothing."""
        return self.input(name, TensorType("bool", ("B", "N")), "mask", optional=True)

    def cu_seqlens(self, name: str = "cu_seqlens") -> Value:
        """Optional i32[S1] offsets of packed sequences (FlashAttention convention)."""
        return self.input(name, TensorType("i32", ("S1",)), "seqlens", optional=True)

    def initial_state(self, name: str = "initial_state", K: Dim = "K",
                      Dv: Dim = "Dv") -> Value:
        """Optional memory (S, n) to continue a causal scan from."""
        return self.input(name, MemoryType(("S", "H", K, Dv)), "state", optional=True)

    # -- ops ---------------------------------------------------------------
    def _emit(self, op: _ops.Op) -> None:
        self._ops.append(op)

    def responsibility(self, x: Value, mixture: Mixture, name: Optional[str] = None) -> Value:
        out = self._fresh(name or f"r{x.name}")
        self._emit(_ops.Responsibility(out, x.name, mixture.mean.name, mixture.log_var.name,
                                       mixture.logit.name, mixture.covariance))
        return Value(out)

    def slot_write(self, r: Value, v: Value, key_mask: Optional[Value] = None,
                   cu_seqlens: Optional[Value] = None, name: str = "memory") -> Value:
        out = self._fresh(name)
        self._emit(_ops.SlotWrite(out, r.name, v.name, _name(key_mask), _name(cu_seqlens)))
        return Value(out)

    def slot_read(self, r: Value, memory: Value, norm: str = "row",
                  eps: float = _ops.DEFAULT_EPS, cu_seqlens: Optional[Value] = None,
                  name: str = "y") -> Value:
        check_choice("norm", norm, _ops.NORMS)
        out = self._fresh(name)
        self._emit(_ops.SlotRead(out, r.name, memory.name, _name(cu_seqlens), norm,
                                 check_eps(eps)))
        return Value(out)

    def causal_scan(self, rq: Value, rk: Value, v: Value, key_mask: Optional[Value] = None,
                    initial_state: Optional[Value] = None,
                    cu_seqlens: Optional[Value] = None, norm: str = "row",
                    eps: float = _ops.DEFAULT_EPS) -> tuple[Value, Value]:
        check_choice("norm", norm, _ops.NORMS)
        y, state = self._fresh("y"), self._fresh("state")
        self._emit(_ops.CausalScan(y, state, rq.name, rk.name, v.name, _name(key_mask),
                                   _name(initial_state), _name(cu_seqlens), norm,
                                   check_eps(eps)))
        return Value(y), Value(state)

    def build(self, *outputs: Value, state: Optional[Value] = None) -> Program:
        program = Program(self.name, tuple(self._inputs), tuple(self._ops),
                          tuple(o.name for o in outputs), _name(state), self.layout)
        verify(program)
        return program


def _name(value: Optional[Value]) -> Optional[str]:
    return None if value is None else value.name


def _check_bool(arg: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{arg}={value!r} is not allowed; expected True or False")


def gma(causal: bool = False, norm: str = "row", covariance: str = "diag",
        eps: float = _ops.DEFAULT_EPS, *, layout: str = "bnhd", D: Dim = "D",
        Dv: Dim = "Dv", K: Dim = "K") -> Program:
    """The canonical GMA program (GMA_SPEC.md).

    Inputs, in call order: q, k [B, N, H, D], v [B, N, H, Dv], mean [H, K, D],
    log_var (by ``covariance``), logit [H, K]; optional key_mask [B, N],
    cu_seqlens [S+1] and (causal) initial_state.  Output y [B, N, H, Dv]; state
    (S, n) on request.  D, Dv and K stay symbolic unless given."""
    _check_bool("causal", causal)
    check_choice("norm", norm, _ops.NORMS)
    check_choice("covariance", covariance, _ops.COVARIANCES)
    eps = check_eps(eps)
    b = ProgramBuilder(f"gma_{'causal' if causal else 'bidirectional'}_{norm}_{covariance}",
                       layout)
    q, k, v = b.tokens("q", D), b.tokens("k", D), b.tokens("v", Dv)
    mix = b.mixture(covariance=covariance, K=K, D=D)
    mask, cu = b.key_mask(), b.cu_seqlens()
    if causal:
        init = b.initial_state(K=K, Dv=Dv)
        rq, rk = b.responsibility(q, mix), b.responsibility(k, mix)
        y, state = b.causal_scan(rq, rk, v, mask, init, cu, norm, eps)
        return b.build(y, state=state)
    mem = b.slot_write(b.responsibility(k, mix), v, mask, cu)
    y = b.slot_read(b.responsibility(q, mix), mem, norm, eps, cu)
    return b.build(y, state=mem)


def gma_qk_mixtures(causal: bool = False, norm: str = "row", covariance: str = "diag",
                    eps: float = _ops.DEFAULT_EPS, *, layout: str = "bnhd") -> Program:
    """GMA with separate query and key mixtures (q_mean, ..., k_mean, ...): queries
    and keys are routed through different Gaussians over the same K slots.
    Not the canonical program: shows that a new variant flows through the DSL,
    the planner and every backend without a new kernel."""
    _check_bool("causal", causal)
    check_choice("norm", norm, _ops.NORMS)
    check_choice("covariance", covariance, _ops.COVARIANCES)
    eps = check_eps(eps)
    b = ProgramBuilder(f"gma_qk_mixtures_{'causal' if causal else 'bidirectional'}", layout)
    q, k, v = b.tokens("q"), b.tokens("k"), b.tokens("v", "Dv")
    mq, mk = b.mixture("q_", covariance), b.mixture("k_", covariance)
    mask = b.key_mask()
    rq, rk = b.responsibility(q, mq), b.responsibility(k, mk)
    if causal:
        y, state = b.causal_scan(rq, rk, v, mask, b.initial_state(), norm=norm, eps=eps)
        return b.build(y, state=state)
    mem = b.slot_write(rk, v, mask)
    return b.build(b.slot_read(rq, mem, norm, eps), state=mem)


def responsibilities_program(covariance: str = "diag", layout: str = "bnhd") -> Program:
    """x [B, N, H, D] -> R [B, N, H, K] (``gmagen.responsibilities``)."""
    check_choice("covariance", covariance, _ops.COVARIANCES)
    b = ProgramBuilder(f"responsibilities_{covariance}", layout)
    x = b.tokens("x")
    r = b.responsibility(x, b.mixture(covariance=covariance), name="r")
    return b.build(r)


def slot_write_program(covariance: str = "diag", *, layout: str = "bnhd") -> Program:
    """k, v -> the memory (S, n) of the keys (GMA_SPEC slot_write): the first half of
    bidirectional GMA.  Inputs k [B, N, H, D], v [B, N, H, Dv], the mixture and an
    optional key_mask [B, N]; output the memory [B, H, K, Dv], [B, H, K]."""
    check_choice("covariance", covariance, _ops.COVARIANCES)
    b = ProgramBuilder(f"slot_write_{covariance}", layout)
    k, v = b.tokens("k"), b.tokens("v", "Dv")
    mix = b.mixture(covariance=covariance)
    mem = b.slot_write(b.responsibility(k, mix), v, b.key_mask())
    return b.build(mem)


def slot_read_program(norm: str = "row", covariance: str = "diag",
                      eps: float = _ops.DEFAULT_EPS, *, layout: str = "bnhd") -> Program:
    """q and a given memory (S, n) -> y (GMA_SPEC slot_read): the second half of
    bidirectional GMA, for a memory made elsewhere (by ``slot_write_program`` on other
    tokens, or summed over the ranks of a context-parallel group).  Inputs q, the
    mixture and ``memory`` = (S [B, H, K, Dv], n [B, H, K]); output y [B, N, H, Dv]."""
    check_choice("norm", norm, _ops.NORMS)
    check_choice("covariance", covariance, _ops.COVARIANCES)
    eps = check_eps(eps)
    b = ProgramBuilder(f"slot_read_{norm}_{covariance}", layout)
    q = b.tokens("q")
    mix = b.mixture(covariance=covariance)
    mem = b.input("memory", MemoryType(("B", "H", "K", "Dv")), "state")
    return b.build(b.slot_read(b.responsibility(q, mix), mem, norm, eps))
