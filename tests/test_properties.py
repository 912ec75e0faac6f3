"""Property tests: quantization invariants and compiled == reference on random small MLPs."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bitrl_compile import pipeline, quant, reference
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import load
from relax_models import mlp

rows = st.integers(1, 6).flatmap(lambda b: st.integers(1, 70).flatmap(
    lambda k: arrays(np.float32, (b, k), elements=st.floats(-1e4, 1e4, width=32))))


@settings(max_examples=200, deadline=None)
@given(rows)
def test_activation_quantization_invariants(x):
    x_q, s = quant.quantize_activations(x)
    assert x_q.dtype == np.int8 and (np.abs(x_q.astype(int)) <= 127).all()
    amax = np.abs(x).max(axis=1)
    big = amax > 1e-3
    assert (np.abs(x_q[big]).max(axis=1) == 127).all()  # the largest entry of each row maps to +-127
    err = np.abs(x_q / s[:, None] - x)
    assert (err <= 0.5 / s[:, None] * (1 + 1e-5) + 1e-12).all()


@settings(max_examples=200, deadline=None)
@given(rows, st.booleans())
def test_weight_ternarization_invariants(w, per_channel):
    w_t, gamma = quant.ternarize_weight(w, per_channel=per_channel)
    assert set(np.unique(w_t)) <= {-1, 0, 1}
    assert (gamma >= quant.EPS).all()
    g = gamma[:, None] if per_channel else gamma[0]
    ratio = w / g
    np.testing.assert_array_equal(w_t != 0, np.abs(ratio) > 0.5)  # ties at 0.5 round half to even: to 0
    np.testing.assert_array_equal(np.sign(w_t), np.where(w_t != 0, np.sign(w), 0))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 48), min_size=2, max_size=4), st.booleans(), st.booleans(),
       st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_compiled_random_mlp_equals_the_reference_bit_for_bit(tmp_path_factory, sizes, per_channel, bias, scale,
                                                             seed):
    model = mlp(tuple(sizes), "relu", seed=seed, bias=bias)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    loaded = LoadedPolicy(module=model, onnx_model=None,
                          input={"shape": [sizes[0]], "dtype": "float32", "preprocess": "none", "normalize": None},
                          output={"kind": "discrete", "n": sizes[-1], "outputs": "logits"}, source="hypothesis")
    out = tmp_path_factory.mktemp("prop") / "p.bitrl"
    result = pipeline.compile_policy(loaded, "host", out, per_channel=per_channel)
    x = np.random.default_rng(seed).standard_normal((33, sizes[0])).astype(np.float32) * scale
    np.testing.assert_array_equal(load(out).forward(x), reference.run(result.quantized, x))
