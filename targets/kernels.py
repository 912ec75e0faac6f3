"""TensorIR BitLinear kernels: the math of `bitrl_compile.quant`, over the 2-bit layout of
`bitrl_compile.layouts`, with a default schedule per target.

One PrimFunc per (K, N, activation, scale kind), symbolic in the batch:
    x[B, K] f32, w[N, ceil(K/4)] u8, gamma[G] f32, bias[N] f32  ->  y[B, N] f32
Stages: amax -> s -> x_q (int8) -> acc (int32, exact) -> y = act(fma(f32(acc), gamma/s, bias)).
The fma is explicit (`tirx.fma`, one rounding) so the result does not depend on whether LLVM
contracts a multiply and an add; `quant.fma_f32` is its bit-exact numpy twin.
"""

from __future__ import annotations

import tvm
from tvm import te
from tvm import tirx as T

from bitrl_compile.quant import EPS, QMAX

ACTIVATIONS = ("none", "relu", "tanh", "sigmoid")


def kernel_name(k: int, n: int, activation: str, per_channel: bool) -> str:
    return f"bitrl_bitlinear_k{k}_n{n}_{activation}{'_pc' if per_channel else ''}"


def bitlinear_primfunc(k: int, n: int, activation: str = "none", per_channel: bool = False):
    """The unscheduled BitLinear PrimFunc for a K -> N layer (2-bit packed weights)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not fusable; expected one of {ACTIVATIONS}")
    batch = T.Var("batch", "int64")
    kp = (k + 3) // 4
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((n, kp), "uint8", name="w")
    gamma = te.placeholder((n if per_channel else 1,), "float32", name="gamma")
    bias = te.placeholder((n,), "float32", name="bias")

    r = te.reduce_axis((0, k), name="r")
    amax = te.compute((batch,), lambda b: te.max(te.abs(x[b, r]), axis=r), name="amax")
    scale = te.compute((batch,), lambda b: T.const(float(QMAX), "float32") /
                       T.max(amax[b], T.const(float(EPS), "float32")), name="scale")
    x_q = te.compute(
        (batch, k),
        lambda b, i: T.Cast("int8", T.max(T.min(T.round(x[b, i] * scale[b]), T.const(127.0, "float32")),
                                          T.const(-128.0, "float32"))),
        name="x_q")

    def trit(j, i):
        code = (w[j, i // 4] >> T.Cast("uint8", (i % 4) * 2)) & T.const(3, "uint8")
        return T.Cast("int32", code) - 1

    rk = te.reduce_axis((0, k), name="rk")
    acc = te.compute((batch, n), lambda b, j: te.sum(T.Cast("int32", x_q[b, rk]) * trit(j, rk), axis=rk),
                     name="acc")

    def epilogue(b, j):
        g = gamma[j] if per_channel else gamma[0]
        y = T.op.fma(T.Cast("float32", acc[b, j]), g / scale[b], bias[j])
        if activation == "relu":
            return T.max(y, T.const(0.0, "float32"))
        if activation == "tanh":
            return T.tanh(y)
        if activation == "sigmoid":
            return T.sigmoid(y)
        return y

    y = te.compute((batch, n), epilogue, name="y")
    func = te.create_prim_func([x, w, gamma, bias, y])
    return func.with_attr("global_symbol", kernel_name(k, n, activation, per_channel))


PARALLEL_MIN_WORK = 1 << 16  # multiply-adds per batch row below which waking threads costs more than it saves


def schedule_default(func, target=None):
    """A correct default schedule (tuned schedules come from the tuning database).

    Output rows are split across threads when a layer is large enough to pay for the thread pool's
    wake-up (tens of microseconds); small policy layers run on the calling thread.
    """
    sch = tvm.s_tir.Schedule(func)
    x, w = func.params[0], func.params[1]
    work = int(x.shape[1]) * int(w.shape[0])
    if work >= PARALLEL_MIN_WORK:
        for block in ("acc", "y"):
            loops = sch.get_loops(sch.get_sblock(block))
            sch.parallel(sch.fuse(loops[0], loops[1]))
    return sch.mod["main"]
