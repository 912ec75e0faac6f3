"""Serve one policy over stdin/stdout: `python -m bitrl_compile.runtime.serve ARTIFACT`.

This is how a policy compiled for another machine runs here: `bitrl_compile.devices` starts
this module under qemu with an aarch64 Python and talks to it through pipes. It imports only
numpy, the standard library and this runtime, so it runs wherever the runtime does.

Every message, in both directions, is a frame:

    4 bytes    n, little-endian uint32
    n bytes    a JSON header (UTF-8)
    k bytes    raw payload, k = header["nbytes"] (0 when absent)

Requests:  {"method": "forward" | "features" | "act", "shape": [...], "dtype": "<f4", "nbytes": k,
            "deterministic": true, "seed": null}  + the observation's bytes (C order)
           a recurrent policy's also {"extra": [{"shape", "dtype"}, {"shape", "dtype"}]}: its state and episode
           starts, whose bytes follow the observation's
Replies:   {"ok": true, "shape": [...], "dtype": "<i8", "nbytes": k}  + the result's bytes
           (a recurrent policy's: "extra" [the next state's shape and dtype], its bytes after the result's)
           {"ok": false, "error": "ValueError", "message": "..."}   (the server keeps serving)
The first frame the server sends is a greeting: {"ok": true, "manifest": {...}, "machine": "aarch64"},
or the error that stopped `load` (then it exits with status 1). The server stops at end of input.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import sys
from typing import BinaryIO

import numpy as np

from .policy import load

_LENGTH = struct.Struct("<I")


class ProtocolError(RuntimeError):
    """A frame that does not follow the protocol above (truncated, or not JSON)."""


def write_message(stream: BinaryIO, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(dict(header, nbytes=len(payload)), separators=(",", ":")).encode()
    stream.write(_LENGTH.pack(len(head)) + head)
    if payload:
        stream.write(payload)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise ProtocolError(f"stream ended {n - got} bytes short of a {n}-byte frame part")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_message(stream: BinaryIO) -> tuple[dict, bytes] | None:
    """The next (header, payload), or None at a clean end of stream."""
    first = stream.read(_LENGTH.size)
    if not first:
        return None
    if len(first) < _LENGTH.size:
        first += _read_exact(stream, _LENGTH.size - len(first))
    (n,) = _LENGTH.unpack(first)
    try:
        header = json.loads(_read_exact(stream, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"frame header is not JSON ({e})") from None
    return header, _read_exact(stream, int(header.get("nbytes", 0)))


def array_message(array, *extra) -> tuple[dict, bytes]:
    """A numpy array (or scalar) as a header and its raw C-order bytes; `extra` arrays follow it ("extra")."""
    arrays = [np.asarray(a, order="C") for a in (array, *extra)]  # not ascontiguousarray: a scalar stays a scalar
    header = {"shape": list(arrays[0].shape), "dtype": arrays[0].dtype.str}
    if extra:
        header["extra"] = [{"shape": list(a.shape), "dtype": a.dtype.str} for a in arrays[1:]]
    return header, b"".join(a.tobytes() for a in arrays)


def message_array(header: dict, payload: bytes) -> np.ndarray:
    """The inverse of `array_message` (its first array): a writable array."""
    return message_arrays(header, payload)[0]


def message_arrays(header: dict, payload: bytes) -> list[np.ndarray]:
    """Every array of a message: the first, then its "extra" ones (writable copies); ValueError when the bytes
    do not add up."""
    out, offset = [], 0
    for spec in [header, *(header.get("extra") or [])]:
        dtype, shape = np.dtype(spec["dtype"]), [int(d) for d in spec["shape"]]
        n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if offset + n > len(payload):
            raise ValueError(f"message payload has {len(payload)} bytes, fewer than its arrays' shapes say")
        out.append(np.frombuffer(payload, dtype, int(np.prod(shape, dtype=np.int64)), offset).reshape(shape).copy())
        offset += n
    if offset != len(payload):
        raise ValueError(f"message payload has {len(payload)} bytes, more than its arrays' shapes say ({offset})")
    return out


def error_message(error: BaseException) -> dict:
    return {"ok": False, "error": type(error).__name__, "message": str(error)}


def handle(policy, header: dict, payload: bytes):
    """Run one request against a loaded Policy: an array, or (result, next state) for a recurrent policy's."""
    method = header.get("method")
    obs, *state = message_arrays(header, payload)  # state: a recurrent policy's (state, episode_start)
    if method == "forward":
        return policy.forward(obs, *state)
    if method == "features":
        return np.asarray(policy.features(obs))
    if method == "act":
        seed = header.get("seed")
        rng = None if seed is None else np.random.default_rng(seed)
        return policy.act(obs, *state, deterministic=bool(header.get("deterministic", True)), rng=rng)
    raise ValueError(f"unknown method {method!r}; expected 'forward', 'features' or 'act'")


def serve(artifact: str, requests: BinaryIO, replies: BinaryIO) -> int:
    try:
        policy = load(artifact)
    except Exception as e:  # noqa: BLE001 - every load failure goes back to the caller as a message
        write_message(replies, error_message(e))
        return 1
    write_message(replies, {"ok": True, "manifest": policy.manifest, "machine": platform.machine()})
    while True:
        message = read_message(requests)
        if message is None:
            return 0
        header, payload = message
        try:
            result = handle(policy, header, payload)
        except Exception as e:  # noqa: BLE001 - a bad request must not kill the server
            write_message(replies, error_message(e))
            continue
        reply, data = array_message(*result) if isinstance(result, tuple) else array_message(result)
        write_message(replies, dict(reply, ok=True), data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bitrl_compile.runtime.serve ARTIFACT  (frames on stdin/stdout)", file=sys.stderr)
        return 2
    # The protocol owns the real stdout; anything else that prints (Python or C code) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return serve(argv[0], sys.stdin.buffer, replies)


if __name__ == "__main__":
    sys.exit(main())
