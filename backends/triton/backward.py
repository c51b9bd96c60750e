"""Gradients of bidirectional GMA with the Triton backward kernels (emit_backward.py).

``gma_backward`` takes the forward's inputs, its state (S, n) (O(K * Dv) per
head, what the forward saves besides its inputs) and the cotangents of y and of
the state; it recomputes responsibilities inside the kernels and returns the
gradients of q, k, v, mean, log_var and logit.  The mixture enters the kernels
as dense expanded-logit coefficients, so one kernel pair serves every
covariance kind; the chain from (dA, dBm, dc) back to (mean, log_var, logit)
is written out in ``coefficients_vjp`` (autograd records nothing inside a custom op).
"""

from __future__ import annotations

from typing import Any, Optional

from gmagen.errors import DTypeError, UnsupportedFeature

from . import emit_backward, emit_scan_backward, launch, space
from .lower import cdiv, empty_tokens, logical_strides, token_shape
from .prelude import LOG2E, Shape
from .variant import Variant

_DTYPES = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16"}
_MODULES: dict[tuple, Any] = {}


def _rho_full(log_var: Any, H: int, K: int, D: int) -> Any:
    return {3: lambda: log_var, 2: lambda: log_var[:, :, None].expand(H, K, D),
            1: lambda: log_var[:, None, None].expand(H, K, D)}[log_var.dim()]()


def coefficients(mean: Any, log_var: Any, logit: Any):
    """A, Bm [H, K, D] and c [H, K] of l = (x*x) A^T + x Bm^T + c (GMA_SPEC),
    A and Bm centred over k (a per-token constant cancels in the softmax and the
    centred products round less)."""
    H, K, D = mean.shape
    rho = _rho_full(log_var, H, K, D)
    prec = (-rho).exp()
    a = -0.5 * prec
    bm = mean * prec
    c = logit - 0.5 * (mean * mean * prec + rho).sum(-1)
    return a - a.mean(1, keepdim=True), bm - bm.mean(1, keepdim=True), c


def coefficients_vjp(mean: Any, log_var: Any, g_a: Any, g_b: Any, g_c: Any):
    """(dmean, dlog_var, dlogit) from the gradients of ``coefficients``' outputs
    (written out: this runs inside a custom op, where autograd records nothing)."""
    H, K, D = mean.shape
    rho = _rho_full(log_var, H, K, D)
    prec = (-rho).exp()
    g_a = g_a - g_a.mean(1, keepdim=True)  # through the centring
    g_b = g_b - g_b.mean(1, keepdim=True)
    gc = g_c[..., None]
    dmean = g_b * prec - gc * mean * prec
    dprec = -0.5 * g_a + g_b * mean - 0.5 * gc * mean * mean
    drho = -dprec * prec - 0.5 * gc
    dlog_var = {3: lambda: drho, 2: lambda: drho.sum(-1), 1: lambda: drho.sum((1, 2))}[log_var.dim()]()
    return dmean, dlog_var, g_c


def _tokens(prefix: str, t: Any, layout: str) -> dict:
    sb, sn, sh, sd = logical_strides(t, layout)
    return {f"{prefix}_ptr": t, f"{prefix}_sb": sb, f"{prefix}_sn": sn, f"{prefix}_sh": sh,
            f"{prefix}_sd": sd}


_EMITTERS = {"read": (emit_backward.emit_read, "gma_read_bwd"),
             "write": (emit_backward.emit_write, "gma_write_bwd"),
             "scan_chunks": (emit_scan_backward.emit_chunks, "gma_scan_bwd_chunks"),
             "scan_q": (emit_scan_backward.emit_queries, "gma_scan_bwd_q"),
             "scan_k": (emit_scan_backward.emit_keys, "gma_scan_bwd_k")}


def _kernel(kind: str, v: Variant, interpret: bool, config: dict):
    key = (kind, v, interpret, tuple(sorted(config.items())))
    if key not in _MODULES:
        emit, name = _EMITTERS[kind]
        src = emit(v, config)
        module = launch.load(src, interpret)
        _MODULES[key] = (getattr(module, name), module.__file__, src)
    return _MODULES[key]


# Every dim is resident in one program: at D = Dv = K = 64 the kernels need 83-181 KB
# of shared memory on sm_90 (tests/backends/triton/test_aot.py compiles them for
# sm_80 and sm_90 without a GPU); at 128 they need 280-560 KB, more than any GPU has.
MAX_CUDA_DIM = 64


def default_config(D: int, Dv: int, K: int, causal: bool = False) -> dict:
    """8 warps, tiles of 32 tokens (bidirectional) or chunks of 16 (causal): measured
    on the H100 at the benchmark shape (benchmarks/explore_backward.py: bidirectional
    15.6 ms vs 17.1-23.5 ms for the other tiles and warps; causal 70 ms vs 114 ms at
    32, 64 does not fit).  With 4 warps the kernels spill kilobytes of registers per
    thread (ptxas, sm_90)."""
    cfg = {"block_n": 16 if causal or max(D, Dv, K) <= 16 else 32, "num_warps": 8,
           "num_stages": 1, "segments": 0}
    if causal:
        # one state kept per 8 chunks of 16 tokens: [N/128, B*H, K, Dv] float32
        cfg["group"] = 8
    return cfg


def _setup(q, v, mean, key_mask, norm, eps, layout, precision, config, causal):
    """Checks, sizes, the Variant the kernels are specialized on, and the config."""
    from . import _probe  # decided once per process, before triton is imported

    ok, reason, interpret = _probe()
    if not ok:
        raise UnsupportedFeature(f"triton backward: {reason}")
    dtype = _DTYPES.get(str(v.dtype))
    if dtype is None or (interpret and dtype != "f32"):
        raise DTypeError(f"triton backward: v has dtype {v.dtype}; expected float32"
                         + ("" if interpret else ", float16 or bfloat16")
                         + (" (the CPU runs Triton's interpreter)" if interpret else ""))
    B, N, H, D = token_shape(q, layout)
    K, Dv = mean.shape[1], v.shape[-1]
    if not interpret and max(D, Dv, K) > MAX_CUDA_DIM:
        raise UnsupportedFeature(
            f"triton backward on CUDA: D={D}, Dv={Dv}, K={K}; the kernels keep every dim "
            f"resident and fit shared memory up to {MAX_CUDA_DIM} each (use backend='torch' "
            "for larger heads)")
    cfg = {**default_config(D, Dv, K, causal), **(config or {})}
    shape = Shape(D, Dv, K, space.pow2_at_least(D), space.pow2_at_least(Dv),
                  space.pow2_at_least(K))
    variant = Variant("backward", shape, dtype, norm=norm, eps=float(eps),
                      mask=key_mask is not None, precision=precision)
    return B, N, H, D, K, Dv, variant, interpret, cfg, int(cfg["block_n"])


def _coefficient_args(mean: Any, log_var: Any, logit: Any) -> tuple:
    """float32 mixture, and its expanded-logit coefficients in base 2 for the kernels."""
    mix = tuple(t.detach().float() for t in (mean, log_var, logit))
    a2, b2, c2 = ((t * LOG2E).contiguous() for t in coefficients(*mix))
    return mix, {"a_ptr": a2, "b_ptr": b2, "c_ptr": c2}


def _mixture_grads(pa: Any, pb: Any, pc: Any, B: int, mix: tuple, like: tuple) -> list:
    """(dmean, dlog_var, dlogit) from the kernels' partial sums [.., B*H, K, (D)]:
    partials, then batch, summed in a fixed order (deterministic)."""
    H, K, D = mix[0].shape
    g_a = pa.reshape(-1, B, H, K, D).sum(0).sum(0)
    g_b = pb.reshape(-1, B, H, K, D).sum(0).sum(0)
    g_c = pc.reshape(-1, B, H, K).sum(0).sum(0)
    return [g.to(t.dtype) for g, t in zip(coefficients_vjp(mix[0], mix[1], g_a, g_b, g_c), like)]


def _programs(tiles: int, BH: int, cfg: dict, interpret: bool, dev: Any) -> int:
    """Programs per (b, h) along N (each sums its own partials)."""
    import torch

    if cfg.get("segments"):
        return min(int(cfg["segments"]), tiles)
    if interpret:
        return min(2, tiles)  # two partials: exercises the reduction
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    return max(1, min(tiles, cdiv(8 * sms, BH)))


class _Launch:
    """What both halves of the bidirectional backward share: sizes, the specialized
    variant, the config, segments per (b, h) and the coefficient arguments."""

    def __init__(self, x: Any, v: Any, mean: Any, log_var: Any, logit: Any,
                 key_mask: Optional[Any], norm: str, eps: float, layout: str, precision: str,
                 config: Optional[dict]):
        setup = _setup(x, v, mean, key_mask, norm, eps, layout, precision, config, False)
        self.B, self.N, self.H, self.D, self.K, self.Dv, self.variant, self.interpret, \
            self.cfg, bn = setup
        self.BH = self.B * self.H
        self.dev = x.device
        tiles = max(1, cdiv(self.N, bn))
        self.P = _programs(tiles, self.BH, self.cfg, self.interpret, self.dev)
        self.mix, coef = _coefficient_args(mean, log_var, logit)
        self.common = {**coef, "N": self.N, "H": self.H, "BH": self.BH,
                       "SEG": cdiv(tiles, self.P) * bn, "BLOCK_N": bn}
        self.layout = layout

    def partials(self, halves: int) -> tuple[Any, Any, Any]:
        """Per-program mixture partial sums [halves, P, B*H, K, (D)] (float32)."""
        import torch

        pa = torch.empty((halves, self.P, self.BH, self.K, self.D), dtype=torch.float32,
                         device=self.dev)
        return pa, torch.empty_like(pa), torch.empty((halves, self.P, self.BH, self.K),
                                                     dtype=torch.float32, device=self.dev)

    def run(self, kind: str, args: dict) -> None:
        fn, path, _ = _kernel(kind, self.variant, self.interpret, self.cfg)
        launch.launch(fn, (self.BH, self.P), {**self.common, **args}, int(self.cfg["num_warps"]),
                      int(self.cfg["num_stages"]), path)


def _read_half(L: _Launch, q: Any, state: tuple[Any, Any], dy: Any, norm: str, eps: float,
               partials: tuple) -> tuple[Any, Any, Any]:
    """dq, and the gradient reaching the memory from the queries: (dL/dS, dL/dn)
    [B*H, K, (Dv)] float32.  Mixture partials of the queries into ``partials``."""
    import torch

    f32 = torch.float32
    s, n = (t.detach().to(f32).reshape(L.BH, L.K, *t.shape[3:]).contiguous() for t in state)
    ps = torch.empty((L.P, L.BH, L.K, L.Dv), dtype=f32, device=L.dev)
    pn = torch.empty((L.P, L.BH, L.K), dtype=f32, device=L.dev)
    dq = torch.empty_like(q)
    pa, pb, pc = partials
    L.run("read", {**_tokens("q", q, L.layout), **_tokens("dy", dy, L.layout),
                   **_tokens("dq", dq, L.layout), "s_ptr": s, "n_ptr": n, "ps_ptr": ps,
                   "pn_ptr": pn, "pa_ptr": pa, "pb_ptr": pb, "pc_ptr": pc})
    g_s = ps.sum(0)  # fixed order over segments: deterministic
    if norm == "row":
        g_n = pn.sum(0)
    else:  # the kernel summed dL/d(S / (n + eps))
        inv = 1.0 / (n + eps)
        g_n = -(g_s * s).sum(-1) * inv * inv
        g_s = g_s * inv[..., None]
    return dq, g_s, g_n


def _write_half(L: _Launch, k: Any, v: Any, key_mask: Optional[Any], g_s: Any, g_n: Any,
                partials: tuple) -> tuple[Any, Any]:
    """dk, dv from the gradient of the memory (dL/dS, dL/dn) [B*H, K, (Dv)] float32;
    mixture partials of the keys into ``partials``."""
    import torch

    dk = torch.empty_like(k)
    dv = empty_tokens(v, L.B, L.N, L.H, L.Dv, L.layout, v.dtype)
    pa, pb, pc = partials
    args = {**_tokens("k", k, L.layout), **_tokens("v", v, L.layout),
            **_tokens("dk", dk, L.layout), **_tokens("dv", dv, L.layout),
            "ds_ptr": g_s.contiguous(), "dn_ptr": g_n.contiguous(), "pa_ptr": pa, "pb_ptr": pb,
            "pc_ptr": pc}
    if key_mask is not None:
        args.update(mask_ptr=key_mask, mask_sb=key_mask.stride(0), mask_sn=key_mask.stride(1))
    L.run("write", args)
    return dk, dv


def _state_grad(L: _Launch, ds: Optional[Any], dn: Optional[Any]) -> tuple[Any, Any]:
    """An external (dS, dn) as [B*H, K, (Dv)] float32; None counts as zeros."""
    import torch

    f32 = torch.float32
    g_s = (torch.zeros((L.BH, L.K, L.Dv), dtype=f32, device=L.dev) if ds is None
           else ds.to(f32).reshape(L.BH, L.K, L.Dv))
    g_n = (torch.zeros((L.BH, L.K), dtype=f32, device=L.dev) if dn is None
           else dn.to(f32).reshape(L.BH, L.K))
    return g_s, g_n


def gma_backward(q: Any, k: Any, v: Any, mean: Any, log_var: Any, logit: Any,
                 key_mask: Optional[Any], state: tuple[Any, Any], dy: Optional[Any],
                 dstate: tuple[Optional[Any], Optional[Any]], *, norm: str = "row",
                 eps: float = 1e-6, layout: str = "bnhd", precision: str = "",
                 config: Optional[dict] = None) -> list[Any]:
    """[dq, dk, dv, dmean, dlog_var, dlogit] of bidirectional GMA (torch tensors)."""
    import torch

    L = _Launch(q, v, mean, log_var, logit, key_mask, norm, eps, layout, precision, config)
    dy = torch.zeros_like(v) if dy is None else dy
    pa, pb, pc = L.partials(2)  # [queries, keys]
    dq, g_s, g_n = _read_half(L, q, state, dy, norm, eps, (pa[0], pb[0], pc[0]))
    ds_ext, dn_ext = dstate
    if ds_ext is not None:
        g_s = g_s + ds_ext.to(torch.float32).reshape(L.BH, L.K, L.Dv)
    if dn_ext is not None:
        g_n = g_n + dn_ext.to(torch.float32).reshape(L.BH, L.K)
    dk, dv = _write_half(L, k, v, key_mask, g_s, g_n, (pa[1], pb[1], pc[1]))
    return [dq, dk, dv] + _mixture_grads(pa, pb, pc, L.B, L.mix, (mean, log_var, logit))


def slot_read_backward(q: Any, mean: Any, log_var: Any, logit: Any, state: tuple[Any, Any],
                       dy: Any, *, norm: str = "row", eps: float = 1e-6, layout: str = "bnhd",
                       precision: str = "", config: Optional[dict] = None) -> list[Any]:
    """[dq, dmean, dlog_var, dlogit, dS, dn] of y = slot_read(responsibility(q), (S, n)):
    the read half of ``gma_backward``, for a memory that came from elsewhere (context
    parallelism: the memory summed over ranks)."""
    # dy stands in for v: it has v's dtype and Dv, which is all _setup reads of it
    L = _Launch(q, dy, mean, log_var, logit, None, norm, eps, layout, precision, config)
    partials = L.partials(1)
    dq, g_s, g_n = _read_half(L, q, state, dy, norm, eps, tuple(p[0] for p in partials))
    s, n = state
    return ([dq] + _mixture_grads(*partials, L.B, L.mix, (mean, log_var, logit))
            + [g_s.view(s.shape).to(s.dtype), g_n.view(n.shape).to(n.dtype)])


def slot_write_backward(k: Any, v: Any, mean: Any, log_var: Any, logit: Any,
                        key_mask: Optional[Any], dstate: tuple[Optional[Any], Optional[Any]], *,
                        layout: str = "bnhd", precision: str = "",
                        config: Optional[dict] = None) -> list[Any]:
    """[dk, dv, dmean, dlog_var, dlogit] of (S, n) = slot_write(responsibility(k), v)
    given (dL/dS, dL/dn): the write half of ``gma_backward``."""
    L = _Launch(k, v, mean, log_var, logit, key_mask, "row", 1e-6, layout, precision, config)
    partials = L.partials(1)
    g_s, g_n = _state_grad(L, *dstate)
    dk, dv = _write_half(L, k, v, key_mask, g_s, g_n, tuple(p[0] for p in partials))
    return [dk, dv] + _mixture_grads(*partials, L.B, L.mix, (mean, log_var, logit))


def sources(D: int, Dv: int, K: int, dtype: str = "f32", norm: str = "row",
            mask: bool = False, causal: bool = False) -> str:
    """The generated backward kernels for one specialization (for reading)."""
    shape = Shape(D, Dv, K, space.pow2_at_least(D), space.pow2_at_least(Dv),
                  space.pow2_at_least(K))
    variant = Variant("backward", shape, dtype, norm=norm, mask=mask)
    cfg = default_config(D, Dv, K, causal)
    kinds = ("scan_chunks", "scan_q", "scan_k") if causal else ("read", "write")
    return "\n\n".join(_EMITTERS[kind][0](variant, cfg) for kind in kinds)


def gma_backward_causal(q: Any, k: Any, v: Any, mean: Any, log_var: Any, logit: Any,
                        key_mask: Optional[Any], initial_state: Optional[tuple[Any, Any]],
                        dy: Optional[Any], dstate: tuple[Optional[Any], Optional[Any]], *,
                        norm: str = "row", eps: float = 1e-6, layout: str = "bnhd",
                        precision: str = "", config: Optional[dict] = None) -> list[Any]:
    """[dq, dk, dv, dmean, dlog_var, dlogit, dS0, dn0] of causal GMA (dS0, dn0 None
    without an initial state).  Chunks of C = block_n tokens, grouped into one
    segment per program (emit_scan_backward).  What is kept between kernels: the
    state entering each group of ``group`` chunks relative to its segment,
    [chunks / group, B*H, K, Dv] float32, and per-segment sums; the key kernel
    has a scratch of ``group`` states per program."""
    import torch

    B, N, H, D, K, Dv, variant, interpret, cfg, bn = _setup(
        q, v, mean, key_mask, norm, eps, layout, precision, config, True)
    dev, f32 = q.device, torch.float32
    BH = B * H
    nch = max(1, cdiv(N, bn))
    group = int(cfg.get("group", 1))
    groups = cdiv(nch, group)
    P = _programs(groups, BH, cfg, interpret, dev)
    cps = group * cdiv(groups, P)  # every segment starts on a group
    P = cdiv(nch, cps)

    mix, coef = _coefficient_args(mean, log_var, logit)
    dy = torch.zeros_like(v) if dy is None else dy
    args = {**_tokens("q", q, layout), **_tokens("k", k, layout), **_tokens("v", v, layout),
            **_tokens("dy", dy, layout), **coef, "N": N, "H": H,
            "BH": BH, "NCH": nch, "CPS": cps, "BLOCK_N": bn, "GROUP": group}
    if key_mask is not None:
        args.update(mask_ptr=key_mask, mask_sb=key_mask.stride(0), mask_sn=key_mask.stride(1))
    warps, stages = int(cfg["num_warps"]), int(cfg["num_stages"])

    def run(kind: str, extra: dict) -> None:
        fn, path, _ = _kernel(kind, variant, interpret, cfg)
        launch.launch(fn, (BH, P), {**args, **extra}, warps, stages, path)

    # the state entering each group of chunks (relative to its segment), segment totals
    rs = torch.empty((groups, BH, K, Dv), dtype=f32, device=dev)
    rn = torch.empty((groups, BH, K), dtype=f32, device=dev)
    ts = torch.empty((P, BH, K, Dv), dtype=f32, device=dev)
    tn = torch.empty((P, BH, K), dtype=f32, device=dev)
    run("scan_chunks", {"rs_ptr": rs, "rn_ptr": rn, "ts_ptr": ts, "tn_ptr": tn})
    # the state entering each segment: S0 + the totals of the segments before it
    seg_s, seg_n = _exclusive(ts), _exclusive(tn)
    if initial_state is not None:
        seg_s += initial_state[0].detach().to(f32).reshape(1, BH, K, Dv)
        seg_n += initial_state[1].detach().to(f32).reshape(1, BH, K)
    seg_args = {"ss_ptr": seg_s, "sn_ptr": seg_n}

    pa = torch.empty((2, P, BH, K, D), dtype=f32, device=dev)  # [queries, keys]
    pb = torch.empty_like(pa)
    pc = torch.empty((2, P, BH, K), dtype=f32, device=dev)
    qs, qn = torch.empty_like(ts), torch.empty_like(tn)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv = empty_tokens(v, B, N, H, Dv, layout, v.dtype)
    run("scan_q", {**seg_args, "qs_ptr": qs, "qn_ptr": qn, "pa_ptr": pa[0], "pb_ptr": pb[0],
                   "pc_ptr": pc[0], **_tokens("dq", dq, layout)})
    # the state gradient leaving each segment: dstate + what later segments' queries add
    g_s, g_n = _exclusive(qs.flip(0)).flip(0), _exclusive(qn.flip(0)).flip(0)
    ds0, dn0 = qs.sum(0), qn.sum(0)  # leaving the initial state
    ds_ext, dn_ext = dstate
    if ds_ext is not None:
        ext = ds_ext.to(f32).reshape(BH, K, Dv)
        g_s += ext
        ds0 += ext
    if dn_ext is not None:
        ext_n = dn_ext.to(f32).reshape(BH, K)
        g_n += ext_n
        dn0 += ext_n
    # per program: the states entering each chunk of the group it is working on
    xs = torch.empty((P, BH, group, K, Dv), dtype=f32, device=dev)
    xn = torch.empty((P, BH, group, K), dtype=f32, device=dev)
    run("scan_k", {**seg_args, "rs_ptr": rs, "rn_ptr": rn, "xs_ptr": xs, "xn_ptr": xn, "gs_ptr": g_s.contiguous(), "gn_ptr": g_n.contiguous(),
                   "pa_ptr": pa[1], "pb_ptr": pb[1], "pc_ptr": pc[1],
                   **_tokens("dk", dk, layout), **_tokens("dv", dv, layout)})
    grads = [dq, dk, dv] + _mixture_grads(pa, pb, pc, B, mix, (mean, log_var, logit))
    if initial_state is None:
        return grads + [None, None]
    s0, n0 = initial_state
    return grads + [ds0.view(B, H, K, Dv).to(s0.dtype), dn0.view(B, H, K).to(n0.dtype)]


def _exclusive(t: Any) -> Any:
    """Exclusive prefix sum along dim 0 (a fresh tensor; no subtraction, so exact
    zeros stay zeros)."""
    import torch

    out = torch.zeros_like(t)
    if t.shape[0] > 1:
        torch.cumsum(t[:-1], 0, out=out[1:])
    return out
