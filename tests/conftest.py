"""Shared fixtures: tiny Stable-Baselines3 policies trained once per test session, and real observations.

    sb3_trained("ppo", "CartPole-v1", policy_kwargs=...) -> SB3Run(model, path)   (cached per arguments)
    sb3_ppo_cartpole -> Path of a tiny PPO CartPole-v1 .zip (Tanh MLP [64, 64], SB3 defaults)
    cartpole_obs     -> float32 [64, 4] observations from seeded CartPole-v1 rollouts

The budgets are tiny (about a second each): these check loading and compiling, not learning.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

_SB3_DEFAULTS = {
    "ppo": {"n_steps": 64, "batch_size": 32, "n_epochs": 1},
    "a2c": {"n_steps": 8},
    "dqn": {"learning_starts": 16, "buffer_size": 1000, "batch_size": 16},
    "sac": {"learning_starts": 16, "buffer_size": 1000, "batch_size": 16},
    "td3": {"learning_starts": 16, "buffer_size": 1000, "batch_size": 16},
}


class SB3Run(NamedTuple):
    model: object  # a stable_baselines3 algorithm instance
    path: Path  # its saved .zip


@pytest.fixture(scope="session")
def sb3_trained(tmp_path_factory):
    """Factory that trains (once per session and arguments) a tiny SB3 model and saves it as a .zip."""
    cache: dict[str, SB3Run] = {}
    root = tmp_path_factory.mktemp("sb3")

    def train(algo: str, env_id: str, steps: int = 64, seed: int = 0, **kwargs) -> SB3Run:
        key = repr((algo, env_id, steps, seed, sorted(kwargs.items())))
        if key not in cache:
            import stable_baselines3
            import torch

            torch.set_num_threads(1)
            cls = getattr(stable_baselines3, algo.upper())
            model = cls("MlpPolicy", env_id, seed=seed, **{**_SB3_DEFAULTS[algo], **kwargs})
            model.learn(steps)
            path = root / f"{algo}_{env_id}_{len(cache)}.zip"
            model.save(path)
            cache[key] = SB3Run(model, path)
        return cache[key]

    return train


@pytest.fixture(scope="session")
def sb3_ppo_cartpole(sb3_trained) -> Path:
    return sb3_trained("ppo", "CartPole-v1").path


@pytest.fixture(scope="session")
def cartpole_obs() -> np.ndarray:
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    out = []
    while len(out) < 64:
        out.append(obs)
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
        if terminated or truncated:
            obs, _ = env.reset(seed=len(out))
    return np.asarray(out, np.float32)


@pytest.fixture(scope="session")
def q_network(tmp_path_factory):
    """A real Q-network file whose Q-values are ≈ 99 with tiny gaps between the actions (the issue's SB3 DQN
    CartPole: 9 vs 500): its two output rows differ by 2 % of a random vector, which ternarization erases."""
    import torch

    from bitrl_compile.frontends import MLPPolicy, save_mlp_policy

    g = torch.Generator().manual_seed(0)
    net = MLPPolicy([4, 64, 2], "tanh")
    with torch.no_grad():
        net.net[0].weight.copy_(torch.randn(64, 4, generator=g))
        net.net[0].bias.zero_()
        v, u = torch.randn(64, generator=g), torch.randn(64, generator=g)
        net.net[2].weight.copy_(torch.stack([v, v + 0.02 * u]))
        net.net[2].bias.fill_(99.0)
    path = tmp_path_factory.mktemp("q") / "q.safetensors"
    save_mlp_policy(path, net, {"obs_shape": [4], "hidden": [64], "activation": "tanh",
                                "output": {"kind": "discrete", "n": 2, "outputs": "q_values"}})
    return path
