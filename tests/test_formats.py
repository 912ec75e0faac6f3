"""Formats (issue 15): --env applies to every format, bounded dynamic batches compile, what cannot run is refused
at compile, activations that read their input twice keep one layer each, and the compile runs every artifact once
against the numpy reference before writing it."""

import numpy as np
import pytest
import torch
from torch import nn

from bitrl_compile import pipeline, reference
from bitrl_compile.frontends import load_policy
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime import load
from relax_models import LAST_TOKEN_INPUT, LastToken

DYNAMIC = ({0: torch.export.Dim("batch")},)


def actor(n_in: int = 3, n_out: int = 1, act: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 32), act or nn.Tanh(), nn.Linear(32, 32), act or nn.Tanh(),
                         nn.Linear(32, n_out)).eval()


def save(module: nn.Module, path, fmt: str, n_in: int = 3, dynamic_shapes=DYNAMIC):
    """`module` saved as a .pt2 program, a TorchScript archive or an ONNX graph, the way users export them."""
    x = torch.zeros(2, n_in)
    if fmt == "pt2":
        torch.export.save(torch.export.export(module, (x,), dynamic_shapes=dynamic_shapes), path)
    elif fmt == "torchscript":
        torch.jit.script(module).save(str(path))
    else:
        torch.onnx.export(module, (x[:1],), str(path), dynamo=False, input_names=["obs"], output_names=["out"],
                          dynamic_axes={"obs": {0: "batch"}, "out": {0: "batch"}})
    return path


SUFFIX = {"pt2": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}


# ---------------------------------------------------------------- --env for every format

@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx"])
def test_env_defines_a_continuous_output_for_every_format(tmp_path, fmt):
    path = save(actor(), tmp_path / f"pendulum{SUFFIX[fmt]}", fmt)
    loaded = load_policy(path, config={"env": "Pendulum-v1"})
    assert loaded.output == {"kind": "continuous", "shape": [1], "low": [-2.0], "high": [2.0], "squash": "clip",
                             "log_std": None}
    assert loaded.input["shape"] == [3]
    squashed = load_policy(path, config={"env": "Pendulum-v1", "output": {"squash": "tanh"}})
    assert squashed.output["squash"] == "tanh" and squashed.output["high"] == [2.0]


def test_env_discrete_action_space_and_one_hot_observations(tmp_path):
    path = save(actor(16, 4, nn.ReLU()), tmp_path / "frozenlake.pt2", "pt2", n_in=16)
    loaded = load_policy(path, config={"env": "FrozenLake-v1"})
    assert loaded.output == {"kind": "discrete", "n": 4, "outputs": "logits"}
    assert loaded.input["preprocess"] == "onehot" and loaded.input["n"] == 16


def test_continuous_actor_compiled_with_env_runs_in_the_box(tmp_path):
    path = save(actor(), tmp_path / "pendulum.pt2", "pt2")
    result = pipeline.compile_policy(load_policy(path, config={"env": "Pendulum-v1"}), "host", tmp_path / "p.bitrl")
    policy = load(result.path)
    x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32) * 5
    mean = reference.run(result.quantized, x)
    actions = policy.act(x)
    assert actions.shape == (32, 1) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, np.clip(mean, -2, 2), rtol=1e-5, atol=2e-3)
    assert policy.act(x[0]).shape == (1,)  # one Pendulum action, not a discrete index


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_env_whose_action_size_differs_is_refused_with_the_fix(tmp_path, fmt):
    path = save(actor(n_out=3), tmp_path / f"three{SUFFIX[fmt]}", fmt)
    with pytest.raises(ModelLoadError, match=r"the network outputs 3 values and Pendulum-v1's action space is "
                                             r"Box\(1,\); give the right --env, or a config with \"output\""):
        load_policy(path, config={"env": "Pendulum-v1"})


def test_env_whose_observation_shape_differs_is_refused(tmp_path):
    path = save(actor(), tmp_path / "pendulum.pt2", "pt2")
    with pytest.raises(ModelLoadError, match=r"takes observations of shape \[3\] and CartPole-v1's observation "
                                             r"space is Box\(4,\); give the right --env"):
        load_policy(path, config={"env": "CartPole-v1"})


def test_env_that_contradicts_an_sb3_file_is_refused(sb3_ppo_cartpole):
    with pytest.raises(ModelLoadError, match=r"action space \(Discrete\(2\)\) is not Pendulum-v1's \(Box\(1,\)\)"):
        load_policy(sb3_ppo_cartpole, config={"env": "Pendulum-v1"})
    assert load_policy(sb3_ppo_cartpole, config={"env": "CartPole-v1"}).output["n"] == 2


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_one_output_without_env_is_not_a_one_action_discrete_policy(tmp_path, fmt):
    path = save(actor(), tmp_path / f"pendulum{SUFFIX[fmt]}", fmt)
    with pytest.raises(ModelLoadError, match=r"outputs 1 value and the file does not say what it means.*give "
                                             r"--env ENV_ID, or a config with \"output\""):
        load_policy(path)


def test_unknown_environment_id_is_one_line(tmp_path):
    path = save(actor(), tmp_path / "pendulum.pt2", "pt2")
    with pytest.raises(ModelLoadError, match=r"unknown environment 'Pendulum-v9' .*gymnasium id") as e:
        load_policy(path, config={"env": "Pendulum-v9"})
    assert "\n" not in str(e.value)


class TwoHeads(nn.Module):
    """An actor-critic whose forward returns (logits, value): not one tensor."""

    def __init__(self):
        super().__init__()
        self.pi, self.v = nn.Linear(4, 2), nn.Linear(4, 1)

    def forward(self, x):
        return self.pi(x), self.v(x)


def test_forward_returning_a_tuple_names_the_fix(tmp_path):
    save(TwoHeads().eval(), tmp_path / "two.pt2", "pt2", n_in=4)
    with pytest.raises(ModelLoadError, match=r"returns a tuple of 2 outputs \(\[0\] \[2, 2\], \[1\] \[2, 1\]\).*"
                                             r"forward\(x\)\[0\]"):
        load_policy(tmp_path / "two.pt2")


def test_torchscript_returning_a_tuple_names_the_fix(tmp_path):
    """The TorchScript conversion check compared the two outputs with torch.allclose, a TypeError on tuples."""
    save(TwoHeads().eval(), tmp_path / "two.pt", "torchscript", n_in=4)
    with pytest.raises(ModelLoadError, match=r"of 2 outputs .*forward\(x\)\[0\]") as e:
        load_policy(tmp_path / "two.pt")
    assert "\n" not in str(e.value)


BAD_SPEC_CONFIGS = [  # the config's "input"/"output"/"obs_shape" hold anything JSON does
    ("output shape int", {"output": {"kind": "continuous", "shape": 5}}, "the output spec is malformed (TypeError"),
    ("output n word", {"output": {"kind": "discrete", "n": "two"}}, "the output spec is malformed (ValueError"),
    ("output low dict", {"output": {"kind": "continuous", "shape": [2], "low": {"a": 1}, "high": [1]}},
     "the output spec is malformed (TypeError"),
    ("output list", {"output": [1]}, "config \"output\" must be an object"),
    ("input str", {"input": "x"}, "config \"input\" must be an object"),
    ("input shape str", {"input": {"shape": "ab"}}, "the input spec is malformed (ValueError"),
    ("normalize no var", {"input": {"normalize": {"mean": [0.0] * 3}}}, "the input spec is malformed (KeyError"),
    ("normalize int", {"input": {"normalize": 5}}, "the input spec is malformed (TypeError"),
    ("obs_shape str", {"obs_shape": "ab"}, "config: \"obs_shape\" must be a non-empty list"),
    ("obs_shape negative", {"obs_shape": [-3]}, "config: \"obs_shape\" must be a non-empty list"),
]


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx"])
@pytest.mark.parametrize(("case", "config", "fragment"), BAD_SPEC_CONFIGS, ids=[c[0] for c in BAD_SPEC_CONFIGS])
def test_malformed_config_specs_are_refused_in_one_line(tmp_path_factory, fmt, case, config, fragment):
    folder = tmp_path_factory.getbasetemp() / "bad_spec_models"
    folder.mkdir(exist_ok=True)
    path = folder / f"actor{SUFFIX[fmt]}"
    if not path.exists():
        save(actor(n_out=2), path, fmt)
    with pytest.raises(ModelLoadError) as e:
        load_policy(path, config=config)
    assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)


def test_pt2_whose_weights_config_is_not_an_object_is_refused(tmp_path):
    """torch.export writes *_weights_config.json as an object; a list there was an AttributeError."""
    import zipfile

    good = save(actor(), tmp_path / "good.pt2", "pt2")
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, b"[1]" if name.endswith("_weights_config.json") else zin.read(name))
    with pytest.raises(ModelLoadError, match=r"is not the JSON torch.export writes \(AttributeError") as e:
        load_policy(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- bounded dynamic batch

def test_pt2_with_a_bounded_dynamic_batch_compiles_and_records_the_bound(tmp_path):
    m = actor(4, 2, nn.ReLU())
    bounded = {"input": {0: torch.export.Dim("batch", min=1, max=64)}}
    loaded = load_policy(save(m, tmp_path / "bounded.pt2", "pt2", n_in=4, dynamic_shapes=bounded))
    assert loaded.input["max_batch"] == 64
    result = pipeline.compile_policy(loaded, "host", tmp_path / "b.bitrl")
    assert result.manifest["batch"] == {"min": 1, "max": 64}
    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    np.testing.assert_array_equal(load(result.path).forward(x), reference.run(result.quantized, x))


def test_pt2_whose_batch_cannot_be_one_is_refused(tmp_path):
    at_least_two = {"input": {0: torch.export.Dim("batch", min=2, max=64)}}
    path = save(actor(4, 2, nn.ReLU()), tmp_path / "b2.pt2", "pt2", n_in=4, dynamic_shapes=at_least_two)
    with pytest.raises(ModelLoadError, match=r"accepts batches of 2 or more.*Dim\('batch', min=1"):
        load_policy(path)


# ---------------------------------------------------------------- what cannot run is refused at compile

def test_conv_layers_are_refused_at_compile_naming_the_op(tmp_path):
    """Conv2d compiles (tests/test_bitconv.py); a Conv1d is refused, naming the op, from torch and from ONNX."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 2)).eval()
    torch.export.save(torch.export.export(cnn, (torch.zeros(2, 1, 16),), dynamic_shapes=DYNAMIC),
                      tmp_path / "cnn1d.pt2")
    with pytest.raises(pipeline.CompileError, match=r"Conv1d \(conv1d.default, .*is not supported yet: the "
                                                    r"compiled artifact would not run; see issue 17"):
        pipeline.compile_policy(load_policy(tmp_path / "cnn1d.pt2"), "host", tmp_path / "cnn.bitrl")
    torch.onnx.export(cnn, (torch.zeros(1, 1, 16),), str(tmp_path / "cnn.onnx"), dynamo=False)
    with pytest.raises(pipeline.CompileError, match=r"ONNX Conv .*kernel \[3\]\) is not supported yet"):
        pipeline.compile_policy(load_policy(tmp_path / "cnn.onnx"), "host", tmp_path / "cnn.bitrl")
    assert not (tmp_path / "cnn.bitrl").exists()


def test_an_artifact_that_disagrees_with_the_reference_is_not_written(tmp_path):
    """TVM 0.27 lowers x[:, -1] to take(x, -1, mode="fast"), which reads out of bounds: the artifact computes
    something else than the reference, and the compile refuses it (before, it wrote it with exit 0)."""
    loaded = LoadedPolicy(LastToken().eval(), None, LAST_TOKEN_INPUT, {"kind": "discrete", "n": 2, "outputs": "logits"},
                          "test")
    with pytest.raises(pipeline.CompilerBug, match="disagrees with the numpy reference .*nothing was written"):
        pipeline.compile_policy(loaded, "host", tmp_path / "last.bitrl")
    assert list(tmp_path.iterdir()) == []


def test_specs_are_checked_before_compiling(tmp_path):
    spec = {"shape": [3], "dtype": "float32", "preprocess": "none", "normalize": None}
    inverted = {"kind": "continuous", "shape": [1], "low": [2.0], "high": [-2.0], "squash": "clip", "log_std": None}
    with pytest.raises(pipeline.CompileError, match="action bounds must be finite with low <= high"):
        pipeline.compile_policy(LoadedPolicy(actor(), None, spec, inverted, "test"), "host", tmp_path / "x.bitrl")
    three = {"kind": "discrete", "n": 3, "outputs": "logits"}  # a network of 1 output
    with pytest.raises(pipeline.CompileError, match="the output spec says 3 actions but the network outputs 1"):
        pipeline.compile_policy(LoadedPolicy(actor(), None, spec, three, "test"), "host", tmp_path / "x.bitrl")
    assert not (tmp_path / "x.bitrl").exists()


# ---------------------------------------------------------------- activations that read their input twice

@pytest.mark.parametrize("act", [nn.ELU(), nn.SiLU(), nn.GELU("tanh"), nn.Mish(), nn.LeakyReLU(), nn.GELU()],
                         ids=["elu", "silu", "gelu_tanh", "mish", "leaky_relu", "gelu"])
def test_each_linear_layer_is_ternarized_once(act):
    loaded = LoadedPolicy(actor(4, 2, act), None, {"shape": [4], "preprocess": "none"}, {}, "test")
    quantized = pipeline.passes(None, None, until=pipeline.QUANTIZED)(pipeline.to_relax(loaded))
    assert [(la["in"], la["out"]) for la in pipeline.bitlinear_layers(quantized)] == [(4, 32), (32, 32), (32, 2)]
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    assert np.isfinite(reference.run(quantized, x)).all()  # the reference knows every op of these activations


@pytest.mark.parametrize("act", [nn.ELU(), nn.SiLU()], ids=["elu", "silu"])
def test_elu_and_silu_policies_compile_to_one_layer_each_and_match_the_reference(tmp_path, act):
    path = save(actor(4, 2, act), tmp_path / "p.pt2", "pt2", n_in=4)
    result = pipeline.compile_policy(load_policy(path), "host", tmp_path / "p.bitrl")
    layers = result.manifest["layers"]
    assert [(la["in"], la["out"]) for la in layers] == [(4, 32), (32, 32), (32, 2)]
    assert all(la["weight_bits_per_param"] < 2 for la in layers)
    n_weights = result.manifest["stats"]["ternary_weights"]
    assert n_weights == 4 * 32 + 32 * 32 + 32 * 2  # counted once (twice before: 3.3 bits per weight)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    expected = reference.run(result.quantized, x)
    got = load(result.path).forward(x)
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)
