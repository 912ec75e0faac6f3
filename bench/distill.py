"""Distillation (trainers/distill.py) of SB3 policies into their ternary versions: return of fp32, PTQ, distilled.

    nice -n 10 python bench/distill.py                           # DQN CartPole, TD3 and SAC Pendulum, 5 seeds
    python bench/distill.py --policies dqn-CartPole-v1 --seeds 2 --budget 60     # a quick look
    python bench/distill.py --train-only                         # only train (and cache) the SB3 teachers
    python bench/distill.py --merge bench/runs/distill-*/results.json   # one table of runs made in parallel
    nice -n 10 python bench/distill.py --cnn --seeds 2 --budget 60      # a CNN: SB3 DQN CnnPolicy on pixels

Teachers are trained here by Stable-Baselines3 itself with RL Zoo's hyperparameters (bench/zoo.py, the table shared
with bench/policy_matrix.py: budgets as in rl-zoo3's hyperparams/*.yml) and cached in ~/.cache/bitrl-compile/bench/sb3-<algo>-<env>-seed<S>.zip, so a second run only
distils. For each seed: the teacher's return (fp32, its own MLP in numpy), PTQ (every Linear ternarized as the
compiler does, no training), distilled (`distill.distill`, the default budget: 180 s of one core or 99 % action
agreement), all on the same 10 deterministic episodes (reset seeds 10000 + i); and the time the distillation took.
Score = (R - R_random) / (R_fp32 - R_random). Returns of the distilled policy come from the numpy reference
(`export.reference_act`), which the compiled artifact matches (tests/test_distill.py checks it).

--cnn: the convolutional case (issue 17), tests/test_distill_cnn.py's task and teacher: CartPole-v1 as 36x36x3
frames, an SB3 DQN CnnPolicy (NatureCNN, 64 features) trained 600 steps per seed, not cached. Its table: agreement
with SB3's deterministic predict on 400 frames SB3's policy visits (plain, and weighted by its Q gaps: fidelity.py's
rule) of PTQ and of the distilled student (the numpy reference, which the artifact matches bit for bit), the
returns of 10 episodes, and the time the distillation took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

EVAL_SEED = 10_000

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/zoo.py: RL Zoo's settings, the teachers' cache
from zoo import statistics, teacher


def run(algo: str, env_id: str, seed: int, episodes: int, budget: float, per_channel: bool, out: Path) -> dict:
    import torch

    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.trainers import distill
    from bitrl_compile.trainers.export import reference_act

    torch.set_num_threads(1)
    path = teacher(algo, env_id, seed)
    loaded = load_policy(path, vecnormalize=statistics(path), trust_pickle=True)

    def ret(act):
        return evaluate(act, env_id, episodes, EVAL_SEED)[0]

    import gymnasium as gym

    space = gym.make(env_id).action_space
    rows = {"random": ret(lambda obs: space.sample()), "fp32": ret(reference_act(loaded, ternary=False)),
            "ptq": ret(reference_act(loaded, per_channel=per_channel))}
    path = out / f"{algo}-{env_id}-seed{seed}.safetensors"
    t0 = time.perf_counter()
    result = distill.distill(loaded, env_id, path, distill.DistillArgs(seed=seed, budget_s=budget,
                                                                      per_channel=per_channel), log=lambda s: None)
    seconds = time.perf_counter() - t0
    rows["distilled"] = ret(reference_act(load_policy(path), per_channel=per_channel))
    return {"algo": algo, "env": env_id, "seed": seed, "returns": rows, "seconds": round(seconds, 1),
            "agreement_before": result.agreement_before, "agreement_after": result.agreement_after,
            "rounds": result.rounds}


def run_cnn(seed: int, episodes: int, budget: float) -> dict:
    import dataclasses

    import gymnasium as gym
    import stable_baselines3 as sb3
    import torch

    from bitrl_compile import fidelity
    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.trainers import distill
    from bitrl_compile.trainers.export import reference_act, reference_forward

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_distill_cnn import ENV  # registers the pixel task

    torch.set_num_threads(1)
    model = sb3.DQN("CnnPolicy", ENV, seed=seed, learning_starts=64, buffer_size=2000, batch_size=32,
                    learning_rate=2e-3, train_freq=2, target_update_interval=50, exploration_fraction=0.5,
                    policy_kwargs={"features_extractor_kwargs": {"features_dim": 64}})
    model.learn(600)
    path = Path(f"/tmp/bench-distill-cnn-seed{seed}.zip")
    model.save(path)
    loaded = load_policy(path)
    env = gym.make(ENV)
    frames, (frame, _) = [], env.reset(seed=123)
    while len(frames) < 400:
        frames.append(frame)
        frame, _, terminated, truncated, _ = env.step(int(model.predict(frame, deterministic=True)[0]))
        if terminated or truncated:
            frame, _ = env.reset(seed=123 + len(frames))
    frames = np.stack(frames)
    actions = model.predict(frames, deterministic=True)[0]
    with torch.no_grad():
        q = model.q_net(model.policy.obs_to_tensor(frames)[0]).numpy()

    def agree(policy) -> list[float]:
        out = reference_forward(policy)(frames)
        return [float(np.mean(out.argmax(1) == actions)), fidelity.compare(loaded.output, out, q)["weighted"]]

    t0 = time.perf_counter()
    result = distill.distill(loaded, ENV, None, distill.DistillArgs(seed=seed, budget_s=budget), log=lambda s: None)
    seconds = time.perf_counter() - t0
    student = dataclasses.replace(loaded, module=result.student)

    def ret(act):
        return evaluate(act, ENV, episodes, EVAL_SEED)[0]

    return {"algo": "dqn-cnn", "env": ENV, "seed": seed, "seconds": round(seconds, 1), "rounds": result.rounds,
            "agreement": {"ptq": agree(loaded), "distilled": agree(student)},
            "returns": {"fp32": ret(reference_act(loaded, ternary=False)), "ptq": ret(reference_act(loaded)),
                        "distilled": ret(reference_act(student))}}


def cnn_table(results: list[dict]) -> str:
    lines = [("| policy | seeds | agreement PTQ (weighted) | agreement distilled (weighted) | return fp32 | PTQ | "
              "distilled | distill time (rounds) |"), "|---|---|---|---|---|---|---|---|"]

    def agreement(k):
        a = np.array([r["agreement"][k] for r in results])
        return f"{100 * a[:, 0].mean():.1f} % ({100 * a[:, 1].mean():.1f} %)"

    def cell(k):
        allr = np.concatenate([r["returns"][k] for r in results])
        return f"{np.mean(allr):.1f} ± {np.std(allr):.1f}"

    lines.append(f"| SB3 DQN CnnPolicy {results[0]['env']} 36x36x3 | {len(results)} | {agreement('ptq')} | "
                 f"{agreement('distilled')} | {cell('fp32')} | {cell('ptq')} | {cell('distilled')} | "
                 f"{np.mean([r['seconds'] for r in results]):.0f} s ({np.mean([r['rounds'] for r in results]):.1f}) |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = [("| policy | seeds | fp32 | PTQ | distilled | score PTQ | score distilled | agreement before → after "
             "| distill time |"), "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["algo"], r["env"]) for r in results})
    for algo, env_id in keys:
        rs = [r for r in results if (r["algo"], r["env"]) == (algo, env_id)]
        means = {k: np.array([np.mean(r["returns"][k]) for r in rs]) for k in ("random", "fp32", "ptq", "distilled")}
        span = np.where(np.abs(means["fp32"] - means["random"]) > 1e-9, means["fp32"] - means["random"], np.nan)

        def score(k):
            return f"{100 * np.nanmean((means[k] - means['random']) / span):.1f} %"  # noqa: B023

        def cell(k):
            allr = np.concatenate([r["returns"][k] for r in rs])  # noqa: B023 - called in this iteration
            return f"{np.mean(allr):.1f} ± {np.std(allr):.1f}"

        agree = (f"{np.mean([r['agreement_before'] for r in rs]):.3f} → "
                 f"{np.mean([r['agreement_after'] for r in rs]):.3f}")
        lines.append(f"| SB3 {algo.upper()} {env_id} | {len(rs)} | {cell('fp32')} | {cell('ptq')} | "
                     f"{cell('distilled')} | {score('ptq')} | {score('distilled')} | {agree} | "
                     f"{np.mean([r['seconds'] for r in rs]):.0f} s |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="dqn-CartPole-v1,td3-Pendulum-v1,sac-Pendulum-v1",
                   help="comma-separated algo-env")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--budget", type=float, default=180.0, help="distillation budget per policy, seconds")
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--cnn", action="store_true", help="the CNN row instead (SB3 DQN CnnPolicy on pixel CartPole)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="print the table of earlier runs' results.json files (runs in parallel), run nothing")
    p.add_argument("--out", default="bench/runs/distill", help="folder for the distilled files and results.json")
    a = p.parse_args()
    if a.merge:
        print(table([r for f in a.merge for r in json.loads(Path(f).read_text())]))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if a.cnn:
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            results.append(run_cnn(seed, a.episodes, a.budget))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            (out / "results-cnn.json").write_text(json.dumps(results, indent=1))
        print(cnn_table(results))
        return
    for spec in a.policies.split(","):
        algo, env_id = spec.split("-", 1)
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            if a.train_only:
                teacher(algo, env_id, seed, log=lambda s: print(s, file=sys.stderr, flush=True))
                continue
            r = run(algo, env_id, seed, a.episodes, a.budget, a.per_channel, out)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    if results:
        print(table(results))


if __name__ == "__main__":
    main()
