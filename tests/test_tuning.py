"""MetaSchedule tuning: the design space, the database round trip, rejection of wrong kernels, the CLI,
Ctrl-C, and the RPC path to a board (TVM's RPC server running under qemu-aarch64 -cpu cortex-a72).

Trial budgets are tiny: these check that tuning works and stays correct, not that it finds speed
(bench/tuning.py measures that)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tvm

from bitrl_compile import pipeline, reference, targets
from bitrl_compile.frontends import load_policy
from bitrl_compile.targets import autotune, kernels, tuning
from bitrl_compile.targets.kernels import DEFAULT_KNOBS, Knobs

DEMO = Path(__file__).resolve().parents[1] / "bitrl_compile" / "examples" / "cartpole_ppo.safetensors"
HOST = targets.tvm_target(targets.get_target("host"))
SPEC = targets.kernel_spec(HOST)
KEY = tuning.KernelKey(64, 64, "relu")  # the demo policy's hidden layer


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_space_round_trips_knobs_through_traces(batch):
    func = tuning.workload(KEY, SPEC, batch)
    slots = dict(tuning.knob_slots(func, SPEC))
    assert slots, "the space has choices"
    for value in (1, 2, 4):
        knobs = Knobs(**{name: value if value in slots.get(name, [1]) else 1 for name in DEFAULT_KNOBS.as_dict()})
        trace = tuning.trace_for(func, knobs)
        assert tuning.knobs_of(trace, func, SPEC) == knobs
        sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
        trace.apply_to_schedule(sch, remove_postproc=False)  # a real MetaSchedule trace: it replays
        tvm.ir.assert_structural_equal(sch.mod["main"], kernels.schedule_default(func, SPEC, knobs))


def test_space_samples_only_the_row_paths_a_batch_runs():
    rows = SPEC.rows
    assert {n.split("_")[0] for n, _ in tuning.knob_slots(tuning.workload(KEY, SPEC, 1), SPEC)} == {"gemv"}
    assert {n.split("_")[0] for n, _ in tuning.knob_slots(tuning.workload(KEY, SPEC, 4 * rows), SPEC)} == {"gemm"}
    assert {n.split("_")[0] for n, _ in tuning.knob_slots(tuning.workload(KEY, SPEC, rows + 1), SPEC)} == {"gemv", "gemm"}


def test_rows_in_amx_tiles_have_no_knobs():
    amx = targets.kernel_spec(isa="amx")
    key = tuning.KernelKey(256, 256)  # K >= 128: AMX tiles of 16 rows, then 4-row blocks, then single rows
    assert kernels.row_paths(amx, 256, 37) == {"amx": 32, "gemm": 4, "gemv": 1}
    assert kernels.row_paths(amx, 64, 37) == {"amx": 0, "gemm": 36, "gemv": 1}  # K < 128: no AMX
    assert tuning.knob_slots(tuning.workload(key, amx, 32), amx) == []
    assert {n.split("_")[0] for n, _ in tuning.knob_slots(tuning.workload(key, amx, 28), amx)} == {"gemm"}


@pytest.mark.parametrize("pick", [(1, -1, -1, 1), (-1, 0, 1, -1), (-1, -1, -1, -1)])
def test_every_point_of_the_space_is_bit_exact(pick):
    """Corners of the space (indices into each knob's options) on the GEMV and GEMM rows and K tails."""
    slots = dict(tuning.knob_slots(tuning.workload(KEY, SPEC, SPEC.rows + 1), SPEC))
    knobs = Knobs(**{name: slots[name][i] if name in slots else 1 for name, i in zip(DEFAULT_KNOBS.as_dict(), pick)})
    assert knobs != DEFAULT_KNOBS
    with autotune.Device(targets.get_target("host"), None) as device:
        assert autotune.verify(KEY, SPEC, knobs, device, HOST, [1, 3, 4, 5, 9, 33]) is None


def test_knobs_that_do_not_divide_the_kernel_are_refused():
    with pytest.raises(ValueError, match="do not divide"):
        kernels.bitlinear_kernel(64, 40, "relu", spec=SPEC, knobs=Knobs(gemv_tiles=8))


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """Tune the demo's 64x64 kernel for the host at batch 1 (GEMV) and 9 (GEMM + tail), 3 trials each."""
    folder = tmp_path_factory.mktemp("tuned")
    rows, path, _ = autotune.tune([KEY], "host", trials=3, batches=(1, 9), db=folder, log=lambda s: None)
    return folder, path, rows


def test_tune_stores_verified_records_with_both_timings(tuned_db):
    folder, path, rows = tuned_db
    assert path == folder / f"host-{HOST.attrs['mcpu']}.json"
    data = json.loads(path.read_text())
    assert data["format"] == "bitrl-tuning"
    recs = {r["batch"]: r for r in data["records"]}
    assert sorted(recs) == [1, 9]
    for row in rows:
        assert row.trials == 3 and row.default_us > 0 and row.tuned_us > 0
        assert row.stored in ("tuned", "default is as fast")
        assert recs[row.batch]["knobs"] == row.knobs
        func = tuning.workload(KEY, SPEC, row.batch)
        assert recs[row.batch]["workload_hash"] == tuning.workload_hash(func)


def test_database_round_trips_into_compiles(tuned_db, tmp_path):
    """Tune once, compile later from the file: the compile uses the stored knobs, two compiles are
    identical, and the result is bit-exact with the reference."""
    folder, _, rows = tuned_db
    loaded = load_policy(DEMO)
    first = pipeline.compile_policy(loaded, "host", tmp_path / "a.bitrl", tuning_db=folder)
    second = pipeline.compile_policy(loaded, "host", tmp_path / "b.bitrl", tuning_db=folder)
    assert _members(first.path) == _members(second.path)
    kernels_by_name = {k["kernel"]: k for k in first.manifest["kernels"]}
    assert len(kernels_by_name) == 3
    mine = kernels_by_name[KEY.name]
    assert mine["schedule"] == "tuned" and mine["gemv"]["batch"] == 1 and mine["gemm"]["batch"] == 9
    want = {**{k: v for k, v in rows[0].knobs.items() if k.startswith("gemv")},
            **{k: v for k, v in rows[1].knobs.items() if k.startswith("gemm")}}
    assert mine["knobs"] == {**DEFAULT_KNOBS.as_dict(), **want}
    others = [k for name, k in kernels_by_name.items() if name != KEY.name]
    assert all(k["schedule"] == "default" and "no tuning record" in k["reason"] for k in others)

    from bitrl_compile.runtime import load

    x = np.random.default_rng(0).standard_normal((37, 4)).astype(np.float32) * 2
    np.testing.assert_array_equal(load(first.path).forward(x), reference.run(first.quantized, x))
    untuned = pipeline.compile_policy(loaded, "host", tmp_path / "c.bitrl", tuning=False)
    assert all(k["schedule"] == "default" for k in untuned.manifest["kernels"])


def test_stale_records_fall_back_to_the_default_and_say_so(tuned_db, tmp_path):
    _, path, _ = tuned_db
    data = json.loads(path.read_text())
    for r in data["records"]:
        r["workload_hash"] = "0" * 16  # as if the kernel had changed since tuning
    stale = tmp_path / path.name
    stale.write_text(json.dumps(data))
    found = tuning.TunedSchedules(stale).lookup(KEY, SPEC)
    assert found.source == "default" and found.knobs == DEFAULT_KNOBS
    assert "2 stale record(s)" in found.detail["reason"]


def test_a_wrong_fast_kernel_is_rejected(tmp_path, monkeypatch):
    """A candidate that computes something else (here: the kernel without its ReLU) never reaches
    the database: the default schedule is stored instead."""
    real = kernels.bitlinear_kernel

    def wrong(k, n, activation="none", per_channel=False, target=None, spec=None, knobs=DEFAULT_KNOBS):
        func = real(k, n, "none" if knobs != DEFAULT_KNOBS else activation, per_channel, target, spec, knobs)
        return func.with_attr("global_symbol", kernels.kernel_name(k, n, activation, per_channel))

    monkeypatch.setattr(kernels, "bitlinear_kernel", wrong)
    rows, path, _ = autotune.tune([KEY], "host", trials=2, batches=(1,), db=tmp_path, log=lambda s: None, seed=3)
    (row,) = rows
    (record,) = json.loads(path.read_text())["records"]
    assert record["knobs"] == DEFAULT_KNOBS.as_dict() and row.knobs == DEFAULT_KNOBS.as_dict()
    if row.stored != "default is as fast":  # unless both trials happened to sample the default knobs
        assert row.stored.startswith("rejected") and "differ from the reference" in row.stored


def test_broken_database_gets_one_clear_line(tmp_path):
    bad = tmp_path / "host.json"
    bad.write_text("{not json")
    with pytest.raises(tuning.TuneError, match="unreadable.*--no-tuning"):
        tuning.TunedSchedules(bad)


def test_tuning_an_arm_target_without_a_board_says_how_to_start_one(tmp_path):
    with pytest.raises(tuning.TuneError, match=r"python3 -m tvm\.exec\.rpc_server"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path)
    with pytest.raises(tuning.TuneError, match="cannot reach the RPC server"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path, rpc="127.0.0.1:1")
    with pytest.raises(tuning.TuneError, match="HOST:PORT"):
        autotune.tune([KEY], "rasp4", trials=1, db=tmp_path, rpc="localhost")


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "bitrl_compile.cli", *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_tune_prints_the_summary_and_compile_uses_it(tmp_path):
    proc = _cli("tune", DEMO, "--trials", "2", "--db", tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "default µs" in out and "tuned µs" in out and "speedup" in out
    for name in ("k4_n64_relu", "k64_n64_relu", "k64_n2_none"):
        assert f"bitrl_bitlinear_{name}" in out
    assert "trials" in err  # the progress bar
    proc = _cli(DEMO, "-o", tmp_path / "p.bitrl", "--db", tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "3 kernel(s): 3 tuned" in err
    proc = _cli("inspect", tmp_path / "p.bitrl")
    out, _ = proc.communicate(timeout=120)
    assert out.count("tuned at batch 1") == 3


def test_cli_tune_ctrl_c_keeps_what_was_found(tmp_path):
    proc = _cli("tune", DEMO, "--trials", "40", "--db", tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = ""
    deadline = time.monotonic() + 600
    while "trials," not in seen and time.monotonic() < deadline:  # the first progress update
        seen += proc.stderr.read(1)
    assert "trials," in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, seen + err
    assert "interrupted" in err
    (path,) = tmp_path.glob("host-*.json")
    records = json.loads(path.read_text())["records"]
    assert records and all(r["trials"] < 40 for r in records)


def test_tune_rasp4_through_rpc_under_qemu_then_compile_offline(tmp_path):
    """The board path end to end: TVM's RPC server in an aarch64 guest (cortex-a72) measures the
    cross-compiled candidates; the database then drives a rasp4 compile whose artifact, run under
    qemu, equals the reference. (Timings under qemu mean nothing; the path must work.)"""
    from bitrl_compile.devices import EmulatedPolicy, RPCServer

    rasp4 = targets.tvm_target(targets.get_target("rasp4"))
    spec = targets.kernel_spec(rasp4)
    with RPCServer("cortex-a72") as server:
        rows, path, _ = autotune.tune([KEY], "rasp4", trials=2, batches=(1,), db=tmp_path, rpc=server.address,
                                    log=lambda s: None)
    (row,) = rows
    assert row.trials == 2 and row.tuned_us > 0
    assert path == tmp_path / "rasp4.json"
    (record,) = json.loads(path.read_text())["records"]
    assert record["isa"] == spec.isa == "neon-lut" and record["measured_on"] == server.address

    compiled = pipeline.compile_policy(load_policy(DEMO), "rasp4", tmp_path / "p.bitrl", tuning_db=tmp_path)
    mine = [k for k in compiled.manifest["kernels"] if k["kernel"] == KEY.name]
    assert mine[0]["schedule"] == "tuned" and mine[0]["knobs"] == {**DEFAULT_KNOBS.as_dict(), **{
        k: v for k, v in row.knobs.items() if k.startswith("gemv")}}
    x = np.random.default_rng(1).standard_normal((13, 4)).astype(np.float32)
    with EmulatedPolicy(compiled.path, cpu="cortex-a72") as policy:
        np.testing.assert_array_equal(policy.forward(x), reference.run(compiled.quantized, x))


def test_file_rebuilds_a_metaschedule_database(tuned_db, tmp_path):
    """The compact file is a MetaSchedule database in disguise: rebuilt, MetaSchedule's own query
    returns the stored schedule for the workload."""
    _, path, rows = tuned_db
    db = tuning.ms_database(path, tmp_path)
    for row in rows:
        func = tuning.workload(KEY, SPEC, row.batch)
        sch = db.query_schedule(tvm.IRModule({"main": func}), HOST, "main")
        assert sch is not None
        tvm.ir.assert_structural_equal(sch.mod["main"], kernels.schedule_default(func, SPEC, Knobs(**row.knobs)))
