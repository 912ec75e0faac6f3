"""act() per call, ours vs ONNX Runtime and torch, from Python and from C, x86 and rasp4: issue 13's benchmark.

    python3 bench/act.py                     # everything (a few minutes): bench/results/act.md and act.json
    python3 bench/act.py --quick --out /tmp/act      # fewer calls (about a minute)

Two policies, both Discrete MLPs compiled here: the demo policy (bitrl_compile/examples/cartpole_ppo.safetensors,
4-64-64-2) and a LunarLander-shaped 8-256-256-4 MLP with random weights (torch's default init, seed 0). The fp32
baselines come from the same module as the compiler saw (bitrl_compile.bench.report.export_baselines: torch.save,
torch.onnx.export, onnxruntime.quantization.quantize_dynamic int8). Observations: standard normal, float32.
Everything runs with one thread (TVM_NUM_THREADS, OMP_NUM_THREADS, ORT intra/inter-op threads = 1), batch 1.

  x86 Python   one process (this file with --child), rounds that alternate between implementations, every call
               timed with perf_counter_ns; median and p99. Each implementation is act(): one float32 observation in,
               the action out. Ours: Policy.act(obs) (argmax inside the compiled module). ONNX Runtime fp32 and int8:
               session.run() and session.run_with_iobinding() (input and output OrtValues bound once over numpy
               buffers, the cheapest ORT call from Python), each followed by the same argmax. torch: the fp32
               module, eager, under inference_mode, then argmax.
  x86 C        bench/act_harness.c, one process: bitrl_act (ours) and ONNX Runtime's C API (Run and
               RunWithBinding on the same .onnx files, then argmax), rounds alternating; median of the rounds'
               ns per call. ORT's C header is not in its wheel: it is taken from Debian trixie's
               libonnxruntime-dev (downloaded once to ~/.cache/bitrl-compile/bench/, only the header kept) and
               used against the wheel's libonnxruntime.so, asking for that header's (older) ORT_API_VERSION.
  rasp4        guest instructions per act() under qemu-aarch64 -cpu cortex-a72, counted by the bench's TCG plugin
               between marker system calls: ours and ONNX Runtime from the emulated aarch64 Python (the count mode
               of `bitrl-compile bench`; its ONNX Runtime act() wraps session.run() in the runtime's own numpy pre-
               and post-processing), and from C (act_harness cross-built with aarch64-linux-gnu-gcc, ours and ONNX
               Runtime's C API with the aarch64 wheel's libonnxruntime.so).

A piece that is missing (no cross compiler, no qemu, no ORT header) leaves its rows out with a one-line reason on
stderr; the rest is still measured, printed and written, and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("act_harness.c")
DEMO = ROOT / "bitrl_compile" / "examples" / "cartpole_ppo.safetensors"
THREAD_ENV = {"TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# Debian trixie's libonnxruntime-dev, for onnxruntime_c_api.h only (the C API is backward compatible).
ORT_DEB = {"url": "http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
           "sha256": "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08", "version": "1.21.0",
           "member": "usr/include/onnxruntime/onnxruntime_c_api.h"}
POLICIES = {"demo": "demo 4-64-64-2", "mlp256": "256-256 (8-256-256-4)"}
PY_IMPLS = {"bitrl": "ours: Policy.act(obs)", "ort-fp32-run": "ORT fp32 run()",
            "ort-fp32-iobinding": "ORT fp32 run_with_iobinding()", "ort-int8-run": "ORT int8 run()",
            "ort-int8-iobinding": "ORT int8 run_with_iobinding()", "torch": "torch fp32 eager"}
C_IMPLS = {"bitrl": "ours: bitrl_act", "ort-fp32-run": "ORT fp32 C Run", "ort-fp32-iobinding": "ORT fp32 C RunWithBinding",
           "ort-int8-run": "ORT int8 C Run", "ort-int8-iobinding": "ORT int8 C RunWithBinding"}
QEMU_PY_IMPLS = {"bitrl": "ours: Policy.act(obs)", "onnxruntime": "ORT fp32 run() + runtime's numpy pre/post",
                 "onnxruntime-int8": "ORT int8 run() + runtime's numpy pre/post"}
SECTIONS = {"x86-python": ("x86, Python", "µs per act()", PY_IMPLS), "x86-c": ("x86, C", "µs per act()", C_IMPLS),
            "rasp4-python": ("rasp4 (qemu cortex-a72), Python", "instructions per act()", QEMU_PY_IMPLS),
            "rasp4-c": ("rasp4 (qemu cortex-a72), C", "instructions per act()", C_IMPLS)}
SETTINGS = {"quick": {"py_calls": 2000, "py_rounds": 10, "c_calls": 2000, "c_rounds": 10, "qemu_py_calls": 30,
                      "qemu_c_calls": 100},
            "full": {"py_calls": 20000, "py_rounds": 20, "c_calls": 20000, "c_rounds": 20, "qemu_py_calls": 200,
                     "qemu_c_calls": 1000}}
N_CHECK_OBS = 64  # observations whose actions every implementation reports (agreement, and the tests)


class Missing(RuntimeError):
    """A piece the benchmark needs is not here; the message is one line naming it and the fix."""


def log(msg: str) -> None:
    print(f"act: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) < 400 else text[:397] + "..."


# ---------------------------------------------------------------------------------------- inputs

def make_mlp256(path: Path, seed: int = 0) -> Path:
    """A LunarLander-shaped Discrete MLP policy, 8-256-256-4, random weights (torch's default init)."""
    import torch
    from torch import nn

    from bitrl_compile.frontends import save_mlp_policy

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    save_mlp_policy(path, net, {"obs_shape": [8], "hidden": [256, 256], "activation": "relu",
                                "output": {"kind": "discrete", "n": 4, "outputs": "logits"}})
    return path


def prepare_policy(name: str, model: Path, work: Path, targets: tuple[str, ...] = ("host", "rasp4"),
                   n_obs: int = N_CHECK_OBS, seed: int = 0) -> dict:
    """Compile `model` for each target, export its fp32/int8 ONNX and torch baselines, write observations.

    Returns {"name", "artifacts": {target: path or None}, "errors": {target: msg}, "onnx_fp32", "onnx_int8",
    "torch_module", "spec", "obs_npy", "obs_f32", "obs_size", "out_size"}."""
    from bitrl_compile.bench.report import export_baselines, random_observations
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_policy(model)
    info: dict = {"name": name, "model": str(model), "artifacts": {}, "errors": {}}
    manifest = None
    for target in targets:
        try:
            compiled = compile_policy(loaded, target, folder / f"policy-{target}.bitrl", force=True)
            info["artifacts"][target] = str(compiled.path)
            manifest = manifest or compiled.manifest
        except Exception as e:  # noqa: BLE001 - e.g. no cross compiler: that target's rows are left out
            info["artifacts"][target] = None
            info["errors"][target] = f"compiling {name} for {target} failed: {_one_line(e)}"
    if manifest is None:
        raise Missing(next(iter(info["errors"].values())))
    spec = {"input": manifest["input"], "output": manifest["output"]}
    if spec["output"]["kind"] != "discrete":
        raise ValueError(f"{name}: this benchmark's baselines take the argmax; give a Discrete policy")
    files = export_baselines(loaded, folder)
    obs = random_observations(spec["input"], n_obs, seed).astype(np.float32)
    np.save(folder / "observations.npy", obs)
    obs.tofile(folder / "observations.f32")
    layers = manifest["layers"]
    info.update(spec=spec, onnx_fp32=str(files["onnx_fp32"]), onnx_int8=str(files["onnx_int8"]),
                torch_module=str(files["torch_module"]) if files["torch_module"] else None,
                obs_npy=str(folder / "observations.npy"), obs_f32=str(folder / "observations.f32"),
                obs_size=int(np.prod(spec["input"]["shape"])), out_size=int(layers[-1]["out"]),
                shape="-".join([str(layers[0]["in"])] + [str(layer["out"]) for layer in layers]))
    return info


# ---------------------------------------------------------------------------------------- x86, Python

def python_acts(policy: dict) -> dict:
    """impl -> act(obs) for one prepared policy: ours, ORT fp32/int8 run and iobinding, torch eager."""
    import onnxruntime as ort

    from bitrl_compile.runtime import load
    from bitrl_compile.runtime.tvm_runtime import aligned

    acts = {"bitrl": load(policy["artifacts"]["host"]).act}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    for kind in ("fp32", "int8"):
        session = ort.InferenceSession(policy[f"onnx_{kind}"], options, providers=["CPUExecutionProvider"])
        name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name

        def run(obs, session=session, name=name, out_names=[out_name]):  # noqa: B006 - bound once, never mutated
            return session.run(out_names, {name: obs[None]})[0][0].argmax()

        x = aligned(np.zeros((1, policy["obs_size"]), np.float32))
        y = aligned(np.zeros((1, policy["out_size"]), np.float32))
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x))
        binding.bind_ortvalue_output(out_name, ort.OrtValue.ortvalue_from_numpy(y))

        def iobinding(obs, session=session, binding=binding, x=x, y=y):
            x[0] = obs
            session.run_with_iobinding(binding)
            return y[0].argmax()

        acts[f"ort-{kind}-run"], acts[f"ort-{kind}-iobinding"] = run, iobinding
    if policy.get("torch_module"):
        import torch

        torch.set_num_threads(1)
        module = torch.load(policy["torch_module"], weights_only=False).eval()  # written by export_baselines

        def torch_act(obs, module=module):
            with torch.inference_mode():
                return module(torch.from_numpy(obs)).argmax().item()
        acts["torch"] = torch_act
    return acts


def measure_python(policies: list[dict], calls: int, rounds: int, warmup: int = 200) -> dict:
    """In this process: per-call wall-clock ns of every (policy, impl), rounds alternating; actions of the
    check observations. Returns {policy: {"times_ns": {impl: [...]}, "actions": {impl: [...]}}}."""
    from bitrl_compile.runtime.tvm_runtime import aligned

    acts, single, result = {}, {}, {}
    for p in policies:
        obs = np.load(p["obs_npy"])
        single[p["name"]] = aligned(obs[0])
        for impl, act in python_acts(p).items():
            acts[(p["name"], impl)] = act
        result[p["name"]] = {"times_ns": {}, "actions": {
            impl: [int(acts[(p["name"], impl)](aligned(o))) for o in obs]
            for (name, impl) in acts if name == p["name"]}}
    for key, act in acts.items():
        x = single[key[0]]
        for _ in range(warmup):
            act(x)
    keys = list(acts)
    samples: dict = {key: [] for key in keys}
    per_round = max(1, calls // rounds)
    clock = time.perf_counter_ns
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            act, x, out = acts[key], single[key[0]], samples[key]
            for _ in range(per_round):
                t0 = clock()
                act(x)
                out.append(clock() - t0)
    for (name, impl), s in samples.items():
        result[name]["times_ns"][impl] = s
    return result


def run_python_child(policies: list[dict], calls: int, rounds: int, work: Path) -> dict:
    """measure_python in a fresh interpreter (this file with --child), one thread everywhere."""
    cfg = work / "python-child.json"
    cfg.write_text(json.dumps({"policies": policies, "calls": calls, "rounds": rounds}))
    env = {**os.environ, **THREAD_ENV, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(cfg)], capture_output=True,
                          text=True, env=env, timeout=1800, check=False)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        raise RuntimeError(f"the Python measurement process failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize_ns(samples: list[float]) -> dict:
    us = np.asarray(samples, np.float64) / 1e3
    return {"calls": len(us), "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "min_us": float(us.min())}


# ---------------------------------------------------------------------------------------- ONNX Runtime C

def ort_library(site: Path | None = None) -> Path:
    """libonnxruntime.so.* of the onnxruntime wheel (this Python's, or the one unpacked in `site`)."""
    if site is None:
        import onnxruntime

        folder = Path(onnxruntime.__file__).parent / "capi"
    else:
        folder = site / "onnxruntime" / "capi"
    libs = sorted(folder.glob("libonnxruntime.so.*"))
    if not libs:
        raise Missing(f"ONNX Runtime C API: no libonnxruntime.so.* in {folder}")
    return libs[-1]


def ort_header() -> Path:
    """The folder holding onnxruntime_c_api.h, from Debian's libonnxruntime-dev (downloaded once, header kept)."""
    from bitrl_compile.devices import cache_root

    folder = cache_root() / "bench" / f"ort-{ORT_DEB['version']}" / "include"
    if (folder / "onnxruntime_c_api.h").is_file():
        return folder
    deb = cache_root() / "bench" / Path(ORT_DEB["url"]).name
    deb.parent.mkdir(parents=True, exist_ok=True)
    if not deb.is_file():
        if shutil.which("dpkg") is None:
            raise Missing("ONNX Runtime C API: not measured (dpkg is needed to unpack libonnxruntime-dev's header)")
        log(f"downloading {ORT_DEB['url']} (for onnxruntime_c_api.h)")
        import urllib.request

        try:
            with urllib.request.urlopen(ORT_DEB["url"], timeout=120) as r:
                data = r.read()
        except OSError as e:
            raise Missing(f"ONNX Runtime C API: not measured (cannot download its header from "
                          f"{ORT_DEB['url']}: {_one_line(e)})") from e
        if hashlib.sha256(data).hexdigest() != ORT_DEB["sha256"]:
            raise Missing(f"ONNX Runtime C API: not measured ({ORT_DEB['url']} does not have the expected sha256)")
        tmp = deb.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, deb)
    with tempfile.TemporaryDirectory(dir=deb.parent) as tmp:
        proc = subprocess.run(["dpkg", "-x", str(deb), tmp], capture_output=True, text=True, check=False)
        header = Path(tmp) / ORT_DEB["member"]
        if proc.returncode != 0 or not header.is_file():
            raise Missing(f"ONNX Runtime C API: not measured (no {ORT_DEB['member']} in {deb.name})")
        staged = Path(tmp) / "include"
        staged.mkdir()
        shutil.copy2(header, staged / header.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, folder)
    return folder


# ---------------------------------------------------------------------------------------- C harness

def build_harness(target: str, out: Path, ort_include: Path | None) -> Path:
    """act_harness for `target` (host, or rasp4 cross-built), linked with libbitrl; with ONNX Runtime's C API
    (dlopen'ed at run time) when `ort_include` holds onnxruntime_c_api.h."""
    from bitrl_compile.devices.capi import CROSS_CC, capi_flags, target_arch
    from bitrl_compile.runtime.policy import host_arch

    arch = target_arch(target)
    cc = shutil.which("cc") if arch == host_arch() else shutil.which(CROSS_CC.get(arch, ""))
    if cc is None:
        name = "cc" if arch == host_arch() else CROSS_CC.get(arch)
        raise Missing(f"no C compiler for {arch} ({name} not found): install it with "
                      f"`apt-get install {'gcc-aarch64-linux-gnu' if arch == 'aarch64' else 'gcc'}`")
    try:
        cflags, libs = capi_flags(target)
    except Exception as e:  # CapiError, EmulatorError: one line each
        raise Missing(f"libbitrl for {target} cannot be built: {_one_line(e)}") from e
    ort = ["-DBITRL_BENCH_ORT", f"-I{ort_include}"] if ort_include else []
    cmd = [cc, "-std=c11", "-O2", "-Wall", str(HARNESS), "-o", str(out), *ort, *cflags, *libs, "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        first = next((x for x in proc.stderr.splitlines() if "error" in x), proc.stderr.strip()[:200])
        raise Missing(f"building act_harness for {target} failed: {first}")
    return out


def parse_harness(stdout: str) -> dict:
    """{"impls": [...], "actions": {impl: [...]}, "ns": {impl: [per round]}, "blocks": [(k, impl, calls)]}."""
    out: dict = {"impls": [], "actions": {}, "ns": {}, "blocks": []}
    for line in stdout.splitlines():
        kind, *rest = line.split()
        if kind == "impl":
            out["impls"].append(rest[0])
        elif kind == "actions":
            out["actions"][rest[0]] = [int(v) for v in rest[1:]]
        elif kind == "ns":
            out["ns"][rest[0]] = [float(v) for v in rest[1:]]
        elif kind == "block":
            out["blocks"].append((int(rest[0]), rest[1], int(rest[2])))
    return out


def _harness_command(exe: Path, policy: dict, target: str, ort_lib: Path | None, calls: int, rounds: int | None,
                     warmup: int, count: bool) -> list[str]:
    opts = ["--obs", policy["obs_f32"], "--calls", str(calls), "--warmup", str(warmup)]
    if rounds:
        opts += ["--rounds", str(rounds)]
    if count:
        opts.append("--count")
    files = [policy["artifacts"][target]]
    if ort_lib:
        opts += ["--ort", str(ort_lib)]
        files += [policy["onnx_fp32"], policy["onnx_int8"]]
    return [str(exe), *opts, *files]


def run_harness(exe: Path, policy: dict, ort_lib: Path | None, calls: int, rounds: int) -> dict:
    """The host harness, timing: per impl the ns per call of each round, and the check actions."""
    cmd = _harness_command(exe, policy, "host", ort_lib, calls, rounds, warmup=min(1000, calls), count=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **THREAD_ENV}, timeout=1800,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"act_harness failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return parse_harness(proc.stdout)


# ---------------------------------------------------------------------------------------- rasp4

def _counts(path: Path) -> dict[int, list[int]]:
    lines = [list(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()]
    return {line[0]: line[1:] for line in lines}


def count_c(exe: Path, policy: dict, ort_lib: Path | None, calls: int, work: Path) -> dict:
    """Guest instructions per bitrl_act (and ORT C call) of the cross-built harness under qemu cortex-a72."""
    from bitrl_compile import targets
    from bitrl_compile.bench.machine import build_plugin
    from bitrl_compile.devices.capi import qemu_command

    cpu = targets.get_target("rasp4").qemu_cpu
    counts_file = work / f"qemu-c-{policy['name']}.txt"
    cmd = qemu_command(_harness_command(exe, policy, "rasp4", ort_lib, calls, None, warmup=20, count=True), cpu)
    env = {**os.environ, **THREAD_ENV, "QEMU_PLUGIN": f"file={build_plugin()},out={counts_file}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"act_harness under qemu failed: "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    parsed = parse_harness(proc.stdout)
    by_label = _counts(counts_file)
    parsed["instructions"] = {impl: (by_label[2 * k + 1][0] - by_label[2 * k][0]) / n
                              for k, impl, n in parsed["blocks"]}
    return parsed


def count_python(policy: dict, calls: int, work: Path) -> dict:
    """Guest instructions per act() in the emulated aarch64 Python: `bitrl-compile bench`'s count mode."""
    from bitrl_compile.bench.report import count_instructions

    folder = work / policy["name"] / "qemu-python"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"spec": policy["spec"], "obs": policy["obs_npy"], "batches": [1], "threads": 1,
           "artifact": policy["artifacts"]["rasp4"], "onnx_fp32": policy["onnx_fp32"],
           "onnx_int8": policy["onnx_int8"]}
    quiet = []
    result = count_instructions(Path(policy["artifacts"]["rasp4"]), "rasp4", cfg,
                                ["bitrl", "onnxruntime", "onnxruntime-int8"], folder, calls=calls, log=quiet.append)
    return {"instructions": {impl: r["1"]["instructions_per_call"] for impl, r in result["results"].items()},
            "in_library": {impl: r["1"]["in_library"] for impl, r in result["results"].items()},
            "notes": result["notes"], "qemu": result["qemu"]}


# ---------------------------------------------------------------------------------------- table

GOALS = [("x86-python", "x86 demo: Python act() ≥ 2x faster than ORT fp32 run()", 2.0, ">="),
         ("x86-c-time", "x86 demo: C act() ≤ 1.5 µs", 1.5, "<="),
         ("x86-c-ratio", "x86 demo: C act() ≥ 3x faster than ORT's C API (fp32, its faster call)", 3.0, ">="),
         ("rasp4-python", "rasp4 demo: ≤ 40,000 instructions per Python act()", 40000, "<="),
         ("rasp4-c", "rasp4 demo: ≤ 10,000 instructions per C act()", 10000, "<=")]


def goal_values(sections: dict) -> dict:
    """The measured value of each goal (None where its rows are missing)."""
    def get(section, impl, key="p50"):
        return sections.get(section, {}).get("demo", {}).get(impl, {}).get(key)

    values: dict = {}
    ours, ort_run = get("x86-python", "bitrl"), get("x86-python", "ort-fp32-run")
    values["x86-python"] = ort_run / ours if ours and ort_run else None
    values["x86-c-time"] = get("x86-c", "bitrl")
    ort_c = [v for v in (get("x86-c", "ort-fp32-run"), get("x86-c", "ort-fp32-iobinding")) if v]
    values["x86-c-ratio"] = min(ort_c) / values["x86-c-time"] if ort_c and values["x86-c-time"] else None
    values["rasp4-python"] = get("rasp4-python", "bitrl")
    values["rasp4-c"] = get("rasp4-c", "bitrl")
    return values


def goals(sections: dict) -> list[dict]:
    values = goal_values(sections)
    rows = []
    for key, text, bound, op in GOALS:
        v = values[key]
        met = None if v is None else (v >= bound if op == ">=" else v <= bound)
        if v is None:
            shown = "not measured"
        elif key.startswith("rasp4"):
            shown = f"{v:,.0f}"
        elif key == "x86-c-time":
            shown = f"{v:.3f} µs"
        else:
            shown = f"{v:.2f}x"
        rows.append({"goal": text, "measured": v, "shown": shown, "met": met})
    return rows


def table_rows(sections: dict, policies: list[str]) -> list[list[str]]:
    """Rows of cells: section/implementation, then per policy: p50, p99, x ours."""
    rows = []
    for key, (title, unit, names) in SECTIONS.items():
        data = sections.get(key)
        if not data:
            continue
        for impl, label in names.items():
            if not any(impl in data.get(p, {}) for p in policies):
                continue
            cells = [title, label]
            for p in policies:
                entry = data.get(p, {}).get(impl)
                ours = data.get(p, {}).get("bitrl", {}).get("p50")
                if entry is None:
                    cells += ["", "", ""]
                    continue
                if unit.startswith("µs"):
                    cells += [f"{entry['p50']:.2f}", f"{entry['p99']:.2f}" if entry.get("p99") is not None else ""]
                else:
                    cells += [f"{entry['p50']:,.0f}", ""]
                cells.append(f"{entry['p50'] / ours:.2f}x" if ours else "")
            rows.append(cells)
    return rows


def header(policies: list[dict]) -> list[str]:
    cols = ["where", "implementation"]
    for p in policies:
        label = POLICIES.get(p["name"], p["name"])
        cols += [f"{label} p50", "p99", "÷ ours"]
    return cols


def render_text(report: dict) -> str:
    names = [p["name"] for p in report["policies"]]
    rows = [header(report["policies"]), *table_rows(report["sections"], names)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"act() per call, batch 1, 1 thread: {report['machine']}",
             ("x86 rows: µs per act() (p50, p99; C: median of rounds); rasp4 rows: guest instructions per act(); "
              "÷ ours: p50 over ours in the same section"), ""]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "Goals (issue 13)"]
    width = max(len(g["goal"]) for g in report["goals"])
    for g in report["goals"]:
        met = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        lines.append(f"  {g['goal'].ljust(width)}  {g['shown']:>14}  {met}")
    for m in report["missing"]:
        lines.append(f"not measured: {m}")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    names = [p["name"] for p in report["policies"]]
    head = header(report["policies"])
    lines = ["# act() per call: ours vs ONNX Runtime and torch, Python and C, x86 and rasp4", "",
             (f"`{report['command']}` on {report['machine']}, {report['date']}; batch 1, one thread "
             "(TVM_NUM_THREADS=1, OMP_NUM_THREADS=1, ONNX Runtime intra/inter-op threads 1). "
             "x86 rows: µs per act() (Python: p50 and p99 of every call, rounds alternating between "
             "implementations in one process; C: median of the rounds' mean ns per call, one process). "
             "rasp4 rows: guest instructions per act() under `qemu-aarch64 -cpu cortex-a72` (the bench's TCG "
             "plugin). ÷ ours: p50 over ours in the same section (> 1: ours is faster). How each row is measured: "
             "the docstring of `bench/act.py`."), "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in table_rows(report["sections"], names):
        lines.append("| " + " | ".join(r) + " |")
    lines += ["", "## Goals (issue 13)", "", "| goal | measured | met |", "|---|---:|---|"]
    for g in report["goals"]:
        lines.append(f"| {g['goal']} | {g['shown']} | {({True: 'yes', False: '**no**', None: '-'}[g['met']])} |")
    lines += ["", "## Policies", ""]
    for p in report["policies"]:
        lines.append(f"- {POLICIES.get(p['name'], p['name'])}: `{p['model']}`, layers {p['shape']}")
    agreement = report.get("agreement") or {}
    if agreement:
        lines += ["", "## Actions", "",
                  (f"Actions on {N_CHECK_OBS} standard-normal observations, share equal to ours (ours is ternary, "
                  "the baselines fp32 or int8, so they may differ; the C harness must equal `Policy.act`):"), ""]
        for p, by in agreement.items():
            lines.append(f"- {POLICIES.get(p, p)}: " + ", ".join(f"{k} {v:.0%}" for k, v in by.items()))
    notes = report.get("notes") or []
    if notes or report["missing"]:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in notes]
        lines += [f"- not measured: {m}" for m in report["missing"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- main

def run(quick: bool, out: Path, work: Path) -> int:
    from bitrl_compile.bench.machine import summary

    settings = SETTINGS["quick" if quick else "full"]
    missing: list[str] = []
    notes: list[str] = []
    sections: dict = {}
    agreement: dict = {}
    raw: dict = {}
    c_actions: dict = {}  # (target, policy) -> bitrl_act's actions on the check observations
    py_actions: dict = {}  # policy -> Policy.act's
    t_start = time.monotonic()

    log("[1/5] compiling the policies (host, rasp4) and exporting their ONNX/torch baselines")
    policies = []
    for name, model in (("demo", DEMO), ("mlp256", None)):
        model = model or make_mlp256(work / "mlp256.safetensors")
        p = prepare_policy(name, model, work)
        missing += [e for e in p["errors"].values()]
        policies.append(p)
        log(f"      {name}: {p['shape']}")
    host_ready = [p for p in policies if p["artifacts"].get("host")]

    log(f"[2/5] x86, Python: {settings['py_calls']} act() calls per implementation and policy, one process")
    try:
        res = run_python_child(host_ready, settings["py_calls"], settings["py_rounds"], work)
        sec = sections["x86-python"] = {}
        for p in host_ready:
            r = res[p["name"]]
            sec[p["name"]] = {impl: {"p50": s["p50_us"], "p99": s["p99_us"], "calls": s["calls"]}
                              for impl, s in ((i, summarize_ns(t)) for i, t in r["times_ns"].items())}
            ours = py_actions[p["name"]] = r["actions"]["bitrl"]
            agreement[p["name"]] = {f"python {impl}": float(np.mean(np.equal(a, ours)))
                                    for impl, a in r["actions"].items() if impl != "bitrl"}
    except Exception as e:  # noqa: BLE001
        missing.append(f"x86 Python rows: {_one_line(e)}")

    log("[3/5] x86, C: act_harness (bitrl_act, ONNX Runtime's C API)")
    ort_include = None
    try:
        ort_include = ort_header()
    except Missing as e:
        missing.append(str(e))
    try:
        host_lib = ort_library() if ort_include else None
        exe = build_harness("host", work / "act_harness-host", ort_include)
        sec = sections["x86-c"] = {}
        for p in host_ready:
            r = run_harness(exe, p, host_lib, settings["c_calls"], settings["c_rounds"])
            raw.setdefault("x86-c", {})[p["name"]] = r["ns"]
            sec[p["name"]] = {impl: {"p50": float(np.median(ns)) / 1e3, "p99": None, "rounds": len(ns),
                                     "round_min": min(ns) / 1e3, "round_max": max(ns) / 1e3}
                              for impl, ns in r["ns"].items()}
            c_actions[("host", p["name"])] = r["actions"]["bitrl"]
            agreement.setdefault(p["name"], {}).update(
                {f"C {impl}": float(np.mean(np.equal(a, r["actions"]["bitrl"])))
                 for impl, a in r["actions"].items() if impl != "bitrl"})
        if ort_include:
            notes.append(f"ONNX Runtime C API: onnxruntime_c_api.h of ORT {ORT_DEB['version']} (Debian trixie's "
                         f"libonnxruntime-dev, ORT_API_VERSION of that header) against the wheel's {host_lib.name}")
    except Exception as e:  # noqa: BLE001
        missing.append(f"x86 C rows: {_one_line(e)}")

    rasp4_ready = [p for p in policies if p["artifacts"].get("rasp4")]
    log(f"[4/5] rasp4, Python: instructions per act() under qemu ({settings['qemu_py_calls']} calls)")
    try:
        if not rasp4_ready:
            raise Missing("no rasp4 artifact was compiled")
        sec = sections["rasp4-python"] = {}
        for p in rasp4_ready:
            r = count_python(p, settings["qemu_py_calls"], work)
            sec[p["name"]] = {impl: {"p50": v, "in_library": r["in_library"][impl]}
                              for impl, v in r["instructions"].items()}
            notes += [n for n in r["notes"] if n not in notes and not n.startswith("torch")]
            if "qemu" not in raw:
                raw["qemu"] = r["qemu"]
                notes.append(f"rasp4 rows: {r['qemu']}; the Python ORT rows are `bitrl-compile bench`'s count mode, "
                             "whose ORT act() wraps session.run() in the runtime's numpy pre/post-processing")
    except Exception as e:  # noqa: BLE001
        missing.append(f"rasp4 Python rows: {_one_line(e)}")

    log(f"[5/5] rasp4, C: act_harness cross-built, under qemu ({settings['qemu_c_calls']} calls)")
    try:
        if not rasp4_ready:
            raise Missing("no rasp4 artifact was compiled")
        exe = build_harness("rasp4", work / "act_harness-rasp4", ort_include)
        arm_lib = None
        if ort_include:
            try:
                from bitrl_compile.bench.report import guest_onnxruntime

                arm_lib = ort_library(guest_onnxruntime())
            except Exception as e:  # noqa: BLE001
                missing.append(f"rasp4 ONNX Runtime C API: {_one_line(e)}")
        sec = sections["rasp4-c"] = {}
        for p in rasp4_ready:
            r = count_c(exe, p, arm_lib, settings["qemu_c_calls"], work)
            sec[p["name"]] = {impl: {"p50": v} for impl, v in r["instructions"].items()}
            c_actions[("rasp4", p["name"])] = r["actions"]["bitrl"]
        if arm_lib:
            notes.append(f"rasp4 C: ONNX Runtime's C API with the aarch64 onnxruntime wheel's {arm_lib.name}")
    except Exception as e:  # noqa: BLE001
        missing.append(f"rasp4 C rows: {_one_line(e)}")

    for (target, name), actions in c_actions.items():  # the C API must give Policy.act's actions
        if name in py_actions and actions != py_actions[name]:
            missing.append(f"{target} C bitrl_act differs from Python Policy.act on {name}'s check observations "
                           f"({sum(a != b for a, b in zip(actions, py_actions[name]))} of {len(actions)})")
        elif name in py_actions:
            agreement[name][f"{target} C bitrl_act vs Policy.act"] = 1.0
    report = {"command": shlex.join(["python3", "bench/act.py", *sys.argv[1:]]), "machine": summary(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "settings": settings,
              "policies": [{k: p.get(k) for k in ("name", "model", "shape", "obs_size", "out_size")} for p in policies],
              "sections": sections, "agreement": agreement, "raw": raw, "notes": notes, "missing": missing,
              "seconds": round(time.monotonic() - t_start, 1)}
    report["goals"] = goals(sections)
    report["policies"] = [dict(p, model=_shown_path(p["model"])) for p in report["policies"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render_markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(render_text(report))
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} in {report['seconds']:.0f} s")
    for m in missing:
        print(f"act: not measured: {m}", file=sys.stderr)
    return 1 if missing else 0


def _shown_path(path: str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name + " (generated: random weights, seed 0)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (about a minute)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "act.md",
                        help="the markdown table (JSON beside it, same name .json); a folder means FOLDER/act.md")
    parser.add_argument("--work", type=Path, help="keep the compiled artifacts, ONNX files and harnesses here "
                                                  "(default: a temporary folder, removed)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.update(THREAD_ENV)
    if args.child:
        cfg = json.loads(args.child.read_text())
        result = measure_python(cfg["policies"], cfg["calls"], cfg["rounds"])
        sys.stdout.write("\n" + json.dumps(result) + "\n")
        return 0
    out = args.out / "act.md" if args.out.suffix != ".md" else args.out
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return run(args.quick, out, args.work)
    with tempfile.TemporaryDirectory(prefix="bitrl-act-") as tmp:
        return run(args.quick, out, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
