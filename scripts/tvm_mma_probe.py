"""Batched GEMM on NVIDIA tensor cores with TVM 0.27 (s_tir.Schedule + tensorize).

C[b, i, j] = sum_k A[b, i, k] * B[b, k, j]          (variant "nn")
C[b, i, j] = sum_t A[b, t, i] * B[b, t, j]          (variant "tn", S = R^T V)

A, B in float16 or bfloat16, C accumulated/stored in float32.
Builds for {"kind": "cuda", "arch": "sm_90"} (no GPU needed), prints the CUDA
source and re-compiles it with `nvcc -arch=sm_90 -cubin`.

usage: python scripts/tvm_mma_probe.py [--dtype float16|bfloat16|all] [--variant nn|tn|all]
                          [--batch 64|sym] [--print-source] [--no-nvcc]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

# apache-tvm 0.27.0.post1 + apache-tvm-ffi 0.1.15.x segfaults in tvm::ffi::ToJSONGraph (any
# tvm.ir.save_json of an IR node, and every sch.tensorize, which deep-copies the intrinsic).
# apache-tvm-ffi 0.1.14.post1 works; install it next to this script (git-ignored) with
#   pip install --no-deps --target scripts/ffi0114 apache-tvm-ffi==0.1.14.post1
# The probe for issue 7 (TVM on tensor cores); findings in docs/notes/tvm_tensor_cores.md.
_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_HERE, "ffi0114")):
    sys.path.insert(0, os.path.join(_HERE, "ffi0114"))

import tvm_ffi  # noqa: E402

if tvm_ffi.__version__.startswith("0.1.15"):
    print(f"WARNING: apache-tvm-ffi {tvm_ffi.__version__} crashes sch.tensorize with tvm 0.27.0.post1",
          file=sys.stderr)

import tvm  # noqa: E402
from tvm import te  # noqa: E402
from tvm.s_tir import TensorIntrin  # noqa: E402

_t = time.time()
# importing this module registers all mma_*/wmma_* intrinsics (TVMScript-parsed: 25-40 s on 2 cores)
from tvm.s_tir.tensor_intrin import cuda as cuda_intrin  # noqa: E402,F401
from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout  # noqa: E402

IMPORT_INTRIN_S = time.time() - _t

M = N = K = 64  # i (tokens), j, k
TARGET = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})


# --------------------------------------------------------------------------------------
# bf16 intrinsics. TVM 0.27 registers mma.sync/ldmatrix intrinsics only for f16 (+int8/fp8):
# get_ldmatrix_intrin() asserts dtype == "float16" for k_dim=16 and get_mma_intrin() has no
# "bfloat16" entry in its dtype_abbrv table. The PTX codegen itself handles "bf16", so we
# register bf16 clones of the f16 intrinsics by re-typing the f16 desc/impl PrimFuncs.
# --------------------------------------------------------------------------------------
def _retype_primfunc(func, old="float16", new="bfloat16"):
    """Clone a PrimFunc, replacing every `old` dtype (buffers, casts, calls, ...) by `new`."""
    script = func.script()
    assert '"bfloat16"' not in script
    script = script.replace(f'"{old}"', f'"{new}"')
    # mma PTX type strings of the legacy mma call
    script = script.replace('"fp16", "fp16"', '"bf16", "bf16"')
    # The printer drops the element dtype of T.ptx_legacy.ldmatrix (kept in Call.dtype); the
    # parser then defaults it to int8 and the CUDA codegen takes its "int8 + trans" path (a
    # wrong scalar copy loop instead of ldmatrix.trans). Put the dtype back explicitly.
    lines = []
    for line in script.split("\n"):
        if "T.ptx_legacy.ldmatrix(" in line:
            assert line.rstrip().endswith(")")
            line = line.rstrip()[:-1] + f', dtype="{new}")'
        lines.append(line)
    return tvm.script.from_source("\n".join(lines))


def register_bf16_intrinsics():
    pairs = {
        "mma_ldmatrix_f16_a": "mma_ldmatrix_bf16_a",
        "mma_ldmatrix_f16_a_trans": "mma_ldmatrix_bf16_a_trans",
        "mma_ldmatrix_f16_b": "mma_ldmatrix_bf16_b",
        "mma_ldmatrix_f16_b_trans": "mma_ldmatrix_bf16_b_trans",
        "mma_f16f16f32": "mma_bf16bf16f32",
        "mma_f16f16f32_trans_a": "mma_bf16bf16f32_trans_a",
        "mma_f16f16f32_trans_b": "mma_bf16bf16f32_trans_b",
        "mma_f16f16f32_trans_a_trans_b": "mma_bf16bf16f32_trans_a_trans_b",
    }
    for src, dst in pairs.items():
        try:
            TensorIntrin.get(dst)
            continue  # already registered
        except Exception:  # noqa: BLE001
            pass
        intrin = TensorIntrin.get(src)
        TensorIntrin.register(dst, _retype_primfunc(intrin.desc), _retype_primfunc(intrin.impl))


# --------------------------------------------------------------------------------------
# Workload (TE)
# --------------------------------------------------------------------------------------
def batched_gemm(dtype, variant, batch):
    b = te.var("b") if batch == "sym" else int(batch)
    k = te.reduce_axis((0, K), name="k")
    B = te.placeholder((b, K, N), dtype, name="B")
    if variant == "nn":
        A = te.placeholder((b, M, K), dtype, name="A")
        a_elem = lambda bb, i: A[bb, i, k]  # noqa: E731
    else:  # "tn": reduction over the token axis, A stored [b, t, i]
        A = te.placeholder((b, K, M), dtype, name="A")
        a_elem = lambda bb, i: A[bb, k, i]  # noqa: E731
    C = te.compute(
        (b, M, N),
        lambda bb, i, j: te.sum(
            a_elem(bb, i).astype("float32") * B[bb, k, j].astype("float32"), axis=k
        ),
        name="C",
    )
    return te.create_prim_func([A, B, C])


# --------------------------------------------------------------------------------------
# Schedule: grid = batch, 4 warps (2x2) per CTA, each warp 32x32 of C = 2x2 mma 16x16 tiles,
# k split in 2 stages of 32 staged through shared memory, then ldmatrix -> mma.sync.
# --------------------------------------------------------------------------------------
def lay(i, j):
    return shared_16x16_to_ldmatrix_32x8_layout(i % 16, j % 16)


def schedule_mma(func, dtype, variant):
    short = {"float16": "f16", "bfloat16": "bf16"}[dtype]
    ta = variant == "tn"
    intrin_load_a = f"mma_ldmatrix_{short}_a" + ("_trans" if ta else "")
    intrin_load_b = f"mma_ldmatrix_{short}_b"
    intrin_mma = f"mma_{short}{short}f32" + ("_trans_a" if ta else "")
    intrin_fill = "mma_fill_16x16_f32"
    intrin_store = "mma_store_16x16_f32_global_"

    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("C")
    bb, i, j, k = sch.get_loops(blk)
    i, i_tc = sch.split(i, factors=[None, 16])
    j, j_tc = sch.split(j, factors=[None, 16])
    k, k_tc = sch.split(k, factors=[None, 16])
    sch.reorder(i, j, k, i_tc, j_tc, k_tc)
    blk_outer = sch.blockize(i_tc)  # 16x16x16 tensor-core tile; `blk` is the inner block

    i0, i1 = sch.split(i, factors=[2, None])  # i0: warp row, i1: 2 tiles per warp
    j0, j1 = sch.split(j, factors=[2, None])
    k0, k1 = sch.split(k, factors=[2, None])  # k0: smem stage (32 wide), k1: 2 mma-k steps
    sch.reorder(bb, i0, j0, k0, k1, i1, j1)
    sch.bind(bb, "blockIdx.x")
    ty = sch.fuse(i0, j0)
    sch.bind(ty, "threadIdx.y")  # 4 warps
    num_ty, warp, vec = 4, 32, 8

    def fetch_to_shared(idx):
        blk_s = sch.cache_read(blk_outer, idx, "shared")
        sch.compute_at(blk_s, k0)
        fused = sch.fuse(*sch.get_loops(blk_s)[-2:])
        _, f1, f2, f3 = sch.split(fused, factors=[None, num_ty, warp, vec])
        sch.bind(f2, "threadIdx.x")
        sch.bind(f1, "threadIdx.y")
        sch.vectorize(f3)
        sch.storage_align(blk_s, 0, axis=-2, factor=32, offset=8)  # pad rows vs bank conflicts
        return blk_s

    fetch_to_shared(0)
    fetch_to_shared(1)

    # shared -> registers ("warp" scope: [32 lanes, 8 elems] per 16x16 fragment)
    A_warp = sch.cache_read(blk_outer, 0, "warp")
    B_warp = sch.cache_read(blk_outer, 1, "warp")
    sch.compute_at(A_warp, k1)
    sch.compute_at(B_warp, k1)
    C_warp = sch.cache_write(blk_outer, 0, "warp")
    sch.reverse_compute_at(C_warp, ty)

    def tile16(block):
        r, c = sch.get_loops(block)[-2:]
        r0, r1 = sch.split(r, factors=[None, 16])
        c0, c1 = sch.split(c, factors=[None, 16])
        sch.reorder(r0, c0, r1, c1)
        return r1

    loop_a = tile16(A_warp)  # nn: [i, k] tile; tn: [t, i] tile (ldmatrix .trans)
    loop_b = tile16(B_warp)  # [k, j]
    tile16(C_warp)

    sch.decompose_reduction(blk_outer, k0)
    blk_init = sch.get_sblock("C_init")

    # register layout of the mma fragments (thread_id, local_id)
    idx_map = lambda b_, r, c: (b_, r // 16, c // 16, *lay(r, c))  # noqa: E731
    sch.transform_layout(A_warp, ("write", 0), idx_map)
    sch.transform_layout(B_warp, ("write", 0), idx_map)
    sch.transform_layout(C_warp, ("read", 0), idx_map)

    sch.tensorize(loop_a, intrin_load_a)
    sch.tensorize(loop_b, intrin_load_b)
    sch.tensorize(sch.get_loops(blk)[-3], intrin_mma)
    sch.tensorize(sch.get_loops(blk_init)[-2], intrin_fill)
    sch.tensorize(sch.get_loops(C_warp)[-2], intrin_store)
    return sch


# --------------------------------------------------------------------------------------
def build_one(dtype, variant, batch, print_source, run_nvcc):
    tag = f"{dtype}/{variant}/batch={batch}"
    t0 = time.time()
    func = batched_gemm(dtype, variant, batch)
    sch = schedule_mma(func, dtype, variant)
    t1 = time.time()
    lib = tvm.compile(sch.mod, target=TARGET)
    t2 = time.time()
    # tvm.compile returns tvm.runtime.Executable; the device module is an import of .mod
    src = lib.mod.imports[0].inspect_source()
    if print_source:
        print(f"// ===== CUDA source {tag} =====")
        print(src)
    n_mma = src.count("mma.sync")
    n_ldm = src.count("ldmatrix")
    print(f"[{tag}] schedule {t1 - t0:.2f}s, tvm.compile {t2 - t1:.2f}s, "
          f"'mma.sync' x{n_mma}, 'ldmatrix' x{n_ldm}")
    assert n_mma > 0, "no mma.sync in generated source"
    if run_nvcc:
        with tempfile.TemporaryDirectory() as d:
            cu = os.path.join(d, "k.cu")
            with open(cu, "w") as f:
                f.write(src)
            t3 = time.time()
            r = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", os.path.join(d, "k.cubin"), cu],
                               capture_output=True, text=True)
            t4 = time.time()
            if r.returncode != 0:
                print(r.stderr)
                raise RuntimeError(f"nvcc failed for {tag}")
            msg = f"[{tag}] nvcc -arch=sm_90 -cubin OK in {t4 - t3:.2f}s"
            cuobjdump = shutil.which("cuobjdump") or _triton_cuobjdump()
            if cuobjdump:
                sass = subprocess.run([cuobjdump, "-sass", os.path.join(d, "k.cubin")],
                                      capture_output=True, text=True).stdout
                msg += f", HMMA instructions in SASS: {sass.count('HMMA')}"
            print(msg)
    return src


def _triton_cuobjdump():
    try:
        import triton  # noqa: PLC0415

        p = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        return p if os.path.exists(p) else None
    except ImportError:
        return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="all", choices=["float16", "bfloat16", "all"])
    p.add_argument("--variant", default="all", choices=["nn", "tn", "all"])
    p.add_argument("--batch", default="64", choices=["64", "sym"])
    p.add_argument("--print-source", action="store_true")
    p.add_argument("--no-nvcc", action="store_true")
    a = p.parse_args()
    print(f"tvm {tvm.__version__}, tvm_ffi {tvm_ffi.__version__}; "
          f"import tvm.s_tir.tensor_intrin.cuda: {IMPORT_INTRIN_S:.1f}s")
    t = time.time()
    register_bf16_intrinsics()
    print(f"register bf16 intrinsics: {time.time() - t:.1f}s")
    dtypes = ["float16", "bfloat16"] if a.dtype == "all" else [a.dtype]
    variants = ["nn", "tn"] if a.variant == "all" else [a.variant]
    for dt in dtypes:
        for v in variants:
            build_one(dt, v, a.batch, a.print_source, not a.no_nvcc)


if __name__ == "__main__":
    main()
