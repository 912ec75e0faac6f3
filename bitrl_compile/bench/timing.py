"""Timing helpers the kernel benchmarks share (bench/kernels.py: BitLinear; bench/conv.py: convolutions): calls
timed in blocks on the calling thread's CPU clock, and an ONNX Runtime session as a timed call."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def time_calls(fns: dict, rounds: int, block_s: float, cpu_clock: bool) -> tuple[dict, dict]:
    """µs per call of each function: median over `rounds` of the mean of a block lasting >= block_s.

    Returns (wall-clock µs, CPU µs of the calling thread). With one thread every implementation runs on
    the calling thread, and its CPU time leaves out the time the OS gives to other processes: on a shared
    machine that is the steadier number (cpu_clock=True makes it decide the block length).
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.thread_time if cpu_clock else time.perf_counter
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, page faults, thread-pool start
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, start, start_wall, start_cpu = 0, clock(), time.perf_counter(), time.thread_time()
            while True:
                fn()
                calls += 1
                if clock() - start >= block_s:
                    break
            wall[name].append((time.perf_counter() - start_wall) / calls * 1e6)
            cpu[name].append((time.thread_time() - start_cpu) / calls * 1e6)
    return ({name: float(np.median(v)) for name, v in wall.items()},
            {name: float(np.median(v)) for name, v in cpu.items()})


def onnxruntime(path: Path, x, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    return lambda: session.run(None, feed)
