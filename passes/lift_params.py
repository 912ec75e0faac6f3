"""lift_params: turn the tensor constants of `main` into parameters p0, p1, ... whose values ride along.

Pipeline position: last, right before `tvm.compile`. The packed weights then live in the artifact's
params.safetensors instead of inside the compiled library: `main` becomes main(obs, p0, p1, ...) with the
attribute num_input = 1, and its attribute "params" holds the values in parameter order, the Relax
convention that `tvm.relax.frontend.detach_params` takes off again (`params_of` does that and names them).
Scalars stay inline.
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


@tvm.transform.module_pass(opt_level=0, name="bitrl.LiftParams")
def lift_params(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
    """main's tensor constants -> parameters; their values in main's attribute "params"."""
    func = mod["main"]
    lifter = _ConstantLifter()
    body = lifter.visit_expr(func.body)
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs["num_input"] = len(func.params)
    attrs["params"] = [tvm.runtime.tensor(v) for v in lifter.values]
    new_func = relax.Function(list(func.params) + lifter.params, body, func.ret_ty, func.is_pure,
                              tvm.ir.make_node("ir.DictAttrs", **attrs))
    mod = mod.clone()
    mod["main"] = new_func
    return mod


def params_of(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """After lift_params: (the module without the values, {parameter name: value}): main's parameters in
    order, then those only other functions (the entry points) take."""
    mod, detached = relax.frontend.detach_params(mod)
    params: dict[str, np.ndarray] = {}
    for name in ["main", *sorted(n for n in detached if n != "main")]:
        func = mod[name]
        names = [v.name for v in func.params[int(func.attrs["num_input"]):]]
        for param, value in zip(names, detached.get(name, [])):
            params.setdefault(param, value.numpy())
    return mod, params
