"""The one interface of "something that acts on observations", which every policy-like object implements:

    runtime.Policy                   a policy.bitrl loaded for this machine (runtime/policy.py)
    devices.EmulatedPolicy           an artifact of another architecture run under qemu (devices/emulated.py)
    trainers.backbones.*Backbone     the frozen backbone a trainer computes features with

Code that takes a policy (evaluation, benchmarks, trainers, the CLI) types it as `PolicyLike` and uses only
these members; it never asks which class it got. A structural `typing.Protocol`: implementers need not import it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PolicyLike(Protocol):
    manifest: dict          # the artifact's manifest (input/output specs, target, layers)

    def forward(self, obs) -> np.ndarray:
        """The network's raw output (logits, Q-values, action mean or features) for one observation or a batch."""

    def act(self, obs, state=None, episode_start=None, deterministic: bool = True,
            rng: np.random.Generator | None = None) -> Any:
        """Action(s) the environment accepts, for one observation or a batch; a recurrent policy's are (actions,
        next state), given its state and where episodes start. Pass deterministic and rng by keyword."""

    def features(self, obs) -> np.ndarray:
        """A backbone's output features; a ValueError for a policy whose output is actions."""

    def close(self) -> None:
        """Release what the policy holds (the compiled module, a child process); idempotent."""
