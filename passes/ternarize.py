"""ternarize: every matmul by a constant float weight becomes a ternary BitLinear op.

Pipeline position: first, on the float32 Relax module from a frontend, with parameters bound as
constants. Matches `matmul(x, permute_dims(W))` (torch.nn.Linear via torch.export) and
`matmul(x, C)` with a constant [K, N] C (ONNX MatMul), quantizes W with
`quant.ternarize_weight` (absmean, per tensor or per output channel) and emits
`bitrl.bitlinear(x, W_t:int8, gamma, zeros(N), "none", "int8", K)`; x may be [..., K] (a sequence of
tokens: each row is quantized on its own). Bias and activation are
folded in afterwards by `fuse_bitlinear`. Matmuls with non-constant operands stay float.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from bitrl_compile import quant

from . import bitlinear_op


def _ternary_call(x, w: np.ndarray, per_channel: bool, out_type):
    w_t, gamma = quant.ternarize_weight(w, per_channel=per_channel)
    zeros = np.zeros(w.shape[0], np.float32)
    return bitlinear_op.make(x, relax.const(w_t), relax.const(gamma), relax.const(zeros),
                             "none", "int8", w.shape[1], out_type)


def ternarize(per_channel: bool = False):
    """The pass (a tvm.transform.ModulePass); per_channel selects one scale per output channel."""
    x = wildcard()
    w = is_const()
    transposed = is_op("relax.permute_dims")(w)
    linear = is_op("relax.matmul")(x, transposed)
    plain_w = is_const()
    plain = is_op("relax.matmul")(x, plain_w)

    def rewrite(call, m):
        if m.get(transposed) is not None and transposed in m and linear in m and m[linear].same_as(call):
            weight = m[w].value.numpy()
            axes = m[transposed].attrs.axes
            if weight.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
                return call
        else:
            weight = m[plain_w].value.numpy()
            if weight.ndim != 2:
                return call
            weight = weight.T
        if not np.issubdtype(weight.dtype, np.floating) or m[x].ty.ndim < 2:
            return call
        return _ternary_call(m[x], weight, per_channel, call.ty)

    @tvm.transform.module_pass(opt_level=0, name="bitrl.Ternarize")
    def _pass(mod, _ctx):
        mod = mod.clone()  # passes are functional: never mutate the caller's module
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                func = rewrite_call(linear, rewrite, func)
                func = rewrite_call(plain, rewrite, func)
                mod[gv] = func
        return mod

    return _pass
