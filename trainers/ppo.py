"""PPO with a frozen ternary backbone and trainable (optionally quantized) heads, in one file (CleanRL style).

    bitrl-compile train --env CartPole-v1 --steps 100000 [--backbone FILE] [--heads-bits 1.58] [--gamma 0.98 ...]
    bitrl-compile finetune policy.zip --env CartPole-v1          # QAT: an fp32 policy becomes ternary
    from bitrl_compile.trainers import ppo; ppo.train(ppo.args_for("CartPole-v1", out="runs/cartpole"))

The network is  observation -> backbone (frozen) -> features -> actor head / critic head (trained).
The backbone (`trainers/backbones.py`) is an observation normaliser (no backbone: the heads are the whole actor and
critic), a frozen torch module (a policy's ternary torso, a BitNet transformer) or a compiled "features" artifact
run by the TVM runtime; it is frozen, so the rollout stores features and the update never runs it again.
Heads are MLPs whose Linear layers are fp32 (bits 32), int8 weights and activations (8) or ternary BitLinear (1.58),
quantized with the straight-through estimator from `bitrl_compile.quant`. The compiler emits ternary layers only:
ternary heads compile to exactly what was trained, fp32 and int8 heads get ternarized (post-training) by it.

Where a pretrained backbone comes from here: the torso of a trained policy, e.g. of a QAT run of this trainer
(its torso is ternary by training). `finetune` is QAT of an existing policy: its actor becomes the ternary heads
(no backbone), a fresh critic is warmed up before the actor moves, and the observation statistics stay frozen.

Vector environments use gymnasium's SAME_STEP autoreset (set explicitly): the observation returned with a done is
already the next episode's first; the last one is `info["final_obs"]`, whose value bootstraps truncated episodes.
Outputs in `--out` (`trainers/logs.py`, `trainers/export.py`): progress.csv (step,name,value; no wall-clock values,
so equal seeds give equal files), TensorBoard events when `tensorboard` is installed, checkpoint.safetensors (agent,
Adam state, observation statistics; `export.load_checkpoint` restores them, there is no resume of a run yet),
policy.safetensors (compile it with `bitrl-compile`), learning_curve.png.
"""

from __future__ import annotations

import copy
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

from bitrl_compile.frontends import MLPPolicy
from bitrl_compile.trainers.backbones import ObsNormalizer, RunningMeanStd, linears, load_backbone, quantize_
from bitrl_compile.trainers.export import check_policy_fits, export_policy, output_spec, save_checkpoint
from bitrl_compile.trainers.logs import Logger, plot_learning_curve, progress_bar


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


def finetune_args(env_id: str, init_policy: str, **overrides) -> Args:
    """QAT of an existing policy: ternary heads from its weights, PPO plus a KL term that keeps the ternary policy
    acting like the fp32 one, a fresh critic warmed up for 10 iterations, a third of the preset's learning rate,
    a quarter of its steps, frozen observation statistics."""
    base = args_for(env_id)
    defaults = {"init_policy": init_policy, "heads_bits": 1.58, "critic_warmup": 10, "distill_coef": 1.0,
                "learning_rate": base.learning_rate / 3, "total_timesteps": max(base.total_timesteps // 4, 1)}
    return dataclasses.replace(base, **{**defaults, **overrides})


# ------------------------------------------------------------------------------------------------ environments

def make_envs(env_id: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    """Synchronous vector envs with SAME_STEP autoreset (the mode this trainer's rollout is written for)."""
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})


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
    bar = progress_bar(args.total_timesteps, f"PPO {args.env_id}") if args.progress else None

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
