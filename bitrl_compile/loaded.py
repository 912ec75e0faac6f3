"""What a frontend hands the compiler: a policy loaded into memory, and the error a bad policy file raises.

Floor: imports nothing of the project. Frontends (one module per file family) produce a `LoadedPolicy`;
the pipeline, the trainers and the benchmarks consume it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ModelLoadError(ValueError):
    """A policy file cannot be loaded; the message (one line) names the file, the problem and the fix."""


@dataclass
class LoadedPolicy:
    module: Any                # torch.nn.Module, or None for an ONNX policy
    onnx_model: Any            # onnx.ModelProto, or None
    input: dict                # the manifest's input spec: shape, dtype, normalisation, preprocess
    output: dict               # the manifest's output spec: discrete/continuous, squash, bounds
    source: str                # the file family ("sb3", "cleanrl", "onnx", ...)
    description: str = ""
    recovery: str | None = None  # what made a ternary-trained file (e.g. "distill"); the manifest says it
