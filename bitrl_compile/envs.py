"""Built-in example environments: small, real tasks for the cases a vector CartPole does not show (pixels).

    import bitrl_compile.envs                      # registers them with gymnasium
    gymnasium.make("BitrlPixelCartPole64-v0")
    bitrl-compile cnn.zip --env bitrl_compile.envs:BitrlPixelCartPole-v0 --keep 0.99   # gymnasium's "module:id"

BitrlDictCartPole-v0: CartPole-v1 whose observation is a Dict of two Box keys, {"position": [x, theta], "velocity":
[x_dot, theta_dot]}: what SB3's MultiInputPolicy takes.

BitrlPixelCartPole-v0: CartPole-v1 seen as 36x36x3 uint8 frames (NatureCNN's smallest input): the cart and the pole
drawn from the state, channel k the frame k steps ago (the velocities are in their differences). A convolutional
policy (SB3's CnnPolicy) of a few thousand steps decides its frames (the tests train such tiny teachers on it, to
check agreement), but does not balance the pole: one pixel is 0.13 of the track, a 20-pixel pole moves a fifth of a
pixel per step, so the velocities hardly show, and NatureCNN's third convolution sees a 1 x 1 map.

BitrlPixelCartPole64-v0: the pixel task a NatureCNN learns (bench/distill.py --cnn's teachers, issue 17): 64x64x4
uint8 frames, channel k the frame k steps ago (4 frames, as NatureCNN is used on Atari), drawn antialiased so that a
sub-pixel move changes the pixels' values (the pole's angular velocity is then in the frames' differences), a
38-pixel pole 3 pixels thick (255) on a 13 x 4 cart (153); NatureCNN's maps are 15, 6 and 4 pixels wide.

Floor layer: gymnasium and numpy only.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

PIXEL_CARTPOLE = "BitrlPixelCartPole-v0"
PIXEL_CARTPOLE_64 = "BitrlPixelCartPole64-v0"
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


class PixelCartPole64(gym.ObservationWrapper):
    """CartPole-v1 as 64 x 64 x 4 uint8 antialiased frames (`draw_antialiased`); channel k is the frame k steps
    ago."""

    size, frames = 64, 4

    def __init__(self, render_mode: str | None = None):
        super().__init__(gym.make("CartPole-v1", render_mode=render_mode))
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, self.frames), np.uint8)
        self.stack = np.zeros((self.size, self.size, self.frames), np.uint8)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.stack = np.repeat(draw_antialiased(obs, self.size)[..., None], self.frames, axis=-1)
        return self.stack.copy(), info

    def observation(self, obs):
        self.stack = np.concatenate([draw_antialiased(obs, self.size)[..., None], self.stack[..., :-1]], axis=-1)
        return self.stack.copy()


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


def draw_antialiased(state, size: int = 64) -> np.ndarray:
    """One size x size uint8 frame of a CartPole state, each pixel's value the share of it covered (so a move of a
    tenth of a pixel shows): the cart a bar 0.2 size wide (153) on rows 0.8 size + [0, size / 16), centred at its
    position (the track's +-2.4 over the middle three quarters), the pole a segment 0.6 size long and 3 / 64 size
    thick (255) from the cart's top at its angle."""
    x, _, theta, _ = (float(v) for v in state)
    centres = np.arange(size, dtype=np.float32) + 0.5
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    base, cx = 0.8 * size, size / 2 + x / 2.4 * 0.375 * size
    frame = np.zeros((size, size), np.float32)
    on_track = (centres > base) & (centres < base + size / 16)
    frame[on_track] = 0.6 * np.clip(0.1 * size + 0.5 - np.abs(centres - cx), 0, 1)
    dy, dx = -0.6 * size * np.cos(theta), 0.6 * size * np.sin(theta)  # base -> tip
    t = np.clip(((rows - base) * dy + (cols - cx) * dx) / (dy * dy + dx * dx), 0, 1)
    distance = np.hypot(rows - base - t * dy, cols - cx - t * dx)
    frame = np.maximum(frame, np.clip(1.5 * size / 64 + 0.5 - distance, 0, 1))
    return (frame * 255 + 0.5).astype(np.uint8)


for _name, _entry in ((PIXEL_CARTPOLE, PixelCartPole), (PIXEL_CARTPOLE_64, PixelCartPole64),
                      (DICT_CARTPOLE, DictCartPole)):
    if _name not in gym.registry:
        gym.register(_name, entry_point=_entry)
