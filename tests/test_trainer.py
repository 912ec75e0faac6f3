"""The PPO trainer's pieces (trainers/ppo.py, backbones.py, export.py) on real environments, tiny budgets, no mocks."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors import safe_open

from bitrl_compile.evaluate import evaluate
from bitrl_compile.frontends import load_policy
from bitrl_compile.quant import (
    bitlinear_reference,
    quantize_activations_ste,
    quantize_weight_int8,
    quantize_weight_int8_ste,
    ternarize_weight,
    ternarize_weight_ste,
)
from bitrl_compile.trainers import backbones, export, ppo


def tiny(env_id="CartPole-v1", **overrides):
    """A few PPO iterations: enough to exercise every part, not to learn."""
    base = {"total_timesteps": 512, "num_envs": 4, "num_steps": 64, "update_epochs": 2, "num_minibatches": 2,
            "eval_every": 0, "eval_episodes": 2, "progress": False, "tensorboard": False, "activation": "relu"}
    return ppo.args_for(env_id, **{**base, **overrides})


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """fp32 PPO on CartPole-v1 with a small budget (its policy is the backbone source for other tests): RL Zoo's
    settings, with ReLU (compiled bit-exact with the numpy reference) and normalised observations (exported)."""
    out = tmp_path_factory.mktemp("ppo") / "fp32"
    args = ppo.args_for("CartPole-v1", total_timesteps=16_384, eval_episodes=5, progress=False, out=str(out),
                        activation="relu", norm_obs=True)
    return ppo.train(args, log=lambda s: None)


# ------------------------------------------------------------------------------------------------ GAE

def test_gae_matches_a_hand_computed_case():
    # one env, 3 steps, the episode ends after step 1 (index 1); gamma 0.9, lambda 0.5
    rewards = np.array([[1.0], [2.0], [3.0]], np.float32)
    values = np.array([[0.5], [1.0], [2.0]], np.float32)
    ends = np.array([[0.0], [1.0], [0.0]], np.float32)
    last_value = np.array([4.0], np.float32)
    adv, ret = ppo.compute_gae(rewards, values, ends, last_value, gamma=0.9, lam=0.5)
    d2 = 3.0 + 0.9 * 4.0 - 2.0               # 4.6: bootstraps from the value after the rollout
    d1 = 2.0 + 0.0 - 1.0                     # 1.0: the episode ended, no bootstrap, no carry-over
    d0 = 1.0 + 0.9 * 1.0 - 0.5               # 1.4
    expected = np.array([[d0 + 0.9 * 0.5 * d1], [d1], [d2]], np.float32)
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(ret, expected + values, rtol=1e-6)


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    ends, last = np.zeros((5, 2), np.float32), rng.normal(size=2).astype(np.float32)
    _, ret = ppo.compute_gae(rewards, values, ends, last, gamma=0.99, lam=1.0)
    g = last.copy()
    for t in reversed(range(5)):
        g = rewards[t] + 0.99 * g
        np.testing.assert_allclose(ret[t], g, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ STE

def test_ternary_ste_forward_is_bitlinear_and_gradient_is_identity():
    torch.manual_seed(0)
    w = torch.randn(8, 16, requires_grad=True)
    wq = ternarize_weight_ste(w)
    w_t, gamma = ternarize_weight(w.detach().numpy())
    np.testing.assert_allclose(wq.detach().numpy(), w_t * gamma[0], rtol=1e-6)
    (wq * torch.arange(128.0).reshape(8, 16)).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.arange(128.0).reshape(8, 16))


@pytest.mark.parametrize("quantizer", [quantize_activations_ste, quantize_weight_int8_ste])
def test_int8_ste_passes_gradients_straight_through(quantizer):
    x = torch.randn(4, 32, requires_grad=True)
    q = quantizer(x)
    assert not torch.equal(q, x) and torch.allclose(q, x, atol=x.abs().max().item() / 100)
    q.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones((4, 32)))


def test_int8_weight_ste_equals_the_numpy_int8_quantizer():
    w = torch.randn(6, 10)
    w_q, scale = quantize_weight_int8(w.numpy())
    np.testing.assert_allclose(quantize_weight_int8_ste(w).numpy(), w_q * scale[:, None], rtol=1e-6)


def test_ternary_quantlinear_matches_the_bitlinear_reference():
    torch.manual_seed(1)
    lin = backbones.quantize_(torch.nn.Linear(16, 8), 1.58)
    x = torch.randn(5, 16)
    ref = bitlinear_reference(x.numpy(), *ternarize_weight(lin.weight.detach().numpy()), lin.bias.detach().numpy())
    np.testing.assert_allclose(lin(x).detach().numpy(), ref, atol=1e-5)


def test_ternary_heads_receive_gradients():
    agent = ppo.Agent(4, gym.spaces.Discrete(2), (16,), "relu", 1.58)
    _, logprob, entropy, value = agent.get_action_and_value(torch.randn(8, 4))
    (logprob.sum() + value.sum() + entropy.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.parameters())


# ------------------------------------------------------------------------------------------------ environments

def test_vector_envs_autoreset_in_the_same_step():
    envs = ppo.make_envs("CartPole-v1", 2)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    envs.reset(seed=0)
    for _ in range(100):  # always pushing right ends a CartPole episode within about 10 steps
        obs, _, terminated, _, info = envs.step(np.ones(2, np.int64))
        if terminated.any():
            break
    i = int(np.flatnonzero(terminated)[0])
    assert np.abs(obs[i]).max() <= 0.05            # already the next episode's first observation
    assert np.abs(info["final_obs"][i][2]) > 0.2   # the episode ended with the pole fallen (angle > 12 degrees)


# ------------------------------------------------------------------------------------------------ runs

def test_same_seed_gives_identical_runs_and_another_seed_does_not(tmp_path):
    runs = [ppo.train(tiny(seed=seed, out=str(tmp_path / f"run{i}")), log=lambda s: None)
            for i, seed in enumerate((3, 3, 4))]
    csv = [(tmp_path / f"run{i}" / "progress.csv").read_text() for i in range(3)]
    assert csv[0] == csv[1] and csv[0] != csv[2]
    for a, b in zip(runs[0].agent.state_dict().values(), runs[1].agent.state_dict().values()):
        assert torch.equal(a, b)


def test_ppo_learns_cartpole_above_a_random_policy(cartpole_run):
    rng = np.random.default_rng(0)
    random_returns, _ = evaluate(lambda obs: int(rng.integers(2)), "CartPole-v1", 20, 10_000)
    assert np.mean(random_returns) < 30
    assert np.mean(cartpole_run.eval_returns) > 3 * np.mean(random_returns)
    assert (cartpole_run.out / "learning_curve.png").stat().st_size > 10_000
    assert "charts/episodic_return" in (cartpole_run.out / "progress.csv").read_text()


def test_checkpoint_round_trip_restores_agent_optimizer_and_observation_statistics(cartpole_run):
    path = cartpole_run.out / "checkpoint.safetensors"
    args = ppo.Args(**{**json.loads((cartpole_run.out / "args.json").read_text()), "hidden": (64, 64)})
    agent = ppo.Agent(4, gym.spaces.Discrete(2), args.hidden, args.activation, args.heads_bits)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1.0)
    backbone = backbones.ObsNormalizer(4)
    meta = export.load_checkpoint(path, agent, optimizer, backbone)
    assert meta["global_step"] == cartpole_run.global_step and meta["args"]["env_id"] == "CartPole-v1"
    for (k, a), b in zip(agent.state_dict().items(), cartpole_run.agent.state_dict().values()):
        assert torch.equal(a, b), k
    np.testing.assert_array_equal(backbone.rms.mean, cartpole_run.backbone.rms.mean)
    np.testing.assert_array_equal(backbone.rms.var, cartpole_run.backbone.rms.var)
    assert optimizer.param_groups[0]["lr"] != 1.0 and len(optimizer.state) == len(list(agent.parameters()))
    again = cartpole_run.out / "again.safetensors"
    export.save_checkpoint(again, agent, optimizer, backbone, args, meta["global_step"])
    from safetensors.torch import load_file

    first, second = load_file(str(path)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_exported_policy_carries_normalisation_and_matches_the_torch_agent(cartpole_run):
    loaded = load_policy(cartpole_run.out / "policy.safetensors")
    stats = loaded.input["normalize"]
    np.testing.assert_allclose(stats["mean"], cartpole_run.backbone.rms.mean)
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    with torch.no_grad():
        mine = cartpole_run.agent.actor(torch.from_numpy(cartpole_run.backbone(obs))).numpy()
        theirs = loaded.module(torch.from_numpy(backbones.normalize(obs, stats))).numpy()
    np.testing.assert_allclose(mine, theirs, atol=1e-6)


def test_box_actions_train_and_export_a_clipped_continuous_policy(tmp_path):
    result = ppo.train(tiny("Pendulum-v1", out=str(tmp_path)), log=lambda s: None)
    assert len(result.eval_returns) == 2 and np.all(np.isfinite(result.eval_returns))
    spec = load_policy(tmp_path / "policy.safetensors").output
    assert spec["kind"] == "continuous" and spec["squash"] == "clip" and spec["low"] == [-2.0]
    assert len(spec["log_std"]) == 1


@pytest.mark.parametrize("bits", [8.0, 1.58])
def test_quantized_heads_on_a_frozen_ternary_torso(cartpole_run, tmp_path, bits):
    source = cartpole_run.out / "policy.safetensors"
    result = ppo.train(tiny(backbone=str(source), heads_bits=bits, out=str(tmp_path)), log=lambda s: None)
    backbone = result.backbone
    assert isinstance(backbone, backbones.TorchBackbone) and backbone.dim == 64
    assert all(not p.requires_grad for p in backbone.module.parameters())
    before = load_policy(source).module.net[0].weight
    assert torch.equal(backbone.module[0].weight, before)  # frozen: the torso did not move
    assert all(lin.bits == bits for lin in backbones.linears(result.agent))
    full = load_policy(tmp_path / "policy.safetensors")  # torso + actor head as one MLP
    assert [lin.out_features for lin in backbones.linears(full.module)] == [64, 64, 64, 2]


# ------------------------------------------------------------------------------------------------ compiled

@pytest.fixture(scope="module")
def host_backbone(cartpole_run):
    from bitrl_compile import pipeline

    loaded = export.features_policy(load_policy(cartpole_run.out / "policy.safetensors"))
    return pipeline.compile_policy(loaded, "host", cartpole_run.out / "backbone_host.bitrl").path


def test_features_artifact_equals_the_numpy_reference_torso(cartpole_run, host_backbone):
    from bitrl_compile.runtime import load

    policy = load(host_backbone)
    assert policy.manifest["output"] == {"kind": "features", "dim": 64}
    loaded = load_policy(cartpole_run.out / "policy.safetensors")
    obs = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    x = backbones.normalize(obs, loaded.input["normalize"])
    for lin in backbones.linears(loaded.module)[:-1]:
        w = lin.weight.detach().numpy()
        x = np.maximum(bitlinear_reference(x, *ternarize_weight(w), lin.bias.detach().numpy()), 0)
    np.testing.assert_array_equal(policy.features(obs), x)
    assert policy.features(obs[0]).shape == (64,)
    with pytest.raises(ValueError, match="backbone"):
        policy.act(obs)


def test_on_device_mode_trains_heads_on_the_compiled_backbone(host_backbone, tmp_path):
    result = ppo.train(tiny(backbone=str(host_backbone), heads_bits=1.58, out=str(tmp_path)), log=lambda s: None)
    assert isinstance(result.backbone, backbones.CompiledBackbone)
    assert "torch" not in type(result.backbone.policy).__module__
    heads = load_policy(tmp_path / "policy.safetensors")  # only the heads: they take the backbone's features
    assert heads.input["shape"] == [64] and heads.input["normalize"] is None
    with safe_open(str(tmp_path / "policy.safetensors"), framework="np") as f:
        trained = json.loads(f.metadata()["config"])["trained"]
    assert trained["input_is_backbone_features"] and trained["backbone"] == str(host_backbone)


def test_ternary_heads_policy_compiles_to_the_same_actions_as_the_reference(cartpole_run, tmp_path):
    from bitrl_compile import pipeline
    from bitrl_compile.runtime import load

    ppo.train(tiny(backbone=str(cartpole_run.out / "policy.safetensors"), heads_bits=1.58, out=str(tmp_path)),
              log=lambda s: None)
    loaded = load_policy(tmp_path / "policy.safetensors")
    artifact = load(pipeline.compile_policy(loaded, "host", tmp_path / "p.bitrl").path)
    ref_returns, _ = evaluate(export.reference_act(loaded), "CartPole-v1", 3, 10_000)
    art_returns, _ = evaluate(artifact.act, "CartPole-v1", 3, 10_000)
    assert ref_returns == art_returns


@pytest.mark.slow
def test_on_device_mode_on_rasp4_under_qemu(cartpole_run, tmp_path):
    from bitrl_compile import pipeline

    loaded = export.features_policy(load_policy(cartpole_run.out / "policy.safetensors"))
    artifact = pipeline.compile_policy(loaded, "rasp4", tmp_path / "backbone_rasp4.bitrl").path
    args = tiny(backbone=str(artifact), heads_bits=1.58, total_timesteps=256, out=str(tmp_path / "run"))
    result = ppo.train(args, log=lambda s: None)
    try:
        assert type(result.backbone.policy).__name__ == "EmulatedPolicy"
        obs = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
        torch_backbone = backbones.load_backbone(cartpole_run.out / "policy.safetensors")
        np.testing.assert_allclose(result.backbone(obs), torch_backbone(obs), atol=1e-4)
        assert result.global_step == 256 and len(result.eval_returns) == 2
    finally:
        result.backbone.close()
