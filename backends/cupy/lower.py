"""(kernel plan, call binding, config, arch) -> generated CUDA, compiled, and its launches.

Each plan kind becomes one or more generated kernels (one NVRTC unit each):

  responsibility  gma_responsibility_fwd
  write           gma_write_fwd over segments of N, then gma_reduce (if > 1 segment)
  read            gma_read_fwd
  scan            gma_write_fwd for the states entering segments 1.. (if > 1 segment),
                  then gma_scan_fwd

Before them, ``gma_coefficients`` runs once per call for each mixture the plan
reads (the queries', and the keys' when they have their own), writing the
centred logit coefficients into a float32 scratch buffer that every kernel of
the call reads (mixture.py's docstring says why they are computed apart).

The config's ``mma`` knob picks, for all of a plan's tiled kernels, tensor
cores (1, 16-bit tokens only; mma.py) or CUDA cores (0; space.py).

Lowering generates and compiles for ``arch`` (the option, else the device's),
which needs no GPU; running loads the cubins on the call's device and
launches on the caller's stream.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

from gmagen.adapters.streams import torch_stream
from gmagen.config import Config
from gmagen.errors import UnsupportedFeature
from gmagen.ir import ops as _ops
from gmagen.ir.passes.plan import KernelPlan

from ..base import Executable
from . import (emit_coefficients, emit_read, emit_responsibility, emit_scan, emit_write, launch,
               space)
from .nvrtc import Compiled
from .mixture import coefficient_arrays
from .prelude import Emitted, Variant

_EMITTERS = {"responsibility": emit_responsibility.emit, "write": emit_write.emit,
             "reduce": emit_write.emit_reduce, "read": emit_read.emit, "scan": emit_scan.emit,
             "coefficients": emit_coefficients.emit}
_UNITS = {"responsibility": ["responsibility"], "write": ["write", "reduce"], "read": ["read"],
          "scan": ["write", "scan"]}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def segment_count(kind: str, N: int, block_n: int, fixed: int, blocks: int, sm_count: int) -> int:
    """Segments per (b, h, Dv block) along N: ``fixed`` (the config's segments) or, at 0,
    enough to put a few blocks on each SM beside the ``blocks`` (b, h, Dv blocks) there
    are; never more than N's tiles, and never an empty one (each gets whole tiles)."""
    tiles = max(1, cdiv(N, block_n))
    if fixed:
        want = fixed
    else:
        # The write's segments add partial memories that a reduction (or the scan's
        # entering state) sums again: they fill the GPU once, 2 blocks of 4 warps per SM,
        # rounded down to whole waves (a block past the wave would run alone after it).
        # The read's segments cost nothing but their blocks: 8 per SM.  H100, B*H=64:
        # the scan at N=1024 / 4096 / 65536 took 0.100 / 0.303 / 4.46 ms with 4
        # segments, 0.185 / 0.405 / 4.57 with 16; the write 0.098 / 2.70 ms at N=1024 /
        # 65536 with 8 segments and 4 warps, against 0.128 / 3.02 ms with 17 and 8 warps
        if kind == "read":
            want = cdiv(8 * sm_count, blocks)
        else:
            want = max(1, 2 * sm_count // blocks)
    want = max(1, min(want, tiles, 65535))
    return cdiv(tiles, cdiv(tiles, want))


def token_args(prefix: str, t: Any, layout: str) -> dict[str, Any]:
    """Pointer and (b, n, h, x) element strides of a token tensor stored in ``layout``."""
    s = launch.strides(t)
    sb, sn, sh, sd = (s[0], s[1], s[2], s[3]) if layout == "bnhd" else (s[0], s[2], s[1], s[3])
    return {f"{prefix}_ptr": t, f"{prefix}_sb": sb, f"{prefix}_sn": sn, f"{prefix}_sh": sh,
            f"{prefix}_sd": sd}


def token_shape(t: Any, layout: str) -> tuple[int, int, int, int]:
    s = tuple(t.shape)
    return (s[0], s[1], s[2], s[3]) if layout == "bnhd" else (s[0], s[2], s[1], s[3])


def mixture_args(m: str, mean: Any, log_var: Any, logit: Any) -> dict[str, Any]:
    args: dict[str, Any] = {f"{m}_mean": mean, f"{m}_lv": log_var, f"{m}_logit": logit}
    args.update(zip((f"{m}_mean_sh", f"{m}_mean_sk", f"{m}_mean_sd"), launch.strides(mean)))
    args.update({f"{m}_lv_s{i}": s for i, s in enumerate(launch.strides(log_var))})
    args.update(zip((f"{m}_logit_sh", f"{m}_logit_sk"), launch.strides(logit)))
    return args


def caller_stream(binding: Any, device: int) -> Any:
    """CuPy's current stream for CuPy callers; torch's current stream for torch
    callers (the Kernel hands their tensors over through DLPack)."""
    import cupy

    if binding.framework == "torch":
        import torch

        stream = torch.cuda.current_stream(device)
        # the CUDA stream protocol (__cuda_stream__: CuPy >= 14, recent torch) where
        # both sides have it: CuPy 14 deprecates ExternalStream, which older ones need
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
            return cupy.cuda.Stream.from_external(stream)
        return cupy.cuda.ExternalStream(stream.cuda_stream, device)
    return cupy.cuda.get_current_stream()


class CupyExecutable(Executable):
    """One kernel plan, generated and compiled for one call specialization."""

    def __init__(self, kernel: KernelPlan, binding: Any, config: Config, arch: str):
        self.kernel = kernel
        self.kind = kernel.kind
        self.main = kernel.main
        self.kernel_plan = kernel
        self.layout = binding.layout
        self.arch = arch
        if getattr(self.main, "cu_seqlens", None) in binding.present:
            raise UnsupportedFeature("cupy backend: packed variable-length input (cu_seqlens) is "
                                     "not supported yet; use backend='numpy' or unpack the batch")
        self.resp: dict[str, _ops.Responsibility] = {}
        for field, op in _responsibility_ops(kernel).items():
            if op is None:
                raise UnsupportedFeature(f"cupy backend: {_ops.op_name(self.main)} reads "
                                         f"%{getattr(self.main, field)}, which no fused "
                                         f"responsibility op produces; the cupy kernels compute "
                                         f"responsibilities on the fly")
            self.resp[field] = op  # type: ignore[assignment]
        # the mixtures whose coefficients a call computes: "q", and "k" when the keys
        # have their own (a scan of one mixture reads the queries' for both)
        rq = self.resp.get("rq") or self.resp.get("r") or self.resp.get("x")
        rk = self.resp.get("rk")
        role = "k" if self.kind == "write" else "q"
        self.mixture_ops: dict[str, _ops.Responsibility] = {role: rq}  # type: ignore[dict-item]
        if rk is not None and _mixture(rk) != _mixture(rq):
            self.mixture_ops["k"] = rk
        dims = binding.dims
        D, K = dims["D"], dims["K"]
        Dv = dims.get("Dv", K)
        if K > space.MAX_K:
            raise UnsupportedFeature(f"cupy backend: K={K} mixture components; at most "
                                     f"{space.MAX_K} are supported (a tile holds all K)")
        self.dims = (D, Dv, K)
        self.variants = {f"coefficients_{role}": emit_coefficients.coefficient_variant(
            D, K, binding.dtypes.get("P", "f32"), op.covariance)
            for role, op in self.mixture_ops.items()}
        self.variants.update({unit: self._variant(unit, binding) for unit in _UNITS[self.kind]})
        main_variant = self.variants["scan" if self.kind == "scan" else _UNITS[self.kind][0]]
        self.config = space.validate(self.kind, config, main_variant)
        self.unit_configs = {u: self._unit_config(v) for u, v in self.variants.items()}
        self.emitted: dict[str, Emitted] = {
            u: _EMITTERS[v.kind](v, space.tiles_of(self.unit_configs[u]), dict(self.unit_configs[u]))
            for u, v in self.variants.items()}
        self.compiled: dict[str, Compiled] = {u: launch.build(e, arch)
                                              for u, e in self.emitted.items()}
        self.source = "\n\n".join(e.source for e in self.emitted.values())

    @property
    def resources(self) -> dict[str, Any]:
        """Kernel name -> ptxas' Resources (registers, spills, static smem)."""
        return {name: res for c in self.compiled.values() for name, res in c.resources.items()}

    def _unit_config(self, v: Variant) -> Config:
        """The tiles of one kernel: the plan's config, except the causal scan's
        segment memories under mma=2 (the scan's 4 warps of 16 tokens are not the
        write kernel's warp grid): the write kernel's own default."""
        if self.kind == "scan" and v.kind == "write" and self.config.get("mma") == 2:
            return space.default_config("write", v.D, v.Dv, v.K, v.dtype, variant=v)
        return self.config

    def _variant(self, unit: str, binding: Any) -> Variant:
        v = unit_variant(self.kernel_plan, binding, unit)
        assert v is not None  # __init__ checked the responsibilities
        return v

    # -- running -------------------------------------------------------------
    def _launch(self, unit: str, grid: tuple, args: dict, stream: Any, device: int) -> None:
        emitted = self.emitted[unit]
        fn = launch.function(self.compiled[unit], emitted.name, device)
        launch.launch(fn, emitted, grid, args, stream, device)

    def _segments(self, N: int, BH: int, dv_blocks: int, device: int) -> int:
        return segment_count(self.kind, N, int(self.config["block_n"]),
                             int(self.config.get("segments", 0)), BH * dv_blocks,
                             _sm_count(device))

    def run(self, env: dict[str, Any], binding: Any) -> dict[str, Any]:
        import cupy

        r = next(iter(self.resp.values()))
        x = env[r.x]
        device = binding.device[1]
        with cupy.cuda.Device(device):
            stream = caller_stream(binding, device)
            with stream, _torch_stream(x, stream):
                coef = self._coefficients(env, x, token_shape(x, self.layout)[2], stream, device)
                run = {"responsibility": self._run_responsibility, "write": self._run_write,
                       "read": self._run_read, "scan": self._run_scan}[self.kind]
                return run(env, x, coef, stream, device)

    def _coefficients(self, env: dict, like: Any, H: int, stream: Any, device: int) -> dict:
        """gma_coefficients of each mixture: role -> {name: float32 array} (a, b, c,
        asq; see mixture.coefficient_arrays), all of a mixture in one scratch buffer."""
        D, _, K = self.dims
        sizes = {"HKD": H * K * D, "HK": H * K}
        out: dict[str, dict[str, Any]] = {}
        for role, op in self.mixture_ops.items():
            unit = f"coefficients_{role}"
            arrays = coefficient_arrays(op.covariance)
            buf = launch.empty(like, (sum(sizes[shape] for _, shape in arrays),), "f32")
            views, at = {}, 0
            for name, shape in arrays:
                views[name] = buf[at:at + sizes[shape]]
                at += sizes[shape]
            args = mixture_args("m", env[op.mean], env[op.log_var], env[op.logit])
            args.update({f"{name}_ptr": view for name, view in views.items()})
            nwarps = self.emitted[unit].threads // 32
            self._launch(unit, (H, cdiv(D, 32) + cdiv(K, nwarps), 1), args, stream, device)
            out[role] = views
        return out

    @staticmethod
    def _mix(prefix: str, coefficients: dict[str, Any]) -> dict:
        """Kernel arguments of mixture ``prefix``: its coefficients."""
        return {f"{prefix}_{name}": view for name, view in coefficients.items()}

    def _run_responsibility(self, env, x, coef, stream, device) -> dict:
        B, N, H, _ = token_shape(x, self.layout)
        K = self.dims[2]
        out = launch.empty(x, (B, N, H, K) if self.layout == "bnhd" else (B, H, N, K), "f32")
        ra = token_args("r", out, self.layout)
        args = {**token_args("q", x, self.layout), **self._mix("mq", coef["q"]),
                "r_ptr": out, "r_sb": ra["r_sb"], "r_sn": ra["r_sn"], "r_sh": ra["r_sh"],
                "r_sk": ra["r_sd"], "N": N, "H": H}
        bn = int(self.config["block_n"])
        self._launch("responsibility", (max(1, cdiv(N, bn)), B * H, 1), args, stream, device)
        return {self.main.out: out}

    def _write(self, k_tok, v_tok, mask, ck, N, H, BH, P, seg, s, n, s_strides, n_strides,
               stream, device) -> None:
        """gma_write_fwd of segments 0..P-1 (``seg`` tokens each) into s / n; ``ck``:
        the coefficients of the keys' mixture."""
        args = {**token_args("k", k_tok, self.layout), **token_args("v", v_tok, self.layout),
                **self._mix("mk", ck), "s_ptr": s, "n_ptr": n, "N": N, "H": H, "SEG": seg}
        args.update(zip(("s_sp", "s_sbh", "s_sk", "s_sdv"), s_strides))
        args.update(zip(("n_sp", "n_sbh", "n_sk"), n_strides))
        if mask is not None:
            args.update(mask_ptr=mask, mask_sb=launch.strides(mask)[0],
                        mask_sn=launch.strides(mask)[1])
        dvb = cdiv(self.dims[1], int(self.unit_configs["write"]["block_dv"]))
        self._launch("write", (BH, P, dvb), args, stream, device)

    def _run_write(self, env, k_tok, coef, stream, device) -> dict:
        main: _ops.SlotWrite = self.main  # type: ignore[assignment]
        B, N, H, _ = token_shape(k_tok, self.layout)
        D, Dv, K = self.dims
        BH = B * H
        bn, bdv = int(self.config["block_n"]), int(self.config["block_dv"])
        P = self._segments(N, BH, cdiv(Dv, bdv), device)
        seg = cdiv(cdiv(N, bn), P) * bn
        S = launch.empty(k_tok, (B, H, K, Dv), "f32")
        n = launch.empty(k_tok, (B, H, K), "f32")
        mask = env.get(main.key_mask) if self.variants["write"].mask else None
        v_tok = env[main.v]
        if P == 1:  # one segment: write the memory directly
            self._write(k_tok, v_tok, mask, coef["k"], N, H, BH, 1, seg, S, n,
                        (0, K * Dv, Dv, 1), (0, K, 1), stream, device)
            return {main.out: (S, n)}
        ps = launch.empty(k_tok, (P, BH, K, Dv), "f32")
        pn = launch.empty(k_tok, (P, BH, K), "f32")
        self._write(k_tok, v_tok, mask, coef["k"], N, H, BH, P, seg, ps, pn,
                    (BH * K * Dv, K * Dv, Dv, 1), (BH * K, K, 1), stream, device)
        args = {"ps": ps, "pn": pn, "s_ptr": S, "s_sbh": K * Dv, "s_sk": Dv, "s_sdv": 1,
                "n_ptr": n, "n_sbh": K, "n_sk": 1, "BH": BH, "NSEG": P}
        self._launch("reduce", (BH, cdiv(K * Dv, self.emitted["reduce"].threads), 1), args,
                     stream, device)
        return {main.out: (S, n)}

    def _run_read(self, env, q_tok, coef, stream, device) -> dict:
        main: _ops.SlotRead = self.main  # type: ignore[assignment]
        B, N, H, _ = token_shape(q_tok, self.layout)
        D, Dv, K = self.dims
        S, n = env[main.memory]
        y = launch.empty(q_tok, (B, N, H, Dv) if self.layout == "bnhd" else (B, H, N, Dv))
        bn, bdv = int(self.config["block_n"]), int(self.config["block_dv"])
        dvb = cdiv(Dv, bdv)
        P = self._segments(N, B * H, dvb, device)
        seg = cdiv(cdiv(N, bn), P) * bn
        args = {**token_args("q", q_tok, self.layout), **self._mix("mq", coef["q"]),
                **token_args("y", y, self.layout), "s_ptr": S, "n_ptr": n, "N": N, "H": H,
                "SEG": seg}
        args.update(zip(("s_sb", "s_sh", "s_sk", "s_sdv"), launch.strides(S)))
        args.update(zip(("n_sb", "n_sh", "n_sk"), launch.strides(n)))
        self._launch("read", (B * H, P, dvb), args, stream, device)
        return {main.out: y}

    def _run_scan(self, env, q_tok, coef, stream, device) -> dict:
        main: _ops.CausalScan = self.main  # type: ignore[assignment]
        k_tok, v_tok = env[self.resp["rk"].x], env[main.v]
        cq = coef["q"]
        ck = coef.get("k", cq)  # one mixture: the queries' coefficients serve the keys
        B, N, H, _ = token_shape(q_tok, self.layout)
        D, Dv, K = self.dims
        BH = B * H
        v = self.variants["scan"]
        y = launch.empty(v_tok, (B, N, H, Dv) if self.layout == "bnhd" else (B, H, N, Dv))
        S = launch.empty(q_tok, (B, H, K, Dv), "f32")
        n = launch.empty(q_tok, (B, H, K), "f32")
        mask = env.get(main.key_mask) if v.mask else None
        bn, bdv = int(self.config["block_n"]), int(self.config["block_dv"])
        dvb = cdiv(Dv, bdv)
        P = self._segments(N, BH, dvb, device)
        seg = cdiv(cdiv(N, bn), P) * bn
        ps = pn = None
        if P > 1:
            # memories of segments 0..P-2 of the keys; the last one's is never needed
            ps = launch.empty(q_tok, (P - 1, BH, K, Dv), "f32")
            pn = launch.empty(q_tok, (P - 1, BH, K), "f32")
            self._write(k_tok, v_tok, mask, ck, N, H, BH, P - 1, seg, ps, pn,
                        (BH * K * Dv, K * Dv, Dv, 1), (BH * K, K, 1), stream, device)
        args = {**token_args("q", q_tok, self.layout), **token_args("k", k_tok, self.layout),
                **token_args("v", v_tok, self.layout), **token_args("y", y, self.layout),
                "ps": ps, "pn": pn, "st_ptr": S, "st_sbh": K * Dv, "st_sk": Dv, "st_sdv": 1,
                "nt_ptr": n, "nt_sbh": K, "nt_sk": 1, "N": N, "H": H, "BH": BH, "SEG": seg}
        if mask is not None:
            args.update(mask_ptr=mask, mask_sb=launch.strides(mask)[0],
                        mask_sn=launch.strides(mask)[1])
        if v.same_mixture:
            args.update(self._mix("m", cq))
        else:
            args.update(self._mix("mq", cq))
            args.update(self._mix("mk", ck))
        if v.init:
            s0, n0 = env[main.initial_state]
            args.update(s0_ptr=s0, n0_ptr=n0)
            args.update(zip(("s0_sb", "s0_sh", "s0_sk", "s0_sdv"), launch.strides(s0)))
            args.update(zip(("n0_sb", "n0_sh", "n0_sk"), launch.strides(n0)))
        self._launch("scan", (BH, P, dvb), args, stream, device)
        return {main.out: y, main.state_out: (S, n)}


def _responsibility_ops(kernel: Any) -> dict[str, Optional[_ops.Responsibility]]:
    """The responsibility ops a plan's kernels compute on the fly, by field of the main
    op (None where no fused op produces it)."""
    fields = {"responsibility": ("x",), "write": ("r",), "read": ("r",),
              "scan": ("rq", "rk")}[kernel.kind]
    return {f: kernel.main if kernel.kind == "responsibility" else kernel.responsibility_of(f)
            for f in fields}


def unit_variant(kernel: Any, binding: Any, unit: str) -> Optional[Variant]:
    """The Variant of kernel ``unit`` of this plan and call specialization (None where
    a responsibility is not fused: CupyExecutable raises then)."""
    resp = _responsibility_ops(kernel)
    if any(op is None for op in resp.values()):
        return None
    main = kernel.main
    dims = binding.dims
    D, K = dims["D"], dims["K"]
    Dv = dims.get("Dv", K)
    rq = resp.get("rq") or resp.get("r") or resp.get("x")
    rk = resp.get("rk") or rq
    same = _mixture(rq) == _mixture(rk)
    state = getattr(main, "memory", None) or getattr(main, "initial_state", None)
    state_dtype = binding.input_dtypes.get(state, "f32") if state else "f32"
    mask = getattr(main, "key_mask", None) in binding.present
    init = getattr(main, "initial_state", None) in binding.present
    return Variant(unit, D, Dv, K, binding.dtypes.get("T", "f32"),
                   binding.dtypes.get("P", "f32"), state_dtype if state_dtype in ("f32", "f64") else "f32",
                   rq.covariance, rk.covariance, same, getattr(main, "norm", "row"),
                   float(getattr(main, "eps", 0.0)), mask and unit in ("write", "scan"),
                   init and unit == "scan")


def _mixture(op: _ops.Responsibility) -> tuple[str, str, str]:
    """The parameter names of a responsibility op's mixture (equal: one mixture)."""
    return (op.mean, op.log_var, op.logit)


def _torch_stream(x: Any, stream: Any) -> Any:
    """Torch tensors (native "torch"): make the launch stream torch's current one
    too, so that buffers torch allocates (and, in the GPU tests, NaN-fills) here
    belong to the stream that uses them (streams.py: why not ExternalStream(0))."""
    if not launch.is_torch(x):
        return contextlib.nullcontext()
    return torch_stream(stream.ptr, x.device)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: int) -> int:
    if device not in _SM_COUNT:
        import cupy

        _SM_COUNT[device] = int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])
    return _SM_COUNT[device]
