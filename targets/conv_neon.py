"""The BitConv2d kernel for aarch64 NEON (Cortex-A72 and up): a hand-written direct convolution on smull/smlal.

The math of `quant.bitconv2d_reference` (conv_kernels.py's docstring), for O % 4 == 0, in three stages per call:

    per call       the weights (g4o4, as stored) re-laid out as WT[tile, group, 16 Q bytes] (a block's weights of
                   consecutive groups contiguous: `ldp d` reaches them), and whether they are ternary:
                   max(w + 1) <= 2 as u8
    per sample b   amax and scale, then the input (NCHW or NHWC, times a folded prescale) quantized once into
                   XQ[b] (int8 x_q, the padding 0; fcvtns + saturating narrows) in the layout of
                   conv_kernels.ConvLayout: NCHW ("kw": a group of 4 reduction inputs is 4 adjacent columns) or HWC
                   ("c": 4 adjacent channels, C padded to a multiple of 4 with zeros)
    per row        register blocks of P output positions x Q quads of 4 output channels: 2*P*Q int16x8
                   accumulators over the whole reduction. A quad's weights of a group are 16 bytes, [c0 l0..l3,
                   c1 l0..l3, c2 .., c3 ..] (one ldp d); a position's 4 activations of the group are a 32-bit word
                   duplicated (dup .2s from a 16-byte window: one load serves a block's positions of a kernel row
                   in "kw", 4 groups of a position in "c"); per quad and position two `smlal` (channels 0-1,
                   2-3) add 8 int8 x int8 products each into the int16 lanes (channel, input). At the end
                   `saddlp` + `addp` sum the 4 lanes of a channel into int32, then y = act(fma(f32(acc),
                   gamma / scale, bias)) stored NCHW: for 2 <= P <= 4 the positions x 4 channels are transposed
                   (zip), a channel's positions stored at once; else each position's 4 channels with the channel
                   stride.

Exactness: |x_q| <= 128, so for ternary weights an int16 lane (one product per group) holds up to 255 groups
(32,640) and every NatureCNN layer (64-144 groups) accumulates in int16 all the way. Int8 weights (an int8
layer: |w| <= 127) or more than 255 groups take the widening path instead: each product pair widened into
int32 at once (`smull` + `sadalp`), exact for any K below 16 million. The ternary check runs per call because
conv_kernels.conv_kernel is not told the layer's precision (the kernel name is the same for both).

(P, Q) per layer minimise the instructions of an output row (`blocking`) within the 32 NEON registers (more
spill); rows (and samples) are split across threads when the layer is large enough (epilogue.PARALLEL_MIN_WORK),
as conv_vnni.py. On the Cortex-A72 the inner loops take about 0.17 instructions per multiply-accumulate (2 smlal
per 16), the whole kernels 0.2-0.21 (bitrl_compile/bench/conv.py's arm counts).
"""

from __future__ import annotations

from math import gcd

from tvm.script import tirx as T

from bitrl_compile.quant import EPS, QMAX

from .absmax import absmax
from .conv_vnni import prescaled
from .epilogue import PARALLEL_MIN_WORK, activate

NEON_ISAS = ("neon", "neon-lut", "neon-dotprod")  # specs whose convolutions are this kernel (conv_kernels.py)
NEON_REGISTERS = 32
TERNARY_GROUPS = 255   # groups an int16 lane can sum for ternary weights: 255 * 128 < 2**15
LDP_RANGE = 504        # the largest offset of an `ldp d` (imm7 x 8 bytes): the inner loops' weight loads stay inside


def supports(geometry, hw: tuple[int, int], o: int) -> bool:
    """Whether this kernel handles the layer (else conv_kernels' LLVM-vectorised one does)."""
    return o % 4 == 0


def blocking(ow: int, quads: int, groups: int, act=lambda p: p, live=lambda p: p) -> tuple[int, int]:
    """(P positions, Q quads of 4 channels) per register block: the fewest instructions per output row (blocks of
    P over the row and a tail block; per block `groups` steps of 2*P*Q smlal + Q weight loads (ldp d) + act(P)
    activation loads and broadcasts, then the epilogue: 17 per quad and position, or for 2 <= P <= 4 the
    positions transposed: 7 per position, 8 zips and a store or two per channel) with the 2*P*Q accumulators,
    2 weight registers, P broadcasts and live(P) activation windows in the 32 NEON registers."""
    def block(p, q):
        epilogue = q * (7 * p + 8 + 4 * (2 if p == 3 else 1)) if 2 <= p <= 4 else 17 * p * q
        return groups * (2 * p * q + q + act(p)) + epilogue + 2 * p * q + 20

    best = None
    for q in (v for v in range(1, quads + 1) if quads % v == 0):
        for p in (v for v in range(1, ow + 1) if 2 * v * q + 2 + v + live(v) <= NEON_REGISTERS):
            full, tail = divmod(ow, p)
            cost = (quads // q) * (full * block(p, q) + (block(tail, q) if tail else 0))
            if best is None or cost < best[0]:
                best = (cost, p, q)
    return best[1], best[2]


def _smull(a, b, high: bool):
    """8 int8 x int8 -> int16 products: the low (smull) or high (smull2) halves of two int8x16."""
    pick = T.vectorhigh if high else T.vectorlow
    return T.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", pick("int8x8", a), pick("int8x8", b))


def _smull8(a, b):
    """8 int8 x int8 -> int16 products (smull; smlal with the add of the accumulator). The weights are loaded as
    two 8-byte halves (ldp d): an smull2 of a 16-byte load would cost an ext, since LLVM narrows the activations'
    dup to 8 bytes."""
    return T.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", a, b)


def _saddlp(v):
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", v)


def _addp(a, b):  # [a0 + a1, a2 + a3, b0 + b1, b2 + b3]
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.addp.v4i32", a, b)


def _zip(a, b, lanes, high: bool):  # zip1 / zip2 of 4-lane vectors, as pairs of `lanes` elements
    n = 4 // lanes
    base = n // 2 if high else 0
    return T.Shuffle([a, b], [k for i in range(base, base + n // 2) for k in
                              [*(lanes * i + j for j in range(lanes)), *(4 + lanes * i + j for j in range(lanes))]])


def neon_conv(geometry, hw: tuple[int, int], o: int, activation: str, per_channel: bool, layout, *,
              input_layout: str = "nchw", prescale: tuple[str, float] | None = None):
    """The PrimFunc (x[B, C*H*W] f32, NCHW or NHWC, w[G, O16, 4] i8, gamma, bias -> y[B, O, OH, OW]) and its knobs.
    `prescale` (("div" | "mul", c): a folded graph op) scales the input in the quantization step, as conv_vnni."""
    nhwc = input_layout == "nhwc"
    if nhwc and layout.mode != "c":
        raise ValueError("an NHWC input needs the channel-group layout (ConvLayout.of(..., \"nhwc\"))")
    magnitude = None if prescale is None else (prescale[0], abs(float(prescale[1])))
    c, (h, w_), (kh, kw), (sh, sw) = geometry.channels, hw, geometry.kernel, geometry.stride
    pt, pl, pb, pr = geometry.padding
    oh, ow = geometry.output_hw(h, w_)
    size, hp, wp = c * h * w_, h + pt + pb, w_ + pl + pr
    quads, groups, c4, jg, o16 = o // 4, layout.groups, layout.c4, kw // 4, layout.o16
    kw_mode = layout.mode == "kw"
    cw = 1 if kw_mode else 4 * c4                       # bytes per image position in XQ
    xq_len = (c * hp * wp) if kw_mode else hp * wp * cw  # XQ bytes per sample
    xq_pad = -(-(xq_len + 32) // 64) * 64  # + 32: a block's last 16-byte windows may read past the image
    parallel = geometry.k * o * oh * ow >= PARALLEL_MIN_WORK
    extents = (c, kh, jg) if kw_mode else (kh, kw, c4)
    windows = -(-extents[2] // 4)  # "c": 16-byte activation loads per position and (ga, gb) step
    # "run" steps: a block's activations of one step are a run of bytes, its positions `pos_bytes` apart and
    # each position's groups 4 bytes apart: "kw" (steps (c, i), groups jg), and "c" with C <= 4 (steps i, groups
    # j: an NHWC frame of 4 channels); the step's run is loaded once as 16-byte windows per phase (the byte
    # offset mod 4 of a position: multiples of phase_step)
    runs_mode = kw_mode or c4 == 1
    run_ext = extents if kw_mode else (1, kh, kw)
    pos_bytes = sw * cw
    phase_step = gcd(pos_bytes, 4)

    def run_windows(n_pos):  # 16-byte windows per phase covering a block's positions
        return -(-((n_pos - 1) * pos_bytes + 4 * run_ext[2]) // 16)

    def run_group(g_a, g_b, g_c):
        return group(g_a, g_b, g_c) if kw_mode else g_b * kw + g_c

    def run_base(g_a, g_b, yy, z):
        return step_addr(g_a, g_b, 0, yy, z) if kw_mode else step_addr(g_b, 0, 0, yy, z)

    def phases(n_pos):
        return len({p * pos_bytes % 4 for p in range(n_pos)})

    if runs_mode:  # per group: the windows and a broadcast per distinct word
        p_block, q_block = blocking(ow, quads, groups, lambda p: (run_windows(p) * phases(p) + (p - 1) * pos_bytes // 4
                                                                  + run_ext[2]) / run_ext[2],
                                    lambda p: run_windows(p) * phases(p))
    else:  # per group and position: a broadcast, and a window per 4 groups
        p_block, q_block = blocking(ow, quads, groups, lambda p: p + p / min(4, c4), lambda p: p)
    full, tail = divmod(ow, p_block)
    tiles = quads // q_block
    # the weights are re-laid out per call as WT[tile, group, Q * 16 bytes] (a block's weights of consecutive groups
    # are contiguous); "run" steps unroll their middle loop by `unroll`, whose weights stay in reach of ldp
    unroll = max(u for u in range(1, run_ext[1] + 1) if run_ext[1] % u == 0 and
                 (u * run_ext[2] * q_block * 16 - 16 <= LDP_RANGE or u == 1))
    fast = groups <= TERNARY_GROUPS  # ternary weights: int16 accumulation over the whole reduction
    act = activation

    def quantize16(X, b, i, s):  # 16 inputs from X[b, i]: fcvtns (round half even), then saturating narrows
        def half(k):
            words = [T.call_llvm_pure_intrin("int16x4", "llvm.aarch64.neon.sqxtn.v4i16", T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.fcvtns.v4i32.v4f32",
                prescaled(X[b, T.ramp(i + 4 * (2 * k + j), 1, 4)], prescale, 4) * T.broadcast(s, 4)))
                for j in range(2)]
            return T.call_llvm_pure_intrin("int8x8", "llvm.aarch64.neon.sqxtn.v8i8",
                                           T.Shuffle(words, list(range(8))))
        return T.Shuffle([half(0), half(1)], list(range(16)))

    def quantize1(v, s):
        return T.Cast("int8", T.max(T.min(T.round(prescaled(v, prescale) * s), T.float32(127)), T.float32(-128)))

    def xq_at(ch, row, col):  # the XQ byte offset of channel ch at padded row, column
        return (ch * hp + row) * wp + col if kw_mode else (row * wp + col) * cw + ch

    def step_addr(g_a, g_b, g_c, yy, z):  # the XQ offset of the group (c, i, jg) / (i, j, cg) at output (yy, z)
        if kw_mode:
            return (g_a * hp + yy * sh + g_b) * wp + z * sw + 4 * g_c
        return ((yy * sh + g_a) * wp + z * sw + g_b) * cw + 4 * g_c

    def group(g_a, g_b, g_c):
        return (g_a * kh + g_b) * jg + g_c if kw_mode else (g_a * kw + g_b) * c4 + g_c

    def lane(win, p, gl):  # word gl of a position's window in both 32-bit lanes (dup .2s, v.s[gl])
        return T.reinterpret("int8x8", T.broadcast(win[p, gl], 2))

    def word(XQ, b, addr):  # a position's 4 activations of a group, in every 32-bit lane (ld1r .4s)
        return T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", XQ.vload([b, addr], "int8x4")), 4))

    flat = pl == 0 and pr == 0
    runs, run, run_col, step = (1, h * w_, 0, cw) if flat else (h, w_, pl, cw)
    covered = pt == pl == pb == pr == 0 and (kw_mode or c == cw)  # the runs write every byte the blocks read
    # an NHWC input with C % 4 == 0 is read as `runs` runs of `run` pixels x C channels, each one contiguous run
    # of XQ bytes (C == cw); with other C each value is placed on its own (pixel by pixel)
    dense = nhwc and c == cw
    run_values = run * c

    def run_row(r):
        return pt if flat else r + pt

    def first(v, n):  # the first n lanes of a 4-lane vector
        return v if n == 4 else T.Shuffle([v], list(range(n)))

    def transposed(fv, j):  # [fv[0][j], fv[1][j], fv[2][j], fv[3][j]]: channel j's 4 positions (zip1/zip2)
        v = [fv[p, T.ramp(0, 1, 4)] for p in range(4)]
        lo01, hi01 = _zip(v[0], v[1], 1, False), _zip(v[0], v[1], 1, True)
        lo23, hi23 = _zip(v[2], v[3], 1, False), _zip(v[2], v[3], 1, True)
        if j < 2:
            return _zip(lo01, lo23, 2, j == 1)
        return _zip(hi01, hi23, 2, j == 3)

    def sums(acc, p, q, wide: bool):  # the int32 sums of the block's 4 channels of quad q at position p
        if wide:
            return _addp(acc[p, q, 0, T.ramp(0, 1, 4)], acc[p, q, 1, T.ramp(0, 1, 4)])
        return _addp(_saddlp(acc[p, q, 0, T.ramp(0, 1, 8)]), _saddlp(acc[p, q, 1, T.ramp(0, 1, 8)]))

    @T.macro
    def epilogue(Y, G, B, S, acc, b, yy, z0, n_pos, q, o0, wide):
        gs = (G[T.ramp(o0, 1, 4)] / T.broadcast(S[b], 4)) if per_channel else T.broadcast(G[0] / S[b], 4)
        if 2 <= n_pos <= 4:  # positions x 4 channels: transposed, a channel's positions stored at once
            fv = T.alloc_buffer((4, 4), "float32")
            for p in T.unroll(4):
                if p < n_pos:
                    fv[p, T.ramp(0, 1, 4)] = activate(T.fma(T.Cast("float32x4", sums(acc, p, q, wide)), gs,
                                                            B[T.ramp(o0, 1, 4)]), act)
                else:  # not stored
                    fv[p, T.ramp(0, 1, 4)] = T.broadcast(T.float32(0), 4)
            Y[T.ramp(((b * o + o0) * oh + yy) * ow + z0, 1, n_pos)] = first(transposed(fv, 0), n_pos)
            Y[T.ramp(((b * o + o0 + 1) * oh + yy) * ow + z0, 1, n_pos)] = first(transposed(fv, 1), n_pos)
            Y[T.ramp(((b * o + o0 + 2) * oh + yy) * ow + z0, 1, n_pos)] = first(transposed(fv, 2), n_pos)
            Y[T.ramp(((b * o + o0 + 3) * oh + yy) * ow + z0, 1, n_pos)] = first(transposed(fv, 3), n_pos)
        else:
            for p in T.unroll(n_pos):
                Y[T.ramp(((b * o + o0) * oh + yy) * ow + z0 + p, oh * ow, 4)] = activate(T.fma(
                    T.Cast("float32x4", sums(acc, p, q, wide)), gs, B[T.ramp(o0, 1, 4)]), act)

    @T.macro
    def mac(acc, WT, g, qt, p, q, a):  # acc[p, q] += the block's quad q (4 channels) x the group's 4 activations a
        acc[p, q, 0, T.ramp(0, 1, 8)] = acc[p, q, 0, T.ramp(0, 1, 8)] + _smull8(WT.vload([qt, g, q * 16], "int8x8"), a)
        acc[p, q, 1, T.ramp(0, 1, 8)] = acc[p, q, 1, T.ramp(0, 1, 8)] + _smull8(
            WT.vload([qt, g, q * 16 + 8], "int8x8"), a)

    @T.macro
    def block16(XQ, W, G, B, Y, S, b, yy, z0, n_pos, qt):  # ternary: int16 lanes over the whole reduction
        # "global" scope, < 1 KB: an alloca that LLVM keeps in registers (conv_vnni.py)
        acc = T.alloc_buffer((n_pos, q_block, 2, 8), "int16")
        for p in T.unroll(n_pos):
            for q in T.unroll(q_block):
                acc[p, q, 0, T.ramp(0, 1, 8)] = T.broadcast(T.int16(0), 8)
                acc[p, q, 1, T.ramp(0, 1, 8)] = T.broadcast(T.int16(0), 8)
        if runs_mode:  # the block's activations of a step (ga, gb) are one run of bytes: 16-byte windows per phase
            win = T.alloc_buffer((4, 4 * run_windows(n_pos)), "int32")
            for ga in T.serial(run_ext[0]):
                for gbo in T.serial(run_ext[1] // unroll):
                    for gbi in T.unroll(unroll):
                        for ph in T.unroll(4):
                            if ph % phase_step == 0:
                                for k in T.unroll(run_windows(n_pos)):
                                    win[ph, T.ramp(4 * k, 1, 4)] = T.reinterpret("int32x4", XQ.vload(
                                        [b, run_base(ga, gbo * unroll + gbi, yy, z0) + ph + 16 * k], "int8x16"))
                        for gc in T.unroll(run_ext[2]):
                            for q in T.unroll(q_block):
                                for p in T.unroll(n_pos):
                                    mac(acc, W, run_group(ga, gbo * unroll + gbi, gc), qt, p, q,
                                        lane(win, p * pos_bytes % 4, (p * pos_bytes - p * pos_bytes % 4) // 4 + gc))
        else:
            win = T.alloc_buffer((n_pos, 4), "int32")
            for ga in T.serial(extents[0]):
                for gb in T.serial(extents[1]):
                    for gk in T.serial(windows):
                        for p in T.unroll(n_pos):  # a position's 4 groups (16 bytes) in one load
                            win[p, T.ramp(0, 1, 4)] = T.reinterpret("int32x4", XQ.vload(
                                [b, step_addr(ga, gb, 4 * gk, yy, z0 + p)], "int8x16"))
                        for gl in T.unroll(4):
                            if 4 * gk + gl < extents[2]:
                                for q in T.unroll(q_block):
                                    for p in T.unroll(n_pos):
                                        mac(acc, W, group(ga, gb, 4 * gk + gl), qt, p, q,
                                            lane(win, p, gl))
        for q in T.unroll(q_block):
            epilogue(Y, G, B, S, acc, b, yy, z0, n_pos, q, (qt * q_block + q) * 4, False)

    @T.macro
    def block32(XQ, W, G, B, Y, S, b, yy, z0, n_pos, qt):  # int8 weights: every product pair widened at once
        acc = T.alloc_buffer((n_pos, q_block, 2, 4), "int32")
        for p in T.unroll(n_pos):
            for q in T.unroll(q_block):
                acc[p, q, 0, T.ramp(0, 1, 4)] = T.broadcast(T.int32(0), 4)
                acc[p, q, 1, T.ramp(0, 1, 4)] = T.broadcast(T.int32(0), 4)
        for ga in T.serial(extents[0]):
            for gb in T.serial(extents[1]):
                for gc in T.unroll(extents[2]):
                    for q in T.unroll(q_block):
                        for p in T.unroll(n_pos):
                            acc[p, q, 0, T.ramp(0, 1, 4)] = acc[p, q, 0, T.ramp(0, 1, 4)] + _saddlp(_smull(
                                W.vload([qt, group(ga, gb, gc), q * 16], "int8x16"),
                                word(XQ, b, step_addr(ga, gb, gc, yy, z0 + p)), False))
                            acc[p, q, 1, T.ramp(0, 1, 4)] = acc[p, q, 1, T.ramp(0, 1, 4)] + _saddlp(_smull(
                                W.vload([qt, group(ga, gb, gc), q * 16], "int8x16"),
                                word(XQ, b, step_addr(ga, gb, gc, yy, z0 + p)), True))
        for q in T.unroll(q_block):
            epilogue(Y, G, B, S, acc, b, yy, z0, n_pos, q, (qt * q_block + q) * 4, True)

    @T.macro
    def row_wide(XQ, W, G, B, Y, S, TERN, r):  # TERN unused: int8 weights, or too many groups for int16
        for qt in T.serial(tiles):
            for zo in T.serial(full):
                block32(XQ, W, G, B, Y, S, r // oh, r % oh, zo * p_block, p_block, qt)
            if tail > 0:
                block32(XQ, W, G, B, Y, S, r // oh, r % oh, full * p_block, tail, qt)

    @T.macro
    def row_fast(XQ, W, G, B, Y, S, TERN, r):
        if TERN[0] != 0:
            for qt in T.serial(tiles):
                for zo in T.serial(full):
                    block16(XQ, W, G, B, Y, S, r // oh, r % oh, zo * p_block, p_block, qt)
                if tail > 0:
                    block16(XQ, W, G, B, Y, S, r // oh, r % oh, full * p_block, tail, qt)
        else:
            row_wide(XQ, W, G, B, Y, S, TERN, r)

    row = row_fast if fast else row_wide

    @T.prim_func
    def conv(x: T.handle, w: T.handle, gamma: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, size), "float32")
        W = T.match_buffer(w, (groups, o16, 4), "int8")
        G = T.match_buffer(gamma, (o if per_channel else 1,), "float32")
        B = T.match_buffer(bias, (o,), "float32")
        Y4 = T.match_buffer(y, (batch, o, oh, ow), "float32")
        Y = T.decl_buffer((batch * o * oh * ow,), "float32", data=Y4.data)
        XQ = T.alloc_buffer((batch, xq_pad), "int8")
        WT = T.alloc_buffer((tiles, groups, q_block * 16), "int8")
        S = T.alloc_buffer((batch,), "float32")
        TERN = T.alloc_buffer((1,), "int32")
        wm = T.alloc_buffer((4, 16), "uint8")
        mx = T.alloc_buffer((4, 16), "float32")
        m = T.alloc_buffer((1,), "float32")
        # the weights as WT[tile, group, 16 Q bytes], and whether they are ternary: every byte + 1 (mod 256) <= 2
        for u in T.unroll(4):
            wm[u, T.ramp(0, 1, 16)] = T.broadcast(T.uint8(0), 16)
        for g in T.serial(groups):
            for u in T.unroll(quads):
                WT[u // q_block, g, T.ramp(u % q_block * 16, 1, 16)] = W.vload([g, u * 4, 0], "int8x16")
                wm[u % 4, T.ramp(0, 1, 16)] = T.max(wm[u % 4, T.ramp(0, 1, 16)], T.reinterpret(
                    "uint8x16", W.vload([g, u * 4, 0], "int8x16")) + T.broadcast(T.uint8(1), 16))
        wm[0, T.ramp(0, 1, 16)] = T.max(T.max(wm[0, T.ramp(0, 1, 16)], wm[1, T.ramp(0, 1, 16)]),
                                        T.max(wm[2, T.ramp(0, 1, 16)], wm[3, T.ramp(0, 1, 16)]))
        TERN[0] = T.Cast("int32", T.call_llvm_pure_intrin("int32", "llvm.aarch64.neon.umaxv.i32.v16i8",
                                                          wm[0, T.ramp(0, 1, 16)]) <= 2)
        for b in T.serial(batch):
            absmax(m, mx, X, b, size)
            S[b] = T.float32(QMAX) / T.max(prescaled(m[0], magnitude), T.float32(EPS))
            for v in T.serial(0 if covered else xq_pad // 64):  # the padding (and padded channels): 0
                XQ[b, T.ramp(v * 64, 1, 64)] = T.broadcast(T.int8(0), 64)
            if dense:  # NHWC, C % 4 == 0: XQ's pixels are the input's, in order
                for r in T.serial(runs):
                    for v in T.serial(run_values // 16):
                        XQ[b, T.ramp(xq_at(0, run_row(r), run_col) + v * 16, 1, 16)] = quantize16(
                            X, b, r * run_values + v * 16, S[b])
                    for v in T.serial(run_values % 16):
                        XQ[b, xq_at(0, run_row(r), run_col) + run_values // 16 * 16 + v] = quantize1(
                            X[b, r * run_values + run_values // 16 * 16 + v], S[b])
            elif nhwc:  # NHWC with padded channel groups: value by value
                for r in T.serial(h):
                    for col in T.serial(w_):
                        for ch in T.serial(c):
                            XQ[b, xq_at(ch, r + pt, col + pl)] = quantize1(X[b, (r * w_ + col) * c + ch], S[b])
            else:
                for ch in T.serial(c):
                    for r in T.serial(runs):
                        for v in T.serial(run // 16):
                            XQ[b, T.ramp(xq_at(ch, run_row(r), run_col) + v * 16 * step, step, 16)] = quantize16(
                                X, b, ch * h * w_ + r * run + v * 16, S[b])
                        for v in T.serial(run % 16):
                            XQ[b, xq_at(ch, run_row(r), run_col) + (run // 16 * 16 + v) * step] = quantize1(
                                X[b, ch * h * w_ + r * run + run // 16 * 16 + v], S[b])
        if parallel:
            for r in T.parallel(batch * oh):
                row(XQ, WT, G, B, Y, S, TERN, r)
        else:
            for r in T.serial(batch * oh):
                row(XQ, WT, G, B, Y, S, TERN, r)

    knobs = {"positions": p_block, "quads": q_block, "kw_groups": int(kw_mode)}  # manifest knobs are numbers
    return conv, knobs
