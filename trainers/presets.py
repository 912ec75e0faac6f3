"""RL Zoo's published PPO hyperparameters, per environment id: the defaults of `bitrl-compile train --env ID`.

`ZOO` holds them verbatim in RL Zoo's own terms (rl-baselines3-zoo, hyperparams/ppo.yml; LunarLander-v3 has
LunarLander-v2's settings, the env's new version); `SB3_DEFAULTS` are Stable-Baselines3's PPO defaults (with RL
Zoo's n_envs 1, SB3's MlpPolicy: separate 64-64 tanh actor and critic, orthogonal init), which an env without a
preset gets. `preset(env_id)` translates one into `ppo.Args` fields:

    n_envs -> num_envs        n_steps -> num_steps      batch_size -> num_minibatches (n_envs * n_steps // batch)
    n_epochs -> update_epochs learning_rate "lin_X" -> X, annealed to 0; a number -> constant
    clip_range "lin_X" -> X, annealed to 0 (anneal_clip); a number -> constant
    normalize: true -> VecNormalize's defaults: norm_obs and norm_reward (clip 10, gamma = the discount)
    n_timesteps -> total_timesteps

What this trainer does not have is left out and said in `UNSUPPORTED` (gSDE exploration: Pendulum's `use_sde`).
One home: the CLI, the benches (bench/ppo_zoo.py gives SB3 the same table through `sb3_kwargs`) and the tests
read presets from here.
"""

from __future__ import annotations

ZOO: dict[str, dict] = {
    "CartPole-v1": {"n_envs": 8, "n_timesteps": 100_000, "n_steps": 32, "batch_size": 256, "gae_lambda": 0.8,
                    "gamma": 0.98, "n_epochs": 20, "ent_coef": 0.0, "learning_rate": "lin_0.001",
                    "clip_range": "lin_0.2"},
    "Acrobot-v1": {"normalize": True, "n_envs": 16, "n_timesteps": 1_000_000, "n_steps": 256, "gae_lambda": 0.94,
                   "gamma": 0.99, "n_epochs": 4, "ent_coef": 0.0},
    "MountainCar-v0": {"normalize": True, "n_envs": 16, "n_timesteps": 1_000_000, "n_steps": 16,
                       "gae_lambda": 0.98, "gamma": 0.99, "n_epochs": 4, "ent_coef": 0.0},
    "LunarLander-v3": {"n_envs": 16, "n_timesteps": 1_000_000, "n_steps": 1024, "batch_size": 64,
                       "gae_lambda": 0.98, "gamma": 0.999, "n_epochs": 4, "ent_coef": 0.01},
    "Pendulum-v1": {"n_envs": 4, "n_timesteps": 100_000, "n_steps": 1024, "gae_lambda": 0.95, "gamma": 0.9,
                    "n_epochs": 10, "ent_coef": 0.0, "learning_rate": 1e-3, "clip_range": 0.2,
                    "use_sde": True, "sde_sample_freq": 4},
}

SB3_DEFAULTS: dict = {"n_envs": 1, "n_timesteps": 1_000_000, "n_steps": 2048, "batch_size": 64, "n_epochs": 10,
                      "learning_rate": 3e-4, "gamma": 0.99, "gae_lambda": 0.95, "clip_range": 0.2, "ent_coef": 0.0,
                      "vf_coef": 0.5, "max_grad_norm": 0.5, "normalize": False}

UNSUPPORTED = ("use_sde", "sde_sample_freq")  # gSDE: this trainer explores with a state-independent Gaussian


def zoo_settings(env_id: str) -> dict:
    """RL Zoo's settings for env_id over SB3's defaults (SB3's defaults alone for an env without a preset)."""
    return {**SB3_DEFAULTS, **ZOO.get(env_id, {})}


def _schedule(value) -> tuple[float, bool]:
    if isinstance(value, str) and value.startswith("lin_"):
        return float(value[4:]), True
    return float(value), False


def preset(env_id: str) -> dict:
    """ppo.Args fields for env_id: RL Zoo's published PPO settings, or SB3's PPO defaults without a preset."""
    z = zoo_settings(env_id)
    lr, anneal_lr = _schedule(z["learning_rate"])
    clip, anneal_clip = _schedule(z["clip_range"])
    batch = z["n_envs"] * z["n_steps"]
    return {"num_envs": z["n_envs"], "num_steps": z["n_steps"], "num_minibatches": max(1, batch // z["batch_size"]),
            "update_epochs": z["n_epochs"], "learning_rate": lr, "anneal_lr": anneal_lr, "clip_coef": clip,
            "anneal_clip": anneal_clip, "gamma": z["gamma"], "gae_lambda": z["gae_lambda"], "ent_coef": z["ent_coef"],
            "vf_coef": z["vf_coef"], "max_grad_norm": z["max_grad_norm"], "norm_obs": bool(z["normalize"]),
            "norm_reward": bool(z["normalize"]), "total_timesteps": int(z["n_timesteps"]),
            "activation": "tanh", "clip_vloss": False}


def describe(env_id: str) -> str:
    """One line: where the settings come from, and what of them this trainer leaves out."""
    source = "RL Zoo's PPO settings" if env_id in ZOO else "no RL Zoo preset: SB3's PPO defaults"
    left = [k for k in UNSUPPORTED if k in ZOO.get(env_id, {})]
    return source + (f" (without {', '.join(left)}: not supported)" if left else "")


def sb3_kwargs(env_id: str) -> dict:
    """The same settings as keyword arguments of stable_baselines3.PPO (plus "n_envs", "n_timesteps" and
    "normalize", which the caller turns into the vector env and VecNormalize), for side-by-side benchmarks."""
    z = zoo_settings(env_id)
    out = {k: v for k, v in z.items() if k not in UNSUPPORTED}
    for key in ("learning_rate", "clip_range"):
        value, linear = _schedule(z[key])
        out[key] = _linear(value) if linear else value
    return out


def _linear(value: float):
    def schedule(progress_remaining: float) -> float:
        return progress_remaining * value
    return schedule
