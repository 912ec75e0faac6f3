"""Self-supervised pretraining of a small BitNet b1.58 state encoder on environment rollouts, in one file.

    bitrl-compile pretrain-bitnet --env-id CartPole-v1 --out runs/bitnet-CartPole-v1
    bitrl-compile pretrain-bitnet --env-id LunarLander-v3 --teacher runs/fp32/policy.safetensors
    bitrl-compile train --env CartPole-v1 --backbone runs/bitnet-CartPole-v1       # then: PPO heads on it, frozen

1. Data: `steps` transitions (obs, action, reward, next obs) from vector environments (SAME_STEP autoreset, the
   true final observation of an episode from info["final_obs"]). The behaviour is uniformly random actions or,
   with a `teacher` policy file, the teacher's deterministic action with probability 1 - `epsilon` and a random one
   otherwise, so that the data also holds the states a good policy visits (landing, balancing at the top).
   The teacher's actions are never a target: nothing is distilled from it.
2. Model: `bitnet.BitNetBackbone` of the architecture `Args.model` (a `bitnet.BitNetConfig`; numeric encoder: one
   token per observation value, a readout token; features = the readout token's final hidden state), trained
   quantization-aware from the first step (ternary weights and int8 activations with straight-through gradients),
   so the frozen model is exactly what the compiler ternarizes.
3. Objective (targets standardised per dimension): from the features alone, reconstruct the observation; from the
   features and the action, predict the change of the observation and the reward. The two prediction heads are
   small float MLPs and are thrown away; only the backbone is saved, as a BitNet checkpoint folder
   (`bitnet.save_backbone`: config.json + model.safetensors with the observation statistics).
Logs `loss/recon`, `loss/dynamics`, `loss/reward` (fraction of target variance left, on held-out transitions) to
progress.csv in `out`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from bitrl_compile import bitnet
from bitrl_compile.evaluate import make_env


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    seed: int = 0
    steps: int = 50_000              # transitions collected
    num_envs: int = 16
    teacher: str | None = None       # a policy file whose actions (with prob. 1 - epsilon) drive the rollouts
    epsilon: float = 0.3
    model: bitnet.BitNetConfig = dataclasses.field(default_factory=bitnet.BitNetConfig)  # the architecture
    encoder: str = "numeric"         # numeric (a token per value) | text (the state as text, a token per byte)
    patch: int = 1                   # numeric: values per token
    decimals: int = 2                # text: digits after the point
    updates: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    holdout: float = 0.05            # fraction of transitions kept for the held-out losses
    out: str | None = None
    torch_threads: int = 1


# ------------------------------------------------------------------------------------------------ data

def teacher_act(path: str):
    """obs batch -> deterministic actions of a policy file (float32 forward of its module, with its statistics)."""
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.trainers.backbones import normalize

    loaded = load_policy(path)
    module, stats = loaded.module.eval(), loaded.input.get("normalize")

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(normalize(obs, stats))).argmax(1).numpy()

    return act


def collect(args: Args, log) -> dict[str, np.ndarray]:
    """Transitions under the behaviour policy: obs, action, reward, next_obs (the true last one at episode ends)."""
    from bitrl_compile.trainers.ppo import make_envs

    envs = make_envs(args.env_id, args.num_envs)
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        raise ValueError(  # noqa: TRY004 - a user error (exit code 1)
            f"{args.env_id}: pretraining supports Discrete action spaces (the dynamics head predicts per action)")
    envs.action_space.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    teacher = teacher_act(args.teacher) if args.teacher else None
    obs, _ = envs.reset(seed=args.seed)
    data: dict[str, list] = {"obs": [], "action": [], "reward": [], "next_obs": []}
    while len(data["obs"]) * args.num_envs < args.steps:
        action = envs.action_space.sample()
        if teacher is not None:
            greedy = rng.random(args.num_envs) >= args.epsilon
            action = np.where(greedy, teacher(obs), action)
        next_obs, reward, terminated, truncated, info = envs.step(action)
        true_next = next_obs.copy()
        for i in np.flatnonzero(terminated | truncated):
            true_next[i] = info["final_obs"][i]
        for key, value in (("obs", obs), ("action", action), ("reward", reward), ("next_obs", true_next)):
            data[key].append(np.asarray(value))
        obs = next_obs
    envs.close()
    out = {k: np.concatenate(v).astype(np.float32 if k != "action" else np.int64) for k, v in data.items()}
    log(f"collected {len(out['obs'])} transitions of {args.env_id} "
        f"({'teacher ' + args.teacher + f', epsilon {args.epsilon}' if teacher else 'random actions'})")
    return out


# ------------------------------------------------------------------------------------------------ model

class Predictors(nn.Module):
    """The throw-away heads: features -> observation; features + one-hot action -> (change of obs, reward)."""

    def __init__(self, dim: int, obs_dim: int, n_actions: int, width: int = 128):
        super().__init__()
        self.n_actions = n_actions
        self.recon = nn.Linear(dim, obs_dim)
        self.dynamics = nn.Sequential(nn.Linear(dim + n_actions, width), nn.ReLU(), nn.Linear(width, obs_dim + 1))

    def forward(self, f: torch.Tensor, action: torch.Tensor):
        onehot = nn.functional.one_hot(action, self.n_actions).float()
        out = self.dynamics(torch.cat((f, onehot), dim=1))
        return self.recon(f), out[:, :-1], out[:, -1]


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    return ((x - mean) / std).astype(np.float32), mean, std


# ------------------------------------------------------------------------------------------------ training

def pretrain(args: Args, log=lambda s: print(s, file=sys.stderr)) -> bitnet.BitNetBackbone:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    data = collect(args, log)
    obs_dim, n_actions = data["obs"].shape[1], int(make_env(args.env_id).action_space.n)

    # observation statistics: part of the backbone (applied by `prepare` in torch and by the runtime's manifest)
    mean, var = data["obs"].mean(axis=0), data["obs"].var(axis=0)
    stats = {"mean": mean.astype(float).tolist(), "var": var.astype(float).tolist(), "eps": 1e-8, "clip": 10.0}
    spec = bitnet.EncoderSpec(kind=args.encoder, obs_dim=obs_dim, patch=args.patch, decimals=args.decimals,
                              normalize=stats if args.encoder == "numeric" else None, env=args.env_id)
    backbone = bitnet.new_backbone(args.model, spec, args.seed).train()   # BitLinear layers are quantized (QAT)
    heads = Predictors(backbone.dim, obs_dim, n_actions)

    def normalised(o: np.ndarray) -> torch.Tensor:  # targets: normalised observations, for either encoder
        return torch.from_numpy(np.clip((o - mean) / np.sqrt(var + 1e-8), -10, 10).astype(np.float32))

    x = backbone.prepare(data["obs"])  # the encoder's input: normalised values, or the state's text as bytes
    recon_target = normalised(data["obs"])
    delta, _, _ = standardise((normalised(data["next_obs"]) - recon_target).numpy())
    reward, _, _ = standardise(data["reward"][:, None])
    delta, reward, action = torch.from_numpy(delta), torch.from_numpy(reward[:, 0]), torch.from_numpy(data["action"])
    n = len(x)
    perm = torch.from_numpy(np.random.permutation(n))
    n_hold = max(int(n * args.holdout), 1)
    hold, train_idx = perm[:n_hold], perm[n_hold:]

    params = list(backbone.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = max(args.updates // 20, 1)  # linear warm-up, then cosine decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(u / args.updates, 1.0))))
    out = Path(args.out) if args.out else None
    rows = []

    def losses(idx):
        recon, d_pred, r_pred = heads(backbone(x[idx]), action[idx])
        return (((recon - recon_target[idx]) ** 2).mean(), ((d_pred - delta[idx]) ** 2).mean(),
                ((r_pred - reward[idx]) ** 2).mean())

    for update in range(1, args.updates + 1):
        idx = train_idx[torch.randint(len(train_idx), (args.batch_size,))]
        l_recon, l_dyn, l_rew = losses(idx)
        loss = l_recon + l_dyn + 0.5 * l_rew
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if update % max(args.updates // 10, 1) == 0 or update == args.updates:
            with torch.no_grad():
                held = [float(v) for v in losses(hold)]
            rows += [(update, name, v) for name, v in zip(("loss/recon", "loss/dynamics", "loss/reward"), held)]
            log(f"update {update:5d}/{args.updates}: held-out unexplained variance recon {held[0]:.3f} "
                f"dynamics {held[1]:.3f} reward {held[2]:.3f}  ({time.perf_counter() - started:.0f} s)")

    backbone.eval()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        bitnet.save_backbone(backbone, out)
        (out / "pretrain_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        with open(out / "progress.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "name", "value"])
            writer.writerows(rows)
        log(f"wrote {out} ({bitnet.parameter_count(backbone):,} parameters; "
            f"train heads on it: bitrl-compile train --env {args.env_id} --backbone {out})")
    return backbone
