"""The BitConv2d op in Relax, beside BitLinear (passes/bitlinear_op.py): a pure packed call the passes rewrite.

    y = R.call_pure_packed("bitrl.bitconv2d", x, w, gamma, bias, R.str(activation), R.str(layout),
                           R.str("C,KH,KW,SH,SW,PT,PL,PB,PR")[, R.str(input)], ty_args=R.Tensor((B, O, OH, OW), "float32"))

    x      float32 NCHW [B, C, H, W]; or NHWC [B, H, W, C] and/or scaled first, as `input` says (`InputFold`)
    input  (optional) "nhwc" and/or ",div,C" / ",mul,C": an NHWC -> NCHW transpose and a division or multiplication
           by a constant that `fuse_bitlinear` folded into the op (the kernel reads x in its layout and scales it in
           its quantization step: no pass over memory of their own); "nchw" (the default) when absent
    layout "int8":  w is int8 [O, C, KH, KW] trits                 (after `ternarize`)
    layout "2bit":  w is uint8 [O, ceil(C*KH*KW / 4)]              (after `pack_weights`: the trits of the
                    [O, C*KH*KW] flattening, bitrl_compile.layouts.pack_2bit)
    layout "q8":    w is int8 [O, C, KH, KW] in [-127, 127], gamma float32 [O] its per-output-channel scales
                    (an int8 layer, `ternarize(int8_layers=...)`), left as it is by `pack_weights`
    gamma  float32 [1] (per tensor, absmean of the whole weight, as BitLinear's) or [O] (per output channel,
           `--per-channel`); bias float32 [O]
    geometry: input channels, kernel size, stride, padding (top, left, bottom, right); dilation 1, groups 1

The meaning is one for every layout, `quant.bitconv2d_reference` (after `quant.conv_input`, the folded input's
transpose and scale, the same float32 values as the graph's own ops): activations quantized per sample (one int8
absmax scale s[b] over the whole C x H x W input, `quant.quantize_activations`' rounding), zero padding after
quantization, an int32 convolution, then act(fma(acc, gamma[o] / s[b], bias[o])) per output channel with the
fusable activations (`quant.FUSABLE_ACTIVATIONS`).

`legalize_bitlinear` replaces every such call by call_tir to targets/conv_kernels.py. Until then a module stays
runnable: importing this module registers `bitrl.bitconv2d` as a global function implemented by the numpy
reference, so every stage of the pipeline can be executed and compared numerically (`reference.run`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import ExternFuncPattern, is_op

from bitrl_compile import layouts, quant

from .bitlinear_op import Q8, BitLinearCall, constant_value  # noqa: F401 - the layouts and helpers are BitLinear's

OP_NAME = "bitrl.bitconv2d"


@dataclass(frozen=True)
class Geometry:
    channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right

    @property
    def k(self) -> int:
        """The reduction length: C * KH * KW."""
        return self.channels * self.kernel[0] * self.kernel[1]

    def text(self) -> str:
        return ",".join(str(v) for v in (self.channels, *self.kernel, *self.stride, *self.padding))

    @staticmethod
    def parse(text: str) -> Geometry:
        v = [int(t) for t in text.split(",")]
        return Geometry(v[0], (v[1], v[2]), (v[3], v[4]), (v[5], v[6], v[7], v[8]))

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        pt, pl, pb, pr = self.padding
        return (quant.conv_output_size(h, self.kernel[0], self.stride[0], pt, pb),
                quant.conv_output_size(w, self.kernel[1], self.stride[1], pl, pr))


@dataclass(frozen=True)
class InputFold:
    """How the op reads x (`quant.conv_input`): its layout ("nchw", or "nhwc": [B, H, W, C] read as its NCHW
    transpose) and a scale applied first (`prescale`: ("div" | "mul", c), or None)."""
    layout: str = "nchw"
    prescale: tuple[str, float] | None = None

    def text(self) -> str:
        return self.layout + ("" if self.prescale is None else f",{self.prescale[0]},{float(self.prescale[1])!r}")

    @staticmethod
    def parse(text: str) -> InputFold:
        parts = text.split(",")
        if parts[0] not in quant.CONV_LAYOUTS or len(parts) not in (1, 3) or (len(parts) == 3 and
                                                                             parts[1] not in quant.PRESCALES):
            raise ValueError(f"bad BitConv2d input {text!r}; expected nchw|nhwc[,div|mul,C]")
        return InputFold(parts[0], None if len(parts) == 1 else (parts[1], float(np.float32(parts[2]))))

    def suffix(self) -> str:
        """For a kernel name: "" (the default), "_nhwc", "_div255", "_mul3b808081" (a scale's float32 bits)."""
        out = "" if self.layout == "nchw" else f"_{self.layout}"
        if self.prescale is not None:
            op, c = self.prescale
            exact = float(c).is_integer() and 0 < c < 1 << 24
            out += f"_{op}{int(c)}" if exact else f"_{op}{int(np.float32(c).view(np.uint32)):08x}"
        return out


DEFAULT_INPUT = InputFold()


@dataclass
class BitConvCall(BitLinearCall):
    """A parsed bitconv2d: BitLinear's fields, k the reduction length C*KH*KW (the weight matrix's columns), the
    geometry and how it reads x (`InputFold`)."""
    geometry: Geometry | None = None
    fold: InputFold = DEFAULT_INPUT


def make(x, w, gamma, bias, activation: str, layout: str, geometry: Geometry, out_type,
         fold: InputFold = DEFAULT_INPUT) -> relax.Call:
    extra = [] if fold == DEFAULT_INPUT else [tvm.ir.StringImm(fold.text())]
    return relax.op.call_pure_packed(
        OP_NAME, x, w, gamma, bias, tvm.ir.StringImm(activation), tvm.ir.StringImm(layout),
        tvm.ir.StringImm(geometry.text()), *extra, ty_args=out_type)


def pattern():
    """A dpl pattern matching any bitrl.bitconv2d call."""
    return is_op("relax.call_pure_packed")(ExternFuncPattern(OP_NAME), varg_default_wildcard=True)


def parse(call: relax.Expr) -> BitConvCall | None:
    packed = isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_pure_packed"))
    if getattr(call.args[0] if packed else None, "global_symbol", None) != OP_NAME:
        return None
    geometry = Geometry.parse(call.args[7].value)
    fold = InputFold.parse(call.args[8].value) if len(call.args) > 8 else DEFAULT_INPUT
    return BitConvCall(*call.args[1:5], call.args[5].value, call.args[6].value, geometry.k, geometry, fold)


def rebuild(op: BitConvCall, out_type, **changes) -> relax.Call:
    """The call `op` with some fields changed (x, w, gamma, bias, activation, layout, fold)."""
    f = {"x": op.x, "w": op.w, "gamma": op.gamma, "bias": op.bias, "activation": op.activation,
         "layout": op.layout, "fold": op.fold, **changes}
    return make(f["x"], f["w"], f["gamma"], f["bias"], f["activation"], f["layout"], op.geometry, out_type,
                f["fold"])


def input_hw(op: BitConvCall) -> tuple[int, int]:
    """The (H, W) of the image the op convolves (x is NCHW or, folded, NHWC)."""
    shape = [int(d) for d in list(op.x.ty.shape)[1:]]
    return (shape[0], shape[1]) if op.fold.layout == "nhwc" else (shape[1], shape[2])


def weight_matrix(w: np.ndarray, layout: str, geometry: Geometry) -> np.ndarray:
    """The weights of any layout as integers [O, C, KH, KW] (trits, or int8 for "q8")."""
    if layout == "2bit":
        w = layouts.unpack_2bit(w, geometry.k)
    elif layout not in ("int8", Q8):
        raise ValueError(f"unknown BitConv2d weight layout {layout!r}")
    return w.reshape(w.shape[0], geometry.channels, *geometry.kernel)


def reference(x, w, gamma, bias, activation: str, layout: str, geometry: Geometry,
              fold: InputFold = DEFAULT_INPUT) -> np.ndarray:
    """The numpy meaning of one bitrl.bitconv2d call (the bit-exact reference of the kernels)."""
    y = quant.bitconv2d_reference(x, weight_matrix(w, layout, geometry), gamma, bias, geometry.stride,
                                  geometry.padding, layout=fold.layout, prescale=fold.prescale)
    return quant.apply_activation(y, activation)


CONV_BATCH_BYTES = 1 << 28  # the float intermediates of the largest batch of a convolutional policy


def batch_bound(mod, bound: int | None) -> int | None:
    """The batch bound of a float Relax module: with convolutions, the largest power of two whose float
    intermediates (every binding of main with a batch dimension, per sample) fit in CONV_BATCH_BYTES, at most
    `bound`; `bound` itself without convolutions. At 2**20 frames (the default bound) a plan's buffers or the
    VM's static ones would be hundreds of GB: the manifest's "batch" says what the artifact can really run."""
    bindings = [b for block in mod["main"].body.blocks for b in block.bindings]
    if not any(getattr(getattr(b.value, "op", None), "name", "") == "relax.nn.conv2d" for b in bindings):
        return bound
    per_sample = 0
    for binding in bindings:
        shape = list(getattr(binding.var.ty, "shape", None) or [])
        if shape and isinstance(shape[0], tvm.tirx.Var):
            per_sample += int(np.prod([int(d) for d in shape[1:]])) * 4
    fit = 1 << max(0, (CONV_BATCH_BYTES // max(per_sample, 1)).bit_length() - 1)
    return fit if bound is None else min(bound, fit)


def bound_batch(mod, bound: int | None):
    """`mod` with main's batch upper bound set to `batch_bound(mod, bound)` (the manifest's "batch" reads it)."""
    bound = batch_bound(mod, bound)
    main = mod["main"]
    batch = main.params[0].ty.shape[0]
    upper = dict((main.attrs or {}).get("tir_var_upper_bound", {})) if main.attrs is not None else {}
    if bound is None or not isinstance(batch, tvm.tirx.Var) or int(upper.get(batch.name, -1)) == bound:
        return mod
    mod = mod.clone()
    mod["main"] = main.with_attr("tir_var_upper_bound", {**{str(k): v for k, v in upper.items()}, batch.name: bound})
    return mod


@tvm_ffi.register_global_func(OP_NAME, override=True)
def _bitconv_packed(x, w, gamma, bias, activation, layout, geometry, fold=None):
    y = reference(np.from_dlpack(x), np.from_dlpack(w), np.from_dlpack(gamma), np.from_dlpack(bias),
                  str(activation), str(layout), Geometry.parse(str(geometry)),
                  DEFAULT_INPUT if fold is None else InputFold.parse(str(fold)))
    return tvm.runtime.tensor(np.ascontiguousarray(y, dtype=np.float32))
