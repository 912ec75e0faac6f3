"""Dict observations (issue 17): SB3 MultiInputPolicy policies (CombinedExtractor: each key flattened, concatenated
in the Dict space's order) trained here on a Dict version of CartPole, compiled, and run with act(dict) in Python
and from C through the documented flat layout (bitrl_input_key); per-key VecNormalize statistics folded into one
vector; wrong dicts and bad key lists refused in one line by both readers."""

import ctypes
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gymnasium import spaces

from bitrl_compile import pipeline, reference
from bitrl_compile.cli.compile import inspect_cmd
from bitrl_compile.devices.capi import capi_flags
from bitrl_compile.frontends import load_policy
from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.runtime import ArtifactError, load
from bitrl_compile.runtime.policy import check_observations, normalization, normalize, prepare_observations
from capi_lib import open_libbitrl

torch.set_num_threads(1)


class DictCartPole(gym.ObservationWrapper):
    """CartPole-v1 whose observation is {"position": [x, theta], "velocity": [x_dot, theta_dot]}: a real task with a
    Dict observation of two Box keys (gymnasium sorts them: position, velocity)."""

    def __init__(self, env=None):
        super().__init__(env or gym.make("CartPole-v1"))
        low, high = self.env.observation_space.low, self.env.observation_space.high
        self.observation_space = spaces.Dict({
            "velocity": spaces.Box(low[[1, 3]], high[[1, 3]], dtype=np.float32),
            "position": spaces.Box(low[[0, 2]], high[[0, 2]], dtype=np.float32)})

    def observation(self, obs):
        return {"position": obs[[0, 2]].astype(np.float32), "velocity": obs[[1, 3]].astype(np.float32)}


def _flat(obs: dict) -> np.ndarray:
    return np.concatenate([obs["position"], obs["velocity"]], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """PPO trained inside a VecNormalize (every key normalised), DQN without; both compiled for the host."""
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    folder = tmp_path_factory.mktemp("dict")
    venv = VecNormalize(DummyVecEnv([DictCartPole]), norm_reward=False)
    ppo = PPO("MultiInputPolicy", venv, n_steps=64, batch_size=32, n_epochs=1, seed=0,
              policy_kwargs={"net_arch": [32, 32]})
    ppo.learn(128)
    ppo.save(folder / "ppo.zip")
    venv.save(folder / "vecnormalize.pkl")
    dqn = DQN("MultiInputPolicy", DictCartPole(), learning_starts=16, buffer_size=1000, batch_size=16, seed=0,
              policy_kwargs={"net_arch": [32, 32]})
    dqn.learn(64)
    dqn.save(folder / "dqn.zip")
    ppo_loaded = load_policy(folder / "ppo.zip", vecnormalize=folder / "vecnormalize.pkl", trust_pickle=True)
    with pytest.warns(UserWarning, match="probably trained on VecNormalize-d observations"):  # PPO's, beside it
        dqn_loaded = load_policy(folder / "dqn.zip")
    return SimpleNamespace(folder=folder, ppo=ppo, venv=venv, dqn=dqn, ppo_loaded=ppo_loaded, dqn_loaded=dqn_loaded,
                           ppo_art=pipeline.compile_policy(ppo_loaded, "host", folder / "ppo.bitrl"),
                           dqn_art=pipeline.compile_policy(dqn_loaded, "host", folder / "dqn.bitrl"))


@pytest.fixture(scope="module")
def observations() -> dict:
    """64 Dict observations of seeded DictCartPole rollouts, as a batch {key: [64, 2]}."""
    env = DictCartPole()
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    rows = []
    while len(rows) < 64:
        rows.append(obs)
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
        if terminated or truncated:
            obs, _ = env.reset(seed=len(rows))
    return {key: np.stack([r[key] for r in rows]) for key in ("position", "velocity")}


def test_the_manifest_names_the_keys_and_folds_the_statistics(runs):
    spec = runs.ppo_art.manifest["input"]
    assert spec["kind"] == "dict" and spec["shape"] == [4] and spec["preprocess"] == "none"
    assert [(k["name"], k["shape"], k["dtype"], k["normalize"]) for k in spec["keys"]] == \
        [("position", [2], "float32", True), ("velocity", [2], "float32", True)]
    rms = runs.venv.obs_rms
    np.testing.assert_array_equal(spec["normalize"]["mean"], np.concatenate([rms["position"].mean,
                                                                             rms["velocity"].mean]))
    assert spec["normalize"]["clip"] == 10.0 and "MultiInput policy (keys position, velocity)" in \
        runs.ppo_loaded.description
    assert not runs.dqn_art.manifest["input"]["normalize"]
    result = CliRunner().invoke(inspect_cmd, [str(runs.ppo_art.path)])
    assert result.exit_code == 0, result.output
    assert "key 'position'           [2]          float32  values [0, 2), normalised" in result.output
    assert "key 'velocity'           [2]          float32  values [2, 4), normalised" in result.output


def test_fp32_module_equals_sb3_and_the_artifact_equals_the_reference(runs, observations):
    # the fp32 LoadedPolicy module on the flat layout is SB3's own network on the Dict: bit for bit
    ppo = runs.ppo
    sb3_obs = runs.venv.normalize_obs(observations)
    with torch.no_grad():
        tensors, _ = ppo.policy.obs_to_tensor(sb3_obs)
        latent = ppo.policy.mlp_extractor.forward_actor(ppo.policy.extract_features(tensors,
                                                                                    ppo.policy.pi_features_extractor))
        logits = ppo.policy.action_net(latent)
        mine = runs.ppo_loaded.module(torch.from_numpy(_flat(sb3_obs)))
    assert torch.equal(mine, logits)
    np.testing.assert_array_equal(mine.argmax(-1).numpy(), ppo.predict(sb3_obs, deterministic=True)[0])
    with torch.no_grad():
        q = runs.dqn_loaded.module(torch.from_numpy(_flat(observations)))
    np.testing.assert_array_equal(q.argmax(-1).numpy(), runs.dqn.predict(observations, deterministic=True)[0])
    # the ternary artifact on the raw Dict: the network on numpy's flat, normalised input, bit for bit; the numpy
    # reference bit for bit where the network has no tanh (DQN's ReLU), within TVM's tanh otherwise (PPO)
    for art in (runs.ppo_art, runs.dqn_art):
        spec = art.manifest["input"]
        x, _ = prepare_observations(spec, observations, normalization(spec))
        expected = np.asarray(reference.run(art.quantized, x), np.float32)
        with load(art.path) as policy:
            out = policy.forward(observations)
            np.testing.assert_array_equal(out, policy._call_vm("main", x)[0])
            if art is runs.dqn_art:
                np.testing.assert_array_equal(out, expected)
            else:
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(policy.act(observations), expected.argmax(-1))
            first = {key: value[0] for key, value in observations.items()}
            assert policy.act(first) == expected[0].argmax()
            np.testing.assert_array_equal(policy.forward(_flat(observations)), out)  # flat arrays still work
            assert policy.act(observations, deterministic=False, rng=np.random.default_rng(0)).shape == (64,)


def test_per_key_normalisation_is_sb3s_and_the_flat_paths(runs, observations, tmp_path):
    spec = runs.ppo_loaded.input
    flat = _flat(observations)
    mine = normalize(flat, normalization(spec))
    # SB3's VecNormalize computes in float64 and rounds once; the runtime in float32
    np.testing.assert_allclose(mine, _flat(runs.venv.normalize_obs(observations)), rtol=2e-6, atol=2e-6)
    # the same statistics given for the flat vector (the existing path): bit for bit
    rms = runs.venv.obs_rms
    stats = {"mean": np.concatenate([rms["position"].mean, rms["velocity"].mean]).tolist(),
             "var": np.concatenate([rms["position"].var, rms["velocity"].var]).tolist(), "clip": 10.0,
             "eps": runs.venv.epsilon}
    (tmp_path / "flat.json").write_text(json.dumps(stats))
    flat_spec = load_policy(runs.folder / "ppo.zip", vecnormalize=tmp_path / "flat.json").input
    np.testing.assert_array_equal(normalize(flat, normalization(flat_spec)), mine)
    # a key left out of norm_obs_keys passes unchanged (bit for bit) when nothing clips it
    per_key = {"obs_rms": {"velocity": {"mean": rms["velocity"].mean.tolist(), "var": rms["velocity"].var.tolist()}},
               "clip_obs": None, "epsilon": 1e-8}
    (tmp_path / "velocity.json").write_text(json.dumps(per_key))
    partial = load_policy(runs.folder / "ppo.zip", vecnormalize=tmp_path / "velocity.json").input
    assert [k["normalize"] for k in partial["keys"]] == [False, True]
    out = normalize(flat, normalization(partial))
    np.testing.assert_array_equal(out[:, :2], flat[:, :2])
    velocity = (flat[:, 2:] - rms["velocity"].mean.astype(np.float32)) / \
        np.sqrt(rms["velocity"].var.astype(np.float32) + np.float32(1e-8))
    np.testing.assert_array_equal(out[:, 2:], velocity)
    # ... and is refused, in one line, when a clip would cut it
    per_key["clip_obs"] = 10.0
    (tmp_path / "clipped.json").write_text(json.dumps(per_key))
    with pytest.raises(ModelLoadError, match="leaves key 'position' unnormalised") as e:
        load_policy(runs.folder / "ppo.zip", vecnormalize=tmp_path / "clipped.json")
    assert "\n" not in str(e.value)
    per_key["obs_rms"]["goal"] = per_key["obs_rms"]["velocity"]
    (tmp_path / "goal.json").write_text(json.dumps(per_key))
    with pytest.raises(ModelLoadError, match="key 'goal', which the policy's observation lacks"):
        load_policy(runs.folder / "ppo.zip", vecnormalize=tmp_path / "goal.json")


@pytest.mark.parametrize("bad, message", [
    ({"position": [0.0, 0.1]}, "lacks key 'velocity'"),
    ({"position": [0.0, 0.1], "velocity": [0.0, 0.1], "goal": [1.0]}, "has key 'goal', which this policy does not"),
    ({"position": [0.0, 0.1, 0.2], "velocity": [0.0, 0.1]}, r"key 'position' has shape \(3,\); this policy expects"),
    ({"position": np.zeros((3, 2)), "velocity": [0.0, 0.1]}, "'velocity' is one observation but key 'position' is"),
    ({"position": ["a", "b"], "velocity": [0.0, 0.1]}, "key 'position' must be numeric"),
    ({"position": [np.nan, 0.1], "velocity": [0.0, 0.1]}, "NaN or Inf"),
])
def test_wrong_dicts_are_refused_in_one_line(runs, bad, message):
    with load(runs.dqn_art.path) as policy:
        for call in (policy.act, policy.forward):
            with pytest.raises(ValueError, match=message) as e:
                call(bad)
            assert "\n" not in str(e.value)
    flat_spec = {"shape": [4], "dtype": "float32", "preprocess": "none"}
    with pytest.raises(ValueError, match="observation is a dict .* this policy takes one array of shape"):
        check_observations(flat_spec, {"position": [0.0, 0.1]})


C_APP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bitrl.h"
/* dict_app policy.bitrl KEY...: each stdin line holds the keys' values in the order KEY...; each key is copied to
   its place in the flat row (bitrl_input_key), then one action is printed */
int main(int argc, char **argv) {
    bitrl_policy *p = bitrl_load(argv[1]);
    if (!p) { fprintf(stderr, "%s\n", bitrl_last_error()); return 1; }
    int64_t n = bitrl_input_keys(p), row = bitrl_obs_size(p);
    for (int64_t i = 0; i < n; i++) {
        const char *name; int64_t offset, size;
        if (bitrl_input_key(p, i, &name, &offset, &size) != 0) return 2;
        printf("key %s %lld %lld\n", name, (long long)offset, (long long)size);
    }
    float *obs = calloc((size_t)row, sizeof *obs);
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        char *s = line;
        for (int a = 2; a < argc; a++) {
            int64_t k = 0;
            for (; k < n; k++) {
                const char *name; int64_t offset, size;
                bitrl_input_key(p, k, &name, &offset, &size);
                if (strcmp(name, argv[a]) != 0) continue;
                for (int64_t j = 0; j < size; j++) obs[offset + j] = strtof(s, &s);
                break;
            }
            if (k == n) { fprintf(stderr, "no key %s\n", argv[a]); return 3; }
        }
        int64_t action;
        if (bitrl_act(p, obs, 1, &action) != 0) { fprintf(stderr, "%s\n", bitrl_last_error()); return 4; }
        printf("%lld\n", (long long)action);
    }
    free(obs);
    bitrl_free(p);
    return 0;
}
"""


@pytest.fixture(scope="module")
def capi(tmp_path_factory):
    cflags, libs = capi_flags("host")
    folder = tmp_path_factory.mktemp("dict-capi")
    (folder / "dict_app.c").write_text(C_APP)
    subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", str(folder / "dict_app.c"), "-o",
                    str(folder / "dict_app"), *cflags, *libs], check=True, capture_output=True, text=True)
    lib = open_libbitrl()  # the build capi_flags("host") links the app against
    return SimpleNamespace(lib=lib, app=folder / "dict_app")


def test_c_api_places_each_key_and_acts_as_python(runs, observations, capi):
    # the app holds its keys in another order than the manifest's: bitrl_input_key says where each goes
    lines = "".join(" ".join(f"{v:.9g}" for v in np.concatenate([vel, pos])) + "\n"
                    for pos, vel in zip(observations["position"], observations["velocity"], strict=True))
    for art in (runs.ppo_art, runs.dqn_art):
        out = subprocess.run([str(capi.app), str(art.path), "velocity", "position"], input=lines, text=True,
                             capture_output=True, check=True).stdout.splitlines()
        assert out[:2] == ["key position 0 2", "key velocity 2 2"]
        with load(art.path) as policy:
            assert [int(a) for a in out[2:]] == policy.act(observations).tolist()
    handle = capi.lib.bitrl_load(str(runs.dqn_art.path).encode())
    try:
        assert capi.lib.bitrl_input_keys(handle) == 2 and capi.lib.bitrl_input_keys(None) == -1
        name, offset, size = ctypes.c_char_p(), ctypes.c_int64(), ctypes.c_int64()
        assert capi.lib.bitrl_input_key(handle, 1, ctypes.byref(name), ctypes.byref(offset), ctypes.byref(size)) == 0
        assert (name.value, offset.value, size.value) == (b"velocity", 2, 2)
        assert capi.lib.bitrl_input_key(handle, 2, None, None, None) == -1
        assert b"key 2 is out of range" in capi.lib.bitrl_last_error()
    finally:
        capi.lib.bitrl_free(handle)


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of an artifact with its manifest's input changed and the manifest's hash recomputed."""
    with zipfile.ZipFile(src) as z:
        m = json.loads(z.read("manifest.json"))
        blobs = {n: z.read(n) for n in z.namelist() if n not in ("manifest.json", "manifest.sha256")}
    change(m["input"])
    text = json.dumps(m).encode()
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("manifest.json", text)
        z.writestr("manifest.sha256", hashlib.sha256(text).hexdigest() + "\n")
        for name, data in blobs.items():
            z.writestr(name, data)
    return dst


def _set(**fields):
    return lambda spec: spec.update(fields)


def _key(i, **fields):
    return lambda spec: spec["keys"][i].update(fields)


@pytest.mark.parametrize("change", [
    _set(keys=[]), _set(keys="position"), _set(kind="tuple"), _set(kind="flat"), _key(1, name="position"),
    _key(0, name=""), _key(0, shape=[3]), _key(0, shape=[0]), _key(0, dtype="complex64"), _key(0, preprocess="onehot"),
    _key(0, normalize="yes"), _set(shape=[2, 2]), _key(1, shape="2"), lambda s: s["keys"].append("velocity"),
], ids=["empty", "not-a-list", "kind", "keys-on-flat", "repeated", "unnamed", "sizes", "zero", "dtype", "preprocess",
        "normalize", "shape", "key-shape", "not-an-object"])
def test_a_bad_key_list_is_refused_by_both_readers(runs, capi, tmp_path, change):
    bad = _rewrite(runs.dqn_art.path, tmp_path / "bad.bitrl", change)
    with pytest.raises(ArtifactError, match="manifest input") as e:
        load(bad)
    assert "\n" not in str(e.value)
    assert not capi.lib.bitrl_load(str(bad).encode())
    error = capi.lib.bitrl_last_error().decode()
    assert "manifest input" in error and "\n" not in error


def test_image_keys_are_a_cnns_discrete_keys_an_index_and_other_kinds_are_refused_by_name(tmp_path):
    from bitrl_compile.frontends.sb3 import _dict_spaces
    from bitrl_compile.frontends.specs import _space_to_specs

    text = "{'camera': Box(0, 255, (3, 36, 36), uint8), 'state': Box(-1.0, 1.0, (3,), float32)}"
    spec = _space_to_specs({"type": "Dict", "keys": _dict_spaces(text, tmp_path)}, "input")  # an image key: a CNN's
    assert spec["keys"][0] == {"name": "camera", "shape": [3, 36, 36], "dtype": "uint8", "preprocess": "image",
                               "normalize": False} and spec["shape"] == [3 * 36 * 36 + 3]
    spec = _space_to_specs({"type": "Dict", "keys": _dict_spaces("{'goal': Discrete(3)}", tmp_path)}, "input")
    assert spec["keys"] == [{"name": "goal", "shape": [1], "dtype": "int64", "preprocess": "onehot", "n": 3,
                             "normalize": False}] and spec["shape"] == [1]  # its index: one value in the row
    with pytest.raises(ValueError, match="key 'goal' is a MultiDiscrete space, which is not supported yet"):
        _space_to_specs({"type": "Dict", "keys": _dict_spaces("{'goal': MultiDiscrete([3 2])}", tmp_path)}, "input")
    spec = _space_to_specs({"type": "Dict", "keys": _dict_spaces(
        "{'big': Box(-1.0, 1.0, (3, 2), float32), \"it's\": MultiBinary(4)}", tmp_path)}, "input")
    assert spec["shape"] == [10] and [k["name"] for k in spec["keys"]] == ["big", "it's"]
    with pytest.raises(ModelLoadError, match="cannot read the Dict observation space"):
        _dict_spaces("{'a': Box(0, 1, (1,), float32)", tmp_path)


def test_compile_measures_a_dict_policy_in_its_env_and_run_plays_it(runs, tmp_path):
    """--env with a Dict environment: the keys must be the env's, the fidelity rollouts carry the flat rows,
    `run --env` hands the env's dicts to the artifact."""
    import gymnasium
    from click.testing import CliRunner

    from bitrl_compile.cli import main

    if "DictCartPole-v0" not in gymnasium.registry:
        gymnasium.register("DictCartPole-v0", entry_point=DictCartPole, max_episode_steps=500)
    out = tmp_path / "dqn-env.bitrl"
    r = CliRunner().invoke(main, [str(runs.folder / "dqn.zip"), "--env", "DictCartPole-v0", "--episodes", "2",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "action agreement" in r.stdout and "states the fp32 policy visits in DictCartPole-v0" in r.stdout
    r = CliRunner().invoke(main, ["run", str(out), "--env", "DictCartPole-v0", "--episodes", "2"])
    assert r.exit_code == 0 and "mean return" in r.output, r.output
    r = CliRunner().invoke(main, [str(runs.folder / "dqn.zip"), "--env", "CartPole-v1", "-o", str(tmp_path / "x.bitrl")])
    assert r.exit_code == 1 and "takes a Dict observation (keys ['position', 'velocity']) and CartPole-v1's" in r.output


class ImageDictCartPole(gym.ObservationWrapper):
    """CartPole seen as {"camera": a 36x36x3 uint8 picture of the cart and pole, "velocity": [x_dot, theta_dot]}: a
    Dict with an image key, which SB3's CombinedExtractor runs through a NatureCNN."""

    def __init__(self, env=None):
        super().__init__(env or gym.make("CartPole-v1"))
        high = self.env.observation_space.high
        self.observation_space = spaces.Dict({
            "camera": spaces.Box(0, 255, (36, 36, 3), np.uint8),
            "velocity": spaces.Box(-high[[1, 3]], high[[1, 3]], dtype=np.float32)})

    def observation(self, obs):
        image = np.zeros((36, 36, 3), np.uint8)
        image[:, int(np.clip((obs[0] + 2.4) / 4.8 * 35, 0, 35)), 0] = 255  # the cart's column
        image[int(np.clip((obs[2] + 0.21) / 0.42 * 35, 0, 35)), :, 1] = 200  # the pole's angle as a row
        return {"camera": image, "velocity": obs[[1, 3]].astype(np.float32)}


def test_an_image_key_runs_through_its_nature_cnn(tmp_path):
    """A MultiInputPolicy with an image key: the artifact takes the env's (H, W, C) uint8 pixels in the flat row,
    transposes, divides by 255 and runs the key's ternary NatureCNN; its actions are SB3's on the fp32 module and
    the numpy reference's on the artifact."""
    from stable_baselines3 import PPO

    model = PPO("MultiInputPolicy", ImageDictCartPole(), n_steps=64, batch_size=32, n_epochs=1, seed=0,
                policy_kwargs={"net_arch": [32]})
    model.learn(64)
    model.save(tmp_path / "image-dict.zip")
    loaded = load_policy(tmp_path / "image-dict.zip")
    assert loaded.input["keys"][0] == {"name": "camera", "shape": [36, 36, 3], "dtype": "uint8",
                                       "preprocess": "image", "normalize": False}
    env = ImageDictCartPole()
    obs, _ = env.reset(seed=0)
    rows = []
    for _ in range(48):
        rows.append(obs)
        obs, _, terminated, truncated, _ = env.step(int(model.predict(obs, deterministic=True)[0]))
        if terminated or truncated:
            obs, _ = env.reset()
    batch = {key: np.stack([r[key] for r in rows]) for key in ("camera", "velocity")}
    with torch.no_grad():
        ours = loaded.module(torch.from_numpy(check_observations(loaded.input, batch)[0].astype(np.float32)))
        sb3 = model.policy.get_distribution(model.policy.obs_to_tensor(batch)[0]).distribution.logits
    np.testing.assert_allclose(torch.log_softmax(ours, 1).numpy(), sb3.numpy(), rtol=1e-5, atol=1e-6)  # normalised
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "image-dict.bitrl")
    x, _ = prepare_observations(compiled.manifest["input"], batch)
    expected = reference.run(compiled.quantized, x)
    with load(compiled.path) as policy:
        out = policy.forward(batch)
        np.testing.assert_allclose(out, expected, atol=1e-3)  # the MLP's tanh: TVM's and numpy's differ by an ulp
        np.testing.assert_array_equal(policy.act(batch), np.argmax(out, axis=1))
        one = policy.act({key: value[5] for key, value in batch.items()})
        assert one == np.argmax(out[5])


class PhaseCartPole(gym.Wrapper):
    """CartPole with a Discrete(3) "phase" key beside the Box "state": the phase is drawn anew every step and a step
    in phase 2 pays half, so the observation's Discrete key is part of the task. SB3 one-hot encodes the phase
    (preprocess_obs) before its CombinedExtractor; gymnasium sorts the keys: phase, state."""

    def __init__(self, env=None):
        super().__init__(env or gym.make("CartPole-v1"))
        self.observation_space = spaces.Dict({"state": self.env.observation_space, "phase": spaces.Discrete(3)})

    def _obs(self, state):
        self.phase = int(self.env.unwrapped.np_random.integers(3))
        return {"phase": self.phase, "state": state.astype(np.float32)}

    def reset(self, **kwargs):
        state, info = self.env.reset(**kwargs)
        return self._obs(state), info

    def step(self, action):
        reward_scale = 0.5 if self.phase == 2 else 1.0
        state, reward, terminated, truncated, info = self.env.step(action)
        return self._obs(state), reward * reward_scale, terminated, truncated, info


def _phase_flat(obs: dict) -> np.ndarray:
    """The flat row of PhaseCartPole's dicts: the phase's index, then the state (the manifest's key order)."""
    return np.concatenate([np.asarray(obs["phase"], np.float32)[..., None], obs["state"]], axis=-1)


@pytest.fixture(scope="module")
def phase(tmp_path_factory):
    """SB3 PPO MultiInputPolicy trained 256 steps on PhaseCartPole, loaded, compiled for the host; 48 observations
    of a seeded rollout (every phase among them) as a batch {key: [48, ...]}."""
    from stable_baselines3 import PPO

    folder = tmp_path_factory.mktemp("phase")
    model = PPO("MultiInputPolicy", PhaseCartPole(), n_steps=128, batch_size=64, n_epochs=1, seed=0,
                policy_kwargs={"net_arch": [32, 32]})
    model.learn(256)
    model.save(folder / "phase.zip")
    loaded = load_policy(folder / "phase.zip")
    env = PhaseCartPole()
    obs, _ = env.reset(seed=0)
    rows = []
    while len(rows) < 48:
        rows.append(obs)
        obs, _, terminated, truncated, _ = env.step(int(model.predict(obs, deterministic=True)[0]))
        if terminated or truncated:
            obs, _ = env.reset()
    batch = {"phase": np.array([r["phase"] for r in rows], np.int64), "state": np.stack([r["state"] for r in rows])}
    assert set(batch["phase"].tolist()) == {0, 1, 2}
    return SimpleNamespace(folder=folder, model=model, loaded=loaded, batch=batch,
                           art=pipeline.compile_policy(loaded, "host", folder / "phase.bitrl"))


def test_a_discrete_key_is_its_index_in_the_row_and_a_one_hot_in_the_module(phase):
    spec = phase.art.manifest["input"]
    assert spec["shape"] == [5] and spec["keys"] == [
        {"name": "phase", "shape": [1], "dtype": "int64", "preprocess": "onehot", "n": 3, "normalize": False},
        {"name": "state", "shape": [4], "dtype": "float32", "preprocess": "none", "normalize": False}]
    # the fp32 module on the flat rows (the index) is SB3's network on the dicts (the one-hot)
    policy = phase.model.policy
    with torch.no_grad():
        tensors, _ = policy.obs_to_tensor(phase.batch)
        logits = policy.action_net(policy.mlp_extractor.forward_actor(
            policy.extract_features(tensors, policy.pi_features_extractor)))
        mine = phase.loaded.module(torch.from_numpy(_phase_flat(phase.batch)))
    np.testing.assert_allclose(mine.numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)
    # the compiled artifact (its one-hot in the kernels) is the numpy reference of the quantized module
    x, _ = prepare_observations(spec, phase.batch, normalization(spec))
    np.testing.assert_array_equal(x, _phase_flat(phase.batch))
    expected = np.asarray(reference.run(phase.art.quantized, x), np.float32)
    with load(phase.art.path) as compiled:
        out = compiled.forward(phase.batch)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)  # PPO's tanh: TVM's and numpy's, an ulp
        actions = compiled.act(phase.batch)
        np.testing.assert_array_equal(actions, np.argmax(out, axis=1))
        np.testing.assert_array_equal(compiled.act(_phase_flat(phase.batch)), actions)  # the flat row: the same
        first = {"phase": int(phase.batch["phase"][7]), "state": phase.batch["state"][7]}
        assert compiled.act(first) == actions[7]
        # the phase matters to the compiled policy: each phase's one-hot reaches the network
        outs = [compiled.forward({"phase": np.full(48, k), "state": phase.batch["state"]}) for k in range(3)]
        assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


@pytest.mark.parametrize("bad, message", [
    (3, r"key 'phase' index out of range \[0, 3\): got 3"), (-1, r"key 'phase' index out of range \[0, 3\): got -1"),
    (0.5, r"key 'phase' is a Discrete\(3\) index: give an integer"), (np.nan, "key 'phase' is a Discrete"),
    ([[1]], "key 'phase' is a Discrete"),
])
def test_a_bad_discrete_index_is_refused_naming_the_key_in_python(phase, bad, message):
    with load(phase.art.path) as policy:
        for call in (policy.act, policy.forward):
            with pytest.raises(ValueError, match=message) as e:
                call({"phase": bad, "state": phase.batch["state"][0]})
            assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="key 'phase' index out of range"):  # one bad row of a batch
            policy.act({"phase": np.array([0, 1, 3]), "state": phase.batch["state"][:3]})


@pytest.mark.parametrize("bad", [3.0, -1.0, 0.5, np.nan])
def test_a_flat_row_with_a_bad_discrete_index_is_refused_naming_the_key(phase, bad):
    """The flat row too (the fast path included): the module would one-hot encode a bad index as no phase at all."""
    row = _phase_flat({"phase": np.int64(0), "state": phase.batch["state"][0]})
    row[0] = bad
    with load(phase.art.path) as policy:
        for x in (row, np.stack([_phase_flat({"phase": np.int64(1), "state": phase.batch["state"][1]}), row])):
            with pytest.raises(ValueError, match=r"key 'phase' \(flat row value 0\).*Discrete\(3\) index") as e:
                policy.act(x)
            assert "\n" not in str(e.value)


def test_env_with_the_discrete_key_is_the_policys(phase):
    """--env compares a Discrete key by its n (the policy's spec holds the index, shape [1])."""
    gym.register("BitrlTestPhaseCartPole-v0", entry_point=PhaseCartPole)
    try:
        loaded = load_policy(phase.folder / "phase.zip", config={"env": "BitrlTestPhaseCartPole-v0"})
        assert [k["name"] for k in loaded.input["keys"]] == ["phase", "state"]
    finally:
        gym.registry.pop("BitrlTestPhaseCartPole-v0")


def test_c_api_takes_a_discrete_keys_index_and_refuses_a_bad_one_by_name(phase, capi):
    batch = phase.batch
    lines = "".join(" ".join(f"{v:.9g}" for v in state) + f" {k}\n" for state, k in zip(batch["state"],
                                                                                         batch["phase"], strict=True))
    run = [str(capi.app), str(phase.art.path), "state", "phase"]
    out = subprocess.run(run, input=lines, text=True, capture_output=True, check=True).stdout.splitlines()
    assert out[:2] == ["key phase 0 1", "key state 1 4"]
    with load(phase.art.path) as policy:
        assert [int(a) for a in out[2:]] == policy.act(batch).tolist()
    for bad in ("3", "-1", "0.5", "nan"):
        r = subprocess.run(run, input=f"0.01 0.02 0.03 0.04 {bad}\n", text=True, capture_output=True, check=False)
        assert r.returncode == 4, r.stderr
        error = r.stderr.strip()
        assert "\n" not in error and "bitrl_act: observation key 'phase' is" in error and \
            "Discrete(3) index: give a whole number in [0, 3)" in error, error


@pytest.mark.parametrize("change, python, c", [
    (_key(0, n=0), "one-hot n must be", "keys[0].n is 0"), (_key(0, n=1 << 21), "one-hot n = 2097152", "keys[0].n"),
    (_key(0, n="3"), "one-hot n must be", "keys[0].n is not an integer"), (_key(0, shape=[2]), "shape must be [1]",
                                                                          "shape is not [1]"),
    (_key(0, normalize=True), "cannot be normalised", "but normalised"),
], ids=["n-zero", "n-huge", "n-string", "shape", "normalised"])
def test_a_bad_discrete_key_spec_is_refused_by_both_readers(phase, capi, tmp_path, change, python, c):
    def shape_too(spec):  # a key of shape [2] with the row's total to match: only the key's own rule refuses it
        change(spec)
        spec["shape"] = [sum(int(np.prod(k["shape"])) for k in spec["keys"])]

    bad = _rewrite(phase.art.path, tmp_path / "bad.bitrl", shape_too)
    with pytest.raises(ArtifactError, match="manifest input") as e:
        load(bad)
    assert "\n" not in str(e.value) and python in str(e.value) and "'phase'" in str(e.value)
    assert not capi.lib.bitrl_load(str(bad).encode())
    error = capi.lib.bitrl_last_error().decode()
    assert "manifest input.keys[0]" in error and c in error and "\n" not in error, error
