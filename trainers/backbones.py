"""The trainer's frozen backbones, the observation normalisation they start with, and the quantized layers.

A backbone has `dim` and `__call__(obs_batch, update=False) -> float32 features [B, dim]`; it is frozen, so the
rollout stores features and the PPO update never runs it again:
    ObsNormalizer     no backbone: the features are the observations, normalised with running statistics
                      (updated during rollouts, saved in the checkpoint, baked into the artifact's manifest as
                      "input.normalize"). The heads are then the whole actor and critic: plain PPO (fp32) or
                      QAT (ternary heads, `--heads-bits 1.58`).
    TorchBackbone     any frozen torch module, with the observation statistics it was trained with. From a
                      policy file it is the policy's torso (every Linear but the last, each a ternary BitLinear
                      with int8 activations, as compiled). A BitNet transformer plugs in here the same way.
    CompiledBackbone  a compiled artifact whose manifest output kind is "features" (`bitrl-compile MODEL
                      --features`): the forward runs in the TVM runtime (`policy.features(obs)`, numpy, no torch),
                      natively or, for a rasp4 artifact, in an aarch64 Python under qemu. The heads train in torch.
TorchBackbone and CompiledBackbone are also `bitrl_compile.runtime.PolicyLike` (manifest, forward, act, features,
close); their `act` raises ValueError, as the runtime does for a "features" artifact.
To plug in another backbone (e.g. a BitNet model): `TorchBackbone(module, dim, stats)` for any frozen module that
maps [B, *obs] float32 to [B, dim], or any object with `dim` and `__call__(obs, update=False) -> features`.

Quantized layers (`QuantLinear`, `quantize_`) are fp32 (bits 32), int8 weights and activations (8) or ternary
BitLinear (1.58), quantized with the straight-through estimator from `bitrl_compile.quant`; the torso of a policy
file and the trainer's heads use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitrl_compile.frontends import MLPPolicy
from bitrl_compile.quant import bitlinear_ste, quantize_activations_ste, quantize_weight_int8_ste
from bitrl_compile.runtime.policy import normalization, postprocess
from bitrl_compile.runtime.policy import normalize as normalize_np

HEAD_BITS = (32.0, 8.0, 1.58)


# ------------------------------------------------------------------------------------------------ quantized layers

class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weights and input, straight-through gradients (same parameters and keys).

    bits 1.58: BitLinear (ternary absmean weights, int8 absmax activations), exactly what the compiler emits.
    bits 8:    int8 per-output-channel weights, int8 per-row activations.    bits 32: plain float.
    """

    bits: float = 32.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 1.58:
            return bitlinear_ste(x, self.weight, self.bias)
        if self.bits == 8:
            return nn.functional.linear(quantize_activations_ste(x), quantize_weight_int8_ste(self.weight), self.bias)
        return super().forward(x)


def quantize_(module: nn.Module, bits: float) -> nn.Module:
    """Switch every nn.Linear of `module` to QuantLinear(bits) in place (parameters and optimizer state carry over)."""
    if bits not in HEAD_BITS:
        raise ValueError(f"heads bits must be one of {HEAD_BITS}, got {bits}")
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.__class__ = QuantLinear
            m.bits = float(bits)
    return module


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------------------------ observations

class RunningMeanStd:
    """Running mean and variance (parallel algorithm of Chan et al.), as in SB3's VecNormalize."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean, self.var, self.count = np.zeros(shape, np.float64), np.ones(shape, np.float64), 1e-4

    def update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_count = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total


def normalize(obs: np.ndarray, stats: dict | None) -> np.ndarray:
    """clip((x - mean) / sqrt(var + eps)) in float32, the same operations as the runtime's Policy."""
    return normalize_np(np.asarray(obs, np.float32).reshape(len(obs), -1), normalization({"normalize": stats}))


class ObsNormalizer:
    """No backbone: features = the observations, normalised with running statistics (or frozen given ones)."""

    def __init__(self, obs_dim: int, enabled: bool = True, clip: float = 10.0, frozen: dict | None = None):
        self.dim, self.enabled, self.clip, self.eps = obs_dim, enabled or frozen is not None, clip, 1e-8
        self.rms = RunningMeanStd((obs_dim,))
        self.frozen = frozen is not None
        if frozen is not None:
            self.rms.mean, self.rms.var = np.asarray(frozen["mean"], np.float64), np.asarray(frozen["var"], np.float64)
            self.clip, self.eps = frozen.get("clip"), float(frozen.get("eps", 1e-8))

    def stats(self) -> dict | None:
        if not self.enabled:
            return None
        return {"mean": self.rms.mean.tolist(), "var": self.rms.var.tolist(), "eps": self.eps, "clip": self.clip}

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        if update and self.enabled and not self.frozen:
            self.rms.update(np.asarray(obs, np.float64).reshape(len(obs), -1))
        return normalize(obs, self.stats())


# ------------------------------------------------------------------------------------------------ backbones

class TorchBackbone:
    """A frozen torch module (e.g. a ternary BitLinear torso) applied to normalised observations."""

    def __init__(self, module: nn.Module, dim: int, stats: dict | None, source: str = "torch"):
        self.module, self.dim, self.stats, self.source = module.eval(), dim, stats, source
        for p in module.parameters():
            p.requires_grad_(False)
        layers = linears(module)
        self.manifest = {"input": {"shape": [layers[0].in_features] if layers else None, "preprocess": "none",
                                   "normalize": stats},
                         "output": {"kind": "features", "dim": dim}}

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(normalize(obs, self.stats))).numpy()

    def features(self, obs) -> np.ndarray:
        """Features [D] for one (vector) observation or [B, D] for a batch."""
        x = np.asarray(obs, np.float32)
        return self(x[None])[0] if x.ndim == 1 else self(x)

    forward = features  # a backbone's raw output is its features

    def act(self, obs, deterministic: bool = True, rng: np.random.Generator | None = None):
        """A backbone has no actions: the runtime's ValueError for output kind "features"."""
        return postprocess(self.manifest["output"], self.forward(obs), deterministic, rng, self.source)

    def close(self) -> None:
        """Nothing to release (the module belongs to the caller)."""


class CompiledBackbone:
    """A compiled "features" artifact: the forward runs in the TVM runtime (numpy in, numpy out; no torch)."""

    def __init__(self, policy, source: str):
        spec = policy.manifest["output"]
        if spec.get("kind") != "features":
            raise ValueError(f"{source}: the artifact's output kind is {spec.get('kind')!r}, not \"features\"; "
                             "compile a backbone with `bitrl-compile MODEL --features`")
        self.policy, self.dim, self.source, self.manifest = policy, int(spec["dim"]), source, policy.manifest

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        return self.features(obs)

    def features(self, obs) -> np.ndarray:
        return np.asarray(self.policy.features(np.asarray(obs, np.float32)), np.float32)

    def forward(self, obs) -> np.ndarray:
        return self.policy.forward(obs)

    def act(self, obs, deterministic: bool = True, rng: np.random.Generator | None = None):
        """A backbone has no actions: the runtime's ValueError for output kind "features"."""
        return self.policy.act(obs, deterministic=deterministic, rng=rng)

    def close(self) -> None:
        self.policy.close()


def torso_module(policy: MLPPolicy, bits: float = 1.58) -> tuple[nn.Sequential, int]:
    """A policy's torso: every Linear but the last, each followed by the activation; frozen BitLinear copies."""
    layers = linears(policy)
    if len(layers) < 2:
        raise ValueError("the policy has a single Linear layer; it has no torso to use as a backbone")
    act = type(next(m for m in policy.net if not isinstance(m, nn.Linear)))
    mods: list[nn.Module] = []
    for lin in layers[:-1]:
        copy = nn.Linear(lin.in_features, lin.out_features)
        copy.load_state_dict(lin.state_dict())
        mods += [copy, act()]
    torso = quantize_(nn.Sequential(*mods), bits)
    return torso, layers[-2].out_features


def load_backbone(path):
    """A compiled "features" artifact (runtime; aarch64 ones under qemu), a BitNet backbone checkpoint folder
    (`bitrl_compile.bitnet`, ternary forward in torch) or a policy file's ternary torso."""
    path = str(path)
    if Path(path).is_dir():
        from bitrl_compile import bitnet

        return bitnet.FrozenBitNet(bitnet.load_backbone(path), f"BitNet backbone {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and path.endswith(".bitrl"):
        from bitrl_compile.devices import open_policy

        return CompiledBackbone(open_policy(path), path)
    from bitrl_compile.frontends import load_policy

    loaded = load_policy(path)
    if not isinstance(loaded.module, MLPPolicy) or loaded.input.get("preprocess", "none") != "none":
        raise ValueError(f"{path}: a backbone from a policy file must be an MLP on plain vector observations "
                         f"(got {loaded.description or loaded.source})")
    torso, dim = torso_module(loaded.module)
    return TorchBackbone(torso, dim, loaded.input.get("normalize"), f"torso of {path}")
