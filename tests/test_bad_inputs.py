"""Every malformed input gets one clear line, nothing is executed or lost: one case per row.

Each case builds a real bad input in a temporary folder and calls the real API, or runs the real
`bitrl-compile` (`_cli`: a subprocess; what it exits with and the line it prints). Running this file as a
script prints the cases, the messages users actually see and the exit codes as a markdown table:

    python tests/test_bad_inputs.py > docs/bad-inputs.md

To add a case: a function that builds the bad input in `tmp` and calls the API (or `_cli`), and one `Case`
line in CASES (its area, the exception, a fragment the message must contain, and for `_cli` the exit code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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

sys.path.insert(0, str(Path(__file__).parent))

from bitrl_compile import pipeline
from bitrl_compile.cli.common import INTERNAL, exit_code
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
    r = subprocess.run([sys.executable, "-m", "bitrl_compile.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=600, check=False)
    if check is not None:
        check(r.stderr)
    raise CliExit(r.returncode, _line(r.stderr))


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
        hold = ("import os, sys, time\nfsync = os.fsync\nos.fsync = lambda fd: (time.sleep(600), fsync(fd))\n"
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
    assert code != INTERNAL, f"bad input reported as an internal error: {message}"
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
