"""Small real policies as Relax modules for the pass, kernel and pipeline tests."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from bitrl_compile import targets

ACTS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}


def mlp(sizes=(4, 64, 64, 2), activation="relu", seed=0, bias=True) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTS[activation]())
    return torch.nn.Sequential(*layers).eval()


def to_relax(module: torch.nn.Module, in_features: int) -> tvm.IRModule:
    example = torch.zeros(2, in_features)
    ep = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return from_exported_program(ep, unwrap_unit_return_tuple=True)


def host_target() -> tvm.target.Target:
    return targets.tvm_target(targets.get_target("host"))


def run_host(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    """Build a Relax module for the host CPU and run `main` (BitLinear calls run the numpy reference)."""
    ex = tvm.compile(mod, target=host_target())
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    return out.numpy()


def observations(n=64, k=4, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 10, (n, 1)).astype(np.float32)
    x[0] = 0  # an all-zero observation exercises the absmax epsilon
    return x


LAST_TOKEN_INPUT = {"shape": [3, 4], "dtype": "float32", "preprocess": "none", "normalize": None}


class LastToken(torch.nn.Module):
    """A policy TVM 0.27 miscompiles: it lowers x[:, -1] to take(x, -1, mode="fast"), which reads out of bounds
    (input LAST_TOKEN_INPUT: [batch, 3, 4]); the compile's check against the numpy reference must refuse it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = torch.nn.Linear(4, 16), torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x[:, -1])))
