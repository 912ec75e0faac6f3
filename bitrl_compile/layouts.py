"""Ternary weight layouts: pairs of pure functions pack(trits) -> bytes, unpack(bytes) -> trits.

Trits t in {-1, 0, +1} are stored as codes c = t + 1 in {0, 1, 2}.

2-bit ("2bit"): 4 trits per byte, row-major over [N, K]; K is padded to a multiple of 4 with
code 1 (a zero weight). Trit k of row n sits in byte k // 4 of that row at bits 2*(k % 4):

    byte j of row n:   bit  7 6 | 5 4 | 3 2 | 1 0
                       c[4j+3]  | c[4j+2] | c[4j+1] | c[4j]

Base-3 ("base3"): 5 trits per byte, byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4 (0..242), K padded to a
multiple of 5 with code 1. 8/5 = 1.6 bits per weight, against the log2(3) = 1.585 floor. It is the
artifact's storage, so its pair of functions lives where the device reads it (runtime/weights.py) and is
re-exported here with the trit check; the kernels' compute layouts are there too.
"""

from __future__ import annotations

import numpy as np

from bitrl_compile.runtime.weights import check_trits, pack_base3, unpack_base3


def pack_2bit(w_t: np.ndarray) -> np.ndarray:
    """[N, K] trits -> [N, ceil(K/4)] uint8."""
    w_t = check_trits(w_t)
    n, k = w_t.shape
    codes = np.ones((n, -(-k // 4) * 4), np.uint8)
    codes[:, :k] = w_t + 1
    c = codes.reshape(n, -1, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def unpack_2bit(packed: np.ndarray, k: int) -> np.ndarray:
    """[N, ceil(K/4)] uint8 -> [N, K] int8 trits."""
    packed = np.asarray(packed, np.uint8)
    shifts = np.array([0, 2, 4, 6], np.uint8)
    codes = (packed[..., None] >> shifts) & 3
    return (codes.reshape(packed.shape[0], -1)[:, :k].astype(np.int8) - 1)


def pack_hf_bitnet(w_t: np.ndarray) -> np.ndarray:
    """[N, K] trits -> [ceil(N/4), K] uint8: the storage of Hugging Face's packed BitNet checkpoints
    (`microsoft/bitnet-b1.58-2B-4T`), 4 trits per byte along the *output* dimension, in blocks of R = ceil(N/4)
    rows (rows past N are code 0). A checkpoint format, read once at load; no kernel consumes it.

        byte [r, k]:   bit  7 6      | 5 4      | 3 2     | 1 0
                            c[3R+r,k] | c[2R+r,k] | c[R+r,k] | c[r,k]
    """
    w_t = check_trits(w_t)
    n, k = w_t.shape
    r = -(-n // 4)
    codes = np.zeros((4 * r, k), np.uint8)
    codes[:n] = w_t + 1
    c = codes.reshape(4, r, k)
    return (c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)).astype(np.uint8)


def unpack_hf_bitnet(packed: np.ndarray, n: int) -> np.ndarray:
    """[ceil(N/4), K] uint8 -> [N, K] int8 trits (inverse of `pack_hf_bitnet`; code 3 is invalid)."""
    packed = np.asarray(packed, np.uint8)
    codes = np.concatenate([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=0)[:n]
    if codes.size and codes.max() > 2:
        raise ValueError("2-bit code 3 in packed BitNet weights: corrupt or not ternary")
    return codes.astype(np.int8) - 1


__all__ = ["LAYOUTS", "bits_per_weight", "check_trits", "pack_2bit", "pack_base3", "pack_hf_bitnet",
           "unpack_2bit", "unpack_base3", "unpack_hf_bitnet"]

LAYOUTS = {"2bit": (pack_2bit, unpack_2bit), "base3": (pack_base3, unpack_base3)}


def bits_per_weight(layout: str) -> float:
    return {"2bit": 2.0, "base3": 1.6, "int8": 8.0}[layout]
