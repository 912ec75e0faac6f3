"""The safetensors file format with numpy only (the device has no torch and no safetensors).

Layout: 8-byte little-endian header length n, then n bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes. Files written here load with `safetensors.numpy`.
"""

from __future__ import annotations

import itertools
import json
import math
import struct

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
           "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def dumps(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} is not storable in safetensors")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


MAX_HEADER_BYTES = 100 << 20  # the Rust safetensors library's own limit
MAX_NDIM = 32


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header(header, body_size: int) -> list[tuple[int, int, str, np.dtype, list[int]]]:
    """The tensors' (begin, end, name, dtype, shape) in header order, checked before anything is allocated."""
    if not isinstance(header, dict):
        raise ValueError(  # noqa: TRY004 - bad input, not a programming error
            f"not a safetensors file: the header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("safetensors header: __metadata__ must map names to strings")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(  # noqa: TRY004 - bad input, not a programming error
                f"safetensors header: tensor {name[:60]!r} is a {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(f"tensor {name[:60]!r}: unsupported dtype {repr(dtype)[:40]} (known: {sorted(_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_uint(d) for d in shape):
            raise ValueError(f"tensor {name[:60]!r}: shape must be a list of at most {MAX_NDIM} non-negative "
                             f"integers, got {str(shape)[:60]!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
                and offsets[0] <= offsets[1] <= body_size):
            raise ValueError(f"tensor {name[:60]!r}: data_offsets {str(offsets)[:60]} are not [begin, end] inside "
                             f"the {body_size} data bytes; the file is truncated or corrupt")
        dt = np.dtype(_DTYPES[dtype]).newbyteorder("<")
        if math.prod(shape) * dt.itemsize != offsets[1] - offsets[0]:
            raise ValueError(f"tensor {name[:60]!r}: shape {shape} of {dtype} needs {math.prod(shape) * dt.itemsize} "
                             f"bytes but data_offsets span {offsets[1] - offsets[0]}; the file is corrupt")
        entries.append((offsets[0], offsets[1], name, dt, shape))
    for (_, end, name, _, _), (begin, _, nxt, _, _) in itertools.pairwise(sorted(entries, key=lambda e: e[:2])):
        if begin < end:
            raise ValueError(f"safetensors header: tensors {name[:60]!r} and {nxt[:60]!r} overlap; the file is "
                             "corrupt")
    return entries


def loads(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes; raises ValueError (one line) naming what is wrong, before allocating anything
    the file's own bytes do not account for."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"not a safetensors file: its header declares {n} bytes, more than the limit "
                         f"{MAX_HEADER_BYTES}")
    if n > len(data) - 8:
        raise ValueError("not a safetensors file or truncated: header length exceeds the file size")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a safetensors file: header is not JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise ValueError("not a safetensors file: header JSON is nested too deeply") from None
    body = memoryview(data)[8 + n:]
    entries = _check_header(header, len(body))
    out = {name: np.frombuffer(body[begin:end], dtype=dt).reshape(shape).copy()
           for begin, end, name, dt, shape in entries}
    return out, header.get("__metadata__") or {}
