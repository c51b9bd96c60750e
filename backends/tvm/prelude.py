"""TE pieces shared by every plan's emitter: the function's parameters (token
tensors in the call's layout, mixtures, key mask, memories), the
responsibilities (GMA_SPEC "responsibility"), and the description of an emitted
graph that ``schedule.py`` and ``launch.py`` consume.

Conventions: B, N, H are symbolic (one build serves every batch, length and
head count); D, Dv, K and C are constants of the specialization.  Per-token
intermediates are [B, H, N, X] (head-major: the (b, h) pairs are the parallel
loop); tensors the caller sees are in the call's layout.  Everything per token
computes in float32 (16-bit tokens are read and widened; results are float32
and the Kernel casts y to the token dtype); the mixture's logit coefficients
([H, K, D] at most) are computed in float64 and rounded to float32 first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from tvm import te, tirx

from gmagen.errors import UnsupportedFeature
from gmagen.ir import ops as _ops

Dim = Union[int, str]  # a constant, or "B" / "N" / "H" resolved at call time
F32 = "float32"
F64 = "float64"  # the mixture's coefficients, before rounding (Graph._mixture)
ROW_PARTS = 4    # threads per token of a tiled reduction over k (Graph.row_reduce)
ACC_TILE = 4     # the cuda schedule's accumulators per thread along each axis (TM = TN)
MMA = 16         # the tensor-core tile (WMMA m16n16k16) of "mma" stages: D and K padded to it
BF16 = "bfloat16"
# mma: exact bfloat16 pieces (Graph._logit_pieces).  Token pieces per dtype: x needs
# 1 (bf16: exact), 2 (f16: 11 significant bits) or 3 (f32: 24); x*x, exact in float32
# for 16-bit x (16 / 22 bits), 2, 3 or 3 pieces.  Coefficients: 3 pieces (24 bits).
X_PIECES = {"bfloat16": 1, "float16": 2, "float32": 3}
XX_PIECES = {"bfloat16": 2, "float16": 3, "float32": 3}
COEF_PIECES = 3
STATIC_SHARED = 48 * 1024  # static shared memory per block (the token pieces' scope)


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
    head, token), "bnh" (a result in layout bnhd), "bh" (no token loop) or "bhti"
    (batch, head, token tile, token in the tile: ``Graph.tile``).  ``role`` tells
    the cuda schedule (``schedule_cuda.py``) how to map a tiled stage onto a
    thread block: "fill" (a cooperative copy), "map" (elementwise), "rows" (one
    reduction per token), "gemm" (a product with a reduction: micro tiles in
    registers), "out" (the kernel's result); ``cache`` names the small tables a
    "gemm" stage stages through shared memory in chunks of its reduction.  ``group``
    names the kernel a tiled stage belongs to where one graph has several tiled
    kernels (the scan: chunk partials, then y): it is computed at the tile loop of
    the "out" stage of its group."""

    name: str
    loops: str
    role: str = ""
    cache: tuple = ()
    ndim: int = 0
    bits: int = 32
    group: str = ""


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
    tile: int = 0            # > 0: per-token stages in tiles of this many tokens (cuda)
    wide_tiles: bool = False  # config knob wide_tiles: 16-bit token tiles staged as float32
    mma_warps: int = 0       # config knob mma: the block's warps (num_threads / 32), one
                             # 16 x 16 tensor-core tile each ("mma" stages); 0: mma off
    seg_cols: dict = field(default_factory=dict)  # segment anchor -> accumulator columns
                             # per thread (TN) where not ACC_TILE (``segment_layout``)
    tile_multiple: int = 1   # tile slots of the per-token stages: ceil(N / tile) rounded up
                             # to a multiple of this (write: whole segments, ``tiles``)
    mixtures: list[tuple[str, str]] = field(default_factory=list)  # (table, its sum over k/d)
    group: str = ""          # stamped on the stages emitted next (Stage.group)
    _cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def mma(self) -> bool:
        """Whether the logits' products run on tensor cores (config knob mma)."""
        return self.mma_warps > 0

    @property
    def tile_dtype(self) -> str:
        """The dtype of the token tiles a kernel stages (x, [m v, m]): the tokens' own,
        widened at every read by a product, or (``wide_tiles``) float32, widened once
        as the tile is loaded (twice the shared memory for 16-bit tokens)."""
        return F32 if self.wide_tiles else self.token_dtype

    def to_tile(self, value: Any) -> Any:
        """A token loaded from global memory, in the dtype of the tiles (tile_dtype)."""
        return value if self.tile_dtype == self.token_dtype else value.astype(self.tile_dtype)

    def widen(self, value: Any) -> Any:
        """A value read from a token tile, as float32."""
        return value if str(value.dtype) == F32 else value.astype(F32)

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
        self.outputs.append(Param(name, part, tensor, shape, str(tensor.dtype)))

    def to_token(self, value: Any) -> Any:
        """A float32 value rounded to the token dtype, for y: the kernel writes y in
        the tokens' dtype (a float32 y would be a second, twice as large buffer
        and a cast kernel after it)."""
        return value if self.token_dtype == F32 else value.astype(self.token_dtype)

    def token_result(self, name: str, width: int, value: Any, role: str = "") -> Any:
        """The staged result ``name`` [B, N, H, width] or [B, H, N, width] in the call's
        layout, element (b, h, n, x) = value(b, h, n, x); loops "bnh" or "bhn"."""
        if self.layout == "bnhd":
            out = te.compute((self.B, self.N, self.H, width),
                             lambda b, n, h, x: value(b, h, n, x), name=name)
        else:
            out = te.compute((self.B, self.H, self.N, width),
                             lambda b, h, n, x: value(b, h, n, x), name=name)
        loops = "bnh" if self.layout == "bnhd" else "bhn"
        return self.stage(out, loops, f"{name} in layout {self.layout}", role)

    def stage(self, tensor: Any, loops: str, note: str = "", role: str = "",
              cache: tuple = ()) -> Any:
        import tvm

        self.stages.append(Stage(tensor.op.name, loops, role, cache, len(tensor.shape),
                                 int(tvm.DataType(str(tensor.dtype)).bits), self.group))
        if note:
            self.notes.append(f"{tensor.op.name}: {note}")
        return tensor

    # -- the token index space of per-token stages -------------------------------------
    # flat (tile == 0): ix = (b, h, n), stages [B, H, N, *X]; tiled: ix = (b, h, t, i)
    # with token n = t * tile + i, stages [B, H, NT, tile, *X] (NT = ceil(N / tile)):
    # what a thread block computes for one tile has a constant shape, so the cuda
    # schedule can keep it in shared memory (tokens past N are computed from zeros
    # and never written out)
    @property
    def tiles(self) -> Any:
        """Tile slots of the per-token stages: ceil(N / tile), rounded up to a multiple
        of ``tile_multiple``.  The slots past the last tile hold tokens past N, which
        every stage computes from zeros like the last tile's tail, so that a segment
        of the write plan sums whole slots with no guard (``emit_write``)."""
        from tvm import tirx

        m = self.tile_multiple
        return tirx.indexdiv(self.N + (self.tile * m - 1), self.tile * m) * m

    def token_lead(self) -> tuple:
        if self.tile:
            return (self.B, self.H, self.tiles, self.tile)
        return (self.B, self.H, self.N)

    def n_of(self, ix: tuple) -> Any:
        return ix[2] * self.tile + ix[3] if self.tile else ix[2]

    def ix_of(self, b: Any, h: Any, n: Any) -> tuple:
        """The per-token index of token n of (b, h) (flat consumers of tiled stages)."""
        if self.tile:
            from tvm import tirx

            return (b, h, tirx.indexdiv(n, self.tile), tirx.indexmod(n, self.tile))
        return (b, h, n)

    def per_token(self, name: str, rest: tuple, f: Callable[..., Any], note: str = "",
                  role: str = "", cache: tuple = ()) -> Any:
        """A stage [*token_lead, *rest] computing f(ix, *rest_indices)."""
        lead = len(self.token_lead())
        t = te.compute((*self.token_lead(), *rest),
                       lambda *i: f(tuple(i[:lead]), *i[lead:]), name=name)
        return self.stage(t, "bhti" if self.tile else "bhn", note, role, cache)

    def token_valid(self, ix: tuple) -> Any:
        return self.n_of(ix) < self.N

    def params(self) -> list[Any]:
        return [p.tensor for p in self.inputs + self.outputs]

    # -- GMA_SPEC "responsibility" ------------------------------------------------
    def _mixture(self, op: _ops.Responsibility) -> tuple[Optional[Any], Any, Any]:
        """Coefficients (a, b, c) of the expanded logits of one mixture, float32,
        shared by its responsibilities:

            diag       l_k(x) = c_k + sum_d x_d b_kd + sum_d x_d^2 a_kd    a, b [H, K, D]
            spherical  l_k(x) = c_k + sum_d x_d b_kd + |x|^2 a_k           a [H, K]
            shared     l_k(x) = c_k + sum_d x_d b_kd                       a None

        with a = -1/2 prec, b = mu prec, prec = exp(-rho), c = alpha - 1/2 sum_d
        (mu^2 prec + rho), c [H, K].  a and b are centred: their mean over k is
        subtracted for each (h, d), a term equal for every k that cancels in the
        softmax (shared: the x.x and rho terms cancel whole).  The precisions, the
        centring and c are computed in float64 and rounded to float32 once, before
        they meet the tokens.

        Why: in GMA_SPEC's direct form the logits of large inputs (x ~ 20, D = 64)
        are ~ -1.3e4, which float32 resolves to ~1e-3, enough to move near-tied
        responsibilities past the 1e-4 contract.  Expanded, the float32 products
        are x times the spread of the coefficients over k, not their size; rounded
        before centring, a coefficient would still carry 6e-8 of the precision
        itself, times |x|^2 ~ 2.6e4.  The stages are [H, K, D] or smaller, left at
        root by the schedules (tiny loops; on cuda one small kernel each)."""
        key = ("mix", op.mean, op.log_var, op.logit, op.covariance)
        if key in self._cache:
            return self._cache[key]
        K, D, H = self.dims["K"], self.dims["D"], self.H
        tag = f"{op.mean}_"
        mean = self.input(op.mean, ("H", K, D))
        logit = self.input(op.logit, ("H", K))
        cov = op.covariance
        rho_shape = {"diag": ("H", K, D), "spherical": ("H", K), "shared": ("H",)}.get(cov)
        if rho_shape is None:
            raise UnsupportedFeature(f"tvm backend: covariance={cov!r}, expected one "
                                     f"of {_ops.COVARIANCES}")
        rho = self.input(op.log_var, rho_shape)
        if self.tile:  # cuda: exp(-rho) recomputed where used (float64, [H, K, D] at most)
            class _Prec:
                def __getitem__(self, i: Any) -> Any:
                    return te.exp(-rho[i].astype(F64))
            prec_t: Any = _Prec()
        else:
            prec_t = te.compute(self._sym(rho_shape), lambda *i: te.exp(-rho[i].astype(F64)),
                                name=tag + "prec")

        def at(t: Any, h: Any, k: Any, i: Any) -> Any:
            """t[h, k, i] of a tensor shaped like log_var, broadcast over k and d."""
            return {"diag": lambda: t[h, k, i], "spherical": lambda: t[h, k],
                    "shared": lambda: t[h]}[cov]()

        def mu(h: Any, k: Any, i: Any) -> Any:
            return mean[h, k, i].astype(F64)

        def centred(name: str, value: Callable, rest: tuple, note: str) -> Any:
            """value(h, k, *rest) less its mean over k, rounded to float32 [H, K, *rest]."""
            k = te.reduce_axis((0, K), name="k")
            total = te.compute((H, *rest), lambda h, *r: te.sum(value(h, k, *r), axis=k),
                               name=f"{tag}{name}_sum_k")
            out = te.compute((H, K, *rest), lambda h, kk, *r: (
                value(h, kk, *r) - total[(h, *r)] * (1.0 / K)).astype(F32), name=tag + name)
            self.notes.append(f"{out.op.name}: {note}, centred over k (float64, then rounded)")
            self.mixtures.append((out.op.name, total.op.name))
            return out

        a = None
        if cov == "diag":
            a = centred("a", lambda h, k, i: -0.5 * prec_t[h, k, i], (D,),
                        "-1/2 exp(-rho)  [H, K, D]")
        elif cov == "spherical":
            a = centred("a", lambda h, k: -0.5 * prec_t[h, k], (), "-1/2 exp(-rho)  [H, K]")
        b = centred("b", lambda h, k, i: mu(h, k, i) * at(prec_t, h, k, i), (D,),
                    "mu exp(-rho)  [H, K, D]")

        def c_term(h: Any, k: Any, i: Any) -> Any:
            term = mu(h, k, i) * mu(h, k, i) * at(prec_t, h, k, i)
            # shared: rho is equal for every k and cancels in the softmax
            return term if cov == "shared" else term + at(rho, h, k, i).astype(F64)

        d = te.reduce_axis((0, D), name="d")
        c_sum = te.compute((H, K), lambda h, k: te.sum(c_term(h, k, d), axis=d),
                           name=tag + "c_sum")
        c = te.compute((H, K), lambda h, k: (logit[h, k].astype(F64) - 0.5 * c_sum[h, k])
                       .astype(F32), name=tag + "c")
        self.mixtures.append((c.op.name, c_sum.op.name))
        self.notes.append(f"{c.op.name}: alpha - 1/2 sum_d (mu^2 exp(-rho)"
                          + ("" if cov == "shared" else " + rho")
                          + ")  [H, K] (float64, then rounded)")
        self._cache[key] = (a, b, c)
        return self._cache[key]

    def responsibility(self, op: _ops.Responsibility, tag: str, mma: bool = True) -> Any:
        """r [*token_lead, K] of the token input op.x (oracle.responsibility): the
        logits in the expanded form with centred coefficients (``_mixture``: the
        products are float32, their coefficients rounded from float64), then a
        stable softmax over k (row max subtracted).  Tiled (cuda): the tile of x is
        a stage of its own (zeros past N), read by the logits' product; with
        ``Graph.mma`` (and ``mma``: the kernel takes it) the tile holds the token's
        bfloat16 pieces instead, and the product runs on tensor cores
        (``_mma_logits``)."""
        K, D = self.dims["K"], self.dims["D"]
        x = self.tokens(op.x, D)
        a, b, c = self._mixture(op)
        if self.mma and mma and self.tile and self._pieces_fit(op):
            return self._softmax(tag, *self._mma_logits(op, tag, a, b, c))
        d = te.reduce_axis((0, D), name="d")
        if self.tile:
            raw = self.input(op.x, self.token_shape(D), dtype=self.token_dtype)

            def load(ix, i):
                bi, h, n = ix[0], ix[1], self.n_of(ix)
                v = raw[bi, n, h, i] if self.layout == "bnhd" else raw[bi, h, n, i]
                return tirx.if_then_else(n < self.N, self.to_tile(v),
                                         tirx.const(0, self.tile_dtype))
            xt = self.per_token(f"{tag}_x", (D,), load, f"x tile  [BLOCK_N, D] ({self.tile_dtype})",
                                "fill")

            def xv(ix, i):
                return self.widen(xt[(*ix, i)])
        else:
            def xv(ix, i):
                return x(ix[0], ix[2], ix[1], i)

        def term(ix, k, i):
            h = ix[1]
            xi = xv(ix, i)
            if a is None:  # shared
                return xi * b[h, k, i]
            # x (b + x a), not x b + x^2 a: two fused multiply-adds per term with the
            # accumulator (nvcc contracts acc + x * t), against four instructions
            # (ncu on the H200: 81M unfused vs 10M fused FP32 instructions in the write kernel)
            return xi * (b[h, k, i] + xi * (a[h, k, i] if len(a.shape) == 3 else a[h, k]))

        tables = tuple(t.op.name for t in (b, a) if t is not None)
        xab = self.per_token(f"{tag}_xab", (K,), lambda ix, k: te.sum(term(ix, k, d), axis=d),
                             "sum_d x b + x^2 a  [N, K] (the logits less c)", "gemm", tables)

        def logits(ix, k):
            return c[ix[1], k] + xab[(*ix, k)]

        return self._softmax(tag, logits)

    def _softmax(self, tag: str, logits: Callable[..., Any], width: int = 0) -> Any:
        """r = softmax_k(logits(ix, k)) [*token_lead, K], stable (the row max subtracted);
        ``width`` > K: the max and the sum run over that many k, logits(ix, k) for
        k >= K being the float32 minimum (nothing)."""
        K = self.dims["K"]
        row_max = self.row_reduce(f"{tag}_max", te.max, logits, "max_k l  [N]", width)
        row_sum = self.row_reduce(f"{tag}_sum", te.sum,
                                  lambda ix, k: te.exp(logits(ix, k) - row_max[ix]),
                                  "sum_k exp(l - max)  [N]", width)
        return self.per_token(f"{tag}_r", (K,), lambda ix, k: te.exp(logits(ix, k) - row_max[ix])
                              / row_sum[ix], "exp(l - max) / sum  [N, K]", "map")

    def mma_cols(self, rows: int, cols: int) -> int:
        """mma: ``cols`` padded to whole 16 x 16 tiles, and further until the tiles of a
        [rows, cols] product are a multiple of twice the block's warps: every warp takes
        the same number of tiles (>= 2), with no predicate.  Why (TVM 0.27):
        - a tensorized tile cannot take a predicate, and a tile loop over fewer warps
          than the block's other stages bind was silently wrong (threadIdx.y bound to 4
          in a block of 8 warps, unguarded);
        - with one tile per warp the loop over a warp's tiles is gone, and StorageRewrite
          gave the float32 accumulator tile the bfloat16 token pieces' buffer (dead by
          then), failing in LowerIntrin ("tvm_access_ptr element type must match").
          Disabling that pass instead let MergeSharedMemoryAllocations put the
          responsibilities over the logits they are computed from: a race.
        K = 4 in tiles of 64 tokens: 64 columns (16 tiles for 8 warps)."""
        tr = rows // MMA
        per = 2 * self.mma_warps
        return _pad(cols, MMA * (per // math.gcd(tr, per)))

    def segment_columns(self, name: str) -> tuple[int, bool]:
        """(columns of the [v, 1] tile, whether its kernel's logits take mma) of the
        segment-partials kernel whose anchor is ``name`` (write: S_seg, scan: S_chunk).
        Dv + 1 rounded up to the schedule's accumulator tile (zeros past n's column):
        no thread's 4 x 4 accumulators straddle the end of a row, so the token loop has
        no per-column guard (at Dv = 64 the 17th column tile held one column, and nvcc
        compiled the guards of its loop to branches around every product).  With mma,
        where ``segment_layout`` finds one, the accumulator tiles are 4 x TN so that
        the threads are the block's warps (Dv = K = 64, 256 threads: 4 x 5, 80
        columns); elsewhere the logits stay SIMT: the threads are one per 4 x 4
        accumulator tile, not a whole number of warps."""
        Dv = self.dims["Dv"]
        layout = self.segment_layout(Dv + 1) if self.mma else None
        if layout is None:
            return -(-(Dv + 1) // ACC_TILE) * ACC_TILE, False
        self.seg_cols[name] = layout[0]
        return layout[1], True

    def segment_layout(self, width: int) -> Optional[tuple[int, int]]:
        """mma, in a kernel of segment partials [K, width] (one thread per ACC_TILE x TN
        accumulators: ``schedule_cuda._Sched.segment_output``): (TN, columns) such that
        the threads are exactly the block's warps, so that the kernel can run the
        logits' tensor-core tiles too; None where that would cost more than it saves
        (over 8 accumulator columns per thread: registers; or over 1.5x the columns)."""
        K = self.dims["K"]
        threads = 32 * self.mma_warps
        k_tiles = -(-K // ACC_TILE)
        if threads % k_tiles:
            return None
        e_tiles = threads // k_tiles
        tn = -(-width // e_tiles)
        if tn > 8 or 2 * e_tiles * tn > 3 * width:
            return None
        return tn, e_tiles * tn

    def _pieces_fit(self, op: _ops.Responsibility) -> bool:
        """mma: whether the tile of token pieces fits static shared memory (48 KiB per
        block: schedule_cuda.PIECES_SMEM; rows padded by 8 elements).  Where it does
        not (D = 256: 99 KB), the kernel keeps float32 SIMT logits, like mma=0."""
        D16 = _pad(self.dims["D"], MMA)
        pieces = X_PIECES[self.token_dtype] + (
            XX_PIECES[self.token_dtype] if op.covariance == "diag" else 0)
        size = self.tile * (pieces * D16 + 8) * 2
        if size > STATIC_SHARED:
            self.notes.append(f"mma: {size:,} bytes of token pieces exceed {STATIC_SHARED:,} "
                              f"of static shared memory: float32 SIMT logits")
            return False
        return True

    def _coefficient_pieces(self, op: _ops.Responsibility, a: Any, b: Any,
                            nx: int, nxx: int, K16: int) -> Any:
        """mma: the bfloat16 pieces of the coefficients, the B operand of the logits'
        product: [H, (nx + nxx) * 3 * D16, K16], row block p * 3 + l holding piece l
        of b for the tokens' x pieces (p < nx) and of a for their x*x pieces, rows
        d >= D and columns k >= K zero.  Each float32 coefficient v = v0 + v1 + v2 to
        ~2^-24 (v0 = bf16(v), v1 = bf16(v - v0), ...).  A block per token piece (a's
        pieces repeated for each x*x piece) keeps the product's indices affine, as
        the tensorized loads need; the table is read from global memory (L1 and L2
        hits), so the copies cost no shared memory.  A kernel of its own at the start
        of the call, shared by every responsibility of the mixture."""
        key = ("pieces", op.mean, op.log_var, op.logit, op.covariance, K16)
        if key in self._cache:
            return self._cache[key]
        K, D = self.dims["K"], self.dims["D"]
        D16 = _pad(D, MMA)

        def piece(h, row, k):
            blk, d = tirx.indexdiv(row, D16), tirx.indexmod(row, D16)
            p, level = tirx.indexdiv(blk, COEF_PIECES), tirx.indexmod(blk, COEF_PIECES)
            dd, kk = tirx.min(d, D - 1), tirx.min(k, K - 1)
            v = b[h, kk, dd]
            if nxx:
                v = tirx.Select(p < nx, v, a[h, kk, dd])
            pieces = _split(v, COEF_PIECES)
            out = pieces[-1]
            for lv in range(COEF_PIECES - 2, -1, -1):
                out = tirx.Select(level == lv, pieces[lv], out)
            return tirx.if_then_else(tirx.all(d < D, k < K), out, tirx.const(0, BF16))
        rows = (nx + nxx) * COEF_PIECES
        t = te.compute((self.H, rows * D16, K16), piece, name=f"{op.mean}_pieces")
        what = "b" + (" (x pieces), a (x*x pieces)" if nxx else "")
        self.stage(t, "bh", f"bfloat16 pieces of {what}: [H, {rows} x {D16}, {K16}] "
                   f"(3 per coefficient and token piece; zeros past D and K)")
        self._cache[key] = t
        return t

    def _mma_logits(self, op: _ops.Responsibility, tag: str, a: Any, b: Any,
                    c: Any) -> tuple[Callable[..., Any], int]:
        """mma: the logits from exact bfloat16 pieces on tensor cores.  The token tile
        holds NX pieces of x and (diag) NXX of x*x, [tile, (NX + NXX) * D16]
        (X_PIECES, XX_PIECES: their sums are x and x*x exactly for 16-bit tokens);
        the "mma" stage sums, for every token piece and every coefficient piece,
        piece . piece over d: x b (NX x 3 products) + x^2 a (NXX x 3), float32
        accumulation.  The pairs whose magnitudes multiply to below 2^-24 (~half
        of them) are computed too: a rectangle of pairs is one reduction.  So the
        logits are as exact as a float32 chain of FMAs (the SIMT path).  Spherical:
        |x|^2 a_k from a float32 row sum (a [H, K] is not a product over d)."""
        K, D = self.dims["K"], self.dims["D"]
        D16, K16 = _pad(D, MMA), self.mma_cols(self.tile, K)
        cov = op.covariance
        diag = cov == "diag"
        nx, nxx = X_PIECES[self.token_dtype], XX_PIECES[self.token_dtype] if diag else 0
        coef = self._coefficient_pieces(op, a, b, nx, nxx, K16)
        raw = self.input(op.x, self.token_shape(D), dtype=self.token_dtype)

        def x_of(ix, d):
            bi, h, n = ix[0], ix[1], self.n_of(ix)
            dd = tirx.min(d, D - 1)
            v = raw[bi, n, h, dd] if self.layout == "bnhd" else raw[bi, h, n, dd]
            return v.astype(F32), tirx.all(n < self.N, d < D)

        def load(ix, col):
            blk, d = tirx.indexdiv(col, D16), tirx.indexmod(col, D16)
            xv, keep = x_of(ix, d)
            xs, xxs = _split(xv, nx), _split(xv * xv, nxx) if nxx else []
            pieces = xs + xxs
            out = pieces[-1]
            for i in range(len(pieces) - 2, -1, -1):
                out = tirx.Select(blk == i, pieces[i], out)
            return tirx.if_then_else(keep, out, tirx.const(0, BF16))
        xp = self.per_token(f"{tag}_xp", ((nx + nxx) * D16,), load,
                            f"token pieces  [BLOCK_N, {nx} of x + {nxx} of x*x, x {D16}] "
                            f"(bfloat16; zeros past N and D)", "map")
        # (role "map", not "fill": the cuda schedule's 4-wide vectorized fill turned
        # the select of the piece into a vector select nvcc refuses, TVM 0.27)
        p = te.reduce_axis((0, nx + nxx), name="p")
        lv = te.reduce_axis((0, COEF_PIECES), name="l")
        d = te.reduce_axis((0, D16), name="d")

        def term(ix, k):
            # token piece p times piece lv of its coefficient (_coefficient_pieces)
            return (xp[(*ix, p * D16 + d)].astype(F32)
                    * coef[ix[1], (p * COEF_PIECES + lv) * D16 + d, k].astype(F32))
        xab = self.per_token(f"{tag}_xab", (K16,), lambda ix, k: te.sum(term(ix, k),
                             axis=[p, lv, d]),
                             f"sum over pieces of x b + x^2 a  [N, {K16}] (the logits less c; "
                             f"tensor cores)", "mma")
        if K16 > K:
            # the max and sum read every column of the product: TVM computes a stage
            # at the tile loop for the region its readers need, and a tensorized tile
            # writes all 16 columns (with K < K16 the region was K wide: a predicate
            # the WMMA tile cannot take)
            lowest = tirx.min_value(F32)

            def padded(f):
                return lambda ix, k: tirx.if_then_else(k < K, f(ix, k), lowest)
        else:
            def padded(f):
                return f
        if cov == "spherical":
            dq = te.reduce_axis((0, D), name="d")
            xsq = self.per_token(f"{tag}_xsq", (), lambda ix: te.sum(
                tirx.if_then_else(self.n_of(ix) < self.N, x_of(ix, dq)[0] * x_of(ix, dq)[0],
                                  tirx.const(0.0, F32)), axis=dq), "|x|^2  [N]", "rows")

            def logits(ix, k):
                return c[ix[1], k] + xab[(*ix, k)] + xsq[ix] * a[ix[1], k]
        else:
            def logits(ix, k):
                return c[ix[1], k] + xab[(*ix, k)]
        return padded(logits), K16

    def row_reduce(self, name: str, reduce: Any, f: Callable[..., Any], note: str,
                   extent: int = 0) -> Any:
        """A per-token reduction over k < ``extent`` (default K): te.max or te.sum of
        f(ix, k), role "rows".

        Tiled: in ROW_PARTS parts of a thread each, then over the parts, so that a
        tile's reduction takes tile * ROW_PARTS threads (the whole block at 64 tokens)
        and K / ROW_PARTS steps, not tile threads and K steps (one dependent chain of
        loads and exps per row: the longest stages of the read kernel)."""
        K = extent or self.dims["K"]
        parts = ROW_PARTS if self.tile and K >= 2 * ROW_PARTS else 1
        if parts == 1:
            k = te.reduce_axis((0, K), name="k")
            return self.per_token(name, (), lambda ix: reduce(f(ix, k), axis=k), note, "rows")
        width = -(-K // parts)
        empty = tirx.min_value(F32) if reduce is te.max else tirx.const(0.0, F32)

        def term(ix, p, kk):
            k = p * width + kk
            return f(ix, k) if parts * width == K else tirx.if_then_else(k < K, f(ix, k), empty)

        kk = te.reduce_axis((0, width), name="k")
        part = self.per_token(f"{name}_part", (parts,), lambda ix, p: reduce(
            term(ix, p, kk), axis=kk), f"{note.split('  [')[0]} in {parts} parts of k  "
            f"[N, {parts}]", "rows")
        q = te.reduce_axis((0, parts), name="p")
        return self.per_token(name, (), lambda ix: reduce(part[(*ix, q)], axis=q), note, "rows")

    def r_operand(self, kernel: Any, field_name: str, tag: str, mma: bool = True) -> Any:
        """The main op's responsibility operand as [*token_lead, K]: computed by the
        fused responsibility op, or read from an input in the call's layout.
        ``mma`` False: the kernel keeps float32 SIMT logits whatever ``Graph.mma``."""
        op = kernel.responsibility_of(field_name)
        if op is not None:
            return self.responsibility(op, tag, mma)
        K = self.dims["K"]
        get = self.tokens(getattr(kernel.main, field_name), K)

        def read(ix, k):
            n = self.n_of(ix)
            if self.tile:  # zeros past N
                return tirx.if_then_else(n < self.N, get(ix[0], n, ix[1], k),
                                         tirx.const(0.0, F32))
            return get(ix[0], n, ix[1], k)
        return self.per_token(f"{tag}_r", (K,), read, "responsibilities read from an input",
                              "fill")

    def weights(self, r: Any, mask: Optional[Callable], tag: str) -> Callable[..., Any]:
        """m_j r_jk as an accessor (b, h, n, k) (oracle._weights): masked keys write
        nothing (flat token space)."""
        if mask is None:
            return lambda b, h, n, k: r[b, h, n, k]
        return lambda b, h, n, k: te.if_then_else(mask(b, n), r[b, h, n, k], 0.0)


def _pad(x: int, m: int) -> int:
    return -(-x // m) * m


def _split(value: Any, count: int) -> list:
    """``count`` bfloat16 pieces of a float32 value, largest first: v0 = bf16(v),
    v1 = bf16(v - v0), ...  The residues are exact in float32, so the pieces sum to v
    up to the last piece's rounding (to 8 * count significant bits)."""
    pieces, rest = [], value
    for i in range(count):
        piece = rest.astype(BF16)
        pieces.append(piece)
        if i + 1 < count:
            rest = rest - piece.astype(F32)
    return pieces


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
