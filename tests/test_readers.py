"""Limits and honest errors of the model-file readers: spec validation (runtime/specs.py), the safetensors reader
(runtime/safetensors_np.py), SB3 zips, the "mlp" config and CleanRL state_dicts, normalisation statistics.

Every bad input is a real file (SB3 zips saved by stable-baselines3 and rewritten, safetensors bytes written by
hand) and must give a ValueError subclass with one line, never a KeyError/TypeError/MemoryError. The zip bombs run
in a subprocess whose peak RSS (getrusage maxrss) must stay under a generous bound: a correctness bound on memory.
"""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from bitrl_compile.frontends import load_policy
from bitrl_compile.frontends.normalization import read_normalization
from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.runtime import safetensors_np
from bitrl_compile.runtime.specs import check_output_size, check_specs

IN = {"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None}
DISCRETE = {"kind": "discrete", "n": 2, "outputs": "logits"}
BOX = {"kind": "continuous", "shape": [2], "low": [-1.0, -2.0], "high": [1.0, 2.0], "squash": "tanh", "log_std": None}
NORM = {"mean": [0.0] * 4, "var": [1.0] * 4, "eps": 1e-8, "clip": 10.0}
RSS_BOUND_MB = 500


def one_line_error(exc_info, *fragments: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---------------------------------------------------------------- specs

def test_good_specs_pass():
    check_specs({**IN, "normalize": NORM}, DISCRETE, "x")
    check_specs(IN, BOX, "x")
    check_specs(IN, {**BOX, "squash": "clip", "low": [-math.inf, 0.0], "high": [math.inf, 1.0]}, "x")
    check_specs({"shape": [3], "preprocess": "onehot", "n": 3}, {"kind": "features", "dim": 8}, "x")
    check_specs({"shape": [5], "preprocess": "text", "text": {"decimals": 2, "length": 40},
                 "normalize": {"mean": [0.0] * 40, "var": [1.0] * 40}}, DISCRETE, "x")
    check_output_size(BOX, 2, "x")


BAD_SPECS = [
    ("shape empty", {**IN, "shape": []}, DISCRETE, "observation shape must be a non-empty list"),
    ("shape bool", {**IN, "shape": [True]}, DISCRETE, "observation shape must be a non-empty list"),
    ("shape float", {**IN, "shape": [4.0]}, DISCRETE, "observation shape must be a non-empty list"),
    ("shape str", {**IN, "shape": ["4"]}, DISCRETE, "observation shape must be a non-empty list"),
    ("shape huge", {**IN, "shape": [100000, 100000]}, DISCRETE, "more than the limit"),
    ("complex dtype", {**IN, "dtype": "complex64"}, DISCRETE, "observation dtype complex64 is not a real number"),
    ("object dtype", {**IN, "dtype": "object"}, DISCRETE, "is not a real number type"),
    ("bad preprocess", {**IN, "preprocess": "fft"}, DISCRETE, "preprocess must be one of"),
    ("onehot n", {"shape": [3], "preprocess": "onehot", "n": 4}, DISCRETE, "must have shape [4]"),
    ("eps negative", {**IN, "normalize": {**NORM, "eps": -1e-8}}, DISCRETE, "eps must be a finite number > 0"),
    ("eps zero", {**IN, "normalize": {**NORM, "eps": 0}}, DISCRETE, "eps must be a finite number > 0"),
    ("eps nan", {**IN, "normalize": {**NORM, "eps": math.nan}}, DISCRETE, "eps must be a finite number > 0"),
    ("clip negative", {**IN, "normalize": {**NORM, "clip": -5.0}}, DISCRETE, "clip must be a finite number > 0"),
    ("clip inf", {**IN, "normalize": {**NORM, "clip": math.inf}}, DISCRETE, "clip must be a finite number > 0"),
    ("var negative", {**IN, "normalize": {**NORM, "var": [1, 1, -1, 1]}}, DISCRETE, "var >= 0"),
    ("mean nan", {**IN, "normalize": {**NORM, "mean": [0, math.nan, 0, 0]}}, DISCRETE, "must be finite"),
    ("mean size", {**IN, "normalize": {**NORM, "mean": [0.0] * 3}}, DISCRETE, "has 3 values, expected 4"),
    ("mean str", {**IN, "normalize": {**NORM, "mean": "0 0 0 0"}}, DISCRETE, "must be a list of numbers"),
    ("norm list", {**IN, "normalize": [1, 2]}, DISCRETE, "normalisation must be an object"),
    ("n zero", IN, {**DISCRETE, "n": 0}, "n must be a positive integer"),
    ("n bool", IN, {**DISCRETE, "n": True}, "n must be a positive integer"),
    ("n float", IN, {**DISCRETE, "n": 2.0}, "n must be a positive integer"),
    ("n str", IN, {**DISCRETE, "n": "2"}, "n must be a positive integer"),
    ("outputs", IN, {**DISCRETE, "outputs": "probs"}, "\"logits\" or \"q_values\""),
    ("inverted bounds", IN, {**BOX, "low": [1.0, 2.0], "high": [-1.0, -2.0]}, "low <= high; got low=[1.0, 2.0]"),
    ("nan bound", IN, {**BOX, "low": [math.nan, -2.0]}, "action bounds must be finite"),
    ("inf bound tanh", IN, {**BOX, "high": [math.inf, 2.0]}, "action bounds must be finite"),
    ("low +inf clip", IN, {**BOX, "squash": "clip", "low": [math.inf, -2.0]}, "action bounds must be finite"),
    ("bound size", IN, {**BOX, "low": [-1.0]}, "action bound low has 1 values, expected 2"),
    ("bound str", IN, {**BOX, "low": "[-1, -2]"}, "must be a list of numbers"),
    ("bound complex", IN, {**BOX, "low": [1j, 2j]}, "must hold real numbers"),
    ("squash", IN, {**BOX, "squash": "sigmoid"}, "squash must be one of"),
    ("log_std inf", IN, {**BOX, "log_std": [0.0, math.inf]}, "log_std contains NaN or Inf"),
    ("action shape", IN, {**BOX, "shape": [-2]}, "action shape must be a non-empty list"),
    ("features dim", IN, {"kind": "features", "dim": 0}, "features dim must be a positive integer"),
    ("kind", IN, {"kind": "categorical"}, "output kind must be one of"),
    ("output list", IN, [DISCRETE], "the output spec must be an object"),
]


@pytest.mark.parametrize(("case", "inp", "out", "fragment"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_specs_are_refused_in_one_line(case, inp, out, fragment):
    with pytest.raises(ValueError) as e:
        check_specs(inp, out, "policy.bitrl")
    assert one_line_error(e, fragment).startswith("policy.bitrl: ")


def test_output_size_must_match_the_network():
    for spec, n in ((DISCRETE, 7), (BOX, 3), ({"kind": "features", "dim": 16}, 8)):
        with pytest.raises(ValueError) as e:
            check_output_size(spec, n, "a.bitrl")
        one_line_error(e, f"the network outputs {n} values")


# ---------------------------------------------------------------- safetensors (crafted byte by byte)

def st_bytes(header, body: bytes = b"", length: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head) if length is None else length) + head + body


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_SAFETENSORS = [
    ("header huge", st_bytes(b"{}", length=1 << 40), "more than the limit"),
    ("header past end", st_bytes(b"{}", length=100), "header length exceeds the file size"),
    ("header list", st_bytes([1, 2]), "the header is a JSON list, not an object"),
    ("header deep", st_bytes(b"[" * 100000), "nested too deeply"),
    ("entry not object", st_bytes({"w": [1, 2]}, bytes(8)), "is a list, not an object"),
    ("metadata not strings", st_bytes({"__metadata__": {"a": 1}}), "__metadata__ must map names to strings"),
    ("dtype unknown", st_bytes({"w": {**F32x2, "dtype": "F8"}}, bytes(8)), "unsupported dtype 'F8'"),
    ("dtype list", st_bytes({"w": {**F32x2, "dtype": ["F32"]}}, bytes(8)), "unsupported dtype"),
    ("shape negative", st_bytes({"w": {**F32x2, "shape": [-1]}}, bytes(8)), "non-negative integers"),
    ("shape bool", st_bytes({"w": {**F32x2, "shape": [True, 2]}}, bytes(8)), "non-negative integers"),
    ("shape str", st_bytes({"w": {**F32x2, "shape": "2"}}, bytes(8)), "non-negative integers"),
    ("offsets past end", st_bytes({"w": {**F32x2, "data_offsets": [0, 1 << 40]}}, bytes(8)), "inside the 8 data"),
    ("offsets reversed", st_bytes({"w": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)), "are not [begin, end]"),
    ("offsets negative", st_bytes({"w": {**F32x2, "data_offsets": [-8, 0]}}, bytes(8)), "are not [begin, end]"),
    ("offsets short", st_bytes({"w": {**F32x2, "data_offsets": [0]}}, bytes(8)), "are not [begin, end]"),
    ("span mismatch", st_bytes({"w": {**F32x2, "shape": [1 << 40]}}, bytes(8)), "bytes but data_offsets span 8"),
    ("overlap", st_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
]


@pytest.mark.parametrize(("case", "data", "fragment"), BAD_SAFETENSORS, ids=[c[0] for c in BAD_SAFETENSORS])
def test_corrupt_safetensors_are_refused_in_one_line(case, data, fragment):
    with pytest.raises(ValueError) as e:
        safetensors_np.loads(data)
    one_line_error(e, fragment)


def test_safetensors_reader_reads_what_the_library_writes():
    tensors = {"b": torch.arange(3, dtype=torch.int8), "a": torch.ones(2, 3), "empty": torch.zeros(0, 4)}
    got, meta = safetensors_np.loads(st_save(tensors, metadata={"k": "v"}))
    assert meta == {"k": "v"}
    for name, t in tensors.items():
        np.testing.assert_array_equal(got[name], t.numpy())


# ---------------------------------------------------------------- SB3 zips

def rewrite_zip(src: Path, dst: Path, **members: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, members.get(name.replace(".", "_"), zin.read(name)))
    return dst


def with_data(src: Path, dst: Path, change) -> Path:
    data = json.loads(zipfile.ZipFile(src).read("data"))
    out = change(data)
    return rewrite_zip(src, dst, data=json.dumps(data if out is None else out).encode())


@pytest.fixture(scope="module")
def ppo_pendulum(sb3_trained) -> Path:
    return sb3_trained("ppo", "Pendulum-v1", policy_kwargs={"net_arch": [8]}).path


def _set(space: str, **fields):
    def change(d):
        d[space].update(fields)
        for k, v in fields.items():
            if v is None:
                del d[space][k]
    return change


BAD_SB3 = [
    ("data list", lambda d: [d], "'data' member is a JSON list, not an object"),
    ("data deep", lambda d: json.loads("[" * 900 + "]" * 900), "not an object"),
    ("obs no _shape", _set("observation_space", _shape=None), "has no \"_shape\""),
    ("obs _shape str", _set("observation_space", _shape=["3"]), "_shape must be a non-empty list of positive"),
    ("obs _shape float", _set("observation_space", _shape=[3.0]), "_shape must be a non-empty list of positive"),
    ("obs _shape negative", _set("observation_space", _shape=[-3]), "_shape must be a non-empty list of positive"),
    ("obs _shape scalar", _set("observation_space", _shape=3), "_shape must be a non-empty list of positive"),
    ("obs complex", _set("observation_space", dtype="complex64"), "observation dtype complex64 is not a real"),
    ("action huge", _set("action_space", _shape=[100000, 100000], low="[-1.]", high="[1.]"), "more than the limit"),
    ("action inverted", _set("action_space", low="[2.]", high="[-2.]"), "low <= high; got low=[2.0] high=[-2.0]"),
    ("action nan", _set("action_space", low="[nan]"), "action bounds must be finite"),
    ("type not str", _set("observation_space", **{":type:": 5}), "no readable observation_space"),
    ("policy_kwargs list", lambda d: d.update(policy_kwargs=[1, 2]), "policy_kwargs is a list, not an object"),
    ("policy_class huge", lambda d: d["policy_class"].update({":serialized:": "A" * (2 << 20)}),
     "policy_class is not a short base64 string"),
]


@pytest.mark.parametrize(("case", "change", "fragment"), BAD_SB3, ids=[c[0] for c in BAD_SB3])
def test_bad_sb3_data_is_refused_in_one_line(ppo_pendulum, tmp_path, case, change, fragment):
    bad = with_data(ppo_pendulum, tmp_path / "bad.zip", change)
    with pytest.raises(ModelLoadError) as e:
        load_policy(bad)
    one_line_error(e, fragment)


def test_deeply_nested_sb3_data_is_refused(ppo_pendulum, tmp_path):
    data = zipfile.ZipFile(ppo_pendulum).read("data")
    bad = rewrite_zip(ppo_pendulum, tmp_path / "deep.zip", data=data[:-1] + b', "x": ' + b"[" * 200000 + b"}")
    with pytest.raises(ModelLoadError) as e:
        load_policy(bad)
    one_line_error(e, "nested too deeply")


BAD_DISCRETE = [
    ("n missing", {"n": None}, "has no \"n\""),
    ("n word", {"n": "two"}, "action_space n must be an integer in [1, "),
    ("n float", {"n": 2.5}, "action_space n must be an integer in [1, "),
    ("n negative", {"n": "-2"}, "action_space n must be an integer in [1, "),
    ("n bool", {"n": True}, "action_space n must be an integer in [1, "),
]


@pytest.mark.parametrize(("case", "fields", "fragment"), BAD_DISCRETE, ids=[c[0] for c in BAD_DISCRETE])
def test_bad_sb3_discrete_space_is_refused(sb3_ppo_cartpole, tmp_path, case, fields, fragment):
    bad = with_data(sb3_ppo_cartpole, tmp_path / "bad.zip", _set("action_space", **fields))
    with pytest.raises(ModelLoadError) as e:
        load_policy(bad)
    one_line_error(e, fragment)


def _deflated_zip(members: dict[str, bytes], bomb: str, bomb_bytes: bytes, repeat: int) -> bytes:
    """A zip of `members` in which member `bomb` is bomb_bytes followed by `repeat` MiB of the same filler,
    deflated (level 1: fast, and still about 220:1 on spaces or zeros)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in members.items():
            if name != bomb:
                z.writestr(name, data, compress_type=zipfile.ZIP_STORED)
                continue
            with z.open(name, "w") as f:
                f.write(bomb_bytes)
                filler = (b" " if name == "data" else b"\0") * (1 << 20)
                for _ in range(repeat):
                    f.write(filler)
                if name == "data":
                    f.write(b"}")
    return out.getvalue()


def _lie_about_size(raw: bytes, name: str, size: int) -> bytes:
    """Patch a member's uncompressed size in the central directory and its local header (zip32 entries)."""
    raw = bytearray(raw)
    end = raw.rfind(b"PK\x05\x06")
    count, = struct.unpack_from("<H", raw, end + 10)
    p, = struct.unpack_from("<I", raw, end + 16)
    for _ in range(count):
        n_name, n_extra, n_comment = struct.unpack_from("<HHH", raw, p + 28)
        if raw[p + 46:p + 46 + n_name].decode() == name:
            local, = struct.unpack_from("<I", raw, p + 42)
            struct.pack_into("<I", raw, p + 24, size)
            struct.pack_into("<I", raw, local + 22, size)
        p += 46 + n_name + n_extra + n_comment
    return bytes(raw)


def test_sb3_zip_bombs_are_refused_before_reading(ppo_pendulum, tmp_path):
    """A 2 MB zip that inflates to 400 MB (the `data` member, or a record inside policy.pth), and a directory
    that lies about a member's size, are refused with peak RSS far below what reading them takes."""
    with zipfile.ZipFile(ppo_pendulum) as z:
        members = {n: z.read(n) for n in z.namelist()}
    data_bomb = tmp_path / "data_bomb.zip"
    data_bomb.write_bytes(_deflated_zip(members, "data", members["data"][:-1], 400))
    liar = tmp_path / "liar.zip"
    liar.write_bytes(_lie_about_size(data_bomb.read_bytes(), "data", len(members["data"])))
    with zipfile.ZipFile(io.BytesIO(members["policy.pth"])) as inner:
        records = {n: inner.read(n) for n in inner.namelist()}
    record = next(n for n in records if "/data/" in n)
    pth = _deflated_zip(records, record, records[record], 400)
    pth_bomb = tmp_path / "pth_bomb.zip"
    pth_bomb.write_bytes(_deflated_zip({**members, "policy.pth": pth}, "", b"", 0))
    assert max(p.stat().st_size for p in (data_bomb, liar, pth_bomb)) < 3 << 20
    script = textwrap.dedent("""
        import json, sys
        from bitrl_compile.frontends import load_policy
        out = []
        for path in sys.argv[1:]:
            try:
                load_policy(path)
                out.append("loaded")
            except Exception as e:
                out.append(f"{type(e).__name__}: {e}")
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) peak, VmHWM at exec
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps({"errors": out, "rss_mb": int(hwm.split()[1]) / 1024}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(data_bomb), str(liar), str(pth_bomb)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = result["errors"]
    assert errors[0].startswith("ModelLoadError") and "expands from" in errors[0] and "zip bomb" in errors[0]
    assert errors[1].startswith("ModelLoadError") and "member 'data' cannot be read" in errors[1]
    assert errors[2].startswith("ModelLoadError") and "policy.pth" in errors[2] and "zip bomb" in errors[2]
    assert all("\n" not in e for e in errors)
    assert result["rss_mb"] < RSS_BOUND_MB, result


def _zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _with_pickle(pth: bytes, edit) -> bytes:
    """policy.pth (a torch zip) with its data.pkl replaced by edit(data.pkl)."""
    with zipfile.ZipFile(io.BytesIO(pth)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    return _zip_of({n: edit(d) if n.endswith("/data.pkl") else d for n, d in members.items()})


def _with_sd(pth: bytes, edit) -> bytes:
    sd = torch.load(io.BytesIO(pth), weights_only=True)
    out = edit(sd)
    return _torch_bytes(sd if out is None else out)


def _drop_records(pth: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(pth)) as z:
        return _zip_of({n: z.read(n) for n in z.namelist() if "/data/" not in n})


BAD_PTH = [  # found by bench/fuzz.py (tests/test_fuzz.py keeps them as reproducers) and their neighbours
    ("pickle lone STOP", lambda p: _with_pickle(p, lambda d: b"."), "corrupt or truncated torch file (IndexError"),
    ("pickle truncated", lambda p: _with_pickle(p, lambda d: d[: len(d) // 2]), "corrupt or truncated torch file"),
    ("records missing", lambda p: _drop_records(p), "corrupt or truncated torch file"),
    ("value None", lambda p: _with_sd(p, lambda sd: sd.update({"mlp_extractor.policy_net.0.weight": None})),
     "'mlp_extractor.policy_net.0.weight' is a NoneType, not a tensor"),
    ("value int", lambda p: _with_sd(p, lambda sd: sd.update({"action_net.bias": 3})), "is a int, not a tensor"),
    ("value dict", lambda p: _with_sd(p, lambda sd: sd.update({"action_net.weight": {}})), "is a dict, not a tensor"),
    ("key int", lambda p: _with_sd(p, lambda sd: sd.update({7: torch.zeros(1)})), "a state_dict key is a int"),
    ("not a dict", lambda p: _with_sd(p, lambda sd: list(sd.values())), "holds a list, not a state_dict"),
    ("action_net 1-D", lambda p: _with_sd(p, lambda sd: sd.update(
        {"action_net.weight": sd["action_net.weight"].reshape(-1)})), ("action_net.weight is a torch.float32 "
                                                                        "tensor of shape (128,); a Linear layer's "
                                                                        "weight is a 2-D floating-point tensor")),
    ("hidden 1-D", lambda p: _with_sd(p, lambda sd: sd.update(
        {"mlp_extractor.policy_net.0.weight": sd["mlp_extractor.policy_net.0.weight"].reshape(-1)})),
     "policy_net.0.weight is a torch.float32 tensor of shape (256,)"),
    ("bias 2-D", lambda p: _with_sd(p, lambda sd: sd.update({"action_net.bias": sd["action_net.bias"][None]})),
     "action_net.bias is a torch.float32 tensor of shape (1, 2)"),
    ("weight int64", lambda p: _with_sd(p, lambda sd: sd.update({"action_net.weight": torch.ones(2, 64).long()})),
     "action_net.weight is a torch.int64 tensor"),
]


@pytest.mark.parametrize(("case", "edit", "fragment"), BAD_PTH, ids=[c[0] for c in BAD_PTH])
def test_bad_sb3_policy_pth_is_refused_in_one_line(sb3_ppo_cartpole, tmp_path, case, edit, fragment):
    pth = zipfile.ZipFile(sb3_ppo_cartpole).read("policy.pth")
    bad = rewrite_zip(sb3_ppo_cartpole, tmp_path / "bad.zip", policy_pth=edit(pth))
    with pytest.raises(ModelLoadError) as e:
        load_policy(bad)
    one_line_error(e, fragment)


def test_policy_pth_with_pickled_code_still_names_trust_pickle(sb3_ppo_cartpole, tmp_path):
    """A class the weights-only unpickler refuses is code, not corruption: the message keeps its fix."""
    import datetime

    pth = _torch_bytes({"action_net.weight": torch.zeros(2, 64), "when": datetime.date(2024, 1, 1)})
    bad = rewrite_zip(sb3_ppo_cartpole, tmp_path / "code.zip", policy_pth=pth)
    with pytest.raises(ModelLoadError) as e:
        load_policy(bad)
    one_line_error(e, "pickled Python objects (code)", "--trust-pickle")


def test_safetensors_library_error_is_quoted_in_one_line(tmp_path):
    """safetensors' own message for an unknown dtype spans lines (it echoes the header); one line is kept."""
    path = mlp_file(tmp_path, GOOD)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["net.0.weight"]["dtype"] = "F32\n"
    path.write_bytes(st_bytes(header, raw[8 + n:]))
    with pytest.raises(ModelLoadError) as e:
        load_policy(path)
    one_line_error(e, "corrupt or truncated safetensors file")


def test_torch_zip_named_safetensors_is_read_as_a_torch_file(tmp_path):
    """torch.load hands a *path* ending in .safetensors to the safetensors library; a torch zip so named is still
    read as what it is."""
    torch.manual_seed(0)
    sd = {"network.0.weight": torch.randn(8, 4), "network.0.bias": torch.zeros(8),
          "network.2.weight": torch.randn(2, 8), "network.2.bias": torch.zeros(2)}
    path = tmp_path / "dqn.safetensors"
    path.write_bytes(_torch_bytes(sd))
    assert load_policy(path).source == "cleanrl-dqn"


def test_scalar_weight_with_a_config_is_refused(tmp_path):
    sd = {"net.0.weight": torch.tensor(1.0), "net.0.bias": torch.zeros(2)}
    with pytest.raises(ModelLoadError) as e:
        load_policy(mlp_file(tmp_path, {"arch": "mlp", "obs_shape": [4], "hidden": []}, sd=sd))
    one_line_error(e, "does not match the config's MLP")


def test_integer_weights_with_a_config_are_refused(tmp_path):
    sd = {"net.0.weight": torch.ones(2, 4, dtype=torch.int32), "net.0.bias": torch.zeros(2)}
    with pytest.raises(ModelLoadError) as e:
        load_policy(mlp_file(tmp_path, {"arch": "mlp", "obs_shape": [4], "hidden": []}, sd=sd))
    one_line_error(e, "net.0.weight is a torch.int32 tensor; an MLP's weights are floating point")


def _peak_rss_of_loading(paths: list[Path]) -> dict:
    """Load each file in a fresh interpreter: {"errors": [one per path], "rss_mb": VmHWM}, the peak resident set
    read from /proc/self/status (the kernel's high-water mark, which no allocation pattern hides)."""
    script = textwrap.dedent("""
        import json, sys
        from bitrl_compile.frontends import load_policy
        out = []
        for path in sys.argv[1:]:
            try:
                load_policy(path, config={"obs_shape": [4]})
                out.append("loaded")
            except Exception as e:
                out.append(f"{type(e).__name__}: {e}")
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps({"errors": out, "rss_mb": int(hwm.split()[1]) / 1024}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, paths)], check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_torch_archive_zip_bombs_are_refused_before_reading(tmp_path):
    """A .pt2, a TorchScript archive and a zip-format .pt whose weight record inflates 400 MB from under 3 MB, and a
    .pt2 whose inner torch archive (sample_inputs/model.pt) holds such a record, are refused from the zip
    directories with peak RSS far below what reading them takes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ep = torch.export.export(net, (torch.zeros(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "ok.pt2")
    torch.jit.script(net).save(str(tmp_path / "ok_ts.pt"))
    (tmp_path / "ok_sd.pt").write_bytes(_torch_bytes({"network.0.weight": torch.zeros(8, 4)}))

    def bomb(src: Path, dst: str, pick) -> Path:
        with zipfile.ZipFile(src) as z:
            members = {n: z.read(n) for n in z.namelist()}
        name = next(n for n in members if pick(n))
        out = tmp_path / dst
        out.write_bytes(_deflated_zip(members, name, members[name], 400))
        return out

    pt2 = bomb(tmp_path / "ok.pt2", "bomb.pt2", lambda n: n.endswith("/weights/weight_0"))
    ts = bomb(tmp_path / "ok_ts.pt", "bomb_ts.pt", lambda n: n.endswith("/data/0"))
    sd = bomb(tmp_path / "ok_sd.pt", "bomb_sd.pt", lambda n: n.endswith("/data/0"))
    with zipfile.ZipFile(tmp_path / "ok.pt2") as z:
        members = {n: z.read(n) for n in z.namelist()}
    sample = next(n for n in members if n.endswith("sample_inputs/model.pt"))
    (tmp_path / "sample.pt").write_bytes(members[sample])
    members[sample] = bomb(tmp_path / "sample.pt", "sample_bomb.pt", lambda n: "/data/" in n).read_bytes()
    inner = tmp_path / "inner_bomb.pt2"
    inner.write_bytes(_zip_of(members))
    paths = [pt2, ts, sd, inner]
    assert max(p.stat().st_size for p in paths) < 3 << 20
    result = _peak_rss_of_loading(paths)
    for path, error in zip(paths, result["errors"]):
        assert error.startswith("ModelLoadError") and "zip bomb" in error and "\n" not in error, (path, error)
    assert "sample_inputs/model.pt" in result["errors"][3]
    assert result["rss_mb"] < RSS_BOUND_MB, result
    with pytest.raises(ModelLoadError) as e:  # trusting the pickles is not trusting the sizes
        load_policy(inner, trust_pickle=True)
    one_line_error(e, "sample_inputs/model.pt", "zip bomb")


# ---------------------------------------------------------------- "mlp" config and CleanRL state_dicts

def mlp_file(tmp_path: Path, config, sd=None, name="policy.safetensors") -> Path:
    torch.manual_seed(0)
    sd = sd or {"net.0.weight": torch.randn(8, 4), "net.0.bias": torch.zeros(8),
                "net.2.weight": torch.randn(2, 8), "net.2.bias": torch.zeros(2)}
    meta = {"config": config if isinstance(config, str) else json.dumps(config)}
    path = tmp_path / name
    path.write_bytes(st_save(sd, metadata=meta))
    return path


GOOD = {"arch": "mlp", "obs_shape": [4], "hidden": [8], "output": {"kind": "discrete", "n": 2}}
BAD_CONFIGS = [
    ("hidden terabytes", {**GOOD, "hidden": [1 << 20, 1 << 20]}, "does not match the config's MLP"),
    ("hidden over limit", {**GOOD, "hidden": [1 << 40]}, "larger than the limit"),
    ("hidden negative", {**GOOD, "hidden": [-8]}, "each \"hidden\" width must be a positive integer, got -8"),
    ("hidden str", {**GOOD, "hidden": ["8"]}, "must be a positive integer, got '8'"),
    ("hidden float", {**GOOD, "hidden": [8.0]}, "must be a positive integer, got 8.0"),
    ("hidden bool", {**GOOD, "hidden": [True]}, "must be a positive integer, got True"),
    ("hidden not list", {**GOOD, "hidden": 8}, "\"hidden\" must be a list of layer widths"),
    ("hidden a string of two lines (found by bench/fuzz.py)", {**GOOD, "hidden": "bad\nsecond line"},
     "\"hidden\" must be a list of layer widths, got 'bad\\nsecond line'"),
    ("obs_shape str", {**GOOD, "obs_shape": ["4"]}, "\"obs_shape\" must be a non-empty list"),
    ("obs_shape int", {**GOOD, "obs_shape": 4}, "\"obs_shape\" must be a non-empty list"),
    ("output n huge", {**GOOD, "output": {"kind": "discrete", "n": 10 ** 12}}, "larger than the limit"),
    ("output n word", {**GOOD, "output": {"kind": "discrete", "n": "two"}}, "output \"n\" must be a positive"),
    ("output shape", {**GOOD, "output": {"kind": "continuous", "shape": [-2]}}, "output \"shape\" must be"),
    ("output list", {**GOOD, "output": [1]}, "\"output\" must be an object"),
    ("activation list", {**GOOD, "activation": ["tanh"]}, "unknown activation"),
    ("config list", "[1, 2]", "the metadata \"config\" is a JSON list, not an object"),
    ("config deep", "[" * 100000 + "]" * 100000, "the metadata \"config\" is not JSON"),
]


@pytest.mark.parametrize(("case", "config", "fragment"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_mlp_configs_are_refused_before_building_the_network(tmp_path, case, config, fragment):
    path = mlp_file(tmp_path, config)
    with pytest.raises(ModelLoadError) as e:
        load_policy(path)
    one_line_error(e, fragment)


def test_good_mlp_config_still_loads(tmp_path):
    loaded = load_policy(mlp_file(tmp_path, GOOD))
    assert loaded.description == "MLP [4, 8, 2] tanh"


@pytest.mark.parametrize("obs_shape", [["4"], 4, [0], [2, -2]])
def test_bad_cleanrl_obs_shape_is_refused(tmp_path, obs_shape):
    torch.manual_seed(0)
    sd = {"network.0.weight": torch.randn(8, 4), "network.0.bias": torch.zeros(8),
          "network.2.weight": torch.randn(2, 8), "network.2.bias": torch.zeros(2)}
    path = tmp_path / "dqn.safetensors"
    path.write_bytes(st_save(sd))
    with pytest.raises(ModelLoadError) as e:
        load_policy(path, config={"obs_shape": obs_shape})
    one_line_error(e, "observation shape (\"obs_shape\") must be a non-empty list")


# ---------------------------------------------------------------- normalisation statistics

BAD_STATS = [
    ("eps negative", {"mean": [0.0] * 4, "var": [1.0] * 4, "epsilon": -1e-8}, "eps must be a finite number > 0"),
    ("clip zero", {"mean": [0.0] * 4, "var": [1.0] * 4, "clip_obs": 0}, "clip must be a finite number > 0"),
    ("var negative", {"mean": [0.0] * 4, "var": [1.0, -1.0, 1.0, 1.0]}, "var >= 0"),
    ("mean strings", {"mean": ["a"] * 4, "var": [1.0] * 4}, "must hold real numbers"),
    ("sizes differ", {"mean": [0.0] * 4, "var": [1.0] * 3}, "has 3 values, expected 4"),
    ("list", [[0.0] * 4, [1.0] * 4], "the statistics are a JSON list, not an object"),
]


@pytest.mark.parametrize(("case", "stats", "fragment"), BAD_STATS, ids=[c[0] for c in BAD_STATS])
def test_bad_normalisation_statistics_are_refused(tmp_path, case, stats, fragment):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    with pytest.raises(ModelLoadError) as e:
        read_normalization(path)
    one_line_error(e, fragment)


def test_npz_declaring_a_huge_array_is_refused_before_numpy_allocates_it(tmp_path):
    header = {"descr": "<f8", "fortran_order": False, "shape": (1 << 20, 1 << 20)}
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)
    path = tmp_path / "stats.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mean.npy", npy.getvalue() + bytes(32))
        z.writestr("var.npy", npy.getvalue() + bytes(32))
    with pytest.raises(ModelLoadError) as e:
        read_normalization(path)
    one_line_error(e, "declares a (1048576, 1048576) float64 array that its bytes do not hold")


def test_deeply_nested_config_file_is_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"hidden": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ModelLoadError) as e:
        load_policy(mlp_file(tmp_path, GOOD), config=str(config))
    one_line_error(e, "not readable JSON")


def test_deeply_nested_statistics_are_refused(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text('{"mean": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ModelLoadError) as e:
        read_normalization(path)
    one_line_error(e, "not valid JSON")
