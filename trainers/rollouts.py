"""The states a distillation trains and picks its student on: vector environments stepped by teacher and student.

    rollouts = Rollouts("CartPole-v1", 8, seed, spec, stats, epsilon=0.1)
    x = rollouts.collect(128, [teacher, student], beta=0.5)      # DAgger: each env's action from either, with noise
    held = Rollouts(...).whole_episodes(teacher, 2048)          # held-out: spread over whole teacher episodes

States come normalised as the policy takes them (a Dict observation flattened in the manifest's key order), or with
`shaped` in the observation's shape, or with `image` as the environment's uint8 frames (trainers/distill.py).
"""

from __future__ import annotations

import math

import numpy as np

from bitrl_compile.runtime.policy import flatten_observations, postprocess
from bitrl_compile.trainers.backbones import normalize
from bitrl_compile.trainers.ppo import make_envs


def explore(spec: dict, action: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Exploration noise on a batch of env actions: a random action with probability epsilon (Discrete), or
    Gaussian noise of epsilon times the half range, clipped to the bounds (Box)."""
    if spec["kind"] == "discrete":
        random = rng.random(len(action)) < epsilon
        return np.where(random, rng.integers(0, spec["n"], len(action)), action)
    low = np.asarray(spec["low"], np.float32).reshape(spec["shape"])
    high = np.asarray(spec["high"], np.float32).reshape(spec["shape"])
    half = np.where(np.isfinite(high - low), (high - low) / 2, 1.0)
    noisy = action + epsilon * half * rng.standard_normal(action.shape).astype(np.float32)
    return np.clip(noisy, low, high).astype(np.float32)


class Rollouts:
    """Vector environments stepped by a mix of teacher and student, with exploration noise; normalised states (or,
    with `shaped`, for a CNN: the observations in their shape, float32, or with `image` the environment's frames as
    they come)."""

    def __init__(self, env_id: str, num_envs: int, seed: int, spec: dict, stats: dict | None, epsilon: float,
                 image: bool = False, shaped: bool = False, input_spec: dict | None = None):
        self.envs = make_envs(env_id, num_envs)
        self.spec, self.stats, self.epsilon, self.image, self.shaped = spec, stats, epsilon, image, shaped or image
        self.input_spec = input_spec  # a Dict observation: each batch flattened as the policy takes it
        self.rng = np.random.default_rng(seed)
        self.envs.action_space.seed(seed)
        obs, _ = self.envs.reset(seed=seed)
        self.obs = obs

    def collect(self, steps: int, actors: list, beta: float, noise: bool = True) -> np.ndarray:
        """`steps` vector steps; each env's action comes from actors[0] (the teacher) with probability beta, else
        actors[1] (both given states as stored). Returns the normalised states seen [steps * num_envs, obs] (frames:
        [steps * num_envs, *shape] as the environment gives them)."""
        states = []
        n = self.envs.num_envs
        for _ in range(steps):
            x = self._states()
            states.append(x)
            use_teacher = self.rng.random(n) < beta
            out = actors[0](x) if use_teacher.all() else np.where(use_teacher[:, None], actors[0](x), actors[1](x))
            action = postprocess(self.spec, out)
            if noise and self.epsilon > 0:
                action = self._explore(action)
            self.obs, *_ = self.envs.step(action)
        return np.concatenate(states)

    def whole_episodes(self, actor, states: int, max_bytes: int = 64 << 20) -> np.ndarray:
        """`states` states spread evenly over the steps of `actor` (no noise) until every environment has ended an
        episode and at least `states` were seen: the late phases of long episodes too (a LunarLander's landing),
        which a fixed number of steps from the start would miss. At most the environment's step limit of steps
        (frames: at most `max_bytes` of them) or `states / num_envs`, whichever is more."""
        n = self.envs.num_envs
        x = self._states()
        limit = self.envs.get_attr("spec")[0].max_episode_steps or 1000
        cap = max(math.ceil(states / n), min(limit, max_bytes // max(1, n * x[0].nbytes)))
        ended, seen = np.zeros(n, bool), []
        for step in range(cap):
            seen.append(x)
            self.obs, _, terminated, truncated, _ = self.envs.step(postprocess(self.spec, actor(x)))
            ended |= np.asarray(terminated) | np.asarray(truncated)
            if ended.all() and (step + 1) * n >= states:
                break
            x = self._states()
        seen = np.concatenate(seen)
        return seen[np.unique(np.linspace(0, len(seen) - 1, min(states, len(seen))).round().astype(np.int64))]

    def _states(self) -> np.ndarray:
        obs = flatten_observations(self.input_spec, self.obs) if self.input_spec else self.obs
        return np.array(obs, None if self.image else np.float32) if self.shaped else normalize(obs, self.stats)

    def _explore(self, action: np.ndarray) -> np.ndarray:
        return explore(self.spec, action, self.epsilon, self.rng)

    def close(self) -> None:
        self.envs.close()
