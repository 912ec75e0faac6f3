"""pack_weights: int8 trits -> 2-bit packed uint8, exactly the same results."""

import numpy as np
import tvm

from bitrl_compile import layouts, reference
from bitrl_compile.passes import bitlinear_op
from bitrl_compile.passes.fuse_bitlinear import fuse_bitlinear
from bitrl_compile.passes.pack_weights import pack_weights
from bitrl_compile.passes.ternarize import ternarize
from relax_models import mlp, observations, to_relax


def _ops(mod):
    return [op for b in mod["main"].body.blocks[0].bindings if (op := bitlinear_op.parse(b.value)) is not None]


def test_weights_are_packed_four_per_byte_and_results_are_identical():
    model = mlp((4, 30, 30, 2), "tanh")
    before = fuse_bitlinear(ternarize()(to_relax(model, 4)))
    after = pack_weights(before)
    for old, new in zip(_ops(before), _ops(after)):
        w_t = old.w.value.numpy()
        assert new.layout == "2bit" and new.w.value.numpy().dtype == np.uint8
        assert new.w.value.numpy().shape == (w_t.shape[0], -(-w_t.shape[1] // 4))
        np.testing.assert_array_equal(layouts.unpack_2bit(new.w.value.numpy(), new.k), w_t)
        tvm.ir.assert_structural_equal(new.gamma, old.gamma)
        tvm.ir.assert_structural_equal(new.bias, old.bias)
    x = observations(32)
    np.testing.assert_array_equal(reference.run(after, x), reference.run(before, x))


def test_packing_twice_changes_nothing():
    mod = pack_weights(fuse_bitlinear(ternarize()(to_relax(mlp((4, 8, 2)), 4))))
    tvm.ir.assert_structural_equal(pack_weights(mod), mod)
