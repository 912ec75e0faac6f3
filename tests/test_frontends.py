"""Every policy format loads into a module whose actions equal the original policy's, and bad files fail clearly."""

from __future__ import annotations

import base64
import io
import itertools
import json
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bitrl_compile.frontends import load_policy, save_mlp_policy
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime.policy import postprocess

DEMO = Path(__file__).resolve().parents[1] / "bitrl_compile" / "examples" / "cartpole_ppo.safetensors"


def run(loaded: LoadedPolicy, x: np.ndarray) -> np.ndarray:
    """The loaded network on prepared observations (one-hot / normalised already)."""
    if loaded.module is None:
        import onnxruntime as ort

        sess = ort.InferenceSession(loaded.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    with torch.no_grad():
        return loaded.module(torch.as_tensor(x, dtype=torch.float32)).numpy()


def act(loaded: LoadedPolicy, x: np.ndarray) -> np.ndarray:
    """Deterministic actions, post-processed by the runtime's own code from the output spec."""
    return postprocess(loaded.output, run(loaded, x))


def assert_exports_with_dynamic_batch(loaded: LoadedPolicy, x: np.ndarray) -> None:
    """What the pipeline does with every module: eval(), then torch.export with a dynamic batch."""
    ep = torch.export.export(loaded.module.eval(), (torch.as_tensor(x[:2]),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    np.testing.assert_allclose(ep.module()(torch.as_tensor(x)).detach().numpy(), run(loaded, x), rtol=1e-6, atol=1e-6)


def mlp(sizes, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += ([act()] if i else []) + [nn.Linear(a, b)]
    return nn.Sequential(*layers).eval()


class Evil:
    """Unpickling this creates a file: proof that a pickle was (or was not) executed."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


# ---------------------------------------------------------------- Stable-Baselines3

@pytest.mark.parametrize("algo, kwargs, source, activation", [
    ("ppo", {}, "sb3-ppo", "tanh"),
    ("ppo", {"policy_kwargs": {"activation_fn": nn.ReLU, "net_arch": [32, 16]}}, "sb3-ppo", "relu"),
    ("a2c", {}, "sb3-a2c", "tanh"),
    ("dqn", {}, "sb3-dqn", "relu"),
])
def test_sb3_discrete_policy_matches_predict(sb3_trained, cartpole_obs, algo, kwargs, source, activation):
    model, path = sb3_trained(algo, "CartPole-v1", **kwargs)
    loaded = load_policy(path)
    assert loaded.source == source and loaded.module.activation == activation
    assert loaded.input == {"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None}
    expected, _ = model.predict(cartpole_obs, deterministic=True)
    np.testing.assert_array_equal(act(loaded, cartpole_obs), expected)
    obs_t = torch.as_tensor(cartpole_obs)
    with torch.no_grad():
        if algo == "dqn":
            assert loaded.output == {"kind": "discrete", "n": 2, "outputs": "q_values"}
            ref = model.q_net(obs_t).numpy()
            np.testing.assert_allclose(run(loaded, cartpole_obs), ref, rtol=1e-5, atol=1e-6)
        else:
            assert loaded.output == {"kind": "discrete", "n": 2, "outputs": "logits"}
            ref = model.policy.get_distribution(obs_t).distribution.logits.numpy()
            got = torch.log_softmax(torch.as_tensor(run(loaded, cartpole_obs)), -1).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert_exports_with_dynamic_batch(loaded, cartpole_obs)


@pytest.mark.parametrize("algo, source, squash", [("ppo", "sb3-ppo", "clip"), ("sac", "sb3-sac", "tanh"),
                                                  ("td3", "sb3-td3", "tanh")])
def test_sb3_box_policy_matches_predict(sb3_trained, algo, source, squash):
    model, path = sb3_trained(algo, "Pendulum-v1", policy_kwargs={"net_arch": [32, 32]})
    loaded = load_policy(path)
    assert loaded.source == source
    assert loaded.output["kind"] == "continuous" and loaded.output["squash"] == squash
    assert loaded.output["shape"] == [1] and loaded.output["low"] == [-2.0] and loaded.output["high"] == [2.0]
    obs = np.random.default_rng(0).uniform([-1, -1, -8], [1, 1, 8], size=(64, 3)).astype(np.float32)
    obs[:, 2] *= 3  # push some actions beyond the bounds so that clipping / squashing matters
    expected, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(act(loaded, obs), expected, rtol=1e-5, atol=1e-5)
    if algo == "ppo":
        np.testing.assert_allclose(loaded.output["log_std"], model.policy.log_std.detach().numpy(), rtol=1e-6)
    assert_exports_with_dynamic_batch(loaded, obs)


def test_sb3_discrete_observations_are_one_hot(sb3_trained):
    model, path = sb3_trained("a2c", "FrozenLake-v1")
    loaded = load_policy(path)
    assert loaded.input["preprocess"] == "onehot" and loaded.input["n"] == 16 and loaded.input["shape"] == [16]
    states = np.arange(16)
    expected, _ = model.predict(states, deterministic=True)
    np.testing.assert_array_equal(act(loaded, np.eye(16, dtype=np.float32)[states]), expected)


def test_sb3_image_observations_are_scaled_and_cnn_policies_refused(tmp_path):
    import gymnasium as gym
    from stable_baselines3 import PPO

    class ImageEnv(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (36, 36, 3), np.uint8)
        action_space = gym.spaces.Discrete(3)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    model = PPO("MlpPolicy", ImageEnv(), seed=0, policy_kwargs={"net_arch": [16]})
    model.save(tmp_path / "mlp.zip")
    loaded = load_policy(tmp_path / "mlp.zip")
    assert loaded.input["preprocess"] == "image" and loaded.input["shape"] == [3, 36, 36]  # SB3 stores CHW
    images = np.random.default_rng(0).integers(0, 256, (8, 36, 36, 3), dtype=np.uint8)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_array_equal(act(loaded, x), model.predict(images, deterministic=True)[0])
    PPO("CnnPolicy", ImageEnv(), seed=0).save(tmp_path / "cnn.zip")  # loads (tests/test_bitconv.py): the env's HWC
    assert load_policy(tmp_path / "cnn.zip").input["shape"] == [36, 36, 3]


def _rewrite_zip(src: Path, dst: Path, **members: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, members.get(name.replace(".", "_"), zin.read(name)))
    return dst


def test_sb3_data_pickles_are_never_executed(sb3_trained, tmp_path):
    path = sb3_trained("ppo", "CartPole-v1", policy_kwargs={"activation_fn": nn.ReLU, "net_arch": [32, 16]}).path
    marker = tmp_path / "pwned"
    data = json.loads(zipfile.ZipFile(path).read("data"))
    evil = base64.b64encode(pickle.dumps({"x": Evil(marker)})).decode()
    for key in ("policy_kwargs", "observation_space", "_last_obs", "lr_schedule"):
        data[key][":serialized:"] = evil
    data["policy_kwargs"][":serialized:"] = base64.b64encode(
        pickle.dumps({"activation_fn": nn.ReLU, "hook": Evil(marker)})).decode()
    bad = _rewrite_zip(path, tmp_path / "evil_data.zip", data=json.dumps(data).encode())
    loaded = load_policy(bad)
    assert not marker.exists()
    assert loaded.module.activation == "relu"  # the class was still found, statically
    buf = io.BytesIO()
    torch.save({"w": Evil(marker)}, buf)
    bad_pth = _rewrite_zip(path, tmp_path / "evil_pth.zip", policy_pth=buf.getvalue())
    with pytest.raises(ModelLoadError, match="trust-pickle"):
        load_policy(bad_pth)
    assert not marker.exists()


@pytest.fixture(scope="module")
def vecnormalized_ppo(tmp_path_factory):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    root = tmp_path_factory.mktemp("vecnorm")
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0), clip_obs=5.0)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0).learn(128)
    (root / "run").mkdir()
    model.save(root / "run" / "model.zip")
    env.save(root / "run" / "vecnormalize.pkl")
    return model, env, root / "run"


def test_vecnormalize_pickle_needs_trust_and_json_is_equivalent(vecnormalized_ppo, cartpole_obs, tmp_path):
    model, env, run_dir = vecnormalized_ppo
    with pytest.warns(UserWarning, match="vecnormalize"):
        load_policy(run_dir / "model.zip")
    with pytest.raises(ModelLoadError, match="trust-pickle"):
        load_policy(run_dir / "model.zip", vecnormalize=str(run_dir / "vecnormalize.pkl"))
    trusted = load_policy(run_dir / "model.zip", vecnormalize=str(run_dir / "vecnormalize.pkl"), trust_pickle=True)
    stats = {"mean": env.obs_rms.mean.tolist(), "var": env.obs_rms.var.tolist(), "clip_obs": env.clip_obs,
             "epsilon": env.epsilon}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    np.savez(tmp_path / "stats.npz", **stats)
    for source in (tmp_path / "stats.json", tmp_path / "stats.npz"):
        assert load_policy(run_dir / "model.zip", vecnormalize=str(source)).input == trusted.input
    norm = trusted.input["normalize"]
    assert norm["clip"] == 5.0
    x = np.clip((cartpole_obs - np.float32(norm["mean"])) / np.sqrt(np.float32(norm["var"]) + np.float32(norm["eps"])),
                -norm["clip"], norm["clip"])
    np.testing.assert_allclose(x, env.normalize_obs(cartpole_obs), rtol=1e-5, atol=1e-6)
    expected, _ = model.predict(env.normalize_obs(cartpole_obs), deterministic=True)
    np.testing.assert_array_equal(act(trusted, x.astype(np.float32)), expected)


def test_sb3_zip_says_it_was_trained_under_vecnormalize(vecnormalized_ppo, tmp_path):
    """The zip alone says so (PPO/A2C keep `_last_original_obs` only under VecNormalize); statistics files with
    other names than vecnormalize.pkl, beside the model or one folder down, are named in the warning."""
    _, _, run_dir = vecnormalized_ppo
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run_dir / "model.zip", alone / "model.zip")
    with pytest.warns(UserWarning, match=r"trained inside a VecNormalize .*env\.save"):
        load_policy(alone / "model.zip")
    renamed = tmp_path / "renamed"
    (renamed / "stats").mkdir(parents=True)
    shutil.copy(run_dir / "model.zip", renamed / "model.zip")
    shutil.copy(run_dir / "vecnormalize.pkl", renamed / "stats" / "CartPole-v1_vec_normalize.pkl")
    with pytest.warns(UserWarning, match=r"found .*stats/CartPole-v1_vec_normalize\.pkl: pass --vecnormalize"):
        load_policy(renamed / "model.zip")


def test_vecnormalize_warnings_follow_what_the_zip_records(sb3_ppo_cartpole, sb3_trained, tmp_path):
    """A PPO zip trained without VecNormalize: a stale statistics file beside it is no reason to warn. DQN fills
    `_last_original_obs` either way, so the zip cannot tell: a statistics file beside it (any name) is named."""
    shutil.copy(sb3_ppo_cartpole, tmp_path / "model.zip")
    (tmp_path / "vecnormalize.pkl").write_bytes(b"stale")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_policy(tmp_path / "model.zip")
    dqn = tmp_path / "dqn"
    dqn.mkdir()
    shutil.copy(sb3_trained("dqn", "CartPole-v1").path, dqn / "model.zip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_policy(dqn / "model.zip")
    (dqn / "vec_normalize.pkl").write_bytes(b"stats")
    with pytest.warns(UserWarning, match=r"found .*dqn/vec_normalize\.pkl: the policy was probably trained"):
        load_policy(dqn / "model.zip")


def test_malicious_vecnormalize_pickle_is_not_executed(sb3_ppo_cartpole, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "vecnormalize.pkl"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(ModelLoadError, match="trust-pickle"):
        load_policy(sb3_ppo_cartpole, vecnormalize=str(evil))
    assert not marker.exists()


# ---------------------------------------------------------------- CleanRL

class CleanRLPPOAgent(nn.Module):  # the key layout of CleanRL's ppo.py Agent
    def __init__(self, n_obs, n_act):
        super().__init__()
        self.critic = mlp([n_obs, 64, 64, 1], seed=1)
        self.actor = mlp([n_obs, 64, 64, n_act], seed=2)


class CleanRLContinuousAgent(nn.Module):  # ppo_continuous_action.py
    def __init__(self, n_obs, n_act):
        super().__init__()
        self.critic = mlp([n_obs, 64, 64, 1], seed=3)
        self.actor_mean = mlp([n_obs, 64, 64, n_act], seed=4)
        self.actor_logstd = nn.Parameter(torch.full((1, n_act), -0.5))


class CleanRLQNetwork(nn.Module):  # dqn.py
    def __init__(self, n_obs, n_act):
        super().__init__()
        self.network = mlp([n_obs, 120, 84, n_act], nn.ReLU, seed=5)


@pytest.mark.parametrize("agent_cls, head, source, config", [
    (CleanRLPPOAgent, "actor", "cleanrl-ppo", {"env": "CartPole-v1"}),
    (CleanRLPPOAgent, "actor", "cleanrl-ppo", None),
    (CleanRLQNetwork, "network", "cleanrl-dqn", {"env": "CartPole-v1"}),
])
def test_cleanrl_discrete_agents(tmp_path, cartpole_obs, agent_cls, head, source, config):
    agent = agent_cls(4, 2)
    torch.save(agent.state_dict(), tmp_path / "agent.cleanrl_model")
    loaded = load_policy(tmp_path / "agent.cleanrl_model", config=config)
    assert loaded.source == source and loaded.output["n"] == 2
    assert loaded.output["outputs"] == ("q_values" if head == "network" else "logits")
    with torch.no_grad():
        ref = getattr(agent, head)(torch.as_tensor(cartpole_obs)).numpy()
    np.testing.assert_allclose(run(loaded, cartpole_obs), ref, rtol=1e-6, atol=1e-6)
    assert_exports_with_dynamic_batch(loaded, cartpole_obs)


def test_cleanrl_continuous_agent_needs_bounds_and_warns_about_normalisation(tmp_path):
    agent = CleanRLContinuousAgent(3, 1)
    torch.save(agent.state_dict(), tmp_path / "agent.pt")
    with pytest.raises(ModelLoadError, match="action bounds"):
        load_policy(tmp_path / "agent.pt")
    with pytest.warns(UserWarning, match="NormalizeObservation"):
        loaded = load_policy(tmp_path / "agent.pt", config={"env": "Pendulum-v1"})
    assert loaded.output == {"kind": "continuous", "shape": [1], "low": [-2.0], "high": [2.0], "squash": "clip",
                             "log_std": [-0.5]}
    obs = np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32) * 3
    with torch.no_grad():
        mean = agent.actor_mean(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(act(loaded, obs), np.clip(mean, -2, 2), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- state_dict + config, safetensors

CONFIG = {"arch": "mlp", "obs_shape": [4], "hidden": [16, 8], "activation": "relu",
          "output": {"kind": "discrete", "n": 2, "outputs": "logits"}}


def test_state_dict_with_config_dict_or_json_file(tmp_path, cartpole_obs):
    net = mlp([4, 16, 8, 2], nn.ReLU)
    torch.save({f"net.{k}": v for k, v in net.state_dict().items()}, tmp_path / "policy.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    for config in (CONFIG, str(tmp_path / "config.json")):
        loaded = load_policy(tmp_path / "policy.pt", config=config)
        assert loaded.source == "state-dict"
        np.testing.assert_allclose(run(loaded, cartpole_obs), net(torch.as_tensor(cartpole_obs)).detach().numpy(),
                                   rtol=1e-6, atol=1e-6)
    torch.save(net.state_dict(), tmp_path / "bare.pt")  # keys 0.weight, ...: a bare nn.Sequential
    assert load_policy(tmp_path / "bare.pt", config=CONFIG).output["n"] == 2
    with pytest.raises(ModelLoadError, match="config"):
        load_policy(tmp_path / "policy.pt")


def test_save_mlp_policy_round_trip_keeps_specs(tmp_path, cartpole_obs):
    net = mlp([4, 16, 8, 2], nn.ReLU)
    config = {**CONFIG, "input": {"shape": [4], "normalize": {"mean": [0.0, 0.1, 0.0, 0.2], "var": [1, 2, 1, 2],
                                                             "eps": 1e-8, "clip": 10.0}}}
    save_mlp_policy(tmp_path / "p.safetensors", net, config)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left behind
    loaded = load_policy(tmp_path / "p.safetensors")
    assert loaded.input["normalize"]["clip"] == 10.0 and loaded.input["normalize"]["var"] == [1, 2, 1, 2]
    assert loaded.output == CONFIG["output"] and loaded.module.activation == "relu"
    np.testing.assert_allclose(run(loaded, cartpole_obs), net(torch.as_tensor(cartpole_obs)).detach().numpy(),
                               rtol=1e-6, atol=1e-6)
    assert_exports_with_dynamic_batch(loaded, cartpole_obs)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("net.2.bias"), "missing: net.2.bias"),
    (lambda sd: sd.update({"net.9.weight": torch.zeros(2, 2)}), "unexpected: net.9.weight"),
    (lambda sd: sd.update({"net.2.weight": torch.zeros(8, 15)}), r"mis-shaped: net.2.weight \(8, 15\)"),
    (lambda sd: sd["net.4.weight"].__setitem__((0, 0), float("nan")), "net.4.weight contains NaN"),
])
def test_state_dict_that_does_not_match_is_rejected(tmp_path, edit, message):
    sd = {f"net.{k}": v.clone() for k, v in mlp([4, 16, 8, 2], nn.ReLU).state_dict().items()}
    edit(sd)
    torch.save(sd, tmp_path / "p.pt")
    with pytest.raises(ModelLoadError, match=message):
        load_policy(tmp_path / "p.pt", config=CONFIG)


def test_config_output_spec_must_match_the_network(tmp_path):
    torch.save(CleanRLPPOAgent(4, 2).state_dict(), tmp_path / "agent.pt")
    with pytest.raises(ModelLoadError, match="3 actions but the network outputs 2"):
        load_policy(tmp_path / "agent.pt", config={"output": {"kind": "discrete", "n": 3}})
    save_mlp_policy(tmp_path / "p.safetensors", mlp([4, 16, 8, 2], nn.ReLU), CONFIG)
    with pytest.raises(ModelLoadError, match=r"mis-shaped: net.4.weight \(2, 8\) \(expected \(3, 8\)\)"):
        load_policy(tmp_path / "p.safetensors", config={"output": {"kind": "discrete", "n": 3}})


# ---------------------------------------------------------------- torch.export, TorchScript, ONNX, pickle

class FlatPolicy(nn.Module):
    """A non-Sequential policy with a 2-D observation: exercises real graph capture."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 16), nn.Linear(16, 2)

    def forward(self, x):
        return torch.tanh(self.head(torch.relu(self.body(x.flatten(1)))))


OBS23 = np.random.default_rng(2).normal(size=(5, 2, 3)).astype(np.float32)


@pytest.mark.parametrize("batch", ["dynamic", "static"])
def test_torch_export_program(tmp_path, batch):
    m = FlatPolicy().eval()
    x = torch.as_tensor(OBS23)
    if batch == "dynamic":
        ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        ep = torch.export.export(m, (x[:1],))
    torch.export.save(ep, tmp_path / "p.pt2")
    loaded = load_policy(tmp_path / "p.pt2", config={"output": {"kind": "continuous", "low": [-1, -1],
                                                                 "high": [1, 1], "squash": "none"}})
    assert loaded.source == "torch-export" and loaded.input["shape"] == [2, 3]
    np.testing.assert_allclose(run(loaded, OBS23), m(x).detach().numpy(), rtol=1e-6, atol=1e-6)
    assert_exports_with_dynamic_batch(loaded, OBS23)


def test_torch_export_program_with_pickled_member_needs_trust(tmp_path):
    m = FlatPolicy().eval()
    torch.export.save(torch.export.export(m, (torch.as_tensor(OBS23),)), tmp_path / "p.pt2")
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"x": Evil(marker)}, buf)
    with zipfile.ZipFile(tmp_path / "p.pt2") as zin, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, buf.getvalue() if "sample_inputs" in name else zin.read(name))
    with pytest.raises(ModelLoadError, match="trust-pickle"):
        load_policy(tmp_path / "evil.pt2")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_converted_to_an_exportable_module(tmp_path, how):
    m = FlatPolicy().eval()
    x = torch.as_tensor(OBS23)
    sm = torch.jit.script(m) if how == "script" else torch.jit.trace(m, x[:1])
    sm.save(str(tmp_path / "p.pt"))
    loaded = load_policy(tmp_path / "p.pt", config={"obs_shape": [2, 3]})
    assert loaded.source == "torchscript"
    np.testing.assert_allclose(run(loaded, OBS23), m(x).detach().numpy(), rtol=1e-6, atol=1e-6)
    assert_exports_with_dynamic_batch(loaded, OBS23)


@pytest.mark.parametrize("dynamic", [True, False])
def test_onnx_model(tmp_path, cartpole_obs, dynamic):
    net = mlp([4, 32, 2])
    torch.onnx.export(net, (torch.as_tensor(cartpole_obs[:1]),), str(tmp_path / "p.onnx"), dynamo=False,
                      input_names=["obs"], output_names=["logits"],
                      dynamic_axes={"obs": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None)
    with pytest.warns(UserWarning, match="fixed batch size") if not dynamic else _no_warning():
        loaded = load_policy(tmp_path / "p.onnx")
    assert loaded.source == "onnx" and loaded.module is None
    assert loaded.input["shape"] == [4] and loaded.output == {"kind": "discrete", "n": 2, "outputs": "logits"}
    np.testing.assert_allclose(run(loaded, cartpole_obs), net(torch.as_tensor(cartpole_obs)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_pickled_module_needs_trust_pickle(tmp_path, cartpole_obs):
    net = mlp([4, 32, 2])
    torch.save(net, tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load_policy(tmp_path / "model.pt")
    loaded = load_policy(tmp_path / "model.pt", trust_pickle=True)
    assert loaded.source == "pickle"
    np.testing.assert_allclose(run(loaded, cartpole_obs), net(torch.as_tensor(cartpole_obs)).detach().numpy())
    assert_exports_with_dynamic_batch(loaded, cartpole_obs)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_not_executed_without_trust(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    if fmt == "torch.save":
        torch.save(Evil(marker), path)
    else:
        path.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(ModelLoadError, match="pickled code"):
        load_policy(path)
    assert not marker.exists()
    with pytest.raises(ModelLoadError):  # trusted: the payload runs (proof the test is live), then it is no policy
        load_policy(path, trust_pickle=True)
    assert marker.exists()


# ---------------------------------------------------------------- files of the wrong kind

def _truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def test_wrong_or_damaged_files_raise_one_line_errors(tmp_path, sb3_ppo_cartpole):
    png = tmp_path / "policy.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    save_mlp_policy(tmp_path / "p.safetensors", mlp([4, 16, 8, 2], nn.ReLU), CONFIG)
    net = mlp([4, 8, 2])
    torch.onnx.export(net, (torch.zeros(1, 4),), str(tmp_path / "p.onnx"), dynamo=False)
    cases = {
        png: "PNG image",
        text: "unrecognised file format",
        tmp_path / "missing.zip": "no such file",
        _truncate(sb3_ppo_cartpole, tmp_path / "cut.zip"): "corrupt zip",
        _truncate(tmp_path / "p.safetensors", tmp_path / "cut.safetensors", 0.8): "corrupt or truncated safetensors",
        _truncate(tmp_path / "p.onnx", tmp_path / "cut.onnx", 0.6): "not a valid ONNX model",
    }
    for path, message in cases.items():
        with pytest.raises(ModelLoadError, match=message) as err:
            load_policy(path)
        assert "\n" not in str(err.value) and str(path.name) in str(err.value)


def test_bad_config_is_reported(tmp_path):
    save_mlp_policy(tmp_path / "p.safetensors", mlp([4, 16, 8, 2], nn.ReLU), CONFIG)
    with pytest.raises(ModelLoadError, match="not readable JSON"):
        load_policy(tmp_path / "p.safetensors", config=str(tmp_path / "nope.json"))
    with pytest.raises(ModelLoadError, match="squash"):
        load_policy(tmp_path / "p.safetensors", config={"output": {"kind": "continuous", "shape": [2], "low": [-1],
                                                                    "high": [1], "squash": "sigmoid"}})


# ---------------------------------------------------------------- the shipped demo policy

def test_demo_policy_is_shipped_and_balances_the_pole():
    import gymnasium as gym

    from bitrl_compile.quant import quantize_activations, ternarize_weight

    loaded = load_policy(DEMO)
    assert DEMO.stat().st_size < 64_000
    assert loaded.output == {"kind": "discrete", "n": 2, "outputs": "logits"} and loaded.module.activation == "relu"
    layers = [(m.weight.numpy(), m.bias.numpy()) for m in loaded.module.net if isinstance(m, nn.Linear)]

    def ternary_logits(x):
        for i, (w, b) in enumerate(layers):
            x_q, s = quantize_activations(x)
            w_t, gamma = ternarize_weight(w)
            x = (x_q / s[:, None]) @ (w_t * gamma[0]).T + b
            x = np.maximum(x, 0) if i < len(layers) - 1 else x
        return x

    env = gym.make("CartPole-v1")
    for forward in (lambda x: run(loaded, x), ternary_logits):
        obs, _ = env.reset(seed=123)
        for steps in range(500):
            obs, _, terminated, truncated, _ = env.step(int(np.argmax(forward(obs[None].astype(np.float32))[0])))
            if terminated or truncated:
                break
        assert steps >= 400
