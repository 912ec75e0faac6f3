"""`bitrl-compile bench MODEL`: what the ternary artifact gains over the fp32 policy, measured here.

    report = run_bench("model.zip", target="host", env_id="CartPole-v1", out=Path("out/bench"))
    # out/bench/report.md, report.json, {latency,memory,energy,returns}.png, and the files it measured

One command, four questions, each answered by a measurement or an explicit model:

    memory    parameters; fp32 bytes; artifact bytes per member; bits per weight; peak RSS (VmHWM) of
              a fresh process that loads and runs each implementation (bench_child.py, memory mode),
              next to the bare interpreter and interpreter + numpy
    latency   host targets: act() p50/p99 of ours, torch fp32, ONNX Runtime fp32 and int8 (dynamic
              quantization), one child process, same thread count, batch 1 and --batch.
              aarch64 targets: instructions per act() call under qemu-aarch64 -cpu <the board's core>,
              counted by our TCG plugin (qemu_insn_plugin.c), for ours and ONNX Runtime (aarch64 wheel)
    energy    an estimate: operations and weight bytes per call x Horowitz's 45 nm energies; real
              counters (RAPL) are used when the machine exposes them, and the report says which
    returns   fp32 vs ternary (and ONNX Runtime int8) over N seeded episodes, with --env

Baselines are made here from the same fp32 module the compiler saw: the module itself (torch.save)
for torch, torch.onnx.export (dynamo) for ONNX Runtime, onnxruntime.quantization.quantize_dynamic for
int8. Every process that is measured runs bench_child.py.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bitrl_compile import __version__
from bitrl_compile.bench import child as bench_child

CHILD = Path(bench_child.__file__)
PLUGIN_SOURCE = Path(__file__).with_name("qemu_insn_plugin.c")
IMPLS = ("bitrl", "torch", "onnxruntime", "onnxruntime-int8")
LABELS = {"bitrl": "ternary (bitrl)", "torch": "torch fp32", "onnxruntime": "ONNX Runtime fp32",
          "onnxruntime-int8": "ONNX Runtime int8", "python": "python (bare interpreter)",
          "numpy": "python + numpy"}
COLORS = {"bitrl": "#2a9d8f", "torch": "#e76f51", "onnxruntime": "#457b9d", "onnxruntime-int8": "#a8dadc",
          "python": "#bbbbbb", "numpy": "#888888"}
BOARD_CPU = {"rasp4": "cortex-a72", "rasp5": "cortex-a76"}
RSS_CALLS = 200  # act() calls per batch size in each memory child

# Energy per operation, 45 nm, 0.9 V: M. Horowitz, "Computing's energy problem (and what we can do
# about it)", ISSCC 2014, pp. 10-14. Memory figures are per 64-bit access.
ENERGY_SOURCE = ('M. Horowitz, "Computing\'s energy problem (and what we can do about it)", IEEE ISSCC 2014, '
                 "pp. 10-14 (45 nm, 0.9 V)")
ENERGY_PJ = {"int8_add": 0.03, "int32_add": 0.1, "int8_mul": 0.2, "int32_mul": 3.1,
             "fp32_add": 0.9, "fp32_mul": 3.7}
MEMORY_PJ_PER_64BIT = ((8 << 10, 10.0, "8 KB SRAM"), (32 << 10, 20.0, "32 KB SRAM"), (1 << 20, 100.0, "1 MB SRAM"),
                       (None, 1300.0, "DRAM (low end of 1.3-2.6 nJ)"))


def run_bench(model: str | os.PathLike, *, target: str = "host", env_id: str | None = None, episodes: int = 10,
              batch: int = 32, threads: int = 1, out: str | os.PathLike = "out/bench", calls: int = 2000,
              seed: int = 0, config: dict | None = None, trust_pickle: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Benchmark MODEL compiled for `target` against its fp32 self; write the report into `out`."""
    from bitrl_compile import targets
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy
    from bitrl_compile.runtime.policy import host_arch

    if batch < 1 or threads < 1 or calls < 10 or episodes < 0:
        raise ValueError("--batch and --threads must be >= 1, --calls >= 10 and --episodes >= 0")
    out = Path(out)
    tgt = targets.get_target(target)
    cross = tgt.arch != host_arch()
    cfg = dict(config or {}, **({"env": env_id} if env_id else {}))
    command = _command(model, target, env_id, episodes, batch, threads, out, calls, seed)
    log(f"bench: {command}")

    log("[1/7] loading the policy and compiling it")
    loaded = load_policy(model, config=cfg or None, trust_pickle=trust_pickle)
    out.mkdir(parents=True, exist_ok=True)
    compiled = compile_policy(loaded, target, out / "policy.bitrl", force=True, log=lambda s: log(f"      {s}"))
    host_artifact = compiled.path
    if cross:  # memory is measured natively: a host build of the same policy
        host_artifact = compile_policy(loaded, "host", out / "policy-host.bitrl", force=True).path

    log("[2/7] fp32 baselines: torch.export, ONNX export, ONNX Runtime dynamic int8 quantization")
    files = export_baselines(loaded, out)
    spec = {"input": compiled.manifest["input"], "output": compiled.manifest["output"]}

    log("[3/7] observations" + (f" and fp32 returns: {episodes} episodes of {env_id}" if env_id else ""))
    has_torch = bool(files["torch_module"] or files["pt2"])
    fp32_act = _parent_act("torch" if has_torch else "onnxruntime", files, spec)
    visited: list = []
    returns: dict = {}
    if env_id and episodes:
        from bitrl_compile.evaluate import evaluate

        returns["torch" if has_torch else "onnxruntime"] = evaluate(fp32_act, env_id, episodes, seed,
                                                                           record=visited)[0]
    obs = np.stack(visited[:4096]).astype(np.float32) if visited else random_observations(spec["input"], 256, seed)
    np.save(out / "observations.npy", obs)

    report = {"command": command, "machine": machine_info(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": {"path": str(model), "source": loaded.source, "description": loaded.description,
                        "input": spec["input"], "output": spec["output"]},
              "target": compiled.manifest["target"], "threads": threads, "batch": batch}

    log("[4/7] memory: sizes, and peak RSS of one fresh process per implementation")
    report["memory"] = memory_section(model, loaded, compiled, host_artifact, files, spec, batch, threads, out)
    report["memory"]["measured_with_host_build"] = cross

    child_cfg = {"spec": spec, "obs": str(out / "observations.npy"), "batches": sorted({1, batch}),
                 "threads": threads, **{k: str(v) for k, v in files.items() if v}}
    impls = [i for i in IMPLS if i != "torch" or has_torch]
    if cross:
        log(f"[5/7] instructions per act() under qemu-aarch64 -cpu {BOARD_CPU.get(target, 'cortex-a72')}")
        report["latency"] = count_instructions(compiled.path, target, dict(child_cfg, artifact=str(compiled.path)),
                                               impls, out, calls=max(10, min(calls, 200)), log=log)
    else:
        log(f"[5/7] latency: {calls} act() calls per implementation and batch size, {threads} thread(s)")
        report["latency"] = measure_latency(dict(child_cfg, artifact=str(compiled.path)), impls, calls, threads)

    log("[6/7] energy estimate")
    report["energy"] = energy_section(compiled, files, report["latency"])

    log("[7/7] return kept and agreement with fp32" + (f" ({episodes} episodes)" if env_id else ""))
    report["returns"], report["agreement"] = returns_section(compiled, files, spec, env_id, episodes, seed, obs,
                                                             returns, fp32_act)
    report["plots"] = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(report))
    log(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plots")
    return report


def _command(model, target, env_id, episodes, batch, threads, out, calls, seed) -> str:
    args = ["bitrl-compile", "bench", str(model), "--target", target]
    if env_id:
        args += ["--env", env_id, "--episodes", str(episodes)]
    args += ["--batch", str(batch), "--threads", str(threads), "--calls", str(calls), "--out", str(out)]
    if seed:
        args += ["--seed", str(seed)]
    return shlex.join(args)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------- baselines

def module_obs_shape(input_spec: dict) -> tuple[int, ...]:
    """The shape of one observation as the network sees it (one-hot observations are vectors)."""
    if input_spec.get("preprocess") == "onehot":
        return (int(input_spec["n"]),)
    return tuple(input_spec["shape"])


def export_baselines(loaded, out: Path) -> dict[str, Path | None]:
    """fp32_module.pt (torch.save of the module; fp32.pt2 from torch.export if it cannot be pickled),
    fp32.onnx (torch.onnx.export with the dynamo exporter, or the ONNX input itself) and int8.onnx
    (onnxruntime.quantization.quantize_dynamic, int8 weights, uint8 activations quantized per call)."""
    import contextlib
    import io
    import logging
    import warnings

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files: dict[str, Path | None] = {"torch_module": None, "pt2": None, "onnx_fp32": out / "fp32.onnx",
                                     "onnx_int8": out / "int8.onnx"}
    if loaded.module is None:  # an ONNX policy: it is its own fp32 baseline; there is no torch module
        onnx.save(loaded.onnx_model, files["onnx_fp32"])
    else:
        import torch

        module = loaded.module.eval()
        example = (torch.zeros((2, *module_obs_shape(loaded.input)), dtype=torch.float32),)
        dynamic = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
        exporter_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" warnings
        level = exporter_log.level
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:  # the module itself, run eagerly: what a torch user deploys
                files["torch_module"] = out / "fp32_module.pt"
                torch.save(module, files["torch_module"])
            except Exception:  # noqa: BLE001 - not picklable (e.g. a closure inside): an exported program
                files["torch_module"].unlink(missing_ok=True)
                files["torch_module"] = None
                files["pt2"] = out / "fp32.pt2"
                torch.export.save(torch.export.export(module, example, dynamic_shapes=dynamic), files["pt2"])
            torch.onnx.export(module, example, files["onnx_fp32"], input_names=["obs"], output_names=["out"],
                              dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
        exporter_log.setLevel(level)
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # quantize_dynamic logs "consider pre-processing" to root
    try:
        quantize_dynamic(str(files["onnx_fp32"]), str(files["onnx_int8"]), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return files


def _parent_act(impl: str, files: dict, spec: dict) -> Callable:
    """An act() for the returns and agreement checks, built exactly as the measured child builds it."""
    return bench_child.make_act(impl, {"spec": spec, "threads": 1, **{k: str(v) for k, v in files.items() if v}})


def random_observations(input_spec: dict, n: int, seed: int) -> np.ndarray:
    """Observations of the right shape when no environment is given (standard normal; ints for one-hot)."""
    rng = np.random.default_rng(seed)
    if input_spec.get("preprocess") == "onehot":
        return rng.integers(0, int(input_spec["n"]), n)
    if input_spec.get("preprocess") == "image":
        return rng.integers(0, 256, (n, *input_spec["shape"])).astype(np.float32)
    return rng.standard_normal((n, *input_spec["shape"])).astype(np.float32)


# ---------------------------------------------------------------------------------------- child runs

def run_child(cfg: dict, threads: int = 1, command: list[str] | None = None, env: dict | None = None,
              timeout: float = 900.0) -> dict:
    """Run bench_child.py with `cfg` in a fresh process (or `command` + [child, cfg]); its JSON result."""
    base = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads), "TVM_NUM_THREADS": str(threads), "PYTHONSAFEPATH": "1",
            "PYTHONHASHSEED": "0"}
    proc = subprocess.run([*(command or [sys.executable]), str(CHILD), json.dumps(cfg)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **base, **(env or {})}, check=False)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        raise RuntimeError(f"bench child ({cfg['mode']} {cfg.get('impls')}) failed with status {proc.returncode}: "
                           f"{lines[-1] if lines else '(no message)'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- memory

def artifact_members(path: Path) -> dict[str, dict[str, int]]:
    """Each zip member's size unpacked and as stored (deflated) in the file."""
    with zipfile.ZipFile(path) as z:
        return {i.filename: {"bytes": i.file_size, "stored_bytes": i.compress_size} for i in z.infolist()}


def memory_section(model, loaded, compiled, host_artifact: Path, files: dict, spec: dict, batch: int,
                   threads: int, out: Path) -> dict:
    import onnx

    layers = compiled.manifest["layers"]
    weights = sum(layer["in"] * layer["out"] for layer in layers)
    if loaded.module is not None:
        n_params = sum(p.numel() for p in loaded.module.parameters()) + sum(b.numel() for b in loaded.module.buffers())
    else:
        n_params = sum(int(np.prod(t.dims)) for t in loaded.onnx_model.graph.initializer)
    packed = sum(v.nbytes for v in compiled.params.values() if v.dtype == np.uint8)
    param_bytes = sum(v.nbytes for v in compiled.params.values())
    int8_init = onnx.load(str(files["onnx_int8"])).graph.initializer
    int8_param_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in int8_init)
    size = compiled.path.stat().st_size
    members = artifact_members(compiled.path)
    section = {
        "parameters": int(n_params), "ternary_weights": int(weights), "fp32_bytes": 4 * int(n_params),
        "artifact": {"path": str(compiled.path), "bytes": size, "members": members,
                     "zip_overhead_bytes": size - sum(m["stored_bytes"] for m in members.values())},
        "param_bytes": {"bitrl": int(param_bytes), "fp32": 4 * int(n_params), "onnxruntime-int8": int(int8_param_bytes)},
        "files": {Path(model).name: Path(model).stat().st_size,
                  **{Path(v).name: Path(v).stat().st_size for v in files.values() if v}},
        "bits_per_weight": {"weights_only": 8 * packed / weights, "with_scales_and_biases": 8 * param_bytes / weights},
        "param_ratio_fp32_over_bitrl": 4 * n_params / param_bytes,
    }
    child = {"spec": spec, "obs": str(out / "observations.npy"), "batches": sorted({1, batch}), "calls": RSS_CALLS,
             "threads": threads, "artifact": str(host_artifact), "mode": "memory",
             **{k: str(v) for k, v in files.items() if v}}
    has_torch = bool(files["torch_module"] or files["pt2"])
    kinds = ["python", "numpy", "bitrl", *(["torch"] if has_torch else []), "onnxruntime", "onnxruntime-int8"]
    section["rss"] = {kind: run_child(dict(child, impls=[kind]), threads) for kind in kinds}
    section["rss_calls"] = RSS_CALLS
    section["rss_ratio_torch_over_bitrl"] = (section["rss"]["torch"]["peak_rss"] / section["rss"]["bitrl"]["peak_rss"]
                                             if "torch" in section["rss"] else None)
    return section


# ---------------------------------------------------------------------------------------- latency

def measure_latency(child_cfg: dict, impls: list[str], calls: int, threads: int, rounds: int = 10) -> dict:
    """act() wall-clock times of every implementation, interleaved in one child process."""
    raw = run_child(dict(child_cfg, mode="latency", impls=impls, calls=calls, rounds=rounds,
                         warmup=min(100, calls)), threads)
    results = {}
    for impl, by_batch in raw["times_ns"].items():
        results[impl] = {}
        for b, samples in by_batch.items():
            us = np.asarray(samples, np.float64) / 1e3
            entry = {"calls": len(us), "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
                     "mean_us": float(us.mean()), "min_us": float(us.min())}
            entry["p50_us_per_obs"] = entry["p50_us"] / int(b)
            if raw.get("thread_cpu_ns"):
                cpu = np.asarray(raw["thread_cpu_ns"][impl][b], np.float64) / 1e3
                entry["cpu_p50_us"], entry["cpu_p99_us"] = float(np.percentile(cpu, 50)), float(np.percentile(cpu, 99))
            if raw["rapl_uj"]:
                entry["rapl_uj_per_call"] = raw["rapl_uj"][impl][b] / len(us)
            results[impl][b] = entry
    ref = results["bitrl"]
    speedup = {impl: {b: r[b]["p50_us"] / ref[b]["p50_us"] for b in r} for impl, r in results.items()}
    return {"kind": "wall_clock", "unit": "µs per act() call", "threads": threads, "rounds": rounds, "results": results,
            "p50_ratio_over_bitrl": speedup, "rapl_files": raw["rapl_files"]}


def build_plugin() -> Path:
    """libbitrl_insn.so from qemu_insn_plugin.c, built once per source version under the cache."""
    from bitrl_compile.devices import cache_root

    source = PLUGIN_SOURCE.read_bytes()
    lib = cache_root() / "qemu-plugins" / f"libbitrl_insn-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if lib.is_file():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("counting instructions under qemu needs a host C compiler; install it with "
                           "`apt-get install gcc`")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", str(built),
                               str(PLUGIN_SOURCE)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot build the qemu plugin: {proc.stderr.strip()[-300:]}")
        os.replace(built, lib)
    return lib


def guest_onnxruntime() -> Path:
    """A folder with the aarch64 onnxruntime wheel (this host's version) unpacked, for the qemu guest."""
    import fcntl

    from bitrl_compile.devices import WHEEL_PLATFORMS, cache_root

    version = importlib.metadata.version("onnxruntime")
    site = cache_root() / f"aarch64-onnxruntime-{version}"
    if (site / "onnxruntime" / "__init__.py").is_file():
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    with open(site.parent / f".{site.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (site / "onnxruntime" / "__init__.py").is_file():
            return site
        with tempfile.TemporaryDirectory(dir=site.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--python-version", "3.11", "-d", tmp]
            for tag in WHEEL_PLATFORMS:
                cmd += ["--platform", tag]
            proc = subprocess.run(cmd + [f"onnxruntime=={version}"], capture_output=True, text=True, check=False)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise RuntimeError(f"cannot download the aarch64 onnxruntime=={version} wheel: "
                                   f"{(proc.stderr.strip().splitlines() or ['no wheel'])[-1]}")
            unpacked = Path(tmp) / "site"
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(unpacked)
            os.replace(unpacked, site)
    return site


def count_instructions(artifact: Path, target: str, child_cfg: dict, impls: list[str], out: Path, calls: int,
                       log: Callable[[str], None] = print) -> dict:
    """Guest instructions per act() call under qemu, total and inside each implementation's library."""
    from bitrl_compile.devices import qemu_python_command

    cpu = BOARD_CPU.get(target, "cortex-a72")
    plugin = build_plugin()
    command = qemu_python_command(cpu)
    notes = ["torch is not measured under qemu (no aarch64 torch in the emulated Python)"]
    impls = [i for i in impls if i != "torch"]
    try:
        ort_site = guest_onnxruntime()
        command = [f"{a}{os.pathsep}{ort_site}" if a.startswith("PYTHONPATH=") else a for a in command]
    except RuntimeError as e:
        notes.append(f"ONNX Runtime is not measured under qemu: {e}")
        impls = [i for i in impls if not i.startswith("onnxruntime")]
    command = [*command[:-1], "-E", "PYTHONHASHSEED=0", "-E", "TVM_NUM_THREADS=1", "-E", "OMP_NUM_THREADS=1",
               "-E", "OPENBLAS_NUM_THREADS=1", command[-1]]
    counts_file = out / "qemu-instructions.txt"
    env = {"QEMU_PLUGIN": f"file={plugin},out={counts_file}"}
    raw = run_child(dict(child_cfg, mode="count", impls=impls, calls=calls, warmup=20, threads=1), 1,
                    command=command, env=env)
    lines = [list(map(int, line.split())) for line in counts_file.read_text().splitlines() if line.strip()]
    by_label = {line[0]: line[1:] for line in lines}
    results: dict = {}
    for k, block in enumerate(raw["blocks"]):
        before, after = by_label[2 * k], by_label[2 * k + 1]
        per_call = [(a - b) / block["calls"] for a, b in zip(after, before)]
        libraries = {r["library"]: per_call[1 + i] for i, r in enumerate(raw["ranges"])
                     if r["impl"] == block["impl"] and 1 + i < len(per_call)}
        results.setdefault(block["impl"], {})[str(block["batch"])] = {
            "calls": block["calls"], "instructions_per_call": per_call[0], "in_library": libraries,
            "instructions_per_obs": per_call[0] / block["batch"]}
    ratio = {impl: {b: r[b]["instructions_per_call"] / results["bitrl"][b]["instructions_per_call"] for b in r}
             for impl, r in results.items()}
    qemu_version = subprocess.run([command[0], "--version"], capture_output=True, text=True,
                                  check=False).stdout.split("\n")[0]
    return {"kind": "instructions", "unit": "guest instructions per act() call", "cpu": cpu, "qemu": qemu_version,
            "threads": 1, "results": results, "ratio_over_bitrl": ratio, "notes": notes,
            "method": f"qemu-aarch64 -cpu {cpu} with the bench's TCG plugin ({PLUGIN_SOURCE.name}): instructions "
                      "of every translated block entered, between two marker system calls around "
                      f"{calls} act() calls (after 20 warm-up calls) on 64-byte aligned observations, "
                      "PYTHONHASHSEED=0, one thread; repeated runs agree to within about 1%"}


# ---------------------------------------------------------------------------------------- energy

def memory_tier(nbytes: int) -> tuple[float, str]:
    for limit, pj, name in MEMORY_PJ_PER_64BIT:
        if limit is None or nbytes <= limit:
            return pj, name
    raise AssertionError("unreachable")


def operation_counts(layers: list[dict]) -> dict[str, dict[str, int]]:
    """Arithmetic per batch-1 call of every linear layer (K inputs, N outputs), by implementation.

    fp32               K*N fp32 multiply + add; N bias adds
    ONNX Runtime int8  activation quantization (K fp32 compares for min/max, K fp32 multiply + add);
                       K*N int8 multiply + int32 add; N fp32 multiply (rescale) + add (bias)
    ternary (ours)     activation quantization (K fp32 compares for absmax, K fp32 multiply);
                       K*N int32 add (a ternary weight adds, subtracts or skips the int8 activation;
                       counted as an add even for zeros); N fp32 multiply + add (rescale with bias)
    Activation functions, rounding and the interpreter around the network are left out (alike for all).
    """
    counts = {"fp32": {}, "onnxruntime-int8": {}, "bitrl": {}}

    def add(impl, op, n):
        counts[impl][op] = counts[impl].get(op, 0) + int(n)

    for layer in layers:
        k, n = layer["in"], layer["out"]
        add("fp32", "fp32_mul", k * n)
        add("fp32", "fp32_add", k * n + n)
        add("onnxruntime-int8", "fp32_add", 2 * k + n)
        add("onnxruntime-int8", "fp32_mul", k + n)
        add("onnxruntime-int8", "int8_mul", k * n)
        add("onnxruntime-int8", "int32_add", k * n)
        add("bitrl", "fp32_add", k + n)
        add("bitrl", "fp32_mul", k + n)
        add("bitrl", "int32_add", k * n)
    return counts


def energy_section(compiled, files: dict, latency: dict) -> dict:
    memory = {"fp32": 4 * sum(layer["in"] * layer["out"] + layer["out"] for layer in compiled.manifest["layers"]),
              "onnxruntime-int8": None, "bitrl": int(sum(v.nbytes for v in compiled.params.values()))}
    import onnx

    memory["onnxruntime-int8"] = int(sum(onnx.numpy_helper.to_array(t).nbytes
                                         for t in onnx.load(str(files["onnx_int8"])).graph.initializer))
    ops = operation_counts(compiled.manifest["layers"])
    per_call = {}
    for impl, counts in ops.items():
        compute = sum(ENERGY_PJ[op] * n for op, n in counts.items())
        pj_per_read, tier = memory_tier(memory[impl])
        moved = memory[impl] * pj_per_read / 8
        per_call[impl] = {"operations": counts, "weight_bytes": memory[impl], "memory_tier": tier,
                          "compute_pj": compute, "weight_memory_pj": moved, "total_pj": compute + moved}
    ratio = {impl: per_call[impl]["total_pj"] / per_call["bitrl"]["total_pj"] for impl in per_call}
    return {"kind": "estimate", "source": ENERGY_SOURCE, "energy_pj": ENERGY_PJ,
            "memory_pj_per_64bit": [{"up_to_bytes": lim, "pj": pj, "name": name} for lim, pj, name in MEMORY_PJ_PER_64BIT],
            "per_call": per_call, "ratio_over_bitrl": ratio, "counters": energy_counters(latency)}


def energy_counters(latency: dict) -> dict:
    """Whether real energy counters exist here, and what they measured (RAPL package energy per call)."""
    if latency.get("rapl_files"):
        per_call = {impl: {b: r.get("rapl_uj_per_call") for b, r in by_b.items()}
                    for impl, by_b in latency["results"].items()}
        return {"available": True, "how": f"RAPL energy_uj ({', '.join(latency['rapl_files'])}), whole package, "
                                          "read around each block of timed calls", "uj_per_call": per_call}
    reasons = []
    if not Path("/sys/class/powercap").exists():
        reasons.append("no RAPL (/sys/class/powercap does not exist)")
    elif latency.get("kind") == "wall_clock":
        reasons.append("RAPL energy_uj files are not readable by this user")
    else:
        reasons.append("RAPL would measure the emulating x86 host, not the aarch64 target")
    perf = shutil.which("perf")
    if perf is None:
        reasons.append("`perf` is not installed")
    else:
        probe = subprocess.run([perf, "stat", "-x,", "-e", "power/energy-pkg/,instructions", "true"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0 or "not supported" in probe.stderr or "unknown" in probe.stderr.lower():
            reasons.append("`perf stat` has no power/energy-pkg or hardware instruction events here")
    return {"available": False, "why": "; ".join(reasons) or "no energy counter found"}


# ---------------------------------------------------------------------------------------- returns

def returns_section(compiled, files: dict, spec: dict, env_id: str | None, episodes: int, seed: int,
                    obs: np.ndarray, returns: dict, fp32_act: Callable) -> tuple[dict | None, dict]:
    from bitrl_compile import reference
    from bitrl_compile.devices import open_policy

    policy = open_policy(str(compiled.path))
    int8_act = _parent_act("onnxruntime-int8", files, spec)
    try:
        actions = {"fp32": np.asarray(fp32_act(obs)), "bitrl": np.asarray(policy.act(obs)),
                   "onnxruntime-int8": np.asarray(int8_act(obs))}
        outputs = np.asarray(policy.forward(obs))
        if env_id and episodes:
            from bitrl_compile.evaluate import evaluate

            returns["bitrl"] = evaluate(policy.act, env_id, episodes, seed)[0]
            returns["onnxruntime-int8"] = evaluate(int8_act, env_id, episodes, seed)[0]
            import gymnasium as gym

            space = gym.make(env_id).action_space
            space.seed(seed)
            returns["random"] = evaluate(lambda o: space.sample(), env_id, episodes, seed)[0]
    finally:
        policy.close()
    from bitrl_compile.runtime.policy import normalization, prepare_observations

    prepared, _ = prepare_observations(spec["input"], obs, normalization(spec["input"]))
    ref = reference.run(compiled.quantized, prepared)

    def agree(a, b):
        a, b = np.asarray(a), np.asarray(b)
        if spec["output"]["kind"] == "discrete":
            return float(np.mean(a == b))
        scale = np.asarray(spec["output"]["high"], np.float32) - np.asarray(spec["output"]["low"], np.float32)
        return float(np.mean(np.all(np.abs(a - b) <= 0.05 * np.abs(scale), axis=tuple(range(1, a.ndim)))))

    agreement = {"observations": len(obs), "source": "visited by the fp32 policy" if env_id else "random",
                 "bitrl_vs_fp32": agree(actions["bitrl"], actions["fp32"]),
                 "int8_vs_fp32": agree(actions["onnxruntime-int8"], actions["fp32"]),
                 "bitrl_max_abs_diff_vs_reference": float(np.max(np.abs(outputs - ref))),
                 "bitrl_runs_on": compiled.manifest["target"]["name"]}
    if not returns or "bitrl" not in returns:
        return None, agreement
    fp32_key = "torch" if "torch" in returns else "onnxruntime"
    fp32, tern, rand = (float(np.mean(returns[k])) for k in (fp32_key, "bitrl", "random"))
    section = {"env": env_id, "episodes": episodes, "seeds": [seed, seed + episodes - 1], "fp32_impl": fp32_key,
               "episodes_returns": returns,
               "mean": {k: float(np.mean(v)) for k, v in returns.items()},
               "std": {k: float(np.std(v)) for k, v in returns.items()},
               "kept": tern / fp32 if fp32 > 0 else None,
               "kept_over_random": (tern - rand) / (fp32 - rand) if fp32 != rand else None,
               "int8_kept": float(np.mean(returns["onnxruntime-int8"])) / fp32 if fp32 > 0 else None}
    return section, agreement


# ---------------------------------------------------------------------------------------- machine

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "bitrl-compile": __version__}
    for dist in ("numpy", "torch", "onnxruntime", "apache-tvm", "apache-tvm-ffi"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "os": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "versions": versions}


# ---------------------------------------------------------------------------------------- plots

def write_plots(report: dict, out: Path) -> list[str]:
    """latency.png, memory.png, energy.png and (with --env) returns.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False})
    names = [_plot_latency(report, plt), _plot_memory(report, plt), _plot_energy(report, plt)]
    if report.get("returns"):
        names.append(_plot_returns(report, plt))
    for name, fig in names:
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return [name for name, _ in names]


def _label_bars(ax, bars, texts):
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)


def _plot_latency(report: dict, plt):
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lat = report["latency"]
    impls = list(lat["results"])
    batches = list(next(iter(lat["results"].values())))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        x = np.arange(len(impls))
        colors = [COLORS[i] for i in impls]
        if lat["kind"] == "wall_clock":
            p50 = [lat["results"][i][b]["p50_us"] for i in impls]
            p99 = [lat["results"][i][b]["p99_us"] for i in impls]
            bars = ax.bar(x, p50, color=colors, label="p50 (wall clock)")
            ax.scatter(x, p99, marker="_", s=900, color="#333333", zorder=3, label="p99 (wall clock)")
            if all("cpu_p99_us" in lat["results"][i][b] for i in impls):
                ax.scatter(x, [lat["results"][i][b]["cpu_p99_us"] for i in impls], marker="o", s=22,
                           color="#333333", zorder=3, label="p99 of the calling thread's CPU time")
            _label_bars(ax, bars, [f"{v:.1f}" for v in p50])
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("µs per act() call (log scale)")
            ax.set_ylim(min(p50) / 2, max(p99) * 2)
        else:
            total = [lat["results"][i][b]["instructions_per_call"] for i in impls]
            inlib = [sum(lat["results"][i][b]["in_library"].values()) for i in impls]
            ax.bar(x, inlib, color=colors)
            ax.bar(x, np.subtract(total, inlib), bottom=inlib, color=colors, alpha=0.35, hatch="//",
                   edgecolor="white")
            _label_bars(ax, ax.bar(x, np.zeros(len(x)), bottom=total), [f"{t / 1e3:,.0f}k" for t in total])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}k"))
            ax.set_ylabel("guest instructions per act() call")
            ax.set_ylim(0, max(total) * 1.12)
        ax.set_xticks(x, [LABELS[i].replace(" ", "\n", 1) for i in impls], fontsize=9)
        ax.set_title(f"batch {b}")
    if lat["kind"] == "wall_clock":
        fig.suptitle(f"act() latency, {lat['threads']} thread(s), {report['machine']['cpu']}", fontsize=11)
        handles, labels = axes[0][0].get_legend_handles_labels()
        handles[labels.index("p50 (wall clock)")] = Patch(color="#777777")  # one swatch for bars of every colour
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02), markerscale=0.5)
    else:
        fig.suptitle(f"instructions per act() under qemu-aarch64 -cpu {lat['cpu']} (a count, not a time)",
                     fontsize=11)
        fig.legend(handles=[Patch(color="#777777", label="inside the engine's own libraries"),
                            Patch(facecolor="#777777", alpha=0.35, hatch="//", edgecolor="white",
                                  label="Python, numpy and glue")],
                   loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return "latency.png", fig


def _plot_memory(report: dict, plt):
    mem = report["memory"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    keys = ["fp32", "onnxruntime-int8", "bitrl"]
    values = [mem["param_bytes"][k] for k in keys]
    bars = ax1.bar(range(3), values, color=[COLORS["torch"], COLORS["onnxruntime-int8"], COLORS["bitrl"]])
    _label_bars(ax1, bars, [f"{v:,} B" for v in values])
    ax1.set_xticks(range(3), ["fp32", "int8 (ORT)", "ternary (ours)"])
    ax1.set_ylabel("parameter bytes (weights, scales, biases)")
    ax1.set_ylim(0, max(values) * 1.15)
    ax1.set_title(f"parameters: {mem['parameters']:,}")
    rss = mem["rss"]
    kinds = list(rss)
    peak = [rss[k]["peak_rss"] / 2**20 for k in kinds]
    bars = ax2.bar(range(len(kinds)), peak, color=[COLORS[k] for k in kinds])
    _label_bars(ax2, bars, [f"{v:.0f}" for v in peak])
    ax2.axhline(rss["python"]["peak_rss"] / 2**20, color="#666666", ls="--", lw=1, label="bare python")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_xticks(range(len(kinds)), [LABELS[k].replace(" (", "\n(").replace(" + ", "\n+ ").replace(" fp32", "\nfp32")
                                       .replace(" int8", "\nint8") for k in kinds], fontsize=8)
    ax2.set_ylabel("peak RSS of the process, MiB")
    ax2.set_ylim(0, max(peak) * 1.15)
    host = " (host build)" if mem.get("measured_with_host_build") else ""
    ax2.set_title(f"one fresh process loads and runs each{host}")
    fig.tight_layout()
    return "memory.png", fig


def _plot_energy(report: dict, plt):
    per = report["energy"]["per_call"]
    keys = ["fp32", "onnxruntime-int8", "bitrl"]
    compute = [per[k]["compute_pj"] / 1e3 for k in keys]
    moved = [per[k]["weight_memory_pj"] / 1e3 for k in keys]
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    ax.bar(range(3), compute, color="#f4a261", label="arithmetic")
    bars = ax.bar(range(3), moved, bottom=compute, color="#264653", label="reading the weights")
    for bar, c, m in zip(bars, compute, moved):
        ax.annotate(f"{c + m:,.1f} nJ", (bar.get_x() + bar.get_width() / 2, c + m), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(3), ["fp32", "int8 (ORT)", "ternary (ours)"])
    ax.set_ylabel("nJ per batch-1 call (ESTIMATE)")
    ax.set_ylim(0, max(np.add(compute, moved)) * 1.15)
    ax.set_title("energy estimate: Horowitz 45 nm figures x operation counts", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return "energy.png", fig


def _plot_returns(report: dict, plt):
    ret = report["returns"]
    keys = [k for k in (ret["fp32_impl"], "bitrl", "onnxruntime-int8", "random") if k in ret["episodes_returns"]]
    labels = {**LABELS, "random": "random actions"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    data = [ret["episodes_returns"][k] for k in keys]
    ax.boxplot(data, widths=0.5, showmeans=True, medianprops={"color": "#333333"},
               meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "#333333"})
    rng = np.random.default_rng(0)
    for i, (k, values) in enumerate(zip(keys, data), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=18, alpha=0.8,
                   color=COLORS.get(k, "#bbbbbb"), zorder=3)
    ax.set_xticks(range(1, len(keys) + 1), [labels[k].replace(" ", "\n", 1) for k in keys])
    ax.set_ylabel("episode return")
    kept = f"; ternary keeps {100 * ret['kept']:.1f}% of fp32" if ret.get("kept") is not None else ""
    ax.set_title(f"{ret['env']}: {ret['episodes']} episodes, seeds {ret['seeds'][0]}..{ret['seeds'][1]}{kept}",
                 fontsize=10)
    fig.tight_layout()
    return "returns.png", fig


# ---------------------------------------------------------------------------------------- report.md

def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render_markdown(r: dict) -> str:
    """report.md: header (command, machine, policy), summary, one section per question, the plots."""
    m = r["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    out = [f"# bitrl-compile bench: {Path(r['model']['path']).name} for `{r['target']['name']}`", "",
           f"Reproduce: `{r['command']}`", "",
           (f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, load average {m['load_average'][0]} at the "
            f"start; {versions}. Date: {r['date']}."), "",
           (f"Policy: {r['model']['source']} ({r['model']['description']}); observation "
            f"{r['model']['input']['shape']}, output {json.dumps(r['model']['output'])}. "
            f"Target: {r['target']['name']} ({r['target']['device']})."), ""]
    out += summary_lines(r) + _md_memory(r["memory"])
    out += _md_latency(r["latency"]) if r["latency"]["kind"] == "wall_clock" else _md_instructions(r["latency"])
    out += _md_energy(r["energy"]) + _md_returns(r["returns"], r["agreement"])
    out += ["## Plots", ""] + [f"![{name}]({name})" for name in r["plots"]] + [""]
    return "\n".join(out)


def summary_lines(r: dict) -> list[str]:
    """The report's summary: one line each for memory, latency, energy and return kept."""
    mem, lat, energy, ret = r["memory"], r["latency"], r["energy"], r["returns"]
    rss = mem["rss"]
    memory = (f"- **Memory**: parameters {mem['param_ratio_fp32_over_bitrl']:.1f}x smaller than fp32 "
              f"({mem['param_bytes']['fp32']:,} -> {mem['param_bytes']['bitrl']:,} bytes); artifact file "
              f"{mem['artifact']['bytes']:,} bytes; peak RSS {_mib(rss['bitrl']['peak_rss'])} for our runtime")
    if mem.get("rss_ratio_torch_over_bitrl"):
        memory += (f" vs {_mib(rss['torch']['peak_rss'])} for torch ({mem['rss_ratio_torch_over_bitrl']:.1f}x) "
                   f"and {_mib(rss['onnxruntime']['peak_rss'])} for ONNX Runtime")
    lines = ["## Summary", "", memory + f" (a bare python: {_mib(rss['python']['peak_rss'])})."]
    others = [i for i in lat["results"] if i != "bitrl"]
    if lat["kind"] == "wall_clock":
        parts = [f"batch {b}: ours {v['p50_us']:.1f} µs p50, "
                 + ", ".join(f"{LABELS[i]} {lat['p50_ratio_over_bitrl'][i][b]:.2f}x" for i in others)
                 for b, v in lat["results"]["bitrl"].items()]
        lines.append(f"- **Latency** ({lat['threads']} thread(s); ratio = their p50 / ours): " + "; ".join(parts) + ".")
    else:
        parts = [f"batch {b}: ours {v['instructions_per_call']:,.0f}, "
                 + ", ".join(f"{LABELS[i]} {lat['ratio_over_bitrl'][i][b]:.2f}x" for i in others)
                 for b, v in lat["results"]["bitrl"].items()]
        lines.append(f"- **Instructions per act()** under qemu -cpu {lat['cpu']} (a count, not a time; "
                     "ratio = theirs / ours): " + "; ".join(parts) + ".")
    e, ratio = energy["per_call"], energy["ratio_over_bitrl"]
    lines.append(f"- **Energy (estimate)**: {e['bitrl']['total_pj'] / 1e3:,.2f} nJ per call vs "
                 f"{e['fp32']['total_pj'] / 1e3:,.2f} nJ fp32 ({ratio['fp32']:.1f}x) and "
                 f"{e['onnxruntime-int8']['total_pj'] / 1e3:,.2f} nJ int8 ({ratio['onnxruntime-int8']:.1f}x), linear "
                 "layers only; " + ("measured counters below." if energy["counters"]["available"]
                                    else "no energy counters on this machine."))
    if ret:
        kept = f"{100 * ret['kept']:.1f}%" if ret["kept"] is not None else "n/a (negative returns)"
        if ret["kept"] is None and ret["kept_over_random"] is not None:
            kept += f", {100 * ret['kept_over_random']:.1f}% of fp32's gain over random actions"
        lines.append(f"- **Return kept**: {kept} ({ret['mean']['bitrl']:.1f} vs {ret['mean'][ret['fp32_impl']]:.1f} "
                     f"fp32, mean over {ret['episodes']} episodes of {ret['env']}).")
    else:
        lines.append("- **Return kept**: not measured (no `--env`).")
    return lines + [""]


def _md_memory(mem: dict) -> list[str]:
    a, bpw, pb = mem["artifact"], mem["bits_per_weight"], mem["param_bytes"]
    members = [[name, f"{v['bytes']:,}", f"{v['stored_bytes']:,}"] for name, v in a["members"].items()]
    members += [["zip headers", "", f"{a['zip_overhead_bytes']:,}"],
                [f"**{Path(a['path']).name}** (file size)", "", f"**{a['bytes']:,}**"]]
    params = [["fp32 (torch / ONNX)", f"{pb['fp32']:,}", "32", "32"],
              ["int8 dynamic (ONNX Runtime)", f"{pb['onnxruntime-int8']:,}", "8",
               f"{8 * pb['onnxruntime-int8'] / mem['ternary_weights']:.2f}"],
              ["ternary (ours)", f"{pb['bitrl']:,}", f"{bpw['weights_only']:.2f}", f"{bpw['with_scales_and_biases']:.2f}"]]
    bare = mem["rss"]["python"]["peak_rss"]
    rss = [[LABELS[kind], _mib(v["rss_start"]), _mib(v["rss_loaded"]), f"**{_mib(v['peak_rss'])}**",
            _mib(v["peak_rss"] - bare), ", ".join(v["modules"]) or "-"] for kind, v in mem["rss"].items()]
    host = (" The target is not this machine's architecture, so these processes run a host (x86-64) build of "
            "the same policy.") if mem.get("measured_with_host_build") else ""
    return ["## Memory", "",
            (f"{mem['parameters']:,} parameters, {mem['ternary_weights']:,} of them weights of linear layers "
             f"(ternary in the artifact); fp32: {mem['fp32_bytes']:,} bytes."), "",
            _table(["artifact member", "bytes", "bytes in the file (deflated)"], members), "",
            _table(["parameters as", "bytes", "bits per weight", "bits per weight incl. scales, biases"], params), "",
            "File sizes: " + ", ".join(f"{k} {v:,} B" for k, v in mem["files"].items()) + " (the input, then the "
            "baselines this bench wrote).", "",
            (f"Peak resident memory of one fresh process per implementation that imports its engine, loads the "
             f"model and runs {mem['rss_calls']} act() calls at each batch size (`bench_child.py`, memory mode). "
             "Peak = VmHWM from the child's own /proc/self/status. getrusage's ru_maxrss is not used: Linux "
             "carries the parent's high-water mark over fork+exec, so every child would report at least the size "
             "of the bench process. The baselines import `bitrl_compile.runtime` only for the observation and "
             "action code that every implementation shares (Python and numpy)." + host), "",
            _table(["process", "RSS at start", "after loading", "peak RSS", "peak above bare python",
                    "heavy modules imported"], rss), ""]


def _md_latency(lat: dict) -> list[str]:
    def cpu(v, key):
        return f"{v[key]:.1f}" if key in v else "n/a"

    rows = [[LABELS[impl], b, f"{v['p50_us']:.1f}", f"{v['p99_us']:.1f}", f"{v['mean_us']:.1f}",
             cpu(v, "cpu_p50_us"), cpu(v, "cpu_p99_us"), f"{v['p50_us_per_obs']:.2f}",
             f"{lat['p50_ratio_over_bitrl'][impl][b]:.2f}x", v["calls"]]
            for impl, by_b in lat["results"].items() for b, v in by_b.items()]
    return ["## Latency", "",
            (f"act() (observation in, action out) timed call by call with `time.perf_counter_ns`, in one process "
             f"holding every implementation, {lat['threads']} thread(s) each (torch set_num_threads, ONNX Runtime "
             f"intra_op_num_threads, TVM_NUM_THREADS, OMP/MKL/OpenBLAS), in {lat['rounds']} rounds that alternate "
             "between them after a warm-up, on the same 64-byte aligned observations. The wall-clock p99 is "
             "sensitive to other load on the machine (see the load average above); the CPU-time columns (the "
             "calling thread's `time.thread_time_ns`, measured at one thread only, where every implementation "
             "computes on the calling thread) leave out the time other processes held the core."), "",
            _table(["implementation", "batch", "p50 µs", "p99 µs", "mean µs", "CPU p50 µs", "CPU p99 µs",
                    "p50 µs per obs", "p50 / ours", "calls"], rows), ""]


def _md_instructions(lat: dict) -> list[str]:
    rows = [[LABELS[impl], b, f"{v['instructions_per_call']:,.0f}",
             "; ".join(f"{k} {n:,.0f}" for k, n in v["in_library"].items()) or "-",
             f"{v['instructions_per_obs']:,.0f}", f"{lat['ratio_over_bitrl'][impl][b]:.2f}x"]
            for impl, by_b in lat["results"].items() for b, v in by_b.items()]
    return ["## Instructions per call (not time)", "",
            ("The target is an aarch64 board. Here it runs under qemu, whose timings say nothing about the board, "
             f"so this section counts **guest instructions per act() call** instead. Method: {lat['method']}. "
             f"{lat['qemu']}. Instructions are not time: a Cortex-A72 retires them at different rates (cache "
             "misses, NEON, branches)."), "",
            _table(["implementation", "batch", "instructions per call", "of which in its libraries",
                    "per observation", "theirs / ours"], rows), ""] + [f"- {n}" for n in lat["notes"]] + [""]


def _md_energy(energy: dict) -> list[str]:
    names = {"fp32": "fp32", "onnxruntime-int8": "int8 dynamic (ORT)", "bitrl": "ternary (ours)"}
    rows = [[names[impl], ", ".join(f"{n:,} {op}" for op, n in v["operations"].items()),
             f"{v['weight_bytes']:,} B from {v['memory_tier']}", f"{v['compute_pj'] / 1e3:,.2f}",
             f"{v['weight_memory_pj'] / 1e3:,.2f}", f"**{v['total_pj'] / 1e3:,.2f}**",
             f"{energy['ratio_over_bitrl'][impl]:.1f}x"] for impl, v in energy["per_call"].items()]
    figures = ", ".join(f"{op} {pj} pJ" for op, pj in energy["energy_pj"].items())
    tiers = ", ".join(f"{t['name']} {t['pj']:g} pJ" for t in energy["memory_pj_per_64bit"])
    c = energy["counters"]
    return ["## Energy (an estimate, not a measurement)", "",
            ("Model: the operations of the linear layers per batch-1 call, counted from the layer shapes, times "
             f"the energy per operation from {energy['source']}: {figures}; the weights are read once per call, "
             f"at the energy per 64-bit access of the smallest memory that holds them: {tiers}. A ternary "
             "product is counted as one 32-bit add per weight (add, subtract or skip the int8 activation; no "
             "multiply), zeros included. Left out, alike for all: activations, activation functions, instruction "
             "fetch and the interpreter around the network, which dominate on a general-purpose CPU (see the "
             "latency or instruction counts)."), "",
            _table(["parameters as", "operations per call", "weights read", "arithmetic nJ", "weights nJ",
                    "total nJ", "theirs / ours"], rows), "",
            f"Measured: {c['how']}." if c["available"] else f"Energy counters: unavailable here ({c['why']}).", ""]


def _md_returns(ret: dict | None, agree: dict) -> list[str]:
    out = ["## Return kept", ""]
    if ret:
        rows = [[LABELS.get(k, "random actions"), f"{ret['mean'][k]:.1f} ± {ret['std'][k]:.1f}",
                 f"{min(v):.1f} .. {max(v):.1f}"] for k, v in ret["episodes_returns"].items()]
        kept = f"**{100 * ret['kept']:.1f}%**" if ret["kept"] is not None else "n/a (fp32 mean return <= 0)"
        line = f"Return kept (ternary mean / fp32 mean): {kept}"
        if ret["kept_over_random"] is not None:
            line += f"; relative to random actions, (ternary - random) / (fp32 - random): {100 * ret['kept_over_random']:.1f}%"
        if ret["int8_kept"] is not None:
            line += f"; ONNX Runtime int8 keeps {100 * ret['int8_kept']:.1f}%"
        out += [(f"{ret['env']}, {ret['episodes']} episodes, episode i reset with seed {ret['seeds'][0]} + i, "
                 "deterministic actions."), "", _table(["policy", "mean return ± std", "min .. max"], rows), "",
                line + ".", ""]
    else:
        out += ["Skipped: no `--env` given.", ""]
    out += [(f"Agreement on {agree['observations']} observations ({agree['source']}): the ternary artifact "
             f"(running as {agree['bitrl_runs_on']}) picks the fp32 action on {100 * agree['bitrl_vs_fp32']:.1f}% "
             f"of them, ONNX Runtime int8 on {100 * agree['int8_vs_fp32']:.1f}%. The artifact's raw outputs differ "
             "from the numpy reference of the quantized network by at most "
             f"{agree['bitrl_max_abs_diff_vs_reference']:.3g}."), ""]
    return out
