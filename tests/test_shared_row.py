"""A Q-network's last layer split into a shared row and the differences (frontends.mlp.shared_row, issue 14).

Q-values share a large common part and differ by small gaps; quantizing each row of the last layer on its own
scale blurs the gaps with errors of the common part's size. Split, the same function quantizes the differences
on their own scales: the int8 head keeps the actions. The artifact (host and its C API, and rasp4 under qemu)
equals the numpy reference bit for bit, the student file keeps the split, and --keep splits the head of a
Q-network whose last layer it makes int8 (trainers/recovery.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bitrl_compile import fidelity, pipeline, reference
from bitrl_compile.devices import EmulatedPolicy
from bitrl_compile.frontends import MLPPolicy, load_policy
from bitrl_compile.frontends.mlp import shared_row
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import load
from bitrl_compile.trainers import recovery
from bitrl_compile.trainers.export import reference_forward, save_like
from capi_lib import open_libbitrl

Q = {"kind": "discrete", "n": 4, "outputs": "q_values"}


def _q_network() -> LoadedPolicy:
    """Layers 0 and 1 are +-a (ternary loses nothing); Q-values: a common part (one random row, big) plus small
    differences between the four actions' rows."""
    g = torch.Generator().manual_seed(0)
    net = MLPPolicy([6, 64, 64, 4], "relu")
    with torch.no_grad():
        for lin in (net.net[0], net.net[2]):
            lin.weight.copy_(0.3 * torch.sign(torch.randn(lin.weight.shape, generator=g)))
            lin.bias.zero_()
        net.net[4].weight.copy_(torch.randn(1, 64, generator=g) + 0.01 * torch.randn(4, 64, generator=g))
        net.net[4].bias.fill_(-40.0)
    return LoadedPolicy(module=net, onnx_model=None,
                        input={"shape": [6], "dtype": "float32", "preprocess": "none", "normalize": None},
                        output=dict(Q), source="test-q")


def _x(n: int = 512) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 6)).astype(np.float32)


def test_the_split_keeps_the_function_and_an_int8_head_keeps_the_actions():
    loaded = _q_network()
    split = dataclasses.replace(loaded, module=shared_row(loaded.module))
    x = _x()
    with torch.no_grad():
        fp32, out = loaded.module(torch.from_numpy(x)).numpy(), split.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, fp32, rtol=1e-5, atol=1e-4)
    assert split.module.net[4].out_features == 5 and shared_row(split.module) is split.module

    def agreement(policy):
        ours = reference_forward(policy, int8_layers=(2,))(x)
        return fidelity.compare(Q, ours, fp32)["weighted"]

    whole, apart = agreement(loaded), agreement(split)
    assert whole < 0.95 and apart > 0.999, (whole, apart)  # measured: 92.8 % and 99.996 %


@pytest.fixture(scope="module")
def split_host(tmp_path_factory):
    loaded = _q_network()
    split = dataclasses.replace(loaded, module=shared_row(loaded.module))
    path = tmp_path_factory.mktemp("split") / "split.bitrl"
    return split, pipeline.compile_policy(split, "host", path, int8_layers=[2], tuning=False)


def test_the_host_artifact_and_the_c_api_equal_the_reference(split_host):
    split, result = split_host
    assert [la["precision"] for la in result.manifest["layers"]] == ["ternary", "ternary", "int8"]
    x = _x(64)
    with load(result.path) as policy:
        out = np.asarray(policy.forward(x))
        assert out.shape == (64, 4)
        np.testing.assert_array_equal(out, reference_forward(split, int8_layers=(2,))(x))
        np.testing.assert_array_equal(policy.act(x), out.argmax(1))
    lib = open_libbitrl()  # the C API in this process: libbitrl.so, the same plan
    handle = lib.bitrl_load(str(result.path).encode())
    assert handle, lib.bitrl_last_error().decode()
    try:
        assert lib.bitrl_output_size(handle) == 4
        c_out = np.zeros((64, 4), np.float32)
        assert lib.bitrl_forward(handle, x.ctypes.data, 64, c_out.ctypes.data) == 0, lib.bitrl_last_error().decode()
    finally:
        lib.bitrl_free(handle)
    np.testing.assert_array_equal(c_out, out)


def test_the_rasp4_artifact_equals_the_reference_under_qemu(tmp_path):
    loaded = _q_network()
    split = dataclasses.replace(loaded, module=shared_row(loaded.module))
    result = pipeline.compile_policy(split, "rasp4", tmp_path / "split.bitrl", int8_layers=[2])
    x = _x(40)
    with EmulatedPolicy(result.path, cpu="cortex-a72") as policy:
        out = policy.forward(x)
    np.testing.assert_array_equal(out, reference.run(result.quantized, x))
    np.testing.assert_array_equal(out, reference_forward(split, int8_layers=(2,))(x))


def test_a_student_file_keeps_the_split(tmp_path):
    loaded = _q_network()
    split = dataclasses.replace(loaded, module=shared_row(loaded.module))
    config = save_like(tmp_path / "student.safetensors", split, split.module, {"recovery": "distill"})
    assert config["shared_row"] is True
    again = load_policy(tmp_path / "student.safetensors")
    assert again.module.shared_row and "shared row" in again.description and again.output["n"] == 4
    x = torch.from_numpy(_x(32))
    with torch.no_grad():
        np.testing.assert_array_equal(again.module(x).numpy(), split.module(x).numpy())


def test_keep_splits_the_head_of_a_q_network_whose_last_layer_is_int8():
    loaded = _q_network()
    assert recovery._with_shared_row(loaded, (2,)).module.shared_row
    assert recovery._with_shared_row(loaded, (0, -1)).module.shared_row
    assert recovery._with_shared_row(loaded, (0,)) is loaded  # the last layer stays ternary: nothing to split
    logits = dataclasses.replace(loaded, output={"kind": "discrete", "n": 4, "outputs": "logits"})
    assert recovery._with_shared_row(logits, (2,)) is logits  # a distribution's logits: not a Q-network
