"""Every malformed input gets one clear line, nothing is executed or lost: one case per row.

Each case builds a real bad input in a temporary folder and calls the real API, or runs the real
`bitrl-compile` (`_cli`: a subprocess; what it exits with and the line it prints; `_cli_here`: the same `main`
in this process, for the commands that import torch). Running this file as a script prints the cases, the
messages users actually see and the exit codes as a markdown table:

    python tests/test_bad_inputs.py > docs/bad-inputs.md

To add a case: a function that builds the bad input in `tmp` and calls the API (or `_cli`), and one `Case`
line in CASES (its area, the exception, a fragment the message must contain, and for `_cli` the exit code).
Fixtures are built once per run and copied before a case damages them: `_artifact()`, `_keys()`, `_sb3()`,
`_pt2()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save as st_save
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from bitrl_compile import pipeline
from bitrl_compile.cli import main as cli_main
from bitrl_compile.cli.common import INTERNAL, exit_code
from bitrl_compile.devices import EmulatorError, qemu_binary
from bitrl_compile.frontends import load_policy, save_mlp_policy
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime import ArtifactError, load, signing, write_artifact
from bitrl_compile.runtime.artifact import sign_artifact
from relax_models import LAST_TOKEN_INPUT, LastToken, mlp

SPEC_IN = {"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None}
SPEC_OUT = {"kind": "discrete", "n": 2, "outputs": "logits"}
MLP_CONFIG = {"arch": "mlp", "obs_shape": [4], "hidden": [16], "activation": "relu", "output": SPEC_OUT}


def _loaded(module=None) -> LoadedPolicy:
    return LoadedPolicy(module=module or mlp((4, 16, 2)), onnx_model=None, input=dict(SPEC_IN),
                        output=dict(SPEC_OUT), source="test")


_ARTIFACTS: dict[str, Path] = {}


def _artifact(target: str = "host") -> Path:
    """One compiled artifact per target for the whole run (copied before a case damages it)."""
    if target not in _ARTIFACTS:
        folder = Path(tempfile.mkdtemp(prefix="bitrl-bad-"))
        _ARTIFACTS[target] = pipeline.compile_policy(_loaded(), target, folder / f"{target}.bitrl").path
    return _ARTIFACTS[target]


def _rewrite(tmp: Path, change: Callable[[dict], None]) -> Path:
    with zipfile.ZipFile(_artifact()) as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    out = tmp / "changed.bitrl"
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out


class _Evil:
    """Unpickling this creates a file: proof of code execution if it ever appears."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---------------------------------------------------------------------------------------- model files

def pickle_without_trust(tmp: Path):
    _Evil.marker = str(tmp / "PWNED")
    torch.save({"net.0.weight": _Evil()}, tmp / "model.pt")
    try:
        load_policy(tmp / "model.pt", config=MLP_CONFIG)
    finally:
        assert not (tmp / "PWNED").exists(), "the pickle was executed"


def sb3_zip_truncated(tmp: Path):
    good = tmp / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("data", json.dumps({"policy_class": {}}))
        z.writestr("policy.pth", os.urandom(4096))
    (tmp / "model.zip").write_bytes(good.read_bytes()[:-300])
    load_policy(tmp / "model.zip")


def safetensors_corrupt(tmp: Path):
    save_mlp_policy(tmp / "good.safetensors", mlp((4, 16, 2)), MLP_CONFIG)
    (tmp / "model.safetensors").write_bytes((tmp / "good.safetensors").read_bytes()[:200])
    load_policy(tmp / "model.safetensors")


def onnx_corrupt(tmp: Path):
    (tmp / "model.onnx").write_bytes(b"\x08\x07\x12\x04garbage-not-a-model")
    load_policy(tmp / "model.onnx")


def torchscript_corrupt(tmp: Path):
    torch.jit.script(mlp((4, 8, 2))).save(str(tmp / "good.pt"))
    (tmp / "model.pt").write_bytes((tmp / "good.pt").read_bytes()[:-700])
    load_policy(tmp / "model.pt")


def wrong_kind_of_file(tmp: Path):
    (tmp / "model.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    load_policy(tmp / "model.pt")


def state_dict_mismatch(tmp: Path):
    sd = {k: v for k, v in mlp((4, 16, 2)).state_dict().items()}
    sd["0.weight"] = torch.zeros(16, 5)
    torch.save(sd, tmp / "model.pt")
    load_policy(tmp / "model.pt", config=MLP_CONFIG)


def nan_weights(tmp: Path):
    model = mlp((4, 16, 2))
    with torch.no_grad():
        model[2].weight[0, 3] = float("nan")
    torch.save(model.state_dict(), tmp / "model.pt")
    load_policy(tmp / "model.pt", config=MLP_CONFIG)


def all_zero_layer(tmp: Path):
    model = mlp((4, 16, 2))
    with torch.no_grad():
        model[2].weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline.compile_policy(_loaded(model), "host", tmp / "p.bitrl")


def unsupported_op(tmp: Path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return torch.special.i0e(self.fc(x))

    pipeline.compile_policy(_loaded(Odd()), "host", tmp / "p.bitrl")


# ---------------------------------------------------------------------------------------- compiling

def missing_cross_compiler(tmp: Path):
    path = os.environ["PATH"]
    os.environ["PATH"] = str(tmp)  # no aarch64-linux-gnu-g++ in here
    try:
        pipeline.compile_policy(_loaded(), "rasp4", tmp / "p.bitrl")
    finally:
        os.environ["PATH"] = path


def missing_qemu(tmp: Path):
    path = os.environ["PATH"]
    os.environ["PATH"] = str(tmp)
    try:
        qemu_binary()
    finally:
        os.environ["PATH"] = path


def unknown_target(tmp: Path):
    pipeline.compile_policy(_loaded(), "pi-zero", tmp / "p.bitrl")


def output_exists(tmp: Path):
    (tmp / "p.bitrl").write_bytes(b"precious")
    try:
        pipeline.compile_policy(_loaded(), "host", tmp / "p.bitrl")
    finally:
        assert (tmp / "p.bitrl").read_bytes() == b"precious"


def output_not_writable(tmp: Path):
    pipeline.compile_policy(_loaded(), "host", tmp / "no" / "such" / "folder" / "p.bitrl")


def interrupted_write(tmp: Path):
    class Interrupt(bytes):  # zipfile asks for the member's length while writing it: stop right there
        def __len__(self):
            raise KeyboardInterrupt("interrupted while writing")

    try:
        write_artifact(tmp / "p.bitrl", {"target": {}}, {"lib.so": b"x", "params.safetensors": Interrupt(b"y")})
    finally:
        assert list(tmp.iterdir()) == [], "a partial file was left behind"


# ---------------------------------------------------------------------------------------- artifacts

def tampered_member(tmp: Path):
    load(_rewrite(tmp, lambda m: m.update({"params.safetensors": m["params.safetensors"][:-1] + b"\x01"})))


def newer_format_version(tmp: Path):
    def bump(m):
        manifest = json.loads(m["manifest.json"])
        manifest["format_version"] = 99
        m["manifest.json"] = json.dumps(manifest).encode()

    load(_rewrite(tmp, bump))


def missing_member(tmp: Path):
    load(_rewrite(tmp, lambda m: m.pop("lib.so")))


def not_an_artifact(tmp: Path):
    (tmp / "p.bitrl").write_bytes(b"PK\x03\x04 this is not a zip")
    load(tmp / "p.bitrl")


def artifact_for_another_architecture(tmp: Path):
    load(_artifact("rasp4"))


# ---------------------------------------------------------------------------------------- runtime inputs

# ---------------------------------------------------------------------------------------- tuning

def broken_tuning_database(tmp: Path):
    from bitrl_compile.targets import get_target, tuning

    (tmp / "host").mkdir()
    tuning.database_path(get_target("host"), folder=tmp / "host").write_text('{"format": "bitrl-tuning", "recor')
    pipeline.compile_policy(_loaded(), "host", tmp / "p.bitrl", tuning_db=tmp / "host")


def tuning_a_pi_without_a_board(tmp: Path):
    from bitrl_compile.targets import autotune, tuning

    autotune.tune([tuning.KernelKey(16, 16)], "rasp4", trials=1, db=tmp)


def tuning_board_unreachable(tmp: Path):
    from bitrl_compile.targets import autotune, tuning

    autotune.tune([tuning.KernelKey(16, 16)], "rasp4", trials=1, db=tmp, rpc="127.0.0.1:1")


# ---------------------------------------------------------------------------------------- the command line

class CliExit(Exception):
    """What a user of the real `bitrl-compile` sees: its exit code and the line that says why."""

    def __init__(self, code: int, line: str):
        super().__init__(line)
        self.code = code


def _line(stderr: str) -> str:
    """The line that says why: click's `Error: ...`, our `bitrl-compile: ...`, else the first (`Usage: ...`)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith(("Error:", "bitrl-compile:"))]
    return ours[0] if ours else lines[0] if lines else "(nothing)"


def _cli(*args, cwd=None, check=None) -> None:
    """Run `bitrl-compile ARGS` and raise CliExit with what it exits with and says; `check(stderr)` first."""
    env = {k: v for k, v in os.environ.items() if k != signing.ENV}  # trusted keys: only those a case gives
    r = subprocess.run([sys.executable, "-m", "bitrl_compile.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=600, check=False, env=env)
    assert "Traceback" not in r.stderr, r.stderr
    if check is not None:
        check(r.stderr)
    raise CliExit(r.returncode, _line(r.stderr))


def _cli_here(*args) -> None:
    """`_cli` without a new interpreter: the same `main` with its exit code, run in this process, for the
    commands that import torch (four seconds a process). The exception behind a refusal must be one line
    itself (the CLI prints only its first line), and nothing may escape `main` (CliRunner: exit 1)."""
    r = CliRunner().invoke(cli_main, [str(a) for a in args], prog_name="bitrl-compile",
                           env={signing.ENV: None})
    assert "Traceback" not in r.stderr, r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise CliExit(INTERNAL, f"escaped main: {type(r.exception).__name__}: {r.exception}")
    cause = r.exception.__context__ if isinstance(r.exception, SystemExit) else None
    if cause is not None:
        assert "\n" not in str(cause).strip(), f"more than one line: {str(cause)!r}"
    raise CliExit(r.exit_code, _line(r.stderr))


def _model(tmp: Path) -> Path:
    save_mlp_policy(tmp / "model.safetensors", mlp((4, 16, 2)), MLP_CONFIG)
    return tmp / "model.safetensors"


def _not_compiled(stderr: str) -> None:
    assert "imported" not in stderr, "the compile ran before the output was checked"


def cli_no_arguments(tmp: Path):
    _cli()


def cli_unknown_option(tmp: Path):
    _cli("inspect", "p.bitrl", "--bogus")


def cli_misspelt_command(tmp: Path):
    _cli("inspct", "p.bitrl", cwd=tmp)


def cli_zero_episodes(tmp: Path):
    _cli("run", "p.bitrl", "--env", "CartPole-v1", "--episodes", 0)


def cli_zero_threads(tmp: Path):
    _cli("tune", "model.safetensors", "--threads", 0, "--db", tmp)


def cli_zero_steps(tmp: Path):
    _cli("train", "--env", "CartPole-v1", "--steps", 0)


def cli_malformed_widths(tmp: Path):
    _cli("train", "--env", "CartPole-v1", "--hidden", "64,x")


def cli_output_is_a_folder(tmp: Path):
    (tmp / "out.bitrl").mkdir()
    _cli(_model(tmp), "-o", tmp / "out.bitrl")


def cli_output_name_too_long(tmp: Path):
    _cli(_model(tmp), "-o", tmp / ("p" * 250 + ".bitrl"), check=_not_compiled)


def cli_output_is_the_input(tmp: Path):
    (tmp / "out.bitrl").symlink_to(_model(tmp))
    before = (tmp / "model.safetensors").read_bytes()
    try:
        _cli(tmp / "model.safetensors", "-o", tmp / "out.bitrl", "--force")
    finally:
        assert (tmp / "model.safetensors").read_bytes() == before


def cli_output_folder_missing(tmp: Path):
    _cli(_model(tmp), "-o", tmp / "no" / "p.bitrl", check=_not_compiled)


def cli_demo_unknown_target(tmp: Path):
    try:
        _cli("demo", "--targets", "bogus", "--out", tmp / "d")
    finally:
        assert not (tmp / "d").exists(), "an empty output folder was left"


def _signal_mid_write(signum: int):
    """A real compile whose artifact write is held open (its fsync sleeps) until the signal lands."""

    def case(tmp: Path):
        # Ctrl-C as a terminal delivers it: a shell starts background jobs (a test run with `&`, nohup) with SIGINT
        # ignored, which Python and its children then keep
        hold = ("import os, signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                "fsync = os.fsync\nos.fsync = lambda fd: (time.sleep(600), fsync(fd))\n"
                "from bitrl_compile.cli import main\nmain(sys.argv[1:], prog_name='bitrl-compile')\n")
        proc = subprocess.Popen([sys.executable, "-c", hold, _model(tmp), "--no-tuning", "-o", tmp / "p.bitrl"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 300
            while not list(tmp.glob(".p.bitrl.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert list(tmp.glob(".p.bitrl.*.tmp")), "the compile never started writing"
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert sorted(p.name for p in tmp.iterdir()) == ["model.safetensors"], "a partial file was left"
        raise CliExit(proc.returncode, _line(err))

    return case


def cli_broken_pipe(tmp: Path):
    proc = subprocess.Popen([sys.executable, "-m", "bitrl_compile.cli", "inspect", _artifact()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # `| head -1` that has already gone
    err = proc.stderr.read()
    proc.wait()
    assert err == "", err
    raise CliExit(proc.returncode, "(nothing: exits quietly, as `yes | head -1` does)")


# ---------------------------------------------------------------------------------------- artifacts (forged)

def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _forge(tmp: Path, manifest=None, members=None, raw: bytes | None = None, src: Path | None = None) -> Path:
    """What an attacker does: change the manifest or members of the artifact and recompute every hash, the
    manifest's own (manifest.sha256) included; signatures.json is kept as it was."""
    blobs = _members(src or _artifact())
    m = json.loads(blobs.pop("manifest.json"))
    blobs.pop("manifest.sha256")
    if members:
        members(blobs)
    if manifest:
        m = manifest(m)
    if isinstance(m, dict):
        m["members"] = {n: hashlib.sha256(blobs[n]).hexdigest() if n in blobs else d
                        for n, d in m["members"].items()}
    text = json.dumps(m).encode() if raw is None else raw
    return _zip(tmp / "forged.bitrl", {"manifest.json": text,
                                       "manifest.sha256": hashlib.sha256(text).hexdigest().encode(), **blobs})


def _inspect(**forge):
    return lambda tmp: _cli("inspect", _forge(tmp, **forge))


def _run(path: Path, *keys: Path) -> None:
    trusted = (a for key in keys for a in ("--trusted-key", key))
    _cli("run", path, "--env", "CartPole-v1", "--episodes", 1, *trusted)


def manifest_edited_in_place(tmp: Path):
    def edit(m):
        manifest = json.loads(m["manifest.json"])
        manifest["input"]["normalize"] = {"mean": [0] * 4, "var": [1e6] * 4, "eps": 1e-8, "clip": None}
        m["manifest.json"] = json.dumps(manifest).encode()  # manifest.sha256 left as it was

    _cli("inspect", _rewrite(tmp, edit))


def member_twice(tmp: Path):
    path = _zip(tmp / "twice.bitrl", _members(_artifact()))
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as z:
        warnings.simplefilter("ignore")  # zipfile's "Duplicate name": what an attacker ignores too
        z.writestr("lib.so", b"other")
    _cli("inspect", path)


def artifact_zip_bomb(tmp: Path):
    path = _forge(tmp, members=lambda b: b.update({"lib.so": bytes(8 << 20)}))  # 8 MiB of zeros: 36 KB stored
    _cli("inspect", path)


def lib_so_garbage(tmp: Path):
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _run(_forge(tmp, members=lambda b: b.update({"lib.so": garbage})))


def lib_so_truncated(tmp: Path):  # the loader would map past the end of the file: SIGBUS unless checked first
    _run(_forge(tmp, members=lambda b: b.update({"lib.so": b["lib.so"][: len(b["lib.so"]) // 2]})))


# ---------------------------------------------------------------------------------------- signatures

_KEYS: list[tuple[Path, Path, str]] = []


def _keys() -> tuple[Path, Path, str]:
    """One Ed25519 key pair for the whole run: (private, public, key id), from a fixed seed so that the key id
    in docs/bad-inputs.md stays the same from one generation to the next."""
    if not _KEYS:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"tests/test_bad_inputs.py").digest())
        private = Path(tempfile.mkdtemp(prefix="bitrl-bad-")) / "release"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        public = private.with_name("release.pub")
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        _KEYS.append((private, public, signing.key_id(key.public_key().public_bytes_raw())))
    return _KEYS[0]


def unsigned_with_trusted_key(tmp: Path):
    _run(_artifact(), _keys()[1])


def changed_after_signing(tmp: Path):
    signed = tmp / "signed.bitrl"
    shutil.copy(_artifact(), signed)
    sign_artifact(signed, _keys()[0])
    _run(_forge(tmp, manifest=lambda m: dict(m, stats={}), src=signed), _keys()[1])  # every hash consistent


def sign_with_public_key(tmp: Path):
    shutil.copy(_artifact(), tmp / "p.bitrl")
    try:
        _cli("sign", tmp / "p.bitrl", "--key", _keys()[1])
    finally:
        assert "signatures.json" not in _members(tmp / "p.bitrl")


def keygen_onto_existing_key(tmp: Path):
    shutil.copy(_keys()[0], tmp / "release")
    try:
        _cli("keygen", "--out", tmp / "release")
    finally:
        assert (tmp / "release").read_bytes() == _keys()[0].read_bytes(), "the key was overwritten"


# ---------------------------------------------------------------------------------------- model files (CLI)

_SB3: list[Path] = []


def _sb3() -> Path:
    """A tiny PPO Pendulum-v1 zip trained once for the whole run (a Box action space with bounds)."""
    if not _SB3:
        from stable_baselines3 import PPO

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = PPO("MlpPolicy", "Pendulum-v1", seed=0, n_steps=64, batch_size=32, n_epochs=1,
                        policy_kwargs={"net_arch": [8]}).learn(64)
        finally:
            torch.set_num_threads(threads)
        path = Path(tempfile.mkdtemp(prefix="bitrl-bad-")) / "ppo.zip"
        model.save(path)
        _SB3.append(path)
    return _SB3[0]


def _sb3_with(tmp: Path, change: Callable[[dict], object]) -> Path:
    """The SB3 zip with its `data` changed (`change` edits it in place, or returns what replaces it)."""
    members = _members(_sb3())
    data = json.loads(members["data"])
    out = change(data)
    members["data"] = json.dumps(data if out is None else out).encode()
    path = tmp / "model.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return path


def _compile_sb3(change: Callable[[dict], object]):
    return lambda tmp: _cli_here(_sb3_with(tmp, change), "-o", tmp / "p.bitrl")


def _space(space: str, **fields):
    def change(data):
        for key, value in fields.items():
            if value is None:
                data[space].pop(key, None)
            else:
                data[space][key] = value
    return change


def sb3_data_bomb(tmp: Path):
    members = _members(_sb3())
    data = re.sub(rb'"start_time": \d+', b'"start_time": 0', members["data"])  # the same sizes every run
    data = re.sub(rb" at 0x[0-9a-f]+>", b">", data)  # the reprs of functions SB3 writes
    path = tmp / "model.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, blob in members.items():
            if name != "data":
                z.writestr(name, blob, compress_type=zipfile.ZIP_STORED)
        with z.open("data", "w") as f:  # the JSON, then 16 MiB of spaces: about 80 KB stored
            f.write(data.rstrip()[:-1])
            for _ in range(16):
                f.write(b" " * (1 << 20))
            f.write(b"}")
    _cli_here(path, "-o", tmp / "p.bitrl")


def _mlp_file(tmp: Path, **config) -> Path:
    torch.manual_seed(0)
    sd = {"net.0.weight": torch.randn(8, 4), "net.0.bias": torch.zeros(8),
          "net.2.weight": torch.randn(2, 8), "net.2.bias": torch.zeros(2)}
    meta = {"config": json.dumps({**MLP_CONFIG, **config})}
    (tmp / "model.safetensors").write_bytes(st_save(sd, metadata=meta))
    return tmp / "model.safetensors"


def config_negative_width(tmp: Path):
    _cli_here(_mlp_file(tmp, hidden=[-8]), "-o", tmp / "p.bitrl")


def config_huge_layers(tmp: Path):
    _cli_here(_mlp_file(tmp, hidden=[1 << 40]), "-o", tmp / "p.bitrl")


def safetensors_offsets_outside(tmp: Path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 40]}}).encode()
    (tmp / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    _cli_here(tmp / "model.safetensors", "-o", tmp / "p.bitrl")


def negative_eps_statistics(tmp: Path):
    (tmp / "stats.json").write_text(json.dumps({"mean": [0.0] * 4, "var": [1.0] * 4, "epsilon": -1e-8}))
    _cli_here(_model(tmp), "--vecnormalize", tmp / "stats.json", "-o", tmp / "p.bitrl")


def vecnormalize_without_statistics(tmp: Path):
    def under_vecnormalize(data):  # PPO keeps the un-normalised observation only under a VecNormalize
        data["_last_original_obs"] = data["_last_obs"]

    path = _sb3_with(tmp, under_vecnormalize)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_policy(path)


# ---------------------------------------------------------------------------------------- formats

_PT2: dict[str, Path] = {}


def _pt2(name: str) -> Path:
    """Small torch.export programs, each exported once for the whole run."""
    if name not in _PT2:
        torch.manual_seed(0)
        n_in, dynamic = 3, ({0: torch.export.Dim("batch")},)

        def actor(n_out):
            return nn.Sequential(nn.Linear(n_in, 16), nn.Tanh(), nn.Linear(16, n_out))

        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.pi, self.v = nn.Linear(n_in, 2), nn.Linear(n_in, 1)

            def forward(self, x):
                return self.pi(x), self.v(x)

        x = torch.zeros(2, n_in)
        if name == "one-output":
            module = actor(1)
        elif name == "three-outputs":
            module = actor(3)
        elif name == "two-heads":
            module = TwoHeads()
        elif name == "batch-from-2":
            module, dynamic = actor(2), {"input": {0: torch.export.Dim("batch", min=2, max=64)}}
        else:
            module = nn.Sequential(nn.Conv2d(1, 4, 3, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
            x = torch.zeros(2, 1, 8, 8)
        folder = Path(tempfile.mkdtemp(prefix="bitrl-bad-"))
        program = torch.export.export(module.eval(), (x,), dynamic_shapes=dynamic)
        torch.export.save(program, folder / f"{name}.pt2")
        _PT2[name] = folder / f"{name}.pt2"
    return _PT2[name]


def _compile_pt2(name: str, *args):
    return lambda tmp: _cli_here(_pt2(name), *args, "-o", tmp / "p.bitrl")


def output_width_differs(tmp: Path):
    (tmp / "config.json").write_text(json.dumps({"output": dict(SPEC_OUT, n=3)}))
    _cli_here(_pt2("one-output"), "--config", tmp / "config.json", "-o", tmp / "p.bitrl")


def disagrees_with_reference(tmp: Path):
    """TVM 0.27 lowers x[:, -1] to take(x, -1, mode="fast"), which reads out of bounds."""
    try:
        loaded = LoadedPolicy(LastToken().eval(), None, LAST_TOKEN_INPUT, dict(SPEC_OUT), "test")
        pipeline.compile_policy(loaded, "host", tmp / "p.bitrl")
    finally:
        assert list(tmp.iterdir()) == [], "the artifact was written"


def _stock_bitnet(tmp: Path, **config) -> Path:
    """A tiny Hugging Face-layout BitNet checkpoint (bf16), its config.json changed by `config` (None: removed)."""
    from bitrl_compile import bitnet

    torch.manual_seed(0)
    folder = bitnet.save_bitnet(bitnet.BitNetForCausalLM(bitnet.BitNetConfig(num_hidden_layers=1)), tmp / "bitnet")
    cfg = {**json.loads((folder / "config.json").read_text()), **config}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return folder


def _compile_stock_bitnet(*args, mem_available: int | None = None, **config):
    """`bitrl-compile FOLDER --encoder text --env CartPole-v1 ARGS` on a changed stock checkpoint; nothing written."""
    def case(tmp: Path):
        from bitrl_compile.bitnet.checkpoint import MEM_ENV

        folder = _stock_bitnet(tmp, **config)
        old = os.environ.get(MEM_ENV)
        if mem_available is not None:
            os.environ[MEM_ENV] = str(mem_available)
        try:
            _cli_here(folder, "--env", "CartPole-v1", *args, "-o", tmp / "out.bitrl")
        finally:
            if old is None:
                os.environ.pop(MEM_ENV, None)
            else:
                os.environ[MEM_ENV] = old
            assert not (tmp / "out.bitrl").exists()
    return case


def _encoder_on_a_policy_file(tmp: Path):
    _cli_here(_model(tmp), "--encoder", "text", "--env", "CartPole-v1")


def cleanrl_atari_on_raw_frames(tmp: Path):
    """cleanrl/dqn_atari.py's Q-network (its wrappers give (4, 84, 84) stacked grey frames) compiled with an env
    whose observations are other frames: the built-in pixel CartPole's 36x36x3 (an Atari id would give 210x160x3)."""
    import bitrl_compile.envs  # noqa: F401 - registers the pixel task

    torch.manual_seed(0)
    layers = [nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
              nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
              nn.Linear(512, 2)]
    torch.save({f"network.{k}": v for k, v in nn.Sequential(*layers).state_dict().items()}, tmp / "agent.pt")
    load_policy(tmp / "agent.pt", config={"env": "bitrl_compile.envs:BitrlPixelCartPole-v0"})


def _act(obs):
    return lambda tmp: load(_artifact()).act(obs)


@dataclass
class Case:
    name: str
    area: str
    run: Callable[[Path], object]
    error: type | tuple
    says: str  # a fragment the message must contain (the problem or the fix)
    code: int | None = None  # the exit code `_cli` must see (API cases: the CLI's mapping of the exception)


CASES = [
    Case("pickle without --trust-pickle", "model file", pickle_without_trust, ModelLoadError, "--trust-pickle"),
    Case("truncated SB3 zip", "model file", sb3_zip_truncated, ModelLoadError, "truncated"),
    Case("corrupt safetensors", "model file", safetensors_corrupt, ModelLoadError, "safetensors"),
    Case("corrupt ONNX", "model file", onnx_corrupt, ModelLoadError, "ONNX"),
    Case("corrupt TorchScript", "model file", torchscript_corrupt, ModelLoadError, "model.pt"),
    Case("file of the wrong kind (PNG)", "model file", wrong_kind_of_file, ModelLoadError, "model.pt"),
    Case("state_dict does not match its architecture", "model file", state_dict_mismatch, ModelLoadError,
         "net.0.weight"),
    Case("NaN weight", "model file", nan_weights, ModelLoadError, "NaN"),
    Case("CleanRL Atari agent with an env whose frames are not its (4, 84, 84)", "model file",
         cleanrl_atari_on_raw_frames, ModelLoadError, "but the agent takes [4, 84, 84] frames"),
    Case("all-zero layer (absmean scale 0)", "model file", all_zero_layer, UserWarning, "only zero weights"),
    Case("op we cannot lower", "model file", unsupported_op, pipeline.CompileError, "i0e"),
    Case("missing cross compiler", "compiling", missing_cross_compiler, RuntimeError,
         "apt-get install g++-aarch64-linux-gnu"),
    Case("missing qemu", "compiling", missing_qemu, EmulatorError, "apt-get install qemu-user"),
    Case("unknown target", "compiling", unknown_target, ValueError, "known targets: host, rasp4"),
    Case("output path exists", "compiling", output_exists, FileExistsError, "--force"),
    Case("output folder does not exist", "compiling", output_not_writable, FileNotFoundError, "does not exist"),
    Case("interrupted while writing", "compiling", interrupted_write, KeyboardInterrupt, "interrupted"),
    Case("unreadable tuning database", "tuning", broken_tuning_database, ValueError, "--no-tuning"),
    Case("tuning a Raspberry Pi target without a board", "tuning", tuning_a_pi_without_a_board, ValueError,
         "python3 -m tvm.exec.rpc_server"),
    Case("the board's RPC server does not answer", "tuning", tuning_board_unreachable, ValueError,
         "cannot reach the RPC server"),
    Case("tampered member", "artifact", tampered_member, ArtifactError, "sha256"),
    Case("newer format version", "artifact", newer_format_version, ArtifactError, "upgrade bitrl-compile"),
    Case("missing member", "artifact", missing_member, ArtifactError, "lib.so is missing"),
    Case("not an artifact", "artifact", not_an_artifact, ArtifactError, "not a policy.bitrl"),
    Case("artifact for another architecture", "artifact", artifact_for_another_architecture, ArtifactError,
         "qemu-aarch64"),
    Case("manifest edited without its hash", "artifact", manifest_edited_in_place, CliExit,
         "manifest.json fails its sha256 check", 1),
    Case("format_version not a positive integer (`\"2\"`)", "artifact",
         _inspect(manifest=lambda m: dict(m, format_version="2")), CliExit, "not a positive integer", 1),
    Case("manifest is a JSON list", "artifact", _inspect(manifest=lambda m: [m]), CliExit,
         "holds a JSON list, not an object", 1),
    Case("unknown member (`run_me.sh` added to the zip)", "artifact",
         _inspect(members=lambda b: b.update({"run_me.sh": b"echo"})), CliExit, "unknown member 'run_me.sh'",
         1),
    Case("member twice in the zip", "artifact", member_twice, CliExit, "holds member lib.so twice", 1),
    Case("zip bomb member (`lib.so`: 8 MiB of zeros, deflated)", "artifact", artifact_zip_bomb, CliExit,
         "a zip bomb", 1),
    Case("manifest JSON nested 65 deep", "artifact",
         _inspect(raw=b'{"format": "bitrl", "format_version": 2, "x": ' + b"[" * 65 + b"]" * 65 + b"}"),
         CliExit, "nests deeper than 64 levels", 1),
    Case("manifest field of the wrong type (a plan's call is a number)", "artifact",
         _inspect(manifest=lambda m: {**m, "entry_points": {**m["entry_points"], "act": {
             **m["entry_points"]["act"], "calls": [1]}}}), CliExit, "entry_points.act.calls[0] is not an object", 1),
    Case("manifest names a parameter that params.safetensors lacks", "artifact",
         _inspect(manifest=lambda m: {**m, "vm_params": {"main": ["zz"]}}), CliExit, "not in manifest params", 1),
    Case("manifest claims 7 outputs for a 2-output network", "artifact",
         lambda tmp: _run(_forge(tmp, manifest=lambda m: dict(m, output=dict(m["output"], n=7)))), CliExit,
         "the output spec says 7 actions but the network outputs 2 values", 1),
    Case("garbage lib.so (`run`)", "artifact", lib_so_garbage, CliExit, "not an ELF library", 1),
    Case("truncated lib.so (`run`)", "artifact", lib_so_truncated, CliExit, "a segment ends past the file",
         1),
    Case("unsigned artifact, `run --trusted-key K.pub`", "signatures", unsigned_with_trusted_key, CliExit,
         "is not signed by any trusted key", 1),
    Case("artifact changed after signing (every hash recomputed)", "signatures", changed_after_signing,
         CliExit, "does not verify", 1),
    Case("`sign --key NAME.pub` (the public key)", "signatures", sign_with_public_key, CliExit,
         "a public key", 1),
    Case("`keygen --out K` where K exists (not overwritten)", "signatures", keygen_onto_existing_key, CliExit,
         "--force", 1),
    Case("negative eps in normalisation statistics (`--vecnormalize`)", "specs", negative_eps_statistics,
         CliExit, "eps must be a finite number > 0", 1),
    Case("inverted action bounds (low > high) in an SB3 zip", "specs",
         _compile_sb3(_space("action_space", low="[2.]", high="[-2.]")), CliExit, "low <= high", 1),
    Case("NaN action bound in an SB3 zip", "specs", _compile_sb3(_space("action_space", low="[nan]")),
         CliExit, "action bounds must be finite", 1),
    Case("complex observation dtype in an SB3 zip", "specs",
         _compile_sb3(_space("observation_space", dtype="complex64")), CliExit, "is not a real", 1),
    Case("output spec's width differs from the network's (`--config` says 3 actions, 1 output)", "specs",
         output_width_differs, CliExit, "says 3 actions but the network outputs 1", 1),
    Case("SB3 zip bomb (`data` padded with 16 MiB of spaces, deflated)", "model reader", sb3_data_bomb,
         CliExit, "zip bomb", 1),
    Case("SB3 space without `_shape`", "model reader", _compile_sb3(_space("observation_space", _shape=None)),
         CliExit, "_shape", 1),
    Case("SB3 `data` is a JSON list", "model reader", _compile_sb3(lambda d: [d]), CliExit,
         "is a JSON list, not an object", 1),
    Case("negative layer width in a config (`\"hidden\": [-8]`)", "model reader", config_negative_width,
         CliExit, "must be a positive integer, got -8", 1),
    Case("config declaring a 2^40-wide layer (refused before allocating)", "model reader", config_huge_layers,
         CliExit, "larger than the limit", 1),
    Case("safetensors header with offsets outside the file", "model reader", safetensors_offsets_outside,
         CliExit, "safetensors", 1),
    Case("SB3 zip trained under VecNormalize, no statistics given", "model reader",
         vecnormalize_without_statistics, UserWarning, "--vecnormalize"),
    Case("`--env` whose action size differs from the network's", "formats",
         _compile_pt2("three-outputs", "--env", "Pendulum-v1"), CliExit, "give the right --env", 1),
    Case("one-output network without `--env`", "formats", _compile_pt2("one-output"), CliExit, "--env ENV_ID",
         1),
    Case("unknown `--env` id", "formats", _compile_pt2("one-output", "--env", "Pendulum-v9"), CliExit,
         "unknown environment 'Pendulum-v9'", 1),
    Case("forward returns a tuple", "formats", _compile_pt2("two-heads"), CliExit, "returns a tuple", 1),
    Case(".pt2 whose batch must be >= 2", "formats", _compile_pt2("batch-from-2"), CliExit,
         "accepts batches of 2 or more", 1),
    Case("dilated Conv2d policy (refused at compile)", "formats", _compile_pt2("conv2d"), CliExit,
         "dilation [2, 2] and groups 1 (used in module 0", 1),
    Case("artifact that disagrees with the numpy reference (a compiler bug: not written)", "formats",
         disagrees_with_reference, pipeline.CompilerBug, "nothing was written", code=3),
    Case("stock BitNet folder of another architecture (`model_type` llama)", "BitNet checkpoint",
         _compile_stock_bitnet("--encoder", "text", model_type="llama"), CliExit, "model_type is 'llama'", 1),
    Case("stock BitNet folder with `hidden_act` silu", "BitNet checkpoint",
         _compile_stock_bitnet("--encoder", "text", hidden_act="silu"), CliExit, "hidden_act 'silu'", 1),
    Case("config.json without `num_hidden_layers`", "BitNet checkpoint",
         _compile_stock_bitnet("--encoder", "text", num_hidden_layers=None), CliExit,
         "missing key 'num_hidden_layers'", 1),
    Case("checkpoint too large for the memory left (refused before loading; `BITRL_MEM_AVAILABLE=100000`)",
         "BitNet checkpoint", _compile_stock_bitnet("--encoder", "text", mem_available=100_000), CliExit,
         "is available", 1),
    Case("stock BitNet folder without `--encoder`", "BitNet checkpoint", _compile_stock_bitnet(), CliExit,
         "give --encoder text|numeric and --env ID", 1),
    Case("`--encoder` on a policy file", "BitNet checkpoint", _encoder_on_a_policy_file, CliExit,
         "--encoder applies to a Hugging Face BitNet checkpoint folder", 2),
    Case("observation of the wrong shape", "runtime input", _act(np.zeros(5, np.float32)), ValueError, "expects"),
    Case("observation of a non-numeric dtype", "runtime input", _act(np.array(list("abcd"))), ValueError,
         "numeric"),
    Case("NaN in the observation", "runtime input", _act(np.array([0, np.nan, 0, 0], np.float32)), ValueError,
         "NaN"),
    Case("Inf in the observation", "runtime input", _act(np.array([0, 0, np.inf, 0])), ValueError, "Inf"),
    Case("batch of size 0", "runtime input", _act(np.zeros((0, 4), np.float32)), ValueError, "batch size 0"),
    Case("no arguments", "command line", cli_no_arguments, CliExit, "Usage: bitrl-compile", 2),
    Case("unknown option", "command line", cli_unknown_option, CliExit, "No such option", 2),
    Case("misspelt command (`inspct`)", "command line", cli_misspelt_command, CliExit, "did you mean 'inspect'", 2),
    Case("`run --episodes 0`", "command line", cli_zero_episodes, CliExit, "x>=1", 2),
    Case("`tune --threads 0`", "command line", cli_zero_threads, CliExit, "x>=1", 2),
    Case("`train --steps 0`", "command line", cli_zero_steps, CliExit, "x>=1", 2),
    Case("`train --hidden 64,x`", "command line", cli_malformed_widths, CliExit, "comma-separated integers", 2),
    Case("`-o` names a folder", "output file", cli_output_is_a_folder, CliExit, "is a directory", 2),
    Case("output name over the file system's limit (refused before compiling)", "output file",
         cli_output_name_too_long, CliExit, "choose a shorter name", 1),
    Case("`-o` is the input (a symlink to it), even with --force", "output file", cli_output_is_the_input, CliExit,
         "choose another output name", 1),
    Case("output folder does not exist (refused before compiling)", "output file", cli_output_folder_missing,
         CliExit, "create it first", 1),
    Case("`demo --targets bogus --out d` (no empty d/ left)", "output file", cli_demo_unknown_target, CliExit,
         "known targets", 1),
    Case("Ctrl-C while writing the artifact", "signals", _signal_mid_write(signal.SIGINT), CliExit,
         "no partial file", 130),
    Case("SIGTERM while writing the artifact (`timeout`, systemd, CI)", "signals", _signal_mid_write(signal.SIGTERM),
         CliExit, "no partial file", 128 + signal.SIGTERM),
    Case("SIGHUP while writing the artifact (terminal closed)", "signals", _signal_mid_write(signal.SIGHUP),
         CliExit, "no partial file", 128 + signal.SIGHUP),
    Case("stdout closed early (`inspect x.bitrl | head -1`)", "signals", cli_broken_pipe, CliExit, "quietly",
         128 + signal.SIGPIPE),
]


def trigger(case: Case) -> BaseException:
    tmp = Path(tempfile.mkdtemp(prefix="bitrl-case-"))
    try:
        if case.error is UserWarning:
            try:
                case.run(tmp)
            except UserWarning as w:
                return w
            raise AssertionError(f"{case.name}: no warning")
        try:
            case.run(tmp)
        except case.error as e:
            return e
        raise AssertionError(f"{case.name}: no {case.error}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def code_of(e: BaseException) -> int:
    """The exit code users see: the CLI's own for `_cli` cases, else what the CLI maps the exception to."""
    if isinstance(e, CliExit):
        return e.code
    return 0 if isinstance(e, Warning) else exit_code(e)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case):
    e = trigger(case)
    message = str(e)
    assert case.says in message, message
    assert "\n" not in message.strip(), f"more than one line: {message!r}"
    code = code_of(e)
    assert code != INTERNAL or case.code == INTERNAL, f"bad input reported as an internal error: {message}"
    assert case.code is None or code == case.code, (code, message)


if __name__ == "__main__":
    print("# Bad inputs and what users see\n")
    print("Generated by `python tests/test_bad_inputs.py` from real runs; `pytest tests/test_bad_inputs.py` "
          "checks every row. The CLI prints an API case's message as `bitrl-compile: error: ...`; a case of the "
          "command line shows the line the real `bitrl-compile` prints (`exception`: CLI). Exit codes: 0 "
          "success (a warning), 1 bad input, 2 usage error, 3 internal error (never for bad input), 130 Ctrl-C "
          "or 128 + the signal, 141 stdout closed (README, Exit codes).\n")
    print("| area | case | exception | exit code | message |\n|---|---|---|---|---|")
    for case in CASES:
        e = trigger(case)
        text = re.sub(r"/tmp/bitrl-(case|bad)-\w+/", "", str(e))
        kind = "CLI" if isinstance(e, CliExit) else f"`{type(e).__name__}`"
        cells = (case.area, case.name, kind, str(code_of(e)), text)
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
