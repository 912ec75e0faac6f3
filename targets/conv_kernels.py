"""TensorIR BitConv2d kernels: the math of `quant.bitconv2d_reference` as a direct convolution on int8.

One PrimFunc per (geometry, input size, output channels, activation, scale kind, input fold), symbolic in the
batch:

    x[B, C*H*W] f32 (the NCHW input, flat: legalize_bitlinear reshapes it; or NHWC, `input_layout` "nhwc"),
    w[G, O16, 4] i8 (trits, or int8 in [-127, 127] for an int8 layer; the reduction in groups of 4 inputs,
    `ConvLayout`), gamma[G] f32, bias[O] f32 -> y[B, O, OH, OW] f32

    x'                 = x, or x / c or x * c (`prescale`: a folded graph op, quant.conv_input), in float32
    amax[b]            = max_i |x'[b, i]| = pre(max_i |x[b, i]|)  per sample (|x| / c is monotone: the maximum of
                                                                  the raw input, scaled once)
    scale[b]           = 127 / max(amax[b], eps)
    x_q[b, c, hp, wp]  = int8(clip(round(x' * scale), -128, 127)) inside, 0 in the padding
    acc[b, oh, ow, o]  = sum_{c,i,j} x_q[b, c, oh*SH+i, ow*SW+j] * w[c, i, j, o]   int32 (int16 products: exact,
                                                                                  |x_q * w| <= 128 * 127)
    y[b, o, oh, ow]    = act(fma(f32(acc), gamma[o] / scale[b], bias[o]))   (`epilogue.activate`)

Two implementations of that math:
- AVX-512 VNNI (`VNNI_ISAS`, O % 16 == 0): the hand-written vpdpbusd kernel of targets/conv_vnni.py.
- every other ISA (aarch64 included): LLVM vectorises this TensorIR. The weights are first laid out as
  [C, KH, KW, O] (K x O bytes, once per call); per output row, blocks of OW_BLOCK output positions x O_BLOCK
  channels are accumulated in registers over the whole reduction, the channels innermost (one weight vector
  load serves the block's positions; a broadcast x_q value times it); rows (and samples) are split across
  threads when a layer is large enough (epilogue.PARALLEL_MIN_WORK, as the BitLinear kernels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm import tirx as T

from bitrl_compile.quant import EPS, FUSABLE_ACTIVATIONS, QMAX

from . import KernelSpec, conv_neon, conv_vnni, kernel_spec
from .conv_vnni import prescaled
from .epilogue import PARALLEL_MIN_WORK, activate
from .kernels import quantize_value, row_scales, schedule_row_scales

LAYOUT = "g4o4"   # the kernel's weights: int8 [G, O16, 4] (groups of 4 reduction inputs; `kernel_weights`), as stored
OW_BLOCK = 4      # output positions per register block (the LLVM-vectorised path)
O_BLOCK = 16      # output channels per register block (int32 lanes)
VNNI_ISAS = ("avx512-vnni", "amx")  # specs whose convolutions are the hand-written vpdpbusd kernel (conv_vnni.py)


@dataclass(frozen=True)
class ConvLayout:
    """The reduction C x KH x KW in groups of 4 inputs (one vpdpbusd lane: 4 bytes), for weights and activations.

    "kw" (KW % 4 == 0: NatureCNN's 8x8 and 4x4): a group is 4 adjacent kernel columns of one channel and row, so
         the activations stay NCHW (a group's 4 inputs are adjacent in an image row); groups ordered (c, i, jg)
    "c"  (otherwise: 3x3; and every NHWC input, whose pixels are then quantized in their own order): a group is 4
         adjacent channels (C padded to a multiple of 4) at one tap, the activations HWC; groups ordered (i, j, cg)
    Weights: int8 [G, O16, 4] (O padded to a multiple of 16, padding zero): w[g, o, l] is input l of group g.
    """

    mode: str
    c: int
    kh: int
    kw: int
    o: int

    @staticmethod
    def of(c: int, kh: int, kw: int, o: int, input_layout: str = "nchw") -> ConvLayout:
        return ConvLayout("kw" if kw % 4 == 0 and input_layout == "nchw" else "c", c, kh, kw, o)

    @property
    def c4(self) -> int:
        return -(-self.c // 4)

    @property
    def groups(self) -> int:
        return self.c * self.kh * (self.kw // 4) if self.mode == "kw" else self.kh * self.kw * self.c4

    @property
    def o16(self) -> int:
        return -(-self.o // 16) * 16

    def index(self, c, i, j):
        """(group, lane) of reduction input (c, i, j)."""
        if self.mode == "kw":
            return (c * self.kh + i) * (self.kw // 4) + j // 4, j % 4
        return (i * self.kw + j) * self.c4 + c // 4, c % 4


def conv_kernel_name(geometry, hw: tuple[int, int], o: int, activation: str, per_channel: bool,
                     fold_suffix: str = "") -> str:
    """The kernel's symbol; `fold_suffix` is passes.bitconv_op.InputFold.suffix() (e.g. "_nhwc_div255")."""
    kh, kw = geometry.kernel
    pads = "_".join(str(p) for p in geometry.padding)
    return (f"bitrl_bitconv_c{geometry.channels}_{hw[0]}x{hw[1]}_o{o}_k{kh}x{kw}_s{geometry.stride[0]}x"
            f"{geometry.stride[1]}_p{pads}_{activation}{'_pc' if per_channel else ''}{fold_suffix}")


def kernel_weights(w, input_layout: str = "nchw"):
    """Integer weights [O, C, KH, KW] (numpy) in the kernel's layout [G, O16, 4] (ConvLayout)."""
    o, c, kh, kw = w.shape
    layout = ConvLayout.of(c, kh, kw, o, input_layout)
    out = np.zeros((layout.groups, layout.o16, 4), np.int8)
    ci, ii, jj = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), indexing="ij")
    g, lane = layout.index(ci, ii, jj)
    out[g, :o, lane] = np.moveaxis(w, 0, -1)
    return out


def _sample_scales(x, batch, size: int, spec: KernelSpec, prescale):
    """kernels.row_scales for one whole sample, the amax of the raw input scaled once: |x| / c is monotone."""
    lanes = spec.vector if size % spec.vector == 0 and size > spec.vector else 1
    r = te.reduce_axis((0, size // lanes), name="r")
    amax_lanes = te.compute((batch, lanes), lambda b, v: te.max(te.abs(x[b, r * lanes + v]), axis=r),
                            name="amax_lanes")
    rv = te.reduce_axis((0, lanes), name="rv")
    amax = te.compute((batch,), lambda b: te.max(amax_lanes[b, rv], axis=rv), name="amax")
    magnitude = None if prescale is None else (prescale[0], abs(float(prescale[1])))
    return te.compute((batch,), lambda b: T.const(float(QMAX), "float32") /
                      T.max(prescaled(amax[b], magnitude), T.const(float(EPS), "float32")), name="scale")


def conv_primfunc(geometry, hw: tuple[int, int], o: int, activation: str = "none", per_channel: bool = False,
                  spec: KernelSpec | None = None, batch: int | None = None, *, input_layout: str = "nchw",
                  prescale: tuple[str, float] | None = None):
    """The unscheduled BitConv2d PrimFunc (`geometry`: passes.bitconv_op.Geometry, `hw` the input's H, W; the
    input NCHW or NHWC, `prescale` applied in the quantization step)."""
    if activation not in FUSABLE_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not fusable; expected one of {FUSABLE_ACTIVATIONS}")
    spec = spec or kernel_spec(None)
    c, (h, w_), (kh, kw), (sh, sw) = geometry.channels, hw, geometry.kernel, geometry.stride
    pt, pl, pb, pr = geometry.padding
    oh, ow = geometry.output_hw(h, w_)
    size = c * h * w_
    batch = T.Var("batch", "int64") if batch is None else T.const(batch, "int64")
    x = te.placeholder((batch, size), "float32", name="x")
    layout = ConvLayout.of(c, kh, kw, o, input_layout)
    w = te.placeholder((layout.groups, layout.o16, 4), "int8", name="w")
    gamma = te.placeholder((o if per_channel else 1,), "float32", name="gamma")
    bias = te.placeholder((o,), "float32", name="bias")

    # one scale per sample: the whole C x H x W input is its row
    scale = _sample_scales(x, batch, size, spec, prescale) if prescale is not None else \
        row_scales(x, batch, size, spec)

    def quantize(b, ci, hp, wp):
        hi, wi = hp - pt, wp - pl
        inside = T.all(hi >= 0, hi < h, wi >= 0, wi < w_)
        # the clamps keep the padding's (discarded) reads in bounds
        hc, wc = T.max(T.min(hi, h - 1), 0), T.max(T.min(wi, w_ - 1), 0)
        value = x[b, (hc * w_ + wc) * c + ci] if input_layout == "nhwc" else x[b, ci * (h * w_) + hc * w_ + wc]
        return T.if_then_else(inside, quantize_value(prescaled(value, prescale), scale[b]), T.const(0, "int8"))

    x_q = te.compute((batch, c, h + pt + pb, w_ + pl + pr), quantize, name="x_q")
    # the weights as [C, KH, KW, O] once per call (K x O bytes): the register blocks then load 16 channels at once
    w_c = te.compute((c, kh, kw, o), lambda ci, i, j, n: w[layout.index(ci, i, j)[0], n, layout.index(ci, i, j)[1]],
                     name="w_c")
    rc, ri, rj = te.reduce_axis((0, c), "rc"), te.reduce_axis((0, kh), "ri"), te.reduce_axis((0, kw), "rj")
    acc = te.compute(
        (batch, oh, ow, o),
        lambda b, y, z, n: te.sum(T.Cast("int32", T.Cast("int16", x_q[b, rc, y * sh + ri, z * sw + rj])
                                           * T.Cast("int16", w_c[rc, ri, rj, n])), axis=[rc, ri, rj]),
        name="acc")

    def epilogue(b, n, y, z):
        g = gamma[n] if per_channel else gamma[0]
        return activate(T.op.fma(T.Cast("float32", acc[b, y, z, n]), g / scale[b], bias[n]), activation)

    out = te.compute((batch, o, oh, ow), epilogue, name="y")
    func = te.create_prim_func([x, w, gamma, bias, out])
    return func.with_attrs({"bitrl.activation": activation, "bitrl.isa": f"conv-{spec.isa}",
                            "bitrl.weight_layout": LAYOUT, "bitrl.n": o, "bitrl.k": geometry.k,
                            "bitrl.work": geometry.k * o * oh * ow})


def apply_schedule(sch, spec: KernelSpec) -> None:
    """The hand-written schedule of a conv_primfunc (in `sch`, a tvm.s_tir.Schedule)."""
    func = sch.mod["main"]
    schedule_row_scales(sch)

    acc = sch.get_sblock("acc")
    b, y, z, n, rc, ri, rj = sch.get_loops(acc)
    o, ow = int(sch.get(n).extent), int(sch.get(z).extent)
    z_o, z_i = sch.split(z, [None, min(OW_BLOCK, ow)])
    n_o, n_i = sch.split(n, [None, O_BLOCK]) if o % O_BLOCK == 0 else (None, n)
    outer = [b, y, z_o] + ([n_o] if n_o is not None else [])
    sch.reorder(*outer, rc, ri, rj, z_i, n_i)
    local = sch.cache_write(acc, 0, "local")  # the block's accumulators: registers
    sch.reverse_compute_at(local, outer[-1])
    if int(func.attrs["bitrl.work"]) >= PARALLEL_MIN_WORK:
        sch.parallel(sch.fuse(b, y))
    sch.unroll(z_i)
    sch.vectorize(n_i)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(acc, rc))[-1])
    sch.vectorize(sch.get_loops(local)[-1])


def takes_pixels(o: int, spec: KernelSpec | None = None) -> bool:
    """Whether the kernel for `spec` with `o` output channels can read its input as uint8 pixels (`conv_kernel`'s
    input_dtype "uint8"): the hand-written vpdpbusd kernel can."""
    return (spec or kernel_spec(None)).isa in VNNI_ISAS and o % 16 == 0


def conv_kernel(geometry, hw: tuple[int, int], o: int, activation: str = "none", per_channel: bool = False,
                spec: KernelSpec | None = None, *, input_layout: str = "nchw",
                prescale: tuple[str, float] | None = None, input_dtype: str = "float32"):
    """The scheduled BitConv2d kernel for a target's kernel spec, with its manifest schedule record. The input is
    NCHW, or NHWC (`input_layout`), and scaled first by `prescale` (("div" | "mul", c) or None: a folded graph
    op, passes.bitconv_op.InputFold): every implementation reads the input in that layout and applies the scale in
    its quantization step (or declines the layer, for the LLVM-vectorised kernel below, which does both); its weights
    are in ConvLayout.of(C, KH, KW, O, input_layout). `input_dtype` "uint8" (an image's pixels, converted to float32
    exactly in the quantization step: the same values) only where `takes_pixels`."""
    spec = spec or kernel_spec(None)
    vnni = spec.isa in VNNI_ISAS and o % 16 == 0
    if input_dtype != "float32" and not takes_pixels(o, spec):
        raise ValueError(f"conv kernel for {spec.isa} with {o} output channels reads float32 input, not "
                         f"{input_dtype}; ask takes_pixels first")
    if vnni or (spec.isa in conv_neon.NEON_ISAS and conv_neon.supports(geometry, hw, o)):
        make, reason = (conv_vnni.vnni_conv, "hand-written vpdpbusd kernel, targets/conv_vnni.py") if vnni else \
            (conv_neon.neon_conv, "hand-written smull/smlal kernel, targets/conv_neon.py")
        func, knobs = make(geometry, hw, o, activation, per_channel,
                           ConvLayout.of(geometry.channels, *geometry.kernel, o, input_layout),
                           input_layout=input_layout, prescale=prescale,
                           **({"input_dtype": input_dtype} if vnni else {}))
        func = func.with_attrs({"bitrl.activation": activation, "bitrl.isa": f"conv-{spec.isa}",
                                "bitrl.weight_layout": LAYOUT, "bitrl.n": o, "bitrl.k": geometry.k,
                                "bitrl.work": geometry.k * o * int(np.prod(geometry.output_hw(*hw)))})
        schedule = {"schedule": "default", "knobs": knobs, "reason": f"convolution ({reason})"}
    else:
        sch = tvm.s_tir.Schedule(conv_primfunc(geometry, hw, o, activation, per_channel, spec,
                                               input_layout=input_layout, prescale=prescale))
        apply_schedule(sch, spec)
        func = sch.mod["main"]
        schedule = {"schedule": "default", "knobs": {"ow_block": OW_BLOCK, "o_block": O_BLOCK},
                    "reason": "convolution (one hand-written schedule)"}
    return func.with_attr("bitrl.schedule", json.dumps(schedule, sort_keys=True))
