"""ternarize: every matmul by a constant float weight becomes a ternary BitLinear op.

Pipeline position: first, on the float32 Relax module from a frontend, with parameters bound as
constants. Matches `matmul(x, permute_dims(W))` (torch.nn.Linear via torch.export) and
`matmul(x, C)` with a constant [K, N] C (ONNX MatMul), quantizes W with
`quant.ternarize_weight` (absmean, per tensor or per output channel) and emits
`bitrl.bitlinear(x, W_t:int8, gamma, zeros(N), "none", "int8", K)`; x may be [..., K] (a sequence of
tokens: each row is quantized on its own). Bias and activation are
folded in afterwards by `fuse_bitlinear`. Matmuls with non-constant operands stay float.

Convolutions: `relax.nn.conv2d(x, W)` with a constant float [O, C, KH, KW] weight (NCHW / OIHW, dilation 1,
groups 1) becomes `bitrl.bitconv2d(x, W_t:int8, gamma, zeros(O), "none", "int8", geometry)` (passes/bitconv_op.py),
gamma the absmean of the [O, C*KH*KW] flattening, per tensor or per output channel as for linears; other
convolutions are a ValueError naming the convolution (pipeline refuses them earlier, by module name).

Mixed precision: `int8_layers` (0-based indices into main's BitLinear layers in binding order, the manifest's
"layers" order; negative indices count from the end, -1 is the last) are quantized to int8 instead
(`quant.quantize_weight_int8`, per output channel) and emitted with layout "q8". An index the network does not
have is a ValueError naming the layers it has.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from bitrl_compile import quant

from . import bitconv_op, bitlinear_op


def _ternary_call(x, w: np.ndarray, per_channel: bool, out_type):
    w_t, gamma = quant.ternarize_weight(w, per_channel=per_channel)
    zeros = np.zeros(w.shape[0], np.float32)
    return bitlinear_op.make(x, relax.const(w_t), relax.const(gamma), relax.const(zeros),
                             "none", "int8", w.shape[1], out_type)


def _int8_call(op, w: np.ndarray, out_type):
    w_q, scale = quant.quantize_weight_int8(w)
    return bitlinear_op.make(op.x, relax.const(w_q), relax.const(scale), op.bias, op.activation, bitlinear_op.Q8,
                             op.k, out_type)


def _conv_call(call, x, w: np.ndarray, per_channel: bool):
    """bitrl.bitconv2d for a relax.nn.conv2d by the constant float weight `w`, or a ValueError naming it."""
    a = call.attrs
    where = f"conv2d {tuple(int(d) for d in w.shape)} with stride {[int(v) for v in a.strides]}"
    if [int(v) for v in a.dilation] != [1, 1] or int(a.groups) != 1:
        raise ValueError(f"{where}: dilation {[int(v) for v in a.dilation]} and groups {int(a.groups)} are not "
                         "supported (dilation 1 and groups 1 only); replace the layer in the policy")
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        raise ValueError(f"{where}: layouts {a.data_layout}/{a.kernel_layout} are not supported (NCHW/OIHW only)")
    pad = [int(v) for v in a.padding]
    pad = pad * 2 if len(pad) == 2 else pad
    geometry = bitconv_op.Geometry(int(w.shape[1]), (int(w.shape[2]), int(w.shape[3])),
                                   tuple(int(v) for v in a.strides), tuple(pad))
    w_t, gamma = quant.ternarize_weight(w.reshape(w.shape[0], -1), per_channel=per_channel)
    zeros = np.zeros(w.shape[0], np.float32)
    return bitconv_op.make(x, relax.const(w_t.reshape(w.shape)), relax.const(gamma), relax.const(zeros), "none",
                           "int8", geometry, call.ty)


def _int8_conv_call(op, w: np.ndarray, out_type):
    w_q, scale = quant.quantize_weight_int8(w)
    return bitconv_op.rebuild(op, out_type, w=relax.const(w_q.reshape([int(d) for d in op.w.ty.shape])), gamma=relax.const(scale),
                              layout=bitconv_op.Q8)


def layer_weights(func: relax.Function, emitted: list) -> list[np.ndarray]:
    """The float weight of each BitLinear or BitConv2d call of `func` in binding order ([O, C*KH*KW] for a
    convolution), by its trit constant in `emitted` ([(constant, float weight)] as the rewrite made them)."""
    out = []
    for block in func.body.blocks:
        for binding in block.bindings:
            op = bitlinear_op.parse(binding.value) or bitconv_op.parse(binding.value)
            if op is not None:
                out.extend(w for const, w in emitted if const.same_as(op.w))
    return out


def resolve_layers(indices, count: int) -> set[int]:
    """0-based layer indices (negative: from the end) as a set of indices in [0, count), or a ValueError."""
    chosen = set()
    for i in indices:
        if not -count <= int(i) < count:
            raise ValueError(f"int8 layer {i} does not exist: the policy has {count} linear layer(s) (convolutions "
                             f"counted), 0 to {count - 1}; pass indices in that range, 'first', 'last' or 'auto' "
                             "to --int8-layers")
        chosen.add(int(i) % count)
    return chosen


def ternarize(per_channel: bool = False, int8_layers=()):
    """The pass (a tvm.transform.ModulePass); per_channel selects one scale per output channel; `int8_layers`
    the layers of main kept in int8 (the module's docstring)."""
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
        new = _ternary_call(m[x], weight, per_channel, call.ty)
        emitted.append((new.args[2], weight if int8_layers else None))  # kept only for int8 layers: at 2B
        # parameters a float copy of every weight until the pass ends would be 8 GB (bench/bitnet_scale.py)
        return new

    conv_x, conv_w = wildcard(), is_const()
    conv = is_op("relax.nn.conv2d")(conv_x, conv_w)

    def rewrite_conv(call, m):
        weight = m[conv_w].value.numpy()
        if weight.ndim != 4 or not np.issubdtype(weight.dtype, np.floating) or m[conv_x].ty.ndim != 4:
            return call
        flat = weight.reshape(weight.shape[0], -1)
        new = _conv_call(call, m[conv_x], weight, per_channel)
        emitted.append((new.args[2], flat if int8_layers else None))
        return new

    emitted: list = []

    @tvm.transform.module_pass(opt_level=0, name="bitrl.Ternarize")
    def _pass(mod, _ctx):
        mod = mod.clone()  # passes are functional: never mutate the caller's module
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                func = rewrite_call(linear, rewrite, func)
                func = rewrite_call(plain, rewrite, func)
                func = rewrite_call(conv, rewrite_conv, func)
                mod[gv] = func
        if int8_layers and "main" in [gv.name_hint for gv in mod.functions]:
            weights = layer_weights(mod["main"], emitted)
            chosen = [weights[i] for i in sorted(resolve_layers(int8_layers, len(weights)))]

            def to_int8(call, _m):
                op = bitlinear_op.parse(call) or bitconv_op.parse(call)
                found = [w for const, w in emitted if const.same_as(op.w)]
                if not (found and any(found[0] is w for w in chosen)):
                    return call
                if isinstance(op, bitconv_op.BitConvCall):
                    return _int8_conv_call(op, found[0], call.ty)
                return _int8_call(op, found[0], call.ty)

            mod["main"] = rewrite_call(bitlinear_op.pattern(), to_int8, mod["main"])
            mod["main"] = rewrite_call(bitconv_op.pattern(), to_int8, mod["main"])
        emitted.clear()
        return mod

    return _pass
