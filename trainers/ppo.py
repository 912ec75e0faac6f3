"""PPO with a frozen ternary backbone and trainable (optionally quantized) heads, in one file (CleanRL style).

    python -m bitrl_compile.trainers.ppo --env-id CartPole-v1 --total-timesteps 100000
    bitrl-compile train --env CartPole-v1 --steps 100000 [--backbone FILE] [--heads-bits 32|8|1.58]
    bitrl-compile finetune policy.zip --env CartPole-v1          # QAT: an fp32 policy becomes ternary

The network is  observation -> backbone (frozen) -> features -> actor head / critic head (trained).

Backbones (anything with `dim` and `__call__(obs_batch) -> float32 features [B, dim]`; frozen, so the rollout
stores features and the update never runs the backbone again):
    ObsNormalizer     no backbone: the features are the observations, normalised with running statistics
                      (updated during rollouts, saved in the checkpoint, baked into the artifact's manifest as
                      "input.normalize"). The heads are then the whole actor and critic: plain PPO (fp32) or
                      QAT (ternary heads, `--heads-bits 1.58`).
    TorchBackbone     any frozen torch module, with the observation statistics it was trained with. From a
                      policy file it is the policy's torso (every Linear but the last, each a ternary BitLinear
                      with int8 activations, as compiled). A BitNet transformer plugs in here the same way.
    CompiledBackbone  a compiled artifact whose manifest output kind is "features" (`bitrl-compile MODEL
                      --features`): the forward runs in the TVM runtime (`policy.features(obs)`, numpy, no torch),
                      natively or, for a rasp4 artifact, in an aarch64 Python under qemu. The heads train in torch.
Heads are MLPs whose Linear layers are fp32 (bits 32), int8 weights and activations (8) or ternary BitLinear (1.58),
quantized with the straight-through estimator from `bitrl_compile.quant`. The compiler emits ternary layers only:
ternary heads compile to exactly what was trained, fp32 and int8 heads get ternarized (post-training) by it.
To plug in another backbone (e.g. a BitNet model): `TorchBackbone(module, dim, stats)` for any frozen module that
maps [B, *obs] float32 to [B, dim], or any object with `dim` and `__call__(obs, update=False) -> features`.

Where a pretrained backbone comes from here: the torso of a trained policy, e.g. of a QAT run of this trainer
(its torso is ternary by training). `finetune` is QAT of an existing policy: its actor becomes the ternary heads
(no backbone), a fresh critic is warmed up before the actor moves, and the observation statistics stay frozen.

Vector environments use gymnasium's SAME_STEP autoreset (set explicitly): the observation returned with a done is
already the next episode's first; the last one is `info["final_obs"]`, whose value bootstraps truncated episodes.
Outputs in `--out`: progress.csv (step,name,value; no wall-clock values, so equal seeds give equal files),
TensorBoard events when `tensorboard` is installed, checkpoint.safetensors (agent, Adam state, observation
statistics; `load_checkpoint` restores them, there is no resume of a run yet), policy.safetensors (compile it with
`bitrl-compile`), learning_curve.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Normal

from bitrl_compile.frontends import ACTIVATIONS, MLPPolicy, save_mlp_policy
from bitrl_compile.quant import quantize_activations_ste, quantize_weight_int8_ste, ternarize_weight_ste

HEAD_BITS = (32.0, 8.0, 1.58)


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    total_timesteps: int = 100_000
    seed: int = 0
    num_envs: int = 8
    num_steps: int = 128             # rollout length per env; batch = num_envs * num_steps
    learning_rate: float = 3e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    norm_obs: bool = True            # running mean/std of observations (no-backbone mode)
    norm_reward: bool = False        # scale rewards by the running std of the discounted return (training only)
    clip_obs: float = 10.0
    hidden: tuple[int, ...] | None = None  # head MLP widths; None: (64, 64) without a backbone, (64,) with one
    activation: str = "relu"         # ReLU: compiled artifacts are bit-exact with the numpy reference
    heads_bits: float = 32.0         # 32, 8 or 1.58
    backbone: str | None = None      # a policy file (its torso, in torch) or a "features" .bitrl (runtime)
    init_policy: str | None = None   # finetune: start the actor from this policy (frozen obs statistics)
    critic_warmup: int = 0           # first iterations train only the critic (finetune: a fresh critic)
    distill_coef: float = 0.0        # finetune: + coef * KL(initial fp32 policy || ternary policy) on rollout states
    eval_every: int = 10_000         # steps between deterministic evaluations (0: only at the end)
    eval_episodes: int = 10
    eval_seed: int = 10_000          # evaluation episode i is reset with eval_seed + i
    out: str | None = None           # output folder; None: nothing written
    progress: bool = True
    tensorboard: bool = True
    torch_threads: int = 1


# Hyperparameters that train each environment within this project's budgets (RL-Zoo's, scaled down).
PRESETS: dict[str, dict] = {
    "CartPole-v1": {"num_envs": 8, "num_steps": 32, "num_minibatches": 1, "update_epochs": 20,
                    "learning_rate": 1e-3, "gamma": 0.98, "gae_lambda": 0.8, "total_timesteps": 100_000},
    # Acrobot: with ReLU, lr 1e-3 and 64-step rollouts PPO stayed at -500 for 300k steps on every seed; tanh with
    # SB3's settings (256-step rollouts, minibatches of 64, lr 3e-4) reaches about -85 in 150k (bench/bitnet_rl.py).
    "Acrobot-v1": {"num_envs": 16, "num_steps": 256, "num_minibatches": 64, "update_epochs": 4, "activation": "tanh",
                   "learning_rate": 3e-4, "gamma": 0.99, "gae_lambda": 0.94, "total_timesteps": 200_000},
    "LunarLander-v3": {"num_envs": 16, "num_steps": 128, "num_minibatches": 8, "update_epochs": 4,
                       "learning_rate": 5e-4, "gamma": 0.999, "gae_lambda": 0.98, "ent_coef": 0.01,
                       "total_timesteps": 300_000},
    "Pendulum-v1": {"num_envs": 8, "num_steps": 256, "num_minibatches": 16, "update_epochs": 10,
                    "learning_rate": 1e-3, "gamma": 0.9, "gae_lambda": 0.95, "norm_reward": True,
                    "total_timesteps": 100_000},
    "MountainCar-v0": {"num_envs": 16, "num_steps": 16, "num_minibatches": 1, "update_epochs": 4,
                       "learning_rate": 1e-3, "gamma": 0.99, "gae_lambda": 0.98, "total_timesteps": 400_000},
}


def args_for(env_id: str, **overrides) -> Args:
    """Args with the environment's preset, then `overrides`."""
    return Args(env_id=env_id, **{**PRESETS.get(env_id, {}), **overrides})


# ------------------------------------------------------------------------------------------------ environments

def make_envs(env_id: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    """Synchronous vector envs with SAME_STEP autoreset (the mode this trainer's rollout is written for)."""
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})


def output_spec(space: gym.Space, log_std: list[float] | None = None) -> dict:
    """The manifest output spec for an action space (deterministic actions: argmax, or the mean clipped)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"kind": "discrete", "n": int(space.n), "outputs": "logits"}
    if isinstance(space, gym.spaces.Box):
        return {"kind": "continuous", "shape": list(space.shape), "low": space.low.astype(float).ravel().tolist(),
                "high": space.high.astype(float).ravel().tolist(), "squash": "clip", "log_std": log_std}
    raise ValueError(f"{type(space).__name__} action spaces are not supported (Discrete and Box are)")


# ------------------------------------------------------------------------------------------------ quantized layers

class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weights and input, straight-through gradients (same parameters and keys).

    bits 1.58: BitLinear (ternary absmean weights, int8 absmax activations), exactly what the compiler emits.
    bits 8:    int8 per-output-channel weights, int8 per-row activations.    bits 32: plain float.
    """

    bits: float = 32.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 1.58:
            return nn.functional.linear(quantize_activations_ste(x), ternarize_weight_ste(self.weight), self.bias)
        if self.bits == 8:
            return nn.functional.linear(quantize_activations_ste(x), quantize_weight_int8_ste(self.weight), self.bias)
        return super().forward(x)


def quantize_(module: nn.Module, bits: float) -> nn.Module:
    """Switch every nn.Linear of `module` to QuantLinear(bits) in place (parameters and optimizer state carry over)."""
    if bits not in HEAD_BITS:
        raise ValueError(f"heads bits must be one of {HEAD_BITS}, got {bits}")
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.__class__ = QuantLinear
            m.bits = float(bits)
    return module


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------------------------ backbones

class RunningMeanStd:
    """Running mean and variance (parallel algorithm of Chan et al.), as in SB3's VecNormalize."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean, self.var, self.count = np.zeros(shape, np.float64), np.ones(shape, np.float64), 1e-4

    def update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_count = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total


def normalize(obs: np.ndarray, stats: dict | None) -> np.ndarray:
    """clip((x - mean) / sqrt(var + eps)) in float32, the same operations as the runtime's Policy."""
    x = np.asarray(obs, np.float32).reshape(len(obs), -1)
    if stats is None:
        return x
    mean, var = np.asarray(stats["mean"], np.float32), np.asarray(stats["var"], np.float32)
    x = (x - mean) / np.sqrt(var + np.float32(stats.get("eps", 1e-8)))
    return x if stats.get("clip") is None else np.clip(x, -stats["clip"], stats["clip"])


class ObsNormalizer:
    """No backbone: features = the observations, normalised with running statistics (or frozen given ones)."""

    def __init__(self, obs_dim: int, enabled: bool = True, clip: float = 10.0, frozen: dict | None = None):
        self.dim, self.enabled, self.clip, self.eps = obs_dim, enabled or frozen is not None, clip, 1e-8
        self.rms = RunningMeanStd((obs_dim,))
        self.frozen = frozen is not None
        if frozen is not None:
            self.rms.mean, self.rms.var = np.asarray(frozen["mean"], np.float64), np.asarray(frozen["var"], np.float64)
            self.clip, self.eps = frozen.get("clip"), float(frozen.get("eps", 1e-8))

    def stats(self) -> dict | None:
        if not self.enabled:
            return None
        return {"mean": self.rms.mean.tolist(), "var": self.rms.var.tolist(), "eps": self.eps, "clip": self.clip}

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        if update and self.enabled and not self.frozen:
            self.rms.update(np.asarray(obs, np.float64).reshape(len(obs), -1))
        return normalize(obs, self.stats())


class TorchBackbone:
    """A frozen torch module (e.g. a ternary BitLinear torso) applied to normalised observations."""

    def __init__(self, module: nn.Module, dim: int, stats: dict | None, source: str = "torch"):
        self.module, self.dim, self.stats, self.source = module.eval(), dim, stats, source
        for p in module.parameters():
            p.requires_grad_(False)

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(normalize(obs, self.stats))).numpy()


class CompiledBackbone:
    """A compiled "features" artifact: the forward runs in the TVM runtime (numpy in, numpy out; no torch)."""

    def __init__(self, policy, source: str):
        spec = policy.output_spec
        if spec.get("kind") != "features":
            raise ValueError(f"{source}: the artifact's output kind is {spec.get('kind')!r}, not \"features\"; "
                             "compile a backbone with `bitrl-compile MODEL --features`")
        self.policy, self.dim, self.source = policy, int(spec["dim"]), source

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        return np.asarray(self.policy.features(np.asarray(obs, np.float32)), np.float32)

    def close(self) -> None:
        if hasattr(self.policy, "close"):
            self.policy.close()


def torso_module(policy: MLPPolicy, bits: float = 1.58) -> tuple[nn.Sequential, int]:
    """A policy's torso: every Linear but the last, each followed by the activation; frozen BitLinear copies."""
    layers = linears(policy)
    if len(layers) < 2:
        raise ValueError("the policy has a single Linear layer; it has no torso to use as a backbone")
    act = type(next(m for m in policy.net if not isinstance(m, nn.Linear)))
    mods: list[nn.Module] = []
    for lin in layers[:-1]:
        copy = nn.Linear(lin.in_features, lin.out_features)
        copy.load_state_dict(lin.state_dict())
        mods += [copy, act()]
    torso = quantize_(nn.Sequential(*mods), bits)
    return torso, layers[-2].out_features


def load_backbone(path):
    """A compiled "features" artifact (runtime; aarch64 ones under qemu), a BitNet backbone checkpoint folder
    (`bitrl_compile.bitnet`, ternary forward in torch) or a policy file's ternary torso."""
    path = str(path)
    if Path(path).is_dir():
        from bitrl_compile import bitnet

        return bitnet.FrozenBitNet(bitnet.load_backbone(path), f"BitNet backbone {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and path.endswith(".bitrl"):
        from bitrl_compile.devices import open_policy

        return CompiledBackbone(open_policy(path), path)
    from bitrl_compile.frontends import load_policy

    loaded = load_policy(path)
    if not isinstance(loaded.module, MLPPolicy) or loaded.input.get("preprocess", "none") != "none":
        raise ValueError(f"{path}: a backbone from a policy file must be an MLP on plain vector observations "
                         f"(got {loaded.description or loaded.source})")
    torso, dim = torso_module(loaded.module)
    return TorchBackbone(torso, dim, loaded.input.get("normalize"), f"torso of {path}")


def features_policy(loaded):
    """A LoadedPolicy of an MLP policy's torso whose manifest output is {"kind": "features", "dim": D}: compile it
    with `pipeline.compile_policy` (or `bitrl-compile MODEL --features`) to run a backbone in the runtime."""
    from bitrl_compile.loaded import LoadedPolicy

    if not isinstance(loaded.module, MLPPolicy):
        raise ValueError(  # noqa: TRY004 - a user error (exit code 1)
            f"only MLP policies have a torso to compile as a backbone (got {loaded.description})")
    torso, dim = torso_module(loaded.module, bits=32.0)
    for m in torso:
        if isinstance(m, nn.Linear):
            m.__class__ = nn.Linear  # plain float layers: the compiler ternarizes them exactly as QuantLinear did
    return LoadedPolicy(torso.eval(), None, dict(loaded.input), {"kind": "features", "dim": dim},
                        f"{loaded.source}-torso", f"torso of {loaded.description} -> {dim} features")


_NP_ACTIVATIONS = {"relu": lambda x: np.maximum(x, np.float32(0)), "tanh": np.tanh}


def reference_act(loaded, ternary: bool = True):
    """`obs -> action` of an MLP policy in numpy: with ternary=True every Linear is the BitLinear reference
    (`quant.bitlinear_reference`: what the compiled artifact computes, bit for bit for ReLU), else float32."""
    from bitrl_compile.quant import bitlinear_reference, ternarize_weight

    if not isinstance(loaded.module, MLPPolicy) or loaded.module.activation not in _NP_ACTIVATIONS:
        raise ValueError(f"the numpy reference runs ReLU/Tanh MLP policies (got {loaded.description})")
    act_fn = _NP_ACTIVATIONS[loaded.module.activation]
    layers = []
    for lin in linears(loaded.module):
        w, b = lin.weight.detach().numpy().astype(np.float32), lin.bias.detach().numpy().astype(np.float32)
        layers.append((*ternarize_weight(w), b) if ternary else (w, b))
    stats, spec = loaded.input.get("normalize"), loaded.output

    def act(obs):
        x = normalize(np.asarray(obs, np.float32)[None], stats)
        for i, layer in enumerate(layers):
            x = bitlinear_reference(x, *layer) if ternary else (x @ layer[0].T + layer[1]).astype(np.float32)
            if i < len(layers) - 1:
                x = act_fn(x)
        if spec["kind"] == "discrete":
            return int(np.argmax(x[0]))
        return np.clip(x[0], np.asarray(spec["low"], np.float32), np.asarray(spec["high"], np.float32))

    return act


# ------------------------------------------------------------------------------------------------ agent

def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Actor and critic heads on backbone features. The actor is an MLPPolicy (net.0, net.2, ...), so it saves and
    compiles as the project's plain MLP format; for Box actions a state-independent log std is learned."""

    def __init__(self, feat_dim: int, action_space: gym.Space, hidden: tuple[int, ...], activation: str,
                 bits: float, actor: MLPPolicy | None = None, log_std: list[float] | None = None):
        super().__init__()
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        n_out = int(action_space.n) if self.discrete else int(np.prod(action_space.shape))
        self.critic = MLPPolicy([feat_dim, *hidden, 1], activation)
        for i, lin in enumerate(linears(self.critic)):
            layer_init(lin, 1.0 if i == len(hidden) else math.sqrt(2))
        if actor is None:
            actor = MLPPolicy([feat_dim, *hidden, n_out], activation)
            for i, lin in enumerate(linears(actor)):
                layer_init(lin, 0.01 if i == len(hidden) else math.sqrt(2))
        self.actor = actor
        quantize_(self.actor, bits)
        quantize_(self.critic, bits)
        if not self.discrete:
            init = torch.zeros(1, n_out) if log_std is None else torch.tensor(log_std, dtype=torch.float32)[None]
            self.actor_logstd = nn.Parameter(init)

    def get_value(self, f: torch.Tensor) -> torch.Tensor:
        return self.critic(f)

    def distribution(self, f: torch.Tensor):
        out = self.actor(f)
        if self.discrete:
            return Categorical(logits=out)
        return Normal(out, self.actor_logstd.expand_as(out).exp())

    def get_action_and_value(self, f: torch.Tensor, action: torch.Tensor | None = None):
        dist = self.distribution(f)
        if action is None:
            action = dist.sample()
        logprob, entropy = dist.log_prob(action), dist.entropy()
        if not self.discrete:
            logprob, entropy = logprob.sum(1), entropy.sum(1)
        return action, logprob, entropy, self.critic(f)

    def act(self, f: torch.Tensor) -> np.ndarray:
        """Deterministic actions: argmax of the logits, or the mean (the env space clips it)."""
        with torch.no_grad():
            out = self.actor(f)
        return out.argmax(1).numpy() if self.discrete else out.numpy()


def distillation_kl(teacher: nn.Module, agent: Agent, f: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) of the action distributions on features f; for Box actions the means are
    compared under the student's std, so only the means are pulled together."""
    student = agent.distribution(f)
    with torch.no_grad():
        t_out = teacher(f)
    if agent.discrete:
        return torch.distributions.kl_divergence(Categorical(logits=t_out), student).mean()
    return torch.distributions.kl_divergence(Normal(t_out, student.stddev.detach()), student).sum(1).mean()


# ------------------------------------------------------------------------------------------------ GAE

def compute_gae(rewards: np.ndarray, values: np.ndarray, episode_ends: np.ndarray, last_value: np.ndarray,
                gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over [T, N] arrays. `episode_ends[t]` is 1 where transition t ended an
    episode (terminated or truncated: a truncated episode's bootstrap value is already in its reward), and
    `last_value` is V of the observation after the last step. Returns (advantages, returns)."""
    advantages = np.zeros_like(rewards)
    lastgaelam = np.zeros_like(last_value)
    for t in reversed(range(len(rewards))):
        next_value = last_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - episode_ends[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        lastgaelam = delta + gamma * lam * nonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


# ------------------------------------------------------------------------------------------------ logging

class Logger:
    """Scalars to progress.csv (step,name,value) and to TensorBoard when it is installed."""

    def __init__(self, out: Path | None, tensorboard: bool, args: Args):
        self.rows: list[tuple[int, str, float]] = []
        self.file = self.writer = None
        if out is not None:
            self.file = open(out / "progress.csv", "w", newline="")  # noqa: SIM115 - closed in close()
            self.csv = csv.writer(self.file)
            self.csv.writerow(["step", "name", "value"])
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is optional
                    pass
                else:
                    self.writer = SummaryWriter(str(out / "tb"))
                    self.writer.add_text("hyperparameters", json.dumps(dataclasses.asdict(args)))

    def scalar(self, name: str, value: float, step: int) -> None:
        self.rows.append((step, name, float(value)))
        if self.file is not None:
            self.csv.writerow([step, name, repr(float(value))])
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def curve(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(s, v) for s, n, v in self.rows if n == name]
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.zeros(0), np.zeros(0))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def plot_learning_curve(logger: Logger, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, returns = logger.curve("charts/episodic_return")
    if len(returns):
        ax.plot(steps, returns, ".", alpha=0.15, color="tab:blue", label="training episodes")
        k = max(1, len(returns) // 50)
        smooth = np.convolve(returns, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"training (mean of {k})")
    steps, mean = logger.curve("eval/return_mean")
    _, std = logger.curve("eval/return_std")
    if len(mean):
        ax.errorbar(steps, mean, yerr=std, fmt="o-", color="tab:red", capsize=3, label="deterministic evaluation")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path: Path, agent: Agent, optimizer: torch.optim.Optimizer, backbone, args: Args,
                    global_step: int) -> None:
    """agent.*, optimizer.* and obs_rms.* tensors plus JSON metadata (args, optimizer groups, step) in safetensors."""
    from safetensors.torch import save

    from bitrl_compile.runtime.artifact import write_atomic

    tensors = {f"agent.{k}": v.detach().contiguous() for k, v in agent.state_dict().items()}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optimizer.{i}.{k}"] = torch.as_tensor(v).contiguous()
    if isinstance(backbone, ObsNormalizer):
        tensors["obs_rms.mean"] = torch.from_numpy(backbone.rms.mean.copy())
        tensors["obs_rms.var"] = torch.from_numpy(backbone.rms.var.copy())
        tensors["obs_rms.count"] = torch.tensor(float(backbone.rms.count), dtype=torch.float64)
    meta = {"args": json.dumps(dataclasses.asdict(args)), "global_step": str(global_step),
            "param_groups": json.dumps(opt["param_groups"])}
    write_atomic(path, save(tensors, metadata=meta))


def load_checkpoint(path: str | Path, agent: Agent, optimizer: torch.optim.Optimizer | None = None,
                    backbone=None) -> dict:
    """Restore what save_checkpoint wrote into an agent built with the same args; returns the metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    agent.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("agent.")})
    if optimizer is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    if isinstance(backbone, ObsNormalizer) and "obs_rms.mean" in tensors:
        backbone.rms.mean, backbone.rms.var = tensors["obs_rms.mean"].numpy(), tensors["obs_rms.var"].numpy()
        backbone.rms.count = float(tensors["obs_rms.count"])
    return {"args": json.loads(meta["args"]), "global_step": int(meta["global_step"])}


def export_policy(path: Path, agent: Agent, backbone, env_id: str, action_space: gym.Space, args: Args,
                  extra: dict | None = None) -> dict:
    """Write the actor as a compilable MLP (.safetensors + config): the heads alone (no backbone), or the frozen
    torso followed by the actor head as one MLP. With a compiled backbone only the heads are written (they take
    its features; the config names the backbone). Returns the config."""
    log_std = agent.actor_logstd.detach().ravel().tolist() if not agent.discrete else None
    heads = [(lin.weight, lin.bias) for lin in linears(agent.actor)]
    trained = {"algo": "PPO (bitrl_compile.trainers.ppo)", "env": env_id, "seed": args.seed,
               "heads_bits": args.heads_bits, "steps": args.total_timesteps, **(extra or {})}
    if isinstance(backbone, ObsNormalizer):
        layers, stats, obs_dim = heads, backbone.stats(), backbone.dim
    elif isinstance(backbone, TorchBackbone) and all(isinstance(m, (nn.Linear, ACTIVATIONS[args.activation]))
                                                     for m in backbone.module):
        layers = [(lin.weight, lin.bias) for lin in linears(backbone.module)] + heads
        stats, obs_dim = backbone.stats, linears(backbone.module)[0].in_features
        trained["backbone"] = backbone.source
    else:
        layers, stats, obs_dim = heads, None, backbone.dim
        trained["backbone"] = getattr(backbone, "source", type(backbone).__name__)
        trained["input_is_backbone_features"] = True
    state = {f"net.{2 * i}.{k}": t.detach().clone() for i, (w, b) in enumerate(layers) for k, t in
             (("weight", w), ("bias", b))}
    config = {"arch": "mlp", "obs_shape": [obs_dim], "hidden": [w.shape[0] for w, _ in layers[:-1]],
              "activation": args.activation, "output": output_spec(action_space, log_std),
              "input": {"shape": [obs_dim], "preprocess": "none", "normalize": stats}, "trained": trained}
    save_mlp_policy(path, state, config)
    return config


# ------------------------------------------------------------------------------------------------ training

@dataclass
class TrainResult:
    agent: Agent
    backbone: object
    eval_returns: list[float]
    global_step: int
    out: Path | None
    curve: dict[str, tuple[list, list]] = field(default_factory=dict)


def evaluate_agent(agent: Agent, backbone, env_id: str, episodes: int, seed: int) -> list[float]:
    """Deterministic episodes (episode i reset with seed + i) of the torch agent on backbone features."""
    from bitrl_compile.evaluate import evaluate

    def act(obs):
        a = agent.act(torch.from_numpy(backbone(np.asarray(obs)[None])))[0]
        return int(a) if agent.discrete else a.astype(np.float32)

    returns, _ = evaluate(act, env_id, episodes, seed)
    return returns


def train(args: Args, log=lambda s: print(s, file=sys.stderr), init_loaded=None) -> TrainResult:
    """Run PPO as `args` say. `init_loaded` (a LoadedPolicy) replaces loading `args.init_policy` from its path."""
    # ---- seeding: python, numpy, torch, the environments and their action spaces
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = max(1, args.total_timesteps // batch_size)

    envs = make_envs(args.env_id, args.num_envs)
    if not isinstance(envs.single_observation_space, gym.spaces.Box):
        raise ValueError(  # noqa: TRY004 - a user error (exit code 1)
            f"{args.env_id}: {type(envs.single_observation_space).__name__} observations are not supported by "
            "this trainer (Box vectors are)")
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    action_space = envs.single_action_space
    continuous = isinstance(action_space, gym.spaces.Box)
    output_spec(action_space)  # refuses unsupported action spaces

    # ---- backbone (frozen) and heads (trained)
    init_actor, init_log_std, teacher = None, None, None
    if args.backbone and args.init_policy:
        raise ValueError("give either a backbone (train heads on it) or an initial policy (finetune), not both")
    if args.backbone:
        backbone = load_backbone(args.backbone)
    elif args.init_policy or init_loaded is not None:
        from bitrl_compile.frontends import load_policy

        loaded = init_loaded if init_loaded is not None else load_policy(args.init_policy)
        check_policy_fits(loaded, args.env_id, args.init_policy)
        init_actor, init_log_std = loaded.module.train(), loaded.output.get("log_std")
        teacher = copy.deepcopy(init_actor).eval()  # the fp32 policy, before its layers become ternary
        for p in init_actor.parameters():
            p.requires_grad_(True)
        backbone = ObsNormalizer(obs_dim, enabled=False, frozen=loaded.input.get("normalize"))
        args = dataclasses.replace(args, activation=init_actor.activation,
                                   hidden=tuple(lin.out_features for lin in linears(init_actor)[:-1]))
    else:
        backbone = ObsNormalizer(obs_dim, args.norm_obs, args.clip_obs)
    hidden = args.hidden or ((64,) if args.backbone else (64, 64))
    args = dataclasses.replace(args, hidden=tuple(hidden))
    agent = Agent(backbone.dim, action_space, tuple(hidden), args.activation, float(args.heads_bits),
                  init_actor, init_log_std)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    n_params = sum(p.numel() for p in agent.parameters())
    log(f"PPO on {args.env_id}: backbone {getattr(backbone, 'source', type(backbone).__name__)} -> {backbone.dim} "
        f"features; heads {list(hidden)} ({n_params:,} trainable parameters, {args.heads_bits:g} bits); "
        f"{num_iterations} iterations of {batch_size} steps")
    logger = Logger(out, args.tensorboard, args)

    # ---- rollout storage: features (the backbone is frozen), actions, log-probs, rewards, episode ends, values
    feats = np.zeros((args.num_steps, args.num_envs, backbone.dim), np.float32)
    actions = np.zeros((args.num_steps, args.num_envs, *action_space.shape),
                       np.float32 if continuous else np.int64)
    logprobs, rewards, ends, values = (np.zeros((args.num_steps, args.num_envs), np.float32) for _ in range(4))
    reward_rms, discounted = RunningMeanStd(), np.zeros(args.num_envs)
    ep_return, ep_length = np.zeros(args.num_envs), np.zeros(args.num_envs, np.int64)

    global_step, next_eval = 0, args.eval_every or math.inf
    next_obs, _ = envs.reset(seed=args.seed)
    envs.action_space.seed(args.seed)
    next_feat = backbone(next_obs, update=True)
    eval_returns: list[float] = []
    recent: list[float] = []
    started = time.perf_counter()
    bar = _progress(args, log)

    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        for step in range(args.num_steps):
            global_step += args.num_envs
            feats[step] = next_feat
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(torch.from_numpy(next_feat))
            values[step], actions[step], logprobs[step] = value.ravel().numpy(), action.numpy(), logprob.numpy()
            env_action = np.clip(action.numpy(), action_space.low, action_space.high) if continuous \
                else action.numpy()
            next_obs, reward, terminated, truncated, info = envs.step(env_action)
            done = terminated | truncated

            ep_return += reward
            ep_length += 1
            for i in np.flatnonzero(done):
                logger.scalar("charts/episodic_return", ep_return[i], global_step)
                logger.scalar("charts/episodic_length", ep_length[i], global_step)
                recent = (recent + [float(ep_return[i])])[-20:]
            ep_return[done], ep_length[done] = 0.0, 0

            if args.norm_reward:  # divide by the running std of the discounted return
                discounted = discounted * args.gamma + reward
                reward_rms.update(discounted[:, None].ravel())
                discounted[done] = 0.0
                reward = reward / np.sqrt(reward_rms.var + 1e-8)
            reward = reward.astype(np.float32)
            cut = truncated & ~terminated  # time limit: bootstrap from the final observation's value
            if cut.any():
                final = np.stack([info["final_obs"][i] for i in np.flatnonzero(cut)])
                with torch.no_grad():
                    v = agent.get_value(torch.from_numpy(backbone(final))).ravel().numpy()
                reward[cut] += args.gamma * v
            rewards[step], ends[step] = reward, done
            next_feat = backbone(next_obs, update=True)

        # ---- advantages
        with torch.no_grad():
            last_value = agent.get_value(torch.from_numpy(next_feat)).ravel().numpy()
        advantages, returns = compute_gae(rewards, values, ends, last_value, args.gamma, args.gae_lambda)

        # ---- update: clipped surrogate, (clipped) value loss, entropy bonus
        b_feats = torch.from_numpy(feats.reshape(batch_size, -1))
        b_actions = torch.from_numpy(actions.reshape(batch_size, *action_space.shape))
        b_logprobs, b_advantages, b_returns, b_values = (torch.from_numpy(x.reshape(-1)) for x in
                                                         (logprobs, advantages, returns, values))
        train_actor = iteration > args.critic_warmup
        clipfracs = []
        for _epoch in range(args.update_epochs):
            b_inds = np.random.permutation(batch_size)
            for start in range(0, batch_size, minibatch_size):
                mb = b_inds[start:start + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_feats[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                mb_adv = b_advantages[mb]
                if args.norm_adv and len(mb) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio,
                                    -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_clipped = b_values[mb] + (newvalue - b_values[mb]).clamp(-args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((newvalue - b_returns[mb]) ** 2, (v_clipped - b_returns[mb]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = v_loss * args.vf_coef
                if train_actor:
                    loss = loss + pg_loss - args.ent_coef * entropy_loss
                if teacher is not None and args.distill_coef:  # QAT anchored to the fp32 policy's behaviour
                    loss = loss + args.distill_coef * distillation_kl(teacher, agent, b_feats[mb])
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b_values.numpy(), b_returns.numpy()
        var_y = np.var(y_true)
        logger.scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        logger.scalar("losses/value_loss", v_loss.item(), global_step)
        logger.scalar("losses/policy_loss", pg_loss.item(), global_step)
        logger.scalar("losses/entropy", entropy_loss.item(), global_step)
        logger.scalar("losses/approx_kl", approx_kl.item(), global_step)
        logger.scalar("losses/clipfrac", float(np.mean(clipfracs)), global_step)
        logger.scalar("losses/explained_variance", np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y,
                      global_step)
        if logger.writer is not None:
            logger.writer.add_scalar("charts/SPS", global_step / (time.perf_counter() - started), global_step)

        # ---- periodic deterministic evaluation and checkpoint
        if global_step >= next_eval or iteration == num_iterations:
            next_eval = global_step + (args.eval_every or math.inf)
            eval_returns = evaluate_agent(agent, backbone, args.env_id, args.eval_episodes, args.eval_seed)
            logger.scalar("eval/return_mean", np.mean(eval_returns), global_step)
            logger.scalar("eval/return_std", np.std(eval_returns), global_step)
            if out is not None:
                save_checkpoint(out / "checkpoint.safetensors", agent, optimizer, backbone, args, global_step)
        if bar is not None:
            bar.update(batch_size, f"return {np.mean(recent) if recent else float('nan'):8.1f}  "
                                   f"eval {np.mean(eval_returns) if eval_returns else float('nan'):8.1f}")

    envs.close()
    if bar is not None:
        bar.render_finish()
    logger.close()
    if out is not None:
        export_policy(out / "policy.safetensors", agent, backbone, args.env_id, action_space, args,
                      {"eval_return_mean": float(np.mean(eval_returns)), "eval_episodes": args.eval_episodes})
        plot_learning_curve(logger, out / "learning_curve.png",
                            f"PPO {args.env_id}, heads {args.heads_bits:g} bits, seed {args.seed}")
    log(f"{args.env_id}: {global_step} steps in {time.perf_counter() - started:.0f} s; deterministic evaluation "
        f"{np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {len(eval_returns)} episodes")
    curve = {name: tuple(map(list, logger.curve(name))) for name in ("charts/episodic_return", "eval/return_mean")}
    return TrainResult(agent, backbone, eval_returns, global_step, out, curve)


def _progress(args: Args, log):
    """A click progress bar on stderr (click is already a dependency), or None."""
    if not args.progress:
        return None
    import click

    bar = click.progressbar(length=args.total_timesteps, label=f"PPO {args.env_id}", file=sys.stderr,
                            item_show_func=lambda s: s)
    bar.__enter__()
    return bar


def check_policy_fits(loaded, env_id: str, name: str = "policy") -> None:
    """Raise ValueError unless `loaded` is an MLP policy for env_id's observation and action spaces."""
    env = gym.make(env_id)
    obs_dim, action_space = int(np.prod(env.observation_space.shape)), env.action_space
    env.close()
    if not isinstance(loaded.module, MLPPolicy) or loaded.input["shape"] != [obs_dim]:
        raise ValueError(f"{name}: finetune needs an MLP policy for {env_id}'s {obs_dim}-value observations "
                         f"(got {loaded.description}, input {loaded.input['shape']}); give the env it was trained on")
    want = output_spec(action_space)
    if loaded.output["kind"] != want["kind"] or loaded.output.get("n") != want.get("n"):
        raise ValueError(f"{name}: its actions ({loaded.output['kind']}, {loaded.output.get('n', '')}) do not match "
                         f"{env_id}'s {action_space}; give the environment it was trained on")


def finetune_args(env_id: str, init_policy: str, **overrides) -> Args:
    """QAT of an existing policy: ternary heads from its weights, PPO plus a KL term that keeps the ternary policy
    acting like the fp32 one, a fresh critic warmed up for 10 iterations, a third of the preset's learning rate,
    a quarter of its steps, frozen observation statistics."""
    base = args_for(env_id)
    defaults = {"init_policy": init_policy, "heads_bits": 1.58, "critic_warmup": 10, "distill_coef": 1.0,
                "learning_rate": base.learning_rate / 3, "total_timesteps": max(base.total_timesteps // 4, 1)}
    return dataclasses.replace(base, **{**defaults, **overrides})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    known, _ = parser.parse_known_args(argv)
    defaults = args_for(known.env_id)
    for f in dataclasses.fields(Args):
        if f.name == "env_id":
            continue
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        elif f.name == "hidden":
            parser.add_argument(flag, type=int, nargs="+", default=value)
        else:
            kind = float if f.name in ("target_kl", "heads_bits") else (str if value is None else type(value))
            parser.add_argument(flag, type=kind, default=value)
    ns = vars(parser.parse_args(argv))
    if ns["hidden"] is not None:
        ns["hidden"] = tuple(ns["hidden"])
    train(Args(**ns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
