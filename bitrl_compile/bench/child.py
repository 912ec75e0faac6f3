"""The measured process of `bitrl-compile bench`: `python child.py '{json}'`, one JSON line out.

`bitrl_compile.bench.report` starts this file (by path) in a fresh interpreter, so that what it
measures is what a deployment would load (in the bench's own process it is imported for make_act
and status_bytes). It imports only the standard library at the top (so that the bare-interpreter
baseline is bare); each implementation imports numpy and its own engine, and nothing else:

    bitrl         bitrl_compile.runtime (numpy + tvm-ffi + libtvm_runtime.so): Policy.act
    torch         torch: the fp32 nn.Module as the bench saved it (torch.save; a torch.export program
                  when the module cannot be pickled), called eagerly under torch.inference_mode()
    onnxruntime   onnxruntime.InferenceSession(fp32.onnx or int8.onnx), CPU execution provider
    python        nothing (the interpreter alone);  numpy: `import numpy` only

All implementations turn an observation into an action the same way: the baselines use the
runtime's own `prepare_observations` and `postprocess` (observation normalisation, one-hot,
argmax, squash) around their forward pass, exactly as our artifact's `act()` does.

Modes (config["mode"]):
    memory    one implementation: load, run `calls` act() calls per batch size, report the peak
              resident set (VmHWM of /proc/self/status) and the RSS after start and after loading.
              (getrusage's ru_maxrss is not used: Linux carries the parent's high-water mark over
              an exec, so a child of a 1 GB process reports >= 1 GB.)
    latency   several implementations in this one process, in rounds that alternate between them;
              every act() call timed with perf_counter_ns; RAPL energy when readable.
    count     under qemu with the bench's TCG plugin: the guest makes a marker system call before
              and after `calls` act() calls, and the plugin writes how many guest instructions
              were executed in total and inside each registered address range (the libraries).
    kernels   under qemu with the same plugin, for `bitrl-compile bench-kernels`: compiled BitLinear
              kernels called directly (no policy), markers around each case's calls.

It also runs under qemu-aarch64 with the emulator's aarch64 Python (numpy, tvm-ffi, runtime copy
and, when installed there, onnxruntime), whose site has bitrl_compile/__init__.py and
bitrl_compile/runtime/ only: keep its imports to the standard library and, inside functions, the
runtime. It owns the qemu marker (the plugin's system call) and the RSS reader; machine.py
re-exports status_bytes from here, never the other way round.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

MARKER_SYSCALL = 0xB17  # the bench plugin's marker: syscall(MARKER_SYSCALL, cmd, a, b)
MARK_RANGE, MARK_COUNT = 1, 2
# Executable mappings attributed to each implementation's own library (regex on /proc/self/maps paths).
LIBRARIES = {"bitrl": {"compiled policy (lib.so)": r"/bitrl-[^/]*\.so", "TVM runtime": r"libtvm_runtime\.so"},
             "onnxruntime": {"ONNX Runtime": r"onnxruntime_pybind11_state[^/]*\.so"}}


def status_bytes() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process in bytes, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def make_act(impl: str, cfg: dict):
    """obs (one or a batch) -> action(s), for one implementation; loads its engine and model."""
    if impl == "bitrl":
        from bitrl_compile.runtime import load

        return load(cfg["artifact"]).act
    from bitrl_compile.runtime.policy import normalization, postprocess, prepare_observations

    spec = cfg["spec"]
    norm = normalization(spec["input"])

    def wrap(forward):  # the runtime's own observation and action steps around another engine's forward
        def act(obs):
            x, single = prepare_observations(spec["input"], obs, norm)
            actions = postprocess(spec["output"], forward(x))
            return actions[0] if single else actions
        return act

    threads = int(cfg.get("threads", 1))
    if impl == "torch":
        import torch

        torch.set_num_threads(threads)
        if cfg.get("torch_module"):  # written by this bench from the module it loaded: safe to unpickle
            module = torch.load(cfg["torch_module"], weights_only=False).eval()
        else:
            module = torch.export.load(cfg["pt2"]).module()

        def forward(x):
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()
        return wrap(forward)
    if impl in ("onnxruntime", "onnxruntime-int8"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = cfg["onnx_int8"] if impl.endswith("int8") else cfg["onnx_fp32"]
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return wrap(lambda x: session.run(None, {name: x})[0])
    raise ValueError(f"unknown implementation {impl!r}")


def _inputs(cfg: dict) -> dict:
    """batch size -> observations: one observation for batch 1, else a [B, ...] array.

    Each in a 64-byte aligned buffer, as the runtime wants them (it copies an unaligned one, and where
    numpy happens to allocate would otherwise decide whether a run pays for that copy).
    """
    import numpy as np

    from bitrl_compile.runtime.tvm_runtime import aligned

    obs = np.load(cfg["obs"])
    return {b: aligned(obs[0] if b == 1 else np.resize(obs, (b, *obs.shape[1:]))) for b in cfg["batches"]}


def run_memory(cfg: dict) -> dict:
    start = status_bytes()["VmRSS"]
    impl = cfg["impls"][0]
    act = None
    if impl == "numpy":
        import numpy  # noqa: F401
    elif impl != "python":
        act = make_act(impl, cfg)
    loaded = status_bytes()["VmRSS"]
    if act is not None:
        for x in _inputs(cfg).values():
            for _ in range(cfg["calls"]):
                act(x)
    end = status_bytes()
    heavy = ("torch", "tvm", "tvm_ffi", "onnxruntime", "numpy", "bitrl_compile.runtime")
    return {"impl": impl, "rss_start": start, "rss_loaded": loaded, "rss_end": end["VmRSS"],
            "peak_rss": end["VmHWM"], "modules": sorted(m for m in heavy if m in sys.modules), "pid": os.getpid()}


def _rapl_files() -> list[str]:
    root = "/sys/class/powercap"
    try:
        names = sorted(n for n in os.listdir(root) if re.fullmatch(r"intel-rapl:\d+", n))
    except OSError:
        return []
    files = [f"{root}/{n}/energy_uj" for n in names]
    return [f for f in files if os.access(f, os.R_OK)]


def _rapl_uj(files: list[str]) -> int:
    total = 0
    for name in files:
        with open(name) as f:
            total += int(f.read())
    return total


def run_latency(cfg: dict) -> dict:
    """Per-call wall-clock times and, with one thread, the calling thread's CPU time of each call.

    At one thread every implementation computes on the calling thread, so its CPU time is the work
    of the call without the time other processes held the core (on a shared machine that is what
    the wall-clock p99 mostly measures).
    """
    acts = {impl: make_act(impl, cfg) for impl in cfg["impls"]}
    inputs = _inputs(cfg)
    rapl = _rapl_files()
    rounds, calls, warmup = int(cfg["rounds"]), int(cfg["calls"]), int(cfg["warmup"])
    per_round = max(1, calls // rounds)
    wall = {impl: {b: [] for b in inputs} for impl in acts}
    cpu = {impl: {b: [] for b in inputs} for impl in acts}
    energy = {impl: {b: 0 for b in inputs} for impl in acts}
    for act in acts.values():
        for x in inputs.values():
            for _ in range(warmup):
                act(x)
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for r in range(rounds):
        order = list(acts) if r % 2 == 0 else list(reversed(list(acts)))
        for impl in order:
            act = acts[impl]
            for b, x in inputs.items():
                wall_samples, cpu_samples = wall[impl][b], cpu[impl][b]
                e0 = _rapl_uj(rapl) if rapl else 0
                for _ in range(per_round):
                    c0 = cpu_clock()
                    t0 = clock()
                    act(x)
                    t1 = clock()
                    cpu_samples.append(cpu_clock() - c0)
                    wall_samples.append(t1 - t0)
                if rapl:
                    energy[impl][b] += _rapl_uj(rapl) - e0

    def by_batch(d):
        return {i: {str(b): v for b, v in per_b.items()} for i, per_b in d.items()}

    return {"times_ns": by_batch(wall), "thread_cpu_ns": by_batch(cpu) if int(cfg.get("threads", 1)) == 1 else None,
            "rapl_uj": by_batch(energy) if rapl else None, "rapl_files": rapl}


_LIBC: list = []


def _marker(cmd: int, a: int = 0, b: int = 0) -> None:
    import ctypes  # not at the top: it loads libffi, and the bare-interpreter baseline stays bare

    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None))
    _LIBC[0].syscall(ctypes.c_long(MARKER_SYSCALL), ctypes.c_long(cmd), ctypes.c_ulong(a), ctypes.c_ulong(b))


def _executable_range(pattern: str) -> tuple[int, int] | None:
    lo = hi = None
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and "x" in fields[1] and re.search(pattern, fields[5]):
                a, b = (int(v, 16) for v in fields[0].split("-"))
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return None if lo is None else (lo, hi)


def run_count(cfg: dict) -> dict:
    """Marker labels: 2*k before and 2*k+1 after the k-th (impl, batch) block of `calls` calls."""
    inputs = _inputs(cfg)
    blocks, ranges = [], []
    for impl in cfg["impls"]:
        act = make_act(impl, cfg)
        for name, pattern in LIBRARIES.get(impl.removesuffix("-int8"), {}).items():
            found = _executable_range(pattern)
            if found:
                _marker(MARK_RANGE, *found)
                ranges.append({"impl": impl, "library": name, "range": [hex(found[0]), hex(found[1])]})
        for b, x in inputs.items():
            for _ in range(cfg["warmup"]):
                act(x)
            k = len(blocks)
            _marker(MARK_COUNT, 2 * k)
            for _ in range(cfg["calls"]):
                act(x)
            _marker(MARK_COUNT, 2 * k + 1)
            blocks.append({"impl": impl, "batch": b, "calls": cfg["calls"]})
    return {"blocks": blocks, "ranges": ranges}


def run_kernel_count(cfg: dict) -> dict:
    """Call each case's kernel (cfg["cases"]: lib, name, calls, and k, n, batch, w_shape for a BitLinear kernel or
    args, [shape, dtype] per argument, for any other; or onnx, x_shape: an ONNX Runtime session) on random inputs.

    Marker labels: 2*i before and 2*i+1 after the `calls` calls of case i. Each case's library is
    registered as an address range the first time it is loaded; returns the range index of every case.
    """
    import numpy as np

    from bitrl_compile.runtime import tvm_runtime as rt

    ranges: dict[str, int] = {}
    case_range = []
    for i, case in enumerate(cfg["cases"]):
        rng = np.random.default_rng(0)
        if "onnx" in case:  # an ONNX model (one float input "x", uniform in [0, 1)) in ONNX Runtime, one thread
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = ort.InferenceSession(case["onnx"], options, providers=["CPUExecutionProvider"])
            feed = {"x": rng.random(case["x_shape"]).astype(np.float32)}
            fn, args, lib = (lambda *_, s=session, f=feed: s.run(None, f)), [], LIBRARIES["onnxruntime"]["ONNX Runtime"]
        elif "args" in case:  # any kernel: [shape, dtype] per argument (float: normal, int8: trits, else zeros)
            fn, lib = rt.load_module(case["lib"])[case["name"]], re.escape(case["lib"]) + "$"
            args = [rt.to_device(rt.aligned(rng.standard_normal(shape).astype(dtype) if dtype == "float32" else
                                            rng.integers(-1, 2, shape).astype(dtype) if dtype == "int8" else
                                            np.zeros(shape, dtype))) for shape, dtype in case["args"]]
        else:
            fn, lib = rt.load_module(case["lib"])[case["name"]], re.escape(case["lib"]) + "$"
            k, n, b = case["k"], case["n"], case["batch"]
            w = rt.aligned(rng.integers(0, 256, case["w_shape"]).astype(np.uint8) & 0x55)
            args = [rt.to_device(a) for a in (rt.aligned(rng.standard_normal((b, k)).astype(np.float32)), w,
                                              rt.aligned(np.ones(1, np.float32)), rt.aligned(np.zeros(n, np.float32)),
                                              rt.aligned(np.zeros((b, n), np.float32)))]
        if lib not in ranges:  # the plugin counts inside each registered range, in registration order
            found = _executable_range(lib)
            if found is None:
                raise RuntimeError(f"{lib} has no executable mapping in /proc/self/maps")
            _marker(MARK_RANGE, *found)
            ranges[lib] = len(ranges)
        case_range.append(ranges[lib])
        fn(*args)
        _marker(MARK_COUNT, 2 * i)
        for _ in range(case["calls"]):
            fn(*args)
        _marker(MARK_COUNT, 2 * i + 1)
    return {"case_range": case_range}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    modes = {"memory": run_memory, "latency": run_latency, "count": run_count, "kernels": run_kernel_count}
    result = modes[cfg["mode"]](cfg)
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
