"""Every malformed input gets one clear line, nothing is executed or lost: one case per row.

Each case builds a real bad input in a temporary folder and calls the real API. Running this file as a
script prints the cases and the messages users actually see as a markdown table (docs/bad-inputs.md):

    python tests/test_bad_inputs.py > docs/bad-inputs.md
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bitrl_compile import pipeline
from bitrl_compile.devices import EmulatorError, qemu_binary
from bitrl_compile.frontends import load_policy, save_mlp_policy
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime import ArtifactError, load, write_artifact
from relax_models import mlp

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


def _act(obs):
    return lambda tmp: load(_artifact()).act(obs)


@dataclass
class Case:
    name: str
    area: str
    run: Callable[[Path], object]
    error: type | tuple
    says: str  # a fragment the message must contain (the problem or the fix)


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
    Case("observation of the wrong shape", "runtime input", _act(np.zeros(5, np.float32)), ValueError, "expects"),
    Case("observation of a non-numeric dtype", "runtime input", _act(np.array(list("abcd"))), ValueError,
         "numeric"),
    Case("NaN in the observation", "runtime input", _act(np.array([0, np.nan, 0, 0], np.float32)), ValueError,
         "NaN"),
    Case("Inf in the observation", "runtime input", _act(np.array([0, 0, np.inf, 0])), ValueError, "Inf"),
    Case("batch of size 0", "runtime input", _act(np.zeros((0, 4), np.float32)), ValueError, "batch size 0"),
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


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case):
    e = trigger(case)
    message = str(e)
    assert case.says in message, message
    assert "\n" not in message.strip(), f"more than one line: {message!r}"


if __name__ == "__main__":
    print("# Bad inputs and what users see\n")
    print("Generated by `python tests/test_bad_inputs.py` from real runs; `pytest tests/test_bad_inputs.py` "
          "checks every row. The CLI prints the same message as `bitrl-compile: error: ...` and exits 1.\n")
    print("| area | case | exception | message |\n|---|---|---|---|")
    for case in CASES:
        e = trigger(case)
        text = re.sub(r"/tmp/bitrl-(case|bad)-\w+/", "", str(e)).replace("|", "\\|")
        print(f"| {case.area} | {case.name} | `{type(e).__name__}` | {text} |")
