"""CleanRL-style agents for issue 14's benchmark: trained the way CleanRL's single-file scripts train them,
with their default hyperparameters, and saved as CleanRL saves a model, so the compiler reads them as a user's
file.

    from cleanrl_zoo import teacher, fp32_returns, config
    path = teacher("cleanrl-ppo", "CartPole-v1", seed=0)
    # ~/.cache/bitrl-compile/bench/cleanrl-ppo-CartPole-v1-seed0.cleanrl_model
    load_policy(path, config=config("cleanrl-ppo", "CartPole-v1"))    # source "cleanrl-ppo"
    fp32_returns(path, "cleanrl-ppo", "CartPole-v1", episodes=10, eval_seed=10_000)

    nice -n 10 python bench/cleanrl_zoo.py --algo cleanrl-dqn --env CartPole-v1 --seed 0   # train, evaluate

Why a re-implementation and not CleanRL itself: CleanRL is a set of scripts, not a package, and its scripts
pin gymnasium 0.29 (same-step autoreset, `infos["final_observation"]`); ours is gymnasium 1.x, whose vector
envs reset on the step after an episode ends unless asked otherwise. The two trainers below follow
vwxyzjn/cleanrl's cleanrl/dqn.py and cleanrl/ppo.py step for step, in our words, with their defaults
(DQNArgs, PPOArgs), on SyncVectorEnv(autoreset_mode=SAME_STEP) of RecordEpisodeStatistics-wrapped envs, which
gives back the 0.29 semantics those scripts were written for. What they share with CleanRL, and what the
frontend relies on, is the network (`QNetwork`: network.0/2/4, 120-84 ReLU; `Agent`: critic.* and
actor.0/2/4, 64-64 Tanh, orthogonal init) and the file: `torch.save(agent.state_dict(),
"<name>.cleanrl_model")` (for dqn.py the Q-network's, for ppo.py the whole Agent's, critic included, as
CleanRL writes them).

    dqn.py   one env; epsilon 1 -> 0.05 linearly over half the run, then 0.05; after step learning_starts, a
             TD step (MSE, Adam, batch 128 from a 10k replay buffer) every 10 steps and a copy to the target
             net every 500 (tau 1); truncated episodes bootstrap from their final observation, terminated
             ones do not.
    ppo.py   4 envs x 128 steps a rollout; GAE (0.99, 0.95) with done = terminated or truncated; 4 epochs of 4
             minibatches, clipped surrogate (0.2), clipped value loss, entropy 0.01, value 0.5, grad norm 0.5,
             normalised advantages, Adam(eps 1e-5) with the learning rate annealed linearly to 0.

Training is seeded (torch, one numpy Generator for exploration, sampling and shuffles, env reset seeds, action
space) and runs on one torch thread; `scale` shrinks a run for quick looks (dqn: learning_starts with it; the
exploration schedule is a fraction of the run). CleanRL keeps the last model, not the best: so do we.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitrl_compile.runtime.files import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/zoo.py: the benchmark models' cache
import zoo

ALGOS = ("cleanrl-dqn", "cleanrl-ppo")
ENVS = ("CartPole-v1", "Acrobot-v1")
CACHE = zoo.CACHE  # the benchmark's models, beside SB3's
SOURCE = "vwxyzjn/cleanrl cleanrl/dqn.py and cleanrl/ppo.py, their default arguments"
PROGRESS_LINES = 5  # log lines over a run, besides the last one


@dataclass(frozen=True)
class DQNArgs:  # cleanrl/dqn.py's defaults
    total_timesteps: int = 500_000
    learning_rate: float = 2.5e-4
    buffer_size: int = 10_000
    gamma: float = 0.99
    tau: float = 1.0
    target_network_frequency: int = 500
    batch_size: int = 128
    start_e: float = 1.0
    end_e: float = 0.05
    exploration_fraction: float = 0.5
    learning_starts: int = 10_000
    train_frequency: int = 10


@dataclass(frozen=True)
class PPOArgs:  # cleanrl/ppo.py's defaults
    total_timesteps: int = 500_000
    learning_rate: float = 2.5e-4
    num_envs: int = 4
    num_steps: int = 128
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


# -------------------------------------------------------------------------------------------- the networks

class QNetwork(nn.Module):
    """dqn.py's Q-network: observation -> 120 -> 84 -> a Q-value per action, ReLU (PyTorch's default init)."""

    def __init__(self, n_obs: int, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(n_obs, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                     nn.Linear(84, n_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def _ortho(layer: nn.Linear, std: float = float(np.sqrt(2))) -> nn.Linear:
    """ppo.py's init: orthogonal weights of gain `std` (0.01: policy head, 1: value head), zero biases."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, 0.0)
    return layer


class Agent(nn.Module):
    """ppo.py's agent: separate critic and actor, each observation -> 64 -> 64, Tanh; the actor: logits."""

    def __init__(self, n_obs: int, n_actions: int):
        super().__init__()
        self.critic = nn.Sequential(_ortho(nn.Linear(n_obs, 64)), nn.Tanh(), _ortho(nn.Linear(64, 64)),
                                    nn.Tanh(), _ortho(nn.Linear(64, 1), std=1.0))
        self.actor = nn.Sequential(_ortho(nn.Linear(n_obs, 64)), nn.Tanh(), _ortho(nn.Linear(64, 64)),
                                   nn.Tanh(), _ortho(nn.Linear(64, n_actions), std=0.01))

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x).flatten()

    def step(self, x: torch.Tensor, action: torch.Tensor | None = None):
        """(action, its log-probability, the policy's entropy, the value); the action sampled if not given."""
        dist = torch.distributions.Categorical(logits=self.actor(x))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.value(x)


def network(algo: str, n_obs: int, n_actions: int) -> nn.Module:
    return {"cleanrl-dqn": QNetwork, "cleanrl-ppo": Agent}[_check(algo)](n_obs, n_actions)


def policy_head(algo: str, net: nn.Module) -> nn.Module:
    """The part whose outputs pick the action (and that the frontend compiles): Q-network or actor."""
    return net.network if algo == "cleanrl-dqn" else net.actor


# -------------------------------------------------------------------------------------------- training

def _check(algo: str) -> str:
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}; use one of {', '.join(ALGOS)}")
    return algo


def _envs(env_id: str, n: int):
    """CleanRL's env setup: RecordEpisodeStatistics per env, synchronous vector env, same-step autoreset."""
    import gymnasium as gym

    from bitrl_compile.evaluate import make_env

    def thunk():
        return gym.wrappers.RecordEpisodeStatistics(make_env(env_id))

    envs = gym.vector.SyncVectorEnv([thunk] * n, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        raise TypeError(f"{env_id}: CleanRL's dqn.py and ppo.py take discrete actions only; use one of "
                        f"{ENVS}")
    return envs


def _episodes(infos: dict) -> list[float]:
    """Episodic returns of the envs whose episode ended at this step (RecordEpisodeStatistics' "episode")."""
    final = infos.get("final_info") or {}
    if "episode" not in final:
        return []
    return [float(r) for r, done in zip(final["episode"]["r"], final["_episode"]) if done]


class _Progress:
    """A few log lines over a run: steps and the mean episodic return since the previous line."""

    def __init__(self, name: str, total: int, log):
        self.name, self.total, self.log, self.returns = name, total, log, []
        self.every, self.next = max(1, total // PROGRESS_LINES), max(1, total // PROGRESS_LINES)

    def __call__(self, step: int, returns: list[float]) -> None:
        self.returns += returns
        if step >= self.next:
            self.next += self.every
            n = len(self.returns)
            mean = f"{np.mean(self.returns):.1f} over {n} episodes" if n else "none yet"
            self.log(f"{self.name}: step {step}/{self.total}, episodic return {mean}")
            self.returns = []


def train_dqn(env_id: str, seed: int, args: DQNArgs, log=print, name: str = "dqn") -> QNetwork:
    """dqn.py's loop (see the module docstring); returns the Q-network at the end of the run."""
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    envs = _envs(env_id, 1)
    envs.single_action_space.seed(seed)
    n_obs, n_act = int(np.prod(envs.single_observation_space.shape)), int(envs.single_action_space.n)
    q, target = QNetwork(n_obs, n_act), QNetwork(n_obs, n_act)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=args.learning_rate)
    size = args.buffer_size  # a ring buffer, sampled uniformly as SB3's ReplayBuffer (CleanRL's) samples
    buf = {"obs": np.zeros((size, n_obs), np.float32), "next": np.zeros((size, n_obs), np.float32),
           "act": np.zeros(size, np.int64), "rew": np.zeros(size, np.float32),
           "done": np.zeros(size, np.float32)}
    pos, full = 0, False
    duration = args.exploration_fraction * args.total_timesteps
    progress = _Progress(name, args.total_timesteps, log)
    obs, _ = envs.reset(seed=seed)
    for step in range(args.total_timesteps):
        epsilon = max(args.start_e + (args.end_e - args.start_e) * step / duration, args.end_e)
        if rng.random() < epsilon:
            action = np.array([envs.single_action_space.sample()])
        else:
            with torch.no_grad():
                action = q(torch.as_tensor(obs, dtype=torch.float32)).argmax(1).numpy()
        next_obs, reward, terminated, truncated, infos = envs.step(action)
        progress(step + 1, _episodes(infos))
        real_next = next_obs.copy()  # the reset observation replaced by the episode's last one
        if terminated[0] or truncated[0]:
            real_next[0] = infos["final_obs"][0]
        buf["obs"][pos], buf["next"][pos], buf["act"][pos] = obs[0], real_next[0], action[0]
        buf["rew"][pos], buf["done"][pos] = reward[0], float(terminated[0])  # truncation bootstraps
        pos = (pos + 1) % size
        full = full or pos == 0
        obs = next_obs
        if step > args.learning_starts:
            if step % args.train_frequency == 0:
                i = rng.integers(0, size if full else pos, size=args.batch_size)
                o, n, a, r, d = (torch.as_tensor(buf[k][i]) for k in ("obs", "next", "act", "rew", "done"))
                with torch.no_grad():
                    td_target = r + args.gamma * target(n).max(1).values * (1 - d)
                loss = F.mse_loss(td_target, q(o).gather(1, a[:, None]).squeeze(1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if step % args.target_network_frequency == 0:
                with torch.no_grad():
                    for t, p in zip(target.parameters(), q.parameters()):
                        t.copy_(args.tau * p + (1.0 - args.tau) * t)
    envs.close()
    return q


def train_ppo(env_id: str, seed: int, args: PPOArgs, log=print, name: str = "ppo") -> Agent:
    """ppo.py's loop (see the module docstring); returns the agent at the end of the run."""
    rng = np.random.default_rng(seed)
    envs = _envs(env_id, args.num_envs)
    envs.single_action_space.seed(seed)
    n_obs, n_act = int(np.prod(envs.single_observation_space.shape)), int(envs.single_action_space.n)
    agent = Agent(n_obs, n_act)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    T, N = args.num_steps, args.num_envs
    batch = T * N
    minibatch = batch // args.num_minibatches
    obs, actions = torch.zeros(T, N, n_obs), torch.zeros(T, N, dtype=torch.long)
    logprobs, rewards, dones, values = (torch.zeros(T, N) for _ in range(4))
    updates = max(1, args.total_timesteps // batch)
    progress = _Progress(name, updates * batch, log)
    next_obs = torch.as_tensor(envs.reset(seed=seed)[0], dtype=torch.float32)
    next_done = torch.zeros(N)
    step = 0
    for update in range(updates):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - update / updates) * args.learning_rate
        for t in range(T):
            step += N
            obs[t], dones[t] = next_obs, next_done
            with torch.no_grad():
                actions[t], logprobs[t], _, values[t] = agent.step(next_obs)
            o, r, terminated, truncated, infos = envs.step(actions[t].numpy())
            rewards[t] = torch.as_tensor(r, dtype=torch.float32)
            next_obs = torch.as_tensor(o, dtype=torch.float32)
            next_done = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32)
            progress(step, _episodes(infos))
        with torch.no_grad():  # GAE, bootstrapping from the value of the observation after the rollout
            advantages, last = torch.zeros(T, N), torch.zeros(N)
            next_value = agent.value(next_obs)
            for t in reversed(range(T)):
                alive = 1.0 - (next_done if t == T - 1 else dones[t + 1])
                following = next_value if t == T - 1 else values[t + 1]
                delta = rewards[t] + args.gamma * following * alive - values[t]
                advantages[t] = last = delta + args.gamma * args.gae_lambda * alive * last
            returns = advantages + values
        b_obs, b_act, b_logp = obs.reshape(batch, n_obs), actions.reshape(batch), logprobs.reshape(batch)
        b_adv, b_ret, b_val = advantages.reshape(batch), returns.reshape(batch), values.reshape(batch)
        order = np.arange(batch)
        for _ in range(args.update_epochs):
            rng.shuffle(order)
            for start in range(0, batch, minibatch):
                i = torch.as_tensor(order[start:start + minibatch])
                _, logp, entropy, value = agent.step(b_obs[i], b_act[i])
                ratio = (logp - b_logp[i]).exp()
                adv = b_adv[i]
                if args.norm_adv:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                clipped_ratio = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(-adv * ratio, -adv * clipped_ratio).mean()
                if args.clip_vloss:
                    clipped = b_val[i] + (value - b_val[i]).clamp(-args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((value - b_ret[i]) ** 2, (clipped - b_ret[i]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((value - b_ret[i]) ** 2).mean()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
    envs.close()
    return agent


def settings(algo: str, scale: float = 1.0) -> DQNArgs | PPOArgs:
    """CleanRL's defaults for `algo`, the budget times `scale` (dqn: learning_starts too)."""
    if _check(algo) == "cleanrl-dqn":
        d = DQNArgs()
        return replace(d, total_timesteps=max(1, round(d.total_timesteps * scale)),
                       learning_starts=round(d.learning_starts * scale))
    return replace(PPOArgs(), total_timesteps=max(1, round(PPOArgs.total_timesteps * scale)))


def rows(algos=ALGOS, envs=ENVS) -> list[tuple[str, str]]:
    """The (algo, env) pairs trained here, in the order of `algos` then `envs` (as bench/zoo.py's `rows`)."""
    return [(a, e) for a in algos for e in envs if a in ALGOS and e in ENVS]


def cache_path(algo: str, env_id: str, seed: int, scale: float = 1.0, cache: Path | None = None) -> Path:
    tail = "" if scale == 1.0 else f"-x{scale:g}"
    return Path(cache or CACHE) / f"{_check(algo)}-{env_id}-seed{seed}{tail}.cleanrl_model"


def teacher(algo: str, env_id: str, seed: int, log=print, scale: float = 1.0,
            cache: Path | None = None) -> Path:
    """The cached CleanRL agent of (algo, env, seed) (`cache_path`), trained with CleanRL's defaults (budget
    times `scale`) when missing and written as CleanRL writes it (`torch.save(state_dict)`), atomically."""
    path = cache_path(algo, env_id, seed, scale, cache)
    if path.is_file():
        return path
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train = train_dqn if algo == "cleanrl-dqn" else train_ppo
    net = train(env_id, seed, settings(algo, scale), log=log, name=path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = net.state_dict()
    write_atomic(path, lambda f: torch.save(state, f))
    log(f"trained {path.name} in {time.perf_counter() - t0:.0f} s")
    return path


# -------------------------------------------------------------------------------------------- reading back

def load_network(path: Path, algo: str, env_id: str) -> nn.Module:
    """The trainer's network class with the saved state_dict, its sizes from the env's spaces."""
    from bitrl_compile.evaluate import make_env

    env = make_env(env_id)
    n_obs, n_act = int(np.prod(env.observation_space.shape)), int(env.action_space.n)
    env.close()
    net = network(algo, n_obs, n_act)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def fp32_returns(path: Path, algo: str, env_id: str, episodes: int, eval_seed: int) -> list[float]:
    """The agent's own deterministic policy in plain torch (argmax of the Q-values or of the actor's logits)
    on episodes reset with eval_seed + i."""
    from bitrl_compile.evaluate import evaluate

    head = policy_head(algo, load_network(path, algo, env_id))

    def act(obs) -> int:
        with torch.no_grad():
            return int(head(torch.as_tensor(np.asarray(obs, np.float32))[None]).argmax(1))

    return [float(r) for r in evaluate(act, env_id, episodes, eval_seed)[0]]


def config(algo: str, env_id: str) -> dict:
    """What load_policy needs beside the file: the env (observation shape and bounds, the action count)."""
    _check(algo)
    return {"env": env_id}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", choices=ALGOS, required=True)
    p.add_argument("--env", choices=ENVS, default="CartPole-v1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--episodes", type=int, default=10)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    path = teacher(a.algo, a.env, a.seed, scale=a.scale)
    returns = fp32_returns(path, a.algo, a.env, a.episodes, 10_000)
    print(f"{path}: deterministic return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {a.episodes} "
          f"episodes (reset seeds 10000+i); {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
