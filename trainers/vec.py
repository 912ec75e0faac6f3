"""Vector environments for the trainers: gymnasium's sync or async (a process per env, every core), or EnvPool.

    make_envs(env_id, num_envs, vec="sync")     vec: sync | async | auto | envpool (optional, not a dependency)
    resolve_vec(vec, num_envs, env_id)          auto -> async when the machine has more than one core,
                                                num_envs > 1 and one step of the env costs more than
                                                ASYNC_STEP_SECONDS (measured: `step_seconds`), else sync

Why the step cost: a process per env pays a pipe round trip per step (and, with more envs than cores, a context switch), which costs more than
it saves for cheap envs. Measured with the RL Zoo settings on 2 cores (bench/results/ppo_zoo.md), async ran at
0.68x (CartPole-v1), 0.49x (Acrobot-v1) and 0.39x (LunarLander-v3) the speed of sync: there `auto` is sync.

Autoreset. gymnasium 1.x vector envs default to NEXT_STEP autoreset (the step after a done returns the next
episode's first observation, with reward 0, and ignores that step's action); the trainers ask gymnasium for
SAME_STEP instead (the observation returned with a done is already the next episode's first, the last one is
`info["final_obs"]`), which Sync and Async give alike. EnvPool autoresets on the next step; `envs.next_step`
says so, and the PPO rollout then treats the step after a done as no transition (masked out of the update) and
bootstraps a truncated episode from the observation returned with the done. `autoreset="next_step"` gives
gymnasium's NEXT_STEP mode too, so that path is tested without EnvPool.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

VEC_MODES = ("auto", "sync", "async", "envpool")
ASYNC_STEP_SECONDS = 1e-3  # Acrobot-v1 steps in about 0.2 ms and ran at half speed async: well above that


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def step_seconds(env_id: str, steps: int = 200) -> float:
    """Mean seconds of one step of one env_id env (random actions, reset when an episode ends)."""
    import time

    env = gym.make(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    seconds = (time.perf_counter() - t0) / steps
    env.close()
    return seconds


def resolve_vec(vec: str, num_envs: int, env_id: str | None = None) -> str:
    """The vector env mode `vec` stands for (auto: see the module's docstring; without env_id, auto is async
    whenever there are cores and envs to use)."""
    if vec not in VEC_MODES:
        raise ValueError(f"vector env mode {vec!r} is not one of {', '.join(VEC_MODES)}")
    if vec == "auto":
        parallel = cores() > 1 and num_envs > 1
        return "async" if parallel and (env_id is None or step_seconds(env_id) > ASYNC_STEP_SECONDS) else "sync"
    return vec


def make_envs(env_id: str, num_envs: int, vec: str = "sync", seed: int | None = None,
              autoreset: str = "same_step"):
    """`num_envs` copies of env_id as one vector env with `next_step` (bool) set: False for gymnasium's
    SAME_STEP autoreset (the default here), True for NEXT_STEP (EnvPool, or autoreset="next_step").
    `seed` is used only by EnvPool, which is seeded when made (gymnasium's are seeded by reset(seed=...))."""
    mode = resolve_vec(vec, num_envs)
    if mode == "envpool":
        return EnvPoolVec(env_id, num_envs, seed or 0)
    if autoreset not in ("same_step", "next_step"):
        raise ValueError(f"autoreset {autoreset!r} is not same_step or next_step")
    reset_mode = gym.vector.AutoresetMode.SAME_STEP if autoreset == "same_step" else gym.vector.AutoresetMode.NEXT_STEP
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode,
                        vector_kwargs={"autoreset_mode": reset_mode})
    envs.next_step = autoreset == "next_step"
    return envs


class EnvPoolVec:
    """EnvPool's gymnasium API (synchronous batches: all envs step together, results in env order) with the parts of
    gymnasium's vector env interface the trainers use. EnvPool autoresets on the next step (`next_step = True`)."""

    next_step = True

    def __init__(self, env_id: str, num_envs: int, seed: int):
        try:
            import envpool
        except ImportError as e:
            raise ValueError("--vec envpool needs EnvPool: pip install envpool (or use --vec sync|async)") from e
        if env_id not in envpool.list_all_envs():
            raise ValueError(f"EnvPool has no {env_id}; use --vec sync|async")
        self.env = envpool.make_gymnasium(env_id, num_envs=num_envs, seed=seed)
        self.num_envs = num_envs
        self.single_observation_space = self.env.observation_space
        self.single_action_space = self.env.action_space
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def reset(self, seed: int | None = None):
        obs, info = self.env.reset()
        return np.asarray(obs), info

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(np.asarray(actions))
        return np.asarray(obs), np.asarray(reward), np.asarray(terminated), np.asarray(truncated), info

    def close(self) -> None:
        self.env.close()
