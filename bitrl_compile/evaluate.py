"""Run a policy (any `obs -> action` callable) in a gymnasium environment with fixed seeds; `make_env`, the one
place an environment is made, turns a missing extra (Box2D, MuJoCo, ...) into one line naming the pip install."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np


class EnvUnavailable(ValueError):
    """A gymnasium environment cannot be made here; the message (one line) names the package to install."""


def make_env(env_id: str, **kwargs):
    """gymnasium.make(env_id), or EnvUnavailable (one line with the pip command) if a dependency is missing."""
    import gymnasium

    try:
        return gymnasium.make(env_id, **kwargs)
    except gymnasium.error.DependencyNotInstalled as e:
        raise EnvUnavailable(f"environment {env_id} needs a package that is not installed ({_missing(e)}); "
                             f"install it with: {_install_hint(e)}") from None


def _missing(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(" is not installed")[0].split(",")[0][:80] + " is not installed" \
        if " is not installed" in text else text[:120]


def _install_hint(e: BaseException) -> str:
    """The `pip install "gymnasium[extra]"` gymnasium's message names (Box2D also needs swig to build)."""
    extra = re.search(r"gymnasium\[([a-z0-9_\-]+)\]", str(e))
    if extra is None:
        return "pip install the package gymnasium names (see its error with --debug)"
    prefix = "pip install swig && " if "swig" in str(e) else ""
    return f'{prefix}pip install "gymnasium[{extra.group(1)}]"'


class RecurrentActor:
    """The `act` evaluate() takes, for a recurrent policy (input spec "recurrent"): one observation at a time,
    the policy's state carried between steps and started afresh with every episode (evaluate calls reset())."""

    def __init__(self, policy, **act_kwargs):
        self.policy, self.kwargs = policy, act_kwargs
        self.reset()

    def reset(self) -> None:
        self.state, self.start = None, True

    def __call__(self, obs):
        action, self.state = self.policy.act(obs, self.state, self.start, **self.kwargs)
        self.start = False
        return action


def actor(policy, **act_kwargs) -> Callable:
    """evaluate()'s `act` for any PolicyLike: policy.act, or a RecurrentActor for a recurrent policy."""
    if policy.manifest["input"].get("recurrent"):
        return RecurrentActor(policy, **act_kwargs)
    return lambda obs: policy.act(obs, **act_kwargs)


def evaluate(act: Callable, env_id: str, episodes: int, seed: int = 0, progress: bool = False,
             record: list | None = None) -> tuple[list[float], int]:
    """Returns (episode returns, total steps). Episode i is reset with seed + i.

    `record`, when given, receives every observation the policy saw (for action-agreement checks). An `act` with a
    reset() method (a recurrent policy's: `actor`) is reset at the start of every episode.
    """
    env = make_env(env_id)
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
            if hasattr(act, "reset"):  # a recurrent policy's actor: its state starts the episode afresh
                act.reset()
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
