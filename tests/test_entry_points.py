"""The artifact computes actions itself: entry points act/forward/sample in the module, run from their call plan
(runtime/plan.py) without the VM, equal to the VM and to numpy's pre/post-processing; safe from many threads."""

import gc
import hashlib
import threading
import zipfile

import numpy as np
import pytest

from bitrl_compile import pipeline
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import load
from bitrl_compile.runtime.policy import normalization, postprocess, prepare_observations
from relax_models import mlp

DISCRETE = {"kind": "discrete", "n": 3, "outputs": "logits"}
TANH = {"kind": "continuous", "shape": [2], "low": [-2.0, 0.0], "high": [2.0, 1.0], "squash": "tanh",
        "log_std": [-0.5, 0.3]}
CLIP = {"kind": "continuous", "shape": [2], "low": [-1.0, -0.5], "high": [1.0, 0.5], "squash": "clip",
        "log_std": None}
NORMALIZE = {"mean": [0.5, -1.0, 2.0, 0.0], "var": [4.0, 0.25, 1.0, 9.0], "eps": 1e-8, "clip": 1.5}
CASES = {
    "discrete": ({"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None}, DISCRETE, 3),
    "normalized-tanh": ({"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": NORMALIZE}, TANH, 2),
    "image-clip": ({"shape": [2, 2], "dtype": "uint8", "preprocess": "image", "normalize": None}, CLIP, 2),
    "onehot-q": ({"shape": [4], "dtype": "int64", "preprocess": "onehot", "n": 4, "normalize": None},
                 {"kind": "discrete", "n": 3, "outputs": "q_values"}, 3),
}


def _module(case: str):
    import torch

    inputs, _, n_out = CASES[case]
    net = mlp((4, 32, 16, n_out), activation="tanh", seed=3)
    if inputs["preprocess"] == "image":
        return torch.nn.Sequential(torch.nn.Flatten(), *net)
    return net


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request, tmp_path_factory):
    inputs, output, _ = CASES[request.param]
    lp = LoadedPolicy(module=_module(request.param), onnx_model=None, input=dict(inputs), output=dict(output),
                      source="test", description=request.param)
    path = tmp_path_factory.mktemp("entry") / f"{request.param}.bitrl"
    pipeline.compile_policy(lp, "host", path)
    return request.param, path


def _observations(case: str, n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(7)
    inputs = CASES[case][0]
    if inputs["preprocess"] == "onehot":
        return rng.integers(0, inputs["n"], n)
    if inputs["preprocess"] == "image":
        return rng.integers(0, 256, (n, 2, 2)).astype(np.uint8)
    return (rng.standard_normal((n, 4)) * 3).astype(np.float32)


def _vm(policy, entry: str, *inputs):
    return policy._call_vm(entry, *inputs)[0]


def test_every_entry_point_has_a_plan_of_kernel_calls(compiled):
    case, path = compiled
    policy = load(path)
    output = CASES[case][1]
    expected = {"forward", "act"} | ({"sample"} if output.get("outputs") != "q_values" and
                                     (output["kind"] == "discrete" or output.get("log_std")) else set())
    assert set(policy.manifest["entry_points"]) == expected
    for plan in policy.manifest["entry_points"].values():
        assert all(set(call) == {"func", "args"} for call in plan["calls"])
    assert policy.manifest["batch"] == {"min": 1, "max": 1 << 20}


def test_forward_equals_numpy_preprocessing_then_the_network(compiled):
    """Normalisation, /255 and one-hot inside the module give the network exactly numpy's input."""
    case, path = compiled
    policy = load(path)
    obs = _observations(case)
    x, _ = prepare_observations(policy.input_spec, obs, normalization(policy.input_spec))
    np.testing.assert_array_equal(policy.forward(obs), _vm(policy, "main", x))


def test_plans_equal_the_relax_vm(compiled):
    case, path = compiled
    policy = load(path)
    obs = _observations(case)
    x = np.asarray(obs, np.float32)
    for entry in policy.manifest["entry_points"]:
        inputs = [x] if entry != "sample" else [x, np.random.default_rng(1).random((len(x), *(
            [1] if policy.output_spec["kind"] == "discrete" else policy.output_spec["shape"]))).astype(np.float32)]
        np.testing.assert_array_equal(policy._call(entry, *inputs), _vm(policy, entry, *inputs), err_msg=entry)


def test_actions_equal_numpy_postprocessing(compiled):
    """argmax and clip bit for bit; tanh squash within TVM's tanh (2 ulp of the range)."""
    case, path = compiled
    policy = load(path)
    obs = _observations(case)
    ours, theirs = policy.act(obs), postprocess(policy.output_spec, policy.forward(obs))
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if policy.output_spec.get("squash") == "tanh":  # TVM's (vectorised) tanh and numpy's: a few float32 ulps
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=4e-7)
        assert np.all((ours >= policy.output_spec["low"]) & (ours <= policy.output_spec["high"]))
    else:
        np.testing.assert_array_equal(ours, theirs)
    one = policy.act(obs[0])
    assert np.array_equal(one, ours[0]) and np.shape(one) == ours.shape[1:]


def test_sampling_follows_the_noise_like_numpy(compiled):
    case, path = compiled
    policy = load(path)
    if "sample" not in policy.manifest["entry_points"]:
        pytest.skip("a deterministic policy")
    obs = _observations(case, 256)
    ours = policy.act(obs, deterministic=False, rng=np.random.default_rng(5))
    theirs = postprocess(policy.output_spec, policy.forward(obs), deterministic=False, rng=np.random.default_rng(5))
    if policy.output_spec["kind"] == "discrete":  # exp differs in the last place: a tie with u flips rarely
        assert np.mean(ours == theirs) >= 0.99
        assert len(set(ours.tolist())) > 1
    else:  # a few float32 ulps: TVM's vectorised tanh (schedule_float) against numpy's
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=4e-7)


def test_eight_threads_sharing_one_policy_get_the_sequential_results(compiled):
    case, path = compiled
    policy = load(path)
    obs = _observations(case, 64)
    sizes = [1, 3, 8, 1, 64, 5, 1, 17]
    expected = {b: (policy.act(obs[:b]), policy.forward(obs[:b])) for b in set(sizes)}
    single = policy.act(obs[0])
    failures = []

    def worker(t: int):
        try:
            for i in range(1000):
                b = sizes[(t + i) % len(sizes)]
                if i % 7 == 0:
                    assert np.array_equal(policy.act(obs[0]), single)
                elif i % 2:
                    np.testing.assert_array_equal(policy.forward(obs[:b]), expected[b][1])
                else:
                    np.testing.assert_array_equal(policy.act(obs[:b]), expected[b][0])
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def _mapped_libraries() -> int:
    with open("/proc/self/maps") as f:
        return sum("/bitrl-" in line and ".so" in line for line in f)


def test_close_releases_the_library_mapping(compiled):
    _, path = compiled
    gc.collect()
    before = _mapped_libraries()
    with load(path) as policy:
        policy.act(_observations(compiled[0], 4))
        assert _mapped_libraries() > before
    gc.collect()
    assert _mapped_libraries() == before
    with pytest.raises(ValueError, match="closed"):
        policy.act(_observations(compiled[0], 4))


def test_an_artifact_without_entry_points_still_runs_through_the_vm(compiled, tmp_path):
    """Artifacts written before entry points: numpy prepares and post-processes, the VM runs main."""
    case, path = compiled
    old = tmp_path / "old.bitrl"
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(old, "w") as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename == "manifest.json":
                import json

                manifest = json.loads(data)
                for key in ("entry_points", "vm_params", "batch"):
                    manifest.pop(key)
                manifest["params"] = [p for p in manifest["params"] if p.startswith("p")]
                data = json.dumps(manifest).encode()
                manifest_text = data
            if item.filename == "manifest.sha256":
                continue
            out.writestr(item, data)
        out.writestr("manifest.sha256", hashlib.sha256(manifest_text).hexdigest() + "\n")
    obs = _observations(case)
    new, legacy = load(path), load(old)
    np.testing.assert_array_equal(legacy.forward(obs), new.forward(obs))
    np.testing.assert_array_equal(legacy.act(obs), postprocess(new.output_spec, new.forward(obs)))
