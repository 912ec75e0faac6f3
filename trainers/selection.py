"""Which of a distillation's best students is returned: agreement first, the return a check of it.

    chosen = selection.by_return(top, loaded, student, "CartPole-v1", args, deadline=..., log=print)

A distillation (`distill.py`) keeps the `DistillArgs.candidates` best students it saw by held-out agreement, then
loss (`Candidates`). With `DistillArgs.select_episodes` > 0 the one returned is the first of them (best agreement
first) whose score (R - R_random) / (R_fp32 - R_random) on that many deterministic episodes of its own reaches
`select_target`, else the one with the highest return. The episodes are run with the numpy reference (the
artifact's arithmetic) from reset seeds `SEED + seed + i`, which no evaluation uses, so the selection does not
see the episodes a bench or `compile --episodes` scores it on.

Why agreement stays first: on an RL-Zoo DQN CartPole the best return alone picked a 97.4 % student whose 500 on
the selection episodes was 10 % short on the evaluation's, where the 98.1 % one kept 100 %. The return matters
where agreement misleads: a Q-network whose action gaps are near the ternary rounding can agree on 99 % of the
states and still lose the few that decide an episode.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from bitrl_compile import fidelity
from bitrl_compile.trainers.export import reference_forward

SEED = 2_000_003  # + DistillArgs.seed: the reset seeds of the selection episodes


@dataclass
class Candidate:
    key: tuple[float, float]         # (held-out agreement, -held-out loss)
    state: dict                      # the student's state_dict then
    round: int
    ret: float | None = None         # its mean return on the selection episodes, once measured


class Candidates:
    """The `size` best students seen, by held-out agreement then loss (the first offered wins a tie)."""

    def __init__(self, size: int):
        self.size, self.entries = max(1, size), []

    def offer(self, key: tuple[float, float], student: nn.Module, round_: int) -> None:
        if len(self.entries) == self.size and key <= self.entries[-1].key:
            return
        self.entries.append(Candidate(key, copy.deepcopy(student.state_dict()), round_))
        self.entries.sort(key=lambda c: c.key, reverse=True)  # stable: equal keys keep their order
        del self.entries[self.size:]

    @property
    def best(self) -> float:
        return self.entries[0].key[0]


def select(top: Candidates, ret: Callable[[dict], float], deadline: Callable[[], bool],
           log: Callable[[str], None] = lambda s: None, accept: Callable[[float], bool] = lambda r: False) -> Candidate:
    """The first candidate (best agreement first) whose return (`ret(state)`) is accepted, else the one with the
    highest return, ties by agreement; each measured as long as `deadline()` has not passed (the best by agreement
    always, and at least one more)."""
    measured, chosen = [], None
    for c in top.entries:
        if len(measured) >= 2 and deadline():
            break
        c.ret = float(ret(c.state))
        measured.append(c)
        if accept(c.ret):
            chosen = c
            break
    chosen = chosen or max(measured, key=lambda c: (c.ret, c.key))
    log("  selection by return: " + ", ".join(
        f"round {c.round} ({100 * c.key[0]:.1f} %): {c.ret:.1f}" for c in measured) + f" -> round {chosen.round}")
    return chosen


def score(ret: float, base: fidelity.Baseline) -> float:
    """(R - R_random) / (R_fp32 - R_random) on the selection episodes (`base`: fidelity.baseline of them); where
    the fp32 and random returns are equal, 1 when the fp32 return is reached and 0 otherwise."""
    span = base.ret_fp32 - base.ret_random
    return (ret - base.ret_random) / span if abs(span) > 1e-9 else (1.0 if ret >= base.ret_fp32 else 0.0)


def student_return(loaded, student: nn.Module, state: dict, env_id: str, args) -> float:
    """The mean return on the selection episodes of `student` with `state` (its numpy reference)."""
    probe = copy.deepcopy(student)
    probe.load_state_dict(state)
    forward = reference_forward(dataclasses.replace(loaded, module=probe.eval()), per_channel=args.per_channel,
                                int8_layers=args.int8_layers)
    return float(np.mean(fidelity.returns(loaded, forward, env_id, args.select_episodes, SEED + args.seed)))


def by_return(top: Candidates, loaded, student: nn.Module, env_id: str, args, deadline: Callable[[], bool],
              log: Callable[[str], None] = lambda s: None) -> Candidate:
    """`select` with `args` (a DistillArgs): the candidates' returns on `args.select_episodes` episodes, accepted at
    a score of `args.select_target` against the fp32 and random returns of the same episodes."""
    base = fidelity.baseline(loaded, env_id, episodes=args.select_episodes, seed=SEED + args.seed,
                             rollouts=1, max_states=1)
    return select(top, lambda state: student_return(loaded, student, state, env_id, args), deadline=deadline,
                  log=log, accept=lambda ret: score(ret, base) >= args.select_target)
