"""passes/schedule_float.py: the legalised float TensorIR (matmuls, norms, softmax) scheduled for the CPU, with the
module before and after: the same results, the functions marked scheduled, the compile's own kernels untouched."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from bitrl_compile import targets
from bitrl_compile.passes.schedule_float import schedule_float


@tvm.script.ir_module
class Attention:
    @R.function
    def main(q: R.Tensor(("b", 8, 16), "float32"), kt: R.Tensor(("b", 16, 16), "float32"),
             v: R.Tensor(("b", 16, 32), "float32"), x: R.Tensor(("b", 8, 64), "float32")):
        with R.dataflow():
            s = R.nn.softmax(R.matmul(q, kt), axis=-1)
            o = R.matmul(s, v)
            n = x * R.rsqrt(R.mean(x * x, axis=-1, keepdims=True) + R.const(1e-5, "float32"))
            R.output(o, n)
        return (o, n)


def _legalised():
    return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                     relax.transform.FuseOps(), relax.transform.FuseTIR()])(Attention)


def _run(mod, tvm_target, arrays):
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm_target), tvm.cpu())
    return [r.numpy() for r in vm["main"](*[tvm.runtime.tensor(a) for a in arrays])]


def test_schedules_matmuls_and_norms_with_the_same_results():
    tvm_target = targets.tvm_target(targets.get_target("host"))
    before = _legalised()
    after = schedule_float(tvm_target)(before)
    scheduled = {gv.name_hint for gv, f in after.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled")}
    assert {"matmul", "matmul1"} <= scheduled
    assert any("softmax" in name for name in scheduled) and any("mean" in name for name in scheduled)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((3, 8, 16), (3, 16, 16), (3, 16, 32), (3, 8, 64))]
    (o0, n0), (o1, n1) = _run(before, tvm_target, arrays), _run(after, tvm_target, arrays)
    np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-6)  # softmax sums in another order; matmuls do not
    np.testing.assert_allclose(n1, n0, rtol=1e-5, atol=1e-6)


def test_leaves_the_compiles_own_kernels_and_odd_shapes():
    tvm_target = targets.tvm_target(targets.get_target("host"))
    before = _legalised()
    renamed = tvm.IRModule({tvm.ir.GlobalVar("bitrl_matmul" if gv.name_hint == "matmul" else gv.name_hint): f
                            for gv, f in before.functions_items() if isinstance(f, tvm.tirx.PrimFunc)})
    after = schedule_float(tvm_target)(renamed)
    assert after["bitrl_matmul"].same_as(renamed["bitrl_matmul"])


@pytest.mark.parametrize("rows", [3, 7])
def test_matmul_rows_not_a_multiple_of_the_block_stay_unscheduled(rows):
    from bitrl_compile.passes.schedule_float import schedule_matmul

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((2, rows, 16), "float32"))
    b = relax.Var("b", relax.TensorType((2, 16, 32), "float32"))
    with bb.function("main", [a, b]):
        bb.emit_func_output(bb.emit(relax.op.matmul(a, b)))
    mod = relax.transform.LegalizeOps()(bb.get())
    assert schedule_matmul(mod["matmul"], 8) is None


def test_elementwise_chain_is_inlined_and_vectorised():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.multiply(x, relax.const(2.0, "float32")))
            z = bb.emit_output(relax.op.multiply(relax.op.add(y, relax.const(1.0, "float32")), x))
        bb.emit_func_output(z)
    tvm_target = targets.tvm_target(targets.get_target("host"))
    before = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                       relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
    after = schedule_float(tvm_target)(before)
    fused = next(gv for gv, f in after.functions_items() if gv.name_hint.startswith("fused_"))
    script = after[fused].script()
    assert script.count("T.sblock(") - script.count('T.sblock("root")') == 1 and "T.vectorized" in script
    a = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)

    def run(mod):
        vm = relax.VirtualMachine(tvm.compile(mod, target=tvm_target), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(a)).numpy()

    np.testing.assert_array_equal(run(after), run(before))
