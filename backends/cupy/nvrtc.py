"""Compile CUDA C++ to a cubin with NVRTC, cached in memory and on disk.

Why the low-level API: ``cupy.cuda.compiler.compile_using_nvrtc`` asks the
driver for the current device even when an arch is given, so it fails on a
machine without a GPU.  The calls of ``cupy.cuda.nvrtc`` (createProgram,
compileProgram, getCUBIN, ...) need no driver, so kernels compile, report
their registers and spills, and are tested on CPU-only machines; only
``module_from_cubin`` needs a device.

Every compile passes ``-arch=sm_XX -std=c++17 --ptxas-options=-v
-default-device`` and the CUDA include dirs found here (``include_dirs``).
ptxas' verbose report in the program log gives each kernel's ``Resources``.

Cache: key = sha256 of (schema, NVRTC version, name, full option list,
source).  On disk, under ``knobs.cache_dir() / "cupy"``, an entry is
``<key>.cubin`` plus ``<key>.json`` (log, PTX, cubin size and sha256); the
JSON is written last, so it marks a complete entry.  Both are written to a
temporary file and renamed; a ``filelock`` per key makes concurrent processes
compile once.  An entry that does not check out is skipped with one warning
and recompiled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cupy
import filelock
from cupy.cuda import nvrtc as _nvrtc

from gmagen import knobs
from gmagen.errors import CompileError, OptionError

log = logging.getLogger("gmagen")

SCHEMA_VERSION = 1
DEFAULT_ARCH = "sm_90"
_BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v", "-default-device")
_ELF_MAGIC = b"\x7fELF"

_MEMORY: dict[str, "Compiled"] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one kernel (bytes unless named otherwise)."""

    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    shared: int  # static shared memory; dynamic smem is a launch argument


@dataclass(frozen=True)
class Compiled:
    """One compiled translation unit.  ``resources`` is keyed by the kernel
    names ptxas prints: mangled for C++ linkage, plain for ``extern "C"``."""

    source: str = field(repr=False)
    name: str
    arch: str
    cubin: bytes = field(repr=False)
    ptx: str | None = field(repr=False)
    log: str = field(repr=False)
    resources: dict[str, Resources]
    options: tuple[str, ...] = field(repr=False)  # the full NVRTC command line
    key: str = field(repr=False)


# ---------------------------------------------------------------- public API


def compile_cuda(source: str, name: str, arch: str | int = DEFAULT_ARCH,
                 options: tuple[str, ...] = ()) -> Compiled:
    """Compile ``source`` (file name ``name`` in NVRTC's messages) for ``arch``
    ("sm_90", "90", "sm_90a").  ``options`` go after the default ones.
    Raises OptionError for a bad arch or option, CompileError when NVRTC fails."""
    arch = normalize_arch(arch)
    full = (f"-arch={arch}", *_BASE_OPTIONS,
            *(f"-I{d}" for d in include_dirs()), *_check_options(options))
    key = _cache_key(source, name, full)
    with _LOCK:
        hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    directory = _disk_dir()
    if directory is None:
        compiled = _compile(source, name, arch, full, key, failed_dir=None)
    else:
        # One compile per key across processes; flock is dropped if a holder dies.
        with filelock.FileLock(str(directory / f"{key}.lock")):
            compiled = _read_entry(directory, key, source, name, arch, full)
            if compiled is None:
                compiled = _compile(source, name, arch, full, key, failed_dir=directory / "failed")
                _write_entry(directory, compiled)
    with _LOCK:
        return _MEMORY.setdefault(key, compiled)


def normalize_arch(arch: str | int) -> str:
    """"sm_90" | "90" | 90 -> "sm_90" (an "a"/"f" suffix is kept); checks that
    this NVRTC can target it."""
    match = re.fullmatch(r"(?:sm_)?(\d{2,3})([af]?)", str(arch).strip().lower())
    if match is None:
        raise OptionError(f"cupy: arch {arch!r} is not a GPU architecture; expected a real "
                          f"one such as 'sm_90' or '90' (a cubin needs sm_XX, not compute_XX)")
    supported = _nvrtc.getSupportedArchs()
    if int(match.group(1)) not in supported:
        raise OptionError(f"cupy: arch {arch!r} is not supported by NVRTC {nvrtc_version()}; "
                          f"supported: {', '.join(f'sm_{a}' for a in supported)}")
    return f"sm_{match.group(1)}{match.group(2)}"


@lru_cache(maxsize=None)
def nvrtc_version() -> str:
    major, minor = _nvrtc.getVersion()
    return f"{major}.{minor}"


@lru_cache(maxsize=None)
def include_dirs() -> tuple[str, ...]:
    """CUDA header dirs that exist here, pip wheels first (they match the pip
    NVRTC), then the toolkit's.  NVRTC has no default include path, and
    cuda_fp16.h / cuda_bf16.h are not built in, so kernels using them need one."""
    wheels: list[Path] = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for root in nvidia.__path__:
            wheels += sorted(Path(root).glob("*/include"))  # nvidia/cu13/include, nvidia/cuda_runtime/include
    except ImportError:
        pass
    toolkits: list[Path] = [Path("/usr/local/cuda/include")]
    cuda_path = cupy.cuda.get_cuda_path()  # CUDA_PATH, nvcc's toolkit, or the wheel dir
    if cuda_path:
        toolkits.insert(0, Path(cuda_path) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        toolkits.insert(-1, Path(nvcc).resolve().parent.parent / "include")
    # A toolkit guess must hold the runtime headers: nvcc may be a wrapper script
    # in /usr/local/bin, and /usr/local/include is no CUDA dir.
    candidates = wheels + [p for p in toolkits if (p / "cuda_runtime.h").is_file()]
    found: list[str] = []
    for base in candidates:
        for path in (base, base / "cccl"):  # CUDA 13 keeps libcu++/CUB under include/cccl
            real = str(path.resolve())
            if path.is_dir() and real not in found:
                found.append(real)
    return tuple(found)


def disk_cache_dir() -> Path:
    return knobs.cache_dir() / "cupy"


def clear_memory_cache() -> None:
    """Forget compiled units of this process (the disk cache stays)."""
    with _LOCK:
        _MEMORY.clear()


def module_from_cubin(cubin: bytes) -> Any:
    """A loaded ``cupy.cuda.function.Module``; needs a device and a current context."""
    from cupy.cuda import function

    module = function.Module()
    module.load(cubin)
    return module


def parse_resources(log_text: str) -> dict[str, Resources]:
    """Per-kernel registers, stack, spills and static smem from ptxas' -v report:

        ptxas info    : Compiling entry function 'axpy' for 'sm_90'
        ptxas info    : Function properties for axpy
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 12 registers, used 1 barriers, 512 bytes smem
    """
    fields: dict[str, dict[str, int]] = {}
    entries: list[str] = []
    entry = props = None
    for line in log_text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            entry = props = m.group(1)
            entries.append(entry)
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)  # may be a non-inlined device function, not the entry
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if props is not None:
                fields.setdefault(props, {}).update(
                    stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif m := re.search(r"Used (\d+) registers", line):
            if entry is not None:
                smem = re.search(r"(\d+) bytes smem", line)
                fields.setdefault(entry, {}).update(registers=int(m.group(1)),
                                                    shared=int(smem.group(1)) if smem else 0)
    out = {}
    for name in entries:
        f = fields.get(name, {})
        out[name] = Resources(registers=f.get("registers", 0), stack_frame=f.get("stack_frame", 0),
                              spill_stores=f.get("spill_stores", 0), spill_loads=f.get("spill_loads", 0),
                              shared=f.get("shared", 0))
    return out


# ---------------------------------------------------------------- compiling


def _check_options(options: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(options, str) or not all(isinstance(o, str) for o in options):
        raise OptionError(f"cupy: options must be a tuple of strings, got {options!r}")
    for option in options:
        if option.startswith(("-arch", "--gpu-architecture")):
            raise OptionError(f"cupy: option {option!r} sets the arch; pass arch= instead")
    return tuple(options)


def _cache_key(source: str, name: str, options: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for part in (f"schema={SCHEMA_VERSION}", f"nvrtc={nvrtc_version()}", name, *options, source):
        digest.update(part.encode())
        digest.update(b"\0")  # separator: ("ab", "c") and ("a", "bc") differ
    return digest.hexdigest()


def _run_nvrtc(source: str, name: str, options: tuple[str, ...]) -> tuple[bytes | None, str | None, str]:
    """(cubin, ptx, log); cubin is None when NVRTC failed.  The one place that
    calls NVRTC (tests count calls through it)."""
    prog = _nvrtc.createProgram(source, name, [], [])
    try:
        try:
            _nvrtc.compileProgram(prog, list(options))
        except _nvrtc.NVRTCError:
            return None, None, _clean(_nvrtc.getProgramLog(prog))
        text = _clean(_nvrtc.getProgramLog(prog))
        try:
            ptx: str | None = _clean(_nvrtc.getPTX(prog).decode())
        except (_nvrtc.NVRTCError, RuntimeError, UnicodeDecodeError):
            ptx = None  # the cubin is what we load; PTX is for reading only
        return _nvrtc.getCUBIN(prog), ptx, text
    finally:
        _nvrtc.destroyProgram(prog)


def _compile(source: str, name: str, arch: str, options: tuple[str, ...], key: str,
             failed_dir: Path | None) -> Compiled:
    start = time.perf_counter()
    cubin, ptx, text = _run_nvrtc(source, name, options)
    if not cubin:
        raise CompileError(_failure_message(source, name, arch, options, text, key, failed_dir))
    log.debug("cupy: compiled %s for %s in %.2f s (key %s)", name, arch,
              time.perf_counter() - start, key[:12])
    return Compiled(source=source, name=name, arch=arch, cubin=cubin, ptx=ptx, log=text,
                    resources=parse_resources(text), options=options, key=key)


def _clean(text: str) -> str:
    return text.rstrip("\x00").strip()  # NVRTC strings carry their C terminator


def _failure_message(source: str, name: str, arch: str, options: tuple[str, ...], text: str,
                     key: str, failed_dir: Path | None) -> str:
    lines = source.splitlines()
    quoted: list[str] = []
    seen: set[int] = set()
    # "gma_x.cu(12): error: ..." ; errors inside headers name the header instead
    pattern = re.compile(rf"^{re.escape(name)}\((\d+)\): (?:catastrophic )?error\b.*$", re.M)
    for match in pattern.finditer(text):
        number = int(match.group(1))
        if number in seen or len(seen) >= 5:
            continue
        seen.add(number)
        quoted.append(f"  {match.group(0)}")
        # A missing ';' is reported on the next line, so show the one before too.
        for n in (number - 1, number):
            if 1 <= n <= len(lines):
                mark = ">" if n == number else " "
                quoted.append(f"  {mark}{n:5d} | {lines[n - 1]}")
    message = [f"cupy: NVRTC {nvrtc_version()} could not compile {name} for {arch}"]
    if quoted:
        message += ["offending source lines:", *quoted]
    if "cannot open source file" in text:
        message.append(f"include dirs searched: {', '.join(include_dirs()) or 'none found'}; "
                       f"install the CUDA headers (nvcc / cuda toolkit, or a nvidia-cuda-runtime wheel)")
    message += [f"options: {' '.join(options)}", "NVRTC log:", text or "(empty)"]
    saved = _save_failure(failed_dir, name, key, source, text)
    if saved:
        message.append(f"source and log saved to {saved}.cu and {saved}.log")
    return "\n".join(message)


def _save_failure(failed_dir: Path | None, name: str, key: str, source: str, text: str) -> Path | None:
    if failed_dir is None:
        return None
    stem = failed_dir / f"{Path(name).stem}-{key[:16]}"
    try:
        failed_dir.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".cu").write_text(source)
        stem.with_suffix(".log").write_text(text)
    except OSError:
        return None  # the message still carries source lines and log
    return stem


# ---------------------------------------------------------------- disk cache


def _disk_dir() -> Path | None:
    directory = disk_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"gmagen: NVRTC disk cache disabled, cannot create {directory}: {exc}",
                      stacklevel=3)
        return None
    return directory


def _read_entry(directory: Path, key: str, source: str, name: str, arch: str,
                options: tuple[str, ...]) -> Compiled | None:
    meta_path = directory / f"{key}.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("schema_version") != SCHEMA_VERSION or meta.get("key") != key:
            raise ValueError(f"schema_version {meta.get('schema_version')!r} / key do not match "
                             f"(expected {SCHEMA_VERSION})")
        cubin = (directory / f"{key}.cubin").read_bytes()
        if len(cubin) != meta["cubin_size"] or hashlib.sha256(cubin).hexdigest() != meta["cubin_sha256"]:
            raise ValueError(f"cubin has {len(cubin)} bytes, sha256 differs from the record "
                             f"({meta['cubin_size']} bytes)")
        if not cubin.startswith(_ELF_MAGIC):
            raise ValueError("cubin is not an ELF file")
        text, ptx = meta["log"], meta["ptx"]
        if not isinstance(text, str) or not isinstance(ptx, (str, type(None))):
            raise ValueError("log / ptx are not strings")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"gmagen: ignoring NVRTC cache entry {meta_path}: {exc}; recompiling",
                      stacklevel=3)
        return None
    return Compiled(source=source, name=name, arch=arch, cubin=cubin, ptx=ptx, log=text,
                    resources=parse_resources(text), options=options, key=key)


def _write_entry(directory: Path, compiled: Compiled) -> None:
    meta = {"schema_version": SCHEMA_VERSION, "key": compiled.key, "name": compiled.name,
            "arch": compiled.arch, "nvrtc_version": nvrtc_version(),
            "options": list(compiled.options), "cubin_size": len(compiled.cubin),
            "cubin_sha256": hashlib.sha256(compiled.cubin).hexdigest(),
            "log": compiled.log, "ptx": compiled.ptx}
    try:
        # cubin first, JSON last: a reader that finds the JSON finds a whole entry.
        _write_atomic(directory / f"{compiled.key}.cubin", compiled.cubin)
        _write_atomic(directory / f"{compiled.key}.json", json.dumps(meta, indent=1).encode())
    except OSError as exc:
        warnings.warn(f"gmagen: could not write NVRTC cache entry in {directory}: {exc}", stacklevel=3)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
