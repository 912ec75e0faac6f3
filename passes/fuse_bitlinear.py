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
convolution's output is folded in the same way. On the input side, an NHWC -> NCHW permute_dims ([0, 3, 1, 2]:
SB3's channels-last frames, frontends/sb3_cnn.py) and a division or multiplication by a scalar constant (a module's
own x / 255) feeding a bitconv2d are folded into the op (`bitconv_op.InputFold`, in either order): the kernel
reads the input in its layout and scales it in its quantization step, the same float32 values, so the results do
not change and the two passes over memory (and the copy between them) are gone.
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
    uses = use_counts(func)
    return [b.value for block in func.body.blocks for b in block.bindings if uses.get(b.var, 0) > 1]


def use_counts(func: relax.Function) -> dict:
    """{variable: how many times `func`'s bindings and result use it}."""
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

    for block in func.body.blocks:
        for binding in block.bindings:
            count(binding.value)
    count(func.body.body)
    return uses


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


_NCHW = (0, 3, 1, 2)  # permute_dims axes that make an NHWC tensor NCHW


def _scalar(expr) -> float | None:
    """The value of a float32 constant whose elements are all one finite non-zero value, else None."""
    value = bitlinear_op.constant_value(expr)
    if value is None or value.dtype != np.float32 or value.size == 0 or value.ndim > 4:
        return None
    c = value.reshape(-1)[0]
    return float(c) if np.isfinite(c) and c != 0 and np.all(value == c) else None


def _input_step(expr, fold: bitconv_op.InputFold):
    """(the value under `expr`, the fold with it) when `expr` is a foldable permute_dims or scale, else None."""
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
        return None
    name = expr.op.name
    if name == "relax.permute_dims" and fold.layout == "nchw":
        axes = expr.attrs.axes
        if axes is not None and tuple(int(a) for a in axes) == _NCHW:
            return expr.args[0], bitconv_op.InputFold("nhwc", fold.prescale)
    if name in ("relax.divide", "relax.multiply") and fold.prescale is None:
        x, c = expr.args
        if name == "relax.multiply" and _scalar(x) is not None:
            x, c = c, x
        value = _scalar(c)
        if value is not None and x.ty.dtype == "float32" and x.ty.ndim == 4 and \
                [int(d) for d in c.ty.shape] in ([], [1], [1, 1, 1, 1]):
            return x, bitconv_op.InputFold(fold.layout, ("div" if name == "relax.divide" else "mul", value))
    return None


def _fold_input(func: relax.Function) -> relax.Function:
    """Fold the permute_dims and scale under each bitconv2d's input into it (while the values are used once)."""
    values = relax.analysis.get_var2val(func)
    shared = _shared_values(func)

    def fold(call, _m):
        op = bitconv_op.parse(call)
        x, fold, changed = op.x, op.fold, False
        while isinstance(x, relax.Var) and x in values and not _is_shared(values[x], shared):
            step = _input_step(values[x], fold)
            if step is None:
                break
            (x, fold), changed = step, True
        return bitconv_op.rebuild(op, call.ty, x=x, fold=fold) if changed else call

    return relax.analysis.remove_all_unused(rewrite_call(bitconv_op.pattern(), fold, func))


def _fuse_conv(func: relax.Function) -> relax.Function:
    """Fold the input's layout and scale, the bias add and then the activation of a bitconv2d into it."""
    func = _fold_input(func)
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
