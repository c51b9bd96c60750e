"""What one generated Triton kernel is specialized on (the emitters' input)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .prelude import TL_DTYPE, Shape


@dataclass(frozen=True)
class Variant:
    """Plan attributes + call specialization, everything the source depends on
    except tile sizes of the token loop (those are in the config)."""

    kind: str              # responsibility | write | read | scan | decode | reduce
    shape: Shape
    dtype: str             # token dtype: f32 | f16 | bf16
    q_covariance: str = "diag"
    k_covariance: str = "diag"
    same_mixture: bool = True
    norm: str = "row"
    eps: float = 1e-6
    mask: bool = False
    init: bool = False
    precision: str = ""  # "" = default: ieee (float32 inputs), tf32x3 (16-bit inputs)

    def describe(self) -> dict:
        d = asdict(self)
        s = d.pop("shape")
        return {**{k: v for k, v in d.items()}, "D": s["D"], "Dv": s["Dv"], "K": s["K"]}

    @property
    def wide(self) -> bool:
        return self.dtype != "f32"

    def constants(self) -> list[str]:
        """Module-level constexprs: sizes, dot dtypes and precisions.

        DATA_DT multiplies values in [0, 1] (responsibilities, causal affinities)
        with v: the input dtype keeps v exact.  WIDE_DT multiplies the state S
        (and slot weights up to 1/eps), which can exceed float16's range:
        bfloat16 for 16-bit inputs.

        The logits product cancels: x*x*A, x*Bm and c are each ~exp(-rho) while
        their sum decides near-ties between components, so plain tf32 (11 bits)
        flips ties for sharp or large inputs (measured on an H100: 6.7e-2 error,
        bf16, log_var = -8).  16-bit inputs therefore use tf32x3 (~fp32) there
        by default; float32 inputs use ieee.  ``precision="tf32"`` opts in to
        the fast, inexact product everywhere."""
        s = self.shape
        data_dt = TL_DTYPE[self.dtype]
        wide_dt = "tl.bfloat16" if self.wide else "tl.float32"
        logit_prec = self.precision or ("tf32x3" if self.wide else "ieee")
        data_prec = "tf32" if self.wide else (self.precision or "ieee")
        return [
            f"D = tl.constexpr({s.D})",
            f"DV = tl.constexpr({s.Dv})",
            f"K = tl.constexpr({s.K})",
            f"BLOCK_D = tl.constexpr({s.block_d})",
            f"BLOCK_DV = tl.constexpr({s.block_dv})",
            f"BLOCK_K = tl.constexpr({s.block_k})",
            f"EPS = tl.constexpr({float(self.eps)!r})",
            f"DATA_DT = tl.constexpr({data_dt})",
            f"WIDE_DT = tl.constexpr({wide_dt})",
            f'LOGIT_PRECISION = tl.constexpr(\"{logit_prec}\")',
            f'DATA_PRECISION = tl.constexpr(\"{data_prec}\")',
        ]
