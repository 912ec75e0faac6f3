"""NatureCNN per frame: the compiled ternary artifact (BitConv2d kernels, targets/conv_kernels.py) against torch fp32.

    TVM_NUM_THREADS=1 OMP_NUM_THREADS=1 nice -n 10 python3 bench/bitconv.py [--batch 1 8] [--repeat 200]
    python3 bench/bitconv.py --sb3-zip nature_cnn.zip    # an SB3 PPO CnnPolicy on 84x84x4 uint8 frames, then:
    bitrl-compile bench nature_cnn.zip --batch 8          # vs torch, ONNX Runtime fp32 / int8 (docs/kernels.md)

A NatureCNN policy (SB3's: 8x8/4 32, 4x4/2 64, 3x3/1 64, Linear 3136 -> 512, a 6-action head) on 84x84x4 uint8
frames, random weights, compiled for the host. Prints one table: µs per call and per frame for the whole policy
(Policy.forward, /255 included) and for the three convolutions alone (the conv kernels called directly), one
thread, the median of `--repeat` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def nature_cnn(actions: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 8, 4), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 4, 2),
                              torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, 1), torch.nn.ReLU(), torch.nn.Flatten())
    return torch.nn.Sequential(cnn, torch.nn.Linear(3136, 512), torch.nn.ReLU(), torch.nn.Linear(512, actions)).eval()


def sb3_zip(path: str) -> None:
    """An (untrained, seeded) SB3 PPO CnnPolicy on 84x84x4 uint8 frames, 6 actions, saved to `path`."""
    import gymnasium as gym
    import stable_baselines3 as sb3

    class Frames(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
        action_space = gym.spaces.Discrete(6)

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    sb3.PPO("CnnPolicy", Frames(), seed=0, n_steps=64, batch_size=32).save(path)


def median_us(fn, repeat: int) -> float:
    for _ in range(max(3, repeat // 10)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--sb3-zip", help="only write an SB3 PPO CnnPolicy zip here (for `bitrl-compile bench`)")
    args = parser.parse_args()
    if args.sb3_zip:
        sb3_zip(args.sb3_zip)
        return
    torch.set_num_threads(1)
    from bitrl_compile import pipeline
    from bitrl_compile.loaded import LoadedPolicy
    from bitrl_compile.runtime import load

    module = nature_cnn()
    loaded = LoadedPolicy(module, None, {"shape": [4, 84, 84], "dtype": "float32", "preprocess": "image",
                                         "normalize": None}, {"kind": "discrete", "n": 6, "outputs": "logits"},
                          "bench-nature-cnn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        compiled = pipeline.compile_policy(loaded, "host", Path(tmp) / "cnn.bitrl")
        policy = load(compiled.path)
        for batch in args.batch:
            frames = np.random.default_rng(batch).integers(0, 256, (batch, 4, 84, 84)).astype(np.uint8)
            x = torch.tensor(frames, dtype=torch.float32) / 255
            with torch.no_grad():
                ours = median_us(lambda f=frames: policy.forward(f), args.repeat)
                theirs = median_us(lambda t=x: module(t / 1.0), args.repeat)
                trunk = median_us(lambda t=x: module[0](t), args.repeat)
            rows.append((batch, ours, theirs, trunk))
        policy.close()
    print(f"NatureCNN 84x84x4, host ({os.environ.get('TVM_NUM_THREADS', 'all')} TVM thread(s), torch 1 thread), "
          f"median of {args.repeat}; kernels: {', '.join(k['kernel'] for k in compiled.manifest['kernels'][:3])}")
    print(f"{'batch':>5} | {'bitrl µs/frame':>14} | {'torch fp32 µs/frame':>19} | {'torch convs µs/frame':>20} | speedup")
    for batch, ours, theirs, trunk in rows:
        print(f"{batch:>5} | {ours / batch:>14.1f} | {theirs / batch:>19.1f} | {trunk / batch:>20.1f} | "
              f"{theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
