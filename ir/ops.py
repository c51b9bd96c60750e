"""The four ops of GMA (GMA_SPEC.md, "The four operations").

Ops are frozen dataclasses with typed fields and no logic.  Each field is one
of three roles, recorded in its metadata so that the printer, the parser, the
JSON form and the verifier treat every op the same way:

* ``result``  - name of a value the op defines;
* ``operand`` - name of a value the op reads (``None`` for an absent optional);
* ``attr``    - a compile-time attribute (norm, eps, covariance).

Value names are written without the ``%`` sigil.  ``oracle.py`` has one
function per op with the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Union

NORMS = ("row", "slot")
COVARIANCES = ("diag", "spherical", "shared")
DEFAULT_EPS = 1e-6


def _result() -> object:
    return field(metadata={"role": "result"})


def _operand(optional: bool = False) -> object:
    if optional:
        return field(default=None, metadata={"role": "operand", "optional": True})
    return field(metadata={"role": "operand", "optional": False})


def _attr(default: object) -> object:
    return field(default=default, metadata={"role": "attr"})


@dataclass(frozen=True)
class Responsibility:
    """r(x) = softmax_k(alpha_k - 1/2 sum_d[(x_d - mu_kd)^2 exp(-rho_kd) + rho_kd]).

    x [B, N, H, D], mean [H, K, D], log_var [H, K, D] (diag) | [H, K]
    (spherical) | [H] (shared), logit [H, K]  ->  R [B, N, H, K] (acc).
    """

    out: str = _result()
    x: str = _operand()
    mean: str = _operand()
    log_var: str = _operand()
    logit: str = _operand()
    covariance: str = _attr("diag")


@dataclass(frozen=True)
class SlotWrite:
    """S_k = sum_j m_j r_jk v_j, n_k = sum_j m_j r_jk.

    r [B, N, H, K], v [B, N, H, Dv], key_mask [B, N] bool (optional),
    cu_seqlens [S+1] (optional; packed input, B = 1)  ->  memory [B|S, H, K, Dv].
    """

    out: str = _result()
    r: str = _operand()
    v: str = _operand()
    key_mask: Optional[str] = _operand(optional=True)
    cu_seqlens: Optional[str] = _operand(optional=True)


@dataclass(frozen=True)
class SlotRead:
    """row: y_i = sum_k r_ik S_k / (sum_k r_ik n_k + eps); slot: / (n_k + eps) inside.

    r [B, N, H, K], memory [B|S, H, K, Dv]  ->  y [B, N, H, Dv] (dtype T).
    """

    out: str = _result()
    r: str = _operand()
    memory: str = _operand()
    cu_seqlens: Optional[str] = _operand(optional=True)
    norm: str = _attr("row")
    eps: float = _attr(DEFAULT_EPS)


@dataclass(frozen=True)
class CausalScan:
    """slot_write + slot_read where query i sees keys j <= i (inclusive prefix
    sums), starting from ``initial_state`` and returning the final state.

    rq, rk [B, N, H, K], v [B, N, H, Dv], key_mask [B, N], initial_state
    memory [B|S, H, K, Dv], cu_seqlens [S+1]  ->  y [B, N, H, Dv], state.
    """

    out: str = _result()
    state_out: str = _result()
    rq: str = _operand()
    rk: str = _operand()
    v: str = _operand()
    key_mask: Optional[str] = _operand(optional=True)
    initial_state: Optional[str] = _operand(optional=True)
    cu_seqlens: Optional[str] = _operand(optional=True)
    norm: str = _attr("row")
    eps: float = _attr(DEFAULT_EPS)


Op = Union[Responsibility, SlotWrite, SlotRead, CausalScan]
OPS: dict[str, type] = {
    "responsibility": Responsibility,
    "slot_write": SlotWrite,
    "slot_read": SlotRead,
    "causal_scan": CausalScan,
}
OP_NAMES: dict[type, str] = {cls: name for name, cls in OPS.items()}


def op_name(op: Op) -> str:
    return OP_NAMES[type(op)]


def _by_role(op: Op, role: str) -> dict[str, object]:
    return {f.name: getattr(op, f.name) for f in fields(op) if f.metadata["role"] == role}


def results(op: Op) -> dict[str, str]:
    """Field name -> value name of each value the op defines."""
    return _by_role(op, "result")  # type: ignore[return-value]


def operands(op: Op) -> dict[str, Optional[str]]:
    """Field name -> value name (or None when an optional operand is absent)."""
    return _by_role(op, "operand")  # type: ignore[return-value]


def attrs(op: Op) -> dict[str, object]:
    return _by_role(op, "attr")


def optional_operands(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.metadata.get("optional"))
