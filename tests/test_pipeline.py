"""End to end on the host: policy -> artifact -> runtime, checked against the numpy reference."""

import json
import zipfile

import numpy as np
import pytest
import tvm

from bitrl_compile import pipeline, reference, targets
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import load, safetensors_np
from relax_models import mlp, observations

DISCRETE = {"kind": "discrete", "n": 3, "outputs": "logits"}
INPUT = {"shape": [5], "dtype": "float32", "preprocess": "none", "normalize": None}


def loaded(module, output=DISCRETE, input_spec=INPUT):
    return LoadedPolicy(module=module, onnx_model=None, input=dict(input_spec), output=dict(output),
                        source="test-mlp", description="")


@pytest.fixture(scope="module")
def relu_policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "relu.bitrl"
    return pipeline.compile_policy(loaded(mlp((5, 64, 64, 3), "relu")), "host", path)


def test_artifact_holds_manifest_library_and_packed_params(relu_policy):
    with zipfile.ZipFile(relu_policy.path) as z:
        assert sorted(z.namelist()) == ["lib.so", "manifest.json", "manifest.sha256", "params.safetensors"]
        manifest = json.loads(z.read("manifest.json"))
        params, _ = safetensors_np.loads(z.read("params.safetensors"))
    assert manifest["format"] == "bitrl" and manifest["target"]["name"] == "host"
    assert [(la["in"], la["out"], la["activation"]) for la in manifest["layers"]] == \
        [(5, 64, "relu"), (64, 64, "relu"), (64, 3, "none")]
    assert set(manifest["members"]) == {"lib.so", "params.safetensors"}
    packed = [v for v in params.values() if v.dtype == np.uint8]
    assert [p.shape for p in packed] == [(64, 1), (64, 13), (3, 13)]  # base-3: 5 trits per byte
    assert [w["shape"] for w in manifest["weights"].values()] == [[64, 5], [64, 64], [3, 64]]
    assert {w["storage"] for w in manifest["weights"].values()} == {"base3"}


def test_compiled_policy_equals_the_reference_bit_for_bit(relu_policy):
    policy = load(relu_policy.path)
    x = observations(257, 5)
    np.testing.assert_array_equal(policy.forward(x), reference.run(relu_policy.quantized, x))


def test_single_and_batched_calls_agree(relu_policy):
    policy = load(relu_policy.path)
    x = observations(9, 5)
    batched = policy.act(x)
    assert batched.shape == (9,)
    assert [int(policy.act(o)) for o in x] == batched.tolist()
    np.testing.assert_array_equal(policy.forward(x[3]), policy.forward(x)[3])


def test_continuous_actions_are_squashed_into_the_box(tmp_path):
    spec = {"kind": "continuous", "shape": [2], "low": [-2.0, 0.0], "high": [2.0, 1.0], "squash": "tanh",
            "log_std": None}
    result = pipeline.compile_policy(loaded(mlp((5, 16, 2), "tanh"), spec), "host", tmp_path / "c.bitrl")
    policy = load(result.path)
    x = observations(50, 5) * 100
    actions = policy.act(x)
    mean = reference.run(result.quantized, x)
    np.testing.assert_allclose(actions, np.array([-2, 0]) + (np.tanh(mean) + 1) / 2 * np.array([4, 1]),
                               rtol=1e-5, atol=1e-5)
    assert actions.dtype == np.float32 and (actions >= [-2, 0]).all() and (actions <= [2, 1]).all()


def test_normalisation_statistics_are_applied_before_the_network(tmp_path):
    norm = {"mean": [1, 2, 3, 4, 5], "var": [4, 4, 4, 4, 4], "eps": 1e-8, "clip": 1.5}  # 4 + 1e-8 == 4 in float32
    spec = dict(INPUT, normalize=norm)
    result = pipeline.compile_policy(loaded(mlp((5, 8, 3)), input_spec=spec), "host", tmp_path / "n.bitrl")
    x = observations(20, 5)
    expected = reference.run(result.quantized, np.clip((x - np.arange(1, 6)) / 2, -1.5, 1.5).astype(np.float32))
    np.testing.assert_array_equal(load(result.path).forward(x), expected)


def test_host_artifacts_name_the_cpu_flags_their_kernels_need(tmp_path, monkeypatch):
    from bitrl_compile.runtime import policy

    result = pipeline.compile_policy(loaded(mlp((5, 8, 3))), "host", tmp_path / "h.bitrl")
    spec = targets.kernel_spec(targets.tvm_target(targets.get_target("host")))
    want = [targets.CPU_FLAGS[f] for f in spec.features if f in targets.CPU_FLAGS]
    assert result.manifest["target"]["cpu_features"] == want and set(want) <= policy.cpu_flags()
    if "amx_tile" in want:  # where Linux refuses the AMX state, the artifact says so in one line
        monkeypatch.setattr(policy, "enable_amx", lambda: False)
        with pytest.raises(policy.ArtifactError, match="Linux did not grant this process the AMX state"):
            policy.check_runnable_here(result.manifest, "h.bitrl")


def test_the_host_target_never_implies_a_feature_this_cpu_hides():
    """LLVM names the CPU from cpuid ("znver4"); a virtual machine may hide part of it (a Zen 4 guest without AVX-512).
    Every feature the host target implies must be one /proc/cpuinfo shows, or its code would SIGILL."""
    from tvm.target.codegen import target_has_features

    from bitrl_compile.runtime import policy

    host = targets.get_target("host")
    flags, tvm_target = policy.cpu_flags(), targets.tvm_target(host)
    implied = {flag for feature, flag in targets.CPU_FLAGS.items()
               if target_has_features(feature, tvm_target)}
    assert implied <= flags, f"{host.device}: implies {sorted(implied - flags)}"


@pytest.mark.skipif(targets.get_target("host").arch != "x86_64", reason="an x86-64 CPU name")
def test_a_zen4_that_hides_avx512_gets_the_avx2_kernel():
    zen4 = {"kind": "llvm", "mcpu": "znver4"}
    avx2_only = {"avx", "avx2", "fma", "f16c", "bmi2", "vaes", "vpclmulqdq"}
    off = targets.hidden_features(zen4, avx2_only)
    assert "-avx512f" in off and "-avx2" not in off
    assert targets.kernel_spec(tvm.target.Target({**zen4, "mattr": off})).isa == "avx2"
    assert targets.kernel_spec(tvm.target.Target(zen4)).isa == "avx512-vnni"  # what it would pick without
    every = set(targets.CPU_FLAGS.values())
    assert targets.hidden_features(zen4, every) == [] and targets.hidden_features(zen4, set()) == []


def test_x86_avx2_target_runs_here_bit_exact(tmp_path):
    result = pipeline.compile_policy(loaded(mlp((5, 48, 3), "relu")), "x86-avx2", tmp_path / "avx2.bitrl")
    assert result.manifest["target"]["cpu_features"] == ["avx2", "fma"]
    x = observations(40, 5)
    np.testing.assert_array_equal(load(result.path).forward(x), reference.run(result.quantized, x))


# ---------------------------------------------------------------- the check before writing (issue 15)

def _written(path):
    from bitrl_compile.runtime import read_artifact

    art = read_artifact(path)
    return art.manifest, dict(art.members)


def test_the_compile_checks_the_artifact_against_the_reference(relu_policy, tmp_path):
    lines = []
    pipeline.compile_policy(loaded(mlp((5, 16, 3), "relu")), "host", tmp_path / "c.bitrl", log=lines.append)
    assert "checked the artifact against the numpy reference on 16 observations" in lines
    manifest, members = _written(relu_policy.path)
    assert reference.check_artifact(manifest, members, relu_policy.quantized, "relu.bitrl").startswith("checked")


def test_check_refuses_an_artifact_whose_outputs_differ(relu_policy):
    manifest, members = _written(relu_policy.path)
    params, _ = safetensors_np.loads(members["params.safetensors"])
    bias = next(n for n, v in params.items() if v.dtype == np.float32 and v.shape == (3,))
    params[bias] = params[bias] + np.float32(1)  # the last layer's bias: every output moves by 1
    members["params.safetensors"] = safetensors_np.dumps(params)
    with pytest.raises(reference.CheckFailed, match=r"disagrees with the numpy reference \(largest difference"):
        reference.check_artifact(manifest, members, relu_policy.quantized, "relu.bitrl")


def test_check_refuses_an_artifact_that_fails_when_run(relu_policy):
    manifest, members = _written(relu_policy.path)
    members["lib.so"] = b"\x7fELF not a library"
    with pytest.raises(reference.CheckFailed, match=r"fails when run \(ArtifactError: .*nothing was written"):
        reference.check_artifact(manifest, members, relu_policy.quantized, "relu.bitrl")


def test_check_of_another_architecture_is_left_to_its_machine(relu_policy):
    manifest, members = _written(relu_policy.path)
    manifest["target"] = dict(manifest["target"], arch="aarch64", name="rasp4")
    note = reference.check_artifact(manifest, members, relu_policy.quantized, "rasp4.bitrl")
    assert note.startswith("not run before writing: compiled for aarch64")
