"""The quantization math: edge cases, the correctly rounded fma, and the STE used in training."""

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tvm import te
from tvm import tirx as T

from bitrl_compile import quant

finite32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)


def test_ternarize_weight_matches_the_bitnet_formula():
    w = np.array([[0.5, -0.1, 2.0, -0.9], [0.0, 0.05, -0.3, 0.4]], np.float32)
    w_t, gamma = quant.ternarize_weight(w)
    assert gamma[0] == pytest.approx(np.abs(w).mean())
    assert w_t.tolist() == np.clip(np.round(w / gamma[0]), -1, 1).astype(int).tolist()
    assert w_t.dtype == np.int8 and set(np.unique(w_t)) <= {-1, 0, 1}


def test_per_channel_scales_are_row_absmeans():
    w = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32) * np.arange(1, 6)[:, None]
    _, gamma = quant.ternarize_weight(w, per_channel=True)
    np.testing.assert_allclose(gamma, np.abs(w).mean(axis=1), rtol=1e-6)


def test_all_zero_weight_gets_the_epsilon_scale_not_a_division_by_zero():
    w_t, gamma = quant.ternarize_weight(np.zeros((3, 4), np.float32))
    assert gamma[0] == quant.EPS and not w_t.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_rejected(bad):
    w = np.ones((2, 2), np.float32)
    w[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.ternarize_weight(w)


def test_activation_quantization_uses_the_full_int8_range_per_row():
    x = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [3e-8, -1e-8, 0]], np.float32)
    x_q, s = quant.quantize_activations(x)
    assert x_q[0].tolist() == [64, -127, 32]  # 63.5 rounds half to even
    assert not x_q[1].any() and not x_q[2].any() or np.abs(x_q[2]).max() <= 127
    assert s[1] == np.float32(127) / quant.EPS


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, (8,), elements=finite32), arrays(np.float32, (8,), elements=finite32),
       arrays(np.float32, (8,), elements=finite32))
def test_fma_f32_is_correctly_rounded(a, b, c):
    # Exact rational arithmetic decides the correct rounding of a*b+c.
    from fractions import Fraction

    got = quant.fma_f32(a, b, c)
    for ai, bi, ci, g in zip(a, b, c, got):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        lo = np.nextafter(g, np.float32(-np.inf))
        hi = np.nextafter(g, np.float32(np.inf))
        err = abs(Fraction(float(g)) - exact)
        assert err <= abs(Fraction(float(lo)) - exact) and err <= abs(Fraction(float(hi)) - exact)


def test_fma_f32_equals_the_fma_that_tvm_generates():
    # Every target we support has hardware FMA (Haswell+, Cortex-A72/A76); TVM lowers tirx.fma to it.
    n = 4096
    a, b, c = (te.placeholder((n,), "float32", name=s) for s in "abc")
    d = te.compute((n,), lambda i: T.op.fma(a[i], b[i], c[i]), name="d")
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([a, b, c, d])}), target=target)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(n).astype(np.float32) * rng.choice([1e-8, 1, 1e8], n).astype(np.float32)
            for _ in range(3)]
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib(*[tvm.runtime.tensor(x) for x in args], out)
    np.testing.assert_array_equal(out.numpy(), quant.fma_f32(*args))
    assert not np.array_equal(out.numpy(), args[0] * args[1] + args[2])  # the fma is really fused


def test_ste_forward_is_the_quantized_value_and_backward_is_identity():
    w = torch.randn(6, 5, requires_grad=True)
    q = quant.ternarize_weight_ste(w)
    w_t, gamma = quant.ternarize_weight(w.detach().numpy())
    np.testing.assert_allclose(q.detach().numpy(), w_t * gamma[0], rtol=1e-6)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(3, 5, requires_grad=True)
    xq = quant.quantize_activations_ste(x)
    x_q, s = quant.quantize_activations(x.detach().numpy())
    np.testing.assert_allclose(xq.detach().numpy(), x_q / s[:, None], rtol=1e-6)
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_ste_ternarization_equals_the_compilers_even_between_the_float32_thresholds():
    # QAT leaves weights oscillating across +-gamma/2; a float32 mean one ulp off the compiler's (float64 mean,
    # rounded) flipped a trit of a trained BitNet backbone and changed 78 % of its features. Put w[0, 0] between
    # the two candidate thresholds and check that the torch STE quantizes it as `ternarize_weight` does.
    checked = 0
    for seed in range(60):
        w = np.random.default_rng(seed).standard_normal((172, 64)).astype(np.float32)
        for _ in range(10):
            g32 = np.float32(torch.from_numpy(w).abs().mean().item())
            g64 = quant.ternarize_weight(w)[1][0]
            if g32 != g64 and (w[0, 0] / g32 > 0.5) != (w[0, 0] / g64 > 0.5):
                break
            w[0, 0] = np.float32((np.float64(g32) + np.float64(g64)) / 4)
        else:
            continue
        w_t, gamma = quant.ternarize_weight(w)
        fake = quant.ternarize_weight_ste(torch.from_numpy(w)).numpy()  # w + (gamma w_t - w): gamma w_t to an ulp
        np.testing.assert_array_equal(np.round(fake / gamma[0]), w_t)
        checked += 1
    assert checked >= 5


def test_int_matmul_is_exact_in_float32_where_it_can_be_and_in_int32_beyond():
    """Worst cases at the bound: every product at its largest, all of one sign, so the sum is the largest partial
    sum there is; just below 2^24 float32 is exact, just above it the int32 path takes over."""
    from bitrl_compile.quant import int_matmul

    rng = np.random.default_rng(0)
    for k, w_max in ((131_071, 1), (131_072, 1), (1_031, 127), (1_033, 127), (777, 1)):
        x_q = np.full((2, k), -128, np.int8)
        x_q[1] = rng.integers(-128, 128, k)
        w_t = np.full((3, k), -w_max, np.int8)
        w_t[1] = rng.integers(-w_max, w_max + 1, k)
        w_t[2, ::2] = w_max
        expected = x_q.astype(np.int64) @ w_t.astype(np.int64).T
        out = int_matmul(x_q, w_t)
        assert out.dtype == np.int32 and np.array_equal(out, expected), (k, w_max)


def test_ste_activations_round_as_the_reference_does():
    """The STE's int8 values are the compiler's on every row (its scale a true float32 division, not torch's
    reciprocal-times-127, which puts a quarter of the scales an ulp off and moves roundings at ties)."""
    x = torch.randn(4096, 64) * torch.logspace(-3, 3, 4096)[:, None]
    xq = quant.quantize_activations_ste(x).detach().numpy()
    x_q, s = quant.quantize_activations(x.numpy())
    np.testing.assert_array_equal(np.round(xq * s[:, None]), x_q)
    np.testing.assert_array_equal(xq, (x_q.astype(np.float32) / s[:, None]).astype(np.float32))
