"""TensorIR int8 BitLinear kernels: the mixed-precision layers (int8 weights instead of trits).

The same op as the ternary kernels of targets/kernels.py with the same math (`quant.bitlinear_reference` is
the bit-exact reference of both), only the weights differ: int8 in [-127, 127] with one scale per output
channel (`quant.quantize_weight_int8`), stored as they are ([N, K] int8, the "q8" layout of
passes/bitlinear_op.py; nothing to unpack at load). One PrimFunc per (K, N, activation), symbolic in the batch:

    x[B, K] f32, w[N, K] i8, gamma[N] f32 (the channel scales), bias[N] f32  ->  y[B, N] f32

    amax[b]   = max_k |x[b, k]|                        per row (vectorised: partial maxima over lanes)
    scale[b]  = 127 / max(amax[b], eps)
    x_q[b, k] = int8(clip(round(x * scale), -128, 127))
    acc[b, n] = sum_k int32(x_q[b, k]) * int32(w[n, k])   int32, exact for K < 2^17
    y[b, n]   = act(fma(f32(acc), gamma[n] / scale[b], bias[n]))

The dot product keeps LANES partial sums (vectorised by LLVM into widening multiply-adds: vpmaddwd / vpdpwssd
on x86, smull/smlal/sadalp on NEON), computed per output in a local buffer, then summed; the epilogue runs in
the same loop nest. Outputs are the outer loop (each weight row is read once for all batch rows) and are split
across threads when a layer is large enough (kernels.PARALLEL_MIN_WORK). No tensor intrinsic: a VNNI / sdot
schedule is left for later (docs: issue 14).
"""

from __future__ import annotations

import json

import tvm
from tvm import te
from tvm import tirx as T

from bitrl_compile.quant import FUSABLE_ACTIVATIONS

from . import KernelSpec, kernel_spec
from .kernels import PARALLEL_MIN_WORK, activate, quantize_value, row_scales, schedule_row_scales

LAYOUT = "q8"  # the weights' layout: int8 [N, K], as stored (passes/bitlinear_op.py)
MAX_LANES = 64


def int8_kernel_name(k: int, n: int, activation: str) -> str:
    return f"bitrl_int8linear_k{k}_n{n}_{activation}"


def acc_lanes(k: int, spec: KernelSpec) -> int:
    """The partial sums per output: the largest power of two <= 4 * spec.vector (and 64) that divides K and
    leaves at least two steps of K (so the reduction keeps its loop)."""
    lanes = min(MAX_LANES, 4 * spec.vector)
    while lanes > 1 and (k % lanes or k // lanes < 2):
        lanes //= 2
    return lanes


def int8_primfunc(k: int, n: int, activation: str = "none", spec: KernelSpec | None = None,
                  batch: int | None = None):
    """The unscheduled int8 BitLinear PrimFunc for a K -> N layer; symbolic in the batch unless `batch` is given."""
    if activation not in FUSABLE_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not fusable; expected one of {FUSABLE_ACTIVATIONS}")
    spec = spec or kernel_spec(None)
    batch = T.Var("batch", "int64") if batch is None else T.const(batch, "int64")
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((n, k), "int8", name="w")
    gamma = te.placeholder((n,), "float32", name="gamma")
    bias = te.placeholder((n,), "float32", name="bias")

    scale = row_scales(x, batch, k, spec)
    x_q = te.compute((batch, k), lambda b, i: quantize_value(x[b, i], scale[b]), name="x_q")

    lanes = acc_lanes(k, spec)
    rk = te.reduce_axis((0, k // lanes), name="rk")
    partial = te.compute((batch, n, lanes), lambda b, j, v: te.sum(
        T.Cast("int32", x_q[b, rk * lanes + v]) * T.Cast("int32", w[j, rk * lanes + v]), axis=rk), name="partial")
    rl = te.reduce_axis((0, lanes), name="rl")
    acc = te.compute((batch, n), lambda b, j: te.sum(partial[b, j, rl], axis=rl), name="acc")

    def epilogue(b, j):
        return activate(T.op.fma(T.Cast("float32", acc[b, j]), gamma[j] / scale[b], bias[j]), activation)

    y = te.compute((batch, n), epilogue, name="y")
    func = te.create_prim_func([x, w, gamma, bias, y])
    return func.with_attrs({"global_symbol": int8_kernel_name(k, n, activation), "bitrl.activation": activation,
                            "bitrl.isa": f"int8-{spec.isa}", "bitrl.weight_layout": LAYOUT, "bitrl.n": n,
                            "bitrl.k": k})


def apply_schedule(sch, spec: KernelSpec) -> None:
    """The hand-written schedule of an int8_primfunc (in `sch`, a tvm.s_tir.Schedule)."""
    func = sch.mod["main"]
    k, n = int(func.attrs["bitrl.k"]), int(func.attrs["bitrl.n"])
    schedule_row_scales(sch)
    _, i = sch.get_loops(sch.get_sblock("x_q"))
    if k % spec.vector == 0:
        sch.vectorize(sch.split(i, [None, spec.vector])[1])

    b, j = sch.get_loops(sch.get_sblock("y"))
    sch.reorder(j, b)  # outputs outermost: one weight row serves every batch row
    if k * n >= PARALLEL_MIN_WORK:
        sch.parallel(j)
    sch.compute_at(sch.get_sblock("acc"), b)
    partial = sch.get_sblock("partial")
    sch.compute_at(partial, b)  # the partial sums of one output: a local [lanes] buffer
    loops = sch.get_loops(partial)  # j, b, [v,] rk (a loop of extent 1 is dropped: no v with 1 lane)
    rk = loops[-1]
    if len(loops) > 3:
        sch.reorder(rk, loops[2])  # the lanes innermost: one vector multiply-add per step of K
        sch.vectorize(loops[2])
    init = sch.decompose_reduction(partial, rk)
    if len(loops) > 3:
        sch.vectorize(sch.get_loops(init)[-1])

def int8_kernel(k: int, n: int, activation: str = "none", spec: KernelSpec | None = None):
    """The scheduled int8 kernel for a target's kernel spec, with its manifest schedule record."""
    spec = spec or kernel_spec(None)
    sch = tvm.s_tir.Schedule(int8_primfunc(k, n, activation, spec))
    apply_schedule(sch, spec)
    schedule = {"schedule": "default", "knobs": {}, "reason": "int8 layer (one hand-written schedule)"}
    return sch.mod["main"].with_attr("bitrl.schedule", json.dumps(schedule, sort_keys=True))
