"""PPO with a frozen ternary backbone and trainable (optionally quantized) heads, in one file (CleanRL style).

    bitrl-compile train --env CartPole-v1 [--steps 100000] [--vec async] [--backbone FILE] [--heads-bits 1.58] ...
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

Hyperparameters: `trainers/presets.py` (RL Zoo's published PPO settings per env id; SB3's PPO defaults for an env
without one). The update is SB3's PPO: orthogonal init (gains sqrt 2, 0.01 for the policy output, 1 for the value),
separate actor and critic MLPs, Adam eps 1e-5, per-minibatch advantage normalisation, gradient clipping, linear
learning-rate and clip-range schedules (progress measured after each rollout), an unclipped MSE value loss (CleanRL's
0.5 * MSE and value clipping with `clip_vloss`), VecNormalize-style observation and reward normalisation.
Vector environments (`trainers/vec.py`: sync, async, EnvPool) use gymnasium's SAME_STEP autoreset: the observation
returned with a done is already the next episode's first; the last one is `info["final_obs"]`, whose value
bootstraps truncated episodes. With NEXT_STEP autoreset (EnvPool) the step after a done is masked out of the update.
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
from bitrl_compile.trainers import presets
from bitrl_compile.trainers.backbones import ObsNormalizer, RunningMeanStd, linears, load_backbone, quantize_
from bitrl_compile.trainers.export import check_policy_fits, export_policy, output_spec, save_checkpoint
from bitrl_compile.trainers.logs import Logger, plot_learning_curve, progress_bar
from bitrl_compile.trainers.vec import make_envs, resolve_vec

__all__ = ["Agent", "Args", "TrainResult", "args_for", "compute_gae", "finetune_args", "make_envs", "train"]


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    total_timesteps: int = 100_000
    seed: int = 0
    num_envs: int = 8
    num_steps: int = 128             # rollout length per env; batch = num_envs * num_steps
    learning_rate: float = 3e-4
    anneal_lr: bool = True           # RL Zoo's lin_X: decays linearly to 0 over the run
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    anneal_clip: bool = False        # RL Zoo's clip_range lin_X
    clip_vloss: bool = False         # clip the value loss (CleanRL); SB3's default is not to
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None   # stop the update when a minibatch's approx. KL exceeds 1.5 * this (SB3)
    norm_obs: bool = True            # running mean/std of observations (no-backbone mode)
    norm_reward: bool = False        # scale rewards by the running std of the discounted return (training only)
    clip_obs: float = 10.0
    clip_reward: float = 10.0        # VecNormalize's clip of normalised rewards
    hidden: tuple[int, ...] | None = None  # head MLP widths; None: (64, 64) without a backbone, (64,) with one
    activation: str = "tanh"         # SB3's; ReLU compiles bit-exact with the numpy reference
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
    vec: str = "sync"                # vector envs: sync | async | auto | envpool (trainers/vec.py)
    autoreset: str = "same_step"     # gymnasium's autoreset mode; next_step is EnvPool's (the rollout masks it)


def args_for(env_id: str, **overrides) -> Args:
    """Args with the environment's preset (RL Zoo's settings, else SB3's defaults), then `overrides`."""
    return Args(env_id=env_id, **{**presets.preset(env_id), **overrides})


def finetune_args(env_id: str, init_policy: str, **overrides) -> Args:
    """QAT of an existing policy: ternary heads from its weights, PPO plus a KL term that keeps the ternary policy
    acting like the fp32 one, a fresh critic warmed up for 10 iterations, a third of the preset's learning rate,
    a quarter of its steps, frozen observation statistics."""
    base = args_for(env_id)
    defaults = {"init_policy": init_policy, "heads_bits": 1.58, "critic_warmup": 10, "distill_coef": 1.0,
                "learning_rate": base.learning_rate / 3, "total_timesteps": max(base.total_timesteps // 4, 1)}
    return dataclasses.replace(base, **{**defaults, **overrides})


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
                gamma: float, lam: float, bootstrap: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over [T, N] arrays. `episode_ends[t]` is 1 where transition t ended an
    episode (terminated or truncated), `last_value` is V of the observation after the last step, and
    `bootstrap[t]` is V of the final observation where transition t was truncated by a time limit (0 elsewhere):
    a truncated episode is not a terminal state, its TD target is r + gamma * V(final obs) (SB3 adds it to the
    reward the same way). Returns (advantages, returns)."""
    if bootstrap is not None:
        rewards = rewards + gamma * bootstrap
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


SETTINGS = ("num_envs", "num_steps", "num_minibatches", "update_epochs", "learning_rate", "anneal_lr", "clip_coef",
            "anneal_clip", "gamma", "gae_lambda", "ent_coef", "vf_coef", "max_grad_norm", "norm_obs", "norm_reward",
            "activation", "hidden", "total_timesteps")


def settings_line(args: Args) -> str:
    """The hyperparameters of a run, one line (what `bitrl-compile train` prints)."""
    return " ".join(f"{name}={getattr(args, name)}" for name in SETTINGS)


def train(args: Args, log=lambda s: print(s, file=sys.stderr), init_loaded=None) -> TrainResult:
    """Run PPO as `args` say. `init_loaded` (a LoadedPolicy) replaces loading `args.init_policy` from its path."""
    # ---- seeding: python, numpy, torch, the environments and their action spaces
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    batch_size = args.num_envs * args.num_steps
    minibatch_size = max(1, batch_size // args.num_minibatches)
    num_iterations = max(1, args.total_timesteps // batch_size)

    vec = resolve_vec(args.vec, args.num_envs, args.env_id)
    envs = make_envs(args.env_id, args.num_envs, vec, seed=args.seed, autoreset=args.autoreset)
    if not isinstance(envs.single_observation_space, gym.spaces.Box):
        raise ValueError(  # noqa: TRY004 - a user error (exit code 1)
            f"{args.env_id}: {type(envs.single_observation_space).__name__} observations are not supported by "
            "this trainer (Box vectors are)")
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    action_space = envs.single_action_space
    continuous = isinstance(action_space, gym.spaces.Box)
    output_spec(action_space)  # refuses unsupported action spaces
    out = Path(args.out) if args.out else None  # written once the environments are made
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))

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
        f"{num_iterations} iterations of {batch_size} steps; {vec} vector envs")
    log(f"settings ({presets.describe(args.env_id)}, then the options given): {settings_line(args)}")
    logger = Logger(out, args.tensorboard, args)

    # ---- rollout storage: features (the backbone is frozen), actions, log-probs, rewards, episode ends, values
    feats = np.zeros((args.num_steps, args.num_envs, backbone.dim), np.float32)
    actions = np.zeros((args.num_steps, args.num_envs, *action_space.shape),
                       np.float32 if continuous else np.int64)
    logprobs, rewards, ends, values, boot, valid = (np.zeros((args.num_steps, args.num_envs), np.float32)
                                                    for _ in range(6))
    pending = np.zeros(args.num_envs, bool)  # NEXT_STEP autoreset: this env's next step only resets it
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
        for step in range(args.num_steps):
            global_step += args.num_envs
            feats[step] = next_feat
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(torch.from_numpy(next_feat))
            values[step], actions[step], logprobs[step] = value.ravel().numpy(), action.numpy(), logprob.numpy()
            env_action = np.clip(action.numpy(), action_space.low, action_space.high) if continuous \
                else action.numpy()
            next_obs, reward, terminated, truncated, info = envs.step(env_action)
            real = ~pending  # a step that only reset its env (NEXT_STEP autoreset) is no transition
            reward = np.where(real, reward, 0.0)
            terminated, truncated = terminated & real, truncated & real
            done = terminated | truncated

            ep_return += reward
            ep_length += real
            for i in np.flatnonzero(done):
                logger.scalar("charts/episodic_return", ep_return[i], global_step)
                logger.scalar("charts/episodic_length", ep_length[i], global_step)
                recent = (recent + [float(ep_return[i])])[-20:]
            ep_return[done], ep_length[done] = 0.0, 0

            if args.norm_reward:  # VecNormalize: divide by the running std of the discounted return, clip
                discounted = discounted * args.gamma + reward
                reward_rms.update(discounted[real])
                discounted[done] = 0.0
                reward = np.clip(reward / np.sqrt(reward_rms.var + 1e-8), -args.clip_reward, args.clip_reward)
            boot[step] = 0.0
            cut = truncated & ~terminated  # time limit: bootstrap from the final observation's value
            if cut.any():
                idx = np.flatnonzero(cut)
                final = next_obs[idx] if envs.next_step else np.stack([info["final_obs"][i] for i in idx])
                with torch.no_grad():
                    boot[step, idx] = agent.get_value(torch.from_numpy(backbone(final))).ravel().numpy()
            rewards[step], ends[step], valid[step] = reward, done | ~real, real
            if envs.next_step:
                pending = done
            next_feat = backbone(next_obs, update=True)

        # ---- advantages
        with torch.no_grad():
            last_value = agent.get_value(torch.from_numpy(next_feat)).ravel().numpy()
        advantages, returns = compute_gae(rewards, values, ends, last_value, args.gamma, args.gae_lambda, boot)

        # ---- SB3's schedules: progress remaining measured after the rollout
        progress = max(0.0, 1.0 - iteration / num_iterations)
        optimizer.param_groups[0]["lr"] = args.learning_rate * (progress if args.anneal_lr else 1.0)
        clip = args.clip_coef * (progress if args.anneal_clip else 1.0)

        # ---- update: clipped surrogate, value loss (clipped with clip_vloss), entropy bonus
        b_feats = torch.from_numpy(feats.reshape(batch_size, -1))
        b_actions = torch.from_numpy(actions.reshape(batch_size, *action_space.shape))
        b_logprobs, b_advantages, b_returns, b_values = (torch.from_numpy(x.reshape(-1)) for x in
                                                         (logprobs, advantages, returns, values))
        b_valid = np.flatnonzero(valid.reshape(-1))
        train_actor = iteration > args.critic_warmup
        clipfracs, stop = [], False
        for _epoch in range(args.update_epochs):
            b_inds = b_valid[np.random.permutation(len(b_valid))]
            for start in range(0, len(b_inds), minibatch_size):
                mb = b_inds[start:start + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_feats[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > clip).float().mean().item())
                if args.target_kl is not None and approx_kl > 1.5 * args.target_kl:
                    stop = True
                    break
                mb_adv = b_advantages[mb]
                if args.norm_adv and len(mb) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                newvalue = newvalue.view(-1)
                if args.clip_vloss:  # CleanRL's
                    v_clipped = b_values[mb] + (newvalue - b_values[mb]).clamp(-clip, clip)
                    v_loss = 0.5 * torch.max((newvalue - b_returns[mb]) ** 2, (v_clipped - b_returns[mb]) ** 2).mean()
                else:  # SB3's: F.mse_loss(returns, values)
                    v_loss = ((newvalue - b_returns[mb]) ** 2).mean()
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
            if stop:
                break

        y_pred, y_true = b_values.numpy()[b_valid], b_returns.numpy()[b_valid]
        var_y = np.var(y_true)
        logger.scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        logger.scalar("charts/clip_range", clip, global_step)
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
    curve = {name: tuple(map(list, logger.curve(name))) for name in ("charts/episodic_return",
                                                                     "charts/episodic_length", "eval/return_mean")}
    return TrainResult(agent, backbone, eval_returns, global_step, out, curve)
