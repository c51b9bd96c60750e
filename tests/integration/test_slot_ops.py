"""gmagen.torch.slot_ops: the write and read halves of bidirectional GMA apart (what
context parallelism runs per rank), forward and gradients against the float64
oracle and its analytic VJPs, on every backend that runs on the CPU; and the
DSL programs they compile to one kernel each."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gmagen  # noqa: E402

gmagen.available_backends()  # probe triton first (see tests/integration/test_torch_gma.py)

from gmagen.dsl import slot_read_program, slot_write_program  # noqa: E402
from gmagen.ir.oracle import run  # noqa: E402
from gmagen.ir.oracle_grad import run_vjp  # noqa: E402
from gmagen.torch import slot_ops  # noqa: E402

B, N, H, D, DV, K = 2, 37, 2, 8, 4, 3
# float64 backends: the GMA_SPEC float64 contract; float32 ones: the float32 contract
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4)}
BACKENDS = {"numpy": torch.float64, "torch": torch.float64, "triton": torch.float32,
            "tvm": torch.float32}
LV_SHAPE = {"diag": (H, K, D), "spherical": (H, K), "shared": (H,)}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _available(backend: str) -> None:
    avail = gmagen.available_backends()[backend]
    if not avail.ok:
        pytest.skip(f"backend {backend}: {avail.reason}")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("norm,covariance,layout", [("row", "diag", "bnhd"),
                                                    ("slot", "spherical", "bhnd"),
                                                    ("row", "shared", "bhnd"),
                                                    ("slot", "diag", "bnhd")])
def test_write_then_read_matches_oracle(backend, norm, covariance, layout):
    _available(backend)
    dt = BACKENDS[backend]
    rng = np.random.default_rng(abs(hash((backend, norm, covariance, layout))) % 2**32)
    full = {"q": rng.normal(size=(B, N, H, D)), "k": rng.normal(size=(B, N, H, D)),
            "v": rng.normal(size=(B, N, H, DV)), "mean": rng.normal(0, 0.5, (H, K, D)),
            "log_var": rng.normal(0, 0.3, LV_SHAPE[covariance]),
            "logit": rng.normal(0, 0.3, (H, K))}
    mask = rng.random((B, N)) < 0.7
    mask[1, :20] = False
    dy = rng.normal(size=(B, N, H, DV))
    ds, dn = rng.normal(size=(B, H, K, DV)), rng.normal(size=(B, H, K))

    prog = gmagen.gma(norm=norm, covariance=covariance)
    feed = {**full, "key_mask": mask}
    ref = run(prog, feed)
    ref_grads = run_vjp(prog, feed, {prog.outputs[0]: dy, prog.state: (ds, dn)})

    leaves = {k: torch.tensor(x, dtype=dt, requires_grad=True) for k, x in full.items()}
    tok = {k: leaves[k].transpose(1, 2) if layout == "bhnd" else leaves[k] for k in "qkv"}
    mix = [leaves[k] for k in ("mean", "log_var", "logit")]
    s, n = slot_ops.slot_write(tok["k"], tok["v"], *mix, torch.tensor(mask), layout=layout,
                               backend=backend)
    y = slot_ops.slot_read(tok["q"], *mix, s, n, v_dtype=dt, norm=norm, layout=layout,
                           backend=backend)
    y = y.transpose(1, 2) if layout == "bhnd" else y
    assert y.dtype == dt and s.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    fwd_tol, grad_tol = TOL[dt]
    loss = (y * torch.tensor(dy, dtype=dt)).sum() + (s * torch.tensor(ds, dtype=s.dtype)).sum() \
        + (n * torch.tensor(dn, dtype=n.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    errors = {"y": _rel(y.detach(), ref[prog.outputs[0]]),
              "S": _rel(s.detach(), ref[prog.state][0]), "n": _rel(n.detach(), ref[prog.state][1])}
    errors.update({f"d{k}": _rel(g, ref_grads[k]) for k, g in zip(leaves, grads)})
    bad = {k: e for k, e in errors.items()
           if not e <= (fwd_tol if k in ("y", "S", "n") else grad_tol)}
    assert not bad, f"{backend} {norm}-{covariance} {layout}: relative errors {bad}"


def test_programs_are_one_kernel_each():
    """Each half compiles to exactly its own kernel: no unused read, no scan."""
    from gmagen.ir.ops import op_name
    from gmagen.ir.passes.plan import plan_program

    for prog, ops in ((slot_write_program("spherical"), ["responsibility", "slot_write"]),
                      (slot_read_program("slot", "shared"), ["responsibility", "slot_read"])):
        plan = plan_program(prog)
        assert len(plan.kernels) == 1
        assert [op_name(op) for op in plan.kernels[0].ops] == ops


def test_read_program_checks_memory_shape():
    """A memory of the wrong K is refused, naming it, before any kernel runs."""
    kern = gmagen.compile(slot_read_program(), backend="numpy")
    q = np.zeros((1, 5, 2, 4))
    mix = [np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), np.zeros((2, 3))]
    with pytest.raises(gmagen.GMAError, match="memory"):
        kern(q, *mix, (np.zeros((1, 2, 4, 6)), np.zeros((1, 2, 4))))
