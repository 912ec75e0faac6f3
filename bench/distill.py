"""Distillation (trainers/distill.py) of SB3 policies into their ternary versions: return of fp32, PTQ, distilled.

    nice -n 10 python bench/distill.py                           # DQN CartPole, TD3 and SAC Pendulum, 5 seeds
    python bench/distill.py --policies dqn-CartPole-v1 --seeds 2 --budget 60     # a quick look
    python bench/distill.py --train-only                         # only train (and cache) the SB3 teachers
    python bench/distill.py --merge bench/runs/distill-*/results.json   # one table of runs made in parallel
    nice -n 10 python bench/distill.py --cnn --seeds 3 --rounds 2        # a CNN: SB3 PPO CnnPolicy on pixels
    nice -n 10 python bench/distill.py --recurrent --seeds 3 --rounds 7 --agreement 1   # RecurrentPPO (LSTM)

Teachers are trained here by Stable-Baselines3 itself with RL Zoo's hyperparameters (bench/zoo.py, the table shared
with bench/policy_matrix.py: budgets as in rl-zoo3's hyperparams/*.yml) and cached in ~/.cache/bitrl-compile/bench/sb3-<algo>-<env>-seed<S>.zip, so a second run only
distils. For each seed: the teacher's return (fp32, its own MLP in numpy), PTQ (every Linear ternarized as the
compiler does, no training), distilled (`distill.distill`, the default budget: 180 s of one core or 99 % action
agreement), all on the same 10 deterministic episodes (reset seeds 10000 + i); and the time the distillation took.
Score = (R - R_random) / (R_fp32 - R_random). Returns of the distilled policy come from the numpy reference
(`export.reference_act`), which the compiled artifact matches (tests/test_distill.py checks it).

--cnn: the convolutional case (issue 17), tests/test_distill_cnn.py's task and teacher: bitrl_compile.envs'
BitrlPixelCartPole-v0 (CartPole-v1 as 36x36x3 frames), an SB3 PPO CnnPolicy (NatureCNN, 64 features) trained 4096
steps per seed, not cached. --recurrent: tests/test_keep_kinds.py's sb3-contrib RecurrentPPO (LSTM 2x16) on
CartPole-v1, 4096 steps. Their table: agreement with SB3's deterministic predict on 400 observations SB3's policy
visits (plain, and weighted by its stakes: fidelity.py's rule) of PTQ and of the distilled student (the numpy
reference for the CNN, which the artifact matches to the ulp; the ternary forward along the episodes for the
LSTM), the returns of 10 episodes, the teacher's training time and the time the distillation took (--rule: the
agreement it stops on, plain by default here; --rounds: at most that many DAgger rounds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


CNN_PPO = {"n_steps": 64, "batch_size": 64, "n_epochs": 4, "learning_rate": 1e-3,
           "policy_kwargs": {"features_extractor_kwargs": {"features_dim": 64}, "net_arch": [64]}}
CNN_STEPS = 4096  # tests/test_distill_cnn.py's teacher: PPO CnnPolicy, 4 envs
RPPO = {"n_steps": 128, "batch_size": 128, "n_epochs": 4, "learning_rate": 3e-3,
        "policy_kwargs": {"lstm_hidden_size": 16, "n_lstm_layers": 2, "net_arch": [16]}}
RPPO_STEPS = 4096  # tests/test_keep_kinds.py's teacher: RecurrentPPO, 4 envs
VISITED = 400      # frames / steps SB3's deterministic policy visits (reset seeds 123...), compared with its predict


def _agreement(spec: dict, out: np.ndarray, sb3_out: np.ndarray) -> list[float]:
    """[plain, weighted] agreement with SB3's outputs (fidelity.py's rule; plain = its predict's action)."""
    from bitrl_compile import fidelity

    r = fidelity.compare(spec, out, sb3_out)
    return [r["agreement"], r["weighted"]]


def run_cnn(seed: int, episodes: int, budget: float, rule: str, rounds: int, target: float) -> dict:
    """The CNN row: an SB3 PPO CnnPolicy trained on bitrl_compile.envs' pixel CartPole, distilled; agreement with
    SB3's deterministic predict on the frames it visits, of PTQ and of the student (the numpy reference, which the
    artifact matches to the ulp)."""
    import dataclasses

    import stable_baselines3 as sb3
    import torch
    from stable_baselines3.common.env_util import make_vec_env

    from bitrl_compile import fidelity
    from bitrl_compile.envs import PIXEL_CARTPOLE
    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.trainers import distill
    from bitrl_compile.trainers.export import reference_act, reference_forward

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = sb3.PPO("CnnPolicy", make_vec_env(PIXEL_CARTPOLE, 4, seed=seed), seed=seed, **CNN_PPO)
    model.learn(CNN_STEPS)
    train_s = time.perf_counter() - t0
    path = Path(tempfile.mkdtemp(prefix="bench-distill-")) / f"ppo-cnn-seed{seed}.zip"  # alone in its folder
    model.save(path)
    loaded = load_policy(path)

    def logits(x):
        with torch.no_grad():
            return model.policy.get_distribution(model.policy.obs_to_tensor(x)[0]).distribution.logits.numpy()

    frames, _ = fidelity.visited(logits, loaded.output, PIXEL_CARTPOLE, rollouts=100, max_states=VISITED, seed=123)
    sb3_out = logits(frames)
    t0 = time.perf_counter()
    result = distill.distill(loaded, PIXEL_CARTPOLE, None, distill.DistillArgs(
        seed=seed, budget_s=budget, rule=rule, max_rounds=rounds, agreement=target), log=lambda s: None)
    seconds = time.perf_counter() - t0
    student = dataclasses.replace(loaded, module=result.student)

    def ret(act):
        return evaluate(act, PIXEL_CARTPOLE, episodes, EVAL_SEED)[0]

    return {"algo": "ppo-cnn", "env": PIXEL_CARTPOLE, "seed": seed, "rule": rule, "seconds": round(seconds, 1),
            "train_seconds": round(train_s, 1), "rounds": result.rounds,
            "agreement": {"ptq": _agreement(loaded.output, reference_forward(loaded)(frames), sb3_out),
                          "distilled": _agreement(loaded.output, reference_forward(student)(frames), sb3_out)},
            "returns": {"fp32": ret(reference_act(loaded, ternary=False)), "ptq": ret(reference_act(loaded)),
                        "distilled": ret(reference_act(student))}}


def run_recurrent(seed: int, episodes: int, budget: float, rule: str, rounds: int, target: float) -> dict:
    """The recurrent row: an sb3-contrib RecurrentPPO (LSTM 2x16) on CartPole-v1, distilled through time; agreement
    with SB3's deterministic predict (its state carried) along the episodes it plays, of PTQ and of the student
    (their ternary forward with their own state: the artifact's reference to 1e-4, tests/test_recurrent.py)."""

    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    from bitrl_compile import fidelity
    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.trainers import distill, distill_recurrent

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = RecurrentPPO("MlpLstmPolicy", make_vec_env("CartPole-v1", 4, seed=seed), seed=seed, **RPPO)
    model.learn(RPPO_STEPS)
    train_s = time.perf_counter() - t0
    path = Path(tempfile.mkdtemp(prefix="bench-distill-")) / f"rppo-seed{seed}.zip"  # alone in its folder
    model.save(path)
    loaded = load_policy(path)
    obs, starts, actions = sb3_episodes(model, "CartPole-v1", VISITED)
    teacher = fidelity.original_forward(loaded)
    fp32 = fidelity.in_order(teacher, obs, starts)
    assert np.array_equal(fp32.argmax(1), actions), "the loaded actor is not SB3's predict"
    t0 = time.perf_counter()
    result = distill_recurrent.distill(loaded, "CartPole-v1", distill.DistillArgs(
        seed=seed, budget_s=budget, rule=rule, max_rounds=rounds, agreement=target), log=lambda s: None)
    seconds = time.perf_counter() - t0

    def ternary(module):
        x, mask = distill_recurrent.episodes_of(obs, starts)
        with torch.no_grad():
            return distill_recurrent.sequence_forward(module, x, True)[mask].numpy()

    def ret(module, quantized: bool):
        class Act:  # evaluate() resets it at every episode's start
            def reset(self):
                self.state, self.start = module.initial_state(1), torch.ones(1)

            def __call__(self, o):
                with torch.no_grad(), distill_recurrent.ternary(module, quantized):
                    out, self.state = module(torch.from_numpy(np.asarray(o, np.float32)[None]), self.state,
                                             self.start)
                self.start = torch.zeros(1)
                return int(out.argmax(1)[0])

        return evaluate(Act(), "CartPole-v1", episodes, EVAL_SEED)[0]

    return {"algo": "rppo", "env": "CartPole-v1", "seed": seed, "rule": rule, "seconds": round(seconds, 1),
            "train_seconds": round(train_s, 1), "rounds": result.rounds,
            "agreement": {"ptq": _agreement(loaded.output, ternary(loaded.module), fp32),
                          "distilled": _agreement(loaded.output, ternary(result.student), fp32)},
            "returns": {"fp32": ret(loaded.module, False), "ptq": ret(loaded.module, True),
                        "distilled": ret(result.student, True)}}


def sb3_episodes(model, env_id: str, steps: int, seed: int = 123):
    """Observations, episode starts and actions of SB3's deterministic predict of a recurrent model along its own
    episodes (reset seeds seed, seed + 1, ...), its state carried: `steps` of them."""
    import gymnasium as gym

    env = gym.make(env_id)
    obs, starts, actions = [], [], []
    o, _ = env.reset(seed=seed)
    state, start, episode = None, True, 0
    while len(obs) < steps:
        a, state = model.predict(o, state=state, episode_start=np.array([start]), deterministic=True)
        obs.append(o)
        starts.append(start)
        actions.append(int(a))
        o, _, terminated, truncated, _ = env.step(int(a))
        start = terminated or truncated
        if start:
            episode += 1
            o, _ = env.reset(seed=seed + episode)
    return np.asarray(obs, np.float32), np.asarray(starts, bool), np.asarray(actions)


def kinds_table(results: list[dict]) -> str:
    lines = [("| policy | rule | seeds | agreement PTQ: plain (weighted) | distilled: plain (weighted) | "
              "min plain | return fp32 | PTQ | distilled | teacher train | distill time (rounds) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"ppo-cnn": "SB3 PPO CnnPolicy, 36x36x3 pixel CartPole", "rppo": "sb3-contrib RecurrentPPO LSTM 2x16, "
             "CartPole-v1"}
    for algo, rule in sorted({(r["algo"], r["rule"]) for r in results}):
        rs = [r for r in results if (r["algo"], r["rule"]) == (algo, rule)]

        def agreement(k, rs=rs):
            a = np.array([r["agreement"][k] for r in rs])
            return f"{100 * a[:, 0].mean():.1f} % ({100 * a[:, 1].mean():.1f} %)"

        def cell(k, rs=rs):
            allr = np.concatenate([r["returns"][k] for r in rs])
            return f"{np.mean(allr):.1f} ± {np.std(allr):.1f}"

        low = min(r["agreement"]["distilled"][0] for r in rs)
        lines.append(f"| {names.get(algo, algo)} | {rule} | {len(rs)} | {agreement('ptq')} | {agreement('distilled')} | "
                     f"{100 * low:.1f} % | {cell('fp32')} | {cell('ptq')} | {cell('distilled')} | "
                     f"{np.mean([r['train_seconds'] for r in rs]):.0f} s | "
                     f"{np.mean([r['seconds'] for r in rs]):.0f} s ({np.mean([r['rounds'] for r in rs]):.1f}) |")
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
    p.add_argument("--cnn", action="store_true", help="the CNN row instead (SB3 PPO CnnPolicy on pixel CartPole)")
    p.add_argument("--recurrent", action="store_true", help="the recurrent row instead (RecurrentPPO on CartPole)")
    p.add_argument("--rule", choices=["weighted", "plain"], default="plain",
                   help="--cnn/--recurrent: the agreement distillation stops on")
    p.add_argument("--rounds", type=int, default=1000, help="--cnn/--recurrent: at most this many DAgger rounds")
    p.add_argument("--agreement", type=float, default=0.995,
                   help="--cnn/--recurrent: stop at this held-out agreement (1: run every round)")
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
    if a.cnn or a.recurrent:
        kinds = (["cnn"] if a.cnn else []) + (["recurrent"] if a.recurrent else [])
        for kind in kinds:
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                go = run_cnn if kind == "cnn" else run_recurrent
                results.append(go(seed, a.episodes, a.budget, a.rule, a.rounds, a.agreement))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
                (out / f"results-{'-'.join(kinds)}.json").write_text(json.dumps(results, indent=1))
        print(kinds_table(results))
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
