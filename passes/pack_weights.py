"""pack_weights: store ternary weights in the 2-bit layout the kernels compute on.

Pipeline position: after `fuse_bitlinear`, before `legalize_bitlinear`. Rewrites
bitlinear(x, W_t:int8 [N, K], ..., "int8") into bitlinear(x, P:uint8 [N, ceil(K/4)], ..., "2bit")
with P = layouts.pack_2bit(W_t): 4x less weight memory than int8, 16x less than float32. Int8 layers (layout
"q8", mixed precision) stay as they are: their kernel reads int8 [N, K].
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import rewrite_call

from bitrl_compile import layouts

from . import bitlinear_op


def _pack(call, _m):
    op = bitlinear_op.parse(call)
    w_t = bitlinear_op.constant_value(op.w)
    if op.layout != "int8" or w_t is None:
        return call
    packed = relax.const(layouts.pack_2bit(w_t))
    return bitlinear_op.make(op.x, packed, op.gamma, op.bias, op.activation, "2bit", op.k, call.ty)


@tvm.transform.module_pass(opt_level=0, name="bitrl.PackWeights")
def pack_weights(mod, _ctx):
    mod = mod.clone()  # passes are functional: never mutate the caller's module
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(bitlinear_op.pattern(), _pack, func)
    return mod
