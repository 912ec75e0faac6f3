"""Ternary weights as stored in a policy.bitrl and as the kernels read them (numpy only).

Trits t in {-1, 0, +1} are codes c = t + 1 in {0, 1, 2}; padding is code 1 (weight 0).

Storage, "base3" (params.safetensors): [N, ceil(K/5)] uint8, 5 trits per byte, 1.6 bits per weight
(the floor is log2(3) = 1.585):

    byte j of row n = c[n, 5j] + 3 c[n, 5j+1] + 9 c[n, 5j+2] + 27 c[n, 5j+3] + 81 c[n, 5j+4]    (0..242)

Compute, "tiles{NL}x{KG}" (what the TensorIR kernels of targets/kernels.py read), 2 bits per weight:
[ceil(N/NL), ceil(K/KT), NL, KG] uint8 with KT = 4 KG. The byte at [jo, kb, i, j] holds the codes of
output n = jo NL + i at the four inputs k = kb KT + q KG + j, q = 0..3, plane q in bits 2q+1..2q:

    byte [jo, kb, i, j]:   bit  7 6   | 5 4   | 3 2   | 1 0
                                q = 3 | q = 2 | q = 1 | q = 0

so one vector load of a tile (NL KG bytes), a shift by 2q and a mask give the codes of W[n-tile, the
KG inputs of plane q] with output channels in the lanes: one vpdpbusd / sdot / vpmaddubsw per plane,
against KG activations broadcast to every lane.

Compute, "lut{NL}" (the lookup-table kernels, targets/kernels.py), 2 bits per weight: [ceil(N/NL),
2 ceil(K/8), NL, 1] uint8. Inputs go in pairs; the pair of codes (c0, c1) of inputs (2g, 2g+1) is one index
c0 + 3 c1 in 0..8 (padding: index 4, weight pair (0, 0)) into a 16-entry table of the pair's partial sums
(T-MAC / bitnet.cpp TL1 style). The byte at [jo, kb, i, 0] holds the indices of output n = jo NL + i for
inputs (4kb, 4kb+1) in bits 3..0 and (4kb+2, 4kb+3) in bits 7..4, so one vector load gives NL outputs'
indices for 4 inputs, and a mask or a shift makes them `tbl` / `vpshufb` indices.

The artifact stores base3; `to_compute` unpacks it once, at load, into the target's tiles. The
manifest says which: manifest["weights"][param] = {"storage": "base3", "compute": "tiles8x4",
"shape": [N, K]}. The weights of int8 layers (mixed precision, manifest layers[i].precision "int8") are not
ternary: stored as the int8 [N, K] tensors their kernel reads (targets/int8_kernels.py), not listed in
manifest["weights"], and passed through `unpack_params` as they are, like every other parameter.
"""

from __future__ import annotations

import re

import numpy as np

_POWERS = np.array([1, 3, 9, 27, 81], np.int16)
_BASE3_CODES = (np.arange(243, dtype=np.int16)[:, None] // _POWERS % 3).astype(np.int8)  # byte -> 5 codes


def check_trits(w_t) -> np.ndarray:
    """A 2-D array of trits in {-1, 0, 1} as int8, or a ValueError (the one check every packer uses)."""
    w_t = np.asarray(w_t)
    if w_t.ndim != 2:
        raise ValueError(f"expected a 2-D [N, K] trit matrix, got shape {w_t.shape}")
    if w_t.size and (w_t.min() < -1 or w_t.max() > 1):
        raise ValueError("trits must be in {-1, 0, 1}")
    return w_t.astype(np.int8)


# ------------------------------------------------------------------------------------------- base3

def pack_base3(w_t) -> np.ndarray:
    """[N, K] trits -> [N, ceil(K/5)] uint8."""
    w_t = check_trits(w_t)
    n, k = w_t.shape
    codes = np.ones((n, -(-k // 5) * 5), np.int16)
    codes[:, :k] = w_t + 1
    return (codes.reshape(n, -1, 5) @ _POWERS).astype(np.uint8)


def unpack_base3(packed, k: int) -> np.ndarray:
    """[N, ceil(K/5)] uint8 -> [N, K] int8 trits."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != -(-k // 5):
        raise ValueError(f"base-3 weights must be uint8 [N, {-(-k // 5)}] for K = {k}, "
                         f"got {packed.dtype} {list(packed.shape)}")
    if packed.size and packed.max() > 242:
        raise ValueError("base-3 byte out of range (> 242): corrupt packed weights")
    return _BASE3_CODES[packed].reshape(packed.shape[0], -1)[:, :k] - 1


# ------------------------------------------------------------------------------------------- tiles

def tile_shape(layout: str) -> tuple[int, int]:
    """(NL, KG) of a "tiles{NL}x{KG}" layout name; (NL, 1) for "lut{NL}" (one index byte per 4 inputs)."""
    m = re.fullmatch(r"tiles(\d+)x(\d+)", layout) or re.fullmatch(r"lut(\d+)()", layout)
    if m is None:
        raise ValueError(f"unknown compute layout {layout!r}; expected tiles<NL>x<KG> or lut<NL>, e.g. tiles8x4")
    return int(m.group(1)), int(m.group(2) or 1)


def tiles_packed_shape(n: int, k: int, layout: str) -> tuple[int, int, int, int]:
    nl, kg = tile_shape(layout)
    if layout.startswith("lut"):  # an even number of steps of 4 inputs (the kernels take them by 2 or more)
        return -(-n // nl), 2 * -(-k // 8), nl, kg
    return -(-n // nl), -(-k // (4 * kg)), nl, kg


def pack_tiles(w_t, layout: str) -> np.ndarray:
    """[N, K] trits -> [ceil(N/NL), ceil(K/KT), NL, KG] uint8 (the docstring's tiles or lut layout)."""
    w_t = check_trits(w_t)
    n, k = w_t.shape
    nt, kb, nl, kg = tiles_packed_shape(n, k, layout)
    codes = np.ones((nt * nl, kb * 4 * kg), np.uint8)
    codes[:n, :k] = w_t + 1
    c = codes.reshape(nt, nl, kb, 4, kg).transpose(0, 2, 1, 4, 3)  # [jo, kb, i, j, q]
    if layout.startswith("lut"):  # [jo, kb, i, 0, q]: two pair indices per byte
        return np.ascontiguousarray((c[..., 0] + 3 * c[..., 1]) | ((c[..., 2] + 3 * c[..., 3]) << 4))
    return np.ascontiguousarray(c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6))


def unpack_tiles(packed, n: int, k: int, layout: str) -> np.ndarray:
    """[ceil(N/NL), ceil(K/KT), NL, KG] uint8 -> [N, K] int8 trits."""
    packed = np.asarray(packed)
    shape = tiles_packed_shape(n, k, layout)
    if packed.dtype != np.uint8 or packed.shape != shape:
        raise ValueError(f"{layout} weights for N={n}, K={k} must be uint8 {list(shape)}, "
                         f"got {packed.dtype} {list(packed.shape)}")
    nt, kb, nl, kg = shape
    if layout.startswith("lut"):
        pairs = np.stack([packed & 15, packed >> 4], axis=-1)  # [jo, kb, i, 0, pair]
        if pairs.size and pairs.max() > 8:
            raise ValueError("table index > 8 in packed weights: corrupt or not ternary")
        c = np.stack([pairs[..., 0] % 3, pairs[..., 0] // 3, pairs[..., 1] % 3, pairs[..., 1] // 3], axis=-1)
    else:
        c = np.stack([(packed >> (2 * q)) & 3 for q in range(4)], axis=-1)  # [jo, kb, i, j, q]
    codes = c.transpose(0, 2, 1, 4, 3).reshape(nt * nl, kb * 4 * kg)[:n, :k]
    if codes.size and codes.max() > 2:
        raise ValueError("2-bit code 3 in packed weights: corrupt or not ternary")
    return codes.astype(np.int8) - 1


# ------------------------------------------------------------------------------------ storage <-> compute

def to_compute(stored, spec: dict) -> np.ndarray:
    """The stored array of one weight (manifest["weights"][name] = spec) in the kernel's layout."""
    k = int(spec["shape"][1])
    if spec["storage"] != "base3":
        raise ValueError(f"unknown weight storage {spec['storage']!r}; expected 'base3'")
    return pack_tiles(unpack_base3(stored, k), spec["compute"])


def to_storage(compute, spec: dict) -> np.ndarray:
    """The inverse of `to_compute`: a kernel-layout weight as it is stored in the artifact."""
    n, k = (int(d) for d in spec["shape"])
    return pack_base3(unpack_tiles(compute, n, k, spec["compute"]))


def unpack_params(params: dict[str, np.ndarray], layouts: dict[str, dict]) -> dict[str, np.ndarray]:
    """The artifact's parameters with every weight listed in manifest["weights"] in its compute layout."""
    out = dict(params)
    for name, spec in layouts.items():
        if name not in out:
            raise ValueError(f"weight {name} of manifest['weights'] is not in the parameters")
        try:
            out[name] = to_compute(out[name], spec)
        except ValueError as e:
            raise ValueError(f"weight {name} cannot be unpacked: {e}") from None
    return out
