"""fuse_bitlinear: bias add and activation fold into the BitLinear op; numerics are preserved."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bitrl_compile import reference
from bitrl_compile.passes import bitlinear_op
from bitrl_compile.passes.fuse_bitlinear import fuse_bitlinear
from bitrl_compile.passes.ternarize import ternarize
from relax_models import mlp, observations, to_relax


def bind(mod, **params):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("n", 4), "float32"), w: R.Tensor((8, 4), "int8"), g: R.Tensor((1,), "float32"),
             zeros: R.Tensor((8,), "float32"), b: R.Tensor((8,), "float32")):
        n = T.int64()
        with R.dataflow():
            y = R.call_pure_packed("bitrl.bitlinear", x, w, g, zeros, R.str("none"), R.str("int8"),
                                   R.prim_value(T.int64(4)), ty_args=R.Tensor((n, 8), "float32"))
            z = R.add(b, y)
            a = R.nn.relu(z)
            R.output(a)
        return a


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor(("n", 4), "float32"), w: R.Tensor((8, 4), "int8"), g: R.Tensor((1,), "float32"),
             b: R.Tensor((8,), "float32")):
        n = T.int64()
        with R.dataflow():
            a = R.call_pure_packed("bitrl.bitlinear", x, w, g, b, R.str("relu"), R.str("int8"),
                                   R.prim_value(T.int64(4)), ty_args=R.Tensor((n, 8), "float32"))
            R.output(a)
        return a


def _params():
    rng = np.random.default_rng(0)
    return {"w": rng.integers(-1, 2, (8, 4)).astype(np.int8), "g": np.array([0.7], np.float32),
            "b": rng.standard_normal(8).astype(np.float32)}


def test_bias_and_relu_fold_into_one_op():
    p = _params()
    after = relax.transform.DeadCodeElimination()(fuse_bitlinear(bind(Before, zeros=np.zeros(8, np.float32), **p)))
    tvm.ir.assert_structural_equal(after["main"].body, bind(Expected, **p)["main"].body, map_free_vars=True)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_fusion_preserves_the_output(activation):
    model = mlp((4, 24, 24, 2), activation)
    ternary = ternarize()(to_relax(model, 4))
    fused = fuse_bitlinear(ternary)
    x = observations(32)
    kinds = [bitlinear_op.parse(b.value).activation for b in fused["main"].body.blocks[0].bindings
             if bitlinear_op.parse(b.value) is not None]
    assert kinds == [activation, activation, "none"]
    # The fused op adds the bias inside its fma (one rounding instead of two): ulp-level differences.
    expected = reference.run(ternary, x)
    np.testing.assert_allclose(reference.run(fused, x), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_non_constant_bias_is_not_folded():
    @I.ir_module
    class VarBias:
        @R.function
        def main(x: R.Tensor((2, 4), "float32"), b: R.Tensor((8,), "float32"), w: R.Tensor((8, 4), "int8"),
                 g: R.Tensor((1,), "float32"), zeros: R.Tensor((8,), "float32")):
            with R.dataflow():
                y = R.call_pure_packed("bitrl.bitlinear", x, w, g, zeros, R.str("none"), R.str("int8"),
                                       R.prim_value(T.int64(4)), ty_args=R.Tensor((2, 8), "float32"))
                z = R.add(y, b)
                R.output(z)
            return z

    p = _params()
    mod = bind(VarBias, w=p["w"], g=p["g"], zeros=np.zeros(8, np.float32))
    tvm.ir.assert_structural_equal(fuse_bitlinear(mod), mod)


def test_relu_after_the_reshape_back_to_tokens_is_fused():
    # torch.export flattens a [batch, tokens, K] linear to 2-D and reshapes back before the activation.
    import torch

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 16)

        def forward(self, x):
            return torch.relu(self.fc(x.reshape(x.shape[0], 3, 8))).sum(dim=1)

    ternary = ternarize()(to_relax(Tokens().eval(), 24))
    fused = relax.transform.DeadCodeElimination()(fuse_bitlinear(ternary))
    ops = [bitlinear_op.parse(b.value) for b in fused["main"].body.blocks[0].bindings]
    assert [op.activation for op in ops if op is not None] == ["relu"]
    assert "relax.nn.relu" not in fused.script()
    x = observations(8, 24)
    np.testing.assert_allclose(reference.run(fused, x), reference.run(ternary, x), rtol=0, atol=1e-5)
