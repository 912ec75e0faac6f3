"""bench/act.py, issue 13's act() benchmark: its building blocks with a handful of calls (no timing assertions).

The act() of every baseline gives the fp32 network's action (ONNX Runtime run, run_with_iobinding and torch agree),
ours agrees with it where the fp32 logits are far apart, and act_harness.c (bitrl_act, ONNX Runtime's C API) gives
Policy.act's and ONNX Runtime's actions, on the host and cross-built for rasp4 under qemu with the plugin's markers.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from repo_scripts import load_script

act = load_script("bench/act.py", "bench_act")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    targets = ("host", "rasp4") if shutil.which("aarch64-linux-gnu-gcc") else ("host",)
    return act.prepare_policy("demo", act.DEMO, tmp_path_factory.mktemp("act"), targets=targets, n_obs=16)


def _ort_include():
    """The ORT C header if bench/act.py already downloaded it (the test does not download it)."""
    from bitrl_compile.devices import cache_root

    folder = cache_root() / "bench" / f"ort-{act.ORT_DEB['version']}" / "include"
    return folder if (folder / "onnxruntime_c_api.h").is_file() else None


def test_python_acts_agree(demo):
    from bitrl_compile.runtime.tvm_runtime import aligned

    acts = act.python_acts(demo)
    assert set(acts) == {"bitrl", "ort-fp32-run", "ort-fp32-iobinding", "ort-int8-run", "ort-int8-iobinding", "torch"}
    obs = np.load(demo["obs_npy"])
    actions = {impl: [int(a(aligned(o))) for o in obs] for impl, a in acts.items()}
    assert actions["ort-fp32-run"] == actions["ort-fp32-iobinding"] == actions["torch"]
    assert actions["ort-int8-run"] == actions["ort-int8-iobinding"]
    # ours is ternary, ORT fp32: the same action wherever the fp32 network is sure (the largest logit margins)
    import onnxruntime as ort

    session = ort.InferenceSession(demo["onnx_fp32"], providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: obs})[0]
    sure = np.argsort(-np.abs(logits[:, 0] - logits[:, 1]))[:6]
    assert [actions["bitrl"][i] for i in sure] == [actions["ort-fp32-run"][i] for i in sure]
    # the measuring loop, and the tables made from its result
    res = act.measure_python([demo], calls=10, rounds=2, warmup=2)["demo"]
    assert res["actions"] == actions and all(len(t) == 10 for t in res["times_ns"].values())
    sections = {"x86-python": {"demo": {i: {"p50": act.summarize_ns(t)["p50_us"], "p99": 1.0}
                                        for i, t in res["times_ns"].items()}}}
    report = {"policies": [{"name": "demo", "model": "demo", "shape": "4-64-64-2"}], "sections": sections,
              "goals": act.goals(sections), "missing": ["x86 C rows: test"], "machine": "m", "command": "c",
              "date": "d", "agreement": {}, "notes": []}
    assert "ORT fp32 run_with_iobinding()" in act.render_text(report)
    assert "| x86, Python | ours: Policy.act(obs) |" in act.render_markdown(report)
    assert [g["met"] is None for g in report["goals"]] == [False, True, True, True, True]


def test_harness_gives_policy_act_actions(demo, tmp_path):
    from bitrl_compile.runtime import load

    include = _ort_include()
    exe = act.build_harness("host", tmp_path / "act_harness", include)
    lib = act.ort_library() if include else None
    res = act.run_harness(exe, demo, lib, calls=5, rounds=2)
    obs = np.fromfile(demo["obs_f32"], np.float32).reshape(-1, demo["obs_size"])
    with load(demo["artifacts"]["host"]) as policy:
        assert res["actions"]["bitrl"] == [int(policy.act(o)) for o in obs]
    assert all(len(ns) == 2 and min(ns) > 0 for ns in res["ns"].values())
    if include:
        py = act.python_acts(demo)
        for impl in ("ort-fp32-run", "ort-fp32-iobinding", "ort-int8-run", "ort-int8-iobinding"):
            assert res["actions"][impl] == [int(py[impl](o)) for o in obs], impl


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc") or not shutil.which("qemu-aarch64"),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_harness_counts_instructions_under_qemu(demo, tmp_path):
    from bitrl_compile.runtime import load

    exe = act.build_harness("rasp4", tmp_path / "act_harness", None)
    res = act.count_c(exe, demo, None, calls=5, work=tmp_path)
    obs = np.fromfile(demo["obs_f32"], np.float32).reshape(-1, demo["obs_size"])
    with load(demo["artifacts"]["host"]) as policy:  # host and rasp4 kernels are both bit-exact
        assert res["actions"]["bitrl"] == [int(policy.act(o)) for o in obs]
    assert [b[1] for b in res["blocks"]] == ["bitrl"] and res["instructions"]["bitrl"] > 100
