"""Returns of PPO policies before and after ternary quantization, and of their compiled artifacts.

    nice -n 10 python bench/returns.py                       # everything: docs/returns.md, .png, .json (< 1 h, 2 cores)
    python bench/returns.py --envs CartPole-v1 --seeds 2 --scale 0.3 --out /tmp/r.md     # a quick look

For every environment and seed (runs in bench/runs/, one process per job, `--jobs` at a time):
  fp32            PPO from scratch (trainers/ppo.py with its RL Zoo preset, BUDGETS steps), float32 actor
  ternary PTQ     the same weights, every Linear a BitLinear (ternary weights, int8 activations), no training
  ternary QAT     `finetune`: PPO from the fp32 policy with straight-through ternary layers, a fresh critic and a
                  KL term to the fp32 policy (a quarter of the budget)
  backbone+heads  the QAT policy's torso frozen as the backbone; new ternary actor/critic heads trained with PPO
                  from scratch on its features (half budget)
  compiled        the QAT and backbone+heads policies compiled for the host; their returns must equal the numpy
                  reference's (the ternary columns) episode for episode.
Every variant is evaluated deterministically on the same episodes (reset seeds 10000 + i). Ternary returns come from
the numpy reference (`bitrl_compile.quant.bitlinear_reference`), which the compiled kernels match bit for bit for
ReLU networks. "Score" = (R - R_random) / (R_fp32 - R_random) per seed, so that the 98 % target means the same for
positive and negative returns; R_random is a uniformly random policy on the same episodes. "Agreement" (ternary
PTQ and QAT rows) is bitrl_compile.fidelity's: the share of the states 3 deterministic fp32 episodes visit where
the ternary policy acts as the fp32 one (the same action; Box: within 5 % of the action range per dimension).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from bitrl_compile.bench import machine

ROOT = Path(__file__).resolve().parents[1]
ENVS = ["CartPole-v1", "Acrobot-v1", "LunarLander-v3", "Pendulum-v1"]
EVAL_SEED = 10_000
# fp32 PPO steps per env: the anchors (RL Zoo reaches CartPole 500 at 100k, Acrobot -100 at 200k,
# LunarLander 200 at 1M: bench/results/ppo_zoo.md); the presets' n_timesteps otherwise
BUDGETS = {"CartPole-v1": 100_000, "Acrobot-v1": 200_000, "LunarLander-v3": 1_000_000, "Pendulum-v1": 100_000}
VARIANTS = [("fp32", "fp32 PPO"), ("ptq", "ternary PTQ"), ("qat", "ternary QAT"),
            ("heads", "frozen ternary backbone + ternary heads"), ("qat_compiled", "QAT, compiled (host)"),
            ("heads_compiled", "backbone + heads, compiled (host)")]


def run_job(env_id: str, seed: int, scale: float, episodes: int, root: str) -> dict:
    """One seed of one environment: train the three policies, evaluate five variants, compile two."""
    from bitrl_compile import fidelity, pipeline
    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.runtime import load
    from bitrl_compile.trainers import ppo
    from bitrl_compile.trainers.export import reference_act

    out = Path(root) / f"{env_id}-seed{seed}"
    steps = max(int(BUDGETS.get(env_id, ppo.args_for(env_id).total_timesteps) * scale), 1)
    common = {"seed": seed, "progress": False, "tensorboard": False, "eval_every": 0, "eval_episodes": 5}
    times, returns = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        times[name] = round(time.perf_counter() - t0, 1)
        return result

    def quiet(_):
        return None

    timed("fp32", lambda: ppo.train(ppo.args_for(env_id, total_timesteps=steps, out=str(out / "fp32"), **common),
                                    log=quiet))
    timed("qat", lambda: ppo.train(ppo.finetune_args(env_id, str(out / "fp32" / "policy.safetensors"),
                                                     total_timesteps=steps // 4, out=str(out / "qat"), **common),
                                   log=quiet))
    timed("heads", lambda: ppo.train(ppo.args_for(env_id, backbone=str(out / "qat" / "policy.safetensors"),
                                                  heads_bits=1.58, total_timesteps=steps // 2,
                                                  out=str(out / "heads"), **common), log=quiet))

    def run(act):
        return evaluate(act, env_id, episodes, EVAL_SEED)[0]

    fp32 = load_policy(out / "fp32" / "policy.safetensors")
    returns["fp32"] = run(reference_act(fp32, ternary=False))
    returns["ptq"] = run(reference_act(fp32))
    states = fidelity.visited_states(fidelity.original_forward(fp32), fp32.output, env_id, seed=EVAL_SEED)
    fp32_actions = [reference_act(fp32, ternary=False)(s) for s in states]
    agreement = {"ptq": fidelity.action_agreement(fp32.output, [reference_act(fp32)(s) for s in states],
                                                  fp32_actions)["agreement"]}
    for name in ("qat", "heads"):
        loaded = load_policy(out / name / "policy.safetensors")
        returns[name] = run(reference_act(loaded))
        if name == "qat":
            agreement[name] = fidelity.action_agreement(fp32.output, [reference_act(loaded)(s) for s in states],
                                                        fp32_actions)["agreement"]
        t0 = time.perf_counter()
        artifact = pipeline.compile_policy(loaded, "host", out / f"{name}.bitrl", force=True).path
        times[f"compile_{name}"] = round(time.perf_counter() - t0, 1)
        returns[f"{name}_compiled"] = run(load(artifact).act)
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(seed)
    returns["random"] = run(lambda obs: env.action_space.sample())
    return {"env": env_id, "seed": seed, "steps": steps, "returns": returns, "seconds": times,
            "agreement": agreement}


# ------------------------------------------------------------------------------------------------ report

def summarize(results: list[dict], env_id: str) -> dict:
    rows = [r for r in results if r["env"] == env_id]
    means = {k: np.array([np.mean(r["returns"][k]) for r in rows]) for k in rows[0]["returns"]}
    score = {}
    for k, m in means.items():
        span = means["fp32"] - means["random"]
        score[k] = np.where(np.abs(span) > 1e-9, (m - means["random"]) / np.where(span == 0, 1, span), np.nan)
    exact = {k: sum(r["returns"][k] == r["returns"][k.replace("_compiled", "")] for r in rows)
             for k in means if k.endswith("_compiled")}
    agreement = {k: np.array([r["agreement"][k] for r in rows if k in r.get("agreement", {})])
                 for k in ("ptq", "qat")}  # results written before the column have none
    return {"means": means, "score": score, "exact": exact, "n": len(rows), "steps": rows[0]["steps"],
            "agreement": agreement,
            "seconds": {k: float(np.mean([r["seconds"][k] for r in rows])) for k in rows[0]["seconds"]}}


def markdown(results: list[dict], envs: list[str], meta: dict) -> str:
    intro = (f"Mean ± std over {meta['seeds']} seeds of each seed's mean return on {meta['episodes']} "
             f"deterministic episodes (reset seeds {EVAL_SEED}..{EVAL_SEED + meta['episodes'] - 1}, the same for "
             "every variant). Score = (R - R_random) / (R_fp32 - R_random), averaged over seeds; the target is "
             "≥ 98 %. Ternary returns are the numpy BitLinear reference's; the compiled rows are host artifacts, "
             "and `= ref` counts the seeds whose episode returns all equal the reference's exactly.")
    produced = (f"Produced by `{meta['command']}` (commit {meta.get('commit', '?')}) on {meta['machine']} in "
                f"{meta['minutes']:.0f} minutes ({meta['jobs']} jobs at a time). Generated by bench/returns.py.")
    lines = ["# Returns: fp32 PPO vs ternary (1.58-bit) policies", "", produced, "", intro, ""]
    for env_id in envs:
        if not any(r["env"] == env_id for r in results):
            continue
        s = summarize(results, env_id)
        sec = s["seconds"]
        budget = (f"{s['steps']:,} fp32 PPO steps ({sec['fp32']:.0f} s per seed), {s['steps'] // 4:,} QAT steps "
                  f"({sec['qat']:.0f} s), {s['steps'] // 2:,} heads steps ({sec['heads']:.0f} s); random policy "
                  f"{np.mean(s['means']['random']):.1f}.")
        lines += [f"## {env_id}", "", budget, "",
                  "| variant | return (mean ± std over seeds) | score vs fp32 | agreement | per seed | compiled = ref |",
                  "|---|---|---|---|---|---|"]
        for key, label in VARIANTS:
            m = s["means"][key]
            per_seed = " ".join(f"{v:.0f}" for v in m)
            exact = f"{s['exact'][key]}/{s['n']}" if key in s["exact"] else ""
            agree = s["agreement"].get(key, np.array([]))
            agree = f"{100 * agree.mean():.1f} %" if agree.size else ""
            lines.append(f"| {label} | {m.mean():.1f} ± {m.std():.1f} | {100 * np.nanmean(s['score'][key]):.1f} % "
                         f"| {agree} | {per_seed} | {exact} |")
        lines.append("")
    short = []
    for env_id in envs:
        if not any(r["env"] == env_id for r in results):
            continue
        s = summarize(results, env_id)
        for key, label in VARIANTS[1:4]:
            pct = 100 * np.nanmean(s["score"][key])
            if pct < 98:
                short.append(f"- {env_id}, {label}: {pct:.1f} % of fp32")
    lines += ["## Below the 98 % target", ""] + (short or ["- none"]) + [""]
    lines += [f"![returns]({meta.get('png', 'returns.png')})", ""]
    return "\n".join(lines)


def plot(results: list[dict], envs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = [e for e in envs if any(r["env"] == e for r in results)]
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 4), squeeze=False)
    colors = ["tab:gray", "tab:red", "tab:blue", "tab:green", "tab:cyan", "tab:olive"]
    for ax, env_id in zip(axes[0], envs):
        s = summarize(results, env_id)
        for i, (key, label) in enumerate(VARIANTS):
            m = s["means"][key]
            ax.bar(i, m.mean(), yerr=m.std(), color=colors[i], capsize=3, label=label)
            ax.plot(np.full(len(m), i), m, "k.", ms=3)
        ax.axhline(np.mean(s["means"]["random"]), color="k", ls=":", lw=1, label="random policy")
        ax.set_title(env_id)
        ax.set_xticks([])
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"mean return ({len(results) // len(envs)} seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=ENVS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", type=Path, default=ROOT / "bench" / "runs")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "returns.md")
    p.add_argument("--from-json", type=Path, help="only rewrite the report from a results JSON")
    args = p.parse_args(argv)
    command = "python bench/returns.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        results, meta = data["results"], data["meta"]
    else:
        for env_id in args.envs:
            import gymnasium as gym

            try:
                gym.make(env_id).close()
            except Exception as e:  # noqa: BLE001 - e.g. box2d missing for LunarLander
                print(f"skipping {env_id}: {e}", file=sys.stderr)
                args.envs = [x for x in args.envs if x != env_id]
        t0 = time.time()
        results = []
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_job, env_id, seed, args.scale, args.episodes, str(args.runs))
                       for env_id in args.envs for seed in range(args.seeds)]
            for f in as_completed(futures):
                r = f.result()
                results.append(r)
                print(f"{r['env']} seed {r['seed']}: " + ", ".join(f"{k} {np.mean(v):.1f}"
                                                                  for k, v in r["returns"].items())
                      + f"  ({sum(r['seconds'].values()):.0f} s)", file=sys.stderr, flush=True)
        results.sort(key=lambda r: (args.envs.index(r["env"]), r["seed"]))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             check=False)
        meta = {"command": command, "png": args.out.with_suffix(".png").name, "machine": machine.summary(),
                "minutes": (time.time() - t0) / 60, "jobs": args.jobs,
                "seeds": args.seeds, "episodes": args.episodes, "envs": args.envs, "commit": rev.stdout.strip()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = markdown(results, meta["envs"], meta)
    args.out.write_text(text)
    plot(results, meta["envs"], args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
