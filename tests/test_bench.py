"""`bitrl-compile bench`: every number in the report comes from a run or from the model, none is typed in.

Small budgets (a few dozen calls, one or two episodes); nothing here asserts that anything is fast.
"""

import json
import os
import resource
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from bitrl_compile.bench import child as bench_child
from bitrl_compile.bench import report as bench
from bitrl_compile.demo import demo_policy_path
from bitrl_compile.frontends import load_policy
from bitrl_compile.runtime import read_artifact, safetensors_np

CALLS = 40


@pytest.fixture(scope="module")
def demo_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-demo")
    report = bench.run_bench(demo_policy_path(), env_id="CartPole-v1", episodes=2, batch=4, calls=CALLS, out=out,
                             log=lambda s: None)
    return out, report


def test_artifact_bytes_are_the_file_and_its_members(demo_bench):
    out, report = demo_bench
    art = report["memory"]["artifact"]
    assert art["bytes"] == (out / "policy.bitrl").stat().st_size
    with zipfile.ZipFile(out / "policy.bitrl") as z:
        assert art["members"] == {i.filename: {"bytes": i.file_size, "stored_bytes": i.compress_size}
                                  for i in z.infolist()}
    assert sum(m["stored_bytes"] for m in art["members"].values()) + art["zip_overhead_bytes"] == art["bytes"]
    members = read_artifact(out / "policy.bitrl").members
    params, _ = safetensors_np.loads(members["params.safetensors"])
    assert report["memory"]["param_bytes"]["bitrl"] == sum(v.nbytes for v in params.values())
    packed = sum(v.nbytes for v in params.values() if v.dtype == np.uint8)
    assert report["memory"]["bits_per_weight"]["weights_only"] == 8 * packed / report["memory"]["ternary_weights"]


def test_parameter_counts_come_from_the_model(demo_bench):
    out, report = demo_bench
    module = load_policy(demo_policy_path()).module
    n = sum(p.numel() for p in module.parameters())
    layers = read_artifact(out / "policy.bitrl").manifest["layers"]
    assert report["memory"]["parameters"] == n
    assert report["memory"]["fp32_bytes"] == report["memory"]["param_bytes"]["fp32"] == 4 * n
    assert report["memory"]["ternary_weights"] == sum(layer["in"] * layer["out"] for layer in layers)
    assert report["memory"]["files"]["int8.onnx"] == (out / "int8.onnx").stat().st_size


def test_peak_rss_is_measured_in_fresh_child_processes(demo_bench):
    _, report = demo_bench
    rss = report["memory"]["rss"]
    assert set(rss) == {"python", "numpy", "bitrl", "torch", "onnxruntime", "onnxruntime-int8"}
    pids = {v["pid"] for v in rss.values()}
    assert len(pids) == len(rss) and os.getpid() not in pids
    for v in rss.values():
        assert 0 < v["rss_start"] <= v["rss_loaded"] <= v["peak_rss"]
    assert rss["python"]["modules"] == []
    assert "torch" not in rss["bitrl"]["modules"] and "tvm" not in rss["bitrl"]["modules"]
    assert "tvm_ffi" in rss["bitrl"]["modules"] and "torch" in rss["torch"]["modules"]
    assert rss["python"]["peak_rss"] < rss["numpy"]["peak_rss"] < rss["bitrl"]["peak_rss"] < rss["torch"]["peak_rss"]
    # getrusage would have reported at least this (torch-loaded) process's own peak for every child
    assert rss["python"]["peak_rss"] < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_latencies_are_from_this_run(demo_bench):
    _, report = demo_bench
    lat = report["latency"]
    assert lat["kind"] == "wall_clock" and lat["threads"] == 1
    assert set(lat["results"]) == {"bitrl", "torch", "onnxruntime", "onnxruntime-int8"}
    for impl, by_batch in lat["results"].items():
        assert set(by_batch) == {"1", "4"}
        for b, v in by_batch.items():
            assert v["calls"] == CALLS // lat["rounds"] * lat["rounds"]
            assert 0 < v["min_us"] <= v["p50_us"] <= v["p99_us"]
            assert 0 < v["cpu_p50_us"] <= v["cpu_p99_us"]  # the calling thread's CPU time, at one thread
            assert lat["p50_ratio_over_bitrl"][impl][b] == v["p50_us"] / lat["results"]["bitrl"][b]["p50_us"]


def test_latency_statistics_are_computed_from_the_child_samples(monkeypatch):
    rng = np.random.default_rng(1)
    samples = {impl: {"1": rng.integers(1_000, 90_000, 50).tolist()} for impl in ("bitrl", "torch")}
    monkeypatch.setattr(bench, "run_child", lambda cfg, threads: {"times_ns": samples, "rapl_uj": None,
                                                                   "rapl_files": []})
    lat = bench.measure_latency({}, ["bitrl", "torch"], calls=50, threads=1)
    for impl in ("bitrl", "torch"):
        us = np.asarray(samples[impl]["1"]) / 1e3
        assert lat["results"][impl]["1"]["p50_us"] == pytest.approx(np.percentile(us, 50))
        assert lat["results"][impl]["1"]["p99_us"] == pytest.approx(np.percentile(us, 99))
        assert lat["results"][impl]["1"]["calls"] == 50


def test_returns_are_seeded_episodes_of_each_policy(demo_bench):
    import torch

    from bitrl_compile.evaluate import evaluate

    _, report = demo_bench
    ret = report["returns"]
    assert ret["env"] == "CartPole-v1" and ret["fp32_impl"] == "torch"
    assert {k: len(v) for k, v in ret["episodes_returns"].items()} == {
        "torch": 2, "bitrl": 2, "onnxruntime-int8": 2, "random": 2}
    module = load_policy(demo_policy_path()).module.eval()
    with torch.no_grad():
        fp32, _ = evaluate(lambda o: int(module(torch.as_tensor(o[None])).argmax()), "CartPole-v1", 2, 0)
    assert ret["episodes_returns"]["torch"] == fp32
    assert ret["kept"] == np.mean(ret["episodes_returns"]["bitrl"]) / np.mean(fp32)
    assert report["agreement"]["bitrl_max_abs_diff_vs_reference"] == 0  # ReLU policy: bit-exact on the host


def test_energy_estimate_counts_operations_from_the_layer_shapes(demo_bench):
    layers = [{"in": 4, "out": 64}, {"in": 64, "out": 64}, {"in": 64, "out": 2}]
    ops = bench.operation_counts(layers)
    macs = 4 * 64 + 64 * 64 + 64 * 2
    assert ops["fp32"] == {"fp32_mul": macs, "fp32_add": macs + 130}
    assert ops["bitrl"] == {"fp32_add": 132 + 130, "fp32_mul": 132 + 130, "int32_add": macs}
    assert ops["onnxruntime-int8"]["int8_mul"] == macs
    assert bench.memory_tier(8 << 10)[0] == 10.0 and bench.memory_tier((8 << 10) + 1)[0] == 20.0
    assert bench.memory_tier(1 << 30)[0] == 1300.0

    _, report = demo_bench
    energy = report["energy"]
    assert energy["kind"] == "estimate" and "Horowitz" in energy["source"]
    bitrl = energy["per_call"]["bitrl"]
    assert bitrl["operations"] == ops["bitrl"]
    assert bitrl["weight_bytes"] == report["memory"]["param_bytes"]["bitrl"]
    assert bitrl["total_pj"] == pytest.approx(sum(bench.ENERGY_PJ[op] * n for op, n in ops["bitrl"].items())
                                              + bitrl["weight_bytes"] / 8 * bench.memory_tier(bitrl["weight_bytes"])[0])
    assert energy["counters"]["available"] == bool(bench_child._rapl_files())
    if not energy["counters"]["available"]:
        assert energy["counters"]["why"]


def test_report_files_are_written_and_plots_render(demo_bench):
    out, report = demo_bench
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert report["command"] in md and f"{report['memory']['artifact']['bytes']:,}" in md
    assert "estimate" in md and "Horowitz" in md
    assert report["plots"] == ["latency.png", "memory.png", "energy.png", "returns.png"]
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({name})" in md


@pytest.mark.slow
def test_bench_command_on_an_sb3_policy(sb3_ppo_cartpole, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "bitrl_compile.cli", "bench", str(sb3_ppo_cartpole),
                           "--env", "CartPole-v1", "--episodes", "1", "--batch", "2", "--calls", "20",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Return kept" in proc.stdout and "report.md" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    module = load_policy(sb3_ppo_cartpole).module
    assert report["model"]["source"] == "sb3-ppo"
    assert report["memory"]["parameters"] == sum(p.numel() for p in module.parameters())
    assert report["memory"]["artifact"]["bytes"] == (out / "policy.bitrl").stat().st_size
    assert set(report["latency"]["results"]["bitrl"]) == {"1", "2"}
    assert len(report["returns"]["episodes_returns"]["bitrl"]) == 1


@pytest.mark.slow
def test_rasp4_bench_counts_instructions_under_qemu(tmp_path):
    report = bench.run_bench(demo_policy_path(), target="rasp4", batch=4, calls=20, out=tmp_path,
                             log=lambda s: None)
    lat = report["latency"]
    assert lat["kind"] == "instructions" and lat["cpu"] == "cortex-a72"
    ours = lat["results"]["bitrl"]
    kernels = {b: v["in_library"]["compiled policy (lib.so)"] for b, v in ours.items()}
    for b, v in ours.items():
        assert v["calls"] == 20
        assert 0 < kernels[b] < v["instructions_per_call"]
    assert kernels["4"] > kernels["1"]  # four observations run more kernel instructions than one
    counts = (tmp_path / "qemu-instructions.txt").read_text().splitlines()
    assert len(counts) == 2 * sum(len(by_batch) for by_batch in lat["results"].values())
    assert report["agreement"]["bitrl_runs_on"] == "rasp4"
    assert report["agreement"]["bitrl_max_abs_diff_vs_reference"] == 0  # bit-exact under qemu -cpu cortex-a72
    assert report["memory"]["measured_with_host_build"] and report["returns"] is None
    assert "not a time" in (tmp_path / "report.md").read_text()


def test_generated_tables_replace_only_their_marked_section(tmp_path):
    from bitrl_compile.bench.markdown import replace_section

    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- t: begin -->\nold table\n<!-- t: end -->\nhand-written end\n")
    assert replace_section(page, "<!-- t: begin -->", "<!-- t: end -->", "new table")
    assert page.read_text() == "intro\n<!-- t: begin -->\nnew table\n<!-- t: end -->\nhand-written end\n"
    assert not replace_section(page, "<!-- u: begin -->", "<!-- u: end -->", "x")  # no markers: nothing written
    assert "new table" in page.read_text()
