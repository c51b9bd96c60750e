"""The WMMA tensor intrinsics the cuda schedule tensorizes "mma" stages with
(``schedule_cuda._Sched.mma``): bfloat16 16 x 16 x 16 tiles, float32 accumulation.

TVM 0.27 registers its WMMA intrinsics for float16 only, but its generators
(``tvm.s_tir.tensor_intrin.cuda.get_wmma_*_intrin``) take any dtype and scope;
the codegen then emits ``nvcuda::wmma::fragment<..., nv_bfloat16, ...>``.  What
is registered here, once per process:

  A  the token pieces [16, 16] from static shared memory ("shared": see
     schedule_cuda.PIECES_SMEM), row-major
  B  the coefficient pieces [16, 16] straight from global memory (a small table
     every block of a head reads: L1/L2 hits, no shared copy and no barrier)
  the product, the accumulator's fill with 0 and its store to shared memory.

Two costs: importing the generators' module registers every intrinsic TVM
has (TVMScript parsing: 10-30 s of CPU, once per process), and
``sch.tensorize`` deep-copies the intrinsic through TVM's JSON serializer,
which apache-tvm-ffi 0.1.15 crashes in (a segfault, not an exception;
0.1.14.post1 works), so ``require`` refuses that version before any schedule
is touched.
"""

from __future__ import annotations

from gmagen.errors import BackendUnavailable

TILE = 16
LOAD_A = "gmagen_wmma_load_a_bf16_shared"
LOAD_B = "gmagen_wmma_load_b_bf16_global"
SYNC = "gmagen_wmma_sync_bf16_f32"
FILL = "gmagen_wmma_fill_f32"
STORE = "gmagen_wmma_store_f32_shared_dyn"
_done = False


def require() -> None:
    """The intrinsics registered; BackendUnavailable where tensorize would crash."""
    global _done
    if _done:
        return
    import tvm_ffi

    version = str(getattr(tvm_ffi, "__version__", ""))
    if version.startswith("0.1.15"):
        raise BackendUnavailable(
            f"tvm backend: config mma=1 needs apache-tvm-ffi 0.1.14.post1, found {version}: "
            f"tensorize crashes the process with 0.1.15 (tvm::ffi::ToJSONGraph); "
            f"pip install apache-tvm-ffi==0.1.14.post1, or pass config mma=0")
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin import cuda as intrin

    bf16, f32 = "bfloat16", "float32"
    pairs = {
        LOAD_A: intrin.get_wmma_load_intrin(TILE, TILE, TILE, bf16, "shared", False, False),
        LOAD_B: intrin.get_wmma_load_intrin(TILE, TILE, TILE, bf16, "global", True, False),
        SYNC: intrin.get_wmma_sync_intrin(TILE, TILE, TILE, bf16, f32, False),
        FILL: intrin.get_wmma_fill_intrin(TILE, TILE, TILE, f32),
        STORE: intrin.get_wmma_store_intrin(TILE, TILE, TILE, f32, "shared.dyn"),
    }
    for name, (desc, impl) in pairs.items():
        TensorIntrin.register(name, desc, impl, override=True)
    _done = True
