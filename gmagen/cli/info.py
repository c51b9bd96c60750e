"""gmagen info: versions, devices, backends and cache locations (paste it into bug reports)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from typing import Any

NAME = "info"
HELP = "versions, devices, backends and cache locations"

# (what to call it, distributions that provide it: the first installed one wins)
PACKAGES = (
    ("numpy", ("numpy",)), ("torch", ("torch",)), ("triton", ("triton",)),
    ("jax", ("jax",)), ("jaxlib", ("jaxlib",)),
    ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy")), ("tvm", ("apache-tvm", "tvm")),
    ("ml_dtypes", ("ml_dtypes",)), ("rich", ("rich",)), ("platformdirs", ("platformdirs",)),
    ("filelock", ("filelock",)),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON only")


def versions() -> dict[str, str]:
    import gmagen

    out = {"gmagen": gmagen.__version__, "python": platform.python_version()}
    for label, dists in PACKAGES:
        out[label] = "not installed"
        for dist in dists:
            try:
                out[label] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def devices() -> dict[str, list[str]]:
    """CUDA devices as torch and cupy see them; the reason where there are none."""
    out: dict[str, list[str]] = {}
    try:
        import torch
    except ImportError:
        out["torch"] = ["torch not installed"]
    else:
        if torch.cuda.is_available():
            out["torch"] = [f"cuda:{i} {torch.cuda.get_device_name(i)} "
                            f"sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}"
                            for i in range(torch.cuda.device_count())]
        else:
            out["torch"] = [f"no CUDA device (torch {torch.__version__}, CUDA build "
                            f"{torch.version.cuda or 'none'})"]
    try:
        import cupy
    except ImportError:
        out["cupy"] = ["cupy not installed"]
    else:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
            out["cupy"] = []
            for i in range(count):
                props = cupy.cuda.runtime.getDeviceProperties(i)
                name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
                out["cupy"].append(f"cuda:{i} {name} sm_{props['major']}{props['minor']}")
        except Exception as exc:  # no driver / no device: say so, do not fail
            out["cupy"] = [f"no CUDA device ({type(exc).__name__}: {str(exc).strip()[:120]})"]
    return out


def backends() -> dict[str, dict[str, Any]]:
    from gmagen.backends.registry import BACKENDS, backend_availability, get_backend

    out = {}
    for name in BACKENDS:
        try:
            avail = backend_availability(name)
            entry: dict[str, Any] = {"available": bool(avail), "reason": avail.reason}
            if avail:
                be = get_backend(name)
                entry.update(describe=be.describe(), devices=list(be.devices),
                             dtypes=list(be.dtypes))
                if avail.reason:  # available, with a caveat (e.g. interpreter only)
                    entry["describe"] += f" [{avail.reason}]"
        except Exception as exc:  # info must describe a broken install, not die on it
            entry = {"available": False,
                     "reason": f"failed to load: {type(exc).__name__}: {exc}"}
        out[name] = entry
    return out


def _autotune_entries() -> list[str]:
    """What the user and shipped autotune caches hold for each CUDA device here:
    one line per source, with the number of entries and the backends."""
    try:
        import torch

        names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                 if torch.cuda.is_available() else [])
    except ImportError:
        names = []
    if not names:
        return ["no CUDA device: configs are tuned per GPU"]
    from gmagen import autotune

    lines = []
    for gpu in sorted(set(names)):
        for source, entries in autotune.default_cache().entries(gpu).items():
            backends = sorted({k.backend for k in entries})
            lines.append(f"{gpu} ({source}): {len(entries)} entries"
                         + (f" ({', '.join(backends)})" if backends else ""))
    return lines


def caches() -> dict[str, Any]:
    from importlib import resources

    from gmagen import knobs

    shipped = resources.files("gmagen.autotune_cache")
    files = sorted(p.name for p in shipped.iterdir() if p.name.endswith(".json"))
    return {"cache_dir": str(knobs.cache_dir()), "autotune_cache (shipped)": str(shipped),
            "shipped autotune files": files,
            "autotune entries for this GPU": _autotune_entries(),
            "GMAGEN_LOG": knobs.log_level(), "GMAGEN_TRITON_INTERPRET": knobs.triton_interpret(),
            "GMAGEN_SEED": knobs.check_seed()}


def collect() -> dict[str, Any]:
    return {"versions": versions(), "platform": f"{platform.platform()} ({sys.executable})",
            "devices": devices(), "backends": backends(), "caches": caches()}


def run(args: argparse.Namespace) -> int:
    data = collect()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from . import echo, print_table

    print_table("versions", ["package", "version"], list(data["versions"].items()))
    echo(f"platform: {data['platform']}")
    for framework, names in data["devices"].items():
        echo(f"devices ({framework}): " + "; ".join(names))
    rows = [[name, "yes" if b["available"] else "no",
             b.get("describe", "") if b["available"] else b["reason"]]
            for name, b in data["backends"].items()]
    print_table("backends", ["backend", "available", "details / reason"], rows)
    for key, value in data["caches"].items():
        shown = ", ".join(value) or "none" if isinstance(value, list) else value
        echo(f"{key}: {shown}")
    return 0
