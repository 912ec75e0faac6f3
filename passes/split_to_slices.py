"""relax.split -> one strided_slice per part used: `split_to_slices`, the first pass of the compile.

A split has one output per part (a tuple): TVM lowers it to a single kernel with several outputs, which an entry
point's plan cannot call (runtime/plan.py: one output per kernel), and the numpy reference executor does not
evaluate tuples of tensors. torch.chunk / torch.split and TVM's own unrolled nn.LSTM (the four gates of every
step) produce them. Each `TupleGetItem(split(x), i)` becomes `strided_slice(x, [axis], [begin_i], [end_i])`, the
same values; the split, then unused, is removed with the other dead bindings. A split whose axis length is not a
constant is left as it is.
"""

from __future__ import annotations

import itertools

import tvm
from tvm import relax


def _bounds(call: relax.Call) -> tuple[int, list[tuple[int, int]]] | None:
    """(axis, [(begin, end) per part]) of a split call, or None when the axis length is symbolic."""
    shape = getattr(call.args[0].ty, "shape", None)
    if shape is None:
        return None
    axis = int(call.attrs.axis)
    axis = axis + len(shape) if axis < 0 else axis
    length = shape[axis]
    if not isinstance(length, tvm.tirx.IntImm):
        return None
    length = int(length)
    spec = call.attrs.indices_or_sections
    if isinstance(spec, tvm.tirx.IntImm | int):  # n equal sections (torch.chunk's, which split legalises alike)
        n = int(spec)
        step = -(-length // n)
        cuts = [min(i * step, length) for i in range(1, n)]
    else:
        cuts = [int(c) for c in spec]
    edges = [0, *cuts, length]
    return axis, list(itertools.pairwise(edges))


@relax.expr_functor.mutator
class _Slices(relax.PyExprMutator):
    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        source = op.tuple_value
        call = self.lookup_binding(source) if isinstance(source, relax.Var) else source
        if isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.split")):
            bounds = _bounds(call)
            if bounds is not None:
                axis, parts = bounds
                begin, end = parts[int(op.index)]
                return self.builder_.normalize(relax.op.strided_slice(self.visit_expr(call.args[0]), axes=[axis],
                                                                      begin=[begin], end=[end]))
        return super().visit_tuple_getitem_(op)


@tvm.transform.module_pass(opt_level=0, name="split_to_slices")
def split_to_slices(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every relax function's split parts as strided slices (the module docstring); unused splits removed."""
    mutator = _Slices(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())
