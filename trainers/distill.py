"""Distillation of an fp32 MLP or CNN policy into its ternary version: recovery that keeps the algorithm.

    bitrl-compile finetune policy.zip --env CartPole-v1 [--method distill]     # writes policy-ternary.safetensors
    bitrl-compile finetune cnn.zip --env PixelEnv-v0 --method distill          # a CnnPolicy: cnn-ternary.pt2
    from bitrl_compile.trainers import distill; distill.distill(loaded, "CartPole-v1", "student.safetensors")

The student is the teacher's own MLP (same layers, activation, observation statistics and output spec), initialised
from its weights, whose every Linear runs as the compiler's BitLinear in the forward pass (`quant.py`: absmean
ternary weights, per tensor or per output channel, absmax int8 activations per row) with straight-through
gradients. The file written holds the student's latent float weights: the compiler ternarizes them with the same
math, so the artifact computes what was trained (held-out agreement is measured with the numpy reference,
`export.reference_forward`, which the artifact matches; a CNN's rounds with its ternary forward pass, the same
arithmetic).

A flat MLP on raw observations (no statistics of its own) gets a student that takes them standardised: the mean
and spread of the held-out teacher states folded exactly into layer 0 and written as the file's observation
statistics (trainers/standardize.py: a ternary first layer weighs its inputs alike, in whatever units they come).

Convolutional policies (SB3's CnnPolicy: NatureCNN, its linear and the head; any module of Conv2d/Linear layers
called in definition order) distil the same way: every Conv2d runs as the compiler's BitConv2d
(`quant.bitconv2d_ste`: per-sample int8 activations over C x H x W, the convolution on the integers, bit-exact with
`quant.bitconv2d_reference` in the forward pass), every Linear as BitLinear, the layers numbered as the compiler
numbers them (`export.layers`: --int8-layers 0 is the first convolution). Image observations are kept as the
environment's uint8 frames (a quarter of float32's memory; at most 256 MB of them) and divided by 255 per batch,
as the artifact's "image" preprocessing does. A CNN student is written as a torch.export program (.pt2,
`export.save_program`: the frontends load any .pt2, where a safetensors file needs an "arch" they know).

States (DAgger): rollouts of vector environments where each step is taken by the teacher with probability beta and by
the current student otherwise (beta halves every round, 1 in the first), with a little exploration noise (a random
action with probability `epsilon`, or Gaussian noise of epsilon times the half range of a Box). Every visited state is
kept with the teacher's output as its target. Held-out: `heldout` states spread evenly over whole deterministic
teacher episodes of other seeds (`Rollouts.whole_episodes`): the first 256 steps of 8 episodes, as before, left
out a LunarLander's landings, and an RL-Zoo DQN's student picked on them at 86 % held-out agreement kept 50-61 %
of compile's (whole episodes).

Loss by output kind (the output spec):
    logits (stochastic discrete)     KL(teacher || student) of the softmax distributions
    q_values (DQN)                   MSE of the Q-values over the teacher's Q scale (their std), MSE of the
                                     Q-values centred per state over the teacher's typical gap (its median), and a
                                     ranking hinge: the teacher's argmax must beat every other action by `margin`
                                     times the teacher's own gap on that state
    continuous (TD3, SAC, PPO Box)   MSE of the pre-squash output (SAC: the mean; TD3: before its tanh) to the
                                     teacher's clamped to where the squash still moves the action (+-3 for tanh, the
                                     bounds + 10 % for clip); where the teacher is past that, only a student short of
                                     it costs (one-sided)
The run stops at the agreement target on held-out teacher states, or at the time budget, and returns the best
student it saw (by held-out agreement, then loss). Agreement is fidelity.py's rule: for discrete outputs the
share of the teacher's stakes (its best-two Q gap, or probability gap) on states where the argmax agrees; for
continuous ones every action value within 5 % of the Box's range of the teacher's.

Plain agreement (DistillArgs.rule "plain", `compile --keep-rule plain`): every state counts one, the teacher's
near-ties too, which a barely trained teacher has many of. The run then stops and picks its best on the plain
share, and the loss (logits and Q-values alike) adds the ranking hinge with a floor: the teacher's argmax must lead
every other action by at least `floor` (0.3) times the teacher's median best-two gap, so that a state the teacher
barely decides is decided its way with room for the ternary rounding. Measured (tests/test_distill_cnn.py, an SB3
PPO CnnPolicy on 36x36x3 pixel CartPole): one DAgger round takes SB3's predict from 54.5 % (PTQ) to 99.8 % plain.

Dict observations with vector keys (SB3's MultiInputPolicy, an MLP on the flat row of runtime/specs.py) distil as
an MLP: each batch of the environment's dicts flattened in the manifest's key order, normalised as one vector.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitrl_compile import fidelity
from bitrl_compile.evaluate import make_env
from bitrl_compile.frontends import MLPPolicy
from bitrl_compile.quant import (
    bitconv2d_ste,
    bitlinear_ste,
    quantize_activations_ste,
    quantize_weight_int8_ste,
)
from bitrl_compile.runtime.policy import flatten_observations
from bitrl_compile.trainers import selection, standardize
from bitrl_compile.trainers.backbones import normalize
from bitrl_compile.trainers.export import (
    check_policy_fits,
    conv_padding,
    layers,
    output_spec,
    reference_forward,
    save_like,
    save_program,
)
from bitrl_compile.trainers.logs import Logger
from bitrl_compile.trainers.rollouts import Rollouts

PLAIN_FLOOR = 0.3  # DistillArgs.floor with rule "plain": a lead of 0.3 median gaps on every state
# reset seeds, + DistillArgs.seed: the held-out states' and the training rollouts', apart from those a measurement
# with the same seed plays (fidelity: seed + i; --keep passes its seed here). Training on reset seeds seed.. made
# --keep measure an RL-Zoo A2C LunarLander student on starts it was trained on: 98.8 % plain agreement there,
# 94.1-96.4 % on three other sets of seeds
HELDOUT_SEEDS, TRAIN_SEEDS = 1_000_003, 3_000_017


def cpu_clock() -> float:
    """The budget's clock: CPU seconds of this process (its threads; the rollouts' environments step in it).
    Wall time would train less on a loaded machine (a bench next to other jobs, CI), so the same budget would give
    a different student."""
    return time.process_time()


@dataclass
class DistillArgs:
    seed: int = 0
    budget_s: float = 180.0          # CPU seconds of this process (`cpu_clock`: torch_threads 1 = one core),
                                     # collection included; CPU time, so a loaded machine gets the same training
    agreement: float = 0.99          # stop when held-out agreement reaches this
    rule: str = "weighted"           # discrete actions: the agreement that stops and picks the best student:
                                     # "weighted" by the teacher's stakes (fidelity.shared) or "plain" (every state
                                     # counts one, near-ties too: what a comparison with SB3's predict counts)
    floor: float | None = None       # discrete: the least lead of the teacher's argmax over every other action,
                                     # in the teacher's median best-two gap; None: 0.3 with rule "plain", else 0
    per_channel: bool = False        # one weight scale per output channel (compile with --per-channel then)
    int8_layers: tuple[int, ...] = ()  # Linears (0-based) trained as int8 (compile with --int8-layers then)
    num_envs: int = 8
    steps_per_round: int = 128       # vector steps per round: num_envs * steps_per_round states
    updates_per_round: int = 200
    batch_size: int = 256
    learning_rate: float = 1e-3      # Adam; decays linearly to a tenth over the budget (time or rounds); a
                                     # recurrent student's is 3 times this (distill_recurrent.LR_FACTOR)
    max_rounds: int = 1000
    epsilon: float = 0.1             # exploration noise of the rollouts
    heldout: int = 2048              # held-out teacher states
    margin: float = 0.5              # q_values: fraction of the teacher's gap its argmax must keep
    max_states: int = 200_000        # aggregated states kept (the oldest go first)
    calibrate: bool = True           # scale and bias correction of every layer before training (`calibrate_`)
    standardize: bool = True         # a flat MLP without observation statistics: the student takes standardised
                                     # states, the statistics folded into layer 0 (trainers/standardize.py)
    select_episodes: int = 0         # > 0 (MLP policies): the student returned is, of the `candidates` best by
                                     # held-out agreement, the first (best agreement first) whose score (R - R_random)
                                     # / (R_fp32 - R_random) on this many deterministic episodes of its own reaches
                                     # `select_target` (numpy reference; reset seeds selection.SEED + seed + i, none of
                                     # an evaluation's), else the one with the highest return; the last
                                     # `select_share` of the budget is theirs. Where agreement and return disagree
                                     # (a DQN whose action gaps are near the rounding), the return decides
    select_target: float = 0.98
    candidates: int = 4
    select_share: float = 0.05
    torch_threads: int = 1
    out: str | None = None           # folder for progress.csv (round, name, value); None: nothing written


@dataclass
class DistillResult:
    student: nn.Module               # latent float weights; ternary in the forward pass (an MLPPolicy or a CNN)
    kind: str                        # "logits", "q_values" or "continuous"
    agreement_before: float          # held-out agreement of the plain ternary (PTQ) policy
    agreement_after: float
    rounds: int
    states: int
    seconds: float
    config: dict | None = None       # the written file's config (None when no path was given)
    policy: Any = None               # the student as a LoadedPolicy: its input spec (standardisation) included

    def summary(self) -> str:
        return (f"distill ({self.kind}): held-out action agreement {100 * self.agreement_before:.1f} % (PTQ) -> "
                f"{100 * self.agreement_after:.1f} %, {self.rounds} rounds, {self.states:,} states, "
                f"{self.seconds:.0f} s")


def output_kind(spec: dict) -> str:
    """The loss family of an output spec: "q_values", "logits" or "continuous"."""
    if spec.get("kind") == "discrete":
        return "q_values" if spec.get("outputs") == "q_values" else "logits"
    if spec.get("kind") == "continuous":
        return "continuous"
    raise ValueError(f"output kind {spec.get('kind')!r} has no action to distil; give a policy (discrete or "
                     "continuous actions), not a backbone")


def ste_forward(mlp: nn.Module, x: torch.Tensor, per_channel: bool = False, int8_layers=()) -> torch.Tensor:
    """The MLP with every Linear as the compiler's BitLinear (ternary weights, int8 activations), straight-through;
    the Linears numbered in `int8_layers` (0-based) with int8 weights instead (mixed precision). Any other module
    (a CNN) runs with every Linear and Conv2d so (`_ternary`)."""
    if not isinstance(mlp, MLPPolicy):
        with _ternary(mlp, per_channel, int8_layers):
            return mlp(x)
    i = 0
    for m in mlp.net:
        if isinstance(m, nn.Linear):
            x, i = _bitlinear(m, x, per_channel, int8=i in int8_layers), i + 1
        else:
            x = m(x)
    return x[:, 1:] + x[:, :1] if getattr(mlp, "shared_row", False) else x


def _bitlinear(m: nn.Linear, x: torch.Tensor, per_channel: bool = False, bias: bool = True,
               int8: bool = False) -> torch.Tensor:
    if int8:
        return nn.functional.linear(quantize_activations_ste(x), quantize_weight_int8_ste(m.weight),
                                    m.bias if bias else None)
    return bitlinear_ste(x, m.weight, m.bias if bias else None, per_channel)


@contextlib.contextmanager
def _ternary(module: nn.Module, per_channel: bool, int8_layers):
    """Within: `module`'s Linear and Conv2d layers (export.layers' numbering) run as the compiler's layers."""
    found = layers(module)
    try:
        for i, m in enumerate(found):
            m.forward = functools.partial(_layer, m, per_channel=per_channel, int8=i in int8_layers)
        yield module
    finally:
        for m in found:
            m.__dict__.pop("forward", None)


def _layer(m: nn.Module, x: torch.Tensor, per_channel: bool = False, bias: bool = True,
           int8: bool = False) -> torch.Tensor:
    if isinstance(m, nn.Conv2d):
        return bitconv2d_ste(x, m.weight, m.bias if bias else None, tuple(m.stride), conv_padding(m), per_channel,
                             int8)
    return _bitlinear(m, x, per_channel, bias, int8)


class _Reached(Exception):
    """Stops a forward pass at the layer whose input was wanted."""


def _calibrate_layers_(student: nn.Module, teacher: nn.Module, x: torch.Tensor, per_channel: bool,
                       int8_layers) -> None:
    """calibrate_ for any module of Linear/Conv2d layers (a CNN): the teacher's layer outputs from hooks, each
    student layer's input from its own ternary forward pass stopped there; a convolution's factor and bias per
    output channel over every sample and position."""
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in layers(teacher)]
    try:
        teacher(x)
    finally:
        for hook in hooks:
            hook.remove()
    for index, (ms, h) in enumerate(zip(layers(student), outputs)):
        seen: list[torch.Tensor] = []

        def reached(_m, inputs, seen=seen):
            seen.append(inputs[0])
            raise _Reached

        hook = ms.register_forward_pre_hook(reached)
        try:
            ste_forward(student, x, per_channel, int8_layers)
        except _Reached:
            pass
        finally:
            hook.remove()
        z = _layer(ms, seen[0], per_channel, bias=False, int8=index in int8_layers)
        dims = (0,) if z.ndim == 2 else (0, 2, 3)
        zm, hm = z.mean(dims, keepdim=True), h.mean(dims, keepdim=True)
        zc, hc = z - zm, h - hm
        c = float((zc * hc).sum() / (zc * zc).sum().clamp(min=1e-12)) if len(z) > 1 else 1.0
        c = min(max(c, 0.1), 10.0) if math.isfinite(c) else 1.0
        ms.weight.mul_(c)
        if ms.bias is not None:
            ms.bias.copy_((hm - c * zm).reshape(-1))


def calibrate_(student: nn.Module, teacher: nn.Module, x: torch.Tensor, per_channel: bool = False,
               int8_layers=()) -> None:
    """Scale and bias correction, layer by layer, before training: each ternary layer's output (on the student's
    own inputs) is fitted to the fp32 layer's by one factor c on the weights (the ternary codes do not change, the
    scale gamma becomes c * gamma) and a new bias per output (least squares). Plain ternarization can shrink a
    network's outputs several-fold (a DQN's Q-values of 98 came out as 33); Adam's small steps would take thousands
    of updates to undo that."""
    if not isinstance(student, MLPPolicy):
        with torch.no_grad():
            _calibrate_layers_(student, teacher, x, per_channel, int8_layers)
        return
    with torch.no_grad():
        xs, xt = x, x
        index = -1
        for ms, mt in zip(student.net, teacher.net):
            if not isinstance(ms, nn.Linear):
                xs, xt = ms(xs), mt(xt)
                continue
            index += 1
            int8 = index in int8_layers
            if ms.out_features != mt.out_features:  # a shared-row head (frontends.shared_row): left as it is
                break
            z = _bitlinear(ms, xs, per_channel, bias=False, int8=int8)
            h = mt(xt)
            zc, hc = z - z.mean(0), h - h.mean(0)
            c = float((zc * hc).sum() / (zc * zc).sum().clamp(min=1e-12)) if len(z) > 1 else 1.0
            c = min(max(c, 0.1), 10.0) if math.isfinite(c) else 1.0
            ms.weight.mul_(c)
            ms.bias.copy_(h.mean(0) - c * z.mean(0))
            xs, xt = _bitlinear(ms, xs, per_channel, int8=int8), h


# ------------------------------------------------------------------------------------------------ losses

class Loss:
    """The distillation loss of an output kind; the scales come from the teacher's outputs on held-out states."""

    def __init__(self, kind: str, spec: dict, teacher_heldout: np.ndarray, margin: float, floor: float = 0.0):
        self.kind, self.margin, self.floor = kind, margin, floor
        t = teacher_heldout.astype(np.float64)
        if kind in ("q_values", "logits") and t.shape[1] > 1:
            top2 = np.sort(t, axis=1)[:, -2:]
            self.q_scale = max(float(t.std()), 1e-6)
            self.gap_scale = max(float(np.median(top2[:, 1] - top2[:, 0])), 1e-6)
        if kind == "continuous":
            shape = int(np.prod(spec["shape"]))
            low = torch.as_tensor(np.asarray(spec["low"], np.float32).reshape(shape))
            high = torch.as_tensor(np.asarray(spec["high"], np.float32).reshape(shape))
            if spec.get("squash") == "tanh":
                self.lo, self.hi, self.scale = torch.full_like(low, -3.0), torch.full_like(high, 3.0), 1.0
            else:
                span = torch.where(torch.isfinite(high - low), high - low, torch.ones_like(low))
                self.lo, self.hi = low - 0.1 * span, high + 0.1 * span
                self.scale = torch.clamp(span / 2, min=1e-6)

    def __call__(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "logits":
            log_pt = torch.log_softmax(t, 1)
            kl = (log_pt.exp() * (log_pt - torch.log_softmax(s, 1))).sum(1).mean()
            return kl + self.hinge(s, t) if self.floor > 0 and t.shape[1] > 1 else kl
        if self.kind == "continuous":
            # one-sided where the teacher saturates: past the clamp its way costs nothing, the other way the full
            # distance (clamping the student too left no gradient where it saturated the wrong way: an RL-Zoo
            # TD3 MountainCarContinuous, pre-tanh outputs -22..129, stayed at 58.8 % agreement for 180 s)
            diff = s - torch.clamp(t, self.lo, self.hi)
            diff = torch.where(t >= self.hi, torch.clamp(diff, max=0.0), diff)
            diff = torch.where(t <= self.lo, torch.clamp(diff, min=0.0), diff)
            return (diff / self.scale).pow(2).mean()
        mse = ((s - t) / self.q_scale).pow(2).mean()
        centred = ((s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))) / self.gap_scale
        return mse + centred.pow(2).mean() + self.hinge(s, t)

    def hinge(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ranking term: the teacher's argmax must lead every other action by `margin` times the teacher's own
        gap on that state, and by at least `floor` times its median gap (so that a near-tie, which the teacher
        barely decides, is decided the teacher's way with room for the student's rounding)."""
        best = t.argmax(1, keepdim=True)
        top2 = t.topk(2, dim=1).values
        need = torch.clamp(self.margin * (top2[:, :1] - top2[:, 1:]), min=self.floor * self.gap_scale)
        lead = s.gather(1, best) - s                                             # [B, n]: 0 at the argmax itself
        others = torch.ones_like(s, dtype=torch.bool).scatter_(1, best, False)
        return ((torch.relu(need - lead) / self.gap_scale).pow(2) * others).sum(1).mean()


def agreement(spec: dict, student_out: np.ndarray, teacher_out: np.ndarray, rule: str = "weighted") -> float:
    """How far the student acts like the teacher, by fidelity.py's rule (the one compile reports): for discrete
    outputs the agreement weighted by the teacher's stakes (its best-two gap: a state where the teacher hardly
    prefers one action counts little), or with rule "plain" the share of states where the argmax agrees; for
    continuous ones the share of states within 5 % of the action range."""
    return fidelity.shared(fidelity.compare(spec, student_out, teacher_out), rule)


def floor_of(args: DistillArgs) -> float:
    """The ranking floor of `args` (DistillArgs.floor, or its default by rule)."""
    fidelity.check_rule(args.rule)
    return args.floor if args.floor is not None else (PLAIN_FLOOR if args.rule == "plain" else 0.0)


# ------------------------------------------------------------------------------------------------ states

def _inputs(states: np.ndarray, image: bool) -> np.ndarray:
    """Stored states -> the network's float32 input: kept uint8 frames / 255 (the artifact's "image"), else as is."""
    return states.astype(np.float32) / np.float32(255.0) if image else states


# ------------------------------------------------------------------------------------------------ the run

def check_distillable(loaded, env_id: str, name: str = "policy") -> str:
    """Raise ValueError unless `loaded` is an MLP policy for env_id with plain vector observations, or a
    convolutional one (plain Conv2d layers) on its images or plain observations; its kind."""
    if loaded.input.get("recurrent"):
        raise ValueError(f"{name}: distillation of a recurrent (LSTM) policy is not supported yet as a file (no "
                         "format holds a recurrent student); compile it with --env ID --keep 0.98, which distils it "
                         "in memory (trainers/distill_recurrent.py)")
    if loaded.input.get("kind") == "dict":
        _check_dict_fits(loaded, env_id, name)
    else:
        check_policy_fits(loaded, env_id, name, convolutional=True)
    convs = [m for m in layers(loaded.module) if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv_padding(conv, name)
    if convs:
        if loaded.input.get("preprocess", "none") not in ("none", "image") or loaded.input.get("normalize"):
            raise ValueError(f"{name}: distillation of a convolutional policy needs images (preprocess \"image\") "
                             f"or plain observations without statistics, got preprocess "
                             f"{loaded.input.get('preprocess')!r}, normalize {bool(loaded.input.get('normalize'))}")
    elif loaded.input.get("preprocess", "none") != "none":
        raise ValueError(f"{name}: distillation needs plain vector observations (preprocess \"none\"), got "
                         f"{loaded.input.get('preprocess')!r}")
    return output_kind(loaded.output)


def _check_dict_fits(loaded, env_id: str, name: str) -> None:
    """A Dict-observation policy (SB3's MultiInputPolicy): env_id's observations must be its keys and shapes, its
    actions the policy's; ValueError (one line) otherwise."""
    env = make_env(env_id)
    try:
        obs, _ = env.reset(seed=0)
        action_space = env.action_space
    finally:
        env.close()
    try:
        flatten_observations(loaded.input, obs)
    except ValueError as e:
        raise ValueError(f"{name}: {env_id}'s observations do not fit the policy ({str(e).splitlines()[0]}); give "
                         "the environment it was trained on") from None
    want = output_spec(action_space)
    if loaded.output["kind"] != want["kind"] or loaded.output.get("n") != want.get("n"):
        raise ValueError(f"{name}: its actions ({loaded.output['kind']}, {loaded.output.get('n', '')}) do not match "
                         f"{env_id}'s {action_space}; give the environment it was trained on")


def _copies(module: nn.Module, start: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): float32 copies, the teacher frozen, the student (from `start` when given) trainable."""
    teacher = copy.deepcopy(module).float().eval()
    student = copy.deepcopy(start if start is not None else module).float().train()
    for p in student.parameters():
        p.requires_grad_(True)
    return teacher, student


def distill(loaded, env_id: str, path: str | Path | None = None, args: DistillArgs | None = None,
            log=lambda s: print(s, file=sys.stderr), start=None) -> DistillResult:
    """Distil the fp32 MLP policy `loaded` (a LoadedPolicy) into its ternary version on env_id's states; write it
    to `path` (a policy .safetensors with the teacher's specs and "trained": {"recovery": "distill", ...}). The
    student starts from the teacher's weights, or from `start` (an earlier result's `.policy`: a student of the same
    architecture with its input spec). The result's `.policy` is the student with its input spec, which differs
    from the teacher's when it takes standardised observations (`args.standardize`)."""
    args = args or DistillArgs()
    started, wall = cpu_clock(), time.perf_counter()
    kind = check_distillable(loaded, env_id)
    mlp = isinstance(loaded.module, MLPPolicy)
    if path is not None and not mlp and Path(path).suffix != ".pt2":
        raise ValueError(f"{path}: a convolutional student is written as a torch.export program; give a path ending "
                         "in .pt2")
    image = loaded.input.get("preprocess", "none") == "image"
    keys = loaded.input if loaded.input.get("kind") == "dict" else None  # Dict observations: flattened rows
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    standardized = start is not None and start.input.get("normalize") != loaded.input.get("normalize")
    if standardized:  # the teacher in the earlier student's input space
        if not start.input.get("normalize"):
            raise ValueError("distill: `start` takes raw observations where the teacher has statistics; give an "
                             "earlier distillation's `.policy` of this teacher")
        loaded = standardize.fold_to(loaded, start.input["normalize"])
    spec, stats = loaded.output, loaded.input.get("normalize")
    teacher, student = _copies(loaded.module, None if start is None else start.module)

    def teacher_out(x: np.ndarray) -> np.ndarray:  # states as stored (frames: uint8)
        with torch.no_grad():
            return teacher(torch.from_numpy(_inputs(x, image))).numpy()

    def student_out(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return ste_forward(student, torch.from_numpy(_inputs(x, image)), args.per_channel,
                               args.int8_layers).numpy()

    def student_ref(x: np.ndarray) -> np.ndarray:  # the numpy reference: exactly what the artifact computes
        return reference_forward(dataclasses.replace(loaded, module=student, input={**loaded.input, "normalize": None}),
                                 per_channel=args.per_channel, int8_layers=args.int8_layers)(x)

    def heldout_agreement() -> float:
        return agreement(spec, student_ref(held_x), held_t, args.rule)

    try:
        held_env = Rollouts(env_id, args.num_envs, args.seed + HELDOUT_SEEDS, spec, stats, 0.0, image, not mlp, keys)
        try:
            held_x = held_env.whole_episodes(teacher_out, args.heldout)
        finally:
            held_env.close()
        if args.standardize and start is None and standardize.applies(loaded, mlp, image, keys):
            loaded = standardize.fold(loaded, held_x)  # the same function, its layer 0 on standardised states
            stats, standardized = loaded.input["normalize"], True
            teacher, student = _copies(loaded.module)
            held_x = normalize(held_x, stats)
            log(f"distill: the student takes standardised observations (std {np.sqrt(stats['var']).round(3)})")
        held_t = teacher_out(held_x)
        before = heldout_agreement()
        top = selection.Candidates(args.candidates if args.select_episodes > 0 and mlp else 1)
        top.offer((before, -math.inf), student, 0)  # PTQ, if nothing beats it
        if args.calibrate:
            calibrate_(student, teacher, torch.from_numpy(_inputs(held_x[::2], image)), args.per_channel,
                       args.int8_layers)
        loss_fn = Loss(kind, spec, held_t, args.margin, floor_of(args))

        held_in, held_target = torch.from_numpy(_inputs(held_x, image)), torch.from_numpy(held_t)

        def held_out() -> tuple[float, float]:
            """(agreement, loss) on the held-out states. An MLP's agreement is its numpy reference's; a CNN's is
            its ternary forward pass's (the reference's arithmetic: bit for bit in the convolutions, float rounding
            in the rest), which saves a numpy convolution of every held-out frame per round."""
            with torch.no_grad():
                out = ste_forward(student, held_in, args.per_channel, args.int8_layers)
            loss = loss_fn(out, held_target).item()
            return (heldout_agreement() if mlp else agreement(spec, out.numpy(), held_t, args.rule)), loss

        calibrated, held_loss = held_out()
        top.offer((calibrated, -held_loss), student, 0)
        best = top.best
        training_s = args.budget_s * (1 - args.select_share) if top.size > 1 else args.budget_s
        log(f"distill {kind} policy on {env_id}: PTQ agrees with the fp32 policy on {100 * before:.1f} % of "
            f"{len(held_x)} held-out states, {100 * calibrated:.1f} % after scale/bias calibration; target "
            f"{100 * args.agreement:.1f} %, budget {args.budget_s:.0f} s")
        optimizer = torch.optim.Adam(student.parameters(), lr=args.learning_rate)
        rollouts = Rollouts(env_id, args.num_envs, args.seed + TRAIN_SEEDS, spec, stats, args.epsilon, image, not mlp,
                            keys)
        gen = torch.Generator().manual_seed(args.seed)
        xs, ts = np.zeros((0, *held_x.shape[1:]), held_x.dtype), np.zeros((0, held_t.shape[1]), np.float32)
        max_states = min(args.max_states, max(1, (256 << 20) // held_x[0].nbytes))  # at most 256 MB of states
        rounds = 0
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        logger = Logger(Path(args.out) if args.out else None, False, args)
        logger.scalar("agreement/heldout", before, 0)
        try:
            while best < args.agreement and rounds < args.max_rounds and \
                    cpu_clock() - started < training_s:
                beta = 0.5 ** rounds
                x = rollouts.collect(args.steps_per_round, [teacher_out, student_out], beta)
                xs = np.concatenate([xs, x])[-max_states:]
                ts = np.concatenate([ts, teacher_out(x)])[-max_states:]
                x_all, t_all = torch.from_numpy(xs), torch.from_numpy(ts)
                total = 0.0
                progress = (cpu_clock() - started) / training_s  # the rate decays linearly to 10 %
                for group in optimizer.param_groups:
                    group["lr"] = args.learning_rate * max(0.1, 1.0 - max(progress, rounds / args.max_rounds))
                for _ in range(args.updates_per_round):
                    idx = torch.randint(len(x_all), (min(args.batch_size, len(x_all)),), generator=gen)
                    batch = x_all[idx].float() / 255.0 if image else x_all[idx]  # = _inputs
                    loss = loss_fn(ste_forward(student, batch, args.per_channel, args.int8_layers), t_all[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                rounds += 1
                agree, held_loss = held_out()
                top.offer((agree, -held_loss), student, rounds)
                best = top.best
                for name, value in (("loss/train", total / args.updates_per_round), ("loss/heldout", held_loss),
                                    ("agreement/heldout", agree), ("states", len(xs))):
                    logger.scalar(name, value, rounds)
                log(f"  round {rounds:3d}: {len(xs):7,} states (beta {beta:.2f}), loss {total / args.updates_per_round:.4g}, "
                    f"held-out loss {held_loss:.4g}, agreement {100 * agree:5.1f} % (best {100 * best:5.1f} %), "
                    f"{cpu_clock() - started:4.0f} s CPU")
        finally:
            rollouts.close()
            logger.close()
        chosen = top.entries[0]
        if top.size > 1:
            chosen = selection.by_return(top, loaded, student, env_id, args,
                                         deadline=lambda: cpu_clock() - started >= args.budget_s, log=log)
    finally:
        torch.set_num_threads(threads)
    student.load_state_dict(chosen.state)
    student.eval()
    best = chosen.key[0]
    result = DistillResult(student, kind, before, best, rounds, len(xs), time.perf_counter() - wall,
                           policy=dataclasses.replace(loaded, module=student, recovery="distill"))
    if path is not None:
        trained = {"recovery": "distill", "env": env_id, "teacher": loaded.description, "kind": kind,
                   "per_channel": args.per_channel, "int8_layers": list(args.int8_layers),
                   "agreement_before": round(before, 4),
                   "agreement_after": round(best, 4), "rounds": rounds, "seed": args.seed,
                   "standardized": standardized}
        result.config = save_like(Path(path), loaded, student, trained) if mlp else \
            save_program(Path(path), loaded, student, trained)
    log(result.summary())
    return result
