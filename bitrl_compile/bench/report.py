"""`bitrl-compile bench MODEL`: what the ternary artifact gains over the fp32 policy, measured here.

    report = run_bench("model.zip", target="host", env_id="CartPole-v1", out=Path("out/bench"))
    # out/bench/report.md, report.json, {latency,memory,energy,returns}.png, and the files it measured

One command, four questions, each answered by a measurement or an explicit model:

    memory    parameters; fp32 bytes; artifact bytes per member; bits per weight; peak RSS (VmHWM) of
              a fresh process that loads and runs each implementation (child.py, memory mode),
              next to the bare interpreter and interpreter + numpy
    latency   host targets: act() p50/p99 of ours, torch fp32, ONNX Runtime fp32 and int8 (dynamic
              quantization; static, calibrated on the bench's observations, for convolutional policies),
              one child process, same thread count, batch 1 and --batch.
              aarch64 targets: instructions per act() call under qemu-aarch64 -cpu <the board's core>,
              counted by our TCG plugin (qemu_insn_plugin.c), for ours and ONNX Runtime (aarch64 wheel)
    energy    an estimate: operations and weight bytes per call x Horowitz's 45 nm energies; real
              counters (RAPL) are used when the machine exposes them, and the report says which
    returns   fp32 vs ternary (and ONNX Runtime int8) over N seeded episodes, with --env

Baselines are made here from the same fp32 module the compiler saw: the module itself (torch.save)
for torch, torch.onnx.export (dynamo) for ONNX Runtime, onnxruntime.quantization.quantize_dynamic for
int8 (quantize_static for models with convolutions: `quantize_convolutions_static`). Every process that is measured runs child.py. The plots are drawn by plots.py, report.md is
written by markdown.py, and the machine facts come from machine.py.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bitrl_compile import __version__
from bitrl_compile.bench import child as bench_child
from bitrl_compile.bench.machine import PLUGIN_SOURCE, build_plugin, machine
from bitrl_compile.bench.markdown import render_markdown
from bitrl_compile.bench.plots import write_plots

CHILD = Path(bench_child.__file__)
IMPLS = ("bitrl", "torch", "onnxruntime", "onnxruntime-int8")
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
    int8_method = quantize_convolutions_static(files, spec, obs)

    report = {"command": command, "machine": machine_info(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": {"path": str(model), "source": loaded.source, "description": loaded.description,
                        "input": spec["input"], "output": spec["output"]},
              "target": compiled.manifest["target"], "threads": threads, "batch": batch, "int8_method": int8_method}

    log("[4/7] memory: sizes, and peak RSS of one fresh process per implementation")
    report["memory"] = memory_section(model, loaded, compiled, host_artifact, files, spec, batch, threads, out)
    report["memory"]["measured_with_host_build"] = cross
    report["memory"]["int8_method"] = int8_method

    child_cfg = {"spec": spec, "obs": str(out / "observations.npy"), "batches": sorted({1, batch}),
                 "threads": threads, **{k: str(v) for k, v in files.items() if v}}
    impls = [i for i in IMPLS if i != "torch" or has_torch]
    if cross:
        log(f"[5/7] instructions per act() under qemu-aarch64 -cpu {tgt.qemu_cpu}")
        report["latency"] = count_instructions(compiled.path, target, dict(child_cfg, artifact=str(compiled.path)),
                                               impls, out, calls=max(10, min(calls, 200)), log=log)
    else:
        log(f"[5/7] latency: {calls} act() calls per implementation and batch size, {threads} thread(s)")
        report["latency"] = measure_latency(dict(child_cfg, artifact=str(compiled.path)), impls, calls, threads)

    log("[6/7] energy estimate")
    report["energy"] = dict(energy_section(compiled, files, report["latency"]), int8_method=int8_method)

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


INT8_DYNAMIC = "dynamic"
INT8_STATIC = "static"  # ORT's fastest int8 path for convolutions (bench/conv.py measures both, docs/kernels.md)


def quantize_convolutions_static(files: dict, spec: dict, obs: np.ndarray, calibration: int = 32) -> str:
    """For a model with convolutions, int8.onnx again by static quantization (QOperator: QLinearConv and
    QLinearMatMul, u8 activations calibrated on the bench's first `calibration` observations, s8 per-channel
    weights), ONNX Runtime's fastest int8 path for them: quantize_dynamic's ConvInteger is several times
    slower than its fp32 Conv (bitrl_compile/bench/conv.py). Returns the method of int8.onnx: "static" or
    "dynamic" (models without convolutions keep quantize_dynamic's MatMulInteger, ORT's fast path there)."""
    import onnx

    from bitrl_compile.bench.int8 import quantize_int8
    from bitrl_compile.runtime.policy import normalization, prepare_observations

    if not any(node.op_type == "Conv" for node in onnx.load(str(files["onnx_fp32"])).graph.node):
        return INT8_DYNAMIC
    norm = normalization(spec["input"])
    feeds = [prepare_observations(spec["input"], obs[i:i + 1], norm)[0] for i in range(min(calibration, len(obs)))]
    quantize_int8(Path(files["onnx_fp32"]), INT8_STATIC, feeds, out=Path(files["onnx_int8"]))
    return INT8_STATIC


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
    """Run child.py with `cfg` in a fresh process (or `command` + [child, cfg]); its JSON result."""
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


def guest_onnxruntime() -> Path:
    """A site folder with the aarch64 onnxruntime wheel (this host's version) unpacked, for the qemu guest."""
    from bitrl_compile.devices import guest_site

    version = importlib.metadata.version("onnxruntime")
    return guest_site(f"aarch64-onnxruntime-{version}", [f"onnxruntime=={version}"])


def count_instructions(artifact: Path, target: str, child_cfg: dict, impls: list[str], out: Path, calls: int,
                       log: Callable[[str], None] = print) -> dict:
    """Guest instructions per act() call under qemu, total and inside each implementation's library."""
    from bitrl_compile import targets
    from bitrl_compile.devices import qemu_python_command

    cpu = targets.get_target(target).qemu_cpu
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
            from bitrl_compile.evaluate import evaluate, make_env

            returns["bitrl"] = evaluate(policy.act, env_id, episodes, seed)[0]
            returns["onnxruntime-int8"] = evaluate(int8_act, env_id, episodes, seed)[0]
            space = make_env(env_id).action_space
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
    """The report's machine: CPU, cores, architecture, OS, load average at the start, package versions."""
    m = machine()
    versions = {"python": m["python"], "bitrl-compile": __version__}
    for dist in ("numpy", "torch", "onnxruntime", "apache-tvm", "apache-tvm-ffi"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": m["cpu"], "cores": m["cores"], "arch": m["arch"], "os": m["platform"],
            "load_average": [round(x, 2) for x in m["load_average"]], "versions": versions}
