"""schedule_float: CPU schedules for the float TensorIR that TVM's LegalizeOps leaves unscheduled.

Pipeline position: after TVM's LegalizeOps + FuseOps + FuseTIR (pipeline.passes), right before `tvm.compile`.
TVM's default legalisation writes every op as plain loops in the op's own order; for a float matmul the reduction
is the innermost loop and the second operand is read with a stride, so LLVM neither vectorises it nor keeps the
accumulators in registers. A BitNet backbone's attention (QK^T and PV per head: [B*H, 64, 128] x [B*H, 128, 64]
at 64 tokens) then costs as much as its seven ternary GEMMs.

What is scheduled here (everything else is left as it is):
  - a PrimFunc whose one block is a matmul-like reduction (spatial axes ..., i, j; one reduction axis k, the
    last loop; constant i and j): register-blocked as (..., i/4, j/V, k, i%4, j%V) with the 4 x V accumulators
    in a local buffer, j%V vectorised, i%4 unrolled. Each output is still summed over k in order: the same floats.
  - otherwise, first each elementwise intermediate read by one elementwise block of its shape is inlined into it
    (FuseTIR leaves a fused chain as separate loop nests over full-size buffers: RoPE's slices and concat, a
    norm's scaling, relu^2 * up), then each block over a last axis that is a multiple of the vector width: a reduction (RMSNorm's sum
    of squares, softmax's max and sum) computed as one vector of partial results (rfactor) then summed, an
    elementwise block (RoPE, residual adds, relu^2 * up) vectorised. The partial sums change the float
    summation order (RMSNorm's mean of squares over 2560 values: ~1e-6 relative). TVM's dlight CPU `Reduction`
    rule was measured first: it leaves the sum a scalar chain (the same time as unscheduled at 1 thread).
The compile's own kernels (PrimFuncs named `bitrl_*`, already scheduled) are never touched.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

ROWS = 4  # i's register block


def _const(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def _lanes(target) -> int:
    """float32 lanes of the target's vector registers (at least 4)."""
    from tvm.target.codegen import llvm_get_vector_width

    try:
        bits = llvm_get_vector_width(target)
    except Exception:  # noqa: BLE001 - a target LLVM does not know: 128-bit vectors
        bits = 128
    return max(int(bits) // 32, 4)


def _matmul_block(sch):
    """The block of a one-block matmul-like PrimFunc (iter kinds S..SR, loops in that order), or None."""
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    if len(blocks) != 1:
        return None
    block = blocks[0]
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]  # 0: data parallel, 2: reduction
    if len(kinds) < 3 or kinds[-1] != 2 or any(k != 0 for k in kinds[:-1]) or stmt.init is None:
        return None
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "float32":
        return None
    loops = sch.get_loops(block)
    if len(loops) != len(kinds):
        return None
    return block


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - a PrimFunc without a root block
        return False


def schedule_matmul(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """`func` register-blocked (see the module docstring), or None if it is not a matmul-like PrimFunc."""
    sch = s_tir.Schedule(func)
    block = _matmul_block(sch)
    if block is None:
        return None
    *outer, i, j, k = sch.get_loops(block)
    ni, nj = _const(sch.get(i).extent), _const(sch.get(j).extent)
    if ni is None or nj is None:
        return None
    v = next((v for v in (2 * lanes, lanes, 4) if nj % v == 0), None)
    if v is None or ni % ROWS:
        return None
    io, ii = sch.split(i, [None, ROWS])
    jo, ji = sch.split(j, [None, v])
    sch.reorder(*outer, io, jo, k, ii, ji)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, jo, preserve_unit_loops=True)
    if outer:  # batch x heads: parallel (the compile's own kernels also run on TVM's thread pool)
        sch.parallel(outer[0])
    sch.vectorize(ji)
    sch.unroll(ii)
    init = sch.decompose_reduction(block, k)
    init_loop = sch.get_loops(init)[-1]
    if int(sch.get(init_loop).kind) != int(tirx.ForKind.VECTORIZED):
        sch.vectorize(init_loop)
    sch.vectorize(sch.get_loops(acc)[-1])
    return sch.mod["main"]


def schedule_rows(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """Each block of `func` whose innermost loop is a constant multiple of `lanes` (and is the block's last axis):
    a reduction over it (RMSNorm's sum of squares, softmax's max and sum) split into `lanes` partial results
    (rfactor) kept in one vector register, then summed; an elementwise block vectorised on it. None if no block
    qualifies (the PrimFunc is left as it is)."""
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    changed = False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[:-1]:  # elementwise intermediates (RoPE's slices, a norm's scaling) into their reader
        if _inlinable(sch, block):
            try:
                sch.compute_inline(block)
                changed = True
            except s_tir.ScheduleError:
                pass
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
        loops = sch.get_loops(block)
        if not kinds or len(loops) != len(kinds) or any(k not in (0, 2) for k in kinds) or kinds.count(2) > 1:
            continue
        extent = _const(sch.get(loops[-1]).extent)
        if extent is None or extent % lanes or str(stmt.writes[0].source.dtype) != "float32":
            continue
        if kinds[-1] == 2 and stmt.init is not None and len(stmt.writes) == 1:
            _, inner = sch.split(loops[-1], [None, lanes])
            partial = sch.rfactor(inner, len(loops) - 1)
            partial_loops = sch.get_loops(partial)
            sch.vectorize(partial_loops[-1])
            sch.decompose_reduction(partial, partial_loops[-2])
            changed = True
        elif 2 not in kinds:
            _, inner = sch.split(loops[-1], [None, lanes])
            sch.vectorize(inner)
            changed = True
    return sch.mod["main"] if changed else None


def _inlinable(sch, block) -> bool:
    """An elementwise block read by one elementwise block of its own shape (not by a reduction, which would
    recompute it per use, nor broadcast, which would recompute it per element)."""
    consumers = sch.get_consumers(block)
    if len(consumers) != 1:
        return False
    producer, consumer = sch.get(block), sch.get(consumers[0])
    if any(int(iv.iter_type) != 0 for iv in (*producer.iter_vars, *consumer.iter_vars)):
        return False
    shape = [str(d) for d in producer.writes[0].source.shape]
    return len(producer.writes) == 1 and shape == [str(d) for d in consumer.writes[0].source.shape]


def _schedulable(gv, func) -> bool:
    return (isinstance(func, tirx.PrimFunc) and not gv.name_hint.startswith("bitrl_")
            and not (func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)))
            and not (func.attrs is not None and any(str(k).startswith("bitrl.") for k in dict(func.attrs))))


def schedule_float(tvm_target):
    """The pass (see the module docstring) for `tvm_target` (its vector width sets the matmul's lanes)."""
    lanes = _lanes(tvm_target)

    @tvm.transform.module_pass(opt_level=0, name="bitrl.ScheduleFloat")
    def _pass(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not _schedulable(gv, func):
                continue
            try:
                scheduled = schedule_matmul(func, lanes)
                if scheduled is None:
                    scheduled = schedule_rows(func, lanes)
            except s_tir.ScheduleError:  # a form these rules did not foresee: left as TVM legalised it
                scheduled = None
            if scheduled is not None:
                updates[gv] = scheduled.with_attr("tirx.is_scheduled", True)
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
