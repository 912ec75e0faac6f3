"""legalize_bitlinear: BitLinear ops -> call_tir to TensorIR kernels, bit-exact with the reference."""

import numpy as np
import pytest
import tvm
from tvm import relax

from bitrl_compile import quant, reference
from bitrl_compile.passes.fuse_bitlinear import fuse_bitlinear
from bitrl_compile.passes.legalize_bitlinear import legalize_bitlinear
from bitrl_compile.passes.pack_weights import pack_weights
from bitrl_compile.passes.ternarize import ternarize
from relax_models import host_target, mlp, observations, run_host, to_relax

HASWELL = host_target()  # every supported target has FMA; the host here is Haswell or newer


def _quantized(model, k, per_channel=False):
    return pack_weights(fuse_bitlinear(ternarize(per_channel)(to_relax(model, k))))


def test_every_bitlinear_becomes_a_call_tir_and_kernels_are_shared():
    mod = legalize_bitlinear(HASWELL)(_quantized(mlp((4, 16, 16, 16, 2), "relu"), 4))
    calls = [b.value for b in mod["main"].body.blocks[0].bindings]
    assert all(c.op.same_as(tvm.ir.Op.get("relax.call_tir")) for c in calls)
    kernels = sorted(gv.name_hint if hasattr(gv, "name_hint") else str(gv) for gv, f in mod.functions.items()
                     if not isinstance(f, relax.Function))
    assert len(kernels) == 3  # 4->16, 16->16 (used twice), 16->2
    assert "bitrl.bitlinear" not in mod.script()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("sizes", [(4, 64, 64, 2), (7, 33, 5), (1, 3, 1)])
def test_compiled_relu_policy_is_bit_exact_with_the_numpy_reference(sizes, per_channel):
    quantized = _quantized(mlp(sizes, "relu"), sizes[0], per_channel)
    x = observations(64, sizes[0])
    compiled = run_host(relax.transform.DeadCodeElimination()(legalize_bitlinear(HASWELL)(quantized)), x)
    np.testing.assert_array_equal(compiled, reference.run(quantized, x))


def test_compiled_tanh_policy_is_within_a_stated_tolerance():
    # TVM's tanh and numpy's differ by an ulp; a 1-ulp change can move round(x*s) of the next layer by one
    # int8 step, i.e. an output change bounded by (sum |gamma| over one input) / s: far below 1e-3 here.
    quantized = _quantized(mlp((4, 64, 64, 2), "tanh"), 4)
    x = observations(64)
    compiled = run_host(legalize_bitlinear(HASWELL)(quantized), x)
    expected = reference.run(quantized, x)
    np.testing.assert_allclose(compiled, expected, rtol=0, atol=1e-3 * np.abs(expected).max())
    assert np.mean(compiled.argmax(1) == expected.argmax(1)) == 1.0


def test_integer_path_is_bit_exact_at_the_kernel_level():
    # The kernel with the "none" activation and zero bias and gamma = s exposes float(acc) exactly.
    from bitrl_compile.runtime.weights import pack_tiles
    from bitrl_compile.targets import kernel_spec
    from bitrl_compile.targets.kernels import bitlinear_kernel

    k, n = 4096, 16
    rng = np.random.default_rng(0)
    w_t = np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    w_t[0] = 1  # all +1 against all +127 activations: |acc| = 127 * 4096, the largest possible
    x = np.full((3, k), 1.0, np.float32)
    x[1] = rng.standard_normal(k)
    x[2, ::2] = -1
    lib = tvm.compile(tvm.IRModule({"main": bitlinear_kernel(k, n, target=HASWELL)}), target=HASWELL)
    _, (_, s, acc) = quant.bitlinear_reference(x, w_t, np.ones(1, np.float32), return_int=True)
    gamma = np.ones(1, np.float32)
    out = tvm.runtime.tensor(np.zeros((3, n), np.float32))
    lib(*[tvm.runtime.tensor(a) for a in (x, pack_tiles(w_t, kernel_spec(HASWELL).layout), gamma, np.zeros(n, np.float32))],
        out)
    np.testing.assert_array_equal(out.numpy(), quant.fma_f32(acc.astype(np.float32), 1 / s[:, None],
                                                              np.zeros((3, n), np.float32)))
    assert acc[0, 0] == 127 * k


def test_token_sequences_are_flattened_for_the_kernel_and_stay_bit_exact():
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Tokens:
        @R.function
        def main(x: R.Tensor(("n", 3, 8), "float32"), w: R.Tensor((8, 16), "float32")):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w, out_dtype="float32"))
                R.output(y)
            return y

    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    mod = relax.transform.BindParams("main", {"w": tvm.runtime.tensor(w)})(Tokens)
    quantized = pack_weights(fuse_bitlinear(ternarize()(mod)))
    x = np.random.default_rng(1).standard_normal((5, 3, 8)).astype(np.float32)
    compiled = run_host(legalize_bitlinear(HASWELL)(quantized), x)
    assert compiled.shape == (5, 3, 16)
    np.testing.assert_array_equal(compiled, reference.run(quantized, x))
