"""The WMMA tensor intrinsics the cuda schedule tensorizes "mma" stages with
(``schedule_cuda._Sched.mma``): bfloat16 16 x 16 x 16 tiles, float32 accumulation.

A tensor intrinsic is a pair of TensorIR functions: a description (the loops it
replaces, which ``sch.tensorize`` matches structurally) and an implementation (the
warp-wide ``nvcuda::wmma`` call TVM's CUDA codegen prints).  TVM 0.27 registers
WMMA intrinsics for float16 only, in ``tvm.s_tir.tensor_intrin.cuda``, whose import
registers some 90 others and all the CPU ones (30 s of TVMScript parsing here);
the five this backend uses are defined here instead (0.2 s):

  LOAD_A  the token pieces [16, 16] from static shared memory ("shared": see
          schedule_cuda.PIECES_SMEM), row-major
  LOAD_B  the coefficient pieces [16, 16] straight from global memory (a small table
          every block of a head reads: L1/L2 hits, no shared copy, no barrier)
  SYNC    C += A B, bfloat16 operands, float32 accumulator
  FILL    the accumulator set to 0
  STORE   the accumulator to shared memory ("shared.dyn")

``sch.tensorize`` deep-copies the description through TVM's JSON serializer, which
apache-tvm-ffi 0.1.15 crashes in (a segfault, not an exception; 0.1.14.post1 works):
``require`` refuses that version before any schedule is touched.
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

    for name, (desc, impl) in _intrinsics().items():
        TensorIntrin.register(name, desc, impl, override=True)
    _done = True


def _fragment(buf, stride):
    """The index of the 16 x 16 fragment ``buf`` starts at, in the fragment array of
    its scope (rows of ``stride`` elements, fragments row after row)."""
    return buf.elem_offset // stride // TILE * (stride // TILE) + buf.elem_offset % stride // TILE


def _intrinsics() -> dict:
    from tvm.script import tirx as T

    n = TILE
    bf16, f32 = "bfloat16", "float32"

    def copy(src_scope, dst_scope, dtype, name):
        """The description of a 16 x 16 copy between two scopes."""
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (n, n), dtype, align=64, offset_factor=n, scope=src_scope)
            C = T.match_buffer(c, (n, n), dtype, align=64, offset_factor=n, scope=dst_scope)
            with T.sblock("root"):
                T.reads(A[0:n, 0:n])
                T.writes(C[0:n, 0:n])
                for i, j in T.grid(n, n):
                    with T.sblock(name):
                        vi, vj = T.axis.remap("SS", [i, j])
                        C[vi, vj] = A[vi, vj]
        return desc

    def load(src_scope, frag_scope):
        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
            A = T.match_buffer(a, (n, n), bf16, align=64, offset_factor=n, scope=src_scope,
                               strides=[s1, s0])
            C = T.match_buffer(c, (n, n), bf16, align=64, offset_factor=n, scope=frag_scope,
                               strides=[d1, d0])
            with T.sblock("root"):
                T.reads(A[0:n, 0:n])
                T.writes(C[0:n, 0:n])
                T.evaluate(T.tvm_load_matrix_sync(C.data, n, n, n, _fragment(C, d1),
                                                  A.access_ptr("r", ptr_type=bf16), s1,
                                                  "row_major", dtype="void"))
        return copy(src_scope, frag_scope, bf16, "load"), impl

    @T.prim_func(s_tir=True)
    def sync_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (n, n), bf16, align=64, offset_factor=n, scope="wmma.matrix_a")
        B = T.match_buffer(b, (n, n), bf16, align=64, offset_factor=n, scope="wmma.matrix_b")
        C = T.match_buffer(c, (n, n), f32, align=64, offset_factor=n, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:n, 0:n], A[0:n, 0:n], B[0:n, 0:n])
            T.writes(C[0:n, 0:n])
            for i, j, k in T.grid(n, n, n):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.Cast(f32, A[vi, vk]) * T.Cast(f32, B[vk, vj])

    @T.prim_func(s_tir=True)
    def sync_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a1, a0, b1, b0, c1, c0 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (n, n), bf16, align=64, offset_factor=n, scope="wmma.matrix_a",
                           strides=[a1, a0])
        B = T.match_buffer(b, (n, n), bf16, align=64, offset_factor=n, scope="wmma.matrix_b",
                           strides=[b1, b0])
        C = T.match_buffer(c, (n, n), f32, align=64, offset_factor=n, scope="wmma.accumulator",
                           strides=[c1, c0])
        with T.sblock("root"):
            T.reads(C[0:n, 0:n], A[0:n, 0:n], B[0:n, 0:n])
            T.writes(C[0:n, 0:n])
            T.evaluate(T.tvm_mma_sync(C.data, _fragment(C, c1), A.data, _fragment(A, a1),
                                      B.data, _fragment(B, b1), C.data, _fragment(C, c1),
                                      dtype="void"))

    @T.prim_func(s_tir=True)
    def fill_desc(c: T.handle) -> None:
        C = T.match_buffer(c, (n, n), f32, align=64, offset_factor=n, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:n, 0:n])
            for i, j in T.grid(n, n):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def fill_impl(c: T.handle) -> None:
        d1, d0 = T.int32(), T.int32()
        C = T.match_buffer(c, (n, n), f32, align=64, offset_factor=n, scope="wmma.accumulator",
                           strides=[d1, d0])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:n, 0:n])
            T.evaluate(T.tvm_fill_fragment(C.data, n, n, n, _fragment(C, d1), T.float32(0),
                                           dtype="void"))

    @T.prim_func(s_tir=True)
    def store_impl(a: T.handle, c: T.handle) -> None:
        s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (n, n), f32, align=64, offset_factor=n, scope="wmma.accumulator",
                           strides=[d1, d0])
        C = T.match_buffer(c, (n, n), f32, align=64, offset_factor=n, scope="shared.dyn",
                           strides=[s1, s0])
        with T.sblock("root"):
            T.reads(A[0:n, 0:n])
            T.writes(C[0:n, 0:n])
            T.evaluate(T.tvm_store_matrix_sync(A.data, n, n, n, _fragment(A, d1),
                                               C.access_ptr("w", ptr_type=f32), s1, "row_major",
                                               dtype="void"))

    return {LOAD_A: load("shared", "wmma.matrix_a"), LOAD_B: load("global", "wmma.matrix_b"),
            SYNC: (sync_desc, sync_impl), FILL: (fill_desc, fill_impl),
            STORE: (copy("wmma.accumulator", "shared.dyn", f32, "store"), store_impl)}
