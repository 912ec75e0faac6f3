"""A distillation student's input standardisation, folded into its first layer.

A ternary layer's neuron sees its inputs through weights in {-1, 0, +1} times one scale: on a policy with few
observation features its direction is one of a handful (3 inputs: 13 up to sign), and which ones depends on the
features' units. Pendulum's angular velocity spans ±8 where cos and sin span ±1; CartPole's pole angle a few
hundredths where its cart position spans ±2. In raw units a ternary first layer weighs them alike; after
standardisation (each feature's mean and standard deviation over the states the teacher visits) it weighs them by
their spread, which is what a network trained on normalised observations (SB3's VecNormalize) sees.

`fold` rewrites the teacher exactly (in float64, then float32: the outputs agree to float rounding): layer 0
becomes W diag(s) with bias b + W m, and the input spec gets {"mean": m, "var": s², "clip": null}, the statistics
the runtime applies (as VecNormalize's) before the first quantisation. Measured on RL-Zoo PPO Pendulum (64x64 tanh,
no VecNormalize; 150 s of distillation): seed 0 -307.8 raw, -130.8 standardised (fp32 -130.9); seed 3 -157.6 raw,
-145.4 standardised (fp32 -144.2). Plain PTQ is not helped (-1054 vs -1080): the student's training needs it.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from bitrl_compile.trainers.export import layers

EPS = 1e-8
FLOOR = 0.01  # a feature's standard deviation is at least this share of the widest one's (a near-constant
# feature, e.g. a leg contact never seen, would otherwise be divided by almost nothing, and one off-distribution
# value would fill the first layer's int8 range)


def applies(loaded, mlp: bool, image: bool, keys) -> bool:
    """A flat-observation MLP policy (frontends' MLPPolicy: `mlp`, its Linears with biases) without observation
    statistics of its own."""
    return (mlp and not image and keys is None and not loaded.input.get("normalize")
            and len(loaded.input.get("shape", ())) == 1)


def fold(loaded, states: np.ndarray):
    """`loaded` (a LoadedPolicy, see `applies`) with layer 0 taking standardised states; `states` (n, features)
    are raw observations the teacher visits. The module is a copy; the original is left as it is."""
    x = np.asarray(states, np.float64).reshape(len(states), -1)
    mean, std = x.mean(0), x.std(0)
    std = np.maximum(std, max(FLOOR * float(std.max()), 1e-3))
    mean32, var32 = mean.astype(np.float32), np.maximum(std * std - EPS, 0.0).astype(np.float32)
    return fold_to(loaded, {"mean": mean32.tolist(), "var": var32.tolist(), "eps": EPS, "clip": None})


def fold_to(loaded, norm: dict):
    """`loaded` (no statistics of its own) with layer 0 taking observations standardised by `norm` (an input
    spec's "normalize" without clip): the same function of the raw observations, to float rounding."""
    if loaded.input.get("normalize") or norm.get("clip") is not None:
        raise ValueError("standardize: the policy has observation statistics of its own, or the statistics clip; "
                         "only a policy on raw observations can take standardised ones exactly")
    mean = np.asarray(norm["mean"], np.float32).astype(np.float64)
    scale = np.sqrt(np.asarray(norm["var"], np.float32) + np.float32(norm.get("eps", EPS))).astype(np.float64)
    module = copy.deepcopy(loaded.module)
    layer = layers(module)[0]
    with torch.no_grad():  # what the runtime divides by is float32's sqrt(var + eps): the fold uses that
        w = layer.weight.double()
        layer.bias.copy_((layer.bias.double() + w @ torch.from_numpy(mean)).float())
        layer.weight.copy_((w * torch.from_numpy(scale)).float())
    return dataclasses.replace(loaded, module=module, input={**loaded.input, "normalize": dict(norm)})
