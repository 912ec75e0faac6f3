"""Mixed precision: which linear layers stay int8 so that the ternary network keeps the original's outputs.

Measured with the numpy reference (`reference.run`) on calibration observations, against the float network:

    output_error(spec, ours, fp32)    discrete outputs: the share of observations whose argmax (the action)
                                      differs; otherwise the relative RMS error ||ours - fp32|| / ||fp32||
    rank_layers(quantize, n, x, fp32) each layer's sensitivity: the relative RMS error of the outputs removed by
                                      making that layer alone int8 (all others ternary), largest first; for
                                      discrete outputs of the outputs minus their mean per observation (what
                                      decides the action: a Q-network's common offset does not)
    choose_int8_layers(...)           the rule of `--int8-layers auto`: layers in the order of rank_layers are
                                      made int8 one at a time, re-measuring the network each time, until
                                      output_error <= tolerance (TOLERANCE: 98 % of the actions, or 2 % relative
                                      error); none if the all-ternary network already is within it. If no prefix
                                      reaches it, the prefix with the smallest error (the log says so).

`quantize(int8_layers)` is the caller's: the quantized module (after pipeline.QUANTIZED) with those layers int8
(`pipeline.int8_quantizer`). Work layer, between the pipeline (and fidelity) and the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bitrl_compile import reference

TOLERANCE = 0.02
Quantize = Callable[[Sequence[int]], object]  # int8 layer indices -> the quantized Relax module


def network_outputs(mod, x: np.ndarray) -> np.ndarray:
    """`mod`'s main on prepared inputs x (the network's input, after observation preparation), as [n, -1]."""
    return np.asarray(reference.run(mod, x), np.float64).reshape(len(x), -1)


def relative_error(ours: np.ndarray, fp32: np.ndarray) -> float:
    """||ours - fp32|| / ||fp32|| over all outputs (0 when both are zero)."""
    scale = float(np.linalg.norm(fp32))
    diff = float(np.linalg.norm(np.asarray(ours, np.float64) - fp32))
    return diff / scale if scale > 0 else diff


def output_error(output_spec: dict, ours: np.ndarray, fp32: np.ndarray) -> float:
    """The error the tolerance bounds: action disagreement (discrete) or the relative RMS error (otherwise)."""
    if output_spec.get("kind") == "discrete" and fp32.shape[1] > 1:
        return float((ours.argmax(1) != fp32.argmax(1)).mean())
    return relative_error(ours, fp32)


def sensitivity_error(output_spec: dict, ours: np.ndarray, fp32: np.ndarray) -> float:
    """The continuous error rank_layers compares: relative RMS error, of the centred outputs when discrete."""
    if output_spec.get("kind") == "discrete" and fp32.shape[1] > 1:
        return relative_error(ours - ours.mean(1, keepdims=True), fp32 - fp32.mean(1, keepdims=True))
    return relative_error(ours, fp32)


def rank_layers(quantize: Quantize, n_layers: int, x: np.ndarray, fp32: np.ndarray,
                output_spec: dict | None = None) -> list[dict]:
    """[{"index", "error", "gain"}] per layer, largest gain first: the error (`sensitivity_error`) of the network
    with that layer alone int8, and how much smaller it is than the all-ternary network's."""
    spec = output_spec or {}
    base = sensitivity_error(spec, network_outputs(quantize(()), x), fp32)
    rows = []
    for i in range(n_layers):
        error = sensitivity_error(spec, network_outputs(quantize((i,)), x), fp32)
        rows.append({"index": i, "error": error, "gain": base - error})
    return sorted(rows, key=lambda r: (-r["gain"], r["index"]))


@dataclass
class Choice:
    layers: list[int]          # the int8 layers, ascending
    error: float               # output_error of the network with them
    reached: bool              # error <= tolerance
    ranking: list[dict]        # rank_layers' table
    errors: list[float]        # output_error after 0, 1, 2, ... layers of the ranking


def choose_int8_layers(quantize: Quantize, n_layers: int, x: np.ndarray, fp32: np.ndarray, output_spec: dict,
                       tolerance: float = TOLERANCE, ranking: list[dict] | None = None) -> Choice:
    """The fewest layers, taken in the order of the ranking, that bring the network within `tolerance` (the
    module's docstring)."""
    fp32 = np.asarray(fp32, np.float64).reshape(len(x), -1)
    ranking = ranking if ranking is not None else rank_layers(quantize, n_layers, x, fp32, output_spec)
    order = [r["index"] for r in ranking]
    errors = [output_error(output_spec, network_outputs(quantize(()), x), fp32)]
    for m in range(1, len(order) + 1):
        if errors[-1] <= tolerance:
            break
        errors.append(output_error(output_spec, network_outputs(quantize(order[:m]), x), fp32))
    best = next((m for m, e in enumerate(errors) if e <= tolerance), int(np.argmin(errors)))
    return Choice(sorted(order[:best]), errors[best], errors[best] <= tolerance, ranking, errors)


def parse_int8_layers(text: str) -> list[int] | str:
    """--int8-layers: "auto", or comma-separated 0-based indices, "first" and "last" (-1); a ValueError (one line)
    for anything else. Indices beyond the network are refused when it is known (passes/ternarize.py)."""
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "first":
            out.append(0)
        elif part == "last":
            out.append(-1)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"--int8-layers {text!r}: {part!r} is not a layer; expected 'auto', or comma-separated "
                             "0-based layer indices, 'first' and 'last' (e.g. first,last or 0,2)")
    return out
