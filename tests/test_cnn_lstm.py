"""Recurrent policies on images (issue 17): sb3-contrib RecurrentPPO's CnnLstmPolicy, NatureCNN then the LSTM actor,
its state explicit as for MlpLstmPolicy; the convolutions ternary BitConv2d (/255 in the first one), the LSTM's
matmuls ternary BitLinear, the gates in float. Trained here on the built-in pixel CartPole (36x36x3 uint8 frames)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sb3_contrib")

from bitrl_compile import envs  # after the skip: registers the pixel task


@pytest.fixture(scope="module")
def cnn_lstm(tmp_path_factory):
    """(the SB3 model, its zip): NatureCNN (64 features), one LSTM layer of 32 units, 128 steps."""
    import gymnasium as gym
    import torch
    from sb3_contrib import RecurrentPPO

    torch.set_num_threads(1)
    model = RecurrentPPO("CnnLstmPolicy", gym.make(envs.PIXEL_CARTPOLE), n_steps=64, batch_size=32, n_epochs=2,
                         seed=0, policy_kwargs={"lstm_hidden_size": 32,
                                                "features_extractor_kwargs": {"features_dim": 64}})
    model.learn(128)
    path = tmp_path_factory.mktemp("cnn-lstm") / "cnn_lstm.zip"
    model.save(path)
    return model, path


def _episodes(steps: int, seed: int = 1):
    """Pixel CartPole frames and episode starts of a policy acting at random."""
    import gymnasium as gym

    env = gym.make(envs.PIXEL_CARTPOLE)
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    start = True
    for _ in range(steps):
        yield obs, start
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        start = terminated or truncated
        if start:
            obs, _ = env.reset()


def test_the_loaded_module_is_sb3_contribs_cnn_lstm_actor(cnn_lstm):
    import torch

    from bitrl_compile.frontends import load_policy

    model, path = cnn_lstm
    loaded = load_policy(path)
    assert loaded.input["shape"] == [36, 36, 3] and loaded.input["preprocess"] == "image"  # the env's HWC frames
    assert loaded.input["recurrent"] == {"layers": 1, "hidden": 32, "state_size": 64}
    assert "NatureCNN, LSTM 1x32" in loaded.description
    sb3_state, ours = None, torch.zeros(1, 64)
    for obs, start in _episodes(80):
        action, sb3_state = model.predict(obs, state=sb3_state, episode_start=np.array([start]), deterministic=True)
        with torch.no_grad():
            out, ours = loaded.module(torch.from_numpy(obs[None]).float() / 255, ours, torch.tensor([float(start)]))
        assert int(out.argmax(1)[0]) == int(action)
        h, c = sb3_state
        np.testing.assert_allclose(ours.numpy()[0], np.concatenate([h[:, 0].ravel(), c[:, 0].ravel()]), atol=1e-5)


def test_the_artifact_steps_as_the_reference_does(cnn_lstm, tmp_path):
    """uint8 frames in, step by step over episodes: the artifact's action, logits and next state against the numpy
    reference of the quantized module given the same state (frames / 255, as the artifact's first conv computes)."""
    from bitrl_compile import reference
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy
    from bitrl_compile.runtime import load

    compiled = compile_policy(load_policy(cnn_lstm[1]), "host", tmp_path / "cnn_lstm.bitrl")
    calls = [c["func"] for c in compiled.manifest["entry_points"]["forward"]["calls"]]
    assert any("bitconv" in c for c in calls) and any("bitlinear_k32_n128" in c for c in calls)  # conv + LSTM hh
    with load(compiled.path) as policy:
        state, agree = policy.initial_state(), 0
        for obs, start in _episodes(60):
            action, nxt = policy.act(obs, state, start)
            out, ref_state = reference.run(compiled.quantized, obs[None].astype(np.float32) / 255, state[None],
                                           np.array([float(start)], np.float32))
            agree += int(action) == int(np.argmax(out))
            np.testing.assert_allclose(nxt, ref_state[0], atol=1e-4)
            logits, again = policy.forward(obs, state, start)
            np.testing.assert_array_equal(again, nxt)
            np.testing.assert_allclose(logits, out[0], atol=1e-3)
            state = nxt
        assert agree == 60
