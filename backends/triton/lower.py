"""(kernel plan, call binding, config) -> Triton launches.

Each plan kind becomes one or more generated kernels:

  responsibility  gma_responsibility_fwd
  write           gma_write_fwd over segments of N, then gma_reduce (if > 1 segment)
  read            gma_read_fwd
  scan            gma_decode_fwd when N <= decode_max_n; otherwise gma_write_fwd for
                  the states entering each segment (if > 1 segment), then gma_scan_fwd
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping

from gmagen.adapters.streams import torch_stream
from gmagen.config import Config
from gmagen.errors import DTypeError, UnsupportedFeature
from gmagen.ir import ops as _ops
from gmagen.ir.passes.plan import KernelPlan

from ..base import Executable
from . import emit_decode, emit_read, emit_responsibility, emit_scan, emit_write, launch, space
from .prelude import Shape
from .variant import Variant

log = logging.getLogger("gmagen")

_EMITTERS = {"responsibility": emit_responsibility.emit, "write": emit_write.emit,
             "reduce": emit_write.emit_reduce, "read": emit_read.emit, "scan": emit_scan.emit,
             "decode": emit_decode.emit}
_KERNEL_NAMES = {"responsibility": "gma_responsibility_fwd", "write": "gma_write_fwd",
                 "reduce": "gma_reduce", "read": "gma_read_fwd", "scan": "gma_scan_fwd",
                 "decode": "gma_decode_fwd"}


# K is the one dim a tile holds whole ([BLOCK_N, BLOCK_K] responsibilities, [BLOCK_K,
# BLOCK_DV] states): past 256 the tiles outgrow registers and shared memory on CUDA.
# D and Dv have no limit (D is streamed in chunks, Dv split over programs).
MAX_CUDA_K = 256


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def logical_strides(t: Any, layout: str) -> tuple[int, int, int, int]:
    """(b, n, h, x) element strides of a token tensor stored in ``layout``."""
    s = t.stride()
    return (s[0], s[1], s[2], s[3]) if layout == "bnhd" else (s[0], s[2], s[1], s[3])


def token_shape(t: Any, layout: str) -> tuple[int, int, int, int]:
    s = t.shape
    return (s[0], s[1], s[2], s[3]) if layout == "bnhd" else (s[0], s[2], s[1], s[3])


def empty_tokens(like: Any, B: int, N: int, H: int, X: int, layout: str, dtype: Any) -> Any:
    import torch

    shape = (B, N, H, X) if layout == "bnhd" else (B, H, N, X)
    return torch.empty(shape, dtype=dtype, device=like.device)


def token_args(prefix: str, t: Any, layout: str) -> dict[str, Any]:
    sb, sn, sh, sd = logical_strides(t, layout)
    return {f"{prefix}_ptr": t, f"{prefix}_sb": sb, f"{prefix}_sn": sn, f"{prefix}_sh": sh,
            f"{prefix}_sd": sd}


def mixture_args(prefix: str, mean: Any, log_var: Any, logit: Any) -> dict[str, Any]:
    args = {f"{prefix}_mean_ptr": mean, f"{prefix}_lv_ptr": log_var, f"{prefix}_logit_ptr": logit}
    args.update(zip((f"{prefix}_mean_sh", f"{prefix}_mean_sk", f"{prefix}_mean_sd"), mean.stride()))
    args.update({f"{prefix}_lv_s{i}": s for i, s in enumerate(log_var.stride())})
    args.update(zip((f"{prefix}_logit_sh", f"{prefix}_logit_sk"), logit.stride()))
    return args


def memory_args(prefix_s: str, prefix_n: str, mem: tuple[Any, Any], per_head: bool) -> dict:
    """Pointers and strides of a memory (S [rows, H, K, Dv], n [rows, H, K]).
    ``per_head``: strides (b, h, k, dv); else (bh, k, dv) of a contiguous [rows*H] view."""
    s, n = mem
    if per_head:
        return {f"{prefix_s}_ptr": s, **dict(zip((f"{prefix_s}_sb", f"{prefix_s}_sh",
                                                   f"{prefix_s}_sk", f"{prefix_s}_sdv"), s.stride())),
                f"{prefix_n}_ptr": n, **dict(zip((f"{prefix_n}_sb", f"{prefix_n}_sh",
                                                   f"{prefix_n}_sk"), n.stride()))}
    return {f"{prefix_s}_ptr": s, f"{prefix_s}_sbh": s.stride(1), f"{prefix_s}_sk": s.stride(2),
            f"{prefix_s}_sdv": s.stride(3), f"{prefix_n}_ptr": n, f"{prefix_n}_sbh": n.stride(1),
            f"{prefix_n}_sk": n.stride(2)}


class TritonExecutable(Executable):
    """One kernel plan, lowered for one call specialization."""

    def __init__(self, kernel: KernelPlan, binding: Any, config: Config,
                 options: Mapping[str, Any], interpret: bool, sm_count: int):
        self.kernel = kernel
        self.kind = kernel.kind
        self.layout = binding.layout
        self.interpret = interpret
        self.sm_count = sm_count
        self.config = space.validate(self.kind, config)
        self.precision = options.get("precision", "")
        main = kernel.main
        self.main = main
        self.present = binding.present
        if getattr(main, "cu_seqlens", None) in binding.present:
            raise UnsupportedFeature("triton backend: packed variable-length input (cu_seqlens) is "
                                     "not supported yet; use backend='numpy' or unpack the batch")
        self.dtype = binding.dtypes.get("T", "f32")
        if interpret and self.dtype != "f32":
            raise DTypeError(f"triton on the CPU runs in Triton's interpreter, which computes "
                             f"float32 only faithfully; got {self.dtype} inputs. Use float32 on "
                             f"the CPU or CUDA tensors")
        self.resp = {}
        for field in {"responsibility": ("x",), "write": ("r",), "read": ("r",),
                      "scan": ("rq", "rk")}[self.kind]:
            op = main if self.kind == "responsibility" else kernel.responsibility_of(field)
            if op is None:
                raise UnsupportedFeature(f"triton backend: {_ops.op_name(main)} reads %{getattr(main, field)}"
                                         f", which no fused responsibility op produces; the triton "
                                         f"kernels compute responsibilities on the fly")
            self.resp[field] = op
        self.mask = getattr(main, "key_mask", None) in binding.present
        self.init = getattr(main, "initial_state", None) in binding.present
        self._modules: dict[tuple, Any] = {}
        self._variants: dict[tuple, Variant] = {}
        self._source_dims: tuple = ()
        dims = binding.dims
        if all(d in dims for d in ("D", "Dv", "K")):
            self._source_dims = (dims["D"], dims["Dv"], dims["K"])
            self.source = self._sources(*self._source_dims)

    # -- code generation -------------------------------------------------
    def _variant(self, kind: str, D: int, Dv: int, K: int) -> Variant:
        # every launch asks (host time per call): built once per kind and sizes
        key = (kind, D, Dv, K)
        if key not in self._variants:
            self._variants[key] = self._make_variant(kind, D, Dv, K)
        return self._variants[key]

    def _make_variant(self, kind: str, D: int, Dv: int, K: int) -> Variant:
        cfg = self.config
        shape = Shape(D, Dv, K, cfg.get("block_d", space.pow2_at_least(D)),
                      cfg.get("block_dv", space.pow2_at_least(Dv)), space.pow2_at_least(K))
        r_q = self.resp.get("rq") or self.resp.get("r") or self.resp.get("x")
        r_k = self.resp.get("rk") or r_q
        same = (r_q.mean, r_q.log_var, r_q.logit) == (r_k.mean, r_k.log_var, r_k.logit)
        return Variant(kind, shape, self.dtype, r_q.covariance, r_k.covariance, same,
                       getattr(self.main, "norm", "row"), float(getattr(self.main, "eps", 0.0)),
                       self.mask, self.init, self.precision)

    def _kinds(self) -> list[str]:
        return {"responsibility": ["responsibility"], "write": ["write", "reduce"],
                "read": ["read"], "scan": ["write", "scan", "decode"]}[self.kind]

    def _module(self, kind: str, D: int, Dv: int, K: int) -> tuple[Any, str]:
        key = (kind, D, Dv, K)
        if key not in self._modules:
            src = _EMITTERS[kind](self._variant(kind, D, Dv, K), dict(self.config))
            module = launch.load(src, self.interpret)
            self._modules[key] = (getattr(module, _KERNEL_NAMES[kind]), module.__file__)
        return self._modules[key]

    def _sources(self, D: int, Dv: int, K: int) -> str:
        return "\n\n".join(_EMITTERS[k](self._variant(k, D, Dv, K), dict(self.config))
                           for k in self._kinds())

    def _launch(self, kind: str, dims: tuple[int, int, int], grid: tuple, args: dict) -> None:
        fn, path = self._module(kind, *dims)
        launch.launch(fn, grid, args, int(self.config.get("num_warps", 4)),
                      int(self.config.get("num_stages", 2)), path)

    def _segments(self, N: int, BH: int, dv_blocks: int) -> int:
        """Programs per (b, h) along N.  Measured on an H100 at N=65536, B*H=64:
        24 segments ran 25% faster than 5 for write/read (tail effects, latency
        hiding)."""
        block_n = int(self.config["block_n"])
        tiles = max(1, cdiv(N, block_n))
        fixed = int(self.config.get("segments", 0))
        if fixed:
            return min(fixed, tiles)
        # the scan ran best at ~8 per SM with tf32x3 logits (16 segments: 4.7 ms,
        # 25: 7.1 ms at N=65536); write and read at ~12
        per_sm = 8 if self.kind == "scan" else 12
        want = cdiv(per_sm * self.sm_count, BH * dv_blocks)
        return max(1, min(want, tiles))

    # -- running -----------------------------------------------------------
    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        import torch

        r = next(iter(self.resp.values()))
        x = env[r.x]
        B, N, H, D = token_shape(x, self.layout)
        mean = env[r.mean]
        K = mean.shape[1]
        Dv = env[self.main.v].shape[-1] if hasattr(self.main, "v") else (
            env[self.main.memory][0].shape[-1] if self.kind == "read" else 0)
        if not self.interpret and K > MAX_CUDA_K:
            raise UnsupportedFeature(f"triton backend on CUDA: K={K} mixture components; at most "
                                     f"{MAX_CUDA_K} are supported (a tile holds all K)")
        dims = (D, Dv or K, K)
        if dims != self._source_dims:  # regenerate the text only for new sizes
            self.source, self._source_dims = self._sources(*dims), dims
        bn = int(self.config["block_n"])
        ctx = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
        with ctx, _caller_stream(binding, x):
            if self.kind == "responsibility":
                return self._run_responsibility(env, x, B, N, H, K, dims, bn)
            if self.kind == "write":
                return self._run_write(env, x, B, N, H, Dv, K, dims, bn)
            if self.kind == "read":
                return self._run_read(env, x, B, N, H, Dv, dims, bn)
            return self._run_scan(env, x, B, N, H, Dv, K, dims, bn)

    def _mix(self, env: dict, prefix: str, op: _ops.Responsibility) -> dict:
        return mixture_args(prefix, env[op.mean], env[op.log_var], env[op.logit])

    def _run_responsibility(self, env, x, B, N, H, K, dims, bn) -> dict:
        import torch

        out = empty_tokens(x, B, N, H, K, self.layout, torch.float32)
        args = {**token_args("q", x, self.layout), **self._mix(env, "mq", self.main),
                **{k.replace("q_", "r_", 1): v for k, v in token_args("q", out, self.layout).items()},
                "N": N, "H": H, "BLOCK_N": bn}
        args["r_sk"] = args.pop("r_sd")
        self._launch("responsibility", dims, (B * H, max(1, cdiv(N, bn))), args)
        return {self.main.out: out}

    def _write(self, env, k_tok, v_tok, mask, op, B, N, H, Dv, K, dims, bn, P, ps, pn,
               seg: int = 0) -> None:
        """gma_write_fwd of segments 0..P-1 (``seg`` tokens each) into ps [P, BH, K, Dv],
        pn [P, BH, K]."""
        seg = seg or cdiv(cdiv(N, bn), max(P, 1)) * bn
        args = {**token_args("k", k_tok, self.layout), **token_args("v", v_tok, self.layout),
                **self._mix(env, "mk", op),
                "s_ptr": ps, "s_sp": ps.stride(0), "s_sbh": ps.stride(1), "s_sk": ps.stride(2),
                "s_sdv": ps.stride(3), "n_ptr": pn, "n_sp": pn.stride(0), "n_sbh": pn.stride(1),
                "n_sk": pn.stride(2), "N": N, "H": H, "SEG": seg, "BLOCK_N": bn}
        if self.mask:
            args.update(mask_ptr=mask, mask_sb=mask.stride(0), mask_sn=mask.stride(1))
        shape = self._variant("write", *dims).shape
        self._launch("write", dims, (B * H, P, shape.dv_blocks), args)

    def _run_write(self, env, k_tok, B, N, H, Dv, K, dims, bn) -> dict:
        import torch

        main: _ops.SlotWrite = self.main  # type: ignore[assignment]
        dev = k_tok.device
        shape = self._variant("write", *dims).shape
        P = self._segments(N, B * H, shape.dv_blocks)
        S = torch.empty((B, H, K, Dv), dtype=torch.float32, device=dev)
        n = torch.empty((B, H, K), dtype=torch.float32, device=dev)
        mask = env.get(main.key_mask) if self.mask else None
        if P == 1:  # one segment: write the memory directly
            self._write(env, k_tok, env[main.v], mask, self.resp["r"], B, N, H, Dv, K, dims, bn, 1,
                        S.view(1, B * H, K, Dv), n.view(1, B * H, K))
            return {main.out: (S, n)}
        ps = torch.empty((P, B * H, K, Dv), dtype=torch.float32, device=dev)
        pn = torch.empty((P, B * H, K), dtype=torch.float32, device=dev)
        self._write(env, k_tok, env[main.v], mask, self.resp["r"], B, N, H, Dv, K, dims, bn, P, ps, pn)
        args = {"ps_ptr": ps, "pn_ptr": pn, **memory_args("s", "n", (S.view(1, B * H, K, Dv),
                                                                      n.view(1, B * H, K)), False),
                "H": H, "BH": B * H, "NSEG": P}
        self._launch("reduce", dims, (B * H, 1, shape.dv_blocks), args)
        return {main.out: (S, n)}

    def _run_read(self, env, q_tok, B, N, H, Dv, dims, bn) -> dict:
        main: _ops.SlotRead = self.main  # type: ignore[assignment]
        y = empty_tokens(q_tok, B, N, H, Dv, self.layout, q_tok.dtype)
        shape = self._variant("read", *dims).shape
        P = self._segments(N, B * H, shape.dv_blocks)
        seg = cdiv(cdiv(N, bn), P) * bn
        args = {**token_args("q", q_tok, self.layout), **self._mix(env, "mq", self.resp["r"]),
                **memory_args("s", "n", env[main.memory], True), **token_args("y", y, self.layout),
                "N": N, "H": H, "SEG": seg, "BLOCK_N": bn}
        self._launch("read", dims, (B * H, P, shape.dv_blocks), args)
        return {main.out: y}

    def _run_scan(self, env, q_tok, B, N, H, Dv, K, dims, bn) -> dict:
        import torch

        main: _ops.CausalScan = self.main  # type: ignore[assignment]
        rq, rk = self.resp["rq"], self.resp["rk"]
        k_tok, v_tok = env[rk.x], env[main.v]
        dev = q_tok.device
        y = empty_tokens(q_tok, B, N, H, Dv, self.layout, v_tok.dtype)
        S = torch.empty((B, H, K, Dv), dtype=torch.float32, device=dev)
        n = torch.empty((B, H, K), dtype=torch.float32, device=dev)
        mask = env.get(main.key_mask) if self.mask else None
        shape = self._variant("scan", *dims).shape
        args = {**token_args("q", q_tok, self.layout), **token_args("k", k_tok, self.layout),
                **token_args("v", v_tok, self.layout), **token_args("y", y, self.layout),
                **memory_args("st", "nt", (S.view(1, B * H, K, Dv), n.view(1, B * H, K)), False),
                "N": N, "H": H}
        if self.mask:
            args.update(mask_ptr=mask, mask_sb=mask.stride(0), mask_sn=mask.stride(1))
        variant = self._variant("scan", *dims)
        if variant.same_mixture:
            args.update(self._mix(env, "m", rq))
        else:
            args.update(self._mix(env, "mq", rq))
            args.update(self._mix(env, "mk", rk))
        if self.init:
            args.update(memory_args("s0", "n0", env[main.initial_state], True))
        if N <= int(self.config.get("decode_max_n", 0)):
            self._launch("decode", dims, (B * H, 1, shape.dv_blocks), args)
            return {main.out: y, main.state_out: (S, n)}
        P = self._segments(N, B * H, shape.dv_blocks)
        if P > 1:
            ps = torch.empty((P - 1, B * H, K, Dv), dtype=torch.float32, device=dev)
            pn = torch.empty((P - 1, B * H, K), dtype=torch.float32, device=dev)
            # memories of segments 0..P-2 of the keys; the last one's is never needed
            self._write(env, k_tok, v_tok, mask, rk, B, N, H, Dv, K, dims, bn, P - 1, ps, pn,
                        seg=cdiv(cdiv(N, bn), P) * bn)
        else:
            ps = pn = torch.empty(1, dtype=torch.float32, device=dev)  # never read
        args.update(ps_ptr=ps, pn_ptr=pn, BH=B * H, SEG=cdiv(cdiv(N, bn), P) * bn, BLOCK_N=bn)
        self._launch("scan", dims, (B * H, P, shape.dv_blocks), args)
        return {main.out: y, main.state_out: (S, n)}


def _caller_stream(binding: Any, x: Any) -> Any:
    """Launch on the caller's stream: CuPy's current stream for CuPy arrays
    (torch's current stream is what Triton uses otherwise)."""
    if binding.framework == "cupy" and x.is_cuda:
        import cupy

        return torch_stream(cupy.cuda.get_current_stream().ptr, x.device)
    return contextlib.nullcontext()
