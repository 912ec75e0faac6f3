"""Distillation of an fp32 recurrent (LSTM) policy into its ternary version, trained through time.

    from bitrl_compile.trainers import distill_recurrent
    result = distill_recurrent.distill(loaded, "CartPole-v1", DistillArgs(budget_s=60))   # result.student
    bitrl-compile rppo.zip --env CartPole-v1 --keep 0.98        # recovery.keep calls this for a recurrent policy

The student is a copy of the teacher's RecurrentPolicy (frontends/sb3_recurrent.py) whose every Linear (each LSTM
layer's `ih` and `hh`, the head's layers) runs as the compiler's BitLinear in the forward pass (`quantized`:
`distill._ternary`'s arithmetic, per tensor or per output channel, each weight quantized once per chunk), the
Linears numbered in DistillArgs.int8_layers with int8 weights instead (compile with the same --int8-layers), the
gates in float as the artifact computes them; its latent float weights are what the compiler quantizes with the
same math. `rank_layers` says which layer is worth int8 (recovery.keep trains with its first).

Episodes (DAgger): whole episodes of one environment, each step's action from the teacher with probability beta
(1 in the first round, halving every round) else from the student, with distill's exploration noise; the teacher
and the student each carry their own state along the episode (reset at its start), and every step keeps the
teacher's output as its target. Training samples a batch of episodes, pads them to one length [B, T, obs] with a
mask, and runs the student over them from its initial state (episode_start 1 at t = 0) in chunks of BPTT steps
(truncated back-propagation: the state detached between chunks, one Adam step per chunk), the loss of
`distill.Loss` for the output kind on the unmasked steps.

Held-out: deterministic episodes of the teacher (fidelity.visited, other seeds); the student's outputs along them
with its own state, compared with the teacher's by fidelity's rule (`distill.agreement`: stake-weighted for
discrete actions, or plain with DistillArgs.rule "plain", whose ranking floor the loss then adds). The run stops at
the agreement target or the time budget and returns the best student seen.
Before training, distill's scale/bias calibration of every Linear, fitted along the held-out episodes
(`calibrate_`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import sys
import time

import numpy as np
import torch

from bitrl_compile import fidelity
from bitrl_compile.evaluate import make_env
from bitrl_compile.quant import quantize_activations_ste, quantize_weight_int8_ste, ternarize_weight_ste
from bitrl_compile.runtime.policy import normalization, postprocess, prepare_observations
from bitrl_compile.trainers.distill import (
    HELDOUT_SEEDS,
    TRAIN_SEEDS,
    DistillArgs,
    DistillResult,
    Loss,
    _layer,
    _ternary,
    agreement,
    floor_of,
    output_kind,
)
from bitrl_compile.trainers.export import layers
from bitrl_compile.trainers.rollouts import explore

BPTT = 32              # steps per chunk of truncated back-propagation through time
MAX_EPISODE = 1000     # steps kept of one episode
LR_FACTOR = 3.0        # the recurrent student's Adam rate: DistillArgs.learning_rate times this (measured on
                       # RecurrentPPO CartPole students: 1e-3 reached 97.6 % plain held-out agreement in 3 rounds,
                       # 3e-3 98.8 %)
EPISODES_PER_BATCH = 64  # measured: as good per update as 16 at about the same cost (the steps dominate)


def check_recurrent(loaded, env_id: str, name: str = "policy") -> str:
    """Raise ValueError unless `loaded` is a recurrent policy (frontends' RecurrentPolicy) with actions whose
    observations env_id gives; its output kind."""
    from bitrl_compile.frontends.sb3_recurrent import RecurrentPolicy

    if not loaded.input.get("recurrent") or not isinstance(loaded.module, RecurrentPolicy):
        raise ValueError(f"{name}: not a recurrent policy (an sb3-contrib RecurrentPPO zip); use distill.distill")
    kind = output_kind(loaded.output)
    env = make_env(env_id)
    try:
        obs, _ = env.reset(seed=0)
        try:
            prepare_observations(loaded.input, np.asarray(obs)[None], normalization(loaded.input))
        except ValueError as e:
            raise ValueError(f"{name}: {env_id}'s observations do not fit the policy ({str(e).splitlines()[0]}); "
                             "give the environment it was trained on") from None
    finally:
        env.close()
    return kind


def sequence_forward(module, x: torch.Tensor, ternary: bool, per_channel: bool = False, int8_layers=()):
    """`module` (a RecurrentPolicy) over padded episodes x [B, T, ...] from its initial state: outputs [B, T, A].
    ternary: every Linear as the compiler's BitLinear (straight-through). Chunks of BPTT steps when gradients are
    on (the caller steps the optimizer per chunk: `chunks`)."""
    outs = [out for out, _ in chunks(module, x, ternary, per_channel, len(x[0]) or 1, int8_layers)]
    return torch.cat(outs, 1)


def chunks(module, x: torch.Tensor, ternary: bool, per_channel: bool, length: int = BPTT, int8_layers=()):
    """Yields (outputs [B, <=length, A], state) chunk by chunk along x [B, T, ...]; the state carried into the
    next chunk is detached (truncated BPTT). t = 0 starts the episodes (episode_start 1). The weights are quantized
    once per chunk (`quantized`): the caller may step the optimizer between chunks, never within one."""
    b, steps = x.shape[0], x.shape[1]
    state = module.initial_state(b)
    for t0 in range(0, steps, length):
        outs = []
        with quantized(module, per_channel, int8_layers) if ternary else contextlib.nullcontext():
            for t in range(t0, min(steps, t0 + length)):
                start = torch.full((b,), 1.0 if t == 0 else 0.0)
                out, state = module(x[:, t], state, start)
                outs.append(out)
        yield torch.stack(outs, 1), state
        state = state.detach()


@contextlib.contextmanager
def quantized(module, per_channel: bool = False, int8_layers=()):
    """Within: `module`'s Linears run as the compiler's layers (distill._ternary's arithmetic, bit for bit), each
    weight quantized once on entry instead of at every call: along an episode the same weights serve every step,
    and a 16-unit LSTM step spends about as long quantizing its weights as multiplying by them. The weights must
    not change within (gradients still flow to them, straight through)."""
    found = layers(module)
    try:
        for i, m in enumerate(found):
            if not isinstance(m, torch.nn.Linear):  # a CnnLstmPolicy's convolutions: as distill runs them
                m.forward = functools.partial(_layer, m, per_channel=per_channel, int8=i in int8_layers)
                continue
            w = quantize_weight_int8_ste(m.weight) if i in int8_layers else \
                ternarize_weight_ste(m.weight, per_channel)
            m.forward = functools.partial(_linear, weight=w, bias=m.bias)
        yield module
    finally:
        for m in found:
            m.__dict__.pop("forward", None)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """distill._bitlinear with the weight already quantized: int8 activations per row times `weight`."""
    return torch.nn.functional.linear(quantize_activations_ste(x), weight, bias)


def calibrate_(student, teacher, x: torch.Tensor, mask: torch.Tensor, per_channel: bool = False,
               int8_layers=()) -> None:
    """Scale and bias correction of every Linear before training (distill.calibrate_, through time): layer by layer
    in the compiler's order, the student's ternary layer on its own inputs along the episodes x [B, T, ...] (the
    layers before it already corrected) fitted to the teacher's layer on the teacher's, over the unmasked steps,
    by one factor on the weights and, where the layer has one, a new bias per output (least squares). A ternary
    LSTM's gates can come out several-fold too small or large, which its state then carries along the episode."""
    steps = mask.t().reshape(-1)  # calls go step by step: [T * B] in call order
    with torch.no_grad():
        wanted = _along(teacher, x, steps, outputs=True)
        for k, ms in enumerate(layers(student)):  # one pass per layer: its input depends on those calibrated before
            inputs = _along(student, x, steps, only=k, ternary=True, per_channel=per_channel,
                            int8_layers=int8_layers)[k]
            z = _layer(ms, inputs, per_channel, bias=False, int8=k in int8_layers)
            h = wanted[k]
            zm, hm = z.mean(0), h.mean(0)
            zc, hc = z - zm, h - hm
            c = float((zc * hc).sum() / (zc * zc).sum().clamp(min=1e-12)) if len(z) > 1 else 1.0
            c = min(max(c, 0.1), 10.0) if math.isfinite(c) else 1.0
            ms.weight.mul_(c)
            if ms.bias is not None:
                ms.bias.copy_(hm - c * zm)


def _along(module, x: torch.Tensor, steps: torch.Tensor, *, outputs: bool = False, only: int | None = None,
           ternary: bool = False, per_channel: bool = False, int8_layers=()) -> dict[int, torch.Tensor]:
    """Each layer's inputs (or outputs) at every call of one `sequence_forward` of `module` over the padded
    episodes x, in the states' order (`steps`: the mask's valid calls, step by step); `only`: that layer alone."""
    found = layers(module)
    seen: dict[int, list[torch.Tensor]] = {k: [] for k in (range(len(found)) if only is None else [only])}
    hooks = [found[k].register_forward_hook(lambda _m, _i, out, k=k: seen[k].append(out)) if outputs else
             found[k].register_forward_pre_hook(lambda _m, inputs, k=k: seen[k].append(inputs[0])) for k in seen]
    try:
        sequence_forward(module, x, ternary, per_channel, int8_layers)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: torch.cat(v)[steps] for k, v in seen.items()}


def rank_layers(loaded, states: np.ndarray, starts: np.ndarray, per_channel: bool = False) -> list[int]:
    """The layer indices of the recurrent policy `loaded` (export.layers' numbering), the one whose ternary version
    fits its own fp32 outputs worst first: each layer on the inputs it gets along the original's episodes
    (`states` in order, `starts`; the fp32 network with its state), its ternary output fitted to the fp32 one by
    the scale and bias `calibrate_` fits, the relative RMS residual. A local error that training through time does
    not remove: a layer with few inputs (the first LSTM layer's `ih`, 4 CartPole observations) has few ternary
    directions to choose from. Measured on three RecurrentPPO CartPole teachers (LSTM 2x16, plain agreement with
    SB3's predict on 4000 states it visits after 7 rounds): the top layer int8 in training gives 99.4-99.6 %,
    every layer ternary 99.0-99.2 %; the layer precision.rank_layers' measure picks (the whole network's output
    error with one layer int8 and no training, here through time) gave 99.0-99.5 %."""
    norm = normalization(loaded.input)
    x, mask = _pad([prepare_observations(loaded.input, e, norm)[0] for e in _split(states, starts)])
    module = copy.deepcopy(loaded.module).float().eval()
    found = layers(module)
    residuals = []
    with torch.no_grad():
        seen = _along(module, x, mask.t().reshape(-1))
        for k, m in enumerate(found):
            inputs = seen[k]
            h = (m._conv_forward(inputs, m.weight, None) if isinstance(m, torch.nn.Conv2d) else
                 torch.nn.functional.linear(inputs, m.weight)).double().flatten(1)
            z = _layer(m, inputs, per_channel, bias=False).double().flatten(1)
            hc, zc = h - h.mean(0), z - z.mean(0)
            c = (zc * hc).sum() / (zc * zc).sum().clamp(min=1e-12)
            residuals.append(float((hc - c * zc).norm() / hc.norm().clamp(min=1e-12)))
    return sorted(range(len(found)), key=lambda k: (-residuals[k], k))


def episodes_of(states: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared observations in order and their episode starts -> padded episodes [E, T, ...] and the mask [E, T]
    (outputs[mask] are in the states' order)."""
    return _pad(_split(states, starts))


def ternary(module, on: bool = True, per_channel: bool = False, int8_layers=()):
    """A context in which `module`'s Linears run as the compiler's BitLinear (on; those in int8_layers int8), or as
    they are."""
    return _ternary(module, per_channel, tuple(int8_layers)) if on else contextlib.nullcontext()


def _pad(episodes: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Episodes of [T_i, ...] -> padded [E, T, ...] (zeros after each end) and the mask [E, T]."""
    steps = max(len(e) for e in episodes)
    x = np.zeros((len(episodes), steps, *episodes[0].shape[1:]), np.float32)
    mask = np.zeros((len(episodes), steps), bool)
    for i, e in enumerate(episodes):
        x[i, :len(e)], mask[i, :len(e)] = e, True
    return torch.from_numpy(x), torch.from_numpy(mask)


def _split(states: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """Visited states in order -> one array per episode (a new one where an episode starts)."""
    edges = list(np.flatnonzero(starts)) + [len(states)]
    if edges[0] != 0:
        edges = [0] + edges
    return [states[a:b] for a, b in itertools.pairwise(edges) if b > a]


class Episodes:
    """One environment stepped by a mix of teacher and student (each with its own state), whole episodes; the
    observations as the network takes them (prepared) and the teacher's outputs along them."""

    def __init__(self, loaded, env_id: str, seed: int, epsilon: float):
        self.input, self.spec, self.norm = loaded.input, loaded.output, normalization(loaded.input)
        self.env, self.seed, self.epsilon = make_env(env_id), seed, epsilon
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def episode(self, teacher, student, beta: float, per_channel: bool,
                int8_layers=()) -> tuple[np.ndarray, np.ndarray]:
        obs, _ = self.env.reset(seed=self.seed + self.count)
        self.count += 1
        t_state, s_state = teacher.initial_state(1), student.initial_state(1)
        xs, outs = [], []
        start = torch.ones(1)
        with torch.no_grad(), quantized(student, per_channel, int8_layers):
            for _ in range(MAX_EPISODE):
                x, _ = prepare_observations(self.input, np.asarray(obs)[None], self.norm)
                x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
                t_out, t_state = teacher(x, t_state, start)
                out = t_out
                if beta < 1:  # the student's state follows the episode whoever acts
                    s_out, s_state = student(x, s_state, start)
                    if self.rng.random() >= beta:
                        out = s_out
                xs.append(x[0].numpy())
                outs.append(t_out[0].numpy())
                action = postprocess(self.spec, out.numpy())
                if self.epsilon > 0:
                    action = explore(self.spec, action, self.epsilon, self.rng)
                action = int(action[0]) if self.spec["kind"] == "discrete" else action[0]
                obs, _, terminated, truncated, _ = self.env.step(action)
                start = torch.zeros(1)
                if terminated or truncated:
                    break
        return np.stack(xs), np.stack(outs).astype(np.float32)

    def close(self) -> None:
        self.env.close()


def distill(loaded, env_id: str, args: DistillArgs | None = None,
            log=lambda s: print(s, file=sys.stderr)) -> DistillResult:
    """Distil the fp32 recurrent policy `loaded` into its ternary version on env_id's episodes (module docstring);
    the result's student is a RecurrentPolicy with latent float weights (compile it as the LoadedPolicy's module,
    with args.int8_layers as --int8-layers)."""
    args = args or DistillArgs()
    started, wall = time.process_time(), time.perf_counter()  # the budget in CPU seconds, as distill's
    kind = check_recurrent(loaded, env_id)
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    spec, int8 = loaded.output, tuple(args.int8_layers)
    teacher = copy.deepcopy(loaded.module).float().eval()
    student = copy.deepcopy(loaded.module).float().train()
    for p in student.parameters():
        p.requires_grad_(True)
    try:
        # held-out: the teacher's own deterministic episodes, other seeds (fidelity's visited states)
        states, starts = fidelity.visited(fidelity.original_forward(loaded), spec, env_id, rollouts=64,
                                          max_states=args.heldout, seed=args.seed + HELDOUT_SEEDS)
        norm = normalization(loaded.input)
        held = [prepare_observations(loaded.input, e, norm)[0] for e in _split(states, starts)]
        held_x, held_mask = _pad(held)
        with torch.no_grad():
            held_t = sequence_forward(teacher, held_x, False)[held_mask]
        loss_fn = Loss(kind, spec, held_t.numpy(), args.margin, floor_of(args))

        def held_out() -> tuple[float, float]:
            with torch.no_grad():
                s = sequence_forward(student, held_x, True, args.per_channel, int8)[held_mask]
                return agreement(spec, s.numpy(), held_t.numpy(), args.rule), loss_fn(s, held_t).item()

        before, held_loss = held_out()
        best_key, best_state = (before, -held_loss), copy.deepcopy(student.state_dict())
        calibrated = before
        if args.calibrate:
            calibrate_(student, teacher, held_x[::2], held_mask[::2], args.per_channel, int8)
            calibrated, held_loss = held_out()
            if (calibrated, -held_loss) > best_key:
                best_key, best_state = (calibrated, -held_loss), copy.deepcopy(student.state_dict())
        best = best_key[0]
        log(f"distill recurrent {kind} policy on {env_id}: PTQ agrees with the fp32 policy on {100 * before:.1f} % "
            f"of {int(held_mask.sum())} held-out states ({len(held)} episodes, each policy with its own state), "
            f"{100 * calibrated:.1f} % after scale/bias calibration; target {100 * args.agreement:.1f} % "
            f"({args.rule}), budget {args.budget_s:.0f} s" + (f", layers {list(int8)} int8" if int8 else ""))
        rate = args.learning_rate * LR_FACTOR
        optimizer = torch.optim.Adam(student.parameters(), lr=rate)
        source = Episodes(loaded, env_id, args.seed + TRAIN_SEEDS, args.epsilon)
        gen = torch.Generator().manual_seed(args.seed)
        xs: list[np.ndarray] = []
        ts: list[np.ndarray] = []
        rounds = 0
        want = max(1, args.num_envs * args.steps_per_round)  # states collected per round
        try:
            while best < args.agreement and rounds < args.max_rounds and \
                    time.process_time() - started < args.budget_s:
                beta = 0.5 ** rounds
                got = 0
                while got < want:
                    x, t = source.episode(teacher, student, beta, args.per_channel, int8)
                    xs.append(x)
                    ts.append(t)
                    got += len(x)
                while sum(len(x) for x in xs) > args.max_states and len(xs) > 1:  # the oldest go first
                    xs.pop(0)
                    ts.pop(0)
                progress = (time.process_time() - started) / args.budget_s
                for group in optimizer.param_groups:
                    group["lr"] = rate * max(0.1, 1.0 - max(progress, rounds / args.max_rounds))
                total, updates = 0.0, 0
                while updates < args.updates_per_round and time.process_time() - started < args.budget_s:
                    idx = torch.randint(len(xs), (min(EPISODES_PER_BATCH, len(xs)),), generator=gen).tolist()
                    bx, mask = _pad([xs[i] for i in idx])
                    bt, _ = _pad([ts[i] for i in idx])
                    for t0, (out, _) in zip(range(0, bx.shape[1], BPTT),
                                            chunks(student, bx, True, args.per_channel, BPTT, int8)):
                        m = mask[:, t0:t0 + BPTT]
                        if not m.any():
                            break
                        loss = loss_fn(out[m], bt[:, t0:t0 + BPTT][m])
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        total, updates = total + loss.item(), updates + 1
                rounds += 1
                agree, held_loss = held_out()
                if (agree, -held_loss) > best_key:
                    best_key, best_state, best = (agree, -held_loss), copy.deepcopy(student.state_dict()), agree
                log(f"  round {rounds:3d}: {sum(len(x) for x in xs):7,} states in {len(xs)} episodes (beta "
                    f"{beta:.2f}), loss {total / max(1, updates):.4g}, held-out loss {held_loss:.4g}, agreement "
                    f"{100 * agree:5.1f} % (best {100 * best:5.1f} %), {time.process_time() - started:4.0f} s CPU")
        finally:
            source.close()
    finally:
        torch.set_num_threads(threads)
    student.load_state_dict(best_state)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    result = DistillResult(student, kind, before, best, rounds, sum(len(x) for x in xs),
                           time.perf_counter() - wall)
    log(result.summary())
    return result

