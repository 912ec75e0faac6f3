"""Distillation (trainers/distill.py) of SB3 policies into their ternary versions: return of fp32, PTQ, distilled.

    nice -n 10 python bench/distill.py                           # DQN CartPole, TD3 and SAC Pendulum, 5 seeds
    python bench/distill.py --policies dqn-CartPole-v1 --seeds 2 --budget 60     # a quick look
    python bench/distill.py --train-only                         # only train (and cache) the SB3 teachers
    python bench/distill.py --merge bench/runs/distill-*/results.json   # one table of runs made in parallel
    nice -n 10 python bench/distill.py --cnn --seeds 3        # a CNN on pixels, --keep 0.99 --keep-rule plain
    nice -n 10 python bench/distill.py --recurrent --seeds 3 --rounds 7 --agreement 1   # RecurrentPPO (LSTM)

Teachers are trained here by Stable-Baselines3 itself with RL Zoo's hyperparameters (bench/zoo.py, the table shared
with bench/policy_matrix.py: budgets as in rl-zoo3's hyperparams/*.yml) and cached in ~/.cache/bitrl-compile/bench/sb3-<algo>-<env>-seed<S>.zip, so a second run only
distils. For each seed: the teacher's return (fp32, its own MLP in numpy), PTQ (every Linear ternarized as the
compiler does, no training), distilled (`distill.distill`, the default budget: 180 s of one core or 99 % action
agreement), all on the same 10 deterministic episodes (reset seeds 10000 + i); and the time the distillation took.
Score = (R - R_random) / (R_fp32 - R_random). Returns of the distilled policy come from the numpy reference
(`export.reference_act`), which the compiled artifact matches (tests/test_distill.py checks it).

--cnn: the convolutional case (issue 17) on a teacher that balances the pole: bitrl_compile.envs'
BitrlPixelCartPole64-v0 (CartPole-v1 as 64x64x4 antialiased frames; the tests' 36x36x3 v0 is too coarse for a
NatureCNN to learn), an SB3 PPO CnnPolicy (NatureCNN, 64 features) trained CNN_STEPS steps with RL Zoo's Atari PPO
(CNN_PPO) and cached as ~/.cache/bitrl-compile/bench/sb3-ppo-cnn-<env>-seed<S>-<steps>.zip (+ .json: its training
time), then recovered by `recovery.keep` as `bitrl-compile MODEL --env ID --keep 0.99 --keep-rule plain` does
(--keep, --rule, --budget: --keep-budget, CPU seconds), compiled for the host. Per seed: returns of 10 episodes of
SB3's predict, of PTQ (numpy reference) and of the kept artifact; their plain (and stake-weighted) agreement with
SB3's deterministic predict on 400 frames SB3's policy visits; the teacher's and the recovery's time (wall, and
CPU seconds of this process: on a shared machine the wall time is mostly waiting). When no step keeps --keep
(recovery.NotKept: nothing written) the row has no kept return and its log says how far each step got. Rows go to
--cnn-results (bench/results/distill_cnn.json).
--recurrent: tests/test_keep_kinds.py's sb3-contrib RecurrentPPO (LSTM 2x16) on CartPole-v1, 4096 steps, distilled
through time; its table: agreement with SB3's deterministic predict on 400 observations SB3's policy visits (plain,
and weighted by its stakes: fidelity.py's rule) of PTQ and of the student (the ternary forward along the episodes),
the returns of 10 episodes, the teacher's training time and the time the distillation took (--rule: the agreement
it stops on, plain by default here; --rounds: at most that many DAgger rounds).
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
from zoo import CACHE, statistics, teacher

from bitrl_compile.bench import machine
from bitrl_compile.envs import PIXEL_CARTPOLE_64


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


# --cnn's teachers (issue 17): RL Zoo's Atari PPO (hyperparams/ppo.yml, atari: n_envs 8, n_steps 128, n_epochs 4,
# batch 256, clip lin_0.1, ent 0.01, vf 0.5) with the learning rate 1e-3 (linear to 0) of its CartPole entry in place
# of Atari's 2.5e-4, and NatureCNN's features cut to 64 (its linear 1024 x 64, not x 512: less to distil).
CNN_PPO = {"n_steps": 128, "batch_size": 256, "n_epochs": 4, "learning_rate": 1e-3, "clip_range": 0.1,
           "ent_coef": 0.01, "vf_coef": 0.5,
           "policy_kwargs": {"features_extractor_kwargs": {"features_dim": 64}, "net_arch": [64]}}
CNN_ENVS, CNN_STEPS = 8, 120_000
RPPO = {"n_steps": 128, "batch_size": 128, "n_epochs": 4, "learning_rate": 3e-3,
        "policy_kwargs": {"lstm_hidden_size": 16, "n_lstm_layers": 2, "net_arch": [16]}}
RPPO_STEPS = 4096  # tests/test_keep_kinds.py's teacher: RecurrentPPO, 4 envs
VISITED = 400      # frames / steps SB3's deterministic policy visits (reset seeds 123...), compared with its predict


def _agreement(spec: dict, out: np.ndarray, sb3_out: np.ndarray) -> list[float]:
    """[plain, weighted] agreement with SB3's outputs (fidelity.py's rule; plain = its predict's action)."""
    from bitrl_compile import fidelity

    r = fidelity.compare(spec, out, sb3_out)
    return [r["agreement"], r["weighted"]]


def cnn_teacher(seed: int, steps: int = CNN_STEPS, log=print) -> tuple[Path, dict]:
    """The cached SB3 PPO CnnPolicy of `seed` on BitrlPixelCartPole64-v0 (CNN_PPO, `steps` steps) and its training
    record {"steps", "wall_s", "cpu_s", "best"}, trained when missing. As zoo.teacher: one `learn` (the linear
    schedules run to 0), the best of 10 deterministic evaluations (5 episodes) kept, the zip written last."""
    path = CACHE / f"sb3-ppo-cnn-{PIXEL_CARTPOLE_64}-seed{seed}-{steps}.zip"
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        return path, json.loads(record.read_text())
    import stable_baselines3 as sb3
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)
    kwargs = {**CNN_PPO, **{key: _linear(CNN_PPO[key]) for key in ("learning_rate", "clip_range")}}
    model = sb3.PPO("CnnPolicy", make_vec_env(PIXEL_CARTPOLE_64, CNN_ENVS, seed=seed), seed=seed, device="cpu",
                    **kwargs)
    eval_env = make_vec_env(PIXEL_CARTPOLE_64, 1, seed=seed + 100_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.zip")
    every = steps // 10
    best = {"score": -np.inf, "next": every}

    class Best(BaseCallback):  # RL Zoo's EvalCallback
        def _on_step(self) -> bool:
            if self.num_timesteps >= best["next"]:
                best["next"] += every
                score, _ = evaluate_policy(model, eval_env, n_eval_episodes=5, deterministic=True, warn=False)
                log(f"  {path.name}: {self.num_timesteps} steps, evaluation {score:.1f}")
                if score > best["score"]:
                    best["score"] = score
                    model.save(tmp)
            return True

    wall, cpu = time.perf_counter(), time.process_time()
    model.learn(steps, callback=Best())
    out = {"steps": steps, "wall_s": round(time.perf_counter() - wall, 1),
           "cpu_s": round(time.process_time() - cpu, 1), "best": float(best["score"])}
    tmp_record = record.with_suffix(".tmp.json")
    tmp_record.write_text(json.dumps(out))
    tmp_record.rename(record)
    tmp.rename(path)  # last: the zip's presence means both files are complete
    log(f"trained {path.name} in {out['cpu_s']:.0f} s of CPU (best evaluation {out['best']:.1f})")
    return path, out


def _linear(start: float):
    """RL Zoo's "lin_X": X at the start of training, 0 at its end."""
    return lambda progress_remaining: progress_remaining * start


def run_cnn(seed: int, episodes: int, budget: float, keep: float, rule: str, out: Path) -> dict:
    """The CNN row: the cached SB3 PPO CnnPolicy of `seed` (cnn_teacher) recovered by `recovery.keep` as
    `bitrl-compile MODEL --env BitrlPixelCartPole64-v0 --keep KEEP --keep-rule RULE --keep-budget BUDGET` runs it
    (host artifact); returns of SB3's predict, of PTQ (the numpy reference, which the artifact matches to the ulp)
    and of the kept artifact itself; their agreement with SB3's deterministic predict on the frames it visits."""
    import stable_baselines3 as sb3
    import torch

    from bitrl_compile import fidelity, pipeline
    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.runtime import load
    from bitrl_compile.trainers import recovery
    from bitrl_compile.trainers.export import reference_act, reference_forward

    torch.set_num_threads(1)
    path, trained = cnn_teacher(seed, CNN_STEPS, log=lambda s: print(s, file=sys.stderr, flush=True))
    model = sb3.PPO.load(path, device="cpu")
    loaded = load_policy(path)

    def logits(x):
        with torch.no_grad():
            return model.policy.get_distribution(model.policy.obs_to_tensor(x)[0]).distribution.logits.numpy()

    frames, _ = fidelity.visited(logits, loaded.output, PIXEL_CARTPOLE_64, rollouts=100, max_states=VISITED,
                                 seed=123)
    sb3_out = logits(frames)
    assert np.array_equal(sb3_out.argmax(1), model.predict(frames, deterministic=True)[0]), "not SB3's predict"
    artifact, lines = out / f"ppo-cnn-{PIXEL_CARTPOLE_64}-seed{seed}.bitrl", []

    def compile_fn(policy, int8_layers, measure):
        return pipeline.compile_policy(policy, "host", artifact, int8_layers=int8_layers, measure=measure)

    def ret(act):
        return evaluate(act, PIXEL_CARTPOLE_64, episodes, EVAL_SEED)[0]

    wall, cpu = time.perf_counter(), time.process_time()
    try:
        _, attempts = recovery.keep(loaded, PIXEL_CARTPOLE_64, keep, compile_fn, budget=budget, rule=rule,
                                    log=lines.append)
        kept = attempts[-1].step
    except recovery.NotKept as e:
        lines.append(str(e))
        kept = None
    seconds = {"wall": round(time.perf_counter() - wall, 1), "cpu": round(time.process_time() - cpu, 1)}
    row = {"algo": "ppo-cnn", "env": PIXEL_CARTPOLE_64, "seed": seed, "rule": rule, "keep": keep, "kept": kept,
           "recovery_seconds": seconds, "teacher": trained, "log": lines,
           "agreement": {"ptq": _agreement(loaded.output, reference_forward(loaded)(frames), sb3_out)},
           "returns": {"fp32": ret(lambda o: int(model.predict(o, deterministic=True)[0])),
                       "ptq": ret(reference_act(loaded))}}
    if kept:
        with load(artifact) as policy:
            row["agreement"]["kept"] = _agreement(loaded.output, policy.forward(frames), sb3_out)
            row["returns"]["kept"] = ret(policy.act)
    return row


def cnn_table(results: list[dict]) -> str:
    """One line per seed: returns (mean of the episodes), agreement with SB3's predict (plain), times."""
    lines = [("| seed | teacher return | PTQ return | kept return | PTQ agreement | kept agreement | kept step | "
              "teacher train s (CPU) | recovery s (CPU) |"), "|---|---|---|---|---|---|---|---|---|"]

    def cell(r, k):
        return f"{np.mean(r['returns'][k]):.1f} ± {np.std(r['returns'][k]):.1f}" if k in r["returns"] else "not kept"

    def agree(r, k):
        return f"{100 * r['agreement'][k][0]:.1f} %" if k in r["agreement"] else "-"

    for r in results:
        t, s = r["teacher"], r["recovery_seconds"]
        lines.append(f"| {r['seed']} | {cell(r, 'fp32')} | {cell(r, 'ptq')} | {cell(r, 'kept')} | {agree(r, 'ptq')} | "
                     f"{agree(r, 'kept')} | {r['kept'] or '-'} | {t['wall_s']:.0f} ({t['cpu_s']:.0f}) | "
                     f"{s['wall']:.0f} ({s['cpu']:.0f}) |")
    return "\n".join(lines)


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
    # as recovery.keep does: the layer whose ternary version fits worst along the original's episodes stays int8
    base = fidelity.baseline(loaded, "CartPole-v1", episodes=3, seed=0)
    int8 = tuple(distill_recurrent.rank_layers(loaded, base.states, base.starts)[:1])
    result = distill_recurrent.distill(loaded, "CartPole-v1", distill.DistillArgs(
        seed=seed, budget_s=budget, rule=rule, max_rounds=rounds, agreement=target, int8_layers=int8),
        log=lambda s: None)
    seconds = time.perf_counter() - t0

    def ternary(module, layers=()):
        x, mask = distill_recurrent.episodes_of(obs, starts)
        with torch.no_grad():
            return distill_recurrent.sequence_forward(module, x, True, int8_layers=layers)[mask].numpy()

    def ret(module, quantized: bool, layers=()):
        class Act:  # evaluate() resets it at every episode's start
            def reset(self):
                self.state, self.start = module.initial_state(1), torch.ones(1)

            def __call__(self, o):
                with torch.no_grad(), distill_recurrent.ternary(module, quantized, int8_layers=layers):
                    out, self.state = module(torch.from_numpy(np.asarray(o, np.float32)[None]), self.state,
                                             self.start)
                self.start = torch.zeros(1)
                return int(out.argmax(1)[0])

        return evaluate(Act(), "CartPole-v1", episodes, EVAL_SEED)[0]

    return {"algo": "rppo", "env": "CartPole-v1", "seed": seed, "rule": rule, "seconds": round(seconds, 1),
            "train_seconds": round(train_s, 1), "rounds": result.rounds, "int8_layers": list(int8),
            "agreement": {"ptq": _agreement(loaded.output, ternary(loaded.module), fp32),
                          "distilled": _agreement(loaded.output, ternary(result.student, int8), fp32)},
            "returns": {"fp32": ret(loaded.module, False), "ptq": ret(loaded.module, True),
                        "distilled": ret(result.student, True, int8)}}


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
    names = {"rppo": "sb3-contrib RecurrentPPO LSTM 2x16, CartPole-v1"}
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


def _write(path: Path, data) -> None:
    """JSON written whole (a temp file renamed), so a run stopped midway leaves the last complete table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


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
    p.add_argument("--cnn", action="store_true", help="the CNN rows instead (SB3 PPO CnnPolicy on pixel CartPole, "
                   "recovered by --keep; results in --cnn-results)")
    p.add_argument("--keep", type=float, default=0.99, help="--cnn: recovery.keep's target (bitrl-compile --keep)")
    p.add_argument("--cnn-results", default="bench/results/distill_cnn.json", help="--cnn: where its rows go")
    p.add_argument("--recurrent", action="store_true", help="the recurrent row instead (RecurrentPPO on CartPole)")
    p.add_argument("--rule", choices=["weighted", "plain"], default="plain",
                   help="--cnn: --keep-rule; --recurrent: the agreement distillation stops on")
    p.add_argument("--rounds", type=int, default=1000, help="--recurrent: at most this many DAgger rounds")
    p.add_argument("--agreement", type=float, default=0.995,
                   help="--recurrent: stop at this held-out agreement (1: run every round)")
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
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    if a.cnn:
        print(f"command: python bench/distill.py {' '.join(sys.argv[1:])}", file=sys.stderr, flush=True)
        for seed in seeds:
            if a.train_only:
                cnn_teacher(seed, CNN_STEPS, log=lambda s: print(s, file=sys.stderr, flush=True))
                continue
            results.append(run_cnn(seed, a.episodes, a.budget, a.keep, a.rule, out))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            _write(Path(a.cnn_results), {"command": f"python bench/distill.py {' '.join(sys.argv[1:])}",
                                         "machine": machine.machine(), "teacher": {"env": PIXEL_CARTPOLE_64,
                                                                           "steps": CNN_STEPS, "n_envs": CNN_ENVS,
                                                                           "ppo": CNN_PPO}, "rows": results})
        if results:
            print(cnn_table(results))
        return
    if a.recurrent:
        for seed in seeds:
            results.append(run_recurrent(seed, a.episodes, a.budget, a.rule, a.rounds, a.agreement))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            (out / "results-recurrent.json").write_text(json.dumps(results, indent=1))
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
