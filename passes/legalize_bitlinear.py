"""legalize_bitlinear: every BitLinear op becomes a call_tir to a TensorIR kernel for the target.

Pipeline position: last of ours, after `pack_weights` and before TVM's own build pipeline
(LegalizeOps etc. lower the remaining float ops). Expects 2-bit packed constant weights, and repacks
them into the compute layout of the target's kernel (`targets.kernel_spec`: 2-bit tiles, see
runtime/weights.py). One kernel per distinct (K, N, activation, scale kind), shared by layers of the
same shape; the kernel gets the schedule knobs that `schedules` (a `targets.tuning.TunedSchedules`:
a tuning database) has for it, else the hand-written default schedule of its ISA. Each kernel
records its schedule in the attribute "bitrl.schedule" (JSON; `kernel_schedules` reads them).
`weight_params` then tells the artifact writer which parameters are weights in which layout.

Int8 layers (layout "q8", mixed precision) become call_tir to the int8 kernel of targets/int8_kernels.py (one
per (K, N, activation), default schedule, ISA "int8-<the target's>"); their weights stay int8 [N, K] and are
stored as they are (not in `weight_params`).

Every kernel this pass adds is marked opaque to TVM's operator fusion ("op_pattern" OPAQUE, which
AnnotateTIROpPattern keeps): a hand-scheduled kernel is its own call in the entry points' plans (passes/entry_points.py,
`gamma_params`, `kernel_schedules` read it by name). Left to AnnotateTIROpPattern, a kernel without a tensor intrinsic
(the int8 kernel; the generic ternary one) is "out-elementwise fusable", FuseOps groups it with the elementwise op
that reads it (an LSTM's `x @ W_ih + h @ W_hh`), and FuseTIR fails on the scheduled kernel ("Inconsistent buffers
y and ... mapped to the same relax var").

Convolutions (passes/bitconv_op.py, any layout) become call_tir to targets/conv_kernels.py (one kernel per geometry,
input size, output channels, activation and scale kind; ISA "conv-<the target's>"), on the input flattened to
[B, C*H*W] (NCHW, or NHWC for an op with a folded transpose: `bitconv_op.InputFold`); their weights are int8 in
the kernel's layout (trits, or int8 for "q8"), stored as they are. A conv kernel records in "bitrl.conv" how to
make it again (passes/entry_points.py folds an "image" observation's /255 into a variant of the first one).
"""

from __future__ import annotations

import json
import warnings

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from bitrl_compile import layouts
from bitrl_compile.runtime import weights
from bitrl_compile.targets import conv_kernels, int8_kernels, kernel_spec, kernels

from . import bitconv_op, bitlinear_op

OPAQUE = 8  # relax.OpPatternKind.kOpaque: FuseOps never groups the kernel with another op


def _opaque(func):
    return func.with_attr("op_pattern", OPAQUE)


@mutator
class _Legalizer(PyExprMutator):
    def __init__(self, mod, target, schedules, spec):
        super().__init__(mod)
        self.target = target
        self.schedules = schedules
        self.spec = spec or kernel_spec(target)
        if target is not None and self.spec.isa == "generic":
            warnings.warn(f"no tensorized BitLinear kernel for target {target}; using the generic TIR kernel "
                          "(correct, but slower)", stacklevel=2)
        self.kernels: dict[str, relax.GlobalVar] = {}

    def _add(self, name: str, func) -> None:
        self.kernels[name] = self.builder_.add_func(_opaque(func), name)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        op = bitlinear_op.parse(call)
        if op is None:
            conv = bitconv_op.parse(call)
            return call if conv is None else self._conv(conv, call)
        if op.layout == bitlinear_op.Q8:
            return self._int8(op, call)
        if op.layout != "2bit":
            raise ValueError(f"legalize_bitlinear expects 2-bit packed weights, got layout {op.layout!r}; "
                             "run pack_weights first")
        packed = bitlinear_op.constant_value(op.w)
        if packed is None:
            raise ValueError("legalize_bitlinear needs constant weights (to repack them for the kernel)")
        n = int(op.w.ty.shape[0])
        per_channel = int(op.gamma.ty.shape[0]) > 1
        name = kernels.kernel_name(op.k, n, op.activation, per_channel)
        if name not in self.kernels:
            schedule = {"schedule": "default", "knobs": kernels.DEFAULT_KNOBS.as_dict()}
            knobs = kernels.DEFAULT_KNOBS
            if self.schedules is not None:
                from bitrl_compile.targets.tuning import KernelKey

                found = self.schedules.lookup(KernelKey(op.k, n, op.activation, per_channel), self.spec)
                knobs, schedule = found.knobs, found.manifest()
            func = kernels.bitlinear_kernel(op.k, n, op.activation, per_channel, spec=self.spec, knobs=knobs)
            func = func.with_attrs({"global_symbol": name, "bitrl.schedule": json.dumps(schedule, sort_keys=True)})
            self._add(name, func)
        w = relax.const(weights.pack_tiles(layouts.unpack_2bit(packed, op.k), self.spec.layout))
        return self._call(self.kernels[name], op, w, n, call)

    def _int8(self, op, call):
        n = int(op.w.ty.shape[0])
        if bitlinear_op.constant_value(op.w) is None:
            raise ValueError("legalize_bitlinear needs constant int8 weights")
        name = int8_kernels.int8_kernel_name(op.k, n, op.activation)
        if name not in self.kernels:
            func = int8_kernels.int8_kernel(op.k, n, op.activation, self.spec).with_attr("global_symbol", name)
            self._add(name, func)
        return self._call(self.kernels[name], op, op.w, n, call)

    def _conv(self, op, call):
        w = bitconv_op.constant_value(op.w)
        if w is None:
            raise ValueError("legalize_bitlinear needs constant convolution weights")
        n = int(op.w.ty.shape[0])
        batch = op.x.ty.shape[0]
        hw = bitconv_op.input_hw(op)
        per_channel = int(op.gamma.ty.shape[0]) > 1
        fold = op.fold
        name = conv_kernels.conv_kernel_name(op.geometry, hw, n, op.activation, per_channel, fold.suffix())
        if name not in self.kernels:
            func = conv_kernels.conv_kernel(op.geometry, hw, n, op.activation, per_channel, self.spec,
                                            input_layout=fold.layout, prescale=fold.prescale)
            # what entry_points needs to make this kernel again with the observation's /255 folded in
            remake = {"geometry": op.geometry.text(), "hw": list(hw), "o": n, "activation": op.activation,
                      "per_channel": per_channel, "isa": self.spec.isa, "input": fold.text()}
            func = func.with_attrs({"global_symbol": name, "bitrl.conv": json.dumps(remake, sort_keys=True)})
            self._add(name, func)
        w = bitconv_op.weight_matrix(w, op.layout, op.geometry)
        w = relax.const(conv_kernels.kernel_weights(w, fold.layout))
        flat = self.builder_.emit(relax.op.reshape(op.x, (batch, op.geometry.channels * hw[0] * hw[1])))
        return relax.call_tir(self.kernels[name], [flat, w, op.gamma, op.bias], call.ty)

    def _call(self, kernel, op, w, n, call):
        """call_tir of a kernel on [rows, K]: [..., K] inputs (token sequences) are flattened and reshaped back."""
        if op.x.ty.ndim == 2:
            return relax.call_tir(kernel, [op.x, w, op.gamma, op.bias], call.ty)
        # [..., K] inputs (token sequences): the kernel sees [rows, K]; every row is quantized on its own.
        lead = list(op.x.ty.shape)[:-1]
        rows = lead[0]
        for d in lead[1:]:
            rows = rows * d
        flat = self.builder_.emit(relax.op.reshape(op.x, (rows, op.k)))
        out = self.builder_.emit(relax.call_tir(kernel, [flat, w, op.gamma, op.bias],
                                                relax.TensorType((rows, n), "float32")))
        return relax.op.reshape(out, call.ty.shape)


def conv_with_prescale(func, prescale: tuple[str, float], pixels: bool = False):
    """(name, PrimFunc) of the conv kernel `func` (made by this pass: its "bitrl.conv" record) with `prescale` folded
    into its input, or None when `func` is no such kernel, already scales its input, or the target's hand-written
    kernel would decline the scale (conv_neon.supports: the slower LLVM-vectorised one would then run the layer).
    `pixels`: the input is an image's uint8 pixels, which the kernel then reads as they are where it can
    (conv_kernels.takes_pixels; its x is uint8, its name ends "_u8"), else float32."""
    attrs = func.attrs if func.attrs is not None else {}
    if "bitrl.conv" not in attrs:
        return None
    record = json.loads(str(attrs["bitrl.conv"]))
    fold = bitconv_op.InputFold.parse(record["input"])
    if fold.prescale is not None:
        return None
    fold = bitconv_op.InputFold(fold.layout, prescale)
    geometry, hw = bitconv_op.Geometry.parse(record["geometry"]), tuple(record["hw"])
    args = (geometry, hw, record["o"], record["activation"], record["per_channel"])
    spec = kernel_spec(isa=record["isa"])
    dtype = "uint8" if pixels and conv_kernels.takes_pixels(record["o"], spec) else "float32"
    name = conv_kernels.conv_kernel_name(*args, fold.suffix() + ("_u8" if dtype == "uint8" else ""))
    new = conv_kernels.conv_kernel(*args, spec, input_layout=fold.layout, prescale=prescale, input_dtype=dtype)
    if json.loads(str(new.attrs["bitrl.schedule"]))["reason"] != json.loads(str(attrs["bitrl.schedule"]))["reason"]:
        return None
    return name, _opaque(new.with_attrs({"global_symbol": name,
                                         "bitrl.conv": json.dumps({**record, "input": fold.text(), "dtype": dtype},
                                                                  sort_keys=True)}))


def legalize_bitlinear(target=None, schedules=None, spec=None):
    """The pass; `target` (a tvm.target.Target or None) selects the kernels' ISA (`spec`, a
    targets.KernelSpec, when the caller has already resolved it), `schedules` (a
    `targets.tuning.TunedSchedules` or None) their tuned knobs."""

    @tvm.transform.module_pass(opt_level=0, name="bitrl.LegalizeBitLinear")
    def _pass(mod, _ctx):
        legalizer = _Legalizer(mod.clone(), target, schedules, spec)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                legalizer.builder_.update_func(gv, legalizer.visit_expr(func))
        return legalizer.builder_.get()

    return _pass


def kernel_schedules(mod) -> list[dict]:
    """The manifest's "kernels": per BitLinear kernel its name, ISA, weight layout and schedule."""
    out = []
    for gv, func in sorted(mod.functions.items(), key=lambda kv: kv[0].name_hint):
        attrs = func.attrs if func.attrs is not None else {}
        if "bitrl.schedule" in attrs:
            out.append({"kernel": gv.name_hint, "isa": str(attrs["bitrl.isa"]), "in": int(attrs["bitrl.k"]),
                        "out": int(attrs["bitrl.n"]), "layout": str(attrs["bitrl.weight_layout"]),
                        **json.loads(str(attrs["bitrl.schedule"]))})
    return out


def weight_params(mod, func_name: str = "main") -> dict[str, dict]:
    """{parameter name: its layout} for every kernel weight that `lift_params` made a parameter.

    The layout is the manifest's: {"storage": "base3", "compute": "tiles8x4", "shape": [N, K]}; the
    artifact stores base-3 and the runtime unpacks it into the compute layout at load.
    """
    func = mod[func_name]
    found: dict[str, dict] = {}

    def visit(expr):
        if not (isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
            return
        kernel = mod[expr.args[0]]
        attrs = kernel.attrs if kernel.attrs is not None else {}
        if "bitrl.weight_layout" not in attrs or not isinstance(expr.args[1].fields[1], relax.Var):
            return
        if str(attrs["bitrl.weight_layout"]) in (int8_kernels.LAYOUT, conv_kernels.LAYOUT):  # stored as they are
            return
        w = expr.args[1].fields[1]
        for param in func.params:
            if param.same_as(w):
                found[param.name] = {"storage": "base3", "compute": str(attrs["bitrl.weight_layout"]),
                                          "shape": [int(attrs["bitrl.n"]), int(attrs["bitrl.k"])]}

    relax.analysis.post_order_visit(func.body, visit)
    return found


def gamma_params(mod, func_name: str = "main") -> list[tuple[int, int, str | None]]:
    """(in, out, the name of its gamma parameter or None) of every BitLinear kernel call of `mod[func_name]`, in
    the order they run (the order `reference.bitlinear_shapes` lists the quantized module's BitLinear ops in):
    what the compile's layer-by-layer check silences (gamma 0) to run one layer of a deep network alone.
    Empty when the function also calls convolution kernels (not silenced)."""
    func = mod[func_name]
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found: list[tuple[int, int, str | None]] = []

    def visit(expr):
        if not (isinstance(expr, relax.Call) and expr.op.same_as(call_tir)):
            return
        kernel = mod[expr.args[0]]
        attrs = kernel.attrs if kernel.attrs is not None else {}
        if "bitrl.conv" in attrs:
            found.append((0, 0, None))
        elif "bitrl.k" in attrs:
            gamma = expr.args[1].fields[2]
            name = next((p.name for p in func.params if p.same_as(gamma)), None)
            found.append((int(attrs["bitrl.k"]), int(attrs["bitrl.n"]), name))

    relax.analysis.post_order_visit(func.body, visit)
    return [] if any(k == 0 for k, _, _ in found) else found
