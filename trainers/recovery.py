"""Recovery until the ternary policy keeps a target share of the original: `bitrl-compile MODEL --env ID --keep 0.98`.

    keep(original, env_id, target, compile_fn, ...)      the steps below, in order, each compiled and measured in
                                                         memory (fidelity.py, on the states the original visits);
                                                         the first that keeps `target` is written, nothing before

    ptq        the plain compile: every linear layer ternary, the weights as given
    distill    distillation into the ternary network (trainers/distill.py, two thirds of its budget: `distill_budget`; MLP
               policies with vector observations, and CNN policies such as SB3's CnnPolicy on images): still every
               layer ternary, the algorithm kept (a DQN stays a Q-network)
               With `episodes` (the return decides), an MLP's distillation ends by checking its best students'
               return on episodes of their own (DistillArgs.select_episodes: reset seeds no evaluation uses): the
               best by agreement whose score there reaches the target, else the best by that return
               A recurrent (LSTM) policy distils through time instead (trainers/distill_recurrent.py, its whole
               budget) in one step, "distill + int8 [i]": the layer whose ternary version fits its own outputs
               worst along the original's episodes (distill_recurrent.rank_layers; the first LSTM layer's input
               weights on CartPole) int8 in training and in the artifact. Measured on three RecurrentPPO CartPole
               teachers (plain agreement with SB3's predict on 4000 states it visits): 99.4-99.6 % with it, 99.0-
               99.2 % every layer ternary (its misses near-ties): a plain 99 % is not kept reliably without it
    distill + int8 [i]
               the same student, trained on (the last third of its budget) with the layer whose int8 version
               removes most of the output error (precision.rank_layers, on the visited states) int8 in training
               and in the artifact. Not int8 made after training: measured on an RL-Zoo DQN CartPole, a student
               distilled for ternary layers loses agreement when layers are made int8 afterwards (95.7 % ->
               82-92 % weighted)
    int8 +k    mixed precision alone on the original weights: the k layers of that ranking in int8, k = 1, 2, ...
               up to every layer (the DQN above: 49 % with every layer ternary, 99.2 % weighted all int8)
    A Q-network's last layer, where one of these steps makes it int8, is split first into a row shared by every
    action and the differences (`_with_shared_row`, frontends.mlp.shared_row: the same function): the Q-values'
    common part is rounded apart from the gaps between them (an RL-Zoo DQN Acrobot, last layer int8 and the rest
    fp32: 91.8 % weighted agreement as one matrix, 99.8 % split; its distilled student trained on 50 s with the
    last layer int8: 97.4 % weighted, score 97.5 % as one matrix, 99.3 % and 98.2 % split, 30 episodes)

Kept means the fidelity record's agreement (stake-weighted for discrete actions: fidelity.shared) reaches the
target or, with `episodes`, that the score (R - R_random) / (R_fp32 - R_random) does, whatever the agreement,
or the agreement does and the score is within two of its standard errors of the target (fidelity.kept, the same
rule as compile's warning: the return decides where it was measured, unless it is noise). A score within two
standard errors of the target (unless it and the agreement both reach it) is measured on MORE_EPISODES times the
episodes more before it decides, round after round while it stays within noise, up to MORE_ROUNDS_MOST times the
episodes (fidelity.MoreEpisodes: sequential testing, so that neither a lucky draw on 10 episodes nor a loss taken
for noise is what is kept), as long as they fit the budget: what follows the step (the second distillation after the
first student) keeps its share. The artifact plays them (the numpy precheck stays at `episodes`: a bit-exact
artifact would play them again). Measured: an RL-Zoo DQN LunarLander student at 77 % agreement was kept at a score
of 101.6 % on 10 episodes, and scored 80.6 ± 5.8 % on 30 held-out ones. An RL-Zoo A2C LunarLander whose teacher
barely beats a random policy (a paired episode's score varies by twice their span) had a student at 99.1 % weighted
agreement kept as noise at 62.6 ± 25.2 % on 30 episodes, one round; it scores 72.7 ± 6.2 % on 960 held-out ones. In
rounds, its like is not kept at 73.3 ± 12.3 % on 270.
With rule "plain" (`--keep-rule plain`) it is the plain agreement instead, every visited state counting one, the
original's near-ties too (what a check against SB3's own predict counts), and no score: distillation then
stops on plain held-out agreement and adds a ranking floor (DistillArgs.floor: the original's argmax must lead
by a share of its median gap on every state, so that a near-tie is decided the original's way with room for
rounding).
When no step keeps it, NotKept says how far each got, and nothing is written.

An attempt whose numpy reference (export.reference_forward: what the artifact computes, bit for bit with ReLU, to
the ulp with tanh) misses the target by more than PRECHECK_SLACK on the same visited states is not compiled: its
record is the reference's (engine "reference"), which saves a TVM build per hopeless step (a CNN's takes seconds);
within the slack, or where the reference cannot run the network (a recurrent policy), the artifact decides.

Work layer (trainers): uses the pipeline, fidelity and distillation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from bitrl_compile import fidelity

PRECHECK_SLACK = 0.01  # an attempt whose reference misses the target by more is not compiled
BUDGET_MARGIN = 0.06   # of --keep-budget, kept from distillation for what its clock does not see coming
STEPS_AFTER = 4        # measurements like the plain step's that follow the distillation (`distill_budget`)
MORE_EPISODES = 2      # a score within noise of the target is measured on this many times the episodes more,
MORE_ROUNDS_MOST = 81  # round after round, up to this many times --episodes in all (10 -> 30 -> 90 -> 270 -> 810)


class NotKept(ValueError):
    """No recovery kept the target; the message (one line) names the best reached, `attempts` holds every step's
    Attempt (its fidelity record: the return, the score)."""

    def __init__(self, message: str, attempts: list | None = None):
        super().__init__(message)
        self.attempts = list(attempts or [])


class _Short(Exception):
    """Raised by the measure hook to stop a compile whose artifact does not keep the target (nothing written)."""

    def __init__(self, record: dict):
        super().__init__("not kept")
        self.record = record


def share(record: dict, rule: str = "weighted") -> float:
    """What is compared with the target: the score with episodes, else the (weighted) agreement (`fidelity.kept`,
    the rule of compile's warning); with rule "plain" the plain agreement alone."""
    return fidelity.kept(record, rule)


@dataclass
class Attempt:
    step: str                    # "ptq", "distill", "int8 [0, 2]"
    int8_layers: tuple[int, ...]
    record: dict                 # the fidelity record
    kept: bool
    rule: str = "weighted"

    @property
    def share(self) -> float:
        return share(self.record, self.rule)

    def line(self) -> str:
        what = f"score {fidelity.score_text(self.record)} over {self.record.get('episodes', '?')} episodes, " \
            if "score" in self.record and self.rule != "plain" else ""
        plain = " plain" if self.rule == "plain" and "weighted" in self.record else ""
        return f"{self.step}: {what}agreement {100 * fidelity.shared(self.record, self.rule):.1f} %{plain}"


def keep(original, env_id: str, target: float, compile_fn: Callable, *, episodes: int = 0, seed: int = 0,
         budget: float = 180.0, per_channel: bool = False, distill_args=None,
         base: fidelity.Baseline | None = None, rule: str = "weighted", log: Callable[[str], None] = lambda s: None):
    """Compile `original` (a LoadedPolicy) with the first recovery that keeps `target` of it on env_id.

    compile_fn(loaded, int8_layers, measure) -> CompiledPolicy is the compile with everything else bound (target,
    output, ...): pipeline.compile_policy's arguments. Returns (the CompiledPolicy written, [Attempt]); raises
    NotKept when no step keeps the target (nothing written). `base`: the original already measured
    (fidelity.baseline, same env, episodes and seed), else measured here once for every attempt. `rule`: "weighted"
    (the default) or "plain" agreement (module docstring); it also sets the distillation's (DistillArgs.rule).
    `budget`: CPU seconds of this process for the whole recovery, measurements and compiles included (see
    `distill_budget`); `distill_args` given: their budget_s as they are."""
    from bitrl_compile.trainers import distill

    fidelity.check_rule(rule)
    started = distill.cpu_clock()  # the budget's clock: the one distillation stops on
    attempts: list[Attempt] = []
    if base is None:
        base = fidelity.baseline(original, env_id, episodes=episodes, seed=seed)
    measuring = distill.cpu_clock() - started  # the original's full-length episodes: what a good student's take
    cost = [measuring]  # of a step (the plain one's, then the dearest attempt's): what must fit the budget
    ahead = [0.0]  # CPU seconds committed to what follows the attempt being measured: not for its more episodes
    more = None if not episodes or rule != "weighted" else fidelity.MoreEpisodes(
        original, env_id, target, MORE_ROUNDS_MOST * episodes, factor=MORE_EPISODES,
        left=lambda: budget - (distill.cpu_clock() - started) - ahead[0], log=lambda s: log(f"  {s}"))
    measured = fidelity.compile_hook(original, env_id, episodes=episodes, seed=seed, base=base, more=more)

    def attempt(step: str, loaded, int8_layers: tuple[int, ...] = (), then: float = 0.0):
        """`then`: CPU seconds of training that follow this step (0: only steps that fit what is left); its more
        episodes leave them, and a step like the dearest so far after them."""
        began = distill.cpu_clock()
        ahead[0] = then + cost[0] if then else 0.0
        try:
            return _attempt(step, loaded, int8_layers)
        finally:  # the dearest step so far is what the next one may cost (compiled, with more episodes)
            cost[0] = max(cost[0], distill.cpu_clock() - began)

    def _attempt(step: str, loaded, int8_layers: tuple[int, ...] = ()):
        record = _precheck(loaded, int8_layers, env_id, episodes, seed, base, per_channel)
        if record is not None and share(record, rule) < target - PRECHECK_SLACK:
            attempts.append(Attempt(step, int8_layers, record, False, rule))
            log(f"keep {100 * target:.0f} %: {attempts[-1].line()} (numpy reference; not compiled)")
            return None

        def measure(manifest, members, quantized, output):
            record = measured(manifest, members, quantized, output)
            ok = share(record, rule) >= target
            attempts.append(Attempt(step, int8_layers, record, ok, rule))
            log(f"keep {100 * target:.0f} %: {attempts[-1].line()}" + (" - kept" if ok else ""))
            if not ok:
                raise _Short(record)
            return record

        try:
            return compile_fn(loaded, list(int8_layers), measure)
        except _Short:
            return None

    result = attempt("ptq", original, then=budget / 2)  # the plain policy within noise: half for the recovery
    if result is not None:
        return result, attempts
    # a step costs what the plain one did, or what measuring the original did where the plain policy's episodes
    # ended early (a ternary DQN LunarLander crashes in a few dozen steps; a student that flies plays them whole)
    spent, step = distill.cpu_clock() - started, cost[0]  # max(the plain attempt, measuring): `attempt` keeps it
    after = STEPS_AFTER + _layer_count(original)  # and the int8-only steps, one per layer at most
    if more is not None and len(set(base.returns_fp32 or ())) > 1:  # returns that vary: longer measurements,
        after += MORE_EPISODES + 1  # the first of them also the original's and a random policy's (DQN LunarLander:
        #                             181.0 of 180 CPU s with MORE_EPISODES steps kept for them)
    args = distill_args or distill.DistillArgs(seed=seed, budget_s=distill_budget(budget, spent, step, log, after),
                                               per_channel=per_channel, select_target=target,
                                               select_episodes=episodes if rule == "weighted" else 0)
    args = dataclasses.replace(args, agreement=min(1.0, max(args.agreement, target + 0.005)), rule=rule)
    if original.input.get("recurrent"):
        ranked_recurrent = _ranking_recurrent(original, base, per_channel, log)
        rank: Callable[[], list[int]] = lambda: ranked_recurrent
        result = _distill_recurrent(original, env_id, args, ranked_recurrent[:1], attempt, log)
    else:
        ranked: list[list[int]] = []  # the layers by how much int8 helps, first: measured when first needed

        def rank() -> list[int]:
            if not ranked:
                ranked.append(_ranking(original, base.states, per_channel, log))
            return ranked[0]

        result = _distill(original, env_id, args, rank, attempt, log)
    if result is not None:
        return result, attempts
    ranking = rank()
    for k in range(1, len(ranking) + 1):  # mixed precision alone, on the original's weights
        layers = tuple(sorted(ranking[:k]))
        if distill.cpu_clock() - started + cost[0] > budget:  # the dearest step so far must still fit
            log(f"keep: the {budget:g} CPU s are spent; int8 layers {list(layers)} and more not tried")
            break
        mixed = _with_shared_row(original, layers)
        result = attempt(f"int8 layers {list(layers)}{_shared_name(mixed)}", mixed, layers)
        if result is not None:
            return result, attempts
    best = max(attempts, key=lambda a: a.share)
    tried = "; ".join(a.line() for a in attempts)
    accept = math.floor(100 * best.share) / 100
    accept = f"accept it with --keep {accept:g}, or " if accept > 0 else ""
    raise NotKept(f"--keep {target:g} not met: the best recovery ({best.step}) keeps {100 * best.share:.1f} % "
                  f"({tried}); nothing was written: {accept}give distillation more time (--keep-budget)", attempts)


def distill_budget(budget: float, spent: float, step: float, log=lambda s: None, after: int = 0) -> float:
    """The distillation's share of a recovery budget: what is left after `spent` (the original measured, the plain
    compile tried), `after` (at least STEPS_AFTER) more steps like the plain one (each of the two distilled
    students is measured on its numpy reference, the kept one then compiled and measured again; then the int8-only
    steps, one per layer at most, which stop where one more would not fit the budget) and a margin of
    BUDGET_MARGIN of the budget (the layer ranking before the int8 step; a DAgger round ends after the clock
    passes its budget: measured on an RL-Zoo DQN CartPole, 187 CPU s of a 180 s budget without it; with two
    steps reserved instead of four, an RL-Zoo DQN LunarLander took 185 s, its episodes long), at least a quarter
    of the budget (a policy whose measurement alone eats the budget still gets a distillation; the recovery then
    overruns, and says so)."""
    after = max(after, STEPS_AFTER)
    left = budget * (1 - BUDGET_MARGIN) - spent - after * step
    if left < budget / 4:
        log(f"keep: measuring and compiling take {spent + after * step:.0f} of the {budget:g} CPU s; "
            f"distillation gets {budget / 4:.0f} s, so the recovery will take longer than its budget (--keep-budget)")
        return budget / 4
    return left


def _layer_count(loaded) -> int:
    """The linear layers of an MLP or CNN policy (the int8-only steps are at most this many); 0 for a recurrent
    policy (it ranks its own) or an ONNX graph (no torch module)."""
    from bitrl_compile.trainers.export import layers

    return len(layers(loaded.module)) if loaded.module is not None and not loaded.input.get("recurrent") else 0


def _precheck(loaded, int8_layers, env_id: str, episodes: int, seed: int, base,
              per_channel: bool) -> dict | None:
    """The fidelity record of `loaded` compiled with int8_layers, measured on its numpy reference (no TVM build; a
    recurrent policy: its ternary torch forward, the reference to 1e-4, each step with its own state); None when
    the reference cannot run it (a network the reference does not know, observations it does not prepare)."""
    spec = loaded.input
    if spec.get("recurrent"):
        return _precheck_recurrent(loaded, int8_layers, env_id, episodes, seed, base, per_channel)
    if spec.get("preprocess", "none") not in ("none", "image") or \
            any(key.get("preprocess", "none") != "none" for key in spec.get("keys") or ()):
        return None
    from bitrl_compile.trainers.export import reference_forward

    try:
        forward = reference_forward(loaded, per_channel=per_channel, int8_layers=tuple(int8_layers))
        return fidelity.measure(loaded, forward, env_id, engine="reference", episodes=episodes, seed=seed,
                                base=base).record()
    except ValueError:  # a network the reference does not run: the artifact decides
        return None


def _precheck_recurrent(loaded, int8_layers, env_id: str, episodes: int, seed: int, base, per_channel: bool):
    import numpy as np
    import torch

    from bitrl_compile.runtime.policy import normalization, prepare_observations
    from bitrl_compile.trainers.distill import _ternary

    module, spec, norm = loaded.module, loaded.input, normalization(loaded.input)
    if not hasattr(module, "initial_state"):
        return None

    def step(obs, state, start):
        x, _ = prepare_observations(spec, obs, norm)
        with torch.no_grad(), _ternary(module, per_channel, tuple(int8_layers)):
            out, state = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                                torch.from_numpy(np.asarray(state, np.float32)),
                                torch.from_numpy(np.asarray(start, np.float32).reshape(-1)))
        return out.numpy(), state.numpy()

    forward = fidelity.Recurrent(step, spec["recurrent"]["state_size"])
    return fidelity.measure(loaded, forward, env_id, engine="reference", episodes=episodes, seed=seed,
                            base=base).record()


def _distill_recurrent(original, env_id: str, args, int8_layers: list[int], attempt: Callable, log):
    """The recurrent policy distilled through time (trainers/distill_recurrent.py) with `int8_layers` (the
    top-ranked layer) int8 in training and in the artifact, compiled and measured."""
    from bitrl_compile.trainers import distill_recurrent

    layers = tuple(int8_layers)
    student = distill_recurrent.distill(original, env_id, dataclasses.replace(args, int8_layers=layers),
                                        log=lambda s: log(f"  {s}"))
    name = "distill" + (f" + int8 layers {list(layers)}" if layers else "")
    return attempt(name, dataclasses.replace(original, module=student.student, recovery="distill"), layers)


def _ranking_recurrent(original, base, per_channel: bool, log) -> list[int]:
    """A recurrent policy's layers, the one whose ternary version fits its own fp32 outputs worst along the
    original's visited episodes first (distill_recurrent.rank_layers); [] when the episodes are not known."""
    from bitrl_compile.trainers import distill_recurrent

    if base.starts is None or original.output.get("kind") not in ("discrete", "continuous"):
        return []
    ranking = distill_recurrent.rank_layers(original, base.states, base.starts, per_channel)
    log(f"keep: a recurrent policy: distillation through time with layer {ranking[0]} int8 (the layer ranking "
        f"along the original's episodes: {ranking})")
    return ranking


def _distill(original, env_id: str, base, ranking: Callable[[], list[int]], attempt: Callable, log):
    """Distillation of an MLP or CNN (trainers/distill.py): all ternary, then with the top-ranked layer int8
    (`ranking()`, measured only then); each compiled and measured, the first kept returned (None when none is, or
    the policy cannot be distilled)."""
    from bitrl_compile.trainers import distill
    from bitrl_compile.trainers.export import layers as layers_of

    try:
        distill.check_distillable(original, env_id)
    except ValueError as e:
        log(f"keep: no distillation ({str(e).splitlines()[0]}); trying mixed precision")
        return None
    two = len(layers_of(original.module)) > 1  # all ternary, then the top layer int8
    student = None
    parts = [2 / 3, 1 / 3] if two else [1.0]
    for step, part in enumerate(parts):
        if step == 1 and len(ranking()) < 2:
            break
        layers = () if step == 0 else (ranking()[0],)
        args = dataclasses.replace(base, budget_s=base.budget_s * part, int8_layers=layers)
        start = None if student is None else _with_shared_row(student.policy, layers)
        student = distill.distill(original, env_id, None, args, log=lambda s: log(f"  {s}"), start=start)
        name = "distill" + (f" + int8 layers {list(layers)}" if layers else "") + _shared_name(student.policy)
        result = attempt(name, student.policy, layers, then=base.budget_s * sum(parts[step + 1:]))
        if result is not None:
            return result
    return None


def _with_shared_row(loaded, int8_layers):
    """`loaded` with its last layer split into a shared row and the differences (frontends.shared_row) when it is a
    Q-network MLP whose last layer is to be int8: the int8 rows' own scales then blur the common part of the
    Q-values, not the gaps between them. Anything else as it is."""
    from bitrl_compile.frontends import MLPPolicy
    from bitrl_compile.frontends.mlp import shared_row
    from bitrl_compile.trainers.export import layers

    module = loaded.module
    if not isinstance(module, MLPPolicy) or loaded.output.get("outputs") != "q_values" or \
            int(loaded.output.get("n", 0)) < 2:
        return loaded
    last = len(layers(module)) - 1
    if last not in int8_layers and -1 not in int8_layers:
        return loaded
    return dataclasses.replace(loaded, module=shared_row(module))


def _shared_name(loaded) -> str:
    return " (shared row)" if getattr(loaded.module, "shared_row", False) else ""


def _ranking(original, states, per_channel: bool, log) -> list[int]:
    """The layer indices, the one whose int8 version removes most of the output error on `states` (those the
    original visits) first (precision.rank_layers); [] when the network cannot be measured layer by layer."""
    from bitrl_compile import pipeline

    try:
        return [r["index"] for r in pipeline.auto_int8_layers(original, states, per_channel=per_channel).ranking]
    except ValueError as e:
        log(f"keep: no mixed precision ({str(e).splitlines()[0]})")
        return []
