"""Tuning on a farm of boards: TVM's RPC tracker (targets/remote.py, `bitrl-compile tracker`), boards registered
under a key (`bitrl-compile emulator rpc-server --tracker H:P --key rasp4`: TVM's RPC server under qemu-aarch64
-cpu cortex-a72), and `bitrl-compile tune --tracker H:P --key rasp4`, which measures on all of them in parallel.

The farm test starts two emulated boards (about 6 s each, in parallel) and tunes one small kernel with 2 trials:
it checks that both boards measured a candidate, that the winner was verified bit-exact on a board reached
through the tracker and stored, and that a key whose boards are all busy fails after the wait. The bad-input
tests need no qemu."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bitrl_compile.devices import EmulatorError, RPCServer
from bitrl_compile.targets import autotune, remote, tuning

DEMO = Path(__file__).resolve().parents[1] / "bitrl_compile" / "examples" / "cartpole_ppo.safetensors"
KEY = tuning.KernelKey(64, 64, "relu")  # the demo policy's hidden layer


@pytest.fixture
def tracker():
    with remote.Tracker("127.0.0.1", 0) as t:  # a free port on loopback
        yield t


def _closed_port() -> int:
    with remote.Tracker("127.0.0.1", 0) as t:
        return t.port  # nothing listens there any more


def test_tune_on_two_boards_registered_under_one_key(tracker, tmp_path, capsys):
    with ThreadPoolExecutor(2) as pool:  # the two qemu start-ups overlap
        futures = [pool.submit(RPCServer, "cortex-a72", tracker=tracker.address, key="rasp4") for _ in range(2)]
        boards = [f.result() for f in futures]
    try:
        farm = remote.Remote.of(None, tracker.address, None, "rasp4")  # the key defaults to the target's name
        assert farm.key == "rasp4" and farm.servers() == 2
        assert sorted(remote.servers_under(tracker.summary(), "rasp4")) == sorted(b.address for b in boards)

        rows, path, _ = autotune.tune([KEY], "rasp4", trials=2, batches=(1,), db=tmp_path,
                                      tracker=tracker.address, tracker_key="rasp4")
        (row,) = rows
        assert row.trials == 2 and row.tuned_us > 0
        # a candidate ran bit-exact on a board reached through the tracker before it was stored
        assert row.stored in ("tuned", "default is as fast"), row.stored
        (record,) = json.loads(path.read_text())["records"]
        assert record["measured_on"] == f"key rasp4 at tracker {tracker.address}"
        assert record["knobs"] == row.knobs and record["isa"] == "neon-lut"
        err = capsys.readouterr().err
        assert "2 servers measuring in parallel" in err and "on 2 servers in parallel" in err

        logs = [b.log_text() for b in boards]
        measured = [log.count("/kernel.so") for log in logs]  # MetaSchedule's runner uploads kernel.so
        assert measured == [1, 1], logs  # two candidates, one on each board
        assert any("bitrl-kernel-" in log for log in logs), logs  # verification and timing (Device)

        sessions = [farm.connect(session_timeout=60) for _ in boards]  # hold both boards
        with pytest.raises(tuning.TuneError, match=r"none of the 2 server\(s\) under key 'rasp4'.*within 1 s"):
            farm.connect(wait=1)
        del sessions
    finally:
        for b in boards:
            b.close()


def test_bad_tracker_options_are_one_line(tmp_path):
    with pytest.raises(tuning.TuneError, match=r"--tracker expects HOST:PORT \(e\.g\. 127\.0\.0\.1:9190\)"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path, tracker="localhost")
    with pytest.raises(tuning.TuneError, match="--rpc and --tracker are exclusive"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path, rpc="127.0.0.1:9090", tracker="127.0.0.1:9190")
    with pytest.raises(tuning.TuneError, match="--key rasp4 names boards registered with a tracker"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path, tracker_key="rasp4")
    with pytest.raises(tuning.TuneError, match="a tracker key is letters"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path, tracker="127.0.0.1:9190", tracker_key="a b")
    port = _closed_port()
    with pytest.raises(tuning.TuneError, match=rf"cannot reach the RPC tracker at 127\.0\.0\.1:{port}: .*"
                                               rf"`bitrl-compile tracker --port {port}`"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path, tracker=f"127.0.0.1:{port}")
    assert list(tmp_path.iterdir()) == []


def test_a_key_without_servers_names_the_command_that_registers_one(tracker, tmp_path):
    with pytest.raises(tuning.TuneError, match=r"no RPC server is registered under key 'rasp5' .*"
                                               r"emulator rpc-server --tracker 127\.0\.0\.1:\d+ --key rasp5"):
        autotune.tune([KEY], "rasp5", trials=1, db=tmp_path, tracker=tracker.address)
    assert list(tmp_path.iterdir()) == []


def test_an_emulated_board_needs_a_tracker_that_answers():
    port = _closed_port()
    with pytest.raises(EmulatorError, match=rf"cannot reach the RPC tracker at 127\.0\.0\.1:{port}: .*"
                                            rf"`bitrl-compile tracker --port {port}`"):
        RPCServer(tracker=f"127.0.0.1:{port}", key="rasp4")
    with pytest.raises(EmulatorError, match="needs a key"):
        RPCServer(tracker=f"127.0.0.1:{port}", key=None)


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "bitrl_compile.cli", *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_tracker_and_tune_against_an_empty_farm(tmp_path):
    """`bitrl-compile tracker --port 0` serves on a free loopback port; a tune against it with no board under
    the key is one line, exit 1, nothing written; an emulated board whose tracker does not answer too (before
    qemu starts); SIGTERM stops the tracker with exit 0."""
    tracker = _cli("tracker", "--port", "0")
    try:
        line = tracker.stdout.readline()
        address = re.match(r"(127\.0\.0\.1:\d+)\s+\(TVM RPC tracker", line)
        assert address, line + (tracker.stderr.read() if tracker.poll() is not None else "")
        address = address.group(1)
        db = tmp_path / "db"
        tune = _cli("tune", DEMO, "--target", "rasp4", "--tracker", address, "--db", db)
        closed = _closed_port()
        board = _cli("emulator", "rpc-server", "--tracker", f"127.0.0.1:{closed}")  # at the same time
        out, err = tune.communicate(timeout=300)
        assert tune.returncode == 1, out + err
        assert err.count("\n") == 1 and err.startswith("bitrl-compile: error: no RPC server is registered under "
                                                       f"key 'rasp4' at the tracker {address}"), err
        assert not db.exists()
        out, err = board.communicate(timeout=300)
        assert board.returncode == 1, out + err
        assert err.count("\n") == 1 and err.startswith("bitrl-compile: error: cannot reach the RPC tracker at "
                                                       f"127.0.0.1:{closed}"), err
    finally:
        tracker.send_signal(signal.SIGTERM)
        tracker.communicate(timeout=60)
    assert tracker.returncode == 0
