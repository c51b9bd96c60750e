"""gmagen show: the program's IR, its kernel plan and the backend's generated source.

The source is generated for one specialization (dtype, D, Dv, K, layout, key
mask present or not) without running anything, so it works for a GPU backend
on a machine without a GPU only if the backend can generate code there.
"""

from __future__ import annotations

import argparse
from typing import Any

from gmagen.adapters.checks import STATIC_DIMS, Binding
from gmagen.cases import DTYPES
from gmagen.ir.ops import COVARIANCES, NORMS
from gmagen.ir.types import LAYOUTS, MemoryType

NAME = "show"
HELP = "print the IR, the kernel plan and the generated source"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--causal", action="store_true", help="the causal (prefix scan) program")
    parser.add_argument("--norm", choices=NORMS, default="row")
    parser.add_argument("--covariance", choices=COVARIANCES, default="diag")
    parser.add_argument("--qk-mixtures", action="store_true",
                        help="separate query and key mixtures (gmagen.dsl.gma_qk_mixtures)")
    parser.add_argument("--backend", default="numpy", help="backend name, or auto (default numpy)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to generate for (default: cuda if the backend has it)")
    parser.add_argument("--dtype", choices=DTYPES, default="f32", help="q, k, v and mixture dtype")
    parser.add_argument("-D", type=int, default=64, help="query/key dim")
    parser.add_argument("--Dv", type=int, default=64, help="value dim")
    parser.add_argument("-K", type=int, default=64, help="mixture components")
    parser.add_argument("--layout", choices=LAYOUTS, default="bnhd")
    parser.add_argument("--mask", action="store_true", help="specialize with a key_mask given")


def binding_for(program: Any, backend: Any, args: argparse.Namespace) -> Binding:
    """The Binding a call with these dtypes and dims would produce (B=H=1, N=128)."""
    from gmagen.errors import DeviceError

    device = args.device or ("cuda" if "cuda" in backend.devices else backend.devices[0])
    if device not in backend.devices:
        raise DeviceError(f"backend {backend.name!r} runs on {', '.join(backend.devices)}, "
                          f"not {device}")
    dims = {"B": 1, "N": 128, "H": 1, "S": 1, "D": args.D, "Dv": args.Dv, "K": args.K}
    present = frozenset({"key_mask"} if args.mask else ())
    input_dtypes = {}
    for inp in program.inputs:
        if inp.optional and inp.name not in present:
            continue
        input_dtypes[inp.name] = ("bool" if inp.role == "mask" else "f32"
                                  if isinstance(inp.type, MemoryType) else args.dtype)
    key = (args.layout, device, tuple(sorted(input_dtypes.items())), present,
           tuple((d, dims[d]) for d in STATIC_DIMS))
    return Binding(backend.native, (device, 0), args.layout, dims,
                   {"T": args.dtype, "P": args.dtype, "acc": "f32"}, input_dtypes, present, key)


def run(args: argparse.Namespace) -> int:
    import gmagen
    from gmagen.backends.registry import get_backend
    from gmagen.dsl import gma, gma_qk_mixtures

    make = gma_qk_mixtures if args.qk_mixtures else gma
    program = make(args.causal, args.norm, args.covariance, layout=args.layout)
    kernel = gmagen.compile(program, args.backend)
    backend = get_backend(kernel.backend)
    binding = binding_for(program, backend, args)
    print(f"# program {program.name} (hash {program.hash()})")
    print(program)
    print()
    print("# plan")
    print(kernel.plan)
    for kp in kernel.plan.kernels:
        config = backend.default_config(kp, binding)
        exe = backend.lower(kp, binding, config, kernel.options)
        print()
        print(f"# source of {kp.name}: backend {backend.name}, {binding.device[0]}, "
              f"{args.dtype}, D={args.D} Dv={args.Dv} K={args.K}, {args.layout}"
              f"{', key_mask' if args.mask else ''}, {exe.config}")
        print(exe.source)
    return 0
