"""Train the shipped demo policy: PPO on CartPole-v1 that keeps its return after ternary quantization.

    python examples/train_demo_policy.py            # writes bitrl_compile/examples/cartpole_ppo.safetensors

1. PPO (Stable-Baselines3, RL-Zoo CartPole hyperparameters) with a ReLU [64, 64] actor, in float32.
2. Quantization-aware fine-tune: the actor's Linear layers are switched in place to fake-quant BitLinear
   (`ternarize_weight_ste` on the weight, `quantize_activations_ste` on the input, straight-through gradients)
   and PPO continues from where it stopped, so the policy learns to act well with ternary weights and int8
   activations. The critic stays float32 (it is not shipped).
3. Evaluation on 20 seeded episodes of the float32 policy and of its ternary post-training quantization with the
   numpy reference (`bitrl_compile.quant`): each Linear computes (gamma * W_t) @ (x_q / s) + b.
4. `save_mlp_policy` writes the actor (net.0, net.2, net.4) with its config: the latent float weights, whose
   ternary PTQ is exactly the policy trained in step 2.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from torch import nn

from bitrl_compile.frontends import save_mlp_policy
from bitrl_compile.quant import (
    quantize_activations,
    quantize_activations_ste,
    ternarize_weight,
    ternarize_weight_ste,
)

OUT = Path(__file__).resolve().parents[1] / "bitrl_compile" / "examples" / "cartpole_ppo.safetensors"


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward is BitLinear with straight-through gradients (same parameters, same keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(quantize_activations_ste(x), ternarize_weight_ste(self.weight), self.bias)


def actor_layers(model: PPO) -> list[nn.Linear]:
    pol = model.policy
    return [m for m in pol.mlp_extractor.policy_net if isinstance(m, nn.Linear)] + [pol.action_net]


def numpy_forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, ternary: bool) -> np.ndarray:
    """Actor logits for a [B, 4] batch; with ternary=True through the BitNet b1.58 reference quantizers."""
    for i, (w, b) in enumerate(layers):
        if ternary:
            x_q, s = quantize_activations(x)
            x = x_q.astype(np.float32) / s[:, None]
            w_t, gamma = ternarize_weight(w)
            w = w_t.astype(np.float32) * gamma[0]
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def evaluate(layers, ternary: bool, episodes: int, seed: int) -> float:
    env = gym.make("CartPole-v1")
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            action = int(np.argmax(numpy_forward(layers, obs[None].astype(np.float32), ternary)[0]))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--fp32-steps", type=int, default=100_000)
    p.add_argument("--qat-steps", type=int, default=50_000)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    t0 = time.time()
    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                ent_coef=0.0, learning_rate=lambda f: 1e-3 * f, clip_range=lambda f: 0.2 * f, seed=args.seed,
                policy_kwargs={"activation_fn": nn.ReLU, "net_arch": args.hidden})
    model.learn(args.fp32_steps)

    def snapshot():
        return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()) for m in actor_layers(model)]

    fp32_layers = snapshot()
    fp32 = evaluate(fp32_layers, False, args.eval_episodes, args.eval_seed)
    ptq = evaluate(fp32_layers, True, args.eval_episodes, args.eval_seed)
    print(f"after {args.fp32_steps} fp32 PPO steps: fp32 return {fp32:.1f}, ternary PTQ return {ptq:.1f}")

    if args.qat_steps:
        for m in actor_layers(model):
            m.__class__ = FakeQuantLinear  # same Parameters: the optimizer state carries over
        model.learn(args.qat_steps, reset_num_timesteps=False)
        for m in actor_layers(model):
            m.__class__ = nn.Linear
    layers = snapshot()
    fp32_final = evaluate(layers, False, args.eval_episodes, args.eval_seed)
    ternary = evaluate(layers, True, args.eval_episodes, args.eval_seed)
    print(f"after {args.qat_steps} QAT PPO steps: fp32 return {fp32_final:.1f}, ternary return {ternary:.1f} "
          f"({100 * ternary / max(fp32, 1e-9):.0f}% of the fp32 policy's {fp32:.1f})")

    state = {f"net.{2 * i}.{k}": torch.from_numpy(v) for i, (w, b) in enumerate(layers)
             for k, v in (("weight", w), ("bias", b))}
    config = {"arch": "mlp", "obs_shape": [4], "hidden": list(args.hidden), "activation": "relu",
              "output": {"kind": "discrete", "n": 2, "outputs": "logits"},
              "trained": {"algo": "SB3 PPO + ternary QAT", "env": "CartPole-v1", "seed": args.seed,
                          "fp32_steps": args.fp32_steps, "qat_steps": args.qat_steps,
                          f"fp32_return_{args.eval_episodes}ep": fp32_final,
                          f"ternary_return_{args.eval_episodes}ep": ternary}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_mlp_policy(args.out, state, config)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
