"""The on-device runtime: `load("policy.bitrl").act(obs)`. Imports numpy and, on load, the TVM runtime only.

Nothing here imports torch, the TVM compiler, or any other part of bitrl_compile.
"""

from .artifact import ArtifactError, read_artifact, write_artifact
from .interface import PolicyLike
from .policy import Policy, load

__all__ = ["ArtifactError", "Policy", "PolicyLike", "load", "read_artifact", "write_artifact"]
