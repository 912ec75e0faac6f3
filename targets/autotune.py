"""`bitrl-compile tune`: MetaSchedule searches the tuning space (targets/tuning.py) of a model's kernels.

Each candidate is built (cross-compiled for aarch64), measured locally, on a board through TVM RPC, or
on a farm of boards behind TVM's RPC tracker (targets/remote.py: one runner worker per server), and
the best is verified against the numpy reference and timed side by side with the default schedule
before it is stored in the target's database.

The search is `replay-func`: each candidate re-runs the space function, because which schedule
instructions run depends on the sampled knobs (a trace replayed with other decisions would not be a
valid schedule), and the space is small enough (at most 4^4 points) that sampling covers it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from bitrl_compile.targets import Target, get_target, intrinsics, kernel_spec, kernels, tvm_target
from bitrl_compile.targets.kernels import DEFAULT_KNOBS, Knobs
from bitrl_compile.targets.remote import RPC_HELP, Remote
from bitrl_compile.targets.tuning import (
    SPACE_VERSION,
    KernelKey,
    TuneError,
    database_path,
    design_space,
    knobs_of,
    load_database,
    save_database,
    workload,
    workload_hash,
)

NOISE = 0.03               # a tuned kernel must beat the default by this fraction to replace it


# ------------------------------------------------------------------------------------ measuring

def _build(mod, target, _params):
    """MetaSchedule builder build: TVM's default without `import tvm.s_tir.tensor_intrin` (30 s per
    worker process, for intrinsics our kernels do not use)."""
    from tvm.driver import build as tvm_build

    return tvm_build(mod, target=target)


def _export(cc: str | None, mod) -> str:
    """MetaSchedule builder export: a shared library, cross-compiled for aarch64 targets."""
    from tvm.support import cc as tvm_cc

    path = os.path.join(tempfile.mkdtemp(prefix="bitrl-tune-"), "kernel.so")
    if cc:
        mod.export_library(path, fcompile=tvm_cc.cross_compiler(cc))
    else:
        mod.export_library(path)
    return path


def _alloc_arguments(session, device, args_info, alloc_repeat):
    """MetaSchedule runner arguments made here and copied to the board: TVM's default fills them on
    the device with `tvm.contrib.random`, which a server with only libtvm_runtime.so lacks."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            _, dtype, shape = info  # ["TENSOR", dtype, shape]
            if "float" in dtype:
                value = rng.uniform(-1, 1, shape).astype(dtype)
            else:
                info_ = np.iinfo(dtype)
                value = rng.integers(max(info_.min, -128), min(info_.max, 255) + 1, shape).astype(dtype)
            args.append(tvm.runtime.tensor(value, device=device))
        out.append(args)
    return out


def _alloc_arguments_local(device, args_info, alloc_repeat):
    """MetaSchedule's own argument maker, in a runner worker that may run AMX kernels (enable_amx)."""
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument

    from bitrl_compile.runtime.tvm_runtime import enable_amx

    enable_amx()
    return default_alloc_argument(device, args_info, alloc_repeat)


class Device:
    """Where kernels run for checking and timing: this machine, a board through TVM RPC (`remote`: a
    `Remote`, or the HOST:PORT of a board's RPC server), or a free board of a tracker's farm.

    A context manager: TVM's RPC server serves one session at a time, so the session is held only
    inside `with` (MetaSchedule's runner opens its own while tuning)."""

    def __init__(self, target: Target, remote: Remote | str | None, timeout: float = 600):
        self.remote = Remote(rpc=remote) if isinstance(remote, str) else remote
        self.target, self.timeout = target, timeout
        self.session, self.device, self.uploads = None, tvm.cpu(), 0

    def __enter__(self):
        if self.remote is not None:
            self.session = self.remote.connect(session_timeout=self.timeout)
            self.device = self.session.cpu()
        return self

    def __exit__(self, *exc) -> None:
        import gc

        self.session, self.device = None, tvm.cpu()
        gc.collect()  # the last reference to the session closes it, and the server takes the next one

    def load(self, func, tvm_tgt):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm_tgt)
        if self.session is None:
            return lib.jit()
        path = _export(self.target.cc, lib)
        self.uploads += 1
        name = f"bitrl-kernel-{self.uploads}.so"  # a fresh name: dlopen would return a loaded library again
        try:
            self.session.upload(path, name)
        finally:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        return self.session.load_module(name)

    def tensor(self, array):
        return tvm.runtime.tensor(array, device=self.device)


def _inputs(key: KernelKey, spec, batch: int, seed: int):
    from bitrl_compile.runtime.weights import pack_tiles

    rng = np.random.default_rng(seed)
    w_t = rng.integers(-1, 2, (key.n, key.k)).astype(np.int8)
    gamma = rng.uniform(0.01, 2, key.n if key.per_channel else 1).astype(np.float32)
    bias = rng.standard_normal(key.n).astype(np.float32)
    x = (rng.standard_normal((batch, key.k)) * rng.uniform(0.01, 10, (batch, 1))).astype(np.float32)
    return x, w_t, pack_tiles(w_t, spec.layout), gamma, bias


def verify(key: KernelKey, spec, knobs: Knobs, device: Device, tvm_tgt, batches: Iterable[int]) -> str | None:
    """Run the symbolic-batch kernel with `knobs` on the device and compare it with the numpy
    reference (bit for bit for none/relu; within 1e-6 for tanh/sigmoid, whose float functions differ
    by an ulp between TVM and numpy). Returns None when it matches, else what differed."""
    from bitrl_compile import quant

    fn = device.load(kernels.bitlinear_kernel(key.k, key.n, key.activation, key.per_channel, spec=spec,
                                              knobs=knobs), tvm_tgt)[key.name]
    for batch in sorted(set(batches)):
        x, w_t, w, gamma, bias = _inputs(key, spec, batch, seed=batch)
        y = device.tensor(np.zeros((batch, key.n), np.float32))
        fn(device.tensor(x), device.tensor(w), device.tensor(gamma), device.tensor(bias), y)
        got = y.numpy()
        want = quant.apply_activation(quant.bitlinear_reference(x, w_t, gamma, bias), key.activation)
        exact = key.activation in ("none", "relu")
        if (exact and not np.array_equal(got, want)) or (not exact and not np.allclose(got, want, rtol=0, atol=1e-6)):
            bad = int(np.sum(got != want))
            return f"batch {batch}: {bad} of {got.size} outputs differ from the reference"
    return None


def time_pair(key: KernelKey, spec, knobs: Knobs, batch: int, device: Device, tvm_tgt,
              rounds: int = 9, min_repeat_ms: int = 30) -> tuple[float, float]:
    """Seconds per call of the default and the `knobs` kernels at `batch`, measured side by side on
    the device: TVM's time_evaluator, the two taking turns, the best of `rounds` turns each (the
    kernels are deterministic, so the fastest turn is the one the least disturbed by other work)."""
    x, _, w, gamma, bias = _inputs(key, spec, batch, seed=0)
    args = [device.tensor(a) for a in (x, w, gamma, bias, np.zeros((batch, key.n), np.float32))]
    timers = []
    for k in (DEFAULT_KNOBS, knobs):
        mod = device.load(kernels.schedule_default(workload(key, spec, batch), spec, k), tvm_tgt)
        timers.append(mod.time_evaluator(key.name, device.device, number=1, repeat=1, min_repeat_ms=min_repeat_ms))
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            times[i].append(float(timer(*args).mean))
    return min(times[0]), min(times[1])


# ------------------------------------------------------------------------------------ tuning

@dataclass
class TuneRow:
    kernel: str
    batch: int
    default_us: float
    tuned_us: float
    knobs: dict
    trials: int
    stored: str            # "tuned" | "default" (the default was faster) | "rejected: ..."

    @property
    def speedup(self) -> float:
        return self.default_us / self.tuned_us if self.tuned_us else 0.0


class _Stop(Exception):
    """Raised by the progress callback after a Ctrl-C, between two rounds of trials."""


@contextlib.contextmanager
def _ctrl_c_stops(stop):
    """The first Ctrl-C sets `stop` (the search ends after the round being measured); a second one
    ends it at once. Either way what was measured is verified and stored. Only the main thread can
    handle signals; elsewhere nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nCtrl-C: stopping after this round of trials (Ctrl-C again: at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_callback(total: int, stop, servers: int = 0):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self):
            self.done, self.best, self.started, self.errors = 0, {}, time.monotonic(), []

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            name = str(task_scheduler.tasks_[task_id].ctx.task_name)
            for built, result in zip(builder_results, runner_results):
                self.done += 1
                secs = [float(s) for s in (result.run_secs or [])]
                error = built.error_msg or result.error_msg
                if error:
                    self.errors.append(str(error))
                elif secs:
                    self.best[name] = min(self.best.get(name, math.inf), min(secs))
            width = 30
            filled = int(width * min(self.done, total) / max(total, 1))
            best = self.best.get(name)
            best = f"{best * 1e6:.2f} µs" if best is not None else "no successful trial yet"
            where = (f"{servers} servers measuring in parallel, " if servers > 1
                     else "1 server measuring, " if servers else "")
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{total} trials, {where}"
                  f"{time.monotonic() - self.started:.0f} s; {name}: best {best}\033[K",
                  end="", file=sys.stderr, flush=True)
            if stop.is_set():
                raise _Stop("interrupted")

    return Progress()


@contextlib.contextmanager
def _without_tvm_tensor_intrinsics():
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin, which registers TVM's own tensor
    intrinsics for every backend (CUDA, Hexagon, RISC-V...) and takes about 30 s here; our space uses
    only ours. While tuning, an empty module stands in for it, unless it was imported already."""
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]


def _ms_records(work: Path) -> list:
    """The tuning records MetaSchedule wrote into its work folder (opening them replays the traces,
    which needs our tensor intrinsics registered)."""
    from tvm.s_tir import meta_schedule as ms

    paths = [work / "database_workload.json", work / "database_tuning_record.json"]
    if not all(p.is_file() for p in paths):
        return []
    intrinsics.register_all()
    return list(ms.database.JSONDatabase(*map(str, paths), allow_missing=False).get_all_tuning_records())


def _run_secs(record) -> float:
    """Best seconds of a MetaSchedule record's repeats; inf for a failed trial (stored as 1e10 s)."""
    secs = [float(s) for s in (record.run_secs or [])]
    return min(secs) if secs and max(secs) < 1e9 else math.inf


def tune(keys: Iterable[KernelKey], target_name: str, *, trials: int, batches: Iterable[int] = (1,),
         db: str | os.PathLike | None = None, rpc: str | None = None, tracker: str | None = None,
         tracker_key: str | None = None, work_dir: str | os.PathLike | None = None, threads: int = 1, seed: int = 0,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[list[TuneRow], Path, float]:
    """Tune every kernel at every batch with `trials` MetaSchedule trials each, verify the best
    candidates against the reference on the device, time them against the default schedule side by
    side and store the faster of the two in the database (`db`: a folder, default targets/tuned).
    Returns (rows, database file, seconds spent).

    Measured here, on the board whose RPC server is at `rpc` (HOST:PORT), or on the farm of boards
    registered with the RPC tracker at `tracker` under `tracker_key` (default: the target's name), one
    candidate per server at a time, all servers in parallel.

    Ctrl-C stops the search; what was measured until then is verified and stored as usual."""
    import logging

    from tvm.s_tir import meta_schedule as ms

    from bitrl_compile.runtime.policy import host_arch

    started = time.monotonic()
    target = get_target(target_name)
    tvm_tgt = tvm_target(target)
    spec = kernel_spec(tvm_tgt)
    path = database_path(target, tvm_tgt, db)
    records = load_database(path)  # fail early on a broken file, before any trial
    remote = Remote.of(rpc, tracker, tracker_key, target.name)
    if target.arch != host_arch() and remote is None:
        raise TuneError(f"target {target.name} runs on {target.arch}: timings need the device; {RPC_HELP}")
    if trials < 1:
        raise TuneError("--trials must be at least 1")
    if threads < 1:
        raise TuneError(f"--threads must be at least 1, got {threads}")
    keys, batches = list(dict.fromkeys(keys)), sorted(set(batches))
    if not keys:
        raise TuneError("the model has no BitLinear kernel to tune")
    tasks = {f"{key.name}_b{batch}": (key, batch) for key in keys for batch in batches}
    os.environ["TVM_NUM_THREADS"] = str(threads)  # the runner's workers inherit it
    servers = remote.servers() if remote is not None else 0  # a tracker: how many boards under the key
    with Device(target, remote):  # reachable? (fails early, with the command to run on the board)
        pass

    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=20 if remote is None else 5)
    if remote is None:
        runner = ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=60,
                                       f_alloc_argument=_alloc_arguments_local)
    else:
        runner = remote.runner(evaluator, servers, _alloc_arguments)
    builder = ms.builder.LocalBuilder(f_build=_build, f_export=functools.partial(_export, target.cc), timeout_sec=120)
    space = ms.space_generator.ScheduleFn(design_space, sch_rules=[], postprocs=[], mutator_probs={})
    mod = tvm.IRModule({name: workload(key, spec, batch).with_attr("global_symbol", name)
                        for name, (key, batch) in tasks.items()})

    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bitrl-tune-")))
        log(f"tuning {len(tasks)} kernel workload(s) for {target.name} ({spec.isa} kernels), {trials} trials each, "
            f"measured {_where(remote, servers)} with {threads} thread(s); MetaSchedule logs in {work}/logs")
        total = trials * len(tasks)
        interrupted = False
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        level = ms_logger.level
        ms_logger.setLevel(logging.WARNING)  # its per-round tables go to the log files, not the console
        stop = threading.Event()
        progress = _progress_callback(total, stop, servers)
        try:
            with _without_tvm_tensor_intrinsics(), _ctrl_c_stops(stop):
                ms.tune_tir(mod, tvm_tgt, str(work), max_trials_global=total, max_trials_per_task=trials,
                            num_trials_per_iter=min(trials, max(8, servers)), builder=builder, runner=runner, cost_model="random",
                            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
                            task_scheduler="round-robin", space=space, strategy="replay-func", seed=seed,
                            num_tuning_cores=1)
        except BaseException:  # our _Stop comes back through TVM's FFI as another exception type
            if not stop.is_set():
                raise
            interrupted = True
        finally:
            ms_logger.setLevel(level)
            print(file=sys.stderr)
        if interrupted:
            log("interrupted: verifying and storing what was measured so far")
        if progress.errors:
            first = [line for line in progress.errors[0].splitlines() if line.strip()]
            log(f"{len(progress.errors)} of {progress.done} trials failed; the first: "
                f"{' / '.join(first[:2] + first[-2:]) if len(first) > 4 else ' / '.join(first)}")
        search_s = time.monotonic() - started
        found = _ms_records(work)

        rows = []
        device = stack.enter_context(Device(target, remote))
        for name, (key, batch) in tasks.items():
            func = workload(key, spec, batch)
            mine = sorted((r for r in found if str(r.workload.mod["main"].attrs["global_symbol"]) == name),
                          key=_run_secs)
            candidates = list(dict.fromkeys(knobs_of(r.trace, func, spec) for r in mine if _run_secs(r) < math.inf))
            chosen, stored = None, "no successful trial: default kept"
            for knobs in candidates[:3]:  # the fastest that computes exactly what the reference does
                problem = verify(key, spec, knobs, device, tvm_tgt,
                                 [b for b in (1, spec.rows - 1, spec.rows, spec.rows + 1, 2 * spec.rows + 1, batch) if b >= 1])
                if problem is None:
                    chosen = knobs
                    break
                stored = f"rejected {knobs.as_dict()} ({problem}): default kept"
                log(f"{name}: {stored}")
            default_s, tuned_s = time_pair(key, spec, chosen or DEFAULT_KNOBS, batch, device, tvm_tgt)
            if chosen is None or chosen == DEFAULT_KNOBS or tuned_s > (1 - NOISE) * default_s:
                stored = "default is as fast" if chosen is not None else stored
                chosen, tuned_s = DEFAULT_KNOBS, default_s
            else:
                stored = "tuned"
            records = [r for r in records if (r["kernel"], r["isa"], r["batch"]) != (key.name, spec.isa, batch)]
            if candidates:  # an untried workload leaves no record: the compile says it is untuned
                records.append({"kernel": key.name, "k": key.k, "n": key.n, "activation": key.activation,
                                "per_channel": key.per_channel, "isa": spec.isa, "batch": batch,
                                "space": SPACE_VERSION, "workload_hash": workload_hash(func),
                                "knobs": chosen.as_dict(), "us": round(tuned_s * 1e6, 3),
                                "default_us": round(default_s * 1e6, 3), "trials": len(mine),
                                "threads": threads, "target": str(tvm_tgt),
                                "measured_on": str(remote) if remote else "localhost"})
            rows.append(TuneRow(key.name, batch, default_s * 1e6, tuned_s * 1e6, chosen.as_dict(), len(mine), stored))
        save_database(path, records)
    log(f"search {search_s:.0f} s, verification and timing {time.monotonic() - started - search_s:.0f} s; "
        f"database: {path}")
    return rows, path, time.monotonic() - started


def _where(remote: Remote | None, servers: int) -> str:
    """Where candidates are measured, for the log: here, on a board, or on a farm's servers in parallel."""
    if remote is None:
        return "here"
    if remote.rpc is not None:
        return f"on {remote.rpc}"
    return f"on {servers} servers in parallel ({remote})" if servers > 1 else f"on 1 server ({remote})"


def summary(rows: list[TuneRow]) -> str:
    """The table the CLI prints: per kernel and batch, default µs, tuned µs, speedup, knobs."""
    header = f"{'kernel':<40} {'batch':>5} {'trials':>6} {'default µs':>11} {'tuned µs':>10} {'speedup':>8}  knobs / stored"
    lines = [header, "-" * len(header)]
    for r in rows:
        knobs = " ".join(f"{k}={v}" for k, v in r.knobs.items() if v != 1) or "(default)"
        lines.append(f"{r.kernel:<40} {r.batch:>5} {r.trials:>6} {r.default_us:>11.2f} {r.tuned_us:>10.2f} "
                     f"{r.speedup:>7.2f}x  {knobs} / {r.stored}")
    return "\n".join(lines)


