"""fuse_bitlinear: fold a constant bias add and an elementwise activation into the BitLinear op.

Pipeline position: after `ternarize`, before `pack_weights`. Rewrites
    relu|tanh|sigmoid( add( bitlinear(x, w, g, 0, "none"), b ) )  ->  bitlinear(x, w, g, b, act)
for a constant bias b of N elements (either operand order of the add), also when a reshape that keeps
the last dimension sits in between (torch.export flattens [batch, tokens, K] linears to 2-D and
reshapes back; elementwise ops commute with such a reshape). The result is one op per
layer that `legalize_bitlinear` turns into one kernel with the epilogue (rescale, bias,
activation) inside it. A value that has other users besides the add or activation (ELU, SiLU, GELU,
Mish read the linear's output twice) is left alone: folding would leave the unfused op for the other
users and compute the layer twice.

The same for convolutions (passes/bitconv_op.py): Relax gives a Conv2d's bias as the add of a [1, O, 1, 1]
constant (or of a reshape of an [O] constant to that shape), folded into bitconv2d's bias; an activation on the
convolution's output is folded in the same way.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from bitrl_compile.quant import FUSABLE_ACTIVATIONS

from . import bitconv_op, bitlinear_op

_RELAX_OPS = {"relu": "relax.nn.relu", "tanh": "relax.tanh", "sigmoid": "relax.sigmoid"}
_ACTIVATIONS = {_RELAX_OPS[a]: a for a in FUSABLE_ACTIVATIONS if a != "none"}  # Relax op name -> fused activation


def _shared_values(func: relax.Function) -> list[relax.Expr]:
    """The values bound to variables used more than once in `func` (as an argument or its result)."""
    uses: dict = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                count(arg)
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                count(field)
        elif isinstance(expr, relax.TupleGetItem):
            count(expr.tuple_value)

    bindings = [b for block in func.body.blocks for b in block.bindings]
    for binding in bindings:
        count(binding.value)
    count(func.body.body)
    return [b.value for b in bindings if uses.get(b.var, 0) > 1]


def _is_shared(expr, shared: list[relax.Expr]) -> bool:
    return expr is not None and any(expr.same_as(v) for v in shared)


def _through_reshape(call, m, bl, reshaped, fold, shared):
    """fold() applied under a reshape that keeps the last (output channel) dimension, unless the folded value
    has other users (then the unfused op would stay for them and the layer would run twice)."""
    if _is_shared(m.get(bl), shared) or _is_shared(m.get(reshaped), shared):
        return call
    if m.get(reshaped) is None:
        return fold(call, m)
    inner = m[bl]
    shape = m[reshaped].ty.shape
    if int(inner.ty.shape[-1]) != int(shape[-1]):
        return call
    fused = fold(call, m)
    if fused.same_as(call):
        return call
    rebuilt = bitlinear_op.parse(fused)
    new = bitlinear_op.make(rebuilt.x, rebuilt.w, rebuilt.gamma, rebuilt.bias, rebuilt.activation,
                            rebuilt.layout, rebuilt.k, inner.ty)
    return relax.op.reshape(new, shape)


def _fold_bias(call, m, bl, bias):
    op = bitlinear_op.parse(m[bl])
    b = m[bias].value.numpy()
    n = op.w.ty.shape[0]
    if op.activation != "none" or np.any(bitlinear_op.constant_value(op.bias)) or b.size != int(n):
        return call
    old = bitlinear_op.constant_value(op.bias)
    new_bias = (old + b.reshape(-1)).astype(np.float32)
    return bitlinear_op.make(op.x, op.w, op.gamma, relax.const(new_bias), "none", op.layout, op.k, call.ty)


def _fold_activation(call, m, bl):
    op = bitlinear_op.parse(m[bl])
    if op.activation != "none":
        return call
    act = _ACTIVATIONS[call.op.name]
    return bitlinear_op.make(op.x, op.w, op.gamma, op.bias, act, op.layout, op.k, call.ty)


def _conv_bias(expr, n: int) -> np.ndarray | None:
    """A per-output-channel constant added to an NCHW output with O = n channels: of shape [O, 1, 1] or
    [1, O, 1, 1] (right-aligned, only the channel dimension not 1), possibly a reshape of a constant; as [O]."""
    shape = [int(d) for d in expr.ty.shape]
    if len(shape) < 3 or len(shape) > 4 or shape[-3] != n or any(d != 1 for i, d in enumerate(shape)
                                                                   if i != len(shape) - 3):
        return None
    if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.reshape")):
        expr = expr.args[0]
    value = bitlinear_op.constant_value(expr)
    return None if value is None or value.dtype != np.float32 or value.size != n else value.reshape(-1)


def _fuse_conv(func: relax.Function) -> relax.Function:
    """Fold the bias add and then the activation that follow a bitconv2d into it."""
    conv = bitconv_op.pattern()
    bias = wildcard()
    add = is_op("relax.add")(conv, bias) | is_op("relax.add")(bias, conv)
    act = is_op("relax.nn.relu")(conv) | is_op("relax.tanh")(conv) | is_op("relax.sigmoid")(conv)
    shared: list[relax.Expr] = []

    def fold_bias(call, m):
        op = bitconv_op.parse(m[conv])
        b = _conv_bias(m[bias], int(op.w.ty.shape[0]))
        if _is_shared(m[conv], shared) or op.activation != "none" or b is None:
            return call
        new_bias = (bitlinear_op.constant_value(op.bias) + b).astype(np.float32)
        return bitconv_op.rebuild(op, call.ty, bias=relax.const(new_bias))

    def fold_activation(call, m):
        op = bitconv_op.parse(m[conv])
        if _is_shared(m[conv], shared) or op.activation != "none":
            return call
        return bitconv_op.rebuild(op, call.ty, activation=_ACTIVATIONS[call.op.name])

    shared[:] = _shared_values(func)
    func = rewrite_call(add, fold_bias, func)
    shared[:] = _shared_values(func)
    return rewrite_call(act, fold_activation, func)


@tvm.transform.module_pass(opt_level=0, name="bitrl.FuseBitLinear")
def fuse_bitlinear(mod, _ctx):
    mod = mod.clone()  # passes are functional: never mutate the caller's module
    bl = bitlinear_op.pattern()
    reshaped = is_op("relax.reshape")(bl, wildcard())
    value = bl | reshaped
    bias = is_const()
    add = is_op("relax.add")(value, bias) | is_op("relax.add")(bias, value)
    act = is_op("relax.nn.relu")(value) | is_op("relax.tanh")(value) | is_op("relax.sigmoid")(value)

    shared: list[relax.Expr] = []

    def fold_bias(call, m):
        return _through_reshape(call, m, bl, reshaped, lambda c, mm: _fold_bias(c, mm, bl, bias), shared)

    def fold_activation(call, m):
        return _through_reshape(call, m, bl, reshaped, lambda c, mm: _fold_activation(c, mm, bl), shared)

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            shared[:] = _shared_values(func)
            func = rewrite_call(add, fold_bias, func)
            shared[:] = _shared_values(func)
            func = rewrite_call(act, fold_activation, func)
            mod[gv] = _fuse_conv(func)
    return mod
