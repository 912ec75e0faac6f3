"""The bitrl-compile command as a user runs it: subprocesses, exit codes, one-line errors."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from bitrl_compile.demo import demo_policy_path


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bitrl_compile.cli", *map(str, args)], capture_output=True, check=False,
                          text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def rasp4_artifact(sb3_ppo_cartpole, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "policy.bitrl"
    r = cli(sb3_ppo_cartpole, "--target", "rasp4", "-o", out)  # the default command is compile
    assert r.returncode == 0, r.stderr
    assert "3 BitLinear layers" in r.stdout and "rasp4" in r.stdout
    return out


def test_inspect_shows_layers_bits_and_members(rasp4_artifact):
    r = cli("inspect", rasp4_artifact)
    assert r.returncode == 0, r.stderr
    for text in ("4 ->", "64 -> 64", "base3", "lib.so", "params.safetensors", "sb3-ppo", "bits per weight"):
        assert text in r.stdout
    manifest = json.loads(cli("inspect", "--json", rasp4_artifact).stdout)
    assert manifest["target"]["arch"] == "aarch64" and manifest["output"]["kind"] == "discrete"


def test_run_executes_an_aarch64_artifact_under_qemu(rasp4_artifact):
    r = cli("run", rasp4_artifact, "--env", "CartPole-v1", "--episodes", "2")
    assert r.returncode == 0, r.stderr
    assert "mean return" in r.stdout and "emulated under qemu" in r.stdout


def test_existing_output_is_refused_with_exit_code_1(rasp4_artifact, sb3_ppo_cartpole):
    before = rasp4_artifact.read_bytes()
    r = cli(sb3_ppo_cartpole, "--target", "rasp4", "-o", rasp4_artifact)
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert rasp4_artifact.read_bytes() == before


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n not a model", b"PK\x03\x04 truncated zip", b""])
def test_bad_model_files_give_one_line_and_no_output(tmp_path, content):
    model = tmp_path / "model.pt"
    model.write_bytes(content)
    r = cli(model, "-o", tmp_path / "out.bitrl")
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bitrl-compile: error:"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_unknown_target_and_missing_file_are_user_errors(tmp_path, sb3_ppo_cartpole):
    r = cli(sb3_ppo_cartpole, "--target", "pi-zero", "-o", tmp_path / "x.bitrl")
    assert r.returncode == 1 and "known targets" in r.stderr
    r = cli("inspect", tmp_path / "nothing.bitrl")
    assert r.returncode == 1 and "no such artifact" in r.stderr


def test_pickled_module_needs_the_trust_flag(tmp_path):
    import torch

    model = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), model)
    r = cli(model, "-o", tmp_path / "x.bitrl")
    assert r.returncode == 1 and "--trust-pickle" in r.stderr
    r = cli(model, "-o", tmp_path / "x.bitrl", "--trust-pickle", "--config",
            _write(tmp_path / "c.json", {"input": {"shape": [3]}, "output": {"kind": "discrete", "n": 2}}))
    assert r.returncode == 0, r.stderr


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_targets_lists_every_target():
    r = cli("targets")
    assert r.returncode == 0, r.stderr
    for name in ("host", "rasp4", "rasp5", "x86-avx2", "x86-avx512", "x86-amx"):
        assert name in r.stdout


def test_internal_errors_exit_3_and_debug_shows_the_traceback(monkeypatch, sb3_ppo_cartpole, tmp_path):
    from click.testing import CliRunner

    from bitrl_compile import cli as cli_module
    from bitrl_compile import pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in the compiler")

    monkeypatch.setattr(pipeline, "compile_policy", broken)  # stands in for a bug, not for the thing tested
    runner = CliRunner()
    r = runner.invoke(cli_module.main, [str(sb3_ppo_cartpole), "-o", str(tmp_path / "x.bitrl")])
    assert r.exit_code == 3 and "internal error: a bug in the compiler" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli_module.main, [str(sb3_ppo_cartpole), "-o", str(tmp_path / "x.bitrl"), "--debug"])
    assert r.exit_code == 3 and "Traceback" in r.output


# ------------------------------------------------------------------ files: names, modes, temporary files, folders
# (the exit code of every bad input, signals and broken pipes included, is checked in tests/test_bad_inputs.py)

def test_long_output_names_and_the_umask(tmp_path):
    """A legal 251-byte name is written (its temporary file's name is shortened); files get 0o666 & ~umask, as
    open() gives, and a secret keeps the 0o600 it asks for."""
    from bitrl_compile.runtime.files import write_atomic

    long = tmp_path / ("p" * 245 + ".bitrl")
    old = os.umask(0o027)
    try:
        write_atomic(long, b"artifact")
        write_atomic(tmp_path / "key.pem", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert long.read_bytes() == b"artifact" and stat.S_IMODE(long.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, "key.pem"])  # no temporary file


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path):
    from bitrl_compile.runtime.files import write_atomic

    hours_ago = time.time() - 2 * 3600
    stale = tmp_path / ".p.bitrl.k3j4h5g6.tmp"  # what a SIGKILL during a write leaves
    fresh = tmp_path / ".p.bitrl.a1b2c3d4.tmp"  # another write of p.bitrl, in progress
    other = tmp_path / ".q.bitrl.k3j4h5g6.tmp"  # another file's
    mine = tmp_path / "notes.tmp"
    for path in (stale, fresh, other, mine):
        path.write_bytes(b"partial")
    for path in (stale, other, mine):
        os.utime(path, (hours_ago, hours_ago))
    write_atomic(tmp_path / "p.bitrl", b"whole")
    assert not stale.exists() and fresh.exists() and other.exists() and mine.exists()
    assert (tmp_path / "p.bitrl").read_bytes() == b"whole"


def test_output_that_is_the_input_through_a_hard_link_is_refused(tmp_path):
    model = tmp_path / "policy.safetensors"
    shutil.copy(demo_policy_path(), model)
    os.link(model, tmp_path / "policy.bitrl")
    r = cli(model, "--force")  # the default output, MODEL stem + .bitrl, is the model itself
    assert r.returncode == 1 and "choose another output name" in r.stderr, r.stderr
    assert model.read_bytes() == demo_policy_path().read_bytes()


def test_a_failed_command_removes_the_output_folder_it_made(tmp_path):
    """bench creates --out, then the compile fails (no cross compiler on PATH): the empty folder goes again."""
    r = subprocess.run([sys.executable, "-m", "bitrl_compile.cli", "bench", str(demo_policy_path()), "--target",
                        "rasp4", "--out", str(tmp_path / "runs" / "bench")], capture_output=True, text=True,
                       env={**os.environ, "PATH": str(tmp_path)}, timeout=600, check=False)
    assert r.returncode == 1 and "apt-get install" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--help"], ["targets"]])
def test_stdout_closed_early_exits_quietly(args):
    """`bitrl-compile --help | head -1`: 141 (128 + SIGPIPE) and no message, as coreutils and git; commands with
    a guard are checked in tests/test_bad_inputs.py (inspect)."""
    proc = subprocess.Popen([sys.executable, "-m", "bitrl_compile.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err
