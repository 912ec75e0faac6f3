"""RL Zoo's published settings for the Stable-Baselines3 policies the benchmarks train, and their cache.

    from zoo import teacher, statistics
    path = teacher("dqn", "CartPole-v1", seed=0)     # ~/.cache/bitrl-compile/bench/sb3-dqn-CartPole-v1-seed0.zip
    statistics(path)                                  # its VecNormalize (.normalize.pkl beside it) or None

One table for bench/distill.py and bench/policy_matrix.py. `ZOO[(algo, env)]` holds RL Zoo's settings verbatim in
its own terms (rl-baselines3-zoo, hyperparams/{a2c,dqn,sac,td3}.yml at commit 22e3ff2 of April 2026, the files
read by `git show HEAD:hyperparams/<algo>.yml`; PPO's come from trainers/presets.py, the project's one home of
RL Zoo's hyperparams/ppo.yml, for the envs it has, and from ppo.yml here for the two it has not), without
`policy: MlpPolicy`; "policy_kwargs" strings are written as dicts. `sb3_settings` translates one into SB3's
constructor arguments:

    n_timesteps                   the training budget (times `scale`)
    n_envs                        make_vec_env(env, n_envs)
    normalize: true               VecNormalize(gamma=the discount), saved beside the zip as
                                  sb3-<algo>-<env>-seed<S>[-scale<x>].normalize.pkl (what `bitrl-compile MODEL
                                  --vecnormalize FILE --trust-pickle` reads; not named *vecnorm*.pkl, which the
                                  frontend would take for the statistics of every other model in the folder)
    noise_type, noise_std         TD3's action noise (NormalActionNoise, OrnsteinUhlenbeckActionNoise)
    "lin_X"                       a linear schedule from X to 0 (learning_rate, clip_range)

What we cannot compile is replaced by the nearest setting we can, listed by `dropped` (and in the benchmark's
notes): gSDE (`use_sde`, `sde_sample_freq`, and `log_std_init`, which in these entries sets gSDE's noise scale;
SAC with gSDE does not load: frontends/sb3.py) becomes the plain Gaussian (PPO, A2C) or squashed Gaussian (SAC)
with SB3's default initial log std; `ortho_init` and everything else is kept.

Training (`teacher`): SB3 itself, one `learn` over the whole budget (so "lin_" schedules and DQN's exploration
schedule run as RL Zoo runs them), with a deterministic evaluation of 5 episodes every tenth of the budget (once
past learning_starts); the best evaluated model is kept, as RL Zoo's EvalCallback keeps best_model.zip. Each
evaluation (and every ten minutes) leaves a checkpoint beside the cache (`Checkpoint`), so a training whose
process is killed resumes where it stopped instead of from step 0, on the same machine: the cache is not in the
repository, so a teacher that needs more than a machine's life (SAC BipedalWalker, 4-5 hours) is not measured
here. The DQN CartPole, SAC and TD3 Pendulum models cached before this module existed were trained by ten `learn`
calls of a tenth each (bench/distill.py's former loop, whose schedules restarted every tenth); delete them to
retrain.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "bitrl-compile" / "bench"
SOURCE = "rl-baselines3-zoo hyperparams/{ppo,a2c,dqn,sac,td3}.yml (commit 22e3ff2, April 2026)"

# The envs of issue 14's benchmark (LunarLanderContinuous-v3 and BipedalWalker-v3 only on request: SAC's 500k and TD3's
# 300k steps of one gradient step each are hours per seed on one core, A2C's 5M steps longer still; SAC BipedalWalker's
# 500k steps, 64 gradient steps of a 400-300 network every 64, run at about 30 steps/s here: 4-5 hours. PPO's 5M
# BipedalWalker steps are mostly Box2D's: about 1300 steps/s, an hour per seed).
ENVS = ("CartPole-v1", "Acrobot-v1", "LunarLander-v3", "Pendulum-v1", "MountainCarContinuous-v0")
EXTRA_ENVS = ("LunarLanderContinuous-v3", "BipedalWalker-v3")
ALGOS = ("ppo", "a2c", "dqn", "sac", "td3")


def _ppo() -> dict:
    from bitrl_compile.trainers import presets

    out = {("ppo", env): dict(s) for env, s in presets.ZOO.items() if env in ENVS}
    out[("ppo", "MountainCarContinuous-v0")] = {  # hyperparams/ppo.yml (not in presets.ZOO)
        "normalize": True, "n_envs": 1, "n_timesteps": 20_000, "batch_size": 256, "n_steps": 8, "gamma": 0.9999,
        "learning_rate": 7.77e-05, "ent_coef": 0.00429, "clip_range": 0.1, "n_epochs": 10, "gae_lambda": 0.9,
        "max_grad_norm": 5, "vf_coef": 0.19, "use_sde": True,
        "policy_kwargs": {"log_std_init": -3.29, "ortho_init": False}}
    out[("ppo", "LunarLanderContinuous-v3")] = {
        "n_envs": 16, "n_timesteps": 1_000_000, "n_steps": 1024, "batch_size": 64, "gae_lambda": 0.98,
        "gamma": 0.999, "n_epochs": 4, "ent_coef": 0.01}
    out[("ppo", "BipedalWalker-v3")] = {
        "normalize": True, "n_envs": 32, "n_timesteps": 5_000_000, "n_steps": 2048, "batch_size": 64,
        "gae_lambda": 0.95, "gamma": 0.999, "n_epochs": 10, "ent_coef": 0.0, "learning_rate": 3e-4,
        "clip_range": 0.18}
    return out


_A2C_SDE = {"normalize": True, "ent_coef": 0.0, "max_grad_norm": 0.5, "n_steps": 8, "gae_lambda": 0.9,
            "vf_coef": 0.4, "use_rms_prop": True, "normalize_advantage": False, "learning_rate": "lin_7e-4",
            "use_sde": True, "policy_kwargs": {"log_std_init": -2, "ortho_init": False}}
_DQN_256 = {"n_timesteps": 100_000, "learning_rate": 6.3e-4, "batch_size": 128, "buffer_size": 50_000,
            "learning_starts": 0, "gamma": 0.99, "target_update_interval": 250, "train_freq": 4, "gradient_steps": -1,
            "exploration_fraction": 0.12, "exploration_final_eps": 0.1, "policy_kwargs": {"net_arch": [256, 256]}}

ZOO: dict[tuple[str, str], dict] = {
    **_ppo(),
    # hyperparams/a2c.yml
    ("a2c", "CartPole-v1"): {"n_envs": 8, "n_timesteps": 500_000, "ent_coef": 0.0},
    ("a2c", "Acrobot-v1"): {"normalize": True, "n_envs": 16, "n_timesteps": 500_000, "ent_coef": 0.0},
    ("a2c", "LunarLander-v3"): {"n_envs": 8, "n_timesteps": 200_000, "gamma": 0.995, "n_steps": 5,
                                "learning_rate": "lin_0.00083", "ent_coef": 1e-5},
    ("a2c", "Pendulum-v1"): {**_A2C_SDE, "n_envs": 8, "n_timesteps": 1_000_000, "gamma": 0.9},
    ("a2c", "MountainCarContinuous-v0"): {"normalize": True, "n_envs": 4, "n_steps": 100, "n_timesteps": 100_000,
                                          "ent_coef": 0.0, "use_sde": True, "sde_sample_freq": 16,
                                          "policy_kwargs": {"log_std_init": 0.0, "ortho_init": False}},
    ("a2c", "LunarLanderContinuous-v3"): {**_A2C_SDE, "n_envs": 4, "n_timesteps": 5_000_000, "gamma": 0.99},
    # hyperparams/dqn.yml
    ("dqn", "CartPole-v1"): {"n_timesteps": 50_000, "learning_rate": 2.3e-3, "batch_size": 64, "buffer_size": 100_000,
                             "learning_starts": 1000, "gamma": 0.99, "target_update_interval": 10, "train_freq": 256,
                             "gradient_steps": 128, "exploration_fraction": 0.16, "exploration_final_eps": 0.04,
                             "policy_kwargs": {"net_arch": [256, 256]}},
    ("dqn", "Acrobot-v1"): dict(_DQN_256),
    ("dqn", "LunarLander-v3"): dict(_DQN_256),
    # hyperparams/sac.yml
    ("sac", "Pendulum-v1"): {"n_timesteps": 20_000, "learning_rate": 1e-3},
    ("sac", "MountainCarContinuous-v0"): {"n_timesteps": 50_000, "learning_rate": 3e-4, "buffer_size": 50_000,
                                          "batch_size": 512, "ent_coef": 0.1, "train_freq": 32, "gradient_steps": 32,
                                          "gamma": 0.9999, "tau": 0.01, "learning_starts": 0, "use_sde": True,
                                          "policy_kwargs": {"log_std_init": -3.67, "net_arch": [64, 64]}},
    ("sac", "LunarLanderContinuous-v3"): {"n_timesteps": 500_000, "batch_size": 256, "learning_rate": "lin_7.3e-4",
                                          "buffer_size": 1_000_000, "ent_coef": "auto", "gamma": 0.99, "tau": 0.01,
                                          "train_freq": 1, "gradient_steps": 1, "learning_starts": 10_000,
                                          "policy_kwargs": {"net_arch": [400, 300]}},
    ("sac", "BipedalWalker-v3"): {"n_timesteps": 500_000, "learning_rate": 7.3e-4, "buffer_size": 300_000,
                                  "batch_size": 256, "ent_coef": "auto", "gamma": 0.98, "tau": 0.02, "train_freq": 64,
                                  "gradient_steps": 64, "learning_starts": 10_000, "use_sde": True,
                                  "policy_kwargs": {"log_std_init": -3, "net_arch": [400, 300]}},
    # hyperparams/td3.yml
    ("td3", "Pendulum-v1"): {"n_timesteps": 20_000, "gamma": 0.98, "buffer_size": 200_000, "learning_starts": 10_000,
                             "noise_type": "normal", "noise_std": 0.1, "gradient_steps": 1, "train_freq": 1,
                             "learning_rate": 1e-3, "policy_kwargs": {"net_arch": [400, 300]}},
    ("td3", "MountainCarContinuous-v0"): {"n_timesteps": 300_000, "noise_type": "ornstein-uhlenbeck",
                                          "noise_std": 0.5, "gradient_steps": 1, "train_freq": 1,
                                          "learning_rate": 1e-3, "batch_size": 256,
                                          "policy_kwargs": {"net_arch": [400, 300]}},
    ("td3", "LunarLanderContinuous-v3"): {"n_timesteps": 300_000, "gamma": 0.98, "buffer_size": 200_000,
                                          "learning_starts": 10_000, "noise_type": "normal", "noise_std": 0.1,
                                          "gradient_steps": 1, "train_freq": 1, "learning_rate": 1e-3,
                                          "policy_kwargs": {"net_arch": [400, 300]}},
}

GSDE = ("use_sde", "sde_sample_freq")  # and policy_kwargs' log_std_init where use_sde is set
EVALUATIONS = 10  # deterministic evaluations over a training run (the best is kept)
CHECKPOINT_SECONDS = 600  # and a checkpoint at least this often (Checkpoint)


def rows(algos=ALGOS, envs=ENVS) -> list[tuple[str, str]]:
    """The (algo, env) pairs RL Zoo has settings for, in the order of `algos` then `envs`."""
    return [(a, e) for a in algos for e in envs if (a, e) in ZOO]


def dropped(algo: str, env_id: str) -> list[str]:
    """RL Zoo's settings of (algo, env) that we cannot compile and replace (see the module docstring)."""
    z = ZOO[(algo, env_id)]
    out = [k for k in GSDE if k in z]
    if z.get("use_sde") and "log_std_init" in z.get("policy_kwargs", {}):
        out.append(f"log_std_init={z['policy_kwargs']['log_std_init']}")
    return out


def _schedule(value):
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])
        return lambda progress_remaining: progress_remaining * start
    return value


def sb3_settings(algo: str, env_id: str, scale: float = 1.0) -> dict:
    """{"kwargs": SB3 constructor arguments, "n_envs", "steps", "normalize", "noise": (type, std) or None}."""
    z = dict(ZOO[(algo, env_id)])
    out = {"n_envs": int(z.pop("n_envs", 1)), "steps": max(1, round(float(z.pop("n_timesteps")) * scale)),
           "normalize": bool(z.pop("normalize", False)), "noise": None}
    if "noise_type" in z:
        out["noise"] = (z.pop("noise_type"), float(z.pop("noise_std")))
    sde = bool(z.get("use_sde"))
    for key in GSDE:
        z.pop(key, None)
    if "policy_kwargs" in z:
        z["policy_kwargs"] = {k: v for k, v in z["policy_kwargs"].items() if not (sde and k == "log_std_init")}
    for key in ("learning_rate", "clip_range"):
        if key in z:
            z[key] = _schedule(z[key])
    out["kwargs"] = z
    return out


def cache_path(algo: str, env_id: str, seed: int, scale: float = 1.0) -> Path:
    tail = "" if scale == 1.0 else f"-scale{scale:g}"
    return CACHE / f"sb3-{algo}-{env_id}-seed{seed}{tail}.zip"


def statistics(path: Path) -> Path | None:
    """The VecNormalize saved beside a cached model, or None (trained without normalize)."""
    stats = statistics_name(path)
    return stats if stats.is_file() else None


def _action_noise(noise, n: int):
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    kind, std = noise
    cls = {"normal": NormalActionNoise, "ornstein-uhlenbeck": OrnsteinUhlenbeckActionNoise}[kind]
    return cls(np.zeros(n), std * np.ones(n))


def teacher(algo: str, env_id: str, seed: int, log=print, scale: float = 1.0) -> Path:
    """The cached SB3 model of (algo, env, seed), trained with RL Zoo's settings (times `scale`) when missing; its
    VecNormalize (where RL Zoo normalises) is `statistics(path)`. Raises evaluate.EnvUnavailable (one line with the
    pip install) when the env cannot be made here. A training resumes from its last checkpoint (`Checkpoint`)."""
    path = cache_path(algo, env_id, seed, scale)
    if path.is_file():
        return path
    from bitrl_compile.evaluate import make_env

    make_env(env_id).close()  # a missing extra (Box2D) is one line, before any training
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # one training per model: a second process waits for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        return _train(algo, env_id, seed, log, scale, path)


def _train(algo: str, env_id: str, seed: int, log, scale: float, path: Path) -> Path:
    import stable_baselines3
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    s = sb3_settings(algo, env_id, scale)
    kwargs = dict(s["kwargs"])
    cls = getattr(stable_baselines3, algo.upper())
    tmp = path.with_suffix(".tmp.zip")
    tmp_stats = path.with_suffix(".tmp.pkl") if s["normalize"] else None
    every = max(1, s["steps"] // EVALUATIONS)
    starts = int(kwargs.get("learning_starts", 0))
    checkpoint = Checkpoint(path)
    state = checkpoint.state()
    done = state["steps"] if state else 0  # the resumed run's envs and random streams start anew from here
    venv = make_vec_env(env_id, n_envs=s["n_envs"], seed=seed + done)
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 100_000 + done)
    if s["normalize"]:  # RL Zoo passes the discount to VecNormalize; evaluation sees the training statistics
        venv = (VecNormalize.load(str(checkpoint.file("normalize.pkl")), venv) if state else
                VecNormalize(venv, gamma=kwargs.get("gamma", 0.99)))
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)
    if state:
        model = checkpoint.restore(cls, venv, seed + done, tmp, tmp_stats)
        best = {"score": state["best"], "next": state["next"]}
        log(f"training {path.name}: resumed at {done} of {s['steps']} steps (best {best['score']:.1f})")
    else:
        for stale in (tmp, path.with_suffix(".tmp.pkl")):  # a best model of a run that left no checkpoint
            stale.unlink(missing_ok=True)
        if s["noise"]:
            kwargs["action_noise"] = _action_noise(s["noise"], int(np.prod(venv.action_space.shape)))
        model = cls("MlpPolicy", venv, seed=seed, verbose=0, device="cpu", **kwargs)
        best = {"score": -np.inf, "next": every}
    clock = {"start": time.perf_counter(), "saved": time.perf_counter(), "before": state["seconds"] if state else 0.0}

    def seconds() -> float:
        return clock["before"] + time.perf_counter() - clock["start"]

    def save() -> None:
        checkpoint.save(model, venv if s["normalize"] else None, tmp, tmp_stats,
                        {"steps": int(model.num_timesteps), "best": float(best["score"]), "next": best["next"],
                         "seconds": seconds()})
        clock["saved"] = time.perf_counter()

    def evaluate_and_keep() -> None:
        if s["normalize"]:
            eval_env.obs_rms = venv.obs_rms.copy()
        score, _ = evaluate_policy(model, eval_env, n_eval_episodes=5, deterministic=True, warn=False)
        if score > best["score"]:
            best["score"] = score
            model.save(tmp)
            if s["normalize"]:
                venv.save(tmp_stats)
        log(f"training {path.name}: {model.num_timesteps} of {s['steps']} steps, evaluation {score:.1f} "
            f"(best {best['score']:.1f}), {seconds():.0f} s")

    class Best(BaseCallback):  # RL Zoo's EvalCallback: the best of periodic deterministic evaluations
        def _on_step(self) -> bool:
            if self.num_timesteps >= best["next"]:
                best["next"] += every
                if self.num_timesteps >= starts:
                    evaluate_and_keep()
                    if self.num_timesteps < s["steps"]:
                        save()
            elif time.perf_counter() - clock["saved"] > CHECKPOINT_SECONDS:
                save()
            return True

    model.learn(s["steps"] - done, callback=Best(), reset_num_timesteps=not state)
    if not tmp.is_file():  # a budget that ended before learning_starts
        evaluate_and_keep()
    if s["normalize"]:
        tmp_stats.rename(statistics_name(path))
    tmp.rename(path)  # last: the zip's presence means both files are complete
    checkpoint.remove()
    log(f"trained {path.name} in {seconds():.0f} s (best evaluation {best['score']:.1f})")
    return path


class Checkpoint:
    """A training's state, so RL Zoo's budgets (hours for TD3 MountainCarContinuous or SAC BipedalWalker) survive
    the end of a process: the model (with its optimisers), its replay buffer, its VecNormalize, the best evaluated
    model so far and a state.json (steps, best score, next evaluation, seconds), in <name>.ckpt/, written every
    evaluation and every CHECKPOINT_SECONDS. A new one is written whole as <name>.ckpt-new/ (state.json last), then
    takes the place of the old, which is <name>.ckpt-old/ meanwhile: a kill at any moment leaves one complete.
    Resumed, the envs reset and the random streams are seeded anew (seed + steps done), so a resumed run is RL Zoo's
    settings and budget, not step for step the run that would not have stopped."""

    def __init__(self, path: Path):
        self.dirs = [path.with_suffix(s) for s in (".ckpt", ".ckpt-old")]
        self.new = path.with_suffix(".ckpt-new")
        self.found = next((d for d in self.dirs if (d / "state.json").is_file()), None)  # the one complete

    def state(self) -> dict | None:
        return json.loads((self.found / "state.json").read_text()) if self.found else None

    def file(self, name: str) -> Path:
        return self.found / name

    def restore(self, cls, venv, seed: int, tmp: Path, tmp_stats: Path | None):
        model = cls.load(str(self.file("model.zip")), env=venv, device="cpu")
        if hasattr(model, "replay_buffer"):
            model.load_replay_buffer(str(self.file("buffer.pkl")))
        model.set_random_seed(seed)
        model._last_obs = None  # learn() resets the new envs instead of stepping from the saved observation
        for name, to in (("best.zip", tmp), ("best.normalize.pkl", tmp_stats)):
            if to is None:
                continue
            to.unlink(missing_ok=True)  # a best model written after the checkpoint, by the run that stopped
            if self.file(name).is_file():  # none before the first evaluation
                shutil.copyfile(self.file(name), to)
        return model

    def save(self, model, venv, tmp: Path, tmp_stats: Path | None, state: dict) -> None:
        shutil.rmtree(self.new, ignore_errors=True)
        self.new.mkdir()
        model.save(self.new / "model.zip")
        if hasattr(model, "replay_buffer"):
            model.save_replay_buffer(self.new / "buffer.pkl")
        if venv is not None:
            venv.save(str(self.new / "normalize.pkl"))
        for name, best in (("best.zip", tmp), ("best.normalize.pkl", tmp_stats)):
            if best is not None and best.is_file():
                shutil.copyfile(best, self.new / name)
        (self.new / "state.json").write_text(json.dumps(state))
        current, old = self.dirs
        shutil.rmtree(old, ignore_errors=True)
        if current.is_dir():
            current.rename(old)
        self.new.rename(current)
        shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        for d in (*self.dirs, self.new):
            shutil.rmtree(d, ignore_errors=True)


def statistics_name(path: Path) -> Path:
    return Path(path).with_suffix(".normalize.pkl")
