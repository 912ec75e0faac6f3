"""pack_weights: store ternary weights in the 2-bit layout the kernels compute on.

Pipeline position: after `fuse_bitlinear`, before `legalize_bitlinear`. Rewrites
bitlinear(x, W_t:int8 [N, K], ..., "int8") into bitlinear(x, P:uint8 [N, ceil(K/4)], ..., "2bit")
with P = layouts.pack_2bit(W_t): 4x less weight memory than int8, 16x less than float32. Int8 layers (layout
"q8", mixed precision) stay as they are: their kernel reads int8 [N, K]. Convolutions the same
(passes/bitconv_op.py): bitconv2d(x, W_t:int8 [O, C, KH, KW], ..., "int8") -> (x, P [O, ceil(C*KH*KW/4)], ..., "2bit").
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import rewrite_call

from bitrl_compile import layouts

from . import bitconv_op, bitlinear_op


def _pack(call, _m):
    op = bitlinear_op.parse(call)
    w_t = bitlinear_op.constant_value(op.w)
    if op.layout != "int8" or w_t is None:
        return call
    packed = relax.const(layouts.pack_2bit(w_t))
    return bitlinear_op.make(op.x, packed, op.gamma, op.bias, op.activation, "2bit", op.k, call.ty)


def _pack_conv(call, _m):
    op = bitconv_op.parse(call)
    w_t = bitlinear_op.constant_value(op.w)
    if op.layout != "int8" or w_t is None:
        return call
    return bitconv_op.rebuild(op, call.ty, w=relax.const(layouts.pack_2bit(w_t.reshape(w_t.shape[0], -1))),
                              layout="2bit")


@tvm.transform.module_pass(opt_level=0, name="bitrl.PackWeights")
def pack_weights(mod, _ctx):
    mod = mod.clone()  # passes are functional: never mutate the caller's module
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            func = rewrite_call(bitlinear_op.pattern(), _pack, func)
            mod[gv] = rewrite_call(bitconv_op.pattern(), _pack_conv, func)
    return mod
