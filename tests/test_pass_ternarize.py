"""ternarize: matmul by a constant float weight -> bitrl.bitlinear with int8 trits and absmean scale."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bitrl_compile import quant, reference
from bitrl_compile.passes import bitlinear_op
from bitrl_compile.passes.ternarize import ternarize
from relax_models import mlp, observations, run_host, to_relax


def bind(mod, **params):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("n", 4), "float32"), w: R.Tensor((8, 4), "float32"), b: R.Tensor((8,), "float32")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            y = R.matmul(x, wt, out_dtype="float32")
            z = R.add(y, b)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor(("n", 4), "float32"), w_t: R.Tensor((8, 4), "int8"), gamma: R.Tensor((1,), "float32"),
             zeros: R.Tensor((8,), "float32"), b: R.Tensor((8,), "float32")):
        n = T.int64()
        with R.dataflow():
            y = R.call_pure_packed("bitrl.bitlinear", x, w_t, gamma, zeros, R.str("none"), R.str("int8"),
                                   R.prim_value(T.int64(4)), ty_args=R.Tensor((n, 8), "float32"))
            z = R.add(y, b)
            R.output(z)
        return z


def test_linear_becomes_bitlinear_with_ternary_weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    w_t, gamma = quant.ternarize_weight(w)
    after = ternarize()(bind(Before, w=w, b=b))
    expected = bind(Expected, w_t=w_t, gamma=gamma, zeros=np.zeros(8, np.float32), b=b)
    tvm.ir.assert_structural_equal(after["main"].body, expected["main"].body, map_free_vars=True)


def test_per_channel_option_gives_one_scale_per_output():
    w = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    after = ternarize(per_channel=True)(bind(Before, w=w, b=np.zeros(8, np.float32)))
    op = bitlinear_op.parse(after["main"].body.blocks[0].bindings[0].value)
    np.testing.assert_array_equal(op.gamma.value.numpy(), quant.ternarize_weight(w, per_channel=True)[1])


def test_ternarized_module_computes_the_ternary_reference():
    model = mlp((4, 32, 3), "relu")
    mod = ternarize()(to_relax(model, 4))
    x = observations(16)
    w1, g1 = quant.ternarize_weight(model[0].weight.detach().numpy())
    w2, g2 = quant.ternarize_weight(model[2].weight.detach().numpy())
    h = np.maximum(quant.bitlinear_reference(x, w1, g1) + model[0].bias.detach().numpy(), 0)
    expected = quant.bitlinear_reference(h, w2, g2) + model[2].bias.detach().numpy()
    np.testing.assert_allclose(run_host(mod, x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reference.run(mod, x), expected, rtol=1e-6, atol=1e-6)


def test_matmul_by_a_non_constant_stays_float():
    @I.ir_module
    class TwoInputs:
        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 3), "float32")):
            with R.dataflow():
                y = R.matmul(x, w, out_dtype="float32")
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(ternarize()(TwoInputs), TwoInputs)
