"""Run a policy (any `obs -> action` callable) in a gymnasium environment with fixed seeds."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def evaluate(act: Callable, env_id: str, episodes: int, seed: int = 0, progress: bool = False,
             record: list | None = None) -> tuple[list[float], int]:
    """Returns (episode returns, total steps). Episode i is reset with seed + i.

    `record`, when given, receives every observation the policy saw (for action-agreement checks).
    """
    import gymnasium as gym

    env = gym.make(env_id)
    returns, steps = [], 0
    episodes_iter = range(episodes)
    bar = None
    if progress:
        import click

        bar = click.progressbar(episodes_iter, label=f"{env_id}", file=__import__("sys").stderr)
        episodes_iter = bar.__enter__()
    try:
        for i in episodes_iter:
            obs, _ = env.reset(seed=seed + i)
            total, done = 0.0, False
            while not done:
                if record is not None:
                    record.append(np.array(obs, copy=True))
                action = act(obs)
                if isinstance(action, np.ndarray) and action.ndim == 0:
                    action = action.item()
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                steps += 1
                done = terminated or truncated
            returns.append(total)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
        env.close()
    return returns, steps
