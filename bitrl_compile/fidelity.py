"""How much of the original policy its ternary version keeps, measured where it matters: on the states the
original fp32 policy visits in its environment.

    measure(loaded, ternary, env_id)      the fp32 policy (loaded.module, or the ONNX graph through onnxruntime,
                                          with the artifact's observation preparation and normalisation) rolls
                                          out ROLLOUTS deterministic episodes (reset seeds seed..seed+2, at most
                                          MAX_STATES states); on those states, the ternary policy's actions are
                                          compared with the original's:
        discrete     the same action (argmax); also weighted by the fp32 policy's stakes on each state (`stakes`:
                     its best-two Q gap, or its best-two action probability gap), which the 98 % target checks:
                     a state where the original hardly prefers one action counts little (measured: distilled
                     DQN CartPole students keep 500/500 at 85-92 % plain and 97-99 % weighted agreement); for
                     Q-networks also the mean gap between the fp32 network's best two Q-values and the mean
                     |Q_ternary - Q_fp32|
        continuous   every dimension within CONTINUOUS_TOLERANCE (5 %) of its action range:
                     |a - a_fp32| <= 0.05 (high - low); a dimension without finite bounds uses the range the fp32
                     actions span on those states; plus the mean error as a share of that range
      With episodes=N, N deterministic episodes of each (reset seeds seed..seed+N-1) and of a uniform random
      policy give the returns and the score (R - R_random) / (R_fp32 - R_random); with `more` (MoreEpisodes), a
      score within noise of a target is measured on more episodes before it decides.
    artifact_forward(manifest, members, quantized, output)
                                          the ternary side: the compiled artifact itself (in this process, as
                                          runtime.load opens it) when it runs on this machine, else the numpy
                                          reference of the quantized module (reference.run)
    baseline(loaded, env_id, ...)         the original's side of those measurements (states, fp32 outputs, fp32 and
                                          random returns), computed once per compile and passed as `base=` to
                                          measure / compile_hook by every consumer (calibration, --keep's attempts)
    compile_hook(loaded, env_id, ...)     what `pipeline.compile_policy(measure=...)` calls before writing, so the
                                          manifest carries "fidelity" (runtime/manifest.py checks its fields)
    describe(record), warning(record)     the lines compile and inspect print
    Recurrent, in_order                   a recurrent policy (input "recurrent") measured the same way: each side
                                          steps the visited states in order with its own state, reset where the
                                          original's episodes start

Work layer, beside the pipeline: imports the reference, the floor (evaluate) and the runtime.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bitrl_compile.evaluate import evaluate, make_env
from bitrl_compile.runtime.policy import (
    flatten_observations,
    normalization,
    postprocess,
    prepare_observations,
)

AGREEMENT_TARGET = 0.98
CONTINUOUS_TOLERANCE = 0.05  # of the action range, per dimension
ROLLOUTS = 3
MAX_STATES = 2000
CHUNK = 512  # observations per call of the ternary policy

Forward = Callable[[np.ndarray], np.ndarray]  # a batch of raw observations -> the network's raw outputs


class Recurrent:
    """A recurrent policy as a Forward: one observation at a time ([1, ...]), its state carried from call to call.
    `reset()`, called where an episode begins (visited_states, evaluate), makes the next call start one.
    step(obs [1, ...], state [1, S], episode_start [1]) -> (raw output, next state)."""

    def __init__(self, step: Callable, state_size: int):
        self.step, self.size = step, int(state_size)
        self.reset()

    def reset(self) -> None:
        self.state, self.start = np.zeros((1, self.size), np.float32), np.ones(1, np.float32)

    def __call__(self, obs) -> np.ndarray:
        obs = np.asarray(obs)
        if len(obs) != 1:
            raise ValueError(f"a recurrent policy steps one observation at a time, not {len(obs)}")
        out, state = self.step(obs, self.state, self.start)
        self.state, self.start = np.asarray(state, np.float32).reshape(1, -1), np.zeros(1, np.float32)
        return np.asarray(out, np.float32).reshape(1, -1)


def in_order(forward: Forward, states: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """`forward` on visited states: one batch, or for a recurrent policy one state after the other, reset where
    an episode starts (its state then is what its own earlier steps made it)."""
    if not isinstance(forward, Recurrent):
        return forward(states)
    outs = []
    for obs, start in zip(states, starts):
        if start:
            forward.reset()
        outs.append(forward(obs[None]))
    return np.concatenate(outs)


class _Act:
    """What evaluate() calls per step: the env's action from `forward`; reset() at every episode's start."""

    def __init__(self, spec: dict, forward: Forward, input_spec: dict | None = None):
        self.spec, self.forward, self.input_spec = spec, forward, input_spec

    def __call__(self, obs):
        if self.input_spec is not None:  # a Dict observation: the flat row the policies take
            obs = flatten_observations(self.input_spec, obs)
        return _env_action(self.spec, self.forward(np.asarray(obs)[None]))

    def reset(self) -> None:
        if isinstance(self.forward, Recurrent):
            self.forward.reset()


@dataclass
class Fidelity:
    env: str
    states: int
    agreement: float                 # share of the states where the ternary action agrees (the rule above)
    engine: str                      # "artifact" or "reference": what computed the ternary actions
    kind: str                        # the output kind: "discrete" or "continuous"
    weighted: float | None = None    # discrete: agreement weighted by the fp32 policy's stakes (`stakes`)
    q_gap: float | None = None       # Q-networks: mean gap between the fp32 best two Q-values
    q_error: float | None = None     # Q-networks: mean |Q_ternary - Q_fp32|
    error: float | None = None       # continuous: mean |a - a_fp32| as a share of the action range
    episodes: int = 0
    ret: float | None = None         # mean return of the ternary policy over `episodes`
    ret_fp32: float | None = None
    ret_random: float | None = None
    score_error: float | None = None  # the score's standard error over the episodes (`score_error`)

    @property
    def score(self) -> float | None:
        if self.ret is None or self.ret_fp32 is None or self.ret_random is None:
            return None
        span = self.ret_fp32 - self.ret_random
        return (self.ret - self.ret_random) / span if abs(span) > 1e-9 else None

    def record(self) -> dict:
        """The manifest's "fidelity" object (JSON: finite numbers, absent fields left out)."""
        out = {"env": self.env, "states": self.states, "agreement": round(self.agreement, 6), "engine": self.engine,
               "kind": self.kind, "rule": rule(self.kind)}
        for key, value in (("weighted", self.weighted), ("q_gap", self.q_gap), ("q_error", self.q_error), ("error", self.error),
                           ("return", self.ret), ("return_fp32", self.ret_fp32), ("return_random", self.ret_random),
                           ("score", self.score),
                           ("score_error", self.score_error if self.score is not None else None)):
            if value is not None and math.isfinite(value):
                out[key] = round(float(value), 6)
        if self.episodes:
            out["episodes"] = self.episodes
        return out


def rule(kind: str) -> str:
    if kind == "discrete":
        return "same action (argmax)"
    return f"|a - a_fp32| <= {100 * CONTINUOUS_TOLERANCE:.0f} % of the action range in every dimension"


def describe(record: dict) -> str:
    """One line: "action agreement 97.1 % on 1,500 states the fp32 policy visits in CartPole-v1 (...)"."""
    weighted = (f" ({100 * record['weighted']:.1f} % weighted by the fp32 policy's stakes)"
                if "weighted" in record else "")
    head = (f"action agreement {100 * record['agreement']:.1f} %{weighted} on {record['states']:,} states the "
            f"fp32 policy visits in {record['env']}")
    parts = [head]
    nan = float("nan")  # a field a hand-made manifest left out
    if "q_gap" in record:
        parts.append(f"fp32 Q best-two gap {record['q_gap']:.3g}, ternary Q error {record.get('q_error', nan):.3g}")
    if "error" in record:
        parts.append(f"{record.get('rule', rule('continuous'))}; mean error {100 * record['error']:.1f} % of the "
                     "range")
    if "return" in record:
        score = f", score {score_text(record)}" if "score" in record else ""
        parts.append(f"return {record['return']:.1f} vs {record.get('return_fp32', nan):.1f} over "
                     f"{record.get('episodes', '?')} episodes{score}, random {record.get('return_random', nan):.1f}")
    return parts[0] + (" (" + "; ".join(parts[1:]) + ")" if len(parts) > 1 else "")


RULES = ("weighted", "plain")  # what a target is checked against (`shared`)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"agreement rule {rule!r} is not one of {', '.join(RULES)}; give weighted (the default) or "
                         "plain")
    return rule


def shared(record: dict, rule: str = "weighted") -> float:
    """The agreement a target is checked against: the stake-weighted one where there is one (discrete outputs),
    else the plain share of states; with rule "plain" always the plain share (every state counts one, near-ties
    of the fp32 policy too)."""
    return record["agreement"] if check_rule(rule) == "plain" else record.get("weighted", record["agreement"])


def kept(record: dict, rule: str = "weighted") -> float:
    """What a target is checked against (compile's warning, --keep): with episodes run, the score of the return
    (R - R_random) / (R_fp32 - R_random); else the agreement (`shared`). The return decides where it was measured:
    a policy can disagree where actions hardly matter (the repository's example CartPole policy keeps 500/500 at
    75 %), and agree on 99 % of the states the original visits yet lose 7 % of the return where its few misses
    compound (an RL-Zoo PPO CartPole, 468.5 vs 500).
    Where the return is noise, the agreement decides: max(score, min(agreement, score + 2 score_error)) is at
    least a target when the score is, or when the agreement is and the score is not below it by more than two of
    its standard errors. Returns can be chaotic: an RL-Zoo DQN LunarLander with its weights merely rounded to fp16
    plays 29 of 30 episodes differently and scores 83.6 ± 12.0 %, so a score alone would throw away students that
    act as the original on 99 % of its states, and keep others by a lucky draw. Deterministic returns (CartPole's
    500 every episode: error 0) decide alone, as before. With rule "plain" always the plain agreement."""
    if check_rule(rule) == "weighted" and "score" in record:
        noise = 2 * record.get("score_error", 0.0)
        return max(record["score"], min(shared(record), record["score"] + noise))
    return shared(record, rule)


def score_text(record: dict) -> str:
    """"93.4 %", or "93.4 ± 12.0 %" with the score's standard error."""
    error = record.get("score_error")
    return f"{100 * record['score']:.1f}" + (f" ± {100 * error:.1f}" if error else "") + " %"


def warning(record: dict, per_channel: bool = False, recovered: bool = False) -> str | None:
    """The warning line below AGREEMENT_TARGET of what `kept` checks (the score with episodes, else the agreement),
    naming the recovery; None at or above it."""
    if kept(record) >= AGREEMENT_TARGET:
        return None
    target = f"target {100 * AGREEMENT_TARGET:.0f} %"
    if "score" in record:
        head = (f"the ternary policy keeps only {score_text(record)} of the fp32 policy's return over "
                f"{record.get('episodes', '?')} episodes (score against random actions; {target}; action agreement "
                f"{100 * shared(record):.1f} %)")
    else:
        what = "of the fp32 policy's stakes on" if "weighted" in record else "of"
        head = (f"the ternary policy acts as the fp32 one on only {100 * shared(record):.1f} % {what} its states "
                f"({target})")
    if recovered:  # after --qat: say how far it got and what is left to try
        more = "" if per_channel else "--per-channel, or "
        check = "" if "score" in record else ", and check the return with --episodes N"
        return f"{head} after recovery; try {more}a longer one (--qat-steps){check}"
    fixes = f"--keep 0.98 or --qat {record['env']}" + ("" if per_channel else ", or --per-channel")
    return f"{head}: plain ternarization loses this policy; recovery: {fixes}"


# ------------------------------------------------------------------------------------------------ the two policies

def original_forward(loaded) -> Forward:
    """The fp32 policy of a LoadedPolicy on raw observations, prepared exactly as its artifact prepares them."""
    spec, norm = loaded.input, normalization(loaded.input)
    if loaded.module is not None:
        import torch

        module = loaded.module.eval()
        if spec.get("recurrent"):
            def step(obs, state, start):
                x, _ = prepare_observations(spec, obs, norm)
                with torch.no_grad():
                    out, nxt = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x, state, start)))
                return out.numpy(), nxt.numpy()

            return Recurrent(step, spec["recurrent"]["state_size"])

        def forward(obs):
            x, _ = prepare_observations(spec, obs, norm)
            with torch.no_grad():
                return module(torch.from_numpy(np.ascontiguousarray(x))).numpy().astype(np.float32)

        return forward
    import onnxruntime

    session = onnxruntime.InferenceSession(loaded.onnx_model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward_onnx(obs):
        x, _ = prepare_observations(spec, obs, norm)
        return np.asarray(session.run(None, {name: np.ascontiguousarray(x)})[0], np.float32)

    return forward_onnx


def artifact_forward(manifest: dict, members: dict[str, bytes], quantized, output) -> tuple[Forward, str, Callable]:
    """The ternary policy: (forward, engine, close). The artifact as runtime.load would open it when it runs
    here, else the numpy reference of the quantized module (another architecture, missing CPU features)."""
    import json

    from bitrl_compile import reference
    from bitrl_compile.runtime import artifact as art
    from bitrl_compile.runtime import safetensors_np, weights
    from bitrl_compile.runtime.policy import Policy, check_runnable_here

    spec, norm = manifest["input"], normalization(manifest["input"])
    try:
        check_runnable_here(manifest, output)
    except ValueError:
        def forward_reference(obs):
            x, _ = prepare_observations(spec, obs, norm)
            out = np.asarray(reference.run(quantized, x), np.float32)
            return out.reshape(len(x), -1)

        def step_reference(obs, state, start):
            x, _ = prepare_observations(spec, obs, norm)
            return reference.run(quantized, x, state, start)

        if spec.get("recurrent"):
            return Recurrent(step_reference, spec["recurrent"]["state_size"]), "reference", lambda: None
        return forward_reference, "reference", lambda: None
    manifest = json.loads(art.manifest_bytes(manifest))
    params, _ = safetensors_np.loads(members[art.PARAMS])
    params = weights.unpack_params(params, manifest.get("weights", {}))
    policy = Policy(manifest, members[art.LIB], params, str(output))
    batch_max = int((manifest.get("batch") or {}).get("max") or CHUNK)
    step = max(1, min(CHUNK, batch_max))

    def forward_artifact(obs):
        obs = np.asarray(obs)
        return np.concatenate([np.asarray(policy.forward(obs[i:i + step]), np.float32).reshape(
            len(obs[i:i + step]), -1) for i in range(0, len(obs), step)])

    if spec.get("recurrent"):
        return Recurrent(policy.forward, spec["recurrent"]["state_size"]), "artifact", policy.close
    return forward_artifact, "artifact", policy.close


# ------------------------------------------------------------------------------------------------ measuring

def _env_action(output_spec: dict, out: np.ndarray):
    action = postprocess(output_spec, out[None] if out.ndim == 1 else out)[0]
    return int(action) if output_spec["kind"] == "discrete" else action


def visited_states(forward: Forward, output_spec: dict, env_id: str, rollouts: int = ROLLOUTS,
                   max_states: int = MAX_STATES, seed: int = 0, input_spec: dict | None = None) -> np.ndarray:
    """The observations of `rollouts` deterministic episodes of the policy (reset seeds seed + i), at most
    max_states of them (a Dict observation as the flat row `input_spec` says, which the policies take too)."""
    return visited(forward, output_spec, env_id, rollouts, max_states, seed, input_spec)[0]


def visited(forward: Forward, output_spec: dict, env_id: str, rollouts: int = ROLLOUTS,
            max_states: int = MAX_STATES, seed: int = 0,
            input_spec: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`visited_states` and, per state, whether an episode starts there."""
    flat = (lambda o: flatten_observations(input_spec, o)) if input_spec else (lambda o: o)
    env = make_env(env_id)
    states, starts = [], []
    try:
        for i in range(rollouts):
            obs, _ = env.reset(seed=seed + i)
            if isinstance(forward, Recurrent):
                forward.reset()
            done, first = False, True
            while not done and len(states) < max_states:
                starts.append(first)
                states.append(np.array(flat(obs), copy=True))
                obs, _, terminated, truncated, _ = env.step(_env_action(output_spec, forward(states[-1][None])))
                done, first = terminated or truncated, False
    finally:
        env.close()
    return np.stack(states), np.asarray(starts, bool)


def stakes(output_spec: dict, fp32: np.ndarray) -> np.ndarray | None:
    """How much the fp32 policy cares which action is taken on each state (discrete outputs; None otherwise):
    the gap between its best two Q-values (a Q-network) or between its two largest action probabilities
    (logits). A state where two actions are nearly equal in the original's own eyes has a small stake."""
    if output_spec["kind"] != "discrete":
        return None
    out = np.asarray(fp32, np.float64).reshape(len(fp32), -1)
    if out.shape[1] < 2:
        return None
    if output_spec.get("outputs") != "q_values":
        out = np.exp(out - out.max(1, keepdims=True))
        out /= out.sum(1, keepdims=True)
    top2 = np.sort(out, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def weighted_agreement(agree: np.ndarray, weights: np.ndarray | None) -> float:
    """The share of the fp32 policy's stakes on states where the actions agree (plain agreement when every
    stake is zero or there are none)."""
    agree = np.asarray(agree, np.float64)
    if weights is None or not np.isfinite(weights).all() or weights.sum() <= 0:
        return float(agree.mean())
    return float((weights * agree).sum() / weights.sum())


def compare(output_spec: dict, ours: np.ndarray, fp32: np.ndarray) -> dict:
    """Agreement of the ternary outputs with the fp32 ones on the same states (the rule in the docstring), and
    for discrete outputs the stake-weighted agreement ("weighted")."""
    if output_spec["kind"] == "discrete":
        n = len(fp32)
        ours, fp32 = ours.reshape(n, -1).astype(np.float64), fp32.reshape(n, -1).astype(np.float64)
        agree = ours.argmax(1) == fp32.argmax(1)
        result = {"agreement": float(agree.mean()),
                  "weighted": weighted_agreement(agree, stakes(output_spec, fp32))}
        if output_spec.get("outputs") == "q_values" and fp32.shape[1] > 1:
            top2 = np.sort(fp32, axis=1)[:, -2:]
            result.update(q_gap=float((top2[:, 1] - top2[:, 0]).mean()), q_error=float(np.abs(ours - fp32).mean()))
        return result
    return action_agreement(output_spec, postprocess(output_spec, ours.astype(np.float32)),
                            postprocess(output_spec, fp32.astype(np.float32)))


def action_agreement(output_spec: dict, ours, fp32) -> dict:
    """The rule on actions (what an env takes): {"agreement"} for discrete, plus {"error"} for continuous."""
    n = len(fp32)
    a, b = np.asarray(ours).reshape(n, -1).astype(np.float64), np.asarray(fp32).reshape(n, -1).astype(np.float64)
    if output_spec["kind"] == "discrete":
        return {"agreement": float((a == b).all(axis=1).mean())}
    span = (np.asarray(output_spec["high"], np.float64) - np.asarray(output_spec["low"], np.float64)).reshape(-1)
    seen = b.max(0) - b.min(0)
    span = np.where(np.isfinite(span), span, np.where(seen > 0, seen, 1.0))
    diff = np.abs(a - b) / span
    return {"agreement": float((diff <= CONTINUOUS_TOLERANCE).all(axis=1).mean()), "error": float(diff.mean())}


@dataclass
class Baseline:
    """The original's side of every measurement in one compile, computed once (`baseline`) and shared by the
    calibration of --int8-layers auto, --keep's layer ranking and every attempt's measure: the visited states,
    the fp32 outputs on them and, with episodes, the fp32 and random returns (fixed seeds: the same numbers each
    time, so computing them again per consumer would only cost time)."""
    env: str
    seed: int
    states: np.ndarray               # raw observations the fp32 policy visits (`visited_states`)
    outputs: np.ndarray              # the fp32 network's raw outputs on them
    episodes: int = 0
    ret_fp32: float | None = None
    ret_random: float | None = None
    starts: np.ndarray | None = None  # per state, whether an episode starts there (recurrent policies reset)
    returns_fp32: list[float] | None = None  # per episode: the fp32 side of `score_error`'s pairs


def _act(spec: dict, forward: Forward, input_spec: dict | None = None) -> _Act:
    return _Act(spec, forward, input_spec)


def returns(loaded, forward: Forward, env_id: str, episodes: int, seed: int = 0) -> list[float]:
    """The returns of `episodes` deterministic episodes (reset seeds seed..seed+episodes-1) in which `forward`
    (raw observations -> raw outputs, e.g. the numpy reference of a student of `loaded`) takes the actions."""
    return evaluate(_act(loaded.output, forward, loaded.input), env_id, episodes, seed)[0]


def _check_kind(spec: dict) -> None:
    if spec["kind"] not in ("discrete", "continuous"):
        raise ValueError(f"fidelity needs a policy with actions, not output kind {spec['kind']!r}")


def baseline(loaded, env_id: str, *, episodes: int = 0, seed: int = 0, rollouts: int = ROLLOUTS,
             max_states: int = MAX_STATES, fp32: Forward | None = None) -> Baseline:
    """The original policy `loaded` measured once: its visited states and outputs, and its and a uniform random
    policy's mean return over `episodes` deterministic episodes (reset seeds seed..seed+episodes-1)."""
    spec = loaded.output
    _check_kind(spec)
    fp32 = fp32 or original_forward(loaded)
    states, starts = visited(fp32, spec, env_id, rollouts, max_states, seed, loaded.input)
    base = Baseline(env=env_id, seed=seed, states=states, outputs=in_order(fp32, states, starts),
                    episodes=episodes, starts=starts)
    if episodes:
        base.returns_fp32 = returns(loaded, fp32, env_id, episodes, seed)
        base.ret_fp32 = float(np.mean(base.returns_fp32))
        base.ret_random = random_return(env_id, episodes, seed)
    return base


def random_return(env_id: str, episodes: int, seed: int = 0) -> float:
    """The mean return of uniform random actions (the action space seeded with `seed`) over the deterministic
    episodes reset with seeds seed..seed+episodes-1: the score's zero."""
    space = make_env(env_id).action_space
    space.seed(seed)
    return float(np.mean(evaluate(lambda obs: space.sample(), env_id, episodes, seed)[0]))


class MoreEpisodes:
    """Sequential testing against `target` (recovery.keep): a measurement whose score is within two standard errors
    of the target, unless the score and the agreement both reach it, is measured on more episodes (the reset seeds
    after those played; the fp32 side measured once per seed) and decided on all of them (`kept`), round after
    round: each adds `factor` times the episodes so far (10 -> 30 -> 90 ...) while the score is within noise, up to
    `most` in all, cut to the CPU seconds `left()` (a budget's rest: none when not even a round's worth fits). So a
    lucky draw does not decide, nor a loss that the agreement would keep as noise (cases: recovery's docstring);
    a deterministic return (error 0) costs nothing more. `log` hears of each round."""

    def __init__(self, loaded, env_id: str, target: float, most: int, factor: int = 2,
                 fp32: Forward | None = None, left: Callable[[], float] = lambda: math.inf,
                 log: Callable[[str], None] = lambda s: None):
        self.loaded, self.env_id, self.target, self.fp32 = loaded, env_id, target, fp32
        self.factor, self.most, self.log = factor, most, log
        self.left = left  # CPU seconds the rounds may still take (a budget's rest): a round is cut to fit them
        self._fp32: dict[int, float] = {}  # the original's return per reset seed
        self._random: dict[tuple[int, int], float] = {}  # a random policy's mean return per (first seed, count)

    def within_noise(self, result: Fidelity) -> bool:
        """Whether `result` is undecided: its score within two standard errors of the target, and not both the
        score and the agreement at it."""
        score, error = result.score, result.score_error
        agreement = result.weighted if result.weighted is not None else result.agreement
        return (score is not None and bool(error) and min(agreement, score) < self.target
                and abs(score - self.target) < 2 * error)

    def extension(self, result: Fidelity, seconds_per_episode: float = 0.0, first: int = 0) -> int:
        """How many episodes more `result` (measured on result.episodes) is to be measured on, reset with seeds
        first..: `factor` times those played, fewer where `most` or the CPU seconds `left` end it first
        (`seconds_per_episode`: what one of its episodes took, an fp32 episode not measured yet counted the same);
        0 when the result is decided, or when not even as many as were played fit (a round that small would
        hardly narrow the score's error)."""
        played = result.episodes or 0
        n = min(self.factor * played, self.most - played)
        if n <= 0 or not self.within_noise(result):
            return 0
        left = self.left()
        if left <= 0:
            return 0
        per = seconds_per_episode * (1 + sum(s not in self._fp32 for s in range(first, first + n)) / n)
        fit = left / per if per > 0 else math.inf
        if fit < n:  # cut to the budget: still at least as many as were played, or none
            n = int(fit) if fit >= played else 0
        return n

    def sides(self, first: int, n: int) -> tuple[list[float], float]:
        """The original's returns on the `n` episodes reset with seeds first.. (each measured once, for every
        measurement it extends) and a random policy's mean return on them (once per first seed and count)."""
        todo = [s for s in range(first, first + n) if s not in self._fp32]
        forward = self.fp32 or original_forward(self.loaded)
        while todo:  # runs of consecutive seeds, each one evaluate()
            run = next((i for i in range(1, len(todo)) if todo[i] != todo[i - 1] + 1), len(todo))
            got = returns(self.loaded, forward, self.env_id, run, todo[0])
            self._fp32.update(zip(todo[:run], got))
            todo = todo[run:]
        if (first, n) not in self._random:
            self._random[(first, n)] = random_return(self.env_id, n, first)
        return [self._fp32[s] for s in range(first, first + n)], self._random[(first, n)]


def measure(loaded, ternary: Forward, env_id: str, *, engine: str = "artifact", episodes: int = 0, seed: int = 0,
            rollouts: int = ROLLOUTS, max_states: int = MAX_STATES, fp32: Forward | None = None,
            base: Baseline | None = None, more: MoreEpisodes | None = None) -> Fidelity:
    """The fidelity of `ternary` (raw observations -> raw outputs) to the original policy `loaded`; `base` (from
    `baseline`, for the same env, seed and episodes) saves measuring the original again. `more`: a score within
    noise of its target is measured on more episodes (`MoreEpisodes`); the result then counts all of them."""
    spec = loaded.output
    _check_kind(spec)
    if base is None:
        base = baseline(loaded, env_id, episodes=episodes, seed=seed, rollouts=rollouts, max_states=max_states,
                        fp32=fp32)
    elif (base.env, base.seed, base.episodes) != (env_id, seed, episodes):
        raise ValueError(f"the baseline was measured on {base.env} (seed {base.seed}, {base.episodes} episodes), "
                         f"not {env_id} (seed {seed}, {episodes} episodes)")
    result = Fidelity(env=env_id, states=len(base.states), engine=engine, kind=spec["kind"],
                      **compare(spec, in_order(ternary, base.states, base.starts), base.outputs))
    if episodes:
        clock = time.process_time()
        ours = returns(loaded, ternary, env_id, episodes, seed)
        spent = time.process_time() - clock  # CPU seconds of our episodes: what the next round's are estimated at
        fp, random_sum = list(base.returns_fp32 or ()), base.ret_random * episodes
        _returns_into(result, ours, fp, random_sum, base.ret_fp32)
        while more is not None and base.returns_fp32 is not None and \
                (n := more.extension(result, spent / len(ours), seed + len(ours))):
            more.log(f"score {score_text(result.record())} over {len(ours)} episodes, within noise of "
                     f"{100 * more.target:g} %: {n} more")
            fp32_more, random_more = more.sides(seed + len(ours), n)
            clock = time.process_time()
            ours = ours + list(returns(loaded, ternary, env_id, n, seed + len(ours)))
            spent += time.process_time() - clock
            fp, random_sum = fp + fp32_more, random_sum + random_more * n
            _returns_into(result, ours, fp, random_sum)
    return result


def _returns_into(result: Fidelity, ours: list[float], fp32: list[float], random_sum: float,
                  ret_fp32: float | None = None) -> None:
    """`result`'s returns and score error from paired returns (no fp32 pairs: their mean `ret_fp32`)."""
    result.episodes = len(ours)
    result.ret = float(np.mean(ours))
    result.ret_fp32 = float(np.mean(fp32)) if fp32 else ret_fp32
    result.ret_random = random_sum / len(ours)
    result.score_error = score_error(ours, fp32 or None, result.ret_fp32 - result.ret_random)


def score_error(ours, fp32, span: float) -> float | None:
    """The standard error of the score (R - R_random) / span from per-episode pairs (same reset seed on both sides):
    std(R_i - R_fp32_i) / sqrt(n) / |span|; None with fewer than two pairs (or a baseline measured without them)."""
    if fp32 is None or len(ours) < 2 or len(ours) != len(fp32) or not abs(span) > 1e-9:
        return None
    diff = np.asarray(ours, float) - np.asarray(fp32, float)
    return float(np.std(diff, ddof=1) / math.sqrt(len(diff)) / abs(span))


def compile_hook(loaded, env_id: str, *, episodes: int = 0, seed: int = 0, base: Baseline | None = None,
                 done: Callable[[Fidelity], None] = lambda f: None, more: MoreEpisodes | None = None):
    """For `pipeline.compile_policy(measure=...)`: measures the artifact (or the reference) before it is written
    and returns the manifest's "fidelity" record; `done` receives the Fidelity (the CLI prints it). `base`: the
    original measured once (`baseline`), for compiles that measure several artifacts against it."""
    def hook(manifest: dict, members: dict[str, bytes], quantized, output) -> dict:
        forward, engine, close = artifact_forward(manifest, members, quantized, output)
        try:
            result = measure(loaded, forward, env_id, engine=engine, episodes=episodes, seed=seed, base=base,
                             more=more)
        finally:
            close()
        done(result)
        return result.record()

    return hook
