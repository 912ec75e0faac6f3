"""This project's fp32 PPO (trainers/ppo.py) against Stable-Baselines3's PPO, both with RL Zoo's published settings.

    nice -n 10 python bench/ppo_zoo.py                                  # CartPole, Acrobot (5 seeds), throughput
    nice -n 10 python bench/ppo_zoo.py --envs LunarLander-v3 --seeds 3 --no-throughput     # long: in the background
    python bench/ppo_zoo.py --report                                    # the table from every cached run

Both trainers get the same table (`trainers/presets.py`: `preset` for ours, `sb3_kwargs` for SB3's PPO, with
VecNormalize(gamma) where RL Zoo says `normalize: true`), the same budget per env (BUDGETS) and the same seeds; both
train on one core (torch threads 1, synchronous vector envs: DummyVecEnv, gymnasium SyncVectorEnv). The final policy
of a run is evaluated deterministically on 10 episodes reset with seeds 10000 + i (`bitrl_compile.evaluate`): SB3's
through `model.predict(VecNormalize.normalize_obs(obs), deterministic=True)`. A seed reaches the goal when its mean
return over those episodes is >= GOALS[env]. Each run is cached as JSON in --runs (a run is not repeated), so a long
env can run in the background and the report gathers what finished. Throughput: our trainer on the same env and
settings with `--vec sync` and `--vec async` (gymnasium AsyncVectorEnv, a process per env), short runs.
Writes bench/results/ppo_zoo.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"CartPole-v1": 100_000, "Acrobot-v1": 200_000, "LunarLander-v3": 1_000_000}
GOALS = {"CartPole-v1": 500.0, "Acrobot-v1": -100.0, "LunarLander-v3": 200.0}
IMPLS = {"ours": "ours (trainers/ppo.py)", "sb3": "SB3 PPO"}
EVAL_SEED, EPISODES = 10_000, 10
THROUGHPUT_STEPS = {"CartPole-v1": 16_384, "Acrobot-v1": 16_384, "LunarLander-v3": 32_768}


def run_ours(env_id: str, seed: int, steps: int, vec: str = "sync") -> dict:
    from bitrl_compile.trainers import ppo

    t0, c0 = time.perf_counter(), time.process_time()
    args = ppo.args_for(env_id, seed=seed, total_timesteps=steps, eval_every=0, eval_episodes=EPISODES,
                        eval_seed=EVAL_SEED, progress=False, tensorboard=False, vec=vec)
    result = ppo.train(args, log=lambda s: None)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"returns": [float(x) for x in result.eval_returns], "seconds": seconds, "cpu_seconds": cpu,
            "steps": result.global_step}


def run_sb3(env_id: str, seed: int, steps: int) -> dict:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.trainers import presets

    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    kw = presets.sb3_kwargs(env_id)
    n_envs, normalize = kw.pop("n_envs"), kw.pop("normalize")
    kw.pop("n_timesteps")
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed, vec_env_cls=DummyVecEnv)
    if normalize:
        venv = VecNormalize(venv, gamma=kw["gamma"])  # RL Zoo passes the discount to VecNormalize
    model = PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **kw)
    model.learn(total_timesteps=steps)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if normalize:
        venv.training = False

    def act(obs):
        x = venv.normalize_obs(np.asarray(obs, np.float32)[None]) if normalize else np.asarray(obs)[None]
        return int(model.predict(x, deterministic=True)[0][0])

    returns, _ = evaluate(act, env_id, EPISODES, EVAL_SEED)
    return {"returns": [float(x) for x in returns], "seconds": seconds, "cpu_seconds": cpu,
            "steps": int(model.num_timesteps)}


def job(impl: str, env_id: str, seed: int, runs: str) -> dict:
    path = Path(runs) / f"{impl}-{env_id}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    steps = BUDGETS[env_id]
    r = run_ours(env_id, seed, steps) if impl == "ours" else run_sb3(env_id, seed, steps)
    r.update(impl=impl, env=env_id, seed=seed, budget=steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r))
    return r


def throughput(env_id: str, vec: str) -> dict:
    r = run_ours(env_id, 0, THROUGHPUT_STEPS[env_id], vec)
    return {"env": env_id, "vec": vec, "steps": r["steps"], "seconds": r["seconds"]}


def markdown(results: list[dict], speeds: list[dict], meta: dict) -> str:
    lines = ["# PPO with RL Zoo's settings: trainers/ppo.py vs Stable-Baselines3", "",
             (f"Table by `{meta['command']}` ({meta['machine']}) from the runs cached in bench/runs/ppo_zoo (each made "
              "by `nice -n 10 python bench/ppo_zoo.py --envs ENV ...` while other jobs shared the 2 cores: wall times "
              "are inflated, CPU times (the training process's, ours including its final evaluation) are not). "
              "Both trainers use `trainers/presets.py` (RL Zoo's hyperparams/ppo.yml), one core each "
              "(torch threads 1, synchronous vector envs); final policy, deterministic, 10 episodes per seed "
              "(reset seeds 10000 + i); a seed reaches the goal when its mean return is >= the goal."), "",
             ("| env | steps | trainer | seeds | mean ± std of seed returns | per seed | reaching goal | "
             "wall time per seed | steps/s (wall) | CPU time per seed | steps/s (CPU) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for env_id, budget in BUDGETS.items():
        for impl, name in IMPLS.items():
            rs = sorted((r for r in results if r["env"] == env_id and r["impl"] == impl), key=lambda r: r["seed"])
            if not rs:
                continue
            means = [float(np.mean(r["returns"])) for r in rs]
            reached = sum(m >= GOALS[env_id] for m in means)
            secs = [r["seconds"] for r in rs]
            sps = np.mean([r["steps"] / r["seconds"] for r in rs])
            cpu = [r["cpu_seconds"] for r in rs if "cpu_seconds" in r]
            cpu_cols = f"{np.mean(cpu):.0f} s | {np.mean([r['steps'] for r in rs]) / np.mean(cpu):,.0f}" if cpu else "- | -"
            lines.append(f"| {env_id} | {budget:,} | {name} | {len(rs)} | {np.mean(means):.1f} ± "
                         f"{np.std(means):.1f} | {' '.join(f'{m:.0f}' for m in means)} | {reached}/{len(rs)} "
                         f"(goal {GOALS[env_id]:g}) | {np.mean(secs):.0f} s | {sps:,.0f} | {cpu_cols} |")
    if speeds:
        lines += ["", ("Throughput of trainers/ppo.py (the same settings, seed 0, short runs: rollouts and updates; "
                  "async = gymnasium AsyncVectorEnv, a process per env). A pipe round trip and a context switch per env "
                   "step cost more than these envs' steps (tens to hundreds of microseconds), so `--vec auto` picks "
                   "async only for envs whose step costs more than 1 ms (trainers/vec.py):"), "",
                  "| env | n_envs | steps | --vec sync steps/s | --vec async steps/s | async / sync |",
                  "|---|---|---|---|---|---|"]
        from bitrl_compile.trainers import presets

        for env_id in dict.fromkeys(s["env"] for s in speeds):
            by = {s["vec"]: s["steps"] / s["seconds"] for s in speeds if s["env"] == env_id}
            steps = next(s["steps"] for s in speeds if s["env"] == env_id)
            lines.append(f"| {env_id} | {presets.preset(env_id)['num_envs']} | {steps:,} | {by.get('sync', 0):,.0f} | "
                         f"{by.get('async', 0):,.0f} | {by.get('async', 0) / by.get('sync', 1):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=["CartPole-v1", "Acrobot-v1"], choices=list(BUDGETS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs" / "ppo_zoo")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ppo_zoo.md")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--report", action="store_true", help="only write the report from the cached runs")
    args = p.parse_args(argv)
    from bitrl_compile.bench import machine

    command = "python bench/ppo_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    speeds: list[dict] = []
    if not args.report:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(job, impl, env_id, seed, str(args.runs))
                       for env_id in args.envs for seed in range(args.seeds) for impl in args.impls]
            for f in as_completed(futures):
                r = f.result()
                print(f"{r['impl']} {r['env']} seed {r['seed']}: {np.mean(r['returns']):.1f} ({r['seconds']:.0f} s)",
                      file=sys.stderr, flush=True)
        if not args.no_throughput:
            for env_id in args.envs:
                for vec in ("sync", "async"):
                    speeds.append(throughput(env_id, vec))
                    print(f"throughput {env_id} {vec}: {speeds[-1]['steps'] / speeds[-1]['seconds']:,.0f} steps/s",
                          file=sys.stderr, flush=True)
    cached = args.runs / "throughput.json"
    if cached.exists():  # keep other envs' measurements
        speeds += [s for s in json.loads(cached.read_text()) if s["env"] not in {x["env"] for x in speeds}]
    if speeds:
        cached.write_text(json.dumps(speeds))
    results = [json.loads(f.read_text()) for f in sorted(args.runs.glob("*-seed*.json"))]
    text = markdown(results, speeds, {"command": command, "machine": machine.summary()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"results": results, "throughput": speeds}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
