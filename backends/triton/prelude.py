"""Pieces of Triton source shared by every emitter.

The emitters write one kernel per specialization, with the variant resolved at
emit time: D is unrolled into ``d_chunks`` chunks of ``block_d`` (variables
suffixed 0, 1, ...), masks are emitted only where a dim is not a multiple of
its block, and the covariance kind picks which coefficient code appears.

Responsibility logits use GMA_SPEC's expanded form, in base 2 so the softmax
can use exp2 (``LOG2E`` folded into the coefficients):

    l = (x*x) @ A^T + x @ Bm^T + c,  A_kd = -exp(-rho_kd)/2,  Bm_kd = mu_kd exp(-rho_kd),
    c_k = alpha_k - 1/2 sum_d (mu_kd^2 exp(-rho_kd) + rho_kd)
"""

from __future__ import annotations

from dataclasses import dataclass

LOG2E = 1.4426950408889634

# Triton dtype of each IR dtype.
TL_DTYPE = {"f16": "tl.float16", "bf16": "tl.bfloat16", "f32": "tl.float32", "f64": "tl.float64"}


@dataclass(frozen=True)
class Shape:
    """Static sizes the kernel is specialized on, and the tiles covering them."""

    D: int
    Dv: int
    K: int
    block_d: int
    block_dv: int
    block_k: int

    @property
    def d_chunks(self) -> int:
        return -(-self.D // self.block_d)

    @property
    def dv_blocks(self) -> int:
        return -(-self.Dv // self.block_dv)

    @property
    def mask_d(self) -> bool:
        return self.D % self.block_d != 0

    @property
    def mask_k(self) -> bool:
        return self.K != self.block_k

    @property
    def mask_dv(self) -> bool:
        return self.Dv % self.block_dv != 0

    @property
    def streamed(self) -> bool:
        """Coefficients too large to stay resident (D x K past 64 x 128 floats per
        matrix: a D=K=256 head needs 512 KB): reload each D chunk per tile."""
        return self.D * self.block_k > 8192


class Code:
    """Indented source lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, *lines: str) -> "Code":
        for line in lines:
            self.lines.append(("    " * self.depth + line) if line else "")
        return self

    def indent(self) -> "Code":
        self.depth += 1
        return self

    def dedent(self) -> "Code":
        self.depth -= 1
        return self

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def header(kernel_name: str, description: str, variant: dict, config: dict) -> str:
    import triton

    from gmagen import __version__

    lines = [f"# gmagen {__version__} / triton {triton.__version__}: {kernel_name}",
             f"# {description}"]
    lines.append("# variant: " + ", ".join(f"{k}={v}" for k, v in variant.items()))
    lines.append("# config:  " + ", ".join(f"{k}={v}" for k, v in sorted(config.items())))
    return "\n".join(lines) + "\nimport triton\nimport triton.language as tl\n\n" \
        f"LOG2E = tl.constexpr({LOG2E!r})\n\n"


def mixture_args(m: str, covariance: str) -> list[str]:
    """Kernel parameters of one mixture (pointers and element strides)."""
    lv_rank = {"diag": 3, "spherical": 2, "shared": 1}[covariance]
    return ([f"{m}_mean_ptr", f"{m}_mean_sh", f"{m}_mean_sk", f"{m}_mean_sd", f"{m}_lv_ptr"]
            + [f"{m}_lv_s{i}" for i in range(lv_rank)]
            + [f"{m}_logit_ptr", f"{m}_logit_sh", f"{m}_logit_sk"])


def token_args(t: str) -> list[str]:
    return [f"{t}_ptr", f"{t}_sb", f"{t}_sn", f"{t}_sh", f"{t}_sd"]


def common_prologue(c: Code, s: Shape) -> None:
    """Index vectors over K and the D chunks, and their masks."""
    c("offs_k = tl.arange(0, BLOCK_K)")
    c("k_ok = offs_k < K" if s.mask_k else "k_ok = offs_k < BLOCK_K")
    for i in range(s.d_chunks):
        c(f"offs_d{i} = {i * s.block_d} + tl.arange(0, BLOCK_D)")
        if s.mask_d:
            c(f"d_ok{i} = offs_d{i} < D")
        c(f"dk_ok{i} = " + (f"d_ok{i}[:, None] & k_ok[None, :]" if s.mask_d else "k_ok[None, :]"))


def _coefficients(c: Code, m: str, covariance: str, i: int, with_c: bool) -> None:
    """D chunk ``i`` of mixture ``m``: ``{m}_b{i}`` (and ``{m}_a{i}`` for diag)
    [BLOCK_D, BLOCK_K] float32; with ``with_c``, also subtract its share of ``{m}_c``."""
    mu = f"{m}_mu{i}"
    c(f"{mu} = tl.load({m}_mean_ptr + h * {m}_mean_sh + offs_k[None, :] * {m}_mean_sk"
      f" + offs_d{i}[:, None] * {m}_mean_sd, mask=dk_ok{i}, other=0.0).to(tl.float32)"
      f"  # [BLOCK_D, BLOCK_K]")
    if covariance == "diag":
        c(f"{m}_rho{i} = tl.load({m}_lv_ptr + h * {m}_lv_s0 + offs_k[None, :] * {m}_lv_s1"
          f" + offs_d{i}[:, None] * {m}_lv_s2, mask=dk_ok{i}, other=0.0).to(tl.float32)",
          f"{m}_prec{i} = tl.exp(-{m}_rho{i}.to(tl.float64))  # float64: see mixture_prologue",
          f"{m}_a{i} = (-0.5 * LOG2E) * {m}_prec{i}  # multiplies x*x")
        prec = f"{m}_prec{i}"
        if with_c:
            c(f"{m}_c -= (0.5 * tl.sum({mu} * {mu} * {prec} + {m}_rho{i}, axis=0))"
              f".to(tl.float32)")
    else:
        prec = f"{m}_prec[None, :]" if covariance == "spherical" else f"{m}_prec"
        if with_c:
            c(f"{m}_c -= (0.5 * tl.sum({mu} * {mu} * {prec}, axis=0)).to(tl.float32)")
    c(f"{m}_b{i} = {mu} * {prec} * LOG2E  # multiplies x")
    # Subtract each row's mean over the real k: a term equal for every k cancels in
    # the softmax, and the centred coefficients (the spread of the precisions, not
    # their size) make the float32 products several times smaller, and so their
    # rounding error.  Centred in float64, then rounded: see mixture_prologue.
    for coef in ((f"{m}_a{i}", f"{m}_b{i}") if covariance == "diag" else (f"{m}_b{i}",)):
        c(f"{coef} = ({coef} - (tl.sum(tl.where(k_ok[None, :], {coef}, 0.0), 1) * (1.0 / K))"
          f"[:, None]).to(tl.float32)")


def mixture_prologue(c: Code, m: str, covariance: str, s: Shape) -> None:
    """Coefficients of mixture ``m`` for head ``h``: ``{m}_c`` [BLOCK_K], and per D
    chunk ``{m}_b{i}`` (and ``{m}_a{i}`` for diag) [BLOCK_D, BLOCK_K] unless the
    shape is ``streamed`` (then ``responsibilities`` reloads them per tile)."""
    c(f"# mixture {m}: coefficients of the expanded logits, base 2 ({covariance} covariance)")
    c(f"{m}_c = tl.load({m}_logit_ptr + h * {m}_logit_sh + offs_k * {m}_logit_sk, "
      f"mask=k_ok, other=0.0).to(tl.float32)")
    # The precisions and their centred coefficients are computed in float64 (K x D
    # values per program, once) and rounded afterwards.  Rounded first, a coefficient
    # carries an error of 6e-8 of the precision itself, not of its spread over k;
    # multiplied by x*x (|x|^2 ~ 2.6e4 for D = 64 and |x| ~ 20) that is ~1e-3 in the
    # logits, enough to move near-tied responsibilities past the 1e-4 contract.
    if covariance == "spherical":
        c(f"{m}_rho = tl.load({m}_lv_ptr + h * {m}_lv_s0 + offs_k * {m}_lv_s1, mask=k_ok, "
          f"other=0.0).to(tl.float32)  # [BLOCK_K]",
          f"{m}_prec = tl.exp(-{m}_rho.to(tl.float64))",
          f"{m}_asq = (-0.5 * LOG2E) * {m}_prec  # multiplies x.x",
          f"{m}_asq = ({m}_asq - tl.sum(tl.where(k_ok, {m}_asq, 0.0)) * (1.0 / K))"
          f".to(tl.float32)  # centred, see _coefficients",
          f"{m}_c -= 0.5 * D * {m}_rho")
    elif covariance == "shared":
        c(f"{m}_prec = tl.exp(-tl.load({m}_lv_ptr + h * {m}_lv_s0).to(tl.float64))",
          "# the x.x and rho terms are equal for every k and cancel in the softmax")
    for i in range(s.d_chunks):
        _coefficients(c, m, covariance, i, with_c=True)  # streamed: only c stays live
    c(f"{m}_c = tl.where(k_ok, {m}_c * LOG2E, float('-inf'))")


def token_base(c: Code, t: str) -> None:
    """64-bit base pointer of (b, h) in token tensor ``t``: offsets may pass 2^31."""
    c(f"{t}_base = {t}_ptr + b64 * {t}_sb + h64 * {t}_sh")


def load_tokens(c: Code, t: str, s: Shape, rows: str = "rows", n_ok: str = "n_ok") -> None:
    """``{t}{i}`` [BLOCK_N, BLOCK_D] float32 for each D chunk of the token rows
    (streamed shapes load their chunks inside ``responsibilities``)."""
    if s.streamed:
        return
    for i in range(s.d_chunks):
        mask = f"{n_ok}[:, None] & d_ok{i}[None, :]" if s.mask_d else f"{n_ok}[:, None]"
        c(f"{t}{i} = tl.load({t}_base + {rows}[:, None] * {t}_sn + offs_d{i}[None, :] * {t}_sd, "
          f"mask={mask}, other=0.0).to(tl.float32)")


def responsibilities(c: Code, r: str, t: str, m: str, covariance: str, s: Shape) -> None:
    """``{r}`` [BLOCK_N, BLOCK_K] float32: softmax over k of the logits of ``{t}*``."""
    if s.streamed:
        _streamed_logits(c, r, t, m, covariance, s)
    else:
        _resident_logits(c, r, t, m, covariance, s)
    c(f"{r} = tl.exp2({r} - tl.max({r}, 1)[:, None])",
      f"{r} = {r} * (1.0 / tl.sum({r}, 1))[:, None]")


def _streamed_logits(c: Code, r: str, t: str, m: str, covariance: str, s: Shape) -> None:
    """A run-time loop over D chunks (one shared-memory buffer, reused), loading
    the token chunk and the coefficients of that chunk each time."""
    c(f"{r} = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)")
    if covariance == "spherical":
        c(f"{t}_xx = tl.zeros([BLOCK_N], dtype=tl.float32)")
    c("for d0 in range(0, D, BLOCK_D):")
    c.indent()
    c("offs_dS = d0 + tl.arange(0, BLOCK_D)", "d_okS = offs_dS < D",
      "dk_okS = d_okS[:, None] & k_ok[None, :]",
      f"{t}S = tl.load({t}_base + rows[:, None] * {t}_sn + offs_dS[None, :] * {t}_sd, "
      f"mask=n_ok[:, None] & d_okS[None, :], other=0.0).to(tl.float32)")
    text = Code()
    _coefficients(text, m, covariance, 0, with_c=False)
    c(*[ln.replace("offs_d0", "offs_dS").replace("dk_ok0", "dk_okS").replace(f"{m}_mu0", f"{m}_muS")
        .replace(f"{m}_rho0", f"{m}_rhoS").replace(f"{m}_prec0", f"{m}_precS")
        .replace(f"{m}_a0", f"{m}_aS").replace(f"{m}_b0", f"{m}_bS") for ln in text.lines])
    c(f"{r} += tl.dot({t}S, {m}_bS, input_precision=LOGIT_PRECISION)")
    if covariance == "diag":
        c(f"{r} += tl.dot({t}S * {t}S, {m}_aS, input_precision=LOGIT_PRECISION)")
    if covariance == "spherical":
        c(f"{t}_xx += tl.sum({t}S * {t}S, 1)")
    c.dedent()
    c(f"{r} += {m}_c[None, :]  # logits, base 2")
    if covariance == "spherical":
        c(f"{r} += {t}_xx[:, None] * {m}_asq[None, :]")


def _resident_logits(c: Code, r: str, t: str, m: str, covariance: str, s: Shape) -> None:
    terms = [f"{m}_c[None, :]"]
    for i in range(s.d_chunks):
        terms.append(f"tl.dot({t}{i}, {m}_b{i}, input_precision=LOGIT_PRECISION)")
        if covariance == "diag":
            terms.append(f"tl.dot({t}{i} * {t}{i}, {m}_a{i}, input_precision=LOGIT_PRECISION)")
    c(f"{r} = " + " + ".join(terms) + "  # logits, base 2")
    if covariance == "spherical":
        xx = " + ".join(f"tl.sum({t}{i} * {t}{i}, 1)" for i in range(s.d_chunks))
        c(f"{r} += ({xx})[:, None] * {m}_asq[None, :]")


def kernel_start(c: Code, name: str, params: list[str], grid_doc: str) -> None:
    """``@triton.jit def name(...)``: program ids -> b, h (64-bit copies too)."""
    c("@triton.jit", f"def {name}(")
    c.indent()
    for p in params:
        c(f"{p},")
    c.dedent()
    c("):")
    c.indent()
    c(f'"""grid: {grid_doc}"""',
      "bh = tl.program_id(0)",
      "b = bh // H",
      "h = bh % H",
      "b64 = b.to(tl.int64)",
      "h64 = h.to(tl.int64)",
      "bh64 = bh.to(tl.int64)")


def dv_range(c: Code, s: Shape, pid_axis: int = 2) -> None:
    c(f"offs_dv = tl.program_id({pid_axis}) * BLOCK_DV + tl.arange(0, BLOCK_DV)")
    # one full block: a constant-true mask; otherwise bound by DV (later blocks start
    # at pid * BLOCK_DV, so "< BLOCK_DV" would drop them)
    c("dv_ok = offs_dv < DV" if s.mask_dv or s.dv_blocks > 1 else "dv_ok = offs_dv < BLOCK_DV")


def key_keep(c: Code, mask: bool, rows: str = "rows", n_ok: str = "n_ok") -> None:
    """``keep`` [BLOCK_N]: real keys (in range and, with a key mask, True)."""
    if mask:
        c(f"keep = {n_ok} & (tl.load(mask_ptr + b64 * mask_sb + {rows} * mask_sn, "
          f"mask={n_ok}, other=0) != 0)")
    else:
        c(f"keep = {n_ok}")


def mixtures(v: "object") -> list[tuple[str, str, str]]:
    """(name, covariance, which tokens use it) of the mixtures a kernel needs."""
    kind = v.kind  # type: ignore[attr-defined]
    if kind in ("write",):
        return [("mk", v.k_covariance, "k")]  # type: ignore[attr-defined]
    if kind in ("read", "responsibility"):
        return [("mq", v.q_covariance, "q")]  # type: ignore[attr-defined]
    if v.same_mixture:  # type: ignore[attr-defined]
        return [("m", v.q_covariance, "qk")]  # type: ignore[attr-defined]
    return [("mq", v.q_covariance, "q"), ("mk", v.k_covariance, "k")]  # type: ignore[attr-defined]


def causal_inputs(v: "object") -> list[str]:
    """Parameters shared by the causal kernels (scan, decode): tokens, key mask,
    mixtures, and the initial state when one is given."""
    params = token_args("q") + token_args("k") + token_args("v")
    if v.mask:  # type: ignore[attr-defined]
        params += ["mask_ptr", "mask_sb", "mask_sn"]
    for name, cov, _ in mixtures(v):
        params += mixture_args(name, cov)
    if v.init:  # type: ignore[attr-defined]
        params += ["s0_ptr", "s0_sb", "s0_sh", "s0_sk", "s0_sdv", "n0_ptr", "n0_sb", "n0_sh", "n0_sk"]
    return params


def causal_start(c: Code, v: "object", s: Shape) -> None:
    """Prologue of the causal kernels: indices, mixtures, Dv range, and the state
    ``mem`` [BLOCK_K, BLOCK_DV], ``nk`` [BLOCK_K] (initial state or zeros)."""
    common_prologue(c, s)
    for name, cov, _ in mixtures(v):
        mixture_prologue(c, name, cov, s)
    dv_range(c, s)
    if v.init:  # type: ignore[attr-defined]
        c("mem = tl.load(s0_ptr + b64 * s0_sb + h64 * s0_sh + offs_k[:, None] * s0_sk + "
          "offs_dv[None, :] * s0_sdv, mask=k_ok[:, None] & dv_ok[None, :], other=0.0)"
          ".to(tl.float32)",
          "nk = tl.load(n0_ptr + b64 * n0_sb + h64 * n0_sh + offs_k * n0_sk, mask=k_ok, "
          "other=0.0).to(tl.float32)")
    else:
        c("mem = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)",
          "nk = tl.zeros([BLOCK_K], dtype=tl.float32)")
