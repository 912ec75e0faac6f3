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

The artifact stores base3; `to_compute` unpacks it once, at load, into the target's tiles, a block of rows at a
time; `read_params` does so for a whole params.safetensors read front to back from a stream, so that a device
holds the weights once, in the kernels' layout, and never the stored file whole. The
manifest says which: manifest["weights"][param] = {"storage": "base3", "compute": "tiles8x4",
"shape": [N, K]}. The weights of int8 layers (mixed precision, manifest layers[i].precision "int8") are not
ternary: stored as the int8 [N, K] tensors their kernel reads (targets/int8_kernels.py), not listed in
manifest["weights"], and passed through `unpack_params` as they are, like every other parameter.
"""

from __future__ import annotations

import json
import math
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

ALIGNMENT = 64  # what the kernels assume of every tensor (tvm_runtime.ALIGNMENT)
BLOCK_ROWS = 128  # rows unpacked at a time: temporaries of a few MB whatever the weight's size


def compute_shape(spec: dict) -> tuple[int, int, int, int]:
    """The shape of one weight (manifest["weights"][name] = spec) in its compute layout (uint8)."""
    n, k = (int(d) for d in spec["shape"])
    return tiles_packed_shape(n, k, spec["compute"])


def to_compute(stored, spec: dict, out: np.ndarray | None = None) -> np.ndarray:
    """The stored array of one weight (manifest["weights"][name] = spec) in the kernel's layout, written into
    `out` (uint8, compute_shape(spec)) when given. Unpacked BLOCK_ROWS rows at a time, so the int8 codes in
    between never take more than a block's few MB (a whole 6912 x 2560 projection would take 5 x 18 MB)."""
    stored = np.asarray(stored)
    _check_stored(spec, stored.dtype, list(stored.shape))
    return _unpack_rows(lambda row, count: stored[row:row + count], spec, out)


def _check_stored(spec: dict, dtype, shape: list) -> tuple[int, int]:
    n, k = (int(d) for d in spec["shape"])
    if spec["storage"] != "base3":
        raise ValueError(f"unknown weight storage {spec['storage']!r}; expected 'base3'")
    if dtype != np.uint8 or list(shape) != [n, -(-k // 5)]:
        raise ValueError(f"base-3 weights must be uint8 [{n}, {-(-k // 5)}] for K = {k}, got {dtype} {list(shape)}")
    return n, k


def _unpack_rows(rows_of, spec: dict, out: np.ndarray | None) -> np.ndarray:
    """`to_compute` of a weight whose stored rows `rows_of(row, count)` gives, BLOCK_ROWS at a time, in order."""
    n, k = (int(d) for d in spec["shape"])
    layout = spec["compute"]
    shape = tiles_packed_shape(n, k, layout)
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.dtype != np.uint8 or out.shape != shape:
        raise ValueError(f"{layout} output for [{n}, {k}] must be uint8 {list(shape)}, got {out.dtype} {list(out.shape)}")
    nl = tile_shape(layout)[0]
    step = max(nl, BLOCK_ROWS // nl * nl)
    for row in range(0, n, step):
        block = pack_tiles(unpack_base3(rows_of(row, min(step, n - row)), k), layout)
        out[row // nl:row // nl + block.shape[0]] = block
    return out


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


def _read_exact(stream, n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise ValueError(f"{what} ends {n - len(data):,} bytes early: the file is truncated")
    return data


def read_params(stream, size: int, layouts: dict[str, dict]) -> dict[str, np.ndarray]:
    """params.safetensors (`size` bytes) read once, front to back, from a binary `stream`, into the parameters
    `Policy` takes: every weight listed in manifest["weights"] (`layouts`) unpacked into its compute layout, the
    rest as stored. The stored file is never held whole: a weight's base-3 rows are read BLOCK_ROWS at a time
    into one scratch block and unpacked from there; every other tensor is read in place. Everything lands in one
    64-byte aligned allocation (no heap fragments left behind by a thousand tensors, nothing for `aligned` to
    copy), so the process holds the kernel-layout weights once, plus one block of stored rows and their codes.
    ValueError (one line) for a stream that is not such a file."""
    from .safetensors_np import MAX_HEADER_BYTES, _check_header  # the one parser of safetensors headers

    if size < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    n = int.from_bytes(_read_exact(stream, 8, "params.safetensors"), "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"not a safetensors file or truncated: its header declares {n:,} bytes")
    try:
        header = json.loads(_read_exact(stream, n, "params.safetensors"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"not a safetensors file: header is not JSON ({str(e)[:120]})") from None
    entries = sorted(_check_header(header, size - 8 - n), key=lambda e: e[:2])
    missing = [name for name in layouts if name not in {e[2] for e in entries}]
    if missing:
        raise ValueError(f"weight {missing[0]} of manifest['weights'] is not in the parameters")
    places, total = [], 0
    for _, _, name, dtype, shape in entries:
        nbytes = math.prod(compute_shape(layouts[name])) if name in layouts else math.prod(shape) * dtype.itemsize
        places.append(total)
        total += -(-nbytes // ALIGNMENT) * ALIGNMENT
    raw = np.empty(total + ALIGNMENT, np.uint8)
    block = raw[-raw.ctypes.data % ALIGNMENT:][:total]
    widest = max([math.prod(shape[1:]) for _, _, name, _, shape in entries if name in layouts] or [0])
    scratch = np.empty(BLOCK_ROWS * widest, np.uint8)  # one block of stored rows

    def rows_of(width: int):
        def read(row: int, count: int) -> np.ndarray:
            rows = scratch[:count * width]
            _read_into(stream, rows)
            return rows.reshape(count, width)
        return read

    out, position = {}, 0
    for (begin, end, name, dtype, shape), place in zip(entries, places):
        _skip(stream, begin - position)  # bytes between tensors (the member's sha256 covers them)
        if name in layouts:  # streamed a block of rows at a time straight into the kernel's layout
            spec = layouts[name]
            try:
                _check_stored(spec, dtype, shape)
                target = block[place:place + math.prod(compute_shape(spec))].reshape(compute_shape(spec))
                out[name] = _unpack_rows(rows_of(int(shape[1])), spec, target)
            except ValueError as e:
                raise ValueError(f"weight {name} cannot be unpacked: {e}") from None
        else:
            target = block[place:place + end - begin]
            _read_into(stream, target)
            out[name] = target.view(dtype).reshape(shape)
        position = end
    _skip(stream, size - 8 - n - position)
    return out


def _skip(stream, n: int) -> None:
    while n > 0:
        n -= len(_read_exact(stream, min(n, 4 << 20), "params.safetensors"))


def _read_into(stream, target: np.ndarray) -> None:
    """Fill a contiguous uint8 array from `stream` (at most a few MB per read: no second copy of a tensor)."""
    view, done = memoryview(target).cast("B"), 0
    while done < len(view):
        chunk = stream.read(min(len(view) - done, 4 << 20))
        if not chunk:
            raise ValueError("params.safetensors ends early: the file is truncated")
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
