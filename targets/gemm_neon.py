"""The GEMM rows of the rasp4 BitLinear kernel (`neon-lut`, Cortex-A72: NEON without dotprod), hand-written.

The lookup-table kernel of targets/kernels.py builds tables per row and costs about 300 instructions per 1,000
multiply-accumulates at any batch. For a batch of MIN_ROWS rows or more (a prefill of 64 tokens, a batch of
observations) this path takes over, in the same PrimFunc (`with_gemm_rows`: `if batch >= MIN_ROWS` around it,
the lookup-table path below), with the math of `quant.bitlinear_reference` bit for bit:

    per row     amax, scale = 127 / max(amax, eps), x_q = clip(round(x * scale)) as int16 (fcvtns rounds half to
                even, as the reference; saturating narrow, then the clip): XQ[b, KP], zero-padded to KP inputs
    per tile    the tile's 16 output channels decoded once from the lut16 bytes (`tbl` of each 4-bit pair index
                into its two trits, sign-extended): WT[KP, 16] int16, in L1/L2 while every block of rows uses it
    per block   ROWS rows x 16 channels: 2 * ROWS int16x8 accumulators in registers; per input k one `ldp q` of
                the 16 weights and 2 * ROWS `mla v.8h, w.8h, x.h[i]` (a row's 8 activations in one register,
                loaded once per 8 inputs): 8 multiply-accumulates per instruction, every loaded weight vector
                used by ROWS rows (the lookup-table path rebuilds its tables per row)
    epilogue    y = act(fma(f32(acc), gamma / scale, bias)), the accumulator already dot(w, x_q)

Exactness: |x_q| <= 127 (|x| <= amax, so |x * fl(127 / amax)| <= 127 (1 + 2^-24)^2 < 127.5, which rounds to at
most 127; the clip at -128 is never reached for finite inputs), so with ternary weights an int16 lane holds CHUNK
<= 256 products (32,512); after each chunk of inputs the int16 sums are added into int32 ones (ACC). The GEMV
rows (batch < MIN_ROWS: a policy step) keep the lookup tables, which cost fewer instructions there than a per-call
weight decode.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import SBlock, SBlockRealize
from tvm.script import tirx as T

from bitrl_compile.quant import EPS, QMAX

from .absmax import absmax
from .epilogue import PARALLEL_MIN_WORK, activate

ROWS = 8        # rows per register block: 16 accumulators + 8 activation registers + 2 weight registers of 32
MIN_ROWS = 8    # batches from this size take this path (the weight decode is paid once per call)
TILE = 16       # output channels per lut16 tile
MAX_CHUNK = 256  # int16 lanes: 256 products of |x_q| <= 127 and a trit fit (32,512; see the docstring)
ISAS = ("neon-lut",)


def supports(spec) -> bool:
    return spec.isa in ISAS


def chunk(kp: int) -> int:
    """Inputs per int16 chunk: the largest multiple of 8 dividing KP (a multiple of 8) that is <= MAX_CHUNK (a
    short chunk costs only the widening of the 16 accumulators once more)."""
    return max(c for c in range(8, min(kp, MAX_CHUNK) + 1, 8) if kp % c == 0)


def _i16x8_quantized(X, b, i, s):
    """x_q of X[b, i:i + 8] as int16x8: fcvtns (round half even), saturating narrow, clip to [-128, 127]."""
    words = [T.call_llvm_pure_intrin("int16x4", "llvm.aarch64.neon.sqxtn.v4i16", T.call_llvm_pure_intrin(
        "int32x4", "llvm.aarch64.neon.fcvtns.v4i32.v4f32", X[b, T.ramp(i + 4 * j, 1, 4)] * T.broadcast(s, 4)))
        for j in range(2)]
    v = T.Shuffle(words, list(range(8)))
    return T.max(T.min(v, T.broadcast(T.int16(127), 8)), T.broadcast(T.int16(-128), 8))


def _tbl(table, idx):
    return T.call_llvm_pure_intrin("int8x16", "llvm.aarch64.neon.tbl1.v16i8", table, idx)


def gemm_rows(k: int, n: int, activation: str, per_channel: bool, X, W, G, B, Y):
    """The statement computing every row of y from x through the register blocks (X .. Y: the kernel's buffers)."""
    batch = X.ty.shape[0]
    nt, kb = -(-n // TILE), 2 * -(-k // 8)
    kp = 4 * kb  # a multiple of 8
    ch = chunk(kp)
    chunks, steps = kp // ch, ch // 8
    parallel = k * n >= PARALLEL_MIN_WORK
    act = activation

    @T.macro
    def block(XQ, WT, S, ACC, jo, r0, rows):
        acc = T.alloc_buffer((rows, 2, 8), "int16")  # < 1 KB "global": an alloca LLVM keeps in registers
        xa = T.alloc_buffer((rows, 8), "int16")
        for c in T.serial(chunks):
            for p in T.unroll(rows):
                acc[p, 0, T.ramp(0, 1, 8)] = T.broadcast(T.int16(0), 8)
                acc[p, 1, T.ramp(0, 1, 8)] = T.broadcast(T.int16(0), 8)
            for s in T.serial(steps):
                for p in T.unroll(rows):
                    xa[p, T.ramp(0, 1, 8)] = XQ[r0 + p, T.ramp(c * ch + s * 8, 1, 8)]
                for i in T.unroll(8):
                    for p in T.unroll(rows):
                        for h in T.unroll(2):
                            acc[p, h, T.ramp(0, 1, 8)] = acc[p, h, T.ramp(0, 1, 8)] + WT[
                                c * ch + s * 8 + i, T.ramp(h * 8, 1, 8)] * T.broadcast(xa[p, i], 8)
            if c == 0:  # the int32 sums in memory (not promoted: LLVM would spill the int16 ones instead)
                for p in T.unroll(rows):
                    for h in T.unroll(2):
                        ACC[p, T.ramp(h * 8, 1, 8)] = T.Cast("int32x8", acc[p, h, T.ramp(0, 1, 8)])
            else:
                for p in T.unroll(rows):
                    for h in T.unroll(2):
                        ACC[p, T.ramp(h * 8, 1, 8)] = ACC[p, T.ramp(h * 8, 1, 8)] + T.Cast(
                            "int32x8", acc[p, h, T.ramp(0, 1, 8)])
        for p in T.unroll(rows):
            for h in T.unroll(2):
                for v in T.unroll(2):
                    o0 = jo * TILE + h * 8 + v * 4
                    if o0 + 4 <= n:
                        cs = (G[T.ramp(o0, 1, 4)] / T.broadcast(S[r0 + p], 4)) if per_channel else T.broadcast(
                            G[0] / S[r0 + p], 4)
                        Y[r0 + p, T.ramp(o0, 1, 4)] = activate(T.fma(T.Cast(
                            "float32x4", ACC[p, T.ramp(h * 8 + v * 4, 1, 4)]), cs, B[T.ramp(o0, 1, 4)]), act)
                    else:
                        for e in T.serial(4):
                            if o0 + e < n:
                                Y[r0 + p, o0 + e] = activate(T.fma(T.Cast("float32", ACC[p, h * 8 + v * 4 + e]),
                                                                   (G[o0 + e] if per_channel else G[0]) / S[r0 + p],
                                                                   B[o0 + e]), act)

    @T.macro
    def tile(XQ, S, jo):
        WT = T.alloc_buffer((kp, TILE), "int16")
        ACC = T.alloc_buffer((ROWS, TILE), "int32")
        tb = T.alloc_buffer((2, 16), "int8")
        for e in T.unroll(16):  # pair index e = c0 + 3 c1 -> the trits c0 - 1 (table 0) and c1 - 1 (table 1)
            tb[0, e] = T.Cast("int8", T.if_then_else(e < 9, e % 3 - 1, 0))
            tb[1, e] = T.Cast("int8", T.if_then_else(e < 9, e // 3 - 1, 0))
        for g in T.serial(kb):
            v = W.vload([jo, g, 0, 0], "uint8x16")
            lo = T.reinterpret("int8x16", v & T.broadcast(T.uint8(15), 16))
            hi = T.reinterpret("int8x16", v >> T.broadcast(T.uint8(4), 16))
            WT[g * 4, T.ramp(0, 1, 16)] = T.Cast("int16x16", _tbl(tb[0, T.ramp(0, 1, 16)], lo))
            WT[g * 4 + 1, T.ramp(0, 1, 16)] = T.Cast("int16x16", _tbl(tb[1, T.ramp(0, 1, 16)], lo))
            WT[g * 4 + 2, T.ramp(0, 1, 16)] = T.Cast("int16x16", _tbl(tb[0, T.ramp(0, 1, 16)], hi))
            WT[g * 4 + 3, T.ramp(0, 1, 16)] = T.Cast("int16x16", _tbl(tb[1, T.ramp(0, 1, 16)], hi))
        for t in T.serial(batch // ROWS):
            block(XQ, WT, S, ACC, jo, t * ROWS, ROWS)
        # the batch % 8 last rows: blocks of 4, 2 and 1 (three copies of the loop, not seven)
        if batch % ROWS >= 4:
            block(XQ, WT, S, ACC, jo, batch // ROWS * ROWS, 4)
        if batch % 4 >= 2:
            block(XQ, WT, S, ACC, jo, batch // 4 * 4, 2)
        if batch % 2 == 1:
            block(XQ, WT, S, ACC, jo, batch - 1, 1)

    @T.prim_func(private=True, check_well_formed=False)
    def gemm():
        XQ = T.alloc_buffer((batch, kp), "int16")
        S = T.alloc_buffer((batch,), "float32")
        mx = T.alloc_buffer((4, 16), "float32")
        m = T.alloc_buffer((1,), "float32")
        for b in T.serial(batch):
            absmax(m, mx, X, b, k)
            S[b] = T.float32(QMAX) / T.max(m[0], T.float32(EPS))
            for v in T.serial(k // 8):
                XQ[b, T.ramp(v * 8, 1, 8)] = _i16x8_quantized(X, b, v * 8, S[b])
            for v in T.serial(kp - k // 8 * 8):
                if k // 8 * 8 + v < k:
                    XQ[b, k // 8 * 8 + v] = T.Cast("int16", T.max(T.min(T.round(X[b, k // 8 * 8 + v] * S[b]),
                                                                        T.float32(127)), T.float32(-128)))
                else:
                    XQ[b, k // 8 * 8 + v] = T.int16(0)
        if parallel:
            for jo in T.parallel(nt):
                tile(XQ, S, jo)
        else:
            for jo in T.serial(nt):
                tile(XQ, S, jo)

    return gemm.body


def with_gemm_rows(func, per_channel: bool):
    """`func` (the scheduled lookup-table kernel of targets/kernels.py) with its batches of MIN_ROWS rows or more
    computed by `gemm_rows`: its root block's body under `if batch < MIN_ROWS`, ours in the else branch."""
    attrs = func.attrs
    k, n = int(attrs["bitrl.k"]), int(attrs["bitrl.n"])
    X, W, G, B, Y = func.params
    body = gemm_rows(k, n, str(attrs["bitrl.activation"]), per_channel, X, W, G, B, Y)
    root = func.body.block
    batch = X.ty.shape[0]
    new_root = SBlock(list(root.iter_vars), list(root.reads), list(root.writes), root.name_hint,
                      tirx.IfThenElse(batch < tirx.const(MIN_ROWS, "int64"), root.body, body), root.init, list(root.alloc_buffers),
                      list(root.match_buffers), root.annotations)
    return func.with_body(SBlockRealize(list(func.body.iter_values), func.body.predicate, new_root))
