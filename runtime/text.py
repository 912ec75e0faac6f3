"""Observations as text: the byte-level input of a text state encoder (numpy only).

BitRL feeds the state to its language model as text. Here every value is written with a fixed width and a
sign, so the text of an n-value observation always has the same length and each value the same positions:

    serialize([[0.0312, -1.2]], decimals=2)  ->  b"   +0.03    -1.20;"  as uint8 codes (one token per byte)

A value takes `width(decimals)` bytes (right-aligned "%+.{decimals}f", clipped to +-(10**4 - 1)), values are
separated by one space, and ';' ends the state. The compiled backbone's manifest says
{"preprocess": "text", "text": {"decimals": d, "length": L}} and `Policy` serializes with this function; the
torch backbone uses the same one, so both see identical tokens.
"""

from __future__ import annotations

import numpy as np

LIMIT = 9999.0


def width(decimals: int) -> int:
    """Bytes per value: sign, up to 4 integer digits, point, decimals."""
    return 6 + decimals if decimals > 0 else 5


def text_length(n_values: int, decimals: int) -> int:
    """Length in bytes (= tokens) of the text of an n-value observation."""
    return n_values * (width(decimals) + 1)


def serialize(obs: np.ndarray, decimals: int) -> np.ndarray:
    """[B, n] (or [n]) float observations -> [B, text_length(n, decimals)] uint8 byte codes."""
    x = np.asarray(obs, np.float64)
    x = x.reshape(1, -1) if x.ndim == 1 else x.reshape(len(x), -1)
    if not np.all(np.isfinite(x)):
        raise ValueError("observation contains NaN or Inf; it cannot be written as text")
    x = np.clip(x, -LIMIT, LIMIT)
    w = width(decimals)
    rows = [" ".join(f"{v:+{w}.{decimals}f}" for v in row) + ";" for row in x]
    return np.frombuffer("".join(rows).encode("ascii"), np.uint8).reshape(len(x), -1)
