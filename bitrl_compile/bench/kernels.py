"""`bitrl-compile bench-kernels`: one BitLinear layer, ours against the usual picks.

For square layers N = K in --sizes and batches in --batches, in one process with the same thread count for
every implementation (--threads, default 1, the headline):

    ours             the TensorIR kernel of this host (targets.kernel_spec): activation quantization, the
                     ternary matmul on 2-bit tiles, rescale and bias, one call; checked bit-exact against
                     the numpy reference first
    torch fp32       torch.nn.functional.linear, eager, no_grad
    ORT fp32         ONNX Runtime, MatMul + Add
    ORT int8         the same model through onnxruntime.quantization.quantize_dynamic (int8 weights)
    TVM fp32         Relax matmul + add built by tvm.compile with TVM's default (untuned) schedule

Times are µs per call (median over rounds; each round is a block of calls of at least --block-ms, and the
implementations take turns so machine noise hits all of them alike). With one thread the table shows the
CPU time of the calling thread, on which every implementation then runs (the OS's time for other
processes is left out); the JSON also has the wall-clock times. With more threads it shows wall clock. Also reported: bits per weight (2 as
computed, base-3 as stored), the fp32/ours weight-byte ratio, and a bandwidth bound: the kernel's weight
bytes / the copy bandwidth numpy measures on a buffer of the same size (so the same cache level as the
repeated calls see) and on a 256 MB buffer (DRAM).

The instruction-count proxy for the Raspberry Pi kernels (timings under qemu mean nothing): the same layers
compiled for rasp4 (Cortex-A72) and rasp5 (Cortex-A76), each with its dot-product kernel (A72: NEON
smull/smlal + sadalp, A76: sdot) and its lookup-table kernel (tbl); per call, the guest
instructions executed inside the kernel library under `qemu-aarch64 -cpu <core>`, counted by the bench's
TCG plugin (qemu_insn_plugin.c; the guest runs child.py in its kernels mode), and statically, the
instructions of the kernel's inner loops per 1,000 multiply-accumulates, from the disassembly (for every
ISA, x86 too).

    bitrl-compile bench-kernels                                  # N = K in 64..4096, batch 1 and 32, 1 thread
    bitrl-compile bench-kernels --sizes 1024 --threads 2 --json out.json     # see --help
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bitrl_compile.bench.machine import build_plugin, load_average, machine
from bitrl_compile.bench.report import run_child
from bitrl_compile.bench.timing import onnxruntime, time_calls

IMPLS = ("ours", "lut", "torch", "ort_fp32", "ort_int8", "tvm_fp32")
LABELS = {"ours": "ours (ternary)", "lut": "ours, lookup tables", "torch": "torch fp32", "ort_fp32": "ORT fp32", "ort_int8": "ORT int8",
          "tvm_fp32": "TVM fp32"}
# multiply-accumulates per instruction of the dot-product instructions whose loops we count
# (a tbl looks up the low or the high bytes of 16 outputs' pair sums: 2 tbl per 32 multiply-accumulates; an `mla
# v.8h` is 8 int16 lanes: the rasp4 kernel's GEMM rows, targets/gemm_neon.py)
DOT_MACS = {"vpmaddubsw": 32, "vpdpbusd": 64, "sdot": 16, "smull": 8, "smlal": 8, "tbl": 16, "mla": 8}


# ------------------------------------------------------------------------------------------ timing

def _panel_tiles(spec, size: int) -> int:
    """Output tiles per GEMM panel of the square kernel of this size (0: no panels)."""
    from bitrl_compile.runtime.weights import tiles_packed_shape
    from bitrl_compile.targets import kernels

    nt, kb, _, _ = tiles_packed_shape(size, size, spec.layout)
    return kernels.panel_tiles(nt) if kernels.panel_used(spec, kb) else 0


def copy_bandwidth(nbytes: int, min_s: float = 0.05) -> float:
    """Bytes moved per second (read + write) by numpy copying a buffer of nbytes, best of 5 blocks.

    Timed with the calling thread's CPU clock (numpy copies on it), like the kernels at one thread.
    """
    src = np.ones(max(nbytes // 8, 1), np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        calls, start = 0, time.thread_time()
        while time.thread_time() - start < min_s:
            np.copyto(dst, src)
            calls += 1
        best = min(best, (time.thread_time() - start) / calls)
    return 2 * src.nbytes / best


# ------------------------------------------------------------------------------------ implementations

def ours(k: int, n: int, batch: int, rng, method: str = "dot", export: Path | None = None):
    """The compiled kernel for this host (its dot-product kernel, or with method="lut" its lookup-table
    kernel) and a zero-argument call; asserts bit-exactness first. With `export`, also writes the library there."""
    import tvm

    from bitrl_compile import quant, targets
    from bitrl_compile.runtime.weights import pack_tiles
    from bitrl_compile.targets import kernels

    target = targets.tvm_target(targets.get_target("host"))
    spec = targets.kernel_spec(target, method=method)
    lib = tvm.compile(tvm.IRModule({"main": kernels.bitlinear_kernel(k, n, "none", spec=spec)}), target=target)
    if export is not None:
        lib.export_library(str(export))
    fn = lib[kernels.kernel_name(k, n, "none", False)]
    w_t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    gamma, bias = np.full(1, 0.02, np.float32), rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, pack_tiles(w_t, spec.layout), gamma, bias,
                                             np.zeros((batch, n), np.float32))]
    fn(*args)
    if not np.array_equal(args[-1].numpy(), quant.bitlinear_reference(x, w_t, gamma, bias)):
        raise AssertionError(f"kernel K={k} N={n} batch {batch} differs from the numpy reference")
    return (lambda: fn(*args)), spec, pack_tiles(w_t, spec.layout).nbytes


def torch_fp32(w, b, x):
    import torch

    wt, bt, xt = torch.from_numpy(w), torch.from_numpy(b), torch.from_numpy(x)

    def call():
        with torch.no_grad():
            torch.nn.functional.linear(xt, wt, bt)

    return call


def onnx_models(w, b, folder: Path) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wT"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wT"), numpy_helper.from_array(b, "b")])
    fp32, int8 = folder / f"linear{k}.onnx", folder / f"linear{k}.int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" advice
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8


def tvm_fp32(w, b, x):
    import tvm
    from tvm import relax

    from bitrl_compile import targets

    k = w.shape[1]
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((x.shape[0], k), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(xv, relax.const(np.ascontiguousarray(w.T))))
            out = bb.emit_output(relax.op.add(y, relax.const(b)))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=targets.tvm_target(targets.get_target("host")))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    main, xt = vm["main"], tvm.runtime.tensor(x)
    return lambda: main(xt)


# ------------------------------------------------------------------------------------ instruction proxy

def disassemble(lib: Path, objdump: str) -> list[tuple[int, str, str]]:
    """(address, mnemonic, operands) of every instruction."""
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], check=True, capture_output=True,
                          text=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"\s+([0-9a-f]+):\s+([a-z][\w.]*)\s*(.*)", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def _is_store(op: str, args: str) -> bool:
    """Whether an instruction writes memory: aarch64 st*, or x86 (AT&T syntax) with a memory last operand."""
    if op.startswith("st"):
        return True
    return args.rstrip().endswith(")") and not op.startswith(("cmp", "test", "j", "prefetch", "nop"))


def inner_loops(insns: list[tuple[int, str, str]]) -> list[dict]:
    """Innermost loops (a backward branch whose body has no other backward branch) that hold dot products.

    Returns per loop: instructions per iteration, multiply-accumulates per iteration (DOT_MACS), the
    instructions per 1,000 multiply-accumulates, and the stores per iteration (accumulators kept in memory).
    """
    index = {addr: i for i, (addr, _, _) in enumerate(insns)}
    loops = []
    for i, (addr, op, args) in enumerate(insns):
        m = re.match(r"([0-9a-f]+)\s*<", args)
        is_branch = op.startswith(("j", "b.", "cb", "tb")) or op == "b"
        if not (is_branch and m) or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
            continue
        start = index[int(m.group(1), 16)]
        body = insns[start:i + 1]
        if any(o.startswith(("j", "b.", "cb", "tb")) and re.match(r"([0-9a-f]+)\s*<", a) and
               int(re.match(r"([0-9a-f]+)", a).group(1), 16) < ad for ad, o, a in body[:-1]):
            continue  # not innermost
        macs = sum(DOT_MACS.get(o, 0) for _, o, _ in body)
        if macs:
            loops.append({"instructions": len(body), "macs": macs,
                          "per_1000_macs": round(1000 * len(body) / macs, 1),
                          "dot_instructions": sorted({o for _, o, _ in body if o in DOT_MACS}),
                          "stores": sum(_is_store(o, a) for _, o, a in body)})
    return loops


def arm_instruction_counts(sizes, batches, log) -> dict:
    """Per-call guest instructions in the kernel library under qemu, and static inner-loop counts, A72 vs A76."""
    import tvm
    from tvm.support import cc

    from bitrl_compile import targets
    from bitrl_compile.devices import qemu_python_command
    from bitrl_compile.runtime.weights import tiles_packed_shape
    from bitrl_compile.targets import kernels

    objdump = shutil.which("aarch64-linux-gnu-objdump")
    result: dict = {"method": {}, "static": {}, "dynamic": {}}
    plugin = None
    try:
        plugin = build_plugin()
    except RuntimeError as e:
        result["dynamic_error"] = str(e)
    with tempfile.TemporaryDirectory(prefix="bitrl-kbench-") as tmp:
        for board, method in (("rasp4", "dot"), ("rasp4", "lut"), ("rasp5", "dot"), ("rasp5", "lut")):
            target = targets.get_target(board)
            tvm_target = targets.tvm_target(target)
            spec = targets.kernel_spec(tvm_target, method=method)
            variant = f"{board} {spec.isa}"
            cases = []
            for size in sizes:
                lib = Path(tmp) / f"{board}-{spec.isa}-{size}.so"
                func = kernels.bitlinear_kernel(size, size, "none", spec=spec)
                tvm.compile(tvm.IRModule({"main": func}), target=tvm_target).export_library(
                    str(lib), fcompile=cc.cross_compiler(target.cc))
                if objdump and size == max(sizes):
                    loops = inner_loops(disassemble(lib, objdump))
                    if spec.method == "lut":  # leave out the table-building loops (smull/smlal by constants);
                        # the tables' loop (batch < 8) and the GEMM rows' mla loop (gemm_neon) stay
                        loops = [lp for lp in loops if {"tbl", "mla"} & set(lp["dot_instructions"])]
                    result["static"][variant] = {"cpu": target.qemu_cpu, "isa": spec.isa, "loops": loops}
                for batch in batches:
                    calls = max(1, min(20, (1 << 22) // (size * size * batch)))
                    cases.append({"lib": str(lib), "name": kernels.kernel_name(size, size, "none", False),
                                  "k": size, "n": size, "batch": batch, "calls": calls,
                                  "w_shape": list(tiles_packed_shape(size, size, spec.layout))})
            if plugin is None:
                continue
            log(f"  counting instructions under qemu-aarch64 -cpu {target.qemu_cpu} ({len(cases)} cases)")
            counts_file = Path(tmp) / f"{board}-{spec.isa}-counts.txt"
            command = qemu_python_command(target.qemu_cpu)
            command = [*command[:-1], "-E", "TVM_NUM_THREADS=1", command[-1]]
            try:
                case_range = run_child({"mode": "kernels", "cases": cases}, 1, command=command, timeout=1800,
                                       env={"QEMU_PLUGIN": f"file={plugin},out={counts_file}"})["case_range"]
            except RuntimeError as e:
                result["dynamic_error"] = str(e)[-500:]
                continue
            lines = {int(v[0]): [int(c) for c in v[1:]] for v in
                     (line.split() for line in counts_file.read_text().splitlines() if line.strip())}
            for i, case in enumerate(cases):
                before, after, r = lines[2 * i], lines[2 * i + 1], case_range[i]
                in_lib = (after[1 + r] - before[1 + r]) / case["calls"]  # instructions inside this library
                result["dynamic"].setdefault(variant, {})[f"{case['k']}x{case['batch']}"] = {
                    "instructions_per_call": in_lib, "per_1000_macs": round(1000 * in_lib /
                                                                            (case["k"] * case["n"] * case["batch"]), 1)}
    result["method"] = {
        "dynamic": "qemu-aarch64 -cpu <core> (cortex-a72 for rasp4, cortex-a76 for rasp5) with the bench's TCG "
                   "plugin: guest instructions executed inside the kernel library per call (TVM_NUM_THREADS=1)",
        "static": "innermost loops holding dot-product instructions in the disassembly (largest size): "
                  "instructions per iteration and per 1,000 multiply-accumulates; rows = 4 is the GEMM loop, "
                  "rows = 1 the GEMV loop"}
    return result


# ------------------------------------------------------------------------------------ the benchmark

def run(sizes=(64, 256, 1024, 4096), batches=(1, 32), threads: int = 1, rounds: int = 7, block_ms: float = 20.0,
        impls=IMPLS, arm: bool = True, log=print) -> dict:
    import torch

    torch.set_num_threads(threads)
    load_before = load_average()
    rng = np.random.default_rng(0)
    rows = []
    dram = copy_bandwidth(256 << 20, min_s=0.2)
    from bitrl_compile import targets

    lut_spec = targets.kernel_spec(targets.tvm_target(targets.get_target("host")), method="lut")
    host_loops = None
    with tempfile.TemporaryDirectory(prefix="bitrl-kbench-") as tmp:
        for size in sizes:
            w = (rng.standard_normal((size, size)) * 0.02).astype(np.float32)
            b = rng.standard_normal(size).astype(np.float32)
            models = onnx_models(w, b, Path(tmp)) if {"ort_fp32", "ort_int8"} & set(impls) else None
            for batch in batches:
                x = rng.standard_normal((batch, size)).astype(np.float32)
                lib = Path(tmp) / "ours.so" if size == max(sizes) and batch == batches[0] else None
                call, spec, weight_bytes = ours(size, size, batch, rng, export=lib)
                if lib is not None and shutil.which("objdump"):
                    host_loops = {"isa": spec.isa, "size": size, "loops": inner_loops(disassemble(lib, "objdump"))}
                fns = {"ours": call}
                if "lut" in impls and lut_spec is not None:
                    fns["lut"] = ours(size, size, batch, rng, method="lut")[0]
                if "torch" in impls:
                    fns["torch"] = torch_fp32(w, b, x)
                if "ort_fp32" in impls:
                    fns["ort_fp32"] = onnxruntime(models[0], x, threads)
                if "ort_int8" in impls:
                    fns["ort_int8"] = onnxruntime(models[1], x, threads)
                if "tvm_fp32" in impls:
                    fns["tvm_fp32"] = tvm_fp32(w, b, x)
                wall, cpu = time_calls(fns, rounds, block_ms / 1e3, cpu_clock=threads == 1)
                us = cpu if threads == 1 else wall
                stored = size * -(-size // 5)  # base-3 bytes
                same_level = copy_bandwidth(weight_bytes)
                row = {"n": size, "k": size, "batch": batch, "us": us, "wall_us": wall, "thread_cpu_us": cpu,
                       "speedup": {name: us[name] / us["ours"] for name in us if name != "ours"},
                       "bits_per_weight": {"compute": 8 * weight_bytes / size**2, "storage": 8 * stored / size**2},
                       "fp32_over_ours_weight_bytes": {"storage": 4 * size**2 / stored,
                                                       "compute": 4 * size**2 / weight_bytes},
                       "weight_bytes": {"compute": weight_bytes, "storage": stored, "fp32": 4 * size**2},
                       "bandwidth_bound_us": {"same_size_copy": weight_bytes / same_level * 1e6,
                                              "dram_copy": weight_bytes / dram * 1e6},
                       "copy_gb_s": {"same_size": same_level / 1e9, "dram": dram / 1e9},
                       "kernel": {"isa": spec.isa, "layout": spec.layout, "rows": spec.rows,
                                  "amx_rows": spec.amx_rows, "panel_tiles": _panel_tiles(spec, size)},
                       "lut_kernel": lut_spec and {"isa": lut_spec.isa, "layout": lut_spec.layout}}
                row["over_bound"] = {lvl: us["ours"] / t for lvl, t in row["bandwidth_bound_us"].items()}
                rows.append(row)
                log(format_row(row))
    clock = "CPU time of the calling thread" if threads == 1 else "wall clock"
    result = {"machine": dict(machine(), load_average_at_start=load_before), "threads": threads, "rounds": rounds, "block_ms": block_ms, "clock": clock,
              "rows": rows, "host_inner_loops": host_loops}
    if arm:
        result["arm_instructions"] = arm_instruction_counts(sizes, batches, log)
    return result


HEADER = (f"{'N=K':>5} {'batch':>5} | {'ours':>9} {'ours lut':>9} {'torch':>9} {'ORT fp32':>9} {'ORT int8':>9} "
          f"{'TVM fp32':>10} | {'x lut':>7} {'x torch':>7} {'x ORT8':>7} {'x ORT32':>7} {'x TVM':>7} | {'bits/w':>9} {'fp32/ours':>9} | "
          f"{'bound':>7} {'ours/bound':>10}")


def format_row(row: dict) -> str:
    us, sp = row["us"], row["speedup"]

    def t(name):
        return f"{us[name]:9.1f}" if name in us else f"{'-':>9}"

    def s(name):
        return f"{sp[name]:6.1f}x" if name in sp else f"{'-':>7}"

    bound = row["bandwidth_bound_us"]["same_size_copy"]
    return (f"{row['n']:>5} {row['batch']:>5} | {t('ours')} {t('lut')} {t('torch')} {t('ort_fp32')} {t('ort_int8')} "
            f"{t('tvm_fp32'):>10} | {s('lut')} {s('torch')} {s('ort_int8')} {s('ort_fp32')} {s('tvm_fp32')} | "
            f"{row['bits_per_weight']['compute']:.1f}/{row['bits_per_weight']['storage']:.2f} "
            f"{row['fp32_over_ours_weight_bytes']['storage']:8.1f}x | {bound:7.1f} "
            f"{row['over_bound']['same_size_copy']:9.2f}x")


def report(result: dict, command: str) -> str:
    m = result["machine"]
    load = " -> ".join(", ".join(f"{v:.2f}" for v in m[key]) for key in ("load_average_at_start", "load_average")
                       if m.get(key))
    lines = [f"bitrl-compile kernel benchmark: µs per call ({result['clock']}), {result['threads']} thread(s), "
             + f"median of {result['rounds']} rounds of >= {result['block_ms']:g} ms",
             f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load average (start -> end) {load}",
             f"command: {command}", "", HEADER, "-" * len(HEADER)]
    lines += [format_row(row) for row in result["rows"]]
    row0 = result["rows"][0]
    dram = ", ".join(f"{r['n']}x{r['batch']}: {r['over_bound']['dram_copy']:.2f}x" for r in result["rows"])
    amx, panel = row0["kernel"].get("amx_rows"), result["rows"][-1]["kernel"].get("panel_tiles")
    block = (f"panels of {row0['kernel']['rows']} rows x {panel} output tiles over all of K" if panel else
             f"{row0['kernel']['rows']} rows per register block")
    lines += ["", f"ours = {row0['kernel']['isa']} kernel on {row0['kernel']['layout']} tiles "
              + (f"({amx}-row AMX tiles, then " if amx else "(")
              + f"{block}); ours lut = the "
              + f"{(row0.get('lut_kernel') or {}).get('isa', '-')} lookup-table kernel (runtime/weights.py lut layout); "
              + "x = their time / ours; bits/w = as computed "
              + "(2-bit tiles) / as stored (base-3); fp32/ours = fp32 weight bytes / base-3 bytes;",
              "bound = kernel weight bytes / numpy copy bandwidth (read + write bytes per second) on a buffer of "
              + f"the same size; ours / bound against a 256 MB (DRAM) copy: {dram}"]
    host = result.get("host_inner_loops")
    if host:
        lines.append(f"ours ({host['isa']}, {host['size']}x{host['size']}) inner loops: " + "; ".join(
            f"{lp['instructions']} instr / {lp['macs']} MAC = {lp['per_1000_macs']}/1k MAC, {lp['stores']} stores"
            for lp in host["loops"]))
    arm = result.get("arm_instructions")
    if arm:
        lines += ["", "Raspberry Pi kernels, instructions (timings under qemu mean nothing):"]
        for board, counts in arm.get("dynamic", {}).items():
            lines.append(f"  {board}: per call inside the kernel (qemu plugin): " + ", ".join(
                f"{case}: {c['instructions_per_call']:,.0f} ({c['per_1000_macs']}/1k MAC)" for case, c in counts.items()))
        for board, info in arm.get("static", {}).items():
            lines.append(f"  {board} ({info['cpu']}, {info['isa']}) inner loops: " + "; ".join(
                f"{lp['instructions']} instr / {lp['macs']} MAC = {lp['per_1000_macs']}/1k MAC "
                f"({', '.join(lp['dot_instructions'])})" for lp in info["loops"]))
        if arm.get("dynamic_error"):
            lines.append(f"  (no dynamic counts: {arm['dynamic_error'][:200]})")
    return "\n".join(lines)


def thread_env(threads: int) -> dict[str, str]:
    """The environment that sizes TVM's and OpenMP's thread pools (read once, when a pool starts)."""
    return {"TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def bench_kernels(command_args: list[str], *, sizes: list[int], batches: list[int], threads: int, rounds: int,
                  block_ms: float, impls: list[str] | None, arm: bool, json_path: str | os.PathLike,
                  conv: bool = False, log=print) -> int:
    """`bitrl-compile bench-kernels COMMAND_ARGS`: the rows as they are measured, the report, the JSON file.

    `impls` are the baselines to run (None: all of them; ours always runs). Unless this process started with
    thread_env(threads), the measurement runs in a fresh `bitrl-compile bench-kernels COMMAND_ARGS` process that
    has it from birth. Returns the exit status.
    """
    unknown = sorted(set(impls or ()) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}; known: {', '.join(IMPLS[1:])}")
    want = thread_env(threads)
    if any(os.environ.get(k) != v for k, v in want.items()) and not os.environ.get("BITRL_KBENCH_CHILD"):
        env = dict(os.environ, **want, BITRL_KBENCH_CHILD="1")
        return subprocess.run([sys.executable, "-m", "bitrl_compile.cli", "bench-kernels", *command_args], env=env,
                              check=False).returncode
    command = shlex.join(["bitrl-compile", "bench-kernels", *command_args])
    log(f"command: {command}")
    log(HEADER)
    result = run(sizes, batches, threads, rounds, block_ms, ("ours", *(IMPLS[1:] if impls is None else impls)), arm,
                 log=log)
    result["command"] = command
    log("\n" + report(result, command))
    if conv:  # NatureCNN's convolutions, one thread (bench/conv.py)
        from bitrl_compile.bench.conv import CONV_HEADER, format_conv_row, run_conv

        log("\nNatureCNN convolutions (84x84x4 frames), µs per call (CPU time of the calling thread), 1 thread, "
            f"median of {rounds} rounds; x = their time / ours\n{CONV_HEADER}")
        result["conv"] = run_conv(batches, rounds, block_ms, log=log)
        log("\n".join([CONV_HEADER, *map(format_conv_row, result["conv"])]))
        if arm:
            from bitrl_compile.bench.conv import arm_conv_counts, format_arm_conv_counts

            counts = result["conv_arm"] = arm_conv_counts(batches, log=log)
            log(format_arm_conv_counts(counts))
    Path(json_path).write_text(json.dumps(result, indent=2))
    log(f"\nwrote {json_path}")
    return 0
