"""Built-in example environments: small, real tasks for the cases a vector CartPole does not show (pixels).

    import bitrl_compile.envs                      # registers them with gymnasium
    gymnasium.make("BitrlPixelCartPole-v0")
    bitrl-compile cnn.zip --env bitrl_compile.envs:BitrlPixelCartPole-v0 --keep 0.99   # gymnasium's "module:id"

BitrlDictCartPole-v0: CartPole-v1 whose observation is a Dict of two Box keys, {"position": [x, theta], "velocity":
[x_dot, theta_dot]}: what SB3's MultiInputPolicy takes.

BitrlPixelCartPole-v0: CartPole-v1 seen as 36x36x3 uint8 frames (NatureCNN's smallest input): the cart and the pole
drawn from the state, channel k the frame k steps ago (the velocities are in their differences). A convolutional
policy (SB3's CnnPolicy) learns it from the pixels alone in a few thousand steps; the tests and bench/distill.py
train their CNN teachers on it.

Floor layer: gymnasium and numpy only.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

PIXEL_CARTPOLE = "BitrlPixelCartPole-v0"
DICT_CARTPOLE = "BitrlDictCartPole-v0"
SIZE = 36


class PixelCartPole(gym.ObservationWrapper):
    """CartPole-v1 as SIZE x SIZE x 3 uint8 frames: cart and pole drawn from the state; channel k is the frame k steps
    ago."""

    def __init__(self, render_mode: str | None = None):
        super().__init__(gym.make("CartPole-v1", render_mode=render_mode))
        self.observation_space = gym.spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
        self.frames = np.zeros((SIZE, SIZE, 3), np.uint8)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.frames = np.repeat(draw(obs)[..., None], 3, axis=-1)
        return self.frames.copy(), info

    def observation(self, obs):
        self.frames = np.concatenate([draw(obs)[..., None], self.frames[..., :2]], axis=-1)
        return self.frames.copy()


class DictCartPole(gym.ObservationWrapper):
    """CartPole-v1 whose observation is {"position": [x, theta], "velocity": [x_dot, theta_dot]} (float32)."""

    def __init__(self, render_mode: str | None = None):
        super().__init__(gym.make("CartPole-v1", render_mode=render_mode))
        low, high = self.env.observation_space.low, self.env.observation_space.high
        self.observation_space = gym.spaces.Dict({
            "position": gym.spaces.Box(low[[0, 2]], high[[0, 2]], dtype=np.float32),
            "velocity": gym.spaces.Box(low[[1, 3]], high[[1, 3]], dtype=np.float32)})

    def observation(self, obs):
        return {"position": obs[[0, 2]].astype(np.float32), "velocity": obs[[1, 3]].astype(np.float32)}


def draw(state) -> np.ndarray:
    """One SIZE x SIZE uint8 frame of a CartPole state: the cart a 3 x 7 bar (255) on row 28-30 at its position,
    the pole a 20-pixel line (200) from the cart at its angle."""
    x, _, theta, _ = (float(v) for v in state)
    frame = np.zeros((SIZE, SIZE), np.uint8)
    cx = min(max(round((x + 2.4) / 4.8 * (SIZE - 1)), 0), SIZE - 1)
    frame[28:31, max(cx - 3, 0):cx + 4] = 255
    t = np.linspace(0, 1, 24)
    i, j = np.round(28 - 20 * t * np.cos(theta)).astype(int), np.round(cx + 20 * t * np.sin(theta)).astype(int)
    inside = (i >= 0) & (i < SIZE) & (j >= 0) & (j < SIZE)
    frame[i[inside], j[inside]] = 200
    return frame


for _name, _entry in ((PIXEL_CARTPOLE, PixelCartPole), (DICT_CARTPOLE, DictCartPole)):
    if _name not in gym.registry:
        gym.register(_name, entry_point=_entry)
