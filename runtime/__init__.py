"""The on-device runtime: `load("policy.bitrl").act(obs)`. Imports numpy and, on load, the TVM runtime only.

Loading an artifact runs its compiled code (lib.so); every check (limits, hashes, the signature when trusted keys
are configured: `load(path, trusted_keys=[...])` or BITRL_TRUSTED_KEYS, machine, specs) runs before (docs/security.md).
Nothing here imports torch, the TVM compiler, or any other part of bitrl_compile; `cryptography` only to check or
make a signature.
"""

from .artifact import ArtifactError, read_artifact, sign_artifact, write_artifact
from .interface import PolicyLike
from .policy import Policy, load

__all__ = ["ArtifactError", "Policy", "PolicyLike", "load", "read_artifact", "sign_artifact", "write_artifact"]
