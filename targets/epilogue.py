"""What every ternary kernel's epilogue shares (BitLinear in kernels.py, the NEON GEMM rows in gemm_neon.py, the
convolutions): the fused activation and the work below which a kernel stays on one thread. Its own module so that
kernels.py can wrap its lookup-table kernel with gemm_neon's rows without an import cycle."""

from __future__ import annotations

from tvm import tirx as T

PARALLEL_MIN_WORK = 1 << 16  # multiply-adds per batch row below which waking threads costs more than it saves


def activate(y, activation: str):
    """A fusable activation (quant.FUSABLE_ACTIVATIONS) on a float32 TIR value: every kernel's epilogue ends so."""
    if activation == "relu":
        return T.max(y, T.const(0.0, "float32"))
    if activation == "tanh":
        return T.tanh(y)
    if activation == "sigmoid":
        return T.sigmoid(y)
    return y
