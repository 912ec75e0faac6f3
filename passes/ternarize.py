"""ternarize: every matmul by a constant float weight becomes a ternary BitLinear op.

Pipeline position: first, on the float32 Relax module from a frontend, with parameters bound as
constants. Matches `matmul(x, permute_dims(W))` (torch.nn.Linear via torch.export) and
`matmul(x, C)` with a constant [K, N] C (ONNX MatMul), quantizes W with
`quant.ternarize_weight` (absmean, per tensor or per output channel) and emits
`bitrl.bitlinear(x, W_t:int8, gamma, zeros(N), "none", "int8", K)`; x may be [..., K] (a sequence of
tokens: each row is quantized on its own). Bias and activation are
folded in afterwards by `fuse_bitlinear`. Matmuls with non-constant operands stay float.

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

from . import bitlinear_op


def _ternary_call(x, w: np.ndarray, per_channel: bool, out_type):
    w_t, gamma = quant.ternarize_weight(w, per_channel=per_channel)
    zeros = np.zeros(w.shape[0], np.float32)
    return bitlinear_op.make(x, relax.const(w_t), relax.const(gamma), relax.const(zeros),
                             "none", "int8", w.shape[1], out_type)


def _int8_call(op, w: np.ndarray, out_type):
    w_q, scale = quant.quantize_weight_int8(w)
    return bitlinear_op.make(op.x, relax.const(w_q), relax.const(scale), op.bias, op.activation, bitlinear_op.Q8,
                             op.k, out_type)


def layer_weights(func: relax.Function, emitted: list) -> list[np.ndarray]:
    """The float weight of each BitLinear call of `func` in binding order, by its trit constant in `emitted`
    ([(constant, float weight)] as the rewrite made them)."""
    out = []
    for block in func.body.blocks:
        for binding in block.bindings:
            op = bitlinear_op.parse(binding.value)
            if op is not None:
                out.extend(w for const, w in emitted if const.same_as(op.w))
    return out


def resolve_layers(indices, count: int) -> set[int]:
    """0-based layer indices (negative: from the end) as a set of indices in [0, count), or a ValueError."""
    chosen = set()
    for i in indices:
        if not -count <= int(i) < count:
            raise ValueError(f"int8 layer {i} does not exist: the policy has {count} linear layer(s), 0 to "
                             f"{count - 1}; pass indices in that range, 'first', 'last' or 'auto' to --int8-layers")
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

    emitted: list = []

    @tvm.transform.module_pass(opt_level=0, name="bitrl.Ternarize")
    def _pass(mod, _ctx):
        mod = mod.clone()  # passes are functional: never mutate the caller's module
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                func = rewrite_call(linear, rewrite, func)
                func = rewrite_call(plain, rewrite, func)
                mod[gv] = func
        if int8_layers and "main" in [gv.name_hint for gv in mod.functions]:
            weights = layer_weights(mod["main"], emitted)
            chosen = [weights[i] for i in sorted(resolve_layers(int8_layers, len(weights)))]

            def to_int8(call, _m):
                op = bitlinear_op.parse(call)
                found = [w for const, w in emitted if const.same_as(op.w)]
                return _int8_call(op, found[0], call.ty) if found and any(found[0] is w for w in chosen) else call

            mod["main"] = rewrite_call(bitlinear_op.pattern(), to_int8, mod["main"])
        emitted.clear()
        return mod

    return _pass
