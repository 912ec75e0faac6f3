"""lift_params: turn the tensor constants of `main` into parameters, returned as numpy arrays.

Pipeline position: after our passes, right before `tvm.compile`. The packed weights then live in
the artifact's params.safetensors instead of inside the compiled library, and `main` becomes
main(obs, p0, p1, ...) with the attribute num_input = 1. Scalars stay inline.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _ConstantLifter(PyExprMutator):
    def __init__(self):
        super().__init__()
        self.params: list[relax.Var] = []
        self.values: list[np.ndarray] = []

    def visit_generic_const_(self, const):
        if const.ty.ndim == 0:
            return const
        var = relax.Var(f"p{len(self.params)}", const.ty)
        self.params.append(var)
        self.values.append(const.value.numpy())
        return var


def lift_params(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Returns the new module and {param name: value} in parameter order."""
    func = mod[func_name]
    lifter = _ConstantLifter()
    body = lifter.visit_expr(func.body)
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs["num_input"] = len(func.params)
    new_func = relax.Function(list(func.params) + lifter.params, body, func.ret_ty, func.is_pure,
                              tvm.ir.make_node("ir.DictAttrs", **attrs))
    mod = mod.clone()
    mod[func_name] = new_func
    return mod, {v.name: value for v, value in zip(lifter.params, lifter.values)}
