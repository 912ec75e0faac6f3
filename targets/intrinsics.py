"""Tensor intrinsics of the BitLinear kernels: one 2-bit weight tile times `rows` activation rows.

Every intrinsic has the same description (what it computes), for a tile of the `tiles{NL}x{KG}`
layout (runtime/weights.py) and `rows` batch rows:

    C[b, i] += sum over q < 4, j < KG of  int32((W[i, j] >> 2q) & 3) * int32(A[b, q, j])

C: int32 [rows, NL] accumulators (lanes = output channels), W: uint8 [NL, KG] tile bytes,
A: int8 [rows, 4, KG] activations. The codes (w + 1 in {0, 1, 2}) are unsigned, so
dot(w + 1, a) = dot(w, a) + sum(a), and the kernel subtracts sum(a) once per row in its epilogue.
Each implementation decodes the tile once (one vector load, a shift and a mask per plane q) and
reuses the codes for all rows; each plane is one dot-product instruction per row against KG
activations broadcast to every lane:

    avx512-vnni  NL=16 KG=4  vpdpbusd (u8 x s8, 4 products per int32 lane, no saturation)
    avx2         NL=8  KG=4  vpmaddubsw (u8 x s8 pairs -> int16; |pair| <= 2*2*128 = 512, and the sum
                             of the 4 planes <= 2048: never saturates) then vpmaddwd by 1 -> int32
    neon-dotprod NL=4  KG=4  sdot (codes 0..2 are valid signed bytes)
    neon         NL=8  KG=2  smull/smlal: 4 products per int16 lane, |sum| <= 4*2*128 = 1024, so the
                             int16 partial sums cannot overflow; sadalp widens them into int32 per
                             tile (no int16 value lives longer than one tile, whatever K is)

The int32 accumulators hold at most 2*128*K_padded in magnitude: exact for K < 8 million.

The avx512-vnni GEMM rows use a panel instead (`panel_intrinsic`): one call is 4 rows x up to 4 output
tiles over the whole of K (the description is the AMX one: C[rows, tiles, NL] += over all K steps), its
16 int32 accumulators live in zmm registers for all of K and each vpdpbusd chains straight into one;
per K step each tile's 4 planes are decoded once for the 4 rows and each row's activations are broadcast
once for the tiles: 64 vpdpbusd, 16 vpbroadcastd, 4 loads and 28 shifts / masks, no store. The per-step
intrinsics above instead load, add and store their accumulators at every step.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target.codegen import llvm_version_major


def _code(W, o, r, i, j, q):
    """The code (w + 1) of plane q in byte W[o, r, i, j] of a 2-bit tile, as the descriptions spell it."""
    return T.Cast("int32", (W[o, r, i, j] >> T.Cast("uint8", q * 2)) & T.uint8(3))


def _desc(nl: int, kg: int, rows: int):
    if rows == 1:  # the tail rows: the batch row is an outer loop, not an iterator of the intrinsic
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, w: T.handle, c: T.handle):
            A = T.match_buffer(a, (1, 1, 4, kg), "int8", offset_factor=1)
            W = T.match_buffer(w, (1, 1, nl, kg), "uint8", offset_factor=1)
            C = T.match_buffer(c, (1, 1, nl), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0, 0, 0:nl], W[0, 0, 0:nl, 0:kg], A[0, 0, 0:4, 0:kg])
                T.writes(C[0, 0, 0:nl])
                for i, q, j in T.grid(nl, 4, kg):
                    with T.sblock("update"):
                        vi, vq, vj = T.axis.remap("SRR", [i, q, j])
                        C[0, 0, vi] = C[0, 0, vi] + _code(W, 0, 0, vi, vj, vq) * T.Cast("int32", A[0, 0, vq, vj])

        return desc

    @T.prim_func(s_tir=True)
    def desc_rows(a: T.handle, w: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, 1, 4, kg), "int8", offset_factor=1)
        W = T.match_buffer(w, (1, 1, nl, kg), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, 1, nl), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:nl], W[0, 0, 0:nl, 0:kg], A[0:rows, 0, 0:4, 0:kg])
            T.writes(C[0:rows, 0, 0:nl])
            for b, i, q, j in T.grid(rows, nl, 4, kg):
                with T.sblock("update"):
                    vb, vi, vq, vj = T.axis.remap("SSRR", [b, i, q, j])
                    C[vb, 0, vi] = C[vb, 0, vi] + _code(W, 0, 0, vi, vj, vq) * T.Cast("int32", A[vb, 0, vq, vj])

    return desc_rows


def _plane(W, q: int, nbytes: int, dtype: str = "uint8", index=(0, 0, 0, 0), shift16: bool = False):
    """The codes of plane q of the tile at W[index], (byte >> 2q) & 3, as `nbytes` lanes of `dtype` (same bits).

    shift16: shift 16-bit lanes (the mask clears what crosses from the next byte). x86 has no byte shift, and
    for a CPU with GFNI LLVM spells the byte shift as vgf2p8affineqb, which on Zen 4 competes with vpdpbusd
    for its ports: vpsrlw + vpand made the VNNI kernels 10-15% faster there (docs/kernels.md)."""
    v = W.vload(list(index), f"uint8x{nbytes}")
    if q and shift16:
        v = T.reinterpret(f"uint8x{nbytes}", T.reinterpret(f"uint16x{nbytes // 2}", v) >> T.broadcast(T.uint16(2 * q),
                                                                                                        nbytes // 2))
    elif q:
        v = v >> T.broadcast(T.uint8(2 * q), nbytes)
    if q < 3 or shift16:
        v = v & T.broadcast(T.uint8(3), nbytes)
    return v if dtype == "uint8" else T.reinterpret(f"{dtype}x{nbytes // (1 if dtype.endswith('8') else 4)}", v)


def _activations(A, b, q: int, kg: int, nbytes: int):
    """The KG activations of row b, plane q, repeated to `nbytes` int8 lanes (one vpbroadcastd / dup)."""
    word = {4: "int32", 2: "int16"}[kg]
    return T.reinterpret(f"int8x{nbytes}", T.broadcast(T.reinterpret(word, A.vload([b, 0, q, 0], f"int8x{kg}")),
                                                       nbytes // kg))


def _impl_avx2(nl: int, kg: int, rows: int):
    assert (nl, kg) == (8, 4)

    def madd(A, W, b, q):  # u8 codes x s8 activations, adjacent pairs summed to int16 (never saturates)
        return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", _plane(W, q, 32),
                                       _activations(A, b, q, 4, 32))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, 1, 4, 4), "int8", offset_factor=1)
        W = T.match_buffer(w, (1, 1, 8, 4), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, 1, 8), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:8], W[0, 0, 0:8, 0:4], A[0:rows, 0, 0:4, 0:4])
            T.writes(C[0:rows, 0, 0:8])
            for b in T.unroll(rows):
                C[b, 0, T.ramp(0, 1, 8)] = C[b, 0, T.ramp(0, 1, 8)] + T.call_llvm_pure_intrin(
                    "int32x8", "llvm.x86.avx2.pmadd.wd",
                    madd(A, W, b, 0) + madd(A, W, b, 1) + madd(A, W, b, 2) + madd(A, W, b, 3),
                    T.broadcast(T.int16(1), 16))

    return impl


def _impl_vnni(nl: int, kg: int, rows: int):
    assert (nl, kg) == (16, 4)

    bytes_as = "int8" if llvm_version_major() >= 21 else "int32"  # LLVM 21 retyped the operands as i8 vectors

    def dpbusd(acc, A, W, b, q):  # acc + u8 codes . s8 activations, 4 products per int32 lane
        a = _activations(A, b, q, 4, 64)
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                       _plane(W, q, 64, bytes_as, shift16=True),
                                       a if bytes_as == "int8" else T.reinterpret("int32x16", a))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, 1, 4, 4), "int8", offset_factor=1)
        W = T.match_buffer(w, (1, 1, 16, 4), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, 1, 16), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:16], W[0, 0, 0:16, 0:4], A[0:rows, 0, 0:4, 0:4])
            T.writes(C[0:rows, 0, 0:16])
            for b in T.unroll(rows):
                # A fresh chain per tile: the loop-carried dependency is one add, not four vpdpbusd.
                C[b, 0, T.ramp(0, 1, 16)] = C[b, 0, T.ramp(0, 1, 16)] + dpbusd(dpbusd(dpbusd(dpbusd(
                    T.broadcast(T.int32(0), 16), A, W, b, 0), A, W, b, 1), A, W, b, 2), A, W, b, 3)

    return impl


def _impl_sdot(nl: int, kg: int, rows: int):
    assert (nl, kg) == (4, 4)

    def sdot(acc, A, W, b, q):  # acc + s8 codes . s8 activations, 4 products per int32 lane
        # the row's 16 activations in one load; plane q uses its lane (sdot by element: no ld1r per plane)
        row = T.reinterpret("int32x4", A.vload([b, 0, 0, 0], "int8x16"))
        return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc,
                                       _plane(W, q, 16, "int8"), T.reinterpret("int8x16", T.Shuffle([row], [q] * 4)))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, 1, 4, 4), "int8", offset_factor=1)
        W = T.match_buffer(w, (1, 1, 4, 4), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, 1, 4), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:4], W[0, 0, 0:4, 0:4], A[0:rows, 0, 0:4, 0:4])
            T.writes(C[0:rows, 0, 0:4])
            for b in T.unroll(rows):
                C[b, 0, T.ramp(0, 1, 4)] = C[b, 0, T.ramp(0, 1, 4)] + sdot(sdot(sdot(sdot(
                    T.broadcast(T.int32(0), 4), A, W, b, 0), A, W, b, 1), A, W, b, 2), A, W, b, 3)

    return impl


def _impl_neon(nl: int, kg: int, rows: int):
    assert (nl, kg) == (8, 2)

    def half_products(A, W, b, half):
        # int16 lanes = (channel, input pair) of channels 0-3 (low) or 4-7 (high): smull, then smlal /
        # smull2, smlal2; 4 products per lane, |sum| <= 4 * 2 * 128 = 1024.
        pick = T.vectorlow if half == 0 else T.vectorhigh
        total = None
        for q in range(4):
            pair = T.Shuffle([T.reinterpret("int16x4", A.vload([b, 0, 0, 0], "int8x8"))], [q] * 4)  # dup .h[q]
            prod = T.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16",
                                           pick("int8x8", _plane(W, q, 16, "int8")), T.reinterpret("int8x8", pair))
            total = prod if total is None else total + prod
        return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", total)  # sadalp

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, 1, 4, 2), "int8", offset_factor=1)
        W = T.match_buffer(w, (1, 1, 8, 2), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, 1, 8), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:8], W[0, 0, 0:8, 0:2], A[0:rows, 0, 0:4, 0:2])
            T.writes(C[0:rows, 0, 0:8])
            for b in T.unroll(rows):
                C[b, 0, T.ramp(0, 1, 4)] = C[b, 0, T.ramp(0, 1, 4)] + half_products(A, W, b, 0)
                C[b, 0, T.ramp(4, 1, 4)] = C[b, 0, T.ramp(4, 1, 4)] + half_products(A, W, b, 1)

    return impl


def _impl_vnni_panel(rows: int, nl: int, kg: int, kb: int, tiles: int, unroll: int):
    """The GEMM rows of the avx512-vnni kernel: `rows` x `tiles` output tiles over the whole of K, the
    int32 accumulators in registers for all of K (no per-step load / add / store of C), each tile's 4
    planes decoded once per step for all rows, each row's activations broadcast once per step for all
    tiles; the vpdpbusd chain runs straight into the accumulator. `unroll` K steps per loop iteration."""
    assert (nl, kg) == (16, 4) and kb % unroll == 0
    bytes_as = "int8" if llvm_version_major() >= 21 else "int32"

    def dpbusd(acc, A, W, o, step, b, q):
        a = _activations_at(A, b, step, q)
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                       _plane(W, q, 64, bytes_as, (o, step, 0, 0), shift16=True),
                                       a if bytes_as == "int8" else T.reinterpret("int32x16", a))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle):
        sa = T.int64()
        sc = T.int64()
        A = T.match_buffer(a, (rows, kb, 4, kg), "int8", strides=[sa, 16, 4, 1], offset_factor=1)
        W = T.match_buffer(w, (tiles, kb, nl, kg), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, tiles, nl), "int32", strides=[sc, nl, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:tiles, 0:nl], W[0:tiles, 0:kb, 0:nl, 0:kg], A[0:rows, 0:kb, 0:4, 0:kg])
            T.writes(C[0:rows, 0:tiles, 0:nl])
            acc = T.alloc_buffer((rows, tiles, 16), "int32", scope="local")
            for b in T.unroll(rows):
                for o in T.unroll(tiles):
                    acc[b, o, T.ramp(0, 1, 16)] = C[b, o, T.ramp(0, 1, 16)]
            for s in T.serial(kb // unroll):
                for u in T.unroll(unroll):
                    for o in T.unroll(tiles):
                        for b in T.unroll(rows):
                            acc[b, o, T.ramp(0, 1, 16)] = dpbusd(dpbusd(dpbusd(dpbusd(
                                acc[b, o, T.ramp(0, 1, 16)], A, W, o, s * unroll + u, b, 0), A, W, o, s * unroll + u,
                                b, 1), A, W, o, s * unroll + u, b, 2), A, W, o, s * unroll + u, b, 3)
            for b in T.unroll(rows):
                for o in T.unroll(tiles):
                    C[b, o, T.ramp(0, 1, 16)] = acc[b, o, T.ramp(0, 1, 16)]

    return impl


def _activations_at(A, b, step, q: int):
    """The 4 activations of row b, step `step`, plane q, repeated to 64 int8 lanes."""
    return T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", A.vload([b, step, q, 0], "int8x4")), 16))


PANEL_IMPLEMENTATIONS = {"avx512-vnni": _impl_vnni_panel}


def panel_intrinsic(isa: str, rows: int, nl: int, kg: int, kb: int, tiles: int, unroll: int) -> str:
    """The name of the registered GEMM panel intrinsic: `rows` x `tiles` output tiles over all `kb` K steps."""
    name = f"bitrl_{isa}_panel_tiles{nl}x{kg}_rows{rows}_out{tiles}_steps{kb}_unroll{unroll}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, _desc_amx(rows, nl, kg, kb, tiles),
                              PANEL_IMPLEMENTATIONS[isa](rows, nl, kg, kb, tiles, unroll))
    return name


IMPLEMENTATIONS = {"avx2": _impl_avx2, "avx512-vnni": _impl_vnni, "neon-dotprod": _impl_sdot, "neon": _impl_neon,
                   "amx": _impl_vnni}  # the amx kernel's register blocks and single rows are avx512-vnni


# ------------------------------------------------------------------------------------------------ AMX
#
# One AMX tile product (tdpbssd, s8 x s8 -> s32) is C[m, n] += sum over k4 < 16, kk < 4 of
# A[m, 4 k4 + kk] B[k4, 4 n + kk]: 16 x 16 x 64 multiply-accumulates. With A = 16 activation rows of 64
# inputs (x_q as it is) and B row k4 = plane q = k4 % 4 of weight step k4 // 4 (the decoded codes of a
# tiles16x4 tile are exactly a B row: 16 outputs x 4 inputs), one intrinsic is a block of 16 rows x
# `tiles` (<= 4) output tiles over the whole of K: each output tile's accumulators stay in their own
# tile register (independent tdpbssd chains), the 16 rows' activations are loaded once per 64 inputs
# for all of them, and each output tile decodes its B tile (16 x 64 bytes) into its own buffer, loaded
# into the B tile registers in turn (8 tile registers: `tiles` C, one A, the rest B).
# Codes are 0..2, so A x B is dot(w + 1, a), as in the other kernels. The tile configuration is loaded
# in every call (it is per thread) and the tiles are released at the end. The process must have asked
# Linux for the AMX state first (runtime.tvm_runtime.enable_amx, Linux >= 5.16), or tdpbssd faults.

AMX_STEPS = 4  # kb steps of 16 inputs per tile product (64 inputs: the tile width in bytes)


def _desc_amx(rows: int, nl: int, kg: int, kb: int, tiles: int):
    @T.prim_func(s_tir=True)
    def desc_one(a: T.handle, w: T.handle, c: T.handle):  # one output tile: the kernel does not split jo
        A = T.match_buffer(a, (rows, kb, 4, kg), "int8", offset_factor=1)
        W = T.match_buffer(w, (1, kb, nl, kg), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, 1, nl), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:nl], W[0, 0:kb, 0:nl, 0:kg], A[0:rows, 0:kb, 0:4, 0:kg])
            T.writes(C[0:rows, 0, 0:nl])
            for b, i, r, q, j in T.grid(rows, nl, kb, 4, kg):
                with T.sblock("update"):
                    vb, vi, vr, vq, vj = T.axis.remap("SSRRR", [b, i, r, q, j])
                    C[vb, 0, vi] = C[vb, 0, vi] + _code(W, 0, vr, vi, vj, vq) * T.Cast("int32", A[vb, vr, vq, vj])

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, w: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, kb, 4, kg), "int8", offset_factor=1)
        W = T.match_buffer(w, (tiles, kb, nl, kg), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, tiles, nl), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:tiles, 0:nl], W[0:tiles, 0:kb, 0:nl, 0:kg], A[0:rows, 0:kb, 0:4, 0:kg])
            T.writes(C[0:rows, 0:tiles, 0:nl])
            for b, o, i, r, q, j in T.grid(rows, tiles, nl, kb, 4, kg):
                with T.sblock("update"):
                    vb, vo, vi, vr, vq, vj = T.axis.remap("SSSRRR", [b, o, i, r, q, j])
                    C[vb, vo, vi] = C[vb, vo, vi] + _code(W, vo, vr, vi, vj, vq) * T.Cast("int32", A[vb, vr, vq, vj])

    return desc if tiles > 1 else desc_one


def _amx(name: str, *args):
    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _impl_amx(rows: int, nl: int, kg: int, kb: int, tiles: int):
    nb = min(tiles, 7 - tiles)  # B tile registers (after the C tiles and the A tile), used in turn
    assert (rows, nl, kg) == (16, 16, 4) and nb >= 1
    full, tail = divmod(kb, AMX_STEPS)
    a_tile = tiles

    def decode(W, o, step, r):  # B row r of output tile o: plane r % 4 of weight step `step` (64 bytes)
        shift = T.broadcast(T.Cast("uint8", (r % 4) * 2), 64)
        return T.reinterpret("int8x64", (W.vload([o, step, 0, 0], "uint8x64") >> shift) & T.broadcast(T.uint8(3), 64))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle):
        sa = T.int64()
        sc = T.int64()
        A = T.match_buffer(a, (rows, kb, 4, kg), "int8", strides=[sa, 16, 4, 1], offset_factor=1)
        W = T.match_buffer(w, (tiles, kb, nl, kg), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, tiles, nl), "int32", strides=[sc, nl, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:tiles, 0:nl], W[0:tiles, 0:kb, 0:nl, 0:kg], A[0:rows, 0:kb, 0:4, 0:kg])
            T.writes(C[0:rows, 0:tiles, 0:nl])
            cfg = T.alloc_buffer((64,), "uint8")
            tile = T.alloc_buffer((tiles, 16, 64), "int8")
            cfg[T.ramp(0, 1, 64)] = T.broadcast(T.uint8(0), 64)
            cfg[0] = T.uint8(1)  # palette 1; tiles 0.. (C), `tiles` (A), then B: all 16 rows of 64 bytes
            for t in T.unroll(tiles + 1 + nb):
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(16)
            T.evaluate(_amx("ldtilecfg", cfg.access_ptr("r")))
            for o in T.unroll(tiles):
                T.evaluate(_amx("tileloadd64", T.Cast("int8", o), C.access_ptr("r", offset=o * nl), sc * 4))
            for ch in range(full):
                T.evaluate(_amx("tileloadd64", T.int8(a_tile), A.access_ptr("r", offset=ch * 64), sa))
                for o in T.unroll(tiles):
                    for r in T.unroll(16):
                        tile[o, r, T.ramp(0, 1, 64)] = decode(W, o, ch * AMX_STEPS + r // 4, r)
                    T.evaluate(_amx("tileloadd64", T.Cast("int8", a_tile + 1 + o % nb),
                                    tile.access_ptr("r", offset=o * 1024), T.int64(64)))
                    T.evaluate(_amx("tdpbssd", T.Cast("int8", o), T.int8(a_tile), T.Cast("int8", a_tile + 1 + o % nb)))
            if tail > 0:  # the last steps: B rows past K are zero (and so are the padded activations)
                T.evaluate(_amx("tileloadd64", T.int8(a_tile), A.access_ptr("r", offset=full * 64), sa))
                for o in T.unroll(tiles):
                    for r in T.unroll(16):
                        if r < tail * 4:
                            tile[o, r, T.ramp(0, 1, 64)] = decode(W, o, full * AMX_STEPS + r // 4, r)
                        else:
                            tile[o, r, T.ramp(0, 1, 64)] = T.broadcast(T.int8(0), 64)
                    T.evaluate(_amx("tileloadd64", T.Cast("int8", a_tile + 1 + o % nb),
                                    tile.access_ptr("r", offset=o * 1024), T.int64(64)))
                    T.evaluate(_amx("tdpbssd", T.Cast("int8", o), T.int8(a_tile), T.Cast("int8", a_tile + 1 + o % nb)))
            for o in T.unroll(tiles):
                T.evaluate(_amx("tilestored64", T.Cast("int8", o), C.access_ptr("w", offset=o * nl), sc * 4))
            T.evaluate(_amx("tilerelease"))

    return impl


def amx_intrinsic(rows: int, nl: int, kg: int, kb: int, tiles: int) -> str:
    """The name of the registered AMX intrinsic: `rows` x `tiles` output tiles of `nl`, over `kb` steps."""
    name = f"bitrl_amx_tiles{nl}x{kg}_rows{rows}_out{tiles}_steps{kb}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, _desc_amx(rows, nl, kg, kb, tiles), _impl_amx(rows, nl, kg, kb, tiles))
    return name


# ------------------------------------------------------------------------------------ lookup tables
#
# The lut kernels (layout lut{NL}, runtime/weights.py) read, per row b and input pair g, a table of the
# pair's 16 partial sums v[e] = (e % 3 - 1) a[2g] + (e // 3 - 1) a[2g+1] (e < 9; 0 above), split into its
# low bytes LO (uint8) and high bytes HI (int8): v = 256 HI + LO. One intrinsic is KU steps of 4 inputs
# for NL outputs and `rows` rows:
#
#     C[b, i] += sum over u < KU, h < 2 of  v_b[2u + h][(W[u, i] >> 4h) & 15]
#
# Implementation: the NL index bytes of a step are one load, & 15 and >> 4 give the two pairs' indices;
# per pair two table lookups (LO and HI: `tbl` on NEON, `vpshufb` on x86, whose 16-byte tables are
# repeated in every 128-bit lane) and a byte interleave (zip1/zip2, vpunpck[lh]bw) rebuild the int16
# partial sums, which are summed in int16 lanes over the KU steps and then widened into C. |v| <= 256,
# so the 2 KU <= 64 int16 terms sum to at most 16384 in magnitude: no overflow (LUT_STEPS bounds KU).
# The description spells the lookup as a sum over all 16 entries of [index == e] v[e]: tensorize
# cannot match a data-dependent buffer index.

LUT_STEPS = 4  # steps of 4 inputs per intrinsic call (KU): the int16 partial sums widen once per call


def lut_steps(kb: int) -> int:
    """KU for a kernel with `kb` steps of 4 inputs (even: runtime/weights.py pads it): the largest power
    of two <= LUT_STEPS dividing kb."""
    ku = LUT_STEPS
    while kb % ku:
        ku //= 2
    return ku


def _desc_lut(nl: int, ku: int, rows: int):
    def term(C, W, HI, LO, vb, vi, vu, vh, ve):
        idx = T.Cast("int32", (W[0, vu, vi, 0] >> T.Cast("uint8", vh * 4)) & T.uint8(15))
        entry = T.Cast("int32", HI[vb, vu * 2 + vh, ve]) * 256 + T.Cast("int32", LO[vb, vu * 2 + vh, ve])
        return C[vb, 0, vi] + T.if_then_else(idx == ve, entry, 0)

    if rows == 1:  # the tail rows: the batch row is an outer loop, not an iterator of the intrinsic
        @T.prim_func(s_tir=True)
        def desc(lo: T.handle, hi: T.handle, w: T.handle, c: T.handle):
            LO = T.match_buffer(lo, (1, 2 * ku, 16), "uint8", offset_factor=1)
            HI = T.match_buffer(hi, (1, 2 * ku, 16), "int8", offset_factor=1)
            W = T.match_buffer(w, (1, ku, nl, 1), "uint8", offset_factor=1)
            C = T.match_buffer(c, (1, 1, nl), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0, 0, 0:nl], W[0, 0:ku, 0:nl, 0], HI[0, 0:2 * ku, 0:16], LO[0, 0:2 * ku, 0:16])
                T.writes(C[0, 0, 0:nl])
                for i, u, h, e in T.grid(nl, ku, 2, 16):
                    with T.sblock("update"):
                        vi, vu, vh, ve = T.axis.remap("SRRR", [i, u, h, e])
                        C[0, 0, vi] = term(C, W, HI, LO, 0, vi, vu, vh, ve)

        return desc

    @T.prim_func(s_tir=True)
    def desc_rows(lo: T.handle, hi: T.handle, w: T.handle, c: T.handle):
        LO = T.match_buffer(lo, (rows, 2 * ku, 16), "uint8", offset_factor=1)
        HI = T.match_buffer(hi, (rows, 2 * ku, 16), "int8", offset_factor=1)
        W = T.match_buffer(w, (1, ku, nl, 1), "uint8", offset_factor=1)
        C = T.match_buffer(c, (rows, 1, nl), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:nl], W[0, 0:ku, 0:nl, 0], HI[0:rows, 0:2 * ku, 0:16], LO[0:rows, 0:2 * ku, 0:16])
            T.writes(C[0:rows, 0, 0:nl])
            for b, i, u, h, e in T.grid(rows, nl, ku, 2, 16):
                with T.sblock("update"):
                    vb, vi, vu, vh, ve = T.axis.remap("SSRRR", [b, i, u, h, e])
                    C[vb, 0, vi] = term(C, W, HI, LO, vb, vi, vu, vh, ve)

    return desc_rows


def _tbl_neon(table, idx, nl: int):
    return T.call_llvm_pure_intrin("int8x16", "llvm.aarch64.neon.tbl1.v16i8", table, idx)


def _tbl_x86(table, idx, nl: int):  # the 16-byte table repeated in each 128-bit lane (vbroadcasti128)
    name = {32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}[nl]
    return T.call_llvm_pure_intrin(f"int8x{nl}", name, T.Shuffle([table] * (nl // 16), list(range(nl))), idx)


def _impl_lut(lookup):
    def build(nl: int, ku: int, rows: int):
        lanes = nl // 16  # 128-bit lanes: byte interleaves stay inside them
        # int16 lane 8 L + k of half h holds output 16 L + 8 h + k; put the outputs back in order
        outputs = [h * nl // 2 + 8 * lane + k for lane in range(lanes) for h in range(2) for k in range(8)]

        def sums(LO, HI, W, b):
            """Per half (bytes 0-7 or 8-15 of every 128-bit lane), the int16 sums over the KU steps."""
            total = [None, None]
            for u in range(ku):
                codes = W.vload([0, u, 0, 0], f"uint8x{nl}")
                for h in range(2):
                    idx = T.reinterpret(f"int8x{nl}", codes & T.broadcast(T.uint8(15), nl) if h == 0 else
                                        codes >> T.broadcast(T.uint8(4), nl))
                    lo = lookup(T.reinterpret("int8x16", LO.vload([b, 2 * u + h, 0], "uint8x16")), idx, nl)
                    hi = lookup(HI.vload([b, 2 * u + h, 0], "int8x16"), idx, nl)
                    for half in range(2):
                        pick = [j for lane in range(lanes) for k in range(8)
                                for j in (16 * lane + 8 * half + k, nl + 16 * lane + 8 * half + k)]
                        v = T.reinterpret(f"int16x{nl // 2}", T.Shuffle([lo, hi], pick))  # zip / vpunpck
                        total[half] = v if total[half] is None else total[half] + v
            return total

        @T.prim_func(s_tir=True)
        def impl(lo: T.handle, hi: T.handle, w: T.handle, c: T.handle):
            LO = T.match_buffer(lo, (rows, 2 * ku, 16), "uint8", offset_factor=1)
            HI = T.match_buffer(hi, (rows, 2 * ku, 16), "int8", offset_factor=1)
            W = T.match_buffer(w, (1, ku, nl, 1), "uint8", offset_factor=1)
            C = T.match_buffer(c, (rows, 1, nl), "int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:rows, 0, 0:nl], W[0, 0:ku, 0:nl, 0], HI[0:rows, 0:2 * ku, 0:16],
                        LO[0:rows, 0:2 * ku, 0:16])
                T.writes(C[0:rows, 0, 0:nl])
                for b in T.unroll(rows):
                    C[b, 0, T.ramp(0, 1, nl)] = C[b, 0, T.ramp(0, 1, nl)] + T.Cast(
                        f"int32x{nl}", T.Shuffle(sums(LO, HI, W, b), outputs))

        return impl

    return build


LUT_IMPLEMENTATIONS = {"neon-lut": _impl_lut(_tbl_neon), "avx2-lut": _impl_lut(_tbl_x86),
                       "avx512-lut": _impl_lut(_tbl_x86)}


def lut_intrinsic(isa: str, nl: int, ku: int, rows: int) -> str:
    """The name of the registered lookup-table intrinsic for one ISA, tile width, KU and row count."""
    name = f"bitrl_{isa}_lut{nl}_steps{ku}_rows{rows}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, _desc_lut(nl, ku, rows), LUT_IMPLEMENTATIONS[isa](nl, ku, rows))
    return name


def intrinsic(isa: str, nl: int, kg: int, rows: int) -> str:
    """The name of the registered tensor intrinsic for one ISA, tile shape and row count."""
    name = f"bitrl_{isa}_tiles{nl}x{kg}_rows{rows}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, _desc(nl, kg, rows), IMPLEMENTATIONS[isa](nl, kg, rows))
    return name


def register_all() -> None:
    """Register the intrinsic of every kernel spec (GEMV and GEMM rows): MetaSchedule replays stored
    traces, whose tensorize steps name them, when it opens a database."""
    from . import KERNELS

    for spec in KERNELS:
        for rows in {1, spec.rows}:
            if spec.isa in IMPLEMENTATIONS:
                intrinsic(spec.isa, spec.tile_n, spec.tile_k, rows)
            elif spec.isa in LUT_IMPLEMENTATIONS:
                ku = LUT_STEPS
                while ku:
                    lut_intrinsic(spec.isa, spec.tile_n, ku, rows)
                    ku //= 2
