"""Mixed precision (issue 14, item 2): SB3 policies that plain ternarization hurts, compiled as PTQ (all ternary),
with --int8-layers first,last and with --int8-layers auto; action agreement on the states the fp32 policy visits,
returns, score and artifact bytes.

    nice -n 10 python bench/mixed_precision.py --policies dqn-CartPole-v1,sac-Pendulum-v1,td3-Pendulum-v1 --seeds 3
    python bench/mixed_precision.py --policies dqn-CartPole-v1,sac-Pendulum-v1 --seeds 1 --episodes 10
    python bench/mixed_precision.py --table rows.json                               # the table of a saved run

Teachers come from bench/distill.py's cache (~/.cache/bitrl-compile/bench: SB3 with RL Zoo's settings; trained
there when missing). Every number is measured on the compiled artifact itself (`fidelity.compile_hook`, the same
measure `compile --env --episodes` prints): agreement on the states of 3 deterministic fp32 episodes, returns of
N deterministic episodes (reset seeds 0..N-1) of the artifact, the fp32 policy and a random one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {"PTQ": None, "first,last": [0, -1], "auto": "auto"}


def run(algo: str, env_id: str, seed: int, episodes: int, per_channel: bool = False) -> dict:
    import torch
    from distill import teacher

    from bitrl_compile import fidelity
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy

    torch.set_num_threads(1)
    loaded = load_policy(teacher(algo, env_id, seed), config={"env": env_id})
    base = fidelity.baseline(loaded, env_id, episodes=episodes)  # the fp32 side, once for every variant
    row = {"algo": algo, "env": env_id, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layers in VARIANTS.items():
            result = compile_policy(loaded, "host", Path(tmp) / f"{name}.bitrl", int8_layers=layers,
                                    per_channel=per_channel,
                                    calibration=base.states if layers == "auto" else None,
                                    measure=fidelity.compile_hook(loaded, env_id, episodes=episodes, base=base))
            f = result.manifest["fidelity"]
            row[name] = {"agreement": f["agreement"], "return": f.get("return"), "return_fp32": f.get("return_fp32"),
                         "score": f.get("score"), "bytes": result.path.stat().st_size,
                         "weight_bytes": sum(la["bytes"] for la in result.manifest["layers"]),
                         "int8": [la["index"] for la in result.manifest["layers"] if la["precision"] == "int8"]}
    return row


def table(rows: list[dict]) -> str:
    head = ["policy", "seed", "fp32 return"] + [f"{v} {c}" for v in VARIANTS for c in ("agreement", "return")] + \
        [f"{v} int8 layers / weight bytes / file bytes" for v in VARIANTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"SB3 {r['algo'].upper()} {r['env']}", str(r["seed"]), f"{r['PTQ']['return_fp32']:.1f}"]
        cells += [f"{r[v]['agreement']:.3f} | {r[v]['return']:.1f}" for v in VARIANTS]
        cells += [f"{r[v]['int8'] or '-'} / {r[v]['weight_bytes']:,} / {r[v]['bytes']:,}" for v in VARIANTS]
        lines.append("| " + " | ".join(cells) + " |")
    for algo, env_id in dict.fromkeys((r["algo"], r["env"]) for r in rows):
        group = [r for r in rows if (r["algo"], r["env"]) == (algo, env_id)]
        if len(group) > 1:
            means = [f"{np.mean([r[v]['agreement'] for r in group]):.3f} | "
                     f"{np.mean([r[v]['return'] for r in group]):.1f}" for v in VARIANTS]
            lines.append(f"| mean SB3 {algo.upper()} {env_id} | {len(group)} seeds | "
                         f"{np.mean([r['PTQ']['return_fp32'] for r in group]):.1f} | " + " | ".join(means)
                         + " |" + " |" * len(VARIANTS))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="dqn-CartPole-v1", help="comma-separated algo-env (bench/distill.py's ZOO)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--per-channel", action="store_true", help="ternary layers with one scale per output channel")
    p.add_argument("--out", help="also write the rows as JSON here")
    p.add_argument("--table", metavar="ROWS_JSON", help="print the table of an earlier --out, run nothing")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    rows = []
    for spec in a.policies.split(","):
        algo, env_id = spec.split("-", 1)
        for seed in range(a.seeds):
            rows.append(run(algo, env_id, seed, a.episodes, a.per_channel))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
