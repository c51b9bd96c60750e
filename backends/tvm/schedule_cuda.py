"""The cuda schedule of a tiled graph (``Graph.tile`` > 0: responsibility, read,
write and scan plans): one thread block per tile of ``block_n`` tokens of one (b, h)
pair (write: per segment of ``write_tiles`` tiles), every per-token stage
computed at the tile loop into shared memory, so that nothing of size N x K
reaches global memory.  The trace of the schedule heads ``executable.source``.

Kernels per plan: the mixture's coefficient tables (a, b, c: one small kernel
each, their sums over k / d in shared memory at the head loop, exp(-rho)
recomputed in float64 where used), then

  read / responsibility: one kernel, grid (tiles, B * H): x tile -> logits
      (micro tiles of TM x TN in registers, the coefficient tables staged
      through shared memory in chunks of the reduction) -> row max, row sum ->
      r -> [slot_read: the products with S and n] -> y (or R) in the call's layout;
  write: one kernel, grid (segments, B * H, splits of K x (Dv + 1)): per token
      tile the responsibilities as above and the partial sums S_seg += r^T [v, 1]
      (n is the column of ones), accumulators in registers; then one small kernel
      each for S and n summing the segments in order (deterministic);
  scan (tile = chunk C): the write kernel with one chunk per segment (S_chunk
      [B, H, NC, K, Dv + 1]); the prefix over chunks (emit_scan.state_prefix, a
      te.extern binding its own threads: one per (b, h, k, e), a loop over the
      chunks) writing S_in and the final state; one kernel, grid (chunks, B * H):
      r of the chunk's queries and keys, [m v, m] and S_in(c) in shared memory,
      (slot: the in-chunk prefix of n, then r / n), A = q r^T [C, C], then
      sum_(j <= i) A_ij [m v, m] and q S_in(c) as "gemm" stages -> y in the
      call's layout.  A graph of several kernels tags their tiled stages with the
      group of the kernel's "out" stage (``Stage.group``).

Thread count: ``num_threads`` for read / responsibility / scan y; the write kernel takes
one thread per TM x TN accumulator tile of K x (Dv + 1) (at most 1024, the rest
over blockIdx.z).  Every stage of a kernel splits its work over those threads.
Shared memory is "shared.dyn" (TVM's runtime raises the kernel's limit past 48 KiB).
"""

from __future__ import annotations

import re
from typing import Any

from tvm import s_tir

from gmagen.config import Config

from .prelude import ACC_TILE, Graph

SMEM = "shared.dyn"
# the token pieces of "mma" stages: static shared memory, apart from every other tile.
# TVM 0.27's StorageRewrite reuses a dead buffer of one dtype for a new one of another
# within a scope, and then the WMMA loads and stores (tvm_access_ptr of the old dtype)
# fail in LowerIntrin; in a scope of their own, bfloat16 pieces share only with
# bfloat16 pieces (the scan's queries and keys), and the float32 accumulator tiles
# (shared.dyn) with the other float32 tiles.  (Turning StorageRewrite off instead let
# MergeSharedMemoryAllocations place r over the logits it is computed from: a race.)
PIECES_SMEM = "shared"
TM = TN = ACC_TILE     # accumulator tile per thread of a "gemm" stage (tokens x outputs)
RED_CHUNK = 32         # reduction elements per staging of the coefficient tables
MIX_THREADS = 128
FILL_VECTOR = 4        # vector: elements per thread and step of a tile's load (fill stages)


class _Sched:
    def __init__(self, g: Graph, func: Any, config: Config):
        self.g = g
        # enable_check=False: y reads its tile stages at [n // tile, n % tile], which
        # cover the tokens [0, N) (TVM's region-cover check cannot prove it and would
        # refuse every compute_at under the root); the regions are still derived
        self.sch = s_tir.Schedule(func, enable_check=False)
        self.threads = int(config.get("num_threads", 256))
        # config knob "vector": operands of the products read into registers a vector
        # at a time (see gemm and segment_output); stages read that way get rows
        # aligned for it (``aligned``: their names)
        self.vector = bool(config.get("vector", 0))
        self.aligned: set = set()
        # a kernel with an "mma" stage runs its threads as (threadIdx.x 32, threadIdx.y
        # warps): the tensorized tiles are warp-wide calls, one warp per tile, so every
        # other stage of the kernel binds both axes too (``bind_threads``)
        self.warp = False

    # -- helpers -----------------------------------------------------------------------
    def own_loops(self, block: Any, lead: int) -> list:
        """The loops of ``block`` below its ``lead`` leading (unit) ones."""
        stmt = self.sch.get(block)
        n = len(stmt.iter_vars)
        return list(self.sch.get_loops(block)[-(n - lead):]) if n > lead else []

    def n_spatial(self, block: Any) -> int:
        return sum(1 for iv in self.sch.get(block).iter_vars if int(iv.iter_type) == 0)

    def bind_threads(self, fused: Any) -> Any:
        """Split ``fused`` over the block's threads (``warp``: threadIdx.y the warp,
        threadIdx.x its lane); returns the innermost loop."""
        sch = self.sch
        if self.warp:
            _, ty, tx = sch.split(fused, [None, self.threads // 32, 32])
            sch.bind(ty, "threadIdx.y")
        else:
            _, tx = sch.split(fused, [None, self.threads])
        sch.bind(tx, "threadIdx.x")
        return tx

    def flat_threads(self, loops: list) -> Any:
        """Fuse ``loops`` and spread them over the block's threads."""
        sch = self.sch
        if not loops:
            return None
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        return self.bind_threads(fused)

    def pad(self, block: Any, ndim: int, bits: int, aligned: bool = False) -> None:
        """Rows of a shared buffer an odd number of 32-bit words long (no bank conflicts
        between threads reading one column of neighbouring rows: an odd stride is
        coprime to the 32 banks).  Not "one word past a multiple of 32": that padded a
        row of 68 bf16 (34 words) to 130.  ``aligned``: rows read as 16-byte vectors,
        4 words past a multiple of 32 (16-byte aligned; consecutive rows start in
        different banks)."""
        if ndim < 2:
            return
        per_word = max(1, 32 // bits)
        if aligned:
            self.sch.storage_align(block, 0, ndim - 2, 32 * per_word, 4 * per_word)
        else:
            self.sch.storage_align(block, 0, ndim - 2, 2 * per_word, per_word)

    def vector_operands(self, block: Any, loop: Any, names: set) -> None:
        """The reads of ``block`` from the buffers ``names`` (base names, before the
        scope suffix) cached in registers at ``loop``, one vector per operand: a
        thread's TM (or TN) contiguous elements of one reduction step in one shared
        load instead of TM scalar loads (the products were shared-memory bound: ncu on
        the H100, L1/shared throughput 85% in the write kernel)."""
        sch = self.sch
        for idx, region in enumerate(sch.get(block).reads):
            if self._buffer(region) in names:
                # this block's own copy: the stage's other readers stay as they are
                local = sch.cache_read(block, idx, "local", consumer_blocks=[block])
                sch.compute_at(local, loop)
                loops = sch.get_loops(local)
                own = loops[[sch.get(x) for x in loops].index(sch.get(loop)) + 1:]
                if not own or int(sch.get(own[-1]).extent) not in (2, 4):
                    # nothing to vectorize (or TN = 5 under mma: no such vector): the copy
                    # stays a scalar one
                    continue
                try:
                    sch.vectorize(own[-1])
                except s_tir.ScheduleError:
                    # a tiny operand (K = 1: the copy's loop is bound to the reduction
                    # too) stays a scalar copy; TVM leaves the schedule as it was
                    pass

    def vector_fill(self, block: Any, loops: list) -> None:
        """A "fill" stage (a tile loaded from global memory) with FILL_VECTOR elements of
        its last axis per thread and step, vectorized: one global and one shared
        access per vector instead of one per element (with the element's guards)."""
        sch = self.sch
        if loops and int(sch.get(loops[-1]).extent) % FILL_VECTOR == 0:
            outer, lanes = sch.split(loops[-1], [None, FILL_VECTOR])
            self.flat_threads([*loops[:-1], outer])
            try:
                sch.vectorize(lanes)
            except s_tir.ScheduleError:
                pass  # (a fill TVM cannot vectorize stays a loop of FILL_VECTOR per thread)
        else:
            self.flat_threads(loops)

    def rows(self, block: Any, spatial: list, lead: int, threads: int) -> None:
        """A reduction per element of ``spatial`` (over threads), accumulated in a
        register and stored once (a read-modify-write of shared memory per term
        would need barriers under the threads' guards)."""
        sch = self.sch
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if self.warp and threads == self.threads:
            tx = self.bind_threads(fused)
        else:
            _, tx = sch.split(fused, [None, threads])
            sch.bind(tx, "threadIdx.x")
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, tx)
        sch.decompose_reduction(block, self.own_loops(block, lead)[-1])

    # -- the mixture's tables -------------------------------------------------------------
    def mixture(self) -> None:
        """a, b, c: one kernel each, the head over blockIdx.x, the table's elements
        over threads; the sum it subtracts (or c's sum over d) computed per head in
        shared memory."""
        sch = self.sch
        for name in self.g.inline:
            sch.compute_inline(sch.get_sblock(name))
        for table, total in self.g.mixtures:
            block = sch.get_sblock(table)
            loops = sch.get_loops(block)
            sch.bind(loops[0], "blockIdx.x")
            rest = loops[1:]
            fused = sch.fuse(*rest) if len(rest) > 1 else rest[0]
            _, tx = sch.split(fused, [None, MIX_THREADS])
            sch.bind(tx, "threadIdx.x")
            tot = sch.get_sblock(total)
            sch.set_scope(tot, 0, "shared")
            sch.compute_at(tot, loops[0], preserve_unit_loops=True)
            spatial = self.n_spatial(tot) - 1
            own = self.own_loops(tot, 1)
            if spatial:  # (spherical a: the sum [H] is one value per head, one thread)
                self.rows(tot, own[:spatial], 1, MIX_THREADS)

    # -- per-token stages at the tile loop ----------------------------------------------
    def tile_stages(self, tile_loop: Any, group: str = "") -> None:
        sch, g = self.sch, self.g
        tiled = [s for s in g.stages if s.loops == "bhti" and s.group == group]
        if self.vector:
            self.transpose_operands(tiled)
            # every stage's rows 16-byte aligned: the products read them as vectors
            self.aligned |= {s.name for s in tiled}
        pieces: set = set()  # the A operands of "mma" stages (bfloat16 token pieces)
        for stage in tiled:
            if stage.role == "mma":
                # WMMA loads and stores: rows a multiple of 16 bytes, tiles 32-byte aligned
                reads = {self._buffer(rg) for rg in sch.get(sch.get_sblock(stage.name)).reads}
                pieces |= {s.name for s in tiled if s.name in reads}
                self.aligned |= {stage.name} | pieces
        for stage in reversed(tiled):
            block = sch.get_sblock(stage.name)
            # the scope first: compute_at relaxes a shared buffer's region over the
            # threads (the whole tile for every thread of the block)
            sch.set_scope(block, 0, PIECES_SMEM if stage.name in pieces else SMEM)
            sch.compute_at(block, tile_loop, preserve_unit_loops=True)
            if stage.role != "rows":
                self.pad(block, stage.ndim, stage.bits, stage.name in self.aligned)
        for stage in tiled:
            block = sch.get_sblock(stage.name)
            loops = self.own_loops(block, 3)  # below b, h, t
            spatial = self.n_spatial(block) - 3
            if stage.role == "gemm":
                self.gemm(block, loops, stage.cache)
            elif stage.role == "mma":
                self.mma(block, loops)
            elif stage.role == "rows":
                self.rows(block, loops[:spatial], 3, self.threads)
            elif stage.role == "fill" and self.vector:
                self.vector_fill(block, loops[:spatial])
            else:
                self.flat_threads(loops[:spatial])

    @staticmethod
    def _buffer(region: Any) -> str:
        """The name of a read region's buffer less the shared scope's suffix (that of
        the stage or table it holds)."""
        return str(region).split("[", 1)[0].removesuffix("_" + SMEM.replace(".", "_"))

    def _transpose(self, block: Any) -> None:
        """The buffer ``block`` writes stored with its last two axes swapped."""
        self.sch.transform_layout(block, ("write", 0), lambda *ix: (*ix[:-2], ix[-1], ix[-2]))

    @staticmethod
    def _reduces_last(region: Any, reduce_vars: list) -> bool:
        """Whether the last index of a read region is a reduction variable's."""
        last = str(region.region[-1].min)
        return any(re.search(rf"\b{re.escape(v)}\b", last) for v in reduce_vars)

    def _reduce_vars(self, block: Any) -> list:
        return [iv.var.name for iv in self.sch.get(block).iter_vars if int(iv.iter_type) == 2]

    def transpose_operands(self, tiled: list) -> None:
        """vector: a tile stage that every "gemm" stage reading it reads along its
        last axis (an operand [.., x, r], r reduced) is stored [.., r, x], so that a
        thread's contiguous x of one reduction step are one vector in shared memory.
        A stage read both ways (the scan's key responsibilities) keeps its layout."""
        sch = self.sch
        names = {s.name for s in tiled}
        ways: dict = {}
        for stage in tiled:
            if stage.role != "gemm":
                continue
            block = sch.get_sblock(stage.name)
            red = self._reduce_vars(block)
            for region in sch.get(block).reads:
                base = self._buffer(region)
                if base in names and base != stage.name:
                    ways.setdefault(base, set()).add(self._reduces_last(region, red))
        for base, along in ways.items():
            if along == {True}:
                self._transpose(sch.get_sblock(base))

    def gemm(self, block: Any, loops: list, cache: tuple) -> None:
        """(i, n) spatial, r reduced: TM x TN accumulators per thread in registers,
        the reduction in chunks of RED_CHUNK with ``cache`` tables staged in shared."""
        sch = self.sch
        i, n, r = loops[-3:]
        # each thread owns TM x TN contiguous (row, column) pairs: a strided assignment
        # would read neighbouring rows across threads but its register tile is
        # compacted to the bounding box (thousands of floats of local memory)
        io, ii = sch.split(i, [None, TM])
        no, ni = sch.split(n, [None, TN])
        extent = int(sch.get(r).extent)
        ro, ri = sch.split(r, [None, min(extent, RED_CHUNK)])
        sch.reorder(io, no, ro, ri, ii, ni)
        fused = sch.fuse(io, no)
        tx = self.bind_threads(fused)
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, tx)
        reduce_vars = self._reduce_vars(block)
        for name in cache:
            # this block's own copy (the scan's three responsibilities read the same tables)
            staged = sch.cache_read(block, name, SMEM, consumer_blocks=[block])
            sch.compute_at(staged, ro)
            if self.vector:
                # a table read [.., n, r] (the logits' [H, K, D]) is stored [.., r, n]:
                # a thread's TN outputs of one reduction step are then contiguous
                region = [rg for rg in sch.get(block).reads if self._buffer(rg) == name]
                if region and self._reduces_last(region[0], reduce_vars):
                    self._transpose(staged)
            self.pad(staged, 3, 32, self.vector)  # [H, K, D] tables, float32
            cl = sch.get_loops(staged)
            depth = [sch.get(x) for x in cl].index(sch.get(ro))
            self.flat_threads(list(cl[depth + 1:]))
        sch.decompose_reduction(block, ro)
        if self.vector:
            # the staged tables and the kernel's own tile stages (the scan's products)
            tiled = {s.name for s in self.g.stages if s.loops == "bhti"}
            self.vector_operands(block, ri, set(cache) | tiled)
        if self.vector:
            # the chunk's reduction unrolled too: the operand addresses become constant
            # offsets (write kernel, sm_90 SASS: 1619 instructions per 1024 FFMA, were
            # 16 x 98 + 205); with scalar operand loads nvcc then spills (234 local
            # accesses per chunk), so only with vector
            sch.unroll(ri)
        sch.unroll(ii)
        sch.unroll(ni)

    def mma(self, block: Any, loops: list) -> None:
        """(i, k) spatial, (p, l, d) reduced, C[i, k] = sum A[i, (p, d)] B[(p, l, d), k]
        (the logits from pieces: ``Graph._mma_logits``) on tensor cores: 16 x 16 tiles
        of C, one warp each (threadIdx.y; several per warp in turn), accumulated in a
        WMMA fragment over (p, l, d / 16), A's fragments from the kernel's shared tile,
        B's from global memory, C stored to the stage's shared buffer."""
        from . import wmma

        wmma.require()
        sch = self.sch
        T = wmma.TILE
        i, k, p, lv, d = loops[-5:]
        i0, i1 = sch.split(i, [None, T])
        k0, k1 = sch.split(k, [None, T])
        d0, d1 = sch.split(d, [None, T])
        sch.reorder(i0, k0, p, lv, d0, i1, k1, d1)
        tile = sch.blockize(i1)
        fused = sch.fuse(i0, k0)
        tiles = int(sch.get(fused).extent)
        warps = self.threads // 32
        if tiles % warps:  # (Graph.mma_cols pads the columns for this)
            raise ValueError(f"tvm backend: mma: {tiles} tiles of 16 x 16 over {warps} warps; "
                             f"expected a multiple")
        turns, warp = sch.split(fused, [None, warps])
        sch.reorder(warp, turns)
        sch.bind(warp, "threadIdx.y")
        reads = [str(rg).split("[", 1)[0] for rg in sch.get(tile).reads]
        a_idx = next(n for n, name in enumerate(reads) if name.endswith(("_xp", "_xp_shared")))
        b_idx = next(n for n, name in enumerate(reads) if name.endswith("_pieces"))
        # this tile's own fragments (the scan's two responsibilities read one table)
        frag_a = sch.cache_read(tile, a_idx, "wmma.matrix_a", consumer_blocks=[tile])
        frag_b = sch.cache_read(tile, b_idx, "wmma.matrix_b", consumer_blocks=[tile])
        sch.compute_at(frag_a, d0)
        sch.compute_at(frag_b, d0)
        acc = sch.cache_write(tile, 0, "wmma.accumulator")
        sch.reverse_compute_at(acc, turns)
        init = sch.decompose_reduction(tile, p)
        sch.tensorize(sch.get_loops(frag_a)[-2], wmma.LOAD_A)
        sch.tensorize(sch.get_loops(frag_b)[-2], wmma.LOAD_B)
        sch.tensorize(tile, wmma.SYNC)
        sch.tensorize(init, wmma.FILL)
        store_name = sch.get(acc).name_hint
        sch.tensorize(sch.get_loops(acc)[-2], wmma.STORE)
        # the stage's rows padded, on the block that writes them now (the tile's own
        # annotation went with the blockize, the store's with the tensorize): rows of 64
        # floats put every token of the max / sum stages on one bank
        store = sch.get_sblock(store_name + "_o")
        self.pad(store, len(sch.get(store).writes[0].region), 32, True)

    # -- anchors ---------------------------------------------------------------------------
    def token_output(self, name: str, loops_kind: str) -> Any:
        """y / R [B, N, H, X] or [B, H, N, X]: b over blockIdx.z, h over blockIdx.y, token
        tiles over blockIdx.x, (token, x) over the threads; returns the tile loop."""
        sch = self.sch
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        if loops_kind == "bnh":
            sch.reorder(loops[2], loops[1])
            loops = sch.get_loops(block)
        b, h, n = loops[:3]
        # b and h on blockIdx.z and .y of their own, not fused on one axis: every index
        # of a fused axis needs blockIdx.y / H and % H (H symbolic), and nvcc cannot hoist
        # a division by a runtime value out of the guarded statements that use it (it
        # may trap), so each guarded load and store paid for one (ncu on the H200: the
        # write kernel executed ~2.5x the warp instructions of its arithmetic)
        sch.bind(b, "blockIdx.z")
        sch.bind(h, "blockIdx.y")
        nt, ni = sch.split(n, [None, self.g.tile])
        sch.bind(nt, "blockIdx.x")
        rest = list(loops[3:])
        width = 1
        for loop in rest:
            width *= int(sch.get(loop).extent)
        if (self.g.tile * width) % self.threads == 0:
            # token-major: consecutive threads store consecutive elements of a row
            self.flat_threads([ni, *rest])
        else:
            # element-major: with the thread loop padded past the tile, a token-major
            # token index (fused // width) would run into the next tile, and the stages
            # computed at the tile loop would be computed for two tiles (buffers of
            # symbolic extent min(NT, 2) tiles, which TVM 0.27's SplitHostDevice then
            # refuses); here the token is fused % tile, always inside the tile
            sch.reorder(*rest, ni)
            self.flat_threads([*rest, ni])
        return nt

    def segment_output(self, name: str) -> Any:
        """S_part [B, H, NSEG, K, Dv + 1] reduced over (tile, token): h over
        blockIdx.y, segments over blockIdx.x, TM x TN accumulator tiles of (k, e)
        over threads, b (with the k rows past 1024 threads) over blockIdx.z; returns
        the tile loop."""
        sch = self.sch
        block = sch.get_sblock(name)
        b, h, s, k, e, jt, ji = sch.get_loops(block)
        sch.bind(h, "blockIdx.y")  # b with the k splits on blockIdx.z (token_output: why)
        sch.bind(s, "blockIdx.x")
        # (mma: TN columns per thread such that the threads are the block's warps,
        # Graph.segment_layout)
        tn = self.g.seg_cols.get(name, TN)
        ko, ki = sch.split(k, [None, TM])
        eo, ei = sch.split(e, [None, tn])
        sch.reorder(ko, eo, jt, ji, ki, ei)
        k_tiles, e_tiles = int(sch.get(ko).extent), int(sch.get(eo).extent)
        # one thread per accumulator tile.  Not rounded up to a warp: with fewer tiles
        # than threads TVM 0.27 dropped the predicate of the accumulators' write-back
        # (tx < count and the last column tile past Dv + 1), so idle threads stored
        # garbage over other threads' S_seg (seen on an H200 at K = 4, Dv = 8:
        # bidirectional y off by 80%).  Past 1024 tiles, whole rows of k tiles go to
        # blockIdx.z, as many per block as divide the k tiles (no padded block): a
        # split of the fused (k, e) tiles instead left TVM a k range per block it could
        # not bound, and at K = Dv = 256 the block's r stage took 26 MB of shared memory
        per_block = max(d for d in range(1, k_tiles + 1)
                        if k_tiles % d == 0 and d * e_tiles <= 1024) if e_tiles <= 1024 else 1
        kz, kin = sch.split(ko, [None, per_block])
        sch.reorder(b, kz, h, s, kin, eo)
        # (b, kz): a division by the constant extent of kz only
        sch.bind(sch.fuse(b, kz), "blockIdx.z")
        tx = sch.fuse(kin, eo)
        if self.warp:
            if per_block * e_tiles != self.threads:
                raise ValueError(f"tvm backend: mma: {per_block} x {e_tiles} accumulator tiles "
                                 f"of {name} for {self.threads} threads")
            ty, tx = sch.split(tx, [self.threads // 32, 32])
            sch.bind(ty, "threadIdx.y")
        self.threads = per_block * e_tiles
        sch.bind(tx, "threadIdx.x")
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, tx)
        sch.decompose_reduction(block, jt)
        if self.vector:
            # r [tile, K] and [m v, m] [tile, W] of one token: a thread's TM k and TN
            # columns are contiguous in their rows
            operands = {self._buffer(rg) for rg in sch.get(block).reads} - {name}
            operands = {o for o in operands if not o.endswith("_local")}
            self.aligned |= operands
            self.vector_operands(block, sch.get_loops(block)[-3], operands)
        sch.unroll(ki)
        sch.unroll(ei)
        return jt

    def small(self, name: str) -> None:
        """A per-(b, h) stage (the sum of the segments): all spatial loops over
        blockIdx.x / threadIdx.x, its reduction serial and in order."""
        sch = self.sch
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)[:self.n_spatial(block)]
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        bx, tx = sch.split(fused, [None, MIX_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")


def schedule_tiled(g: Graph, func: Any, config: Config) -> Any:
    """The scheduled ``s_tir.Schedule`` of a tiled graph (see the module docstring):
    one kernel per "out" stage (anchor), each with the tiled stages of its group."""
    s = _Sched(g, func, config)
    anchors = [st for st in g.stages if st.role == "out"]
    groups = [st.group for st in anchors]
    if not anchors or len(set(groups)) != len(groups):
        raise ValueError(f"tvm backend: a tiled graph needs one 'out' stage per group, got "
                         f"{anchors}")
    for anchor in anchors:
        # each kernel its own thread count (segment_output takes one per accumulator tile)
        s.threads = int(config.get("num_threads", 256))
        s.warp = any(st.role == "mma" and st.group == anchor.group for st in g.stages)
        if anchor.loops == "bhs":
            tile_loop = s.segment_output(anchor.name)
        else:
            tile_loop = s.token_output(anchor.name, anchor.loops)
        s.tile_stages(tile_loop, anchor.group)
    # the small kernels (the mixture's tables, the pieces, the sums of segments) bind
    # threadIdx.x alone, MIX_THREADS wide: not the last tiled kernel's warps (their
    # reductions took threadIdx.y and broke the mixture's sums over k)
    s.warp = False
    s.mixture()
    for stage in g.stages:
        if stage.loops == "bh":
            s.small(stage.name)
    return s.sch
