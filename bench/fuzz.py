"""Fuzzing the readers of untrusted input (issue 15): for any input they succeed or refuse it properly.

    python3 bench/fuzz.py --minutes 10                   # random seeds; a table; failing inputs in bench/results/fuzz
    python3 bench/fuzz.py --minutes 1 --targets sb3,capi.load --out /tmp/fuzz --seed 7
    tests/test_fuzz.py                                    # the same properties with hypothesis, derandomized (CI)

The property, for every reader: an input either loads, or is refused with the documented error, a ValueError
(ArtifactError, ModelLoadError) whose message is one non-empty line; for `bitrl-compile inspect`, exit code 0 or 1
with one line on stderr; for the C API, bitrl_load returns NULL and bitrl_last_error() is one non-empty line.
Never another exception type, never a crash (a signal), never a hang (a per-input timeout), never a memory
blow-up (the peak RSS while reading one input above the RSS before it by more than --mem-flag MB; the address
space is capped at the warm worker's + 2 GB with RLIMIT_AS, so a runaway allocation fails instead of swapping).

Readers (targets), each run in a worker subprocess so that a crash, a hang or a blow-up is observed, not suffered:
    artifact.read       runtime.artifact.read_artifact
    artifact.load       runtime.load() up to the native code (the dlopen of lib.so is replaced by a stop)
    cli.inspect         `bitrl-compile inspect [--json] ARTIFACT` (click's runner, in the worker)
    safetensors.loads   runtime/safetensors_np.loads on bytes
    sb3                 frontends.load_policy on a Stable-Baselines3 .zip
    safetensors+config  frontends.load_policy on a .safetensors whose metadata holds the MLP config
    config              frontends.load_policy(weights.safetensors, config=FILE or JSON text): the config reader
    capi.load           libbitrl's bitrl_load via ctypes (then one bitrl_act on zeros if it loads)

Seeds are real valid files built once: the demo policy compiled for the host, a PPO CartPole .zip trained
64 steps, a 4-8-8-2 MLP written by save_mlp_policy. Mutations are structure-aware where it matters: a zip is
decoded and re-encoded (members dropped, duplicated, replaced, renamed, thousands added, a deflate bomb, lying
sizes, CRCs and offsets, unknown methods); JSON (manifest, SB3 `data`, safetensors headers, configs) gets a
field set to a wrong type, a huge or negative number, NaN, a deep nesting, a long or multi-line string; the
artifact's member hashes are recomputed after every structural change (an attacker can), so the checks behind
the integrity check are reached. Byte-level mutations (flips, truncation, splices) cover the rest.
"""

from __future__ import annotations

import argparse
import base64
import copy
import ctypes
import hashlib
import io
import json
import math
import os
import pickle
import random
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bitrl_compile" / "examples" / "cartpole_ppo.safetensors"
MLP_CONFIG = {"arch": "mlp", "obs_shape": [4], "hidden": [8, 8], "activation": "tanh",
              "output": {"kind": "discrete", "n": 2, "outputs": "logits"}}
OK, REFUSED = "ok", "refused"  # the two good outcomes; anything else is a failure class

# ============================================================================================ zip, by hand

@dataclass
class Entry:
    """One zip member as stored: `raw` is what follows the local header (deflated or not)."""
    name: bytes
    raw: bytes
    method: int = 8
    crc: int = 0
    usize: int = 0
    flags: int = 0
    lies: dict = field(default_factory=dict)  # header fields written with another value: cd_usize, lh_crc, ...


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def entry(name: str | bytes, content: bytes, method: int = 8) -> Entry:
    name = name.encode() if isinstance(name, str) else name
    return Entry(name, deflate(content) if method == 8 else content, method, zlib.crc32(content), len(content))


def zip_bytes(entries: list[Entry], comment: bytes = b"", prefix: bytes = b"") -> bytes:
    """A zip of `entries` in order (duplicates allowed), each header field overridable by `entry.lies`."""
    out, cd = bytearray(prefix), bytearray()
    for e in entries:
        off = len(out)
        lie = e.lies.get
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, e.flags, lie("lh_method", e.method), 0, 0x21,
                           lie("lh_crc", e.crc), lie("lh_csize", len(e.raw)), lie("lh_usize", e.usize),
                           len(e.name), 0) + e.name + e.raw
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, e.flags, lie("cd_method", e.method), 0, 0x21,
                          lie("cd_crc", e.crc), lie("cd_csize", len(e.raw)), lie("cd_usize", e.usize),
                          len(e.name), 0, 0, 0, 0, 0, lie("cd_offset", off)) + e.name
    n = min(len(entries), 0xFFFF)
    cd_offset = len(out)
    out += cd
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), cd_offset, len(comment)) + comment
    return bytes(out)


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


@dataclass
class Bomb:
    """`size` zero bytes as one deflate stream of about size/1000 bytes, with its CRC-32 and sha256."""
    raw: bytes
    size: int
    crc: int
    sha: str

    @staticmethod
    def make(mb: int) -> Bomb:
        chunk = bytes(1 << 22)
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # a full flush resets the window: blocks repeat
        n = max(1, mb // 4)
        crc, h = 0, hashlib.sha256()
        for _ in range(n):
            crc = zlib.crc32(chunk, crc)
            h.update(chunk)
        return Bomb(block * n + c.flush(), n * len(chunk), crc, h.hexdigest())

    def entry(self, name: str) -> Entry:
        return Entry(name.encode(), self.raw, 8, self.crc, self.size)


# ============================================================================================ mutations

DEEP = "\x00deep\x00"  # a placeholder replaced by a deeply nested list after json.dumps (which would recurse)
KEYS = ["env", "input", "output", "normalize", "eps", "clip", "n", "shape", "low", "high", "squash", "log_std",
        "preprocess", "kind", "dim", "text", "decimals", "arch", "obs_shape", "hidden", "activation", "dtype",
        "format", "format_version", "entry_points", "weights", "params", "batch", "members", "calls", "args",
        "func", "buffers", "inputs", "outputs", "storage", "compute", "mean", "var", "__metadata__", "config",
        "data_offsets", "_shape", ":type:", ":serialized:", "start", "policy_class", "policy_kwargs", "max", "min"]
WORDS = ["discrete", "continuous", "features", "onehot", "image", "text", "none", "tanh", "clip", "float32",
         "float64", "complex64", "int8", "uint8", "bool", "F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "base3",
         "tiles16x4", "tiles8x4", "lut16", "tiles0x0", "batch", "input:0", "param:p0", "buffer:99", "output:7",
         "CartPole-v1", "Pendulum-v1", "NoSuchEnv-v0", "relu", "elu", "softmax", "mlp", "cnn", "x86_64", "aarch64",
         "bad\nsecond line", "\u00e9\u4e2d\U0001f600", "../../etc/passwd", "%s%n%x", ""]


def _weird(rng: random.Random, current):
    """A replacement value: a wrong type, an extreme number, a long, multi-line or enum-like string, a nesting."""
    pool = [None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**32 + 1, 2**63, 2**64 + 5, 10**30, -(10**30), 1e308,
            -1e-300, float("nan"), float("inf"), -float("inf"), 0.5, -0.5, "", "0", "1e9", rng.choice(WORDS),
            "x" * rng.choice([100, 100_000]), [], {}, [current], {"x": current}, DEEP,
            [0] * rng.choice([3, 1000, 200_000]), [rng.choice(WORDS)], [[1, 2], [3]], [-1, 5], [2**40, 2**40]]
    if isinstance(current, bool):
        pass
    elif isinstance(current, int):
        pool += [-current, current + 1, current - 1, current * 10**6, current * 2**32, float(current), str(current)]
    elif isinstance(current, float):
        pool += [-current, current * 1e300, int(current) if math.isfinite(current) else 0, str(current)]
    elif isinstance(current, list):
        pool += [current * 2, current[:-1], current[::-1], current + current[:1], [str(v) for v in current],
                 [-abs(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in current],
                 [v * 10**9 if isinstance(v, int) and not isinstance(v, bool) else v for v in current]]
    elif isinstance(current, dict):
        pool += [list(current.values()), list(current), {k: None for k in current}]
    elif isinstance(current, str):
        pool += [current * 2, current[:-1], current.upper(), current + "\n", current + "\x00"]
    return copy.deepcopy(rng.choice(pool))


def _paths(obj, path=(), out=None, limit=5000):
    out = [] if out is None else out
    if len(out) < limit:
        out.append(path)
        if isinstance(obj, dict):
            for k, v in obj.items():
                _paths(v, path + (k,), out, limit)
        elif isinstance(obj, list):
            for i, v in enumerate(obj[:64]):
                _paths(v, path + (i,), out, limit)
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def json_mutate(obj, rng: random.Random, focus: tuple[str, ...] = ()):
    """(a mutated deep copy of a JSON value, what was done). `focus`: top-level keys preferred 3 times in 4."""
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    if focus and rng.random() < 0.75:
        focused = [p for p in paths if p and p[0] in focus]
        paths = focused or paths
    path = rng.choice(paths)
    where = "$" + "".join(f"[{p!r}]" for p in path)
    target = _get(obj, path)
    op = rng.choice(["replace", "replace", "replace", "delete", "add", "wrap"])
    if not path:
        op = "replace"
    if op == "delete":
        parent = _get(obj, path[:-1])
        del parent[path[-1]]
        return obj, f"delete {where}"
    if op == "add" and isinstance(target, dict):
        key = rng.choice(KEYS + ["", "x" * 300, "1"])
        target[key] = _weird(rng, target.get(key))
        return obj, f"set {where}[{key!r}] = {_short(target[key])}"
    value = [target] if op == "wrap" else _weird(rng, target)
    if not path:
        return value, f"replace $ with {_short(value)}"
    _get(obj, path[:-1])[path[-1]] = value
    return obj, f"set {where} = {_short(value)}"


def _short(value, limit: int = 80) -> str:
    if value == DEEP:
        return "<deeply nested list>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def dump_json(obj, rng: random.Random | None = None, **kw) -> bytes:
    """json.dumps with NaN/Infinity tokens allowed, DEEP replaced by a list nested 10^2..10^5 deep."""
    text = json.dumps(obj, **kw)
    if '"\\u0000deep\\u0000"' in text:
        depth = (rng or random.Random(0)).choice([100, 1000, 100_000])
        text = text.replace('"\\u0000deep\\u0000"', "[" * depth + "]" * depth)
    return text.encode()


def text_mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Mutations of a JSON text as text: BOM, trailing garbage, a duplicated key, invalid UTF-8, truncation."""
    op = rng.choice(["bom", "trail", "dupkey", "utf8", "truncate", "empty", "nul"])
    if op == "bom":
        return b"\xef\xbb\xbf" + data, "UTF-8 BOM before the JSON"
    if op == "trail":
        return data + rng.choice([b"x", b"{}", b"\x00", b" " * 1000]), "garbage after the JSON"
    if op == "dupkey" and data.lstrip().startswith(b"{"):
        i = data.index(b"{") + 1
        key = rng.choice(KEYS).encode()
        return data[:i] + b'"' + key + b'": ' + rng.choice([b"null", b"[]", b"-1", b'"x"']) + b", " + data[i:], \
            f"duplicate key {key.decode()!r} first"
    if op == "utf8" and data:
        i = rng.randrange(len(data))
        return data[:i] + b"\xff\xfe" + data[i:], f"invalid UTF-8 at byte {i}"
    if op == "nul":
        return data.replace(b'"', b'"\x00', 1), "a NUL inside the first string"
    if op == "empty":
        return b"", "empty"
    cut = rng.randrange(len(data) + 1)
    return data[:cut], f"JSON truncated to {cut} bytes"


def byte_mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Bit flips, truncation, overwrite, insertion, chunk duplication."""
    data = bytearray(data)
    op = rng.choice(["flip", "flip", "truncate", "overwrite", "insert", "dupchunk", "zero"])
    if op == "flip" or not data:
        k = rng.choice([1, 2, 8, 64])
        for _ in range(k):
            if data:
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        return bytes(data), f"{k} random bit flips"
    i = rng.randrange(len(data))
    if op == "truncate":
        return bytes(data[:i]), f"truncated to {i} of {len(data)} bytes"
    n = rng.choice([1, 4, 16, 256])
    blob = bytes(rng.randrange(256) for _ in range(n)) if rng.random() < 0.5 else \
        rng.choice([b"\xff", b"\x00", b"\x7f"]) * n
    if op == "overwrite":
        data[i:i + n] = blob
        return bytes(data), f"{n} bytes overwritten at {i}"
    if op == "insert":
        return bytes(data[:i] + blob + data[i:]), f"{n} bytes inserted at {i}"
    if op == "zero":
        data[i:i + n] = bytes(len(data[i:i + n]))
        return bytes(data), f"{n} bytes zeroed at {i}"
    j = rng.randrange(len(data))
    return bytes(data[:i] + data[j:j + n] + data[i:]), f"{n} bytes from {j} copied in at {i}"


def zip_mutate(members: list[tuple[str, bytes]], rng: random.Random, bomb: Bomb | None,
               protect: tuple[str, ...] = ()) -> tuple[list[Entry], bytes, bytes, str]:
    """(entries, comment, prefix, what) with one structural change to the members of a zip; `protect`ed
    members are not renamed or dropped (so that the change reaches past the reader's first checks)."""
    entries = [entry(n, d) for n, d in members]
    comment, prefix = b"", b""
    names = [n for n, _ in members]
    ops = ["drop", "dup", "replace", "rename", "many", "lie", "method", "encrypt", "comment", "prefix", "stored"]
    if bomb is not None:
        ops += ["bomb", "bomb"]
    op = rng.choice(ops)
    i = rng.randrange(len(entries))
    what = names[i]
    if op in ("drop", "rename") and what in protect and rng.random() < 0.8:
        op = "replace"
    if op == "drop":
        del entries[i]
        return entries, comment, prefix, f"member {what} removed"
    if op == "dup":
        content = rng.choice([b"", b"{}", os.urandom(64), members[rng.randrange(len(members))][1]])
        twin = entry(what, content)
        entries.insert(i + rng.choice([0, 1]), twin)
        return entries, comment, prefix, f"member {what} twice (other copy: {len(content)} bytes)"
    if op == "replace":
        content = members[i][1]
        new = rng.choice([b"", os.urandom(rng.choice([1, 100, 5000])), content[: len(content) // 2],
                          members[rng.randrange(len(members))][1], content + os.urandom(16)])
        entries[i] = entry(what, new)
        return entries, comment, prefix, f"member {what} replaced by {len(new)} other bytes"
    if op == "rename":
        new = rng.choice(["", "/", "../" + what, what.upper(), what + "\x00", "a/" + what, "x" * 60000, what + " "])
        entries[i].name = new.encode()
        return entries, comment, prefix, f"member {what} renamed {_short(new, 40)}"
    if op == "many":
        n = rng.choice([17, 100, 1000, 65535])
        filler = [entry(f"f{k}", b"", 0) for k in range(n - len(entries))]
        return entries + filler, comment, prefix, f"{n} members"
    if op == "lie":
        key = rng.choice(["cd_usize", "cd_csize", "cd_crc", "cd_offset", "lh_usize", "lh_csize", "lh_crc"])
        e = entries[i]
        base = {"cd_usize": e.usize, "lh_usize": e.usize, "cd_csize": len(e.raw), "lh_csize": len(e.raw),
                "cd_crc": e.crc, "lh_crc": e.crc, "cd_offset": 0}[key]
        value = rng.choice([0, 1, base + 1, max(0, base - 1), 2**31, 2**32 - 1, base * 1000 % 2**32])
        e.lies[key] = value
        return entries, comment, prefix, f"member {what}: header field {key} = {value} (true {base})"
    if op == "method":
        method = rng.choice([1, 9, 12, 14, 93, 99, 0xFFFF])
        content = members[i][1]
        if method == 12:
            import bz2
            entries[i] = Entry(what.encode(), bz2.compress(content), 12, zlib.crc32(content), len(content))
        elif method == 14:
            import lzma
            f = lzma._encode_filter_properties({"id": lzma.FILTER_LZMA1})
            raw = struct.pack("<BBH", 9, 4, len(f)) + f + lzma.compress(
                content, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA1}])
            entries[i] = Entry(what.encode(), raw, 14, zlib.crc32(content), len(content))
        else:
            entries[i].method = method
        return entries, comment, prefix, f"member {what} with compression method {method}"
    if op == "encrypt":
        entries[i].flags |= 1
        return entries, comment, prefix, f"member {what} flagged encrypted"
    if op == "comment":
        comment = rng.choice([b"x" * 65535, b"PK\x05\x06" + bytes(18), b"\n"])
        return entries, comment, prefix, f"zip comment of {len(comment)} bytes"
    if op == "prefix":
        prefix = rng.choice([os.urandom(100), b"\x7fELF" + bytes(60), b"PK\x03\x04"])
        return entries, comment, prefix, f"{len(prefix)} bytes before the zip"
    if op == "stored":
        entries[i] = entry(what, members[i][1], 0)
        return entries, comment, prefix, f"member {what} stored (not deflated)"
    # a deflate bomb: a member (replacing one, or a new one) that inflates to bomb.size zero bytes
    if rng.random() < 0.5:
        entries[i] = bomb.entry(what)
        return entries, comment, prefix, f"member {what} replaced by a deflate bomb ({bomb.size >> 20} MiB of zeros)"
    entries.append(bomb.entry("padding.bin"))
    return entries, comment, prefix, f"extra member padding.bin, a deflate bomb ({bomb.size >> 20} MiB of zeros)"


# -------------------------------------------------------------------------------- safetensors and artifacts

def st_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header, body: bytes, rng: random.Random | None = None, n: int | None = None) -> bytes:
    head = dump_json(header, rng, separators=(",", ":"))
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head) if n is None else n) + head + body


def st_mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A safetensors file with one change: a header field (dtype, shape, offsets, metadata), a lying header
    length, the body cut or grown."""
    header, body = st_split(data)
    op = rng.choice(["field", "field", "field", "json", "length", "body"])
    tensors = [k for k in header if k != "__metadata__"]
    if op == "field" and tensors:
        name = rng.choice(tensors)
        info = header[name]
        key = rng.choice(["dtype", "shape", "data_offsets"])
        begin, end = info["data_offsets"]
        values = {"dtype": ["F64", "F16", "BF16", "I64", "U8", "BOOL", "C64", "F8_E4M3", "f32", 7, None],
                  "shape": [[], [0], [-1], [-1, -1], [2**31, 2**31], [10**12], [2**63], [1] * 64, [3.5], ["4"],
                            None, 5, [end - begin], [1, end - begin]],
                  "data_offsets": [[end, begin], [0, 0], [-8, end], [begin, 2**63], [begin, 2**64], [begin],
                                   [begin, end, 0], [str(begin), str(end)], [0.5, end], None, {}, [begin + 1, end],
                                   [0, len(body)], [0, len(body) + 1]]}[key]
        info[key] = copy.deepcopy(rng.choice(values))
        return st_join(header, body, rng), f"tensor {name!r}: {key} = {_short(info[key])}"
    if op == "json" or op == "field":
        header, what = json_mutate(header, rng)
        return st_join(header, body, rng), f"header JSON: {what}"
    if op == "length":
        head_len = struct.unpack("<Q", data[:8])[0]
        n = rng.choice([0, 1, head_len - 1, head_len + 1, len(data), 2**63, 2**64 - 1, 2**32])
        return struct.pack("<Q", n) + data[8:], f"header length field = {n} (true {head_len})"
    cut = rng.choice([0, len(body) // 2, max(0, len(body) - 1), len(body) + 7])
    new = body[:cut] if cut <= len(body) else body + bytes(cut - len(body))
    return data[:len(data) - len(body)] + new, f"tensor bytes cut or grown to {len(new)} (of {len(body)})"


def manifest_hash(text: bytes) -> bytes:
    """manifest.sha256's content for a manifest text (format 2: the manifest is hashed too)."""
    return (hashlib.sha256(text).hexdigest() + "\n").encode()


def seal_artifact(manifest, members: dict[str, bytes], rng: random.Random | None = None,
                  rehash: bool = True) -> bytes:
    """An artifact zip as `write_artifact` writes it, from a (possibly mutated) manifest and payload members,
    with the payload hashes (when the manifest's `members` is still a dict) and the manifest's own hash
    recomputed, as an attacker would."""
    if rehash and isinstance(manifest, dict) and isinstance(manifest.get("members"), dict):
        manifest = dict(manifest, members={n: hashlib.sha256(d).hexdigest() for n, d in members.items()})
    text = dump_json(manifest, rng, indent=2, sort_keys=isinstance(manifest, dict) and _sortable(manifest))
    head = [entry("manifest.json", text), entry("manifest.sha256", manifest_hash(text))]
    return zip_bytes(head + [entry(n, d) for n, d in members.items()])


def _sortable(obj) -> bool:
    try:
        json.dumps(obj, sort_keys=True)
        return True
    except TypeError:
        return False


# ============================================================================================ seeds

@dataclass
class Corpus:
    """Valid seed files (bytes) and their decoded parts."""
    artifact: bytes
    sb3: bytes
    mlp: bytes  # .safetensors with the config in its metadata
    weights: bytes  # the same state_dict without metadata: the `config` target passes its config separately
    bomb: Bomb
    libbitrl: str | None = None
    manifest: dict = field(init=False)
    members: dict = field(init=False)  # payload members (lib.so, params.safetensors)
    sb3_members: list = field(init=False)
    params: bytes = field(init=False)

    def __post_init__(self):
        parts = dict(zip_members(self.artifact))
        self.manifest = json.loads(parts.pop("manifest.json"))
        self.members = {n: d for n, d in parts.items() if n in self.manifest["members"]}  # the payload
        self.params = parts["params.safetensors"]
        self.sb3_members = zip_members(self.sb3)


def build_corpus(folder: Path, sb3_zip: Path | None = None, bomb_mb: int = 256, capi: bool = True) -> Corpus:
    """Compile the demo for the host, train (or take) a tiny PPO CartPole .zip, write an MLP with its config."""
    import torch

    from bitrl_compile import pipeline
    from bitrl_compile.frontends import load_policy, save_mlp_policy

    folder.mkdir(parents=True, exist_ok=True)
    art = folder / "demo.bitrl"
    if not art.exists():
        pipeline.compile_policy(load_policy(DEMO), "host", art)
    if sb3_zip is None:
        sb3_zip = folder / "ppo_cartpole.zip"
        if not sb3_zip.exists():
            import stable_baselines3

            torch.set_num_threads(1)
            model = stable_baselines3.PPO("MlpPolicy", "CartPole-v1", seed=0, n_steps=64, batch_size=32, n_epochs=1)
            model.learn(64)
            model.save(sb3_zip)
    torch.manual_seed(0)
    mlp = folder / "mlp.safetensors"
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 2))
    save_mlp_policy(mlp, net, {k: v for k, v in MLP_CONFIG.items() if k != "arch"})
    from safetensors.torch import save

    weights = save({f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()})
    lib = None
    if capi:
        from bitrl_compile.devices.capi import build

        lib = str(build("host") / "libbitrl.so")
    return Corpus(art.read_bytes(), Path(sb3_zip).read_bytes(), mlp.read_bytes(), weights, Bomb.make(bomb_mb), lib)


# ============================================================================================ targets

def mutate_artifact(c: Corpus, family: str, rng: random.Random) -> tuple[bytes, str]:
    """One mutated artifact of a family: bytes, zip, manifest, params, lib."""
    if family == "bytes":
        return byte_mutate(c.artifact, rng)
    if family == "zip":
        text = dump_json(c.manifest, indent=2, sort_keys=True)
        members = [("manifest.json", text), ("manifest.sha256", manifest_hash(text))] + list(c.members.items())
        entries, comment, prefix, what = zip_mutate(members, rng, c.bomb, protect=("manifest.json", "manifest.sha256"))
        if rng.random() < 0.7:  # the attacker's hashes: of the last copy of each member (or the bomb's zeros)
            digests = {}
            for e in entries:
                if e.raw is c.bomb.raw:
                    digests[e.name.decode(errors="replace")] = c.bomb.sha
                elif e.method in (0, 8):
                    content = e.raw if e.method == 0 else zlib.decompress(e.raw, -15)
                    digests[e.name.decode(errors="replace")] = hashlib.sha256(content).hexdigest()
            manifest = dict(c.manifest, members={n: digests.get(n, d) for n, d in c.manifest["members"].items()})
            new = dump_json(manifest, indent=2, sort_keys=True)
            fixed = {(b"manifest.json", text): new, (b"manifest.sha256", manifest_hash(text)): manifest_hash(new)}
            for k, e in enumerate(entries):
                if e.method == 8 and not e.lies and e.raw is not c.bomb.raw \
                        and (e.name, zlib.decompress(e.raw, -15)) in fixed:
                    entries[k] = entry(e.name, fixed[e.name, zlib.decompress(e.raw, -15)])
            what += ", hashes recomputed"
        return zip_bytes(entries, comment, prefix), what
    if family == "manifest":
        if rng.random() < 0.15:
            text, what = text_mutate(dump_json(c.manifest, indent=2, sort_keys=True), rng)
            head = [entry("manifest.json", text), entry("manifest.sha256", manifest_hash(text))]
            return zip_bytes(head + [entry(n, d) for n, d in c.members.items()]), f"manifest.json text: {what}" + \
                ", hashes recomputed"
        manifest, what = json_mutate(c.manifest, rng, focus=("input", "output", "weights", "params", "entry_points",
                                                              "batch", "target", "format_version", "members"))
        rehash = not what.startswith(("set $['members']", "delete $['members']"))
        return seal_artifact(manifest, c.members, rng, rehash=rehash), f"manifest: {what}" + \
            (", hashes recomputed" if rehash else "")
    if family == "params":
        params, what = st_mutate(c.params, rng)
        return seal_artifact(c.manifest, dict(c.members, **{"params.safetensors": params}), rng), \
            f"params.safetensors: {what}, hashes recomputed"
    # lib: another lib.so (garbage, cut, a foreign library), hashes recomputed
    lib = c.members["lib.so"]
    choice = rng.choice(["garbage", "cut", "elf-head", "foreign", "empty"])
    new = {"garbage": os.urandom(rng.choice([16, 4096])), "cut": lib[: rng.randrange(1, len(lib))],
           "elf-head": lib[:64] + bytes(4096), "empty": b"", "foreign": _foreign_library()}[choice]
    what = f"lib.so: {choice} ({len(new)} bytes), hashes recomputed"
    return seal_artifact(c.manifest, dict(c.members, **{"lib.so": new}), rng), what


def _foreign_library() -> bytes:
    for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/aarch64-linux-gnu/libz.so.1"):
        if os.path.exists(p):
            return Path(p).read_bytes()
    return b"\x7fELF" + bytes(1000)


def mutate_sb3(c: Corpus, family: str, rng: random.Random) -> tuple[bytes, str]:
    """One mutated SB3 .zip of a family: bytes, zip, data, pth."""
    members = c.sb3_members
    if family == "bytes":
        return byte_mutate(c.sb3, rng)
    if family == "zip":
        entries, comment, prefix, what = zip_mutate(members, rng, c.bomb, protect=("data", "policy.pth"))
        return zip_bytes(entries, comment, prefix), what
    if family == "data":
        data = json.loads(dict(members)["data"])
        if rng.random() < 0.2:  # a pickle in a :serialized: field, damaged (it is scanned, never unpickled)
            fields = [k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v]
            key = rng.choice(fields)
            blob, how = byte_mutate(base64.b64decode(data[key][":serialized:"]), rng)
            data[key][":serialized:"] = base64.b64encode(blob).decode()
            what = f"data[{key!r}][':serialized:'] pickle: {how}"
            text = dump_json(data)
        elif rng.random() < 0.1:
            text, what = text_mutate(dump_json(data), rng)
            what = f"data text: {what}"
        else:
            data, what = json_mutate(data, rng, focus=("observation_space", "action_space", "policy_class",
                                                        "policy_kwargs", "use_sde", "clip_range"))
            text, what = dump_json(data, rng), f"data: {what}"
        return zip_bytes([entry(n, text if n == "data" else d) for n, d in members]), what
    pth, what = _pth_mutate(dict(members)["policy.pth"], rng)
    return zip_bytes([entry(n, pth if n == "policy.pth" else d) for n, d in members]), f"policy.pth: {what}"


def _pth_mutate(pth: bytes, rng: random.Random) -> tuple[bytes, str]:
    """policy.pth with one state_dict change (shape, dtype, values, a key, a non-tensor), or damaged bytes."""
    import torch

    if rng.random() < 0.2:
        return byte_mutate(pth, rng)
    sd = torch_load(pth)
    key = rng.choice(list(sd))
    t = sd[key]
    op = rng.choice(["shape", "dtype", "values", "delete", "add", "object"])
    if op == "shape":
        new = rng.choice([t.reshape(-1), t.reshape(1, *t.shape), t.t() if t.ndim == 2 else t[None], t[:0], t[..., :1],
                          torch.zeros(()), torch.cat([t, t])])
        what = f"{key} reshaped {tuple(t.shape)} -> {tuple(new.shape)}"
    elif op == "dtype":
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
                            torch.complex64, torch.uint8])
        new = t.to(dtype)
        what = f"{key} as {dtype}"
    elif op == "values":
        v = rng.choice([float("nan"), float("inf"), -float("inf"), 1e38])
        new = t.clone()
        new.view(-1)[0] = v
        what = f"{key}[0] = {v}"
    elif op == "delete":
        del sd[key]
        return _torch_bytes(sd), f"{key} removed"
    elif op == "add":
        name = rng.choice(["mlp_extractor.policy_net.4.weight", "mlp_extractor.policy_net.9.weight",
                           "features_extractor.cnn.0.weight", "actor.mu.weight", "q_net.q_net.0.weight",
                           "action_net.weight2", "log_std"])
        new_t = rng.choice([torch.zeros(3, 5), torch.zeros(2, 64), torch.zeros(64, 64), torch.zeros(7)])
        sd[name] = new_t
        return _torch_bytes(sd), f"{name} added {tuple(new_t.shape)}"
    else:
        new = rng.choice([None, 3, 2.5, "x", [1, 2], {"a": torch.zeros(2)}, (torch.zeros(2),)])
        what = f"{key} = {_short(new)}"
    sd[key] = new
    return _torch_bytes(sd), what


def torch_load(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def mutate_safetensors(c: Corpus, family: str, rng: random.Random) -> tuple[bytes, str]:
    """safetensors.loads: the artifact's params; safetensors+config: the MLP file (bytes, header, metadata)."""
    seed = c.params
    if family == "bytes":
        return byte_mutate(seed, rng)
    return st_mutate(seed, rng)


def mutate_mlp_file(c: Corpus, family: str, rng: random.Random) -> tuple[bytes, str]:
    if family == "bytes":
        return byte_mutate(c.mlp, rng)
    if family == "header":
        return st_mutate(c.mlp, rng)
    header, body = st_split(c.mlp)  # family "config": the config inside the metadata
    config = json.loads(header["__metadata__"]["config"])
    if rng.random() < 0.15:
        text, what = text_mutate(dump_json(config), rng)
    else:
        config, what = json_mutate(config, rng)
        text = dump_json(config, rng)
    header["__metadata__"]["config"] = text.decode("utf-8", "replace")
    return st_join(header, body), f"metadata config: {what}"


def mutate_config(c: Corpus, family: str, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.15:
        text, what = text_mutate(dump_json(MLP_CONFIG), rng)
        return text, f"config text: {what}"
    config, what = json_mutate(MLP_CONFIG, rng)
    return dump_json(config, rng), f"config: {what}"


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # the worker that runs it: runtime, frontends or capi
    families: tuple[str, ...]
    suffix: str
    mutate: object  # (corpus, family, rng) -> (bytes, what)
    seed: str  # the Corpus attribute of its valid input


TARGETS = {t.name: t for t in [
    Target("artifact.read", "runtime", ("bytes", "zip", "manifest", "params", "lib"), ".bitrl", mutate_artifact,
           "artifact"),
    Target("artifact.load", "runtime", ("zip", "manifest", "params"), ".bitrl", mutate_artifact, "artifact"),
    Target("cli.inspect", "runtime", ("zip", "manifest"), ".bitrl", mutate_artifact, "artifact"),
    Target("safetensors.loads", "runtime", ("bytes", "header"), ".safetensors", mutate_safetensors, "params"),
    Target("sb3", "frontends", ("bytes", "zip", "data", "pth"), ".zip", mutate_sb3, "sb3"),
    Target("safetensors+config", "frontends", ("bytes", "header", "config"), ".safetensors", mutate_mlp_file, "mlp"),
    Target("config", "frontends", ("config",), ".json", mutate_config, "config_text"),
    Target("capi.load", "capi", ("bytes", "zip", "manifest", "params", "lib"), ".bitrl", mutate_artifact, "artifact"),
]}


def seed_input(c: Corpus, target: Target) -> bytes:
    return dump_json(MLP_CONFIG) if target.seed == "config_text" else getattr(c, target.seed)


# ============================================================================================ the worker

def _send(f, obj) -> None:
    blob = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(blob)) + blob)
    f.flush()


def _recv(f):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def _one_line(message: str) -> str | None:
    """None if a refusal's message is one non-empty line, else the failure class."""
    if not message.strip():
        return "message:empty"
    if "\n" in message.strip():
        return "message:multi-line"
    return None


def _classify(e: BaseException) -> tuple[str, str]:
    text = str(e)
    first = text.strip().splitlines()[0][:300] if text.strip() else ""
    if isinstance(e, ValueError):
        bad = _one_line(text)
        return (bad, f"{type(e).__name__}: {text[:300]!r}") if bad else (REFUSED, f"{type(e).__name__}: {first}")
    return f"wrong-type:{type(e).__name__}", f"{type(e).__module__}.{type(e).__name__}: {first}"


class _ReachedNative(Exception):
    """Raised by the stand-ins of the native-code loaders: load() got as far as opening lib.so."""


def _runtime_targets():
    from click.testing import CliRunner

    import bitrl_compile.runtime.policy as policy_module
    from bitrl_compile.cli import main as cli_main
    from bitrl_compile.runtime import safetensors_np, tvm_runtime
    from bitrl_compile.runtime.artifact import read_artifact

    def stop(*args, **kwargs):
        raise _ReachedNative

    for module in (policy_module, tvm_runtime):
        for name in ("NativeLibrary", "load_module", "_load_runtime"):
            if hasattr(module, name):
                setattr(module, name, stop)

    def load(path, extra):
        try:
            policy = policy_module.load(path)
        except _ReachedNative:
            return OK, "reached the native library"
        policy.close()
        return OK, "loaded (no entry points)"

    def inspect(path, extra):
        result = CliRunner().invoke(cli_main, ["inspect", *(["--json"] if extra.get("json") else []), path])
        err = result.stderr.strip()
        if result.exit_code == 0:
            return OK, "exit 0"
        if result.exit_code == 1:
            return (_one_line(err) or REFUSED), f"exit 1: {err[:300]!r}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            e = result.exception
            return f"exit:{result.exit_code}", f"{type(e).__name__}: {str(e)[:300]}"
        return f"exit:{result.exit_code}", err.splitlines()[0][:300] if err else "no message"

    return {"artifact.read": lambda p, x: (read_artifact(p), (OK, ""))[1],
            "artifact.load": load,
            "cli.inspect": inspect,
            "safetensors.loads": lambda p, x: (safetensors_np.loads(Path(p).read_bytes()), (OK, ""))[1]}


def _frontend_targets(weights_path: str):
    from bitrl_compile.frontends import load_policy

    def config(path, extra):
        text = Path(path).read_text(errors="replace")
        load_policy(weights_path, config=text if extra.get("as_text") and text.lstrip().startswith("{") else path)
        return OK, ""

    return {"sb3": lambda p, x: (load_policy(p), (OK, ""))[1],
            "safetensors+config": lambda p, x: (load_policy(p), (OK, ""))[1],
            "config": config}


def _capi_targets(lib_path: str):
    import numpy as np

    lib = ctypes.CDLL(lib_path, os.RTLD_NOW | os.RTLD_GLOBAL)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.bitrl_load.restype, lib.bitrl_load.argtypes = p, [ctypes.c_char_p]
    lib.bitrl_last_error.restype = ctypes.c_char_p
    for name in ("bitrl_obs_size", "bitrl_output_size", "bitrl_action_size", "bitrl_max_batch"):
        getattr(lib, name).restype, getattr(lib, name).argtypes = i64, [p]
    lib.bitrl_is_discrete.argtypes = lib.bitrl_free.argtypes = [p]
    lib.bitrl_act.argtypes = [p, p, i64, p]

    def load(path, extra):
        handle = lib.bitrl_load(path.encode())
        if not handle:
            err = (lib.bitrl_last_error() or b"").decode(errors="replace")
            return (_one_line(err) or REFUSED), f"NULL: {err[:300]!r}"
        try:
            n_obs, n_act = lib.bitrl_obs_size(handle), lib.bitrl_action_size(handle)
            if extra.get("act", True) and 0 < n_obs <= 1 << 20 and 0 <= n_act <= 1 << 20:
                obs = np.zeros(n_obs, np.float32)
                out = np.zeros(max(n_act, 1) + 16, np.float64)  # int64 or float: 8 bytes a value is enough
                if lib.bitrl_act(handle, obs.ctypes.data, 1, out.ctypes.data) != 0:
                    err = (lib.bitrl_last_error() or b"").decode(errors="replace")
                    bad = _one_line(err)
                    if bad:
                        return bad, f"bitrl_act -1: {err[:300]!r}"
                    return OK, f"loaded; bitrl_act refused: {err[:200]}"
        finally:
            lib.bitrl_free(handle)
        return OK, "loaded"

    return {"capi.load": load}


def _touch(mb: int):
    blob = bytearray(mb << 20)
    blob[::4096] = b"\x01" * len(blob[::4096])  # resident, not just reserved
    return OK, f"{len(blob) >> 20} MB"


# The harness's own checks (tests/test_fuzz.py): a crash, a hang, a blow-up, an allocation past RLIMIT_AS.
_SELF_TESTS = {"_crash": lambda p, x: os.kill(os.getpid(), signal.SIGSEGV),
               "_hang": lambda p, x: time.sleep(3600),
               "_blowup": lambda p, x: _touch(x.get("mb", 600)),
               "_raise": lambda p, x: (_ for _ in ()).throw(eval(x["exc"]))}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS: Linux's clear_refs "5". (ru_maxrss cannot be reset, and
    it starts at the parent's RSS: it is kept across fork and exec.)"""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(kind: str) -> None:
    """The worker's loop: a job (target, input bytes, options) in on stdin, (outcome, detail, peak MB) out."""
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints of the code under test go to stderr, not into the protocol
    setup = _recv(inp)
    import warnings

    warnings.simplefilter("ignore")
    if kind == "runtime":
        targets = _runtime_targets()
    elif kind == "frontends":
        import torch

        torch.set_num_threads(1)
        targets = _frontend_targets(setup["weights"])
    else:
        targets = _capi_targets(setup["lib"])
    targets.update(_SELF_TESTS)
    folder = Path(tempfile.mkdtemp(prefix="bitrl-fuzz-"))
    limit = (_status_kb("VmSize") << 10) + (setup["mem_limit_mb"] << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    _send(out, "ready")
    while True:
        try:
            target, data, suffix, extra = _recv(inp)
        except EOFError:
            return
        path = folder / f"input{suffix}"
        path.write_bytes(data)
        _reset_peak()
        before = _status_kb("VmRSS")
        try:
            outcome, detail = targets[target](str(path), extra)
        except _ReachedNative:
            outcome, detail = OK, "reached the native library"
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            outcome, detail = _classify(e)
        _send(out, (outcome, detail, (_status_kb("VmHWM") - before) / 1024))


@dataclass
class Result:
    outcome: str
    detail: str
    peak_mb: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome not in (OK, REFUSED)


class Sandbox:
    """A worker subprocess of one kind; restarted after a crash, a hang or a memory blow-up."""

    def __init__(self, kind: str, corpus: Corpus, timeout: float = 10.0, mem_limit_mb: int = 2048,
                 mem_flag_mb: int = 200):
        self.kind, self.corpus, self.timeout = kind, corpus, timeout
        self.mem_limit_mb, self.mem_flag_mb = mem_limit_mb, mem_flag_mb
        self.proc = None
        self.count = Counter()  # inputs tried, by target
        self._folder = Path(tempfile.mkdtemp(prefix="bitrl-fuzz-host-"))
        self._weights = self._folder / "weights.safetensors"
        self._weights.write_bytes(corpus.weights)

    def start(self) -> None:
        self._stderr = open(self._folder / "stderr.txt", "w+b")  # noqa: SIM115 - lives as long as the worker
        env = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", self.kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
                                     cwd=str(ROOT))
        _send(self.proc.stdin, {"weights": str(self._weights), "lib": self.corpus.libbitrl,
                                "mem_limit_mb": self.mem_limit_mb})
        if self._read(120.0) != "ready":
            raise RuntimeError(f"fuzz worker {self.kind} did not start: {self._stderr_tail()}")
        warm = {"runtime": ["artifact.read", "artifact.load", "cli.inspect", "safetensors.loads"],
                "frontends": ["sb3", "safetensors+config", "config"], "capi": ["capi.load"]}[self.kind]
        for name in warm:  # the seeds: each must load (and the first call's imports happen here)
            t = TARGETS[name]
            r = self._job(name, seed_input(self.corpus, t), t.suffix, {}, timeout=120.0)
            if r.failed or r is None:
                raise RuntimeError(f"fuzz seed of {name} does not load: {r}")

    def _read(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        return _recv(self.proc.stdout)

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        lines = [x for x in self._stderr.read().decode(errors="replace").splitlines() if x.strip()]
        return " | ".join(lines[-3:])[-400:]

    def _job(self, target: str, data: bytes, suffix: str, extra: dict, timeout: float | None = None) -> Result:
        _send(self.proc.stdin, (target, data, suffix, extra))
        outcome, detail, peak = self._read(timeout or self.timeout)
        return Result(outcome, detail, peak)

    def run(self, target: str, data: bytes, extra: dict | None = None) -> Result:
        """Run one input through `target` in the worker; the outcome, with crash/hang/memory observed here."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.count[target] += 1
        try:
            result = self._job(target, data, TARGETS[target].suffix if target in TARGETS else "", extra or {})
        except (EOFError, BrokenPipeError):
            code = self.proc.wait()
            tail = self._stderr_tail()
            self.proc = None
            name = signal.Signals(-code).name if code < 0 else f"exit {code}"
            return Result(f"crash:{name}", tail)
        except TimeoutError:
            self.stop()
            return Result("hang", f"no answer within {self.timeout:.0f} s")
        if result.peak_mb > self.mem_flag_mb:
            self.stop()  # a fresh worker for the next input: nothing left over from this one
            return Result("memory", f"peak RSS +{result.peak_mb:.0f} MB ({result.outcome}: {result.detail[:200]})",
                          result.peak_mb)
        return result

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        import shutil

        shutil.rmtree(self._folder, ignore_errors=True)


class Sandboxes:
    """One Sandbox per worker kind, started on first use."""

    def __init__(self, corpus: Corpus, **kw):
        self.corpus, self.kw, self.boxes = corpus, kw, {}

    def run(self, target: str, data: bytes, extra: dict | None = None) -> Result:
        kind = TARGETS[target].kind
        if kind not in self.boxes:
            self.boxes[kind] = Sandbox(kind, self.corpus, **self.kw)
        return self.boxes[kind].run(target, data, extra)

    def counts(self) -> Counter:
        total = Counter()
        for box in self.boxes.values():
            total.update(box.count)
        return total

    def close(self) -> None:
        for box in self.boxes.values():
            box.close()


def fuzz_one(boxes: Sandboxes, target: str, family: str, rng: random.Random) -> tuple[Result, bytes, str, dict]:
    """Mutate the target's seed in `family` with `rng`, run it: (result, input, what was done, options)."""
    t = TARGETS[target]
    data, what = t.mutate(boxes.corpus, family, rng)
    extra = {}
    if target == "cli.inspect":
        extra["json"] = rng.random() < 0.5
    if target == "config":
        extra["as_text"] = rng.random() < 0.5
    if target == "capi.load":
        extra["act"] = family != "lib"  # a foreign lib.so is native code: calling it proves nothing
    return boxes.run(target, data, extra), data, what, extra


# ============================================================================================ the bench

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget for fuzzing (after building the seeds)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated readers to fuzz")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz", help="folder for failing inputs")
    ap.add_argument("--seed", type=int, default=None, help="random seed [default: random]")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per input before it counts as a hang")
    ap.add_argument("--mem-flag", type=int, default=200, help="MB of peak RSS above the warm worker that count "
                                                                 "as a memory blow-up")
    ap.add_argument("--bomb-mb", type=int, default=1024, help="MiB of zeros in the deflate bomb")
    ap.add_argument("--corpus", type=Path, default=None, help="folder to keep the seed files in (reused)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    names = [n for n in args.targets.split(",") if n]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    folder = args.corpus or Path(tempfile.mkdtemp(prefix="bitrl-fuzz-corpus-"))
    t0 = time.time()
    corpus = build_corpus(folder, bomb_mb=args.bomb_mb, capi="capi.load" in names)
    print(f"seeds built in {time.time() - t0:.0f} s (in {folder}); fuzzing {args.minutes:g} min, seed {seed}",
          file=sys.stderr)
    boxes = Sandboxes(corpus, timeout=args.timeout, mem_flag_mb=args.mem_flag)
    pairs = [(n, f) for n in names for f in TARGETS[n].families]
    stats = defaultdict(Counter)
    examples: dict[tuple[str, str], list[str]] = defaultdict(list)
    saved = Counter()
    rng_master = random.Random(seed)
    deadline = time.time() + 60 * args.minutes
    i = 0
    try:
        while time.time() < deadline:
            target, family = pairs[i % len(pairs)]
            i += 1
            case_seed = rng_master.randrange(2**63)
            result, data, what, extra = fuzz_one(boxes, target, family, random.Random(case_seed))
            stats[target][result.outcome] += 1
            if result.failed:
                key = (target, result.outcome)
                if saved[key] < 20:
                    saved[key] += 1
                    where = args.out / target / result.outcome.replace(":", "-")
                    where.mkdir(parents=True, exist_ok=True)
                    stem = where / f"{family}-{case_seed:x}"
                    stem.with_suffix(TARGETS[target].suffix).write_bytes(data)
                    stem.with_suffix(".txt").write_text(f"target {target}, family {family}, seed {case_seed}\n"
                                                        f"input: {what}\noptions: {extra}\n"
                                                        f"outcome: {result.outcome}\n{result.detail}\n")
                if len(examples[key]) < 3:
                    examples[key].append(f"{what} -> {result.detail[:160]}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        boxes.close()
    print(f"\nfuzz: {sum(sum(c.values()) for c in stats.values())} inputs in {args.minutes:g} min, seed {seed}\n")
    print(f"| {'reader':<19} | {'inputs':>7} | {'accepted':>8} | {'refused':>7} | failures by class")
    print(f"|{'-' * 21}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 40}")
    failed = False
    for target in names:
        c = stats[target]
        bad = {k: v for k, v in c.items() if k not in (OK, REFUSED)}
        failed |= bool(bad)
        text = ", ".join(f"{k} {v}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])) or "none"
        print(f"| {target:<19} | {sum(c.values()):>7} | {c[OK]:>8} | {c[REFUSED]:>7} | {text}")
    if examples:
        print("\nexamples (input -> outcome):")
        for (target, outcome), lines in sorted(examples.items()):
            print(f"  {target} {outcome}:")
            for line in lines:
                print(f"    {line}")
        print(f"\nfailing inputs: {args.out}/<reader>/<class>/ (the .txt beside each says how it was made)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
