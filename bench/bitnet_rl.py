"""Returns of PPO heads on a frozen, pretrained ternary BitNet backbone vs fp32 PPO and BitRL's table
(CartPole, Acrobot, MountainCar; LunarLander with --envs).

    nice -n 10 python bench/bitnet_rl.py                        # everything: the table in docs/bitnet.md (hours)
    python bench/bitnet_rl.py --envs CartPole-v1 --seeds 1 --scale 0.3 --no-docs          # a quick look

Per environment (runs in bench/runs/bitnet/ENV/; finished stages are reused, delete the folder to redo them):
  fp32            PPO from scratch (trainers/ppo.py with its preset, RL Zoo's settings; BUDGETS steps times --scale): an MLP
                  actor and critic (64, 64), observations normalised where the preset says. One run per seed.
  backbone        `trainers/pretrain_bitnet.py`, once (seed 0): a BitNet b1.58 encoder (2 layers, d=64, 4/2 heads,
                  one token per observation value + a readout token, 108k parameters for 8 values), ternary and int8
                  from the first step, trained self-supervised to reconstruct the observation and to predict the
                  next observation and reward given the action, on --pretrain-steps transitions whose actions are the
                  fp32 seed-0 policy's with probability 0.7 and random otherwise. Then frozen.
  frozen + heads  PPO trains only fp32 heads (actor and critic, one hidden layer of 64) on the frozen backbone's
                  features (the ternary forward in torch, `bitnet.FrozenBitNet`), same budget and seeds as fp32.
  untrained + heads   control: the same, on a frozen backbone with random (initial) weights.
  compiled        the backbone compiled for the host (`pipeline.compile_policy`, `Policy.features`); the heads of
                  every frozen + heads seed evaluated on the compiled backbone's features.
Every policy is evaluated deterministically on the same --episodes episodes (reset seeds 10000 + i). The results
file (--results) keeps every env measured so far, each with its run's command, so a run of one env (MountainCar's
1M-step runs take hours) updates its row and leaves the others; `--table-only` renders it (and the docs) again.
Every file a later run reads back (result.json, compiled.json, the results file) is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bitrl_compile.bench import machine
from bitrl_compile.bench.markdown import replace_section
from bitrl_compile.runtime.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
ENVS = ["CartPole-v1", "Acrobot-v1", "MountainCar-v0"]  # BitRL's table (LunarLander-v3 too with --envs)
# PPO steps per run (every variant alike): issue 14's budgets, RL Zoo's for MountainCar. Every other setting is the
# trainer's preset for the env (trainers/presets.py: RL Zoo's ppo.yml, on which trainers/ppo.py matches SB3).
BUDGETS = {"CartPole-v1": 100_000, "Acrobot-v1": 200_000, "MountainCar-v0": 1_000_000, "LunarLander-v3": 1_000_000}
PAPER = {"CartPole-v1": 476, "Acrobot-v1": -94, "MountainCar-v0": -108}  # BitRL's frozen-BitNet returns
EVAL_SEED = 10_000
DOCS = ROOT / "docs" / "bitnet.md"
BEGIN, END = "<!-- bitnet_rl.py: begin -->", "<!-- bitnet_rl.py: end -->"
VARIANTS = [("fp32", "fp32 PPO (MLP 64-64)"), ("heads", "frozen pretrained ternary BitNet + fp32 heads (64)"),
            ("compiled", "  the same heads on the compiled backbone (host runtime)"),
            ("control", "frozen untrained ternary BitNet + fp32 heads (control)")]


def _common(seed: int, scale: float, env_id: str, episodes: int) -> dict:
    from bitrl_compile.trainers import ppo

    steps = max(int(BUDGETS.get(env_id, ppo.args_for(env_id).total_timesteps) * scale), 1)
    return {"seed": seed, "total_timesteps": steps, "progress": False, "tensorboard": False, "eval_every": 0,
            "eval_episodes": episodes, "eval_seed": EVAL_SEED}


def train_job(kind: str, env_id: str, seed: int, scale: float, episodes: int, root: str) -> dict:
    """One PPO run: kind fp32 | heads (pretrained backbone) | control (untrained backbone). Cached in its folder."""
    import torch

    from bitrl_compile.trainers import ppo

    out = Path(root) / env_id / f"{kind}-seed{seed}"
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    extra = {} if kind == "fp32" else {"backbone": str(Path(root) / env_id / ("backbone" if kind == "heads"
                                                                                else "backbone-untrained"))}
    t0 = time.perf_counter()
    result = ppo.train(ppo.args_for(env_id, out=str(out), **_common(seed, scale, env_id, episodes), **extra),
                       log=lambda s: None)
    record = {"kind": kind, "env": env_id, "seed": seed, "returns": [float(r) for r in result.eval_returns],
              "steps": result.global_step, "seconds": round(time.perf_counter() - t0, 1)}
    write_atomic(done, json.dumps(record).encode())
    return record


def pretrain_job(env_id: str, root: str, steps: int, updates: int, encoder: str = "numeric") -> dict:
    """The self-supervised backbone (teacher: the fp32 seed-0 policy) and the untrained control."""
    from bitrl_compile import bitnet
    from bitrl_compile.trainers import pretrain_bitnet as pre

    folder = Path(root) / env_id
    if not (folder / "backbone" / "config.json").exists():
        t0 = time.perf_counter()
        args = pre.Args(env_id=env_id, steps=steps, updates=updates, out=str(folder / "backbone"),
                        teacher=str(folder / "fp32-seed0" / "policy.safetensors"), epsilon=0.3, encoder=encoder)
        log = open(folder / "pretrain.log", "w")  # noqa: SIM115 - closed below
        pre.pretrain(args, log=lambda s: print(s, file=log, flush=True))
        log.close()
        write_atomic(folder / "backbone" / "seconds.txt", f"{time.perf_counter() - t0:.0f}".encode())
    if not (folder / "backbone-untrained" / "config.json").exists():
        trained = bitnet.load_backbone(folder / "backbone")
        fresh = bitnet.new_backbone(trained.model.config, trained.spec, seed=0)  # same statistics, initial weights
        bitnet.save_backbone(fresh, folder / "backbone-untrained")
    return {"env": env_id, "seconds": float((folder / "backbone" / "seconds.txt").read_text()),
            "params": bitnet.parameter_count(bitnet.load_backbone(folder / "backbone"))}


def compiled_job(env_id: str, root: str, seeds: list[int], episodes: int) -> dict:
    """Compile the pretrained backbone for the host; evaluate each seed's heads on the runtime's features (cached in
    compiled.json)."""
    import torch

    from bitrl_compile import bitnet, pipeline
    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.runtime import load

    folder = Path(root) / env_id
    done = folder / "compiled.json"
    if done.exists() and (cached := json.loads(done.read_text()))["returns"].keys() == {str(s) for s in seeds}:
        return cached
    backbone = bitnet.load_backbone(folder / "backbone")
    artifact = folder / "backbone-host.bitrl"
    stats = backbone.spec.normalize or {"mean": 0.0, "var": 1.0}  # text backbones read raw values
    obs = np.random.default_rng(0).standard_normal((256, backbone.spec.obs_dim)).astype(np.float32)
    obs = obs * np.sqrt(np.asarray(stats["var"], np.float32)) + np.asarray(stats["mean"], np.float32)
    pipeline.compile_policy(bitnet.backbone_policy(backbone), "host", artifact, force=True)
    policy = load(artifact)
    diff = np.abs(policy.features(obs) - backbone.features(obs)).max(axis=1)
    scale = float(np.abs(backbone.features(obs)).max())
    out = {"env": env_id, "artifact_bytes": artifact.stat().st_size, "max_feature_diff": float(diff.max()),
           "rows_within_1e-4": float(np.mean(diff <= 1e-4 * scale)), "returns": {}}
    for seed in seeds:
        heads = load_policy(folder / f"heads-seed{seed}" / "policy.safetensors").module.eval()

        def act(o, heads=heads):
            with torch.no_grad():
                return int(heads(torch.from_numpy(policy.features(np.asarray(o, np.float32)[None]))).argmax(1)[0])

        out["returns"][str(seed)] = evaluate(act, env_id, episodes, EVAL_SEED)[0]
    write_atomic(done, json.dumps(out).encode())
    return out


# ------------------------------------------------------------------------------------------------ report

def _order(results: dict) -> list[str]:
    return [e for e in ENVS if e in results] + sorted(e for e in results if e not in ENVS)


def render(results: dict) -> str:
    """The Markdown table of `results` ({env: ... "meta": the run that measured it}), envs in BitRL's order."""
    envs = _order(results)
    meta = results[envs[0]]["meta"]
    seeds = sorted({tuple(results[e]["meta"]["seeds"]) for e in envs})
    lines = [(f"Mean ± std over seeds {', '.join(str(list(s)) for s in seeds)} of each seed's mean return on "
              f"{meta['episodes']} deterministic episodes (reset seeds {EVAL_SEED}..{EVAL_SEED + meta['episodes'] - 1}, "
              "the same for every row)."), "",
             "| environment | BitRL (paper) | " + " | ".join(label.strip() for _, label in VARIANTS) + " |",
             "|---|---:|" + "---:|" * len(VARIANTS)]
    for env_id in envs:
        r = results[env_id]
        cells = []
        for key, _ in VARIANTS:
            per_seed = [np.mean(v) for v in r.get(key, {}).values()]
            cells.append(f"{np.mean(per_seed):.1f} ± {np.std(per_seed):.1f} ({', '.join(f'{v:.0f}' for v in per_seed)})"
                         if per_seed else "-")
        lines.append(f"| {env_id} | {PAPER.get(env_id, '-')} | " + " | ".join(cells) + " |")
    lines += ["", ("Per environment: PPO steps per run; backbone parameters; pretraining time; seconds per PPO run "
              "(fp32 / on the backbone); compiled-backbone check (largest feature difference torch vs runtime, "
              "share of observations agreeing to 1e-4 of the largest feature)."), ""]
    for env_id in envs:
        r = results[env_id]
        c = r.get("compiled_info", {})
        lines.append(f"- {env_id}: {r['steps']:,} steps; backbone {r['params']:,} parameters, pretrained in "
                     f"{r['pretrain_seconds']:.0f} s; PPO {r['seconds']['fp32']:.0f} s / {r['seconds']['heads']:.0f} s "
                     f"per run; compiled backbone {c.get('artifact_bytes', 0):,} bytes, max |Δ| "
                     f"{c.get('max_feature_diff', float('nan')):.2g}, {100 * c.get('rows_within_1e-4', float('nan')):.1f} % "
                     "within 1e-4.")
    lines.append("")
    for command in dict.fromkeys(results[e]["meta"]["command"] for e in envs):  # one line per run, in env order
        m = next(results[e]["meta"] for e in envs if results[e]["meta"]["command"] == command)
        lines.append(f"Reproduce: `{command}` (commit {m['commit']}; {m['machine']}; {m['minutes']:.0f} minutes with "
                     f"{m['jobs']} jobs).")
    return "\n".join(lines)


def merged(path: Path, results: dict) -> dict:
    """`results` over the envs of the results file at `path` (envs another run measured are kept, each with the
    meta of its run; a file of the older layout has one top-level meta)."""
    if not path.is_file():
        return results
    old = json.loads(path.read_text())
    prev = {e: {"meta": old["meta"], **r} if "meta" not in r and "meta" in old else r
            for e, r in old.get("results", {}).items()}
    return {**prev, **results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=ENVS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every PPO budget")
    p.add_argument("--pretrain-steps", type=int, default=50_000, help="transitions collected for pretraining")
    p.add_argument("--pretrain-updates", type=int, default=3000)
    p.add_argument("--encoder", choices=["numeric", "text"], default="numeric",
                   help="text: the state written as text, one token per byte (runs in bench/runs/bitnet-text)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", type=Path, help="[default: bench/runs/bitnet, or bitnet-text]")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--table-only", action="store_true", help="only the table of --results (and the docs)")
    p.add_argument("--results", type=Path, help="results file, merged over envs across runs "
                   "[bench/results/bitnet_rl.json, or bitnet_rl_text.json]")
    args = p.parse_args(argv)
    command = "python bench/bitnet_rl.py" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
    seeds = list(range(args.seeds))
    name = "bitnet_rl" if args.encoder == "numeric" else "bitnet_rl_text"
    results_file = args.results or ROOT / "bench" / "results" / f"{name}.json"
    if args.table_only:
        return _publish(merged(results_file, {}), results_file, args)
    args.runs = args.runs or ROOT / "bench" / "runs" / ("bitnet" if args.encoder == "numeric" else "bitnet-text")
    root = str(args.runs)
    for env_id in args.envs:
        (args.runs / env_id).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = lambda s: print(s, file=sys.stderr, flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        # In the order a run longer than a session needs (every stage is cached, so a stopped run resumes): the
        # fp32 seed-0 policy (it drives the pretraining rollouts), pretraining, the heads, then the control and the
        # other fp32 seeds. The compiled column is measured here, in this process, as soon as an env's heads are done.
        first = {e: pool.submit(train_job, "fp32", e, 0, args.scale, args.episodes, root) for e in args.envs}
        pre = {}
        for e in args.envs:
            first[e].result()
            pre[e] = pool.submit(pretrain_job, e, root, args.pretrain_steps, args.pretrain_updates, args.encoder)
        pretrained = {e: f.result() for e, f in pre.items()}
        heads = {e: [pool.submit(train_job, "heads", e, s, args.scale, args.episodes, root) for s in seeds]
                 for e in args.envs}
        rest = [pool.submit(train_job, kind, e, s, args.scale, args.episodes, root)
                for e in args.envs for kind, todo in (("control", seeds), ("fp32", seeds[1:])) for s in todo]
        compiled = {}
        for e in args.envs:
            for f in heads[e]:
                f.result()
            compiled[e] = compiled_job(e, root, seeds, args.episodes)
            log(f"{e} compiled backbone: {compiled[e]['returns']}")
        runs = [f.result() for f in [*first.values(), *(f for e in args.envs for f in heads[e]), *rest]]
        for r in runs:
            log(f"{r['env']} {r['kind']} seed {r['seed']}: {np.mean(r['returns']):.1f} ({r['seconds']:.0f} s)")
    results = {}
    for e in args.envs:
        mine = [r for r in runs if r["env"] == e]
        results[e] = {kind: {r["seed"]: r["returns"] for r in mine if r["kind"] == kind}
                      for kind in ("fp32", "heads", "control")}
        results[e]["compiled"] = compiled[e]["returns"]
        results[e]["compiled_info"] = {k: v for k, v in compiled[e].items() if k != "returns"}
        results[e]["steps"] = mine[0]["steps"]
        results[e]["params"], results[e]["pretrain_seconds"] = pretrained[e]["params"], pretrained[e]["seconds"]
        results[e]["seconds"] = {k: float(np.mean([r["seconds"] for r in mine if r["kind"] == k]))
                                 for k in ("fp32", "heads")}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                         check=False).stdout.strip()
    meta = {"command": command, "commit": rev, "machine": machine.summary(), "minutes": (time.time() - t0) / 60,
            "jobs": args.jobs, "seeds": seeds, "episodes": args.episodes, "envs": args.envs, "encoder": args.encoder}
    for e in args.envs:
        results[e]["meta"] = meta
    return _publish(merged(results_file, results), results_file, args)


def _publish(results: dict, results_file: Path, args) -> int:
    """Print the table, write the results file (every env measured so far) and, unless --no-docs, the docs."""
    text = render(results)
    print(text)
    results_file.parent.mkdir(exist_ok=True)
    write_atomic(results_file, json.dumps({"results": results}, indent=1, default=str).encode())
    begin, end = (BEGIN, END) if args.encoder == "numeric" else (BEGIN.replace(":", " --encoder text:"),
                                                                  END.replace(":", " --encoder text:"))
    if not args.no_docs and replace_section(DOCS, begin, end, text):
        print(f"updated {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
