"""legalize_bitlinear: every BitLinear op becomes a call_tir to a TensorIR kernel for the target.

Pipeline position: last of ours, after `pack_weights` and before TVM's own build pipeline
(LegalizeOps etc. lower the remaining float ops). Expects 2-bit packed constant weights. One
kernel per distinct (K, N, activation, scale kind), shared by layers of the same shape; the kernel
gets the target's default schedule (`targets.kernels.schedule_default`).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from bitrl_compile.targets import kernels

from . import bitlinear_op


@mutator
class _Legalizer(PyExprMutator):
    def __init__(self, mod, target):
        super().__init__(mod)
        self.target = target
        self.kernels: dict[str, relax.GlobalVar] = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        op = bitlinear_op.parse(call)
        if op is None:
            return call
        if op.layout != "2bit":
            raise ValueError(f"legalize_bitlinear expects 2-bit packed weights, got layout {op.layout!r}; "
                             "run pack_weights first")
        n = int(op.w.ty.shape[0])
        per_channel = int(op.gamma.ty.shape[0]) > 1
        name = kernels.kernel_name(op.k, n, op.activation, per_channel)
        if name not in self.kernels:
            func = kernels.bitlinear_primfunc(op.k, n, op.activation, per_channel)
            func = kernels.schedule_default(func, self.target).with_attr("global_symbol", name)
            self.kernels[name] = self.builder_.add_func(func, name)
        if op.x.ty.ndim == 2:
            return relax.call_tir(self.kernels[name], [op.x, op.w, op.gamma, op.bias], call.ty)
        # [..., K] inputs (token sequences): the kernel sees [rows, K]; every row is quantized on its own.
        lead = list(op.x.ty.shape)[:-1]
        rows = lead[0]
        for d in lead[1:]:
            rows = rows * d
        flat = self.builder_.emit(relax.op.reshape(op.x, (rows, op.k)))
        out = self.builder_.emit(relax.call_tir(self.kernels[name], [flat, op.w, op.gamma, op.bias],
                                                relax.TensorType((rows, n), "float32")))
        return relax.op.reshape(out, call.ty.shape)


def legalize_bitlinear(target=None):
    """The pass; `target` (a tvm.target.Target or None) selects the kernels' schedule."""

    @tvm.transform.module_pass(opt_level=0, name="bitrl.LegalizeBitLinear")
    def _pass(mod, _ctx):
        legalizer = _Legalizer(mod.clone(), target)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                legalizer.builder_.update_func(gv, legalizer.visit_expr(func))
        return legalizer.builder_.get()

    return _pass
