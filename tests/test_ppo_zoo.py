"""The PPO trainer with RL Zoo's settings: presets, vector env modes, truncation bootstrapping, normalised
observations in the compiled policy. Real environments, tiny budgets."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from bitrl_compile.frontends import load_policy
from bitrl_compile.trainers import ppo, presets, vec

TINY = {"total_timesteps": 512, "num_envs": 4, "num_steps": 64, "update_epochs": 2, "num_minibatches": 2,
        "eval_every": 0, "eval_episodes": 2, "progress": False, "tensorboard": False}


# ------------------------------------------------------------------------------------------------ presets

def test_rl_zoo_settings_are_the_defaults_of_an_env_with_a_preset():
    a = ppo.args_for("CartPole-v1")  # RL Zoo: n_envs 8, n_steps 32, batch 256, 20 epochs, lin_0.001, lin_0.2
    assert (a.num_envs, a.num_steps, a.num_minibatches, a.update_epochs) == (8, 32, 1, 20)
    assert (a.learning_rate, a.anneal_lr, a.clip_coef, a.anneal_clip) == (1e-3, True, 0.2, True)
    assert (a.gamma, a.gae_lambda, a.total_timesteps, a.norm_obs, a.activation) == (0.98, 0.8, 100_000, False, "tanh")
    a = ppo.args_for("Acrobot-v1")  # normalize: true -> VecNormalize's observations and rewards; batch 64
    assert a.norm_obs and a.norm_reward and (a.num_envs, a.num_steps, a.num_minibatches) == (16, 256, 64)
    assert (a.learning_rate, a.anneal_lr, a.anneal_clip, a.clip_vloss) == (3e-4, False, False, False)
    a = ppo.args_for("LunarLander-v3")
    assert (a.num_envs, a.num_steps, a.num_minibatches, a.gamma, a.ent_coef) == (16, 1024, 256, 0.999, 0.01)


def test_an_env_without_a_preset_gets_sb3_defaults_and_options_override():
    a = ppo.args_for("MountainCarContinuous-v0")
    assert (a.num_envs, a.num_steps, a.num_minibatches, a.update_epochs, a.learning_rate) == (1, 2048, 32, 10, 3e-4)
    assert not a.anneal_lr and not a.norm_obs and presets.describe("MountainCarContinuous-v0").startswith("no RL Zoo")
    a = ppo.args_for("CartPole-v1", learning_rate=5e-4, num_envs=2, anneal_clip=False)
    assert (a.learning_rate, a.num_envs, a.anneal_clip, a.num_steps) == (5e-4, 2, False, 32)
    assert "use_sde" in presets.describe("Pendulum-v1")  # what this trainer leaves out is said


def test_sb3_gets_the_same_table():
    kw = presets.sb3_kwargs("CartPole-v1")
    assert (kw["n_steps"], kw["batch_size"], kw["n_epochs"], kw["gamma"]) == (32, 256, 20, 0.98)
    assert kw["learning_rate"](0.5) == pytest.approx(5e-4) and kw["clip_range"](1.0) == pytest.approx(0.2)
    assert "use_sde" not in presets.sb3_kwargs("Pendulum-v1")


# ------------------------------------------------------------------------------------------------ GAE

def test_gae_bootstraps_a_truncated_step_from_its_final_observation():
    # one env, 3 steps; step 1 is cut by a time limit: V(final obs) = 5 carries its TD target, the next episode's
    # values do not leak into it, and the advantage before it sees the bootstrapped value through lambda
    rewards = np.array([[1.0], [1.0], [1.0]], np.float32)
    values = np.array([[2.0], [3.0], [7.0]], np.float32)
    ends = np.array([[0.0], [1.0], [0.0]], np.float32)
    boot = np.array([[0.0], [5.0], [0.0]], np.float32)
    last = np.array([0.5], np.float32)
    adv, ret = ppo.compute_gae(rewards, values, ends, last, gamma=0.9, lam=0.8, bootstrap=boot)
    d2 = 1.0 + 0.9 * 0.5 - 7.0
    d1 = 1.0 + 0.9 * 5.0 - 3.0                 # truncated: r + gamma V(final obs), not r (terminated) nor V(s_2)
    d0 = 1.0 + 0.9 * 3.0 - 2.0
    np.testing.assert_allclose(adv[:, 0], [d0 + 0.9 * 0.8 * d1, d1, d2], rtol=1e-6)
    np.testing.assert_allclose(ret, adv + values, rtol=1e-6)
    terminated, _ = ppo.compute_gae(rewards, values, ends, last, gamma=0.9, lam=0.8)
    assert terminated[1, 0] == pytest.approx(1.0 - 3.0)  # without the bootstrap it would be a terminal state


# ------------------------------------------------------------------------------------------------ vector envs

def test_auto_is_async_only_with_cores_envs_and_a_costly_step():
    assert vec.resolve_vec("auto", 1) == "sync"
    assert vec.resolve_vec("auto", 8) == ("async" if vec.cores() > 1 else "sync")
    assert vec.step_seconds("CartPole-v1") < vec.ASYNC_STEP_SECONDS  # microseconds: a pipe round trip costs more
    assert vec.resolve_vec("auto", 8, "CartPole-v1") == "sync"
    with pytest.raises(ValueError, match="not one of"):
        vec.resolve_vec("threads", 4)


def test_async_vector_envs_give_the_same_rollouts_and_run_as_sync(tmp_path):
    obs = {}
    for mode in ("sync", "async"):
        envs = vec.make_envs("CartPole-v1", 3, mode)
        assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP and not envs.next_step
        o, _ = envs.reset(seed=5)
        seen, finals = [o], []
        for _ in range(40):  # always left: every env ends (and resets) within about 10 steps
            o, _r, term, trunc, info = envs.step(np.zeros(3, np.int64))
            seen.append(o)
            finals += [info["final_obs"][i] for i in np.flatnonzero(term | trunc)]
        envs.close()
        obs[mode] = (np.stack(seen), np.stack(finals))
    np.testing.assert_array_equal(obs["sync"][0], obs["async"][0])
    np.testing.assert_array_equal(obs["sync"][1], obs["async"][1])
    runs = {mode: ppo.train(ppo.args_for("CartPole-v1", **TINY, seed=2, vec=mode, out=str(tmp_path / mode)),
                            log=lambda s: None) for mode in ("sync", "async")}
    assert (tmp_path / "sync" / "progress.csv").read_text() == (tmp_path / "async" / "progress.csv").read_text()
    for a, b in zip(runs["sync"].agent.state_dict().values(), runs["async"].agent.state_dict().values()):
        assert torch.equal(a, b)


def test_next_step_autoreset_masks_the_reset_step(tmp_path):
    """gymnasium's NEXT_STEP mode (EnvPool's): the step after a done is no transition; episodes are still counted
    whole (CartPole pays 1 per step, so a logged return equals its length)."""
    result = ppo.train(ppo.args_for("CartPole-v1", **TINY, seed=0, autoreset="next_step", out=str(tmp_path)),
                       log=lambda s: None)
    assert np.all(np.isfinite(result.eval_returns))
    returns, lengths = (result.curve[name][1] for name in ("charts/episodic_return", "charts/episodic_length"))
    assert len(returns) > 10 and returns == lengths


def test_envpool_missing_is_one_line():
    try:
        import envpool  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install envpool"):
            vec.make_envs("CartPole-v1", 2, "envpool")
    else:
        envs = vec.make_envs("CartPole-v1", 2, "envpool", seed=0)
        assert envs.next_step
        envs.close()


# ------------------------------------------------------------------------------------------------ compiled

def test_compiled_policy_sees_the_normalised_observations_the_trainer_saw(tmp_path):
    """Acrobot's preset normalises observations (RL Zoo's normalize: true). Ternary heads (QAT, ReLU) compile to
    exactly what was trained, so the artifact's actions on raw observations equal the trainer's policy's on its
    normalised features: the statistics went into the artifact."""
    from bitrl_compile import pipeline
    from bitrl_compile.runtime import load

    result = ppo.train(ppo.args_for("Acrobot-v1", **TINY, heads_bits=1.58, activation="relu", out=str(tmp_path)),
                       log=lambda s: None)
    stats = result.backbone.stats()
    assert stats is not None and not np.allclose(stats["mean"], 0)
    loaded = load_policy(tmp_path / "policy.safetensors")
    np.testing.assert_allclose(loaded.input["normalize"]["mean"], stats["mean"])
    policy = load(pipeline.compile_policy(loaded, "host", tmp_path / "p.bitrl").path)
    rng = np.random.default_rng(0)
    obs = (np.asarray(stats["mean"]) + 2 * np.sqrt(stats["var"]) * rng.normal(size=(64, 6))).astype(np.float32)
    with torch.no_grad():
        mine = result.agent.actor(torch.from_numpy(result.backbone(obs))).numpy()
    np.testing.assert_allclose(policy.forward(obs), mine, atol=1e-4)
    np.testing.assert_array_equal(policy.act(obs), result.agent.act(torch.from_numpy(result.backbone(obs))))
