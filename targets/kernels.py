"""TensorIR BitLinear kernels: the math of `bitrl_compile.quant` on 2-bit weight tiles, per ISA.

One PrimFunc per (K, N, activation, scale kind) and kernel spec (targets.KERNELS), symbolic in the batch:

    x[B, K] f32, w[NT, KB, NL, KG] u8 (layout tiles{NL}x{KG}, runtime/weights.py), gamma[G] f32,
    bias[N] f32  ->  y[B, N] f32

Stages, each computed once per row or per output:
    amax[b]   = max_k |x[b, k]|                       per row (vectorised: rfactor over lanes)
    scale[b]  = 127 / max(amax[b], eps)               per row
    x_q[b, k] = int8(clip(round(x * scale), -128, 127)), zero-padded to KB * 4 KG inputs
    xsum[b]   = sum_k x_q[b, k]                       per row (int32)
    acc[b, n] = sum_k (w[n, k] + 1) * x_q[b, k]       int32, exact: the tensor intrinsics of
                                                      targets/intrinsics.py, one per ISA
    y[b, n]   = act(fma(f32(acc - xsum), gamma / scale, bias))   dot(w+1, a) - sum(a) = dot(w, a)

The rescale is an explicit fma (`tirx.fma`, one rounding), so the result does not depend on whether
LLVM contracts a multiply and an add; `quant.fma_f32` is its bit-exact numpy twin. Per-tensor gamma /
scale is computed once per row; per-channel gamma[n] / scale[b] once per output (a float32 division,
as in the reference).

The lookup-table kernels (spec.method == "lut", layout lut{NL}) replace xsum and acc: per row and input
pair g they build a 16-entry table of the pair's partial sums (`_pair_tables`), and acc[b, n] is the sum
over the pairs of table_g[index of w's two trits]: dot(w, a) itself, no sum(a) to subtract.

Rows are computed in register blocks of `spec.rows` (each decoded weight tile is reused for all of
them: the GEMM part) and the remaining rows one at a time (the GEMV part: batch 1 is a policy step).
For the ISAs in PANEL_ISAS (avx512-vnni) a register block is a panel: one intrinsic call computes
spec.rows rows x panel_tiles() output tiles over the whole of K with the accumulators in registers (the
other ISAs call their intrinsic once per K step and keep the accumulators in memory).
With spec.amx_rows (the `amx` kernel, K >= 128), blocks of that many rows come first, as AMX tile
products (intrinsics.py); the register blocks and single rows take the rest. Output tiles are split
across threads when a layer is large enough to pay for it. The rasp4 lookup-table kernel (`neon-lut`) gets a
hand-written GEMM path for batches of 8 rows or more in the same PrimFunc (targets/gemm_neon.py: int16 `mla` on
register blocks of 8 rows x 16 channels, about half the instructions of the tables at batch 64).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import tvm
from tvm import te
from tvm import tirx as T

from bitrl_compile.quant import EPS, FUSABLE_ACTIVATIONS, QMAX
from bitrl_compile.runtime.tvm_runtime import enable_amx
from bitrl_compile.runtime.weights import tiles_packed_shape

from . import KernelSpec, gemm_neon, intrinsics, kernel_spec
from .epilogue import PARALLEL_MIN_WORK, activate
from .intrinsics import AMX_STEPS


def row_scales(x, batch, k: int, spec: KernelSpec):
    """The activation scale of each row of x [batch, k] (te): 127 / max(max_k |x[b, k]|, eps), the max as `lanes`
    partial maxima (block "amax_lanes", vectorised by `schedule_row_scales`) and then their max."""
    lanes = spec.vector if k % spec.vector == 0 and k > spec.vector else 1
    r = te.reduce_axis((0, k // lanes), name="r")
    amax_lanes = te.compute((batch, lanes), lambda b, v: te.max(te.abs(x[b, r * lanes + v]), axis=r),
                            name="amax_lanes")
    rv = te.reduce_axis((0, lanes), name="rv")
    amax = te.compute((batch,), lambda b: te.max(amax_lanes[b, rv], axis=rv), name="amax")
    return te.compute((batch,), lambda b: T.const(float(QMAX), "float32") /
                      T.max(amax[b], T.const(float(EPS), "float32")), name="scale")


def quantize_value(value, scale):
    """One activation as int8: clip(round(value * scale), -128, 127) (quant.quantize_activations)."""
    return T.Cast("int8", T.max(T.min(T.round(value * scale), T.const(127.0, "float32")),
                                T.const(-128.0, "float32")))


def schedule_row_scales(sch) -> None:
    """Vectorise the partial maxima of `row_scales` (when there is more than one lane)."""
    if int(sch.get(sch.get_loops(sch.get_sblock("amax_lanes"))[1]).extent) > 1:
        _vectorize_lanes(sch, "amax_lanes")


def kernel_name(k: int, n: int, activation: str, per_channel: bool) -> str:
    return f"bitrl_bitlinear_k{k}_n{n}_{activation}{'_pc' if per_channel else ''}"


def bitlinear_primfunc(k: int, n: int, activation: str = "none", per_channel: bool = False,
                       spec: KernelSpec | None = None, batch: int | None = None):
    """The unscheduled BitLinear PrimFunc for a K -> N layer, weights in spec.layout; symbolic in the
    batch unless `batch` is given (tuning measures a concrete batch)."""
    if activation not in FUSABLE_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not fusable; expected one of {FUSABLE_ACTIVATIONS}")
    spec = spec or kernel_spec(None)
    nt, kb, nl, kg = tiles_packed_shape(n, k, spec.layout)
    kb_x = -(-kb // AMX_STEPS) * AMX_STEPS if amx_used(spec, kb) else kb  # AMX reads 64 inputs at a time
    kp = kb_x * 4 * kg
    batch = T.Var("batch", "int64") if batch is None else T.const(batch, "int64")
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((nt, kb, nl, kg), "uint8", name="w")
    gamma = te.placeholder((n if per_channel else 1,), "float32", name="gamma")
    bias = te.placeholder((n,), "float32", name="bias")

    scale = row_scales(x, batch, k, spec)

    def quantize(b, i, q, j):
        idx = i * (4 * kg) + q * kg + j
        value = x[b, T.min(idx, k - 1)] if kp != k else x[b, idx]  # the clamp keeps padded lanes in bounds
        v = quantize_value(value, scale[b])
        return T.if_then_else(idx < k, v, T.const(0, "int8")) if kp != k else v

    x_q = te.compute((batch, kb_x, 4, kg), quantize, name="x_q")
    if spec.method == "lut":
        xsum = None
        lut_lo, lut_hi = _pair_tables(x_q, batch, kb)

        def dot(row, jo, i):  # sum over input pairs g of table_g[index of the pair's two trits], spelled
            # as sum_e [index == e] table_g[e] (the intrinsics do the lookup; see targets/intrinsics.py)
            ri, rh, re_ = te.reduce_axis((0, kb), "rkb"), te.reduce_axis((0, 2), "rh"), te.reduce_axis((0, 16), "re")
            idx = T.Cast("int32", (w[jo, ri, i, 0] >> T.Cast("uint8", rh * 4)) & T.const(15, "uint8"))
            entry = T.Cast("int32", lut_hi[row, ri * 2 + rh, re_]) * 256 + T.Cast("int32", lut_lo[row, ri * 2 + rh, re_])
            return te.sum(T.if_then_else(idx == re_, entry, 0), axis=[ri, rh, re_])
    else:
        ri = te.reduce_axis((0, kb), name="ri")  # per row: 4 KG partial sums, then their sum
        xsum_lanes = te.compute((batch, 4 * kg), lambda b, v: te.sum(T.Cast("int32", x_q[b, ri, v // kg, v % kg]),
                                                                     axis=ri), name="xsum_lanes")
        rv = te.reduce_axis((0, 4 * kg), name="rv")
        xsum = te.compute((batch,), lambda b: te.sum(xsum_lanes[b, rv], axis=rv), name="xsum")

        def dot(row, jo, i):
            ri, rp, rj = te.reduce_axis((0, kb), "rkb"), te.reduce_axis((0, 4), "rq"), te.reduce_axis((0, kg), "rk")
            code = (w[jo, ri, i, rj] >> T.Cast("uint8", rp * 2)) & T.const(3, "uint8")
            return te.sum(T.Cast("int32", code) * T.Cast("int32", x_q[row, ri, rp, rj]), axis=[ri, rp, rj])

    # Row paths, in order: AMX tiles of spec.amx_rows rows, register blocks of spec.rows rows, single rows.
    amx_rows, rows = (spec.amx_rows if amx_used(spec, kb) else 0), spec.rows
    acc_amx = acc_block = None
    if amx_rows:
        amx_end = batch // amx_rows * amx_rows
        acc_amx = te.compute((batch // amx_rows, amx_rows, nt, nl),
                             lambda t, b, jo, i: dot(t * amx_rows + b, jo, i), name="acc_amx")
    else:
        amx_end = None

    def after_amx(e):  # a row index counted from the first row after the AMX tiles
        return e if amx_end is None else amx_end + e

    if rows > 1:
        rest = batch if amx_end is None else batch - amx_end  # the rows after the AMX tiles
        blocked = after_amx(rest // rows * rows)
        acc_block = te.compute((rest // rows, rows, nt, nl),
                               lambda t, b, jo, i: dot(after_amx(t * rows + b), jo, i), name="acc_block")
    else:
        blocked = T.const(0, "int64") if amx_end is None else amx_end
    acc_row = te.compute((batch - blocked, 1, nt, nl), lambda t, b, jo, i: dot(blocked + t + b, jo, i),
                         name="acc_row")
    rescale = None if per_channel else te.compute((batch,), lambda b: gamma[0] / scale[b], name="rescale")

    def epilogue(b, j):
        jo, i = j // nl, j % nl
        a = acc_row[b - blocked, 0, jo, i]
        if acc_block is not None:
            r = b if amx_end is None else b - amx_end
            a = T.if_then_else(b < blocked, acc_block[r // rows, r % rows, jo, i], a)
        if acc_amx is not None:
            a = T.if_then_else(b < amx_end, acc_amx[b // amx_rows, b % amx_rows, jo, i], a)
        c = gamma[j] / scale[b] if per_channel else rescale[b]
        return activate(T.op.fma(T.Cast("float32", a if xsum is None else a - xsum[b]), c, bias[j]), activation)

    y = te.compute((batch, n), epilogue, name="y")
    func = te.create_prim_func([x, w, gamma, bias, y])
    attrs = {"global_symbol": kernel_name(k, n, activation, per_channel), "bitrl.activation": activation,
             "bitrl.isa": spec.isa, "bitrl.weight_layout": spec.layout, "bitrl.n": n, "bitrl.k": k}
    # part of the workload hash: tuning records of the per-step GEMM rows are stale (those of batch < rows are not)
    if panel_used(spec, kb) and not (isinstance(batch, tvm.tirx.IntImm) and batch.value < spec.rows):
        attrs["bitrl.gemm"] = "panel"
    return func.with_attrs(attrs)


AMX_MIN_STEPS = 8  # K >= 128: below, the tile setup costs more than AMX saves (docs/kernels.md)
AMX_TILES = 4      # output tiles per AMX intrinsic (independent accumulator tiles sharing the A tile)


def amx_used(spec: KernelSpec, kb: int) -> bool:
    """Whether a kernel with `kb` steps of K computes its blocks of spec.amx_rows rows with AMX."""
    return spec.amx_rows > 0 and kb >= AMX_MIN_STEPS


PANEL_ISAS = ("avx512-vnni",)  # ISAs whose register blocks are panels over the whole of K (intrinsics.py)
PANEL_TILES = 4  # output tiles per panel: 4 rows x 4 tiles = 16 zmm accumulators, 4 decoded planes, of 32 registers


def panel_used(spec: KernelSpec, kb: int) -> bool:
    """Whether the GEMM rows (register blocks of spec.rows) of a kernel with `kb` K steps run as panels: one
    intrinsic call per block of rows and panel_tiles() output tiles over all of K, the accumulators in
    registers throughout. K <= 16 (one step) keeps the per-step intrinsic (tensorize drops a loop of one)."""
    return spec.isa in PANEL_ISAS and spec.method == "dot" and spec.rows > 1 and kb > 1


def panel_tiles(nt: int) -> int:
    """Output tiles per panel for a kernel of `nt` tiles: PANEL_TILES, or the largest of 2, 1 dividing nt."""
    return next(v for v in (PANEL_TILES, 2, 1) if nt % v == 0)


def row_paths(spec: KernelSpec, k: int, batch: int) -> dict[str, int]:
    """How many of `batch` rows each path computes: "amx" (tile products), "gemm" (register blocks of
    spec.rows) and "gemv" (single rows). The knobs of a path only matter when it has rows."""
    kb = tiles_packed_shape(1, k, spec.layout)[1]
    amx = batch // spec.amx_rows * spec.amx_rows if amx_used(spec, kb) else 0
    gemm = (batch - amx) // spec.rows * spec.rows if spec.rows > 1 else 0
    return {"amx": amx, "gemm": gemm, "gemv": batch - amx - gemm}


def _pair_tables(x_q, batch, kb: int):
    """The lut kernels' tables: per row b and input pair g, v[e] = (e % 3 - 1) a0 + (e // 3 - 1) a1 for
    table index e = c0 + 3 c1 < 9 (0 for e >= 9), as low bytes (uint8) and high bytes (int8)."""
    def entry(b, g, e):
        a0 = T.Cast("int16", x_q[b, g // 2, (g % 2) * 2, 0])
        a1 = T.Cast("int16", x_q[b, g // 2, (g % 2) * 2 + 1, 0])
        v = T.Cast("int16", e % 3 - 1) * a0 + T.Cast("int16", e // 3 - 1) * a1
        return T.Select(e < 9, v, T.const(0, "int16"))  # Select, not if_then_else: it vectorizes

    def both(b, g, e):  # one block writes both tables: each entry is computed once
        v = entry(b, g, e)
        return [T.Cast("uint8", v), T.Cast("int8", v >> T.const(8, "int16"))]

    lut_lo, lut_hi = te.compute((batch, 2 * kb, 16), both, name="lut")
    return lut_lo, lut_hi


def _vectorize_lanes(sch, block: str) -> None:
    """A [batch, lanes] reduction block: make the lanes the inner loop, one vector op per step."""
    blk = sch.get_sblock(block)
    _, lane, red = sch.get_loops(blk)
    sch.reorder(red, lane)
    sch.vectorize(lane)
    init = sch.decompose_reduction(blk, red)
    sch.vectorize(sch.get_loops(init)[-1])


@dataclass(frozen=True)
class Knobs:
    """The schedule's tunable choices; the defaults are the hand-written schedule.

    For each row path (GEMV: the batch % rows tail rows, one at a time; GEMM: register blocks of
    spec.rows rows): `*_tiles` output tiles computed side by side for each step of K (independent
    accumulators that share one activation load), `*_unroll` steps of K unrolled. Every choice keeps
    the integer math and the epilogue as they are, so any point of the space is bit-exact. The GEMM
    panels of PANEL_ISAS have a fixed width (panel_tiles: 16 accumulators fill the register file), so
    gemm_tiles does not apply to them; gemm_unroll unrolls the panel's K loop.
    """

    gemv_tiles: int = 1
    gemv_unroll: int = 1
    gemm_tiles: int = 1
    gemm_unroll: int = 1

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def fit(self, nt: int, kb: int) -> bool:
        """Whether every knob divides its extent: `*_tiles` the NT output tiles, `*_unroll` the KB K steps."""
        return all(v >= 1 and (nt if name.endswith("tiles") else kb) % v == 0 for name, v in self.as_dict().items())


DEFAULT_KNOBS = Knobs()


def kernel_shape(func, spec: KernelSpec) -> tuple[int, int]:
    """(NT, KB) of a kernel: output tiles and K steps, the extents the knobs must divide."""
    nt, kb, _, _ = tiles_packed_shape(int(func.attrs["bitrl.n"]), int(func.attrs["bitrl.k"]), spec.layout)
    return (nt, kb // intrinsics.lut_steps(kb)) if spec.method == "lut" else (nt, kb)


def apply_schedule(sch, spec: KernelSpec, knobs: Knobs = DEFAULT_KNOBS) -> None:
    """Schedule the kernel in `sch` (a tvm.s_tir.Schedule of bitlinear_primfunc) with the given knobs."""
    func = sch.mod["main"]
    k, n = int(func.attrs["bitrl.k"]), int(func.attrs["bitrl.n"])
    nt, kb_extent = kernel_shape(func, spec)
    if not knobs.fit(nt, kb_extent):
        raise ValueError(f"knobs {knobs} do not divide the kernel's {nt} tiles x {kb_extent} K steps")
    vl = spec.vector

    schedule_row_scales(sch)
    if spec.method == "lut":
        sch.vectorize(sch.get_loops(sch.get_sblock("lut_v0"))[-1])  # one loop nest writes both tables
    else:
        _vectorize_lanes(sch, "xsum_lanes")
    _, i, q, j = sch.get_loops(sch.get_sblock("x_q"))
    lanes = sch.fuse(i, q, j)
    if int(sch.get(lanes).extent) % vl == 0:
        sch.vectorize(sch.split(lanes, [None, vl])[1])

    parallel = k * n >= PARALLEL_MIN_WORK
    if amx_used(spec, kb_extent):  # one AMX intrinsic per (block of amx_rows rows, AMX_TILES output tiles)
        blk = sch.get_sblock("acc_amx")
        t, r, jo, ji, kb, q, kk = sch.get_loops(blk)
        tiles = next(v for v in (AMX_TILES, 2, 1) if nt % v == 0)
        # blocks outermost: with batch < amx_rows the path costs nothing (not even a parallel launch)
        if tiles > 1:
            jo, jo_i = sch.split(jo, [None, tiles])
            sch.reorder(t, jo, r, jo_i, ji, kb, q, kk)
        else:
            sch.reorder(t, jo, r, ji, kb, q, kk)
        if parallel:
            sch.parallel(jo)
        sch.decompose_reduction(blk, r)
        sch.tensorize(r, intrinsics.amx_intrinsic(spec.amx_rows, spec.tile_n, spec.tile_k, kb_extent, tiles))
        # A process that builds an AMX kernel may run it (tests, tuning workers, benchmarks): ask Linux for the
        # tile state now, as the runtime does when it loads an artifact (idempotent; False where refused).
        enable_amx()

    if panel_used(spec, kb_extent):  # one panel intrinsic per (block of spec.rows rows, panel_tiles output tiles)
        blk = sch.get_sblock("acc_block")
        t, r, jo, ji, kb, q, kk = sch.get_loops(blk)
        tiles = panel_tiles(nt)
        if tiles > 1:
            jo, jo_i = sch.split(jo, [None, tiles])
            sch.reorder(jo, t, r, jo_i, ji, kb, q, kk)  # a group of tiles (in L1) meets every block of rows
        else:
            sch.reorder(jo, t, r, ji, kb, q, kk)
        if parallel:
            sch.parallel(jo)
        sch.decompose_reduction(blk, r)
        sch.tensorize(r, intrinsics.panel_intrinsic(spec.isa, spec.rows, spec.tile_n, spec.tile_k, kb_extent, tiles,
                                                    knobs.gemm_unroll))
    for block, rows, tiles, unroll in (("acc_block", spec.rows, knobs.gemm_tiles, knobs.gemm_unroll),
                                       ("acc_row", 1, knobs.gemv_tiles, knobs.gemv_unroll)):
        if block == "acc_block" and (rows == 1 or panel_used(spec, kb_extent)):
            continue
        blk = sch.get_sblock(block)
        if spec.method == "lut":
            t, r, jo, ji, kb, h, e = sch.get_loops(blk)
            ku = intrinsics.lut_steps(int(sch.get(kb).extent))
            kb, ku_loop = sch.split(kb, [None, ku])
            inner = (ku_loop, h, e)
        else:
            t, r, jo, ji, kb, q, kk = sch.get_loops(blk)
            inner = (q, kk)
        jo_o, jo_i = sch.split(jo, [None, tiles])
        kb_o, kb_i = sch.split(kb, [None, unroll])
        sch.reorder(jo_o, t, kb_o, kb_i, jo_i, r, ji, *inner)
        if parallel:
            sch.parallel(jo_o)
        sch.decompose_reduction(blk, kb_o)
        if unroll > 1:
            sch.unroll(kb_i)
        if tiles > 1:
            sch.unroll(jo_i)
        if spec.method == "lut":
            sch.tensorize(r if rows > 1 else ji, intrinsics.lut_intrinsic(spec.isa, spec.tile_n, ku, rows))
        elif spec.isa != "generic":
            sch.tensorize(r if rows > 1 else ji, intrinsics.intrinsic(spec.isa, spec.tile_n, spec.tile_k, rows))

    _, j = sch.get_loops(sch.get_sblock("y"))
    if n % vl == 0:
        sch.vectorize(sch.split(j, [None, vl])[1])


def schedule_default(func, spec: KernelSpec | None = None, knobs: Knobs = DEFAULT_KNOBS):
    """The kernel scheduled with `knobs`: by default the hand-written schedule of the spec's ISA
    (tuned knobs come from a MetaSchedule database, targets/tuning.py)."""
    spec = spec or kernel_spec(isa=str(func.attrs["bitrl.isa"]))
    sch = tvm.s_tir.Schedule(func)
    apply_schedule(sch, spec, knobs)
    return sch.mod["main"]


def bitlinear_kernel(k: int, n: int, activation: str = "none", per_channel: bool = False, target=None,
                     spec: KernelSpec | None = None, knobs: Knobs = DEFAULT_KNOBS):
    """The scheduled kernel for a tvm.target.Target (or an explicit spec), with the default or given knobs."""
    spec = spec or kernel_spec(target)
    func = schedule_default(bitlinear_primfunc(k, n, activation, per_channel, spec), spec, knobs)
    return gemm_neon.with_gemm_rows(func, per_channel) if gemm_neon.supports(spec) else func
