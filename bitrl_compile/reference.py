"""The numpy reference executor: runs a Relax `main` (after ternarize / fuse / pack, before
legalize) op by op in numpy, with BitLinear computed by `quant.bitlinear_reference`.

It is the independent oracle every compiled artifact is checked against: it shares no code with
TVM's lowering or with our TensorIR kernels, only the quantization math. Ops it does not know
raise a clear error naming the op.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from bitrl_compile.passes import bitlinear_op


def _attr(call, name, default=None):
    attrs = call.attrs
    if attrs is None or not hasattr(attrs, name):
        return default
    return getattr(attrs, name)


def _ints(values):
    return None if values is None else [int(v) for v in values]


def _axis(call):
    axis = _attr(call, "axis")
    if axis is None:
        return None
    if isinstance(axis, (int, np.integer)) or hasattr(axis, "value"):
        return int(axis)
    return tuple(int(a) for a in axis)


def _concrete(dims, sizes: dict) -> list[int]:
    """Shape dimensions (ints or symbolic PrimExprs like `batch * 3`) evaluated for this run."""
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    for var, size in sizes.items():
        analyzer.bind(var, size)
    return [int(d) if isinstance(d, (int, np.integer)) else int(analyzer.simplify(d)) for d in dims]


def _softmax(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(call, x, gamma, beta):
    axes = tuple(_ints(_attr(call, "axes")))
    eps = float(_attr(call, "epsilon"))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(eps))
    return (y * gamma + beta).astype(np.float32)


_ELEMENTWISE = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
    "relax.power": np.power,
    "relax.nn.relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),
    "relax.tanh": np.tanh, "relax.exp": np.exp, "relax.log": np.log, "relax.sqrt": np.sqrt,
    "relax.negative": np.negative, "relax.abs": np.abs,
    "relax.sigmoid": lambda x: (1 / (1 + np.exp(-x))).astype(x.dtype),
    "relax.rsqrt": lambda x: (1 / np.sqrt(x)).astype(x.dtype),
    "relax.sin": np.sin, "relax.cos": np.cos,
}
_COMPARE = {
    "relax.greater": np.greater, "relax.greater_equal": np.greater_equal, "relax.less": np.less,
    "relax.less_equal": np.less_equal, "relax.equal": np.equal, "relax.not_equal": np.not_equal,
}


def _int_list(arg) -> list[int]:
    """A ShapeExpr, tuple of PrimValues or tuple of ints (strided_slice's axes/begin/end) as python ints."""
    values = arg.values if isinstance(arg, relax.ShapeExpr) else arg
    return [int(v.value) if hasattr(v, "value") else int(v) for v in values]


def _strided_slice(x, axes, begin, end, strides=None):
    index = [slice(None)] * x.ndim
    strides = _int_list(strides) if strides is not None else [1] * len(_int_list(axes))
    for axis, b, e, s in zip(_int_list(axes), _int_list(begin), _int_list(end), strides):
        index[axis] = slice(b, e, s)
    return x[tuple(index)]


def _eval_call(call, args, sizes):
    name = call.op.name
    if name == "relax.call_pure_packed":
        op = bitlinear_op.parse(call)
        if op is None:
            raise NotImplementedError(f"reference executor: packed function {call.args[0].global_symbol} "
                                      "is not supported")
        x, w, gamma, bias = args[1:5]
        return bitlinear_op.reference(x, w, gamma, bias, op.activation, op.layout, op.k)
    if name in _ELEMENTWISE:
        out = _ELEMENTWISE[name](*args)
        return np.asarray(out, dtype=np.result_type(*[np.asarray(a).dtype for a in args]))
    if name in _COMPARE:
        return _COMPARE[name](*args)
    x = args[0] if args else None
    if name == "relax.where":
        return np.where(*args).astype(np.result_type(args[1], args[2]))
    if name == "relax.strided_slice":
        return _strided_slice(*args)
    if name == "relax.take":
        return np.take(x, np.asarray(args[1]).astype(np.int64), axis=_axis(call))
    if name == "relax.full":
        return np.full(_int_list(x), args[1], dtype=str(_attr(call, "dtype")))
    if name == "relax.arange":
        return np.arange(*[int(a) for a in args], dtype=str(_attr(call, "dtype")))
    if name == "relax.matmul":
        return np.matmul(args[0], args[1]).astype(np.float32)
    if name == "relax.permute_dims":
        return np.transpose(x, _ints(_attr(call, "axes")))
    if name == "relax.reshape":
        return x.reshape(_concrete(call.ty.shape, sizes))
    if name == "relax.broadcast_to":
        return np.broadcast_to(x, _concrete(call.ty.shape, sizes)).copy()
    if name == "relax.astype":
        return x.astype(str(_attr(call, "dtype")))
    if name == "relax.clip":
        return np.clip(x, float(call.args[1].value), float(call.args[2].value)).astype(x.dtype)
    if name == "relax.nn.softmax":
        return _softmax(x, int(_attr(call, "axis")))
    if name == "relax.nn.log_softmax":
        s = x - x.max(axis=int(_attr(call, "axis")), keepdims=True)
        return s - np.log(np.exp(s).sum(axis=int(_attr(call, "axis")), keepdims=True))
    if name == "relax.argmax":
        return np.argmax(x, axis=_axis(call), keepdims=bool(_attr(call, "keepdims", False)))
    if name in ("relax.sum", "relax.mean", "relax.max", "relax.min"):
        f = {"relax.sum": np.sum, "relax.mean": np.mean, "relax.max": np.max, "relax.min": np.min}[name]
        return f(x, axis=_axis(call), keepdims=bool(_attr(call, "keepdims", False))).astype(x.dtype)
    if name == "relax.concat":
        return np.concatenate(list(x), axis=int(_attr(call, "axis")))
    if name == "relax.squeeze":
        axis = _attr(call, "axis")
        return np.squeeze(x, axis=None if axis is None else tuple(_ints(axis)))
    if name == "relax.expand_dims":
        return np.expand_dims(x, tuple(_ints(_attr(call, "axis"))))
    if name == "relax.flatten":
        return x.reshape(-1)
    if name == "relax.nn.layer_norm":
        return _layer_norm(call, *args)
    raise NotImplementedError(f"reference executor: op {name} is not supported")


def run(mod: tvm.IRModule, *inputs: np.ndarray, func_name: str = "main"):
    """Execute `mod[func_name]` on numpy inputs. Returns numpy arrays (tuples stay tuples)."""
    func = mod[func_name]
    env: dict = {}
    sizes: dict = {}  # symbolic dimension (tirx.Var) -> its size in this run, e.g. the batch
    for param, value in zip(func.params, inputs):
        env[param] = np.asarray(value)
        shape = getattr(param.ty, "shape", None)
        for dim, size in zip(shape or [], env[param].shape):
            if isinstance(dim, tvm.tirx.Var):
                sizes[dim] = tvm.tirx.IntImm("int64", size)
    n_inputs = len(inputs)
    if n_inputs != len(func.params):
        raise ValueError(f"{func_name} takes {len(func.params)} inputs, got {n_inputs}")

    def ev(expr):
        if isinstance(expr, relax.Var):
            return env[expr]
        if isinstance(expr, tvm.ir.Constant):  # tensors, and PrimValues (a python scalar)
            return expr.value.numpy() if hasattr(expr.value, "numpy") else expr.value
        if isinstance(expr, relax.Tuple):
            return tuple(ev(f) for f in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return ev(expr.tuple_value)[expr.index]
        if isinstance(expr, relax.Call):
            return _eval_call(expr, [ev(a) if not isinstance(a, (relax.ShapeExpr, relax.ExternFunc,
                                                                    tvm.ir.StringImm)) else a
                                     for a in expr.args], sizes)
        if isinstance(expr, (relax.ShapeExpr, tvm.ir.StringImm, relax.ExternFunc)):
            return expr
        if hasattr(expr, "value"):  # PrimValue
            return expr.value
        raise NotImplementedError(f"reference executor: expression {type(expr).__name__} is not supported")

    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                raise NotImplementedError("reference executor: match_cast bindings are not supported")
            env[binding.var] = ev(binding.value)
    return ev(body.body)
