"""The BitLinear op in Relax, between the passes: a pure packed call the passes rewrite in place.

    y = R.call_pure_packed("bitrl.bitlinear", x, w, gamma, bias, R.str(activation), R.str(layout),
                           R.prim_value(K), ty_args=R.Tensor((B, N), "float32"))

    layout "int8":  w is int8 [N, K] trits      (after `ternarize`)
    layout "2bit":  w is uint8 [N, ceil(K/4)]   (after `pack_weights`, see bitrl_compile.layouts)
    layout "q8":    w is int8 [N, K] in [-127, 127] and gamma float32 [N] its per-output-channel scales
                    (`quant.quantize_weight_int8`): a mixed-precision layer (`ternarize(int8_layers=...)`),
                    left as it is by `pack_weights`, lowered to targets/int8_kernels.py and stored as int8

The meaning is one for every layout, `quant.bitlinear_reference`: int8 absmax activations per row, the
weights as integers, int32 accumulation, then act(fma(acc, gamma / s, bias)).

`legalize_bitlinear` replaces every such call by `call_tir` to a TensorIR kernel. Until then a
module stays runnable on the host: importing this module registers `bitrl.bitlinear` as a global
function implemented by the numpy reference (bitrl_compile.quant), so every stage of the pipeline
can be executed and compared numerically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import ExternFuncPattern, is_op

from bitrl_compile import layouts, quant

OP_NAME = "bitrl.bitlinear"
TERNARY_LAYOUTS = ("int8", "2bit")
Q8 = "q8"  # int8 weights (mixed precision)


@dataclass
class BitLinearCall:
    x: relax.Expr
    w: relax.Expr
    gamma: relax.Expr
    bias: relax.Expr
    activation: str
    layout: str
    k: int


def make(x, w, gamma, bias, activation: str, layout: str, k: int, out_type) -> relax.Call:
    return relax.op.call_pure_packed(
        OP_NAME, x, w, gamma, bias, tvm.ir.StringImm(activation), tvm.ir.StringImm(layout),
        relax.prim_value(tvm.tirx.IntImm("int64", k)), ty_args=out_type)


def pattern():
    """A dpl pattern matching any bitrl.bitlinear call."""
    return is_op("relax.call_pure_packed")(ExternFuncPattern(OP_NAME), varg_default_wildcard=True)


def parse(call: relax.Expr) -> BitLinearCall | None:
    if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_pure_packed"))):
        return None
    func = call.args[0]
    if not (isinstance(func, relax.ExternFunc) and func.global_symbol == OP_NAME):
        return None
    x, w, gamma, bias, act, layout, k = call.args[1:]
    return BitLinearCall(x, w, gamma, bias, act.value, layout.value, int(getattr(k.value, 'value', k.value)))


def constant_value(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def reference(x, w, gamma, bias, activation: str, layout: str, k: int) -> np.ndarray:
    """The numpy meaning of one bitrl.bitlinear call (the bit-exact reference of the kernels)."""
    if layout == "2bit":
        w = layouts.unpack_2bit(w, k)
    elif layout not in ("int8", Q8):
        raise ValueError(f"unknown BitLinear weight layout {layout!r}")
    lead = x.shape[:-1]
    y = quant.bitlinear_reference(x.reshape(-1, k), w, gamma, bias)
    return quant.apply_activation(y, activation).reshape(*lead, w.shape[0])


@tvm_ffi.register_global_func(OP_NAME, override=True)
def _bitlinear_packed(x, w, gamma, bias, activation, layout, k):
    y = reference(np.from_dlpack(x), np.from_dlpack(w), np.from_dlpack(gamma), np.from_dlpack(bias),
                  str(activation), str(layout), int(k))
    return tvm.runtime.tensor(np.ascontiguousarray(y, dtype=np.float32))
