"""TE pieces shared by every plan's emitter: the function's parameters (token
tensors in the call's layout, mixtures, key mask, memories), the
responsibilities (GMA_SPEC "responsibility"), and the description of an emitted
graph that ``schedule.py`` and ``launch.py`` consume.

Conventions: B, N, H are symbolic (one build serves every batch, length and
head count); D, Dv, K and C are constants of the specialization.  Per-token
intermediates are [B, H, N, X] (head-major: the (b, h) pairs are the parallel
loop); tensors the caller sees are in the call's layout.  Everything computes
in float32 (16-bit tokens are read and widened; results are float32 and the
Kernel casts y to the token dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from tvm import te

from gmagen.errors import UnsupportedFeature
from gmagen.ir import ops as _ops

Dim = Union[int, str]  # a constant, or "B" / "N" / "H" resolved at call time
F32 = "float32"


@dataclass
class Param:
    """One parameter of the built function: where its array comes from (env value
    ``name``; ``part`` "S" / "n" for the halves of a memory) or goes to."""

    name: str
    part: str
    tensor: Any          # te.Tensor
    shape: tuple[Dim, ...]
    dtype: str           # NumPy dtype of the array passed


@dataclass(frozen=True)
class Stage:
    """A loop nest to schedule; ``loops`` names its leading loops: "bhn" (batch,
    head, token), "bnh" (a result in layout bnhd) or "bh" (no token loop)."""

    name: str
    loops: str


@dataclass
class Graph:
    """The TE graph of one kernel plan, built by an emitter."""

    kind: str
    layout: str
    dims: dict[str, int]
    target_kind: str = "llvm"
    token_dtype: str = F32   # q, k, v (and responsibilities passed in): float16 / bfloat16 on cuda
    B: Any = field(default_factory=lambda: te.var("B"))
    N: Any = field(default_factory=lambda: te.var("N"))
    H: Any = field(default_factory=lambda: te.var("H"))
    inputs: list[Param] = field(default_factory=list)
    outputs: list[Param] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    inline: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _cache: dict[Any, Any] = field(default_factory=dict)

    # -- parameters ------------------------------------------------------------
    def token_shape(self, x: Dim) -> tuple[Dim, ...]:
        return ("B", "N", "H", x) if self.layout == "bnhd" else ("B", "H", "N", x)

    def _sym(self, shape: tuple[Dim, ...]) -> tuple:
        return tuple({"B": self.B, "N": self.N, "H": self.H}.get(d, d)  # type: ignore[arg-type]
                     if isinstance(d, str) else d for d in shape)

    def input(self, name: str, shape: tuple[Dim, ...], part: str = "", dtype: str = F32) -> Any:
        key = ("in", name, part)
        if key not in self._cache:
            label = f"{name}_{part}" if part else name
            t = te.placeholder(self._sym(shape), dtype, name=label)
            self.inputs.append(Param(name, part, t, shape, dtype))
            self._cache[key] = t
        return self._cache[key]

    def tokens(self, name: str, x: int) -> Callable[..., Any]:
        """Accessor (b, n, h, i) -> float32 element of a [B, N, H, x] token input in
        the call's layout (16-bit tokens are widened as they are read)."""
        t = self.input(name, self.token_shape(x), dtype=self.token_dtype)
        if self.token_dtype == F32:
            def at(b, n, h, i):
                return t[b, n, h, i] if self.layout == "bnhd" else t[b, h, n, i]
            return at

        def widened(b, n, h, i):
            v = t[b, n, h, i] if self.layout == "bnhd" else t[b, h, n, i]
            return v.astype(F32)
        return widened

    def key_mask(self, name: Optional[str]) -> Optional[Callable[..., Any]]:
        """Accessor (b, n) -> bool of the key mask (passed as uint8, a view of NumPy's bool)."""
        if name is None:
            return None
        t = self.input(name, ("B", "N"), dtype="uint8")
        return lambda b, n: t[b, n] != 0

    def memory(self, name: str) -> tuple[Any, Any]:
        """(S [B, H, K, Dv], n [B, H, K]) of a memory input."""
        K, Dv = self.dims["K"], self.dims["Dv"]
        return (self.input(name, ("B", "H", K, Dv), "S"), self.input(name, ("B", "H", K), "n"))

    def output(self, name: str, tensor: Any, shape: tuple[Dim, ...], part: str = "") -> None:
        self.outputs.append(Param(name, part, tensor, shape, F32))

    def stage(self, tensor: Any, loops: str, note: str = "") -> Any:
        self.stages.append(Stage(tensor.op.name, loops))
        if note:
            self.notes.append(f"{tensor.op.name}: {note}")
        return tensor

    def params(self) -> list[Any]:
        return [p.tensor for p in self.inputs + self.outputs]

    # -- GMA_SPEC "responsibility" ------------------------------------------------
    def _mixture(self, op: _ops.Responsibility) -> tuple[Any, Callable, Callable]:
        """(mean, prec(h, k, d), c(h, k)) with prec = exp(-rho) and
        c = alpha - 1/2 sum_d rho, shared by responsibilities of one mixture."""
        key = ("mix", op.mean, op.log_var, op.logit, op.covariance)
        if key in self._cache:
            return self._cache[key]
        K, D = self.dims["K"], self.dims["D"]
        tag = f"{op.mean}_"
        mean = self.input(op.mean, ("H", K, D))
        logit = self.input(op.logit, ("H", K))
        if op.covariance == "diag":
            rho = self.input(op.log_var, ("H", K, D))
            prec_t = te.compute((self.H, K, D), lambda h, k, d: te.exp(-rho[h, k, d]),
                                name=tag + "prec")
            d = te.reduce_axis((0, D), name="d")
            rho_sum = te.compute((self.H, K), lambda h, k: te.sum(rho[h, k, d], axis=d),
                                 name=tag + "rho_sum")

            def prec(h, k, i):
                return prec_t[h, k, i]

            def const(h, k):
                return logit[h, k] - 0.5 * rho_sum[h, k]
        elif op.covariance == "spherical":
            rho = self.input(op.log_var, ("H", K))
            prec_t = te.compute((self.H, K), lambda h, k: te.exp(-rho[h, k]), name=tag + "prec")

            def prec(h, k, i):
                return prec_t[h, k]

            def const(h, k):
                return logit[h, k] - (0.5 * D) * rho[h, k]
        elif op.covariance == "shared":
            rho = self.input(op.log_var, ("H",))
            prec_t = te.compute((self.H,), lambda h: te.exp(-rho[h]), name=tag + "prec")

            def prec(h, k, i):
                return prec_t[h]

            def const(h, k):
                return logit[h, k] - (0.5 * D) * rho[h]
        else:
            raise UnsupportedFeature(f"tvm backend: covariance={op.covariance!r}, expected one "
                                     f"of {_ops.COVARIANCES}")
        self._cache[key] = (mean, prec, const)
        return self._cache[key]

    def responsibility(self, op: _ops.Responsibility, tag: str) -> Any:
        """r [B, H, N, K] of the token input op.x (oracle.responsibility):
        l_k = c_k - 1/2 sum_d (x_d - mu_kd)^2 exp(-rho_kd), in the oracle's
        unexpanded form (no cancellation for large |x|; a reduction over d either
        way), then a stable softmax over k (row max subtracted)."""
        K, D = self.dims["K"], self.dims["D"]
        x = self.tokens(op.x, D)
        mean, prec, const = self._mixture(op)
        B, N, H = self.B, self.N, self.H
        d = te.reduce_axis((0, D), name="d")

        def sq_dist(b, h, n, k):
            diff = x(b, n, h, d) - mean[h, k, d]
            return te.sum(diff * diff * prec(h, k, d), axis=d)

        maha = self.stage(te.compute((B, H, N, K), sq_dist, name=f"{tag}_maha"), "bhn",
                          "sum_d (x - mu)^2 exp(-rho)  [B, H, N, K]")

        def logits(b, h, n, k):
            return const(h, k) - 0.5 * maha[b, h, n, k]

        k1 = te.reduce_axis((0, K), name="k")
        row_max = self.stage(te.compute((B, H, N), lambda b, h, n: te.max(logits(b, h, n, k1),
                                                                         axis=k1),
                                        name=f"{tag}_max"), "bhn", "max_k l  [B, H, N]")
        k2 = te.reduce_axis((0, K), name="k")
        row_sum = self.stage(te.compute(
            (B, H, N), lambda b, h, n: te.sum(te.exp(logits(b, h, n, k2) - row_max[b, h, n]),
                                              axis=k2), name=f"{tag}_sum"), "bhn",
            "sum_k exp(l - max)  [B, H, N]")
        r = te.compute((B, H, N, K), lambda b, h, n, k: te.exp(logits(b, h, n, k)
                                                               - row_max[b, h, n])
                       / row_sum[b, h, n], name=f"{tag}_r")
        return self.stage(r, "bhn", "exp(l - max) / sum  [B, H, N, K]")

    def r_operand(self, kernel: Any, field_name: str, tag: str) -> Any:
        """The main op's responsibility operand as [B, H, N, K]: computed by the fused
        responsibility op, or read from an input in the call's layout."""
        op = kernel.responsibility_of(field_name)
        if op is not None:
            return self.responsibility(op, tag)
        K = self.dims["K"]
        get = self.tokens(getattr(kernel.main, field_name), K)
        return self.stage(te.compute((self.B, self.H, self.N, K),
                                     lambda b, h, n, k: get(b, n, h, k), name=f"{tag}_r"),
                          "bhn", "responsibilities read from an input")

    def weights(self, r: Any, mask: Optional[Callable], tag: str) -> Callable[..., Any]:
        """m_j r_jk as an accessor (b, h, n, k) (oracle._weights): masked keys write nothing."""
        if mask is None:
            return lambda b, h, n, k: r[b, h, n, k]
        return lambda b, h, n, k: te.if_then_else(mask(b, n), r[b, h, n, k], 0.0)


def check_supported(kernel: Any, binding: Any) -> None:
    """UnsupportedFeature for what the TVM lowering does not do yet."""
    cu = getattr(kernel.main, "cu_seqlens", None)
    if cu is not None and cu in binding.present:
        raise UnsupportedFeature("tvm backend: packed variable-length input (cu_seqlens) is not "
                                 "supported yet; use backend='numpy' or 'torch', or unpack the "
                                 "batch")
    for dim in ("D", "Dv", "K"):
        if dim in binding.dims and binding.dims[dim] < 1:
            raise UnsupportedFeature(f"tvm backend: {dim}={binding.dims[dim]}; the generated "
                                     f"loops need {dim} >= 1")
