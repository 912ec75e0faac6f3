"""The BitConv2d kernel for AVX-512 VNNI: a hand-written direct convolution on vpdpbusd (u8 x s8 -> s32).

The math of `quant.bitconv2d_reference` (conv_kernels.py's docstring), for O % 16 == 0, in three stages per call:

    per sample b   amax and scale (16 float lanes), then the input quantized once into XU[b] as u8 = x_q + 128
                   (the padding 128 = a quantized zero), in the layout of conv_kernels.ConvLayout: NCHW ("kw":
                   a group of 4 reduction inputs is 4 adjacent columns) or HWC ("c": 4 adjacent channels). An
                   NHWC input (a folded transpose) is always "c": its pixels are read in order, and with C % 4 == 0
                   every run of them is one contiguous run of XU; a folded scale (x / c, x * c) is applied here.
                   The input may be an image's uint8 pixels (`input_dtype`: the frame as the plan takes it, no
                   float copy; their max by vpmaxub, x / 255 as two fmas where that is exact, `fma_division`);
                   an NCHW input of a "c" layer is written 16 channels of a pixel at a time. Then gamma / scale
    per call       corr[o] = 128 * sum_k w[k, o]  (vpdpbusd of the weights by 0x80 bytes)
    per row        register blocks of P output positions x T tiles of 16 output channels: P*T zmm accumulators
                   over the whole reduction (twice that, `split`, when P*T chains cannot hide vpdpbusd's
                   latency), each step one 64-byte weight load per tile and one 4-byte activation broadcast per
                   position, P*T vpdpbusd; then y = act(fma(f32(acc - corr), gamma / scale, bias)),
                   stored NCHW: for P = 4 transposed per 128-bit lane (4 positions of a channel per store), else
                   each position's 16 channels with the channel stride

sum(x_u * w) - corr = sum((x_q + 128) w) - 128 sum(w) = sum(x_q w): exact (|4 products| <= 4*255*127 per lane
step, int32 for any K below 16 million). (P, T) per layer minimise the instructions of a row (`blocking`); tile
groups, then rows (and samples) are split across threads when the layer is large enough
(kernels.PARALLEL_MIN_WORK).
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T
from tvm.target.codegen import llvm_version_major

from bitrl_compile.quant import EPS, QMAX, fma_f32

from .absmax import absmax
from .kernels import PARALLEL_MIN_WORK, activate


def prescaled(value, prescale: tuple[str, float] | None, lanes: int = 1):
    """x / c or x * c in float32 (`prescale`: a folded graph op, quant.conv_input; TIR's division is IEEE's, exactly
    numpy's), or x itself; on a scalar or a vector of `lanes`."""
    if prescale is None:
        return value
    c = T.float32(float(prescale[1]))
    c = T.broadcast(c, lanes) if lanes > 1 else c
    return value / c if prescale[0] == "div" else value * c


INPUT_DTYPES = ("float32", "uint8")  # what x may be: floats, or an image's pixels (the plan's uint8 frames)


def fma_division(c: float) -> bool:
    """Whether x / c for every pixel value x in 0..255 is, in float32, q1 = fma(fma(-q0, c, x), r, q0) with
    q0 = x * r, r = 1 / c (the division refined by its exact residual: 2 fmas and a multiply instead of a divide,
    which costs ~10x as much): checked on all 256 values against numpy's division (quant.fma_f32 is fma's twin)."""
    x, c32 = np.arange(256, dtype=np.float32), np.float32(c)
    r = np.float32(1) / c32
    q0 = x * r
    return bool(np.array_equal(fma_f32(fma_f32(-q0, c32, x), r, q0), x / c32))


def pixel_prescaled(value, prescale: tuple[str, float] | None, lanes: int = 1):
    """`prescaled` on pixel values (integers 0..255 in float32): a division by c as `fma_division` when that is
    exact for c, else as it is."""
    if prescale is None or prescale[0] != "div" or not fma_division(prescale[1]):
        return prescaled(value, prescale, lanes)
    c32 = np.float32(prescale[1])
    r, c = T.float32(float(np.float32(1) / c32)), T.float32(float(c32))
    r, c = (T.broadcast(r, lanes), T.broadcast(c, lanes)) if lanes > 1 else (r, c)
    q0 = value * r
    return T.fma(T.fma(-q0, c, value), r, q0)


MIN_CHAINS = 10  # independent vpdpbusd chains that keep both ports busy (latency 5 cycles, 2 per cycle)
MAX_ACCUMULATORS = 15  # zmm accumulators per register block (of 32); their buffer must stay below 1 KB (`block`)


def blocking(ow: int, tiles: int, groups: int) -> tuple[int, int]:
    """(P positions, T tiles) per register block: the fewest instructions per output row (blocks of P over the row
    and a tail block; per block `groups` steps of P*T vpdpbusd + T weight loads + P broadcasts, then the
    epilogue's stores: 20 per position and tile, or 6 when P = 4, transposed per 128-bit lane) with
    P*T <= MAX_ACCUMULATORS."""
    def block(p, t):
        return groups * (p * t + p + t) + (6 * p * t if p == 4 else 20 * p * t)

    best = None
    for t in (v for v in (4, 2, 1) if tiles % v == 0):
        for p in range(1, min(ow, MAX_ACCUMULATORS // t) + 1):
            full, tail = divmod(ow, p)
            cost = (tiles // t) * (full * block(p, t) + (block(tail, t) if tail else 0))
            if best is None or cost < best[0]:
                best = (cost, p, t)
    return best[1], best[2]


def vnni_conv(geometry, hw: tuple[int, int], o: int, activation: str, per_channel: bool, layout, *,
              input_layout: str = "nchw", prescale: tuple[str, float] | None = None, input_dtype: str = "float32"):
    """The PrimFunc (x[B, C*H*W] f32 or u8 (`input_dtype`: an image's pixels, read as they are), NCHW or NHWC,
    w[G, O, 4] i8, gamma, bias -> y[B, O, OH, OW]) and its knobs."""
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"conv input dtype {input_dtype!r}; expected one of {INPUT_DTYPES}")
    u8 = input_dtype == "uint8"
    nhwc = input_layout == "nhwc"
    if nhwc and layout.mode != "c":
        raise ValueError("an NHWC input needs the channel-group layout (ConvLayout.of(..., \"nhwc\"))")
    magnitude = None if prescale is None else (prescale[0], abs(float(prescale[1])))
    c, (h, w_), (kh, kw), (sh, sw) = geometry.channels, hw, geometry.kernel, geometry.stride
    pt, pl, pb, pr = geometry.padding
    oh, ow = geometry.output_hw(h, w_)
    size, hp, wp = c * h * w_, h + pt + pb, w_ + pl + pr
    tiles, groups, c4, jg = o // 16, layout.groups, layout.c4, kw // 4
    p_block, t_block = blocking(ow, tiles, groups)
    extents = (c, kh, kw // 4) if layout.mode == "kw" else (kh, kw, layout.c4)
    # fewer chains than vpdpbusd's latency x its ports: a second set of accumulators takes the odd steps of the
    # middle loop (twice the chains in flight; the two sums added at the end, exact in int32)
    split = p_block * t_block < MIN_CHAINS and extents[1] % 2 == 0
    halves = 2 if split else 1
    n_groups = tiles // t_block
    full, tail = divmod(ow, p_block)
    kw_mode = layout.mode == "kw"
    cw = 1 if kw_mode else 4 * c4                       # bytes per image position in XU
    xu_len = (c * hp * wp) if kw_mode else hp * wp * cw  # XU bytes per sample
    xu_pad = -(-xu_len // 64) * 64
    parallel = geometry.k * o * oh * ow >= PARALLEL_MIN_WORK
    bytes_as = "int8" if llvm_version_major() >= 21 else "int32"  # LLVM 21 retyped vpdpbusd's operands

    def dp(acc, a_word, wv):  # acc + u8 activations (a 4-byte word broadcast) . s8 weights (64 bytes)
        a = T.broadcast(a_word, 16)
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                       T.reinterpret("int8x64", a) if bytes_as == "int8" else a,
                                       wv if bytes_as == "int8" else T.reinterpret("int32x16", wv))

    def pre(v, lanes=1):  # x' in float32 (a pixel converted exactly, then the folded scale)
        if not u8:
            return prescaled(v, prescale, lanes)
        return pixel_prescaled(T.Cast("float32x16" if lanes > 1 else "float32", v), prescale, lanes)

    # pixels: x' * scale is in [0, 127] (x' <= amax', and a frame's amax' is 0 or >= 1/255 > EPS), so the clip
    # is left out
    def quantize16(v, s):
        if u8:  # cvtps2dq {rn-sae}: T.round's nearest-even and the conversion in one instruction
            q = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.mask.cvtps2dq.512", pre(v, 16) * T.broadcast(s, 16),
                                        T.broadcast(T.int32(0), 16), T.int16(-1), T.int32(8))
            return T.Cast("uint8x16", q + T.broadcast(T.int32(128), 16))
        q = T.max(T.min(T.round(pre(v, 16) * T.broadcast(s, 16)), T.broadcast(T.float32(127), 16)),
                  T.broadcast(T.float32(-128), 16))
        return T.Cast("uint8x16", q + T.broadcast(T.float32(128), 16))

    def quantize1(v, s):
        return T.Cast("uint8", T.max(T.min(T.round(pre(v) * s), T.float32(127)), T.float32(-128))
                      + T.float32(128))

    def xu_at(ch, row, col):  # the XU byte offset of channel ch at padded row, column
        return (ch * hp + row) * wp + col if kw_mode else (row * wp + col) * cw + ch

    def step_addr(g_a, g_b, g_c, yy, z):  # the XU offset of the group (c, i, jg) / (i, j, cg) at output (yy, z)
        if kw_mode:
            return (g_a * hp + yy * sh + g_b) * wp + z * sw + 4 * g_c
        return ((yy * sh + g_a) * wp + z * sw + g_b) * cw + 4 * g_c

    def group(g_a, g_b, g_c):
        return (g_a * kh + g_b) * jg + g_c if kw_mode else (g_a * kw + g_b) * c4 + g_c

    # the input is quantized in runs of adjacent image positions: whole channels when there is no left or right
    # padding (the padded rows follow each other), else rows; `step` bytes apart in XU
    flat = pl == 0 and pr == 0
    runs, run, run_col, step = (1, h * w_, 0, cw) if flat else (h, w_, pl, cw)
    # an NHWC input with C % 4 == 0 is read as `runs` runs of `run` pixels x C channels, each one contiguous run
    # of XU bytes (C == cw); with other C each value is placed on its own (pixel by pixel)
    dense = nhwc and c == cw
    run_values = run * c

    # the runs write every byte that the blocks read
    covered = pt == pl == pb == pr == 0 and (kw_mode or c == cw)

    def run_row(r):
        return pt if flat else r + pt
    act = activation

    def transposed(v, j):  # per 128-bit lane k: [v0[4k+j], v1[4k+j], v2[4k+j], v3[4k+j]] (unpck, movlhps / movhlps)
        lo = [i for k in range(4) for i in (4 * k, 16 + 4 * k, 4 * k + 1, 16 + 4 * k + 1)]
        hi = [i for k in range(4) for i in (4 * k + 2, 16 + 4 * k + 2, 4 * k + 3, 16 + 4 * k + 3)]
        ab, cd = T.Shuffle([v[0], v[1]], lo if j < 2 else hi), T.Shuffle([v[2], v[3]], lo if j < 2 else hi)
        pick = [i for k in range(4) for i in ((4 * k, 4 * k + 1, 16 + 4 * k, 16 + 4 * k + 1) if j % 2 == 0 else
                                               (4 * k + 2, 4 * k + 3, 16 + 4 * k + 2, 16 + 4 * k + 3))]
        return T.Shuffle([ab, cd], pick)

    # expressions, not assignments: a name assigned in a macro becomes a buffer of its own (in a parallel loop, a
    # heap workspace allocated per row, and every use a load from it)
    def first_channel(tg, t):
        return (tg * t_block + t) * 16

    def y_at(b, tg, t, yy, z):  # Y's offset of output (b, the tile's first channel, yy, z)
        return ((b * o + first_channel(tg, t)) * oh + yy) * ow + z

    def finished(acc, CORR, GS, B, b, p, t, tg):  # act(fma(f32(acc - corr), gamma / scale, bias)), 16 channels
        o0 = first_channel(tg, t)
        return activate(T.fma(T.Cast("float32x16", acc[p, t, T.ramp(0, 1, 16)] - CORR[T.ramp(o0, 1, 16)]),
                              GS[b, T.ramp(o0, 1, 16)], B[T.ramp(o0, 1, 16)]), act)

    @T.macro
    def store4(Y, fv, base, j):  # channels 4k + j, k < 4, of the block: 4 positions each, contiguous
        r = T.alloc_buffer((16,), "float32")
        r[T.ramp(0, 1, 16)] = transposed([fv[0, T.ramp(0, 1, 16)], fv[1, T.ramp(0, 1, 16)], fv[2, T.ramp(0, 1, 16)],
                                          fv[3, T.ramp(0, 1, 16)]], j)
        for k in T.unroll(4):
            Y[T.ramp(base + (4 * k + j) * oh * ow, 1, 4)] = r[T.ramp(4 * k, 1, 4)]

    @T.macro
    def block(XU, W, CORR, GS, B, Y, b, yy, z0, n_pos, tg):
        # "global" scope, <= 1 KB: an alloca that LLVM keeps in registers (a "local" buffer or a larger one
        # becomes a heap workspace, and every vpdpbusd would store its accumulator)
        acc = T.alloc_buffer((n_pos, t_block, 16), "int32")
        acc2 = T.alloc_buffer((n_pos, t_block, 16), "int32")  # the odd steps' chains (`split`), another alloca
        for p in T.unroll(n_pos):
            for t in T.unroll(t_block):
                acc[p, t, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
                if split:
                    acc2[p, t, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
        for ga in T.serial(extents[0]):
            for gh in T.serial(extents[1] // halves):
                for gc in T.unroll(extents[2]):
                    for p in T.unroll(n_pos):
                        for t in T.unroll(t_block):
                            acc[p, t, T.ramp(0, 1, 16)] = dp(
                                acc[p, t, T.ramp(0, 1, 16)],
                                T.reinterpret("int32", XU.vload([b, step_addr(ga, gh * halves, gc, yy, z0 + p)],
                                                                "uint8x4")),
                                W.vload([group(ga, gh * halves, gc), (tg * t_block + t) * 16, 0], "int8x64"))
                    if split:
                        for p in T.unroll(n_pos):
                            for t in T.unroll(t_block):
                                acc2[p, t, T.ramp(0, 1, 16)] = dp(
                                    acc2[p, t, T.ramp(0, 1, 16)],
                                    T.reinterpret("int32", XU.vload([b, step_addr(ga, gh * 2 + 1, gc, yy, z0 + p)],
                                                                    "uint8x4")),
                                    W.vload([group(ga, gh * 2 + 1, gc), (tg * t_block + t) * 16, 0], "int8x64"))
        if split:
            for p in T.unroll(n_pos):
                for t in T.unroll(t_block):
                    acc[p, t, T.ramp(0, 1, 16)] = acc[p, t, T.ramp(0, 1, 16)] + acc2[p, t, T.ramp(0, 1, 16)]
        if n_pos == 4:  # 4 positions x 16 channels: a 4x4 transpose per 128-bit lane, 4 positions per store
            for t in T.unroll(t_block):
                fv = T.alloc_buffer((4, 16), "float32")
                for p in T.unroll(4):
                    fv[p, T.ramp(0, 1, 16)] = finished(acc, CORR, GS, B, b, p, t, tg)
                store4(Y, fv, y_at(b, tg, t, yy, z0), 0)
                store4(Y, fv, y_at(b, tg, t, yy, z0), 1)
                store4(Y, fv, y_at(b, tg, t, yy, z0), 2)
                store4(Y, fv, y_at(b, tg, t, yy, z0), 3)
        else:
            for t in T.unroll(t_block):
                for p in T.unroll(n_pos):
                    Y[T.ramp(y_at(b, tg, t, yy, z0 + p), oh * ow, 16)] = finished(acc, CORR, GS, B, b, p, t, tg)

    @T.prim_func
    def conv(x: T.handle, w: T.handle, gamma: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, size), input_dtype)
        W = T.match_buffer(w, (groups, o, 4), "int8")
        G = T.match_buffer(gamma, (o if per_channel else 1,), "float32")
        B = T.match_buffer(bias, (o,), "float32")
        Y4 = T.match_buffer(y, (batch, o, oh, ow), "float32")
        Y = T.decl_buffer((batch * o * oh * ow,), "float32", data=Y4.data)
        XU = T.alloc_buffer((batch, xu_pad), "uint8")
        S = T.alloc_buffer((batch,), "float32")
        GS = T.alloc_buffer((batch, o), "float32")
        CORR = T.alloc_buffer((o,), "int32")
        mx = T.alloc_buffer((4, 16), "float32")
        mu = T.alloc_buffer((4, 64), "uint8")
        m = T.alloc_buffer((1,), "float32")
        cv = T.alloc_buffer((tiles, 16), "int32")
        # corr = 128 * the column sums of the weights: one vpdpbusd chain per tile, the tiles interleaved
        for t in T.unroll(tiles):
            cv[t, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
        for g in T.serial(groups):
            for t in T.unroll(tiles):
                cv[t, T.ramp(0, 1, 16)] = dp(cv[t, T.ramp(0, 1, 16)], T.int32(-2139062144),  # 0x80808080 bytes
                                             W.vload([g, t * 16, 0], "int8x64"))
        for t in T.unroll(tiles):
            CORR[T.ramp(t * 16, 1, 16)] = cv[t, T.ramp(0, 1, 16)]
        for b in T.serial(batch):
            if u8:  # pixels: their maximum (vpmaxub over 64 at a time), 4 independent chains
                for u in T.unroll(4):
                    mu[u, T.ramp(0, 1, 64)] = T.broadcast(T.uint8(0), 64)
                for v in T.serial(size // 256):
                    for u in T.unroll(4):
                        mu[u, T.ramp(0, 1, 64)] = T.max(mu[u, T.ramp(0, 1, 64)],
                                                        X[b, T.ramp((v * 4 + u) * 64, 1, 64)])
                for u in T.unroll(3):
                    mu[0, T.ramp(0, 1, 64)] = T.max(mu[0, T.ramp(0, 1, 64)], mu[u + 1, T.ramp(0, 1, 64)])
                m[0] = T.float32(0)
                for v in T.serial(64):
                    m[0] = T.max(m[0], T.Cast("float32", mu[0, v]))
                for v in T.serial(size % 256):
                    m[0] = T.max(m[0], T.Cast("float32", X[b, size // 256 * 256 + v]))
            else:
                absmax(m, mx, X, b, size)
            S[b] = T.float32(QMAX) / T.max(prescaled(m[0], magnitude), T.float32(EPS))
            for t in T.unroll(tiles):  # gamma / scale once per sample (a divide per block would wait for it)
                GS[b, T.ramp(t * 16, 1, 16)] = (G[T.ramp(t * 16, 1, 16)] / T.broadcast(S[b], 16)) if per_channel \
                    else T.broadcast(G[0] / S[b], 16)
            for v in T.serial(0 if covered else xu_pad // 64):  # the padding (and padded channels): 128
                XU[b, T.ramp(v * 64, 1, 64)] = T.broadcast(T.uint8(128), 64)
            if dense:  # NHWC, C % 4 == 0: XU's pixels are the input's, in order
                for r in T.serial(runs):
                    for v in T.serial(run_values // 16):
                        XU[b, T.ramp(xu_at(0, run_row(r), run_col) + v * 16, 1, 16)] = quantize16(
                            X[b, T.ramp(r * run_values + v * 16, 1, 16)], S[b])
                    for v in T.serial(run_values % 16):
                        XU[b, xu_at(0, run_row(r), run_col) + run_values // 16 * 16 + v] = quantize1(
                            X[b, r * run_values + run_values // 16 * 16 + v], S[b])
            elif nhwc:  # NHWC with padded channel groups: value by value
                for r in T.serial(h):
                    for col in T.serial(w_):
                        for ch in T.serial(c):
                            XU[b, xu_at(ch, r + pt, col + pl)] = quantize1(X[b, (r * w_ + col) * c + ch], S[b])
            elif not kw_mode and c % 16 == 0:  # NCHW into HWC: 16 channels of a pixel per store (their values
                # 16 loads apart); one byte per store, 64 bytes apart, would cost ~4x the whole convolution
                for r in T.serial(h):
                    for col in T.serial(w_):
                        for cg in T.serial(c // 16):
                            XU[b, T.ramp(xu_at(cg * 16, r + pt, col + pl), 1, 16)] = quantize16(
                                X[b, T.ramp((cg * 16 * h + r) * w_ + col, h * w_, 16)], S[b])
            else:
                for ch in T.serial(c):
                    for r in T.serial(runs):
                        for v in T.serial(run // 16):
                            XU[b, T.ramp(xu_at(ch, run_row(r), run_col) + v * 16 * step, step, 16)] = quantize16(
                                X[b, T.ramp(ch * h * w_ + r * run + v * 16, 1, 16)], S[b])
                        for v in T.serial(run % 16):
                            XU[b, xu_at(ch, run_row(r), run_col) + (run // 16 * 16 + v) * step] = quantize1(
                                X[b, ch * h * w_ + r * run + run // 16 * 16 + v], S[b])
        # tile groups outermost: a group's weights (K x 16 T bytes) stay in L1 over every row and sample (rows
        # inside it, all tiles per row, would stream the whole weights through L1 for each block of P positions)
        if parallel:
            for i in T.parallel(n_groups * batch * oh):
                for zo in T.serial(full):
                    block(XU, W, CORR, GS, B, Y, i % (batch * oh) // oh, i % oh, zo * p_block, p_block,
                          i // (batch * oh))
                if tail > 0:
                    block(XU, W, CORR, GS, B, Y, i % (batch * oh) // oh, i % oh, full * p_block, tail,
                          i // (batch * oh))
        else:
            for tg in T.serial(n_groups):
                for r in T.serial(batch * oh):
                    for zo in T.serial(full):
                        block(XU, W, CORR, GS, B, Y, r // oh, r % oh, zo * p_block, p_block, tg)
                    if tail > 0:
                        block(XU, W, CORR, GS, B, Y, r // oh, r % oh, full * p_block, tail, tg)

    # manifest knobs are numbers
    knobs = {"positions": p_block, "tiles": t_block, "kw_groups": int(kw_mode), "split": int(split)}
    return conv, knobs
