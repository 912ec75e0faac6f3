"""How much of a teacher's score survives acting differently on a few of its states: the control for a --keep pick
that scores below the target on many episodes although it agrees with the teacher almost everywhere.

    python bench/teacher_noise.py --algo a2c --env LunarLander-v3 --seed 1          # the matrix's cell, 960 episodes
    python bench/teacher_noise.py --algo a2c --env CartPole-v1 --seed 0 --episodes 30 --sigmas 0.01

The teacher is the policy matrix's (bench/policy_matrix.py: SB3 with RL Zoo's settings, cached). Its fp32 copies
with every weight multiplied by (1 + sigma * N(0, 1)) (torch seeds 0 .. draws-1) act as it does on most of its
states; each is measured as the --keep pick is: plain and weighted agreement on the states the teacher visits
(fidelity.baseline, reset seeds 10000 + i), and the score (R - R_random) / (R_fp32 - R_random) on the same held-out
episodes as the matrix's --keep column (reset seeds 10000 + i, paired with the teacher's returns; ± one standard
error). The matrix's --keep pick (its keep.bitrl) is measured alike on the first row. Where copies of the teacher
that agree as often score far apart, a pick's distance from 100 % says how fragile the teacher's return is, not what
ternary weights cost: a deterministic policy whose returns swing by twice its margin over a random one, and that
changes about one action in a hundred, plays every episode differently. The table goes to
bench/results/teacher_noise.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policy_matrix  # bench/, beside this script

RESULTS = policy_matrix.ROOT / "bench" / "results" / "teacher_noise.md"


def perturbed(loaded, sigma: float, draw: int):
    import torch

    torch.manual_seed(draw)
    module = copy.deepcopy(loaded.module)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1 + sigma * torch.randn_like(p))
    return dataclasses.replace(loaded, module=module)


def row(name: str, original, forward, env_id: str, base, fp32: list[float], rnd: float) -> str:
    from bitrl_compile import fidelity

    f = fidelity.measure(original, forward, env_id, base=base, seed=policy_matrix.EVAL_SEED)
    ours = fidelity.returns(original, forward, env_id, len(fp32), policy_matrix.EVAL_SEED)
    span = float(np.mean(fp32)) - rnd
    score, error = (np.mean(ours) - rnd) / span, fidelity.score_error(ours, fp32, span)
    same = float(np.mean(np.abs(np.subtract(ours, fp32)) < 1e-6))
    print(f"teacher_noise: {name}: score {100 * score:.1f} ± {100 * error:.1f} %", file=sys.stderr, flush=True)
    return (f"| {name} | {100 * f.agreement:.2f} % | {100 * (f.weighted or f.agreement):.2f} % | "
            f"{100 * score:.1f} ± {100 * error:.1f} % | {100 * same:.0f} % |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="a2c")
    p.add_argument("--env", default="LunarLander-v3")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--episodes", type=int, default=960)
    p.add_argument("--sigmas", default="0.003,0.01")
    p.add_argument("--draws", type=int, default=3, help="perturbations per sigma (torch seeds 0, 1, ...)")
    p.add_argument("--runs", type=Path, default=policy_matrix.RUNS, help="the matrix's cells (its --keep pick)")
    p.add_argument("--scale", type=float, default=1.0, help="the matrix's --scale (which cached teacher)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from bitrl_compile import fidelity, runtime
    from bitrl_compile.runtime.files import write_atomic

    path = policy_matrix.teacher(a.algo, a.env, a.seed, a.scale)
    original = policy_matrix.load_teacher(a.algo, a.env, path)
    base = fidelity.baseline(original, a.env, seed=policy_matrix.EVAL_SEED)
    fp32 = fidelity.returns(original, fidelity.original_forward(original), a.env, a.episodes, policy_matrix.EVAL_SEED)
    rnd = fidelity.random_return(a.env, a.episodes, policy_matrix.EVAL_SEED)
    lines = []
    cell = policy_matrix.unit_dir(a.runs, a.algo, a.env, a.seed)
    if (cell / "keep.bitrl").is_file():
        keep = json.loads((cell / "keep.json").read_text()) if (cell / "keep.json").is_file() else {}
        policy = runtime.load(cell / "keep.bitrl")
        try:
            lines.append(row(f"--keep pick ({keep.get('step', '?')}, {keep.get('code', '?')})", original,
                             policy.forward, a.env, base, fp32, rnd))
        finally:
            policy.close()
    for sigma in (float(s) for s in a.sigmas.split(",") if s.strip()):
        for draw in range(a.draws):
            lines.append(row(f"fp32, weights × (1 + {sigma:g} N(0,1)), draw {draw}", original,
                             fidelity.original_forward(perturbed(original, sigma, draw)), a.env, base, fp32, rnd))
    span = float(np.mean(fp32)) - rnd
    text = "\n".join([
        f"# A teacher's own fragility: {policy_matrix.name_of(a.algo)} {a.env} seed {a.seed}", "",
        (f"`python bench/teacher_noise.py --algo {a.algo} --env {a.env} --seed {a.seed} --episodes {a.episodes} "
        f"--sigmas {a.sigmas} --draws {a.draws}`: the teacher returns {np.mean(fp32):.1f} "
        f"(per episode {np.min(fp32):.0f} to "
        f"{np.max(fp32):.0f}), a random policy {rnd:.1f}, on {a.episodes} held-out episodes (reset seeds "
        f"{policy_matrix.EVAL_SEED} + i); its returns' standard deviation is {np.std(fp32) / abs(span):.1f} times "
        "the span between them."), "",
        "| policy | plain agreement | weighted agreement | score (± 1 SE) | episodes played alike |",
        "|---|---|---|---|---|", *lines, ""])
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
