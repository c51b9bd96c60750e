"""Shared libraries of built modules whose CUDA kernels are cubin, not source.

``tvm.compile`` for cuda on a machine whose TVM has no CUDA runtime (no
``libcuda``: a CPU machine) keeps the generated CUDA source in a stand-in module
of kind "cuda"; where the runtime is loaded, it would compile through
``tvm_callback_cuda_compile`` (NVRTC from ``cuda-bindings`` by default).
Either way TVM would store source that the loader must compile when the module
was serialized with format "cuda", which TVM's runtime alone cannot do.

So the CUDA source of every "cuda" import is compiled here with nvcc to cubin
for the target's arch, and the serialized imports are rewritten before they
are linked into the library (``export_library(fpack_imports=...)``).  The bytes
of a "cuda" module are (TVM 0.27, ``CUDAModuleNode::SaveToBytes``, mirrored by
its stand-in): ``str fmt, map fmap, bytes code``, each string and byte string
as a little-endian u64 length then the bytes; ``ffi.Module.load_from_bytes.cuda``
loads ``fmt`` "cubin" with ``cuModuleLoadData`` and compiles only "cuda".
The packed imports are ``u64 size, vec<u64> row_ptr, vec<u64> children``, then
per module its kind and, for any kind but "_lib", ``u64 n`` and n bytes.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from typing import Any

from gmagen.errors import CompileError

BLOB_SYMBOL = "__tvm_ffi__library_bin"


def nvcc_path() -> str:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                      "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    raise CompileError("tvm backend: nvcc was not found (PATH, $CUDA_HOME/bin); it compiles "
                       "the cuda target's kernels to cubin")


def compile_cubin(source: str, arch: str) -> bytes:
    """CUDA C++ -> cubin for ``arch`` ("sm_90") with nvcc."""
    with tempfile.TemporaryDirectory(prefix="gmagen-tvm-") as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.cubin")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc_path(), "-cubin", f"-arch={arch}", "-O3", "-w", "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"tvm backend: nvcc failed for {arch} ({' '.join(cmd)}):\n"
                               f"{proc.stderr[-4000:]}\n--- CUDA source ---\n{source}")
        with open(out, "rb") as f:
            return f.read()


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        if len(out) != n:
            raise CompileError("tvm backend: truncated packed imports")
        self.pos += n
        return out

    def string(self) -> bytes:
        return self.raw(self.u64())


def _string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def rewrite_cuda_payload(payload: bytes, arch: str) -> bytes:
    """A "cuda" module's bytes with its source replaced by cubin for ``arch``."""
    r = _Reader(payload)
    fmt = r.string()
    if fmt != b"cuda":  # already binary (cubin, fatbin, ptx): keep it
        return payload
    rest = payload[r.pos:]
    code = _trailing_string(rest, fmt)
    if code is None:
        raise CompileError("tvm backend: cannot find the CUDA source in a cuda module's bytes "
                           "(TVM's module format changed?)")
    fmap = rest[:len(rest) - len(code) - 8]
    cubin = compile_cubin(code.decode(), arch)
    return _string(b"cubin") + fmap + _string(cubin)


def _trailing_string(rest: bytes, fmt: bytes) -> "bytes | None":
    """The code of a "cuda" module's bytes after fmt: fmap sits between fmt and
    code, and the code is the trailing length-prefixed string (found from the
    end: CUDA source has no NUL byte, so no false length inside it)."""
    looks = {b"cuda": lambda c: b"__global__" in c, b"cubin": lambda c: c[:4] == b"\x7fELF"}
    ok = looks.get(fmt, lambda c: True)
    for start in range(len(rest) - 8, -1, -1):
        (n,) = struct.unpack_from("<Q", rest, start)
        if start + 8 + n == len(rest) and ok(rest[start + 8:]):
            return rest[start + 8:]
    return None


def rewrite_imports(blob: bytes, arch: str) -> bytes:
    """Packed imports (``runtime.ModulePackImportsToTensor``) with every "cuda"
    module's source compiled to cubin."""
    r = _Reader(blob)
    size = r.u64()
    if size + 8 != len(blob):
        raise CompileError(f"tvm backend: packed imports of {len(blob)} bytes say {size + 8}")
    start = r.pos
    row_ptr = [r.u64() for _ in range(r.u64())]
    for _ in range(r.u64()):
        r.u64()
    head = blob[start:r.pos]
    body = []
    for _ in range(len(row_ptr) - 1):
        kind = r.string()
        body.append(_string(kind))
        if kind == b"_lib":
            continue
        payload = r.string()
        if kind == b"cuda":
            payload = rewrite_cuda_payload(payload, arch)
        body.append(_string(payload))
    if r.pos != len(blob):
        raise CompileError("tvm backend: unexpected trailing bytes in packed imports")
    out = head + b"".join(body)
    return struct.pack("<Q", len(out)) + out


def blob_c_source(blob: bytes) -> str:
    """C source defining the library's packed-imports symbol (as
    ``runtime.ModulePackImportsToC`` writes it)."""
    rows = [",".join(f"0x{b:02x}" for b in blob[i:i + 20]) for i in range(0, len(blob), 20)]
    return ("#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
            f"extern const unsigned char {BLOB_SYMBOL}[];\n"
            f"const unsigned char {BLOB_SYMBOL}[{len(blob)}] = {{\n  "
            + ",\n  ".join(rows) + "\n};\n#ifdef __cplusplus\n}\n#endif\n")


def export_library(module: Any, path: str, arch: str = "") -> str:
    """``module.export_library(path)``; with ``arch``, its CUDA imports as cubin."""
    if not arch:
        module.export_library(path)
        return path
    import tvm_ffi

    def fpack_imports(mod: Any, is_system_lib: bool, prefix: str, workspace: str) -> str:
        if is_system_lib or prefix:
            raise CompileError("tvm backend: system-lib exports are not supported")
        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod)
        blob = rewrite_imports(blob.numpy().tobytes(), arch)
        out = os.path.join(workspace, "devc.c")
        with open(out, "w") as f:
            f.write(blob_c_source(blob))
        return out

    module.export_library(path, fpack_imports=fpack_imports)
    return path


def cuda_imports(module: Any) -> list[Any]:
    """The "cuda" modules imported (transitively) by ``module``."""
    out, stack = [], list(module.imports)
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m)
        stack.extend(m.imports)
    return out


def library_cuda_formats(path: str) -> list[tuple[str, bytes]]:
    """(fmt, code) of each "cuda" module packed in an exported library file,
    read from the bytes of the file itself (no CUDA runtime needed)."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    key = _string(b"cuda")
    pos = data.find(key)
    while pos >= 0:
        try:
            r = _Reader(data[pos + len(key):])
            n = r.u64()
            payload = r.raw(n)
            pr = _Reader(payload)
            fmt = pr.string()
            if fmt in (b"cuda", b"cubin", b"fatbin", b"ptx"):
                code = _trailing_string(payload[pr.pos:], fmt)
                if code is not None:
                    out.append((fmt.decode(), code))
        except (CompileError, struct.error):
            pass
        pos = data.find(key, pos + 1)
    return out
