"""`bitrl-compile bench-kernels --conv`: NatureCNN's three convolutions, ours against the usual picks, per layer.

For each layer of NatureCNN on 84x84x4 frames (8x8/4 4->32, 4x4/2 32->64, 3x3/1 64->64, each with its ReLU) and
each batch, in one process, one thread for everyone (times as in bench.kernels: CPU time of the calling thread,
median of rounds, the implementations taking turns):

    ours           the BitConv2d TensorIR kernel of this host (targets/conv_kernels.py): per-sample int8
                   quantization of the float input, the integer convolution on ternary weights, rescale, bias
                   and ReLU, one call; checked bit-exact against quant.bitconv2d_reference first. conv1 is the
                   kernel a compiled policy calls (`FOLDED`): it reads the NHWC frame itself, its uint8 pixels
                   where the kernel can (conv_kernels.takes_pixels), and divides by 255 in its quantization step
    torch fp32     torch.nn.functional.conv2d + relu, eager, no_grad
    ORT fp32       ONNX Runtime, Conv + Relu
    ORT int8 dyn   onnxruntime.quantization.quantize_dynamic: ConvInteger (u8 activations quantized per call,
                   s8 weights), then a float rescale
    ORT int8 st    quantize_static, QOperator format (QLinearConv: u8 activations with calibrated scales, s8
                   per-channel weights, MLAS's int8 convolution), calibrated on the layer's own inputs; its
                   float -> u8 QuantizeLinear and u8 -> float DequantizeLinear are part of the call, as ours
                   quantizes and rescales inside its kernel

`conv_baseline_int8` (the faster of the two int8 paths, measured here: static) is what `bitrl-compile bench`
gives ONNX Runtime int8 for a convolutional policy.

With the arm part (`arm_conv_counts`, printed by `format_arm_conv_counts`): the same layers compiled for rasp4
(Cortex-A72; ours: targets/conv_neon.py), guest instructions per call under qemu-aarch64, against the generic
LLVM-vectorised TensorIR kernel (what aarch64 ran before conv_neon.py) and ONNX Runtime int8 static (its aarch64
wheel in the guest), each counted inside its own library.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# name, (C, KH, KW, SH, SW, PT, PL, PB, PR), input H x W, output channels: NatureCNN on 84x84x4
NATURE_CNN = (("conv1 8x8/4 4->32", (4, 8, 8, 4, 4, 0, 0, 0, 0), (84, 84), 32),
              ("conv2 4x4/2 32->64", (32, 4, 4, 2, 2, 0, 0, 0, 0), (20, 20), 64),
              ("conv3 3x3/1 64->64", (64, 3, 3, 1, 1, 0, 0, 0, 0), (9, 9), 64))
# how a compiled policy's first layer reads the observation (passes/entry_points.py `_image_fold`): the frame
# NHWC, /255 folded in; the baselines take the NCHW frame / 255 (their input, as torch and ONNX models have it)
FOLDED = {"conv1 8x8/4 4->32": ("nhwc", ("div", 255.0))}
CONV_IMPLS = ("ours", "torch", "ort_fp32", "ort_int8_dynamic", "ort_int8_static")
CONV_LABELS = {"ours": "ours", "torch": "torch fp32", "ort_fp32": "ORT fp32", "ort_int8_dynamic": "ORT int8 dyn",
               "ort_int8_static": "ORT int8 st"}


def geometry(values):
    from bitrl_compile.passes.bitconv_op import Geometry

    return Geometry.parse(",".join(map(str, values)))


def ours_conv(g, hw, o: int, x: np.ndarray, rng, export: Path | None = None, fold=None):
    """The compiled conv kernel for this host and a zero-argument call on x [B, C, H, W]; asserts bit-exactness.
    `fold` (layout, prescale), `FOLDED`: the kernel reads x * 255 as NHWC pixels instead (uint8 where it can)."""
    import tvm

    from bitrl_compile import quant, targets
    from bitrl_compile.targets import conv_kernels

    target = targets.tvm_target(targets.get_target("host"))
    spec = targets.kernel_spec(target)
    layout, prescale = fold or ("nchw", None)
    dtype = "uint8" if fold is not None and conv_kernels.takes_pixels(o, spec) else "float32"
    kernel = conv_kernels.conv_kernel(g, hw, o, "relu", False, spec, input_layout=layout, prescale=prescale,
                                      input_dtype=dtype)
    lib = tvm.compile(tvm.IRModule({"main": kernel}), target=target)
    if export is not None:
        lib.export_library(str(export))
    if fold is not None:  # the frame the baselines see / 255, as pixels
        x = np.ascontiguousarray(np.round(x * 255).transpose(0, 2, 3, 1)).astype(dtype)
    w = rng.integers(-1, 2, (o, g.channels, *g.kernel)).astype(np.int8)
    gamma, bias = np.full(1, 0.02, np.float32), rng.standard_normal(o).astype(np.float32) * 0.1
    out = np.zeros((x.shape[0], o, *g.output_hw(*hw)), np.float32)
    args = [tvm.runtime.tensor(a) for a in (x.reshape(x.shape[0], -1), conv_kernels.kernel_weights(w, layout), gamma,
                                            bias, out)]
    fn = lib["main"]
    fn(*args)
    want = quant.apply_activation(quant.bitconv2d_reference(x.astype(np.float32), w, gamma, bias, g.stride,
                                                            g.padding, layout=layout, prescale=prescale), "relu")
    if not np.array_equal(args[-1].numpy(), want):
        raise AssertionError(f"conv kernel {g.text()} at {hw} batch {x.shape[0]} differs from the numpy reference")
    return (lambda: fn(*args)), spec, conv_kernels.kernel_weights(w).nbytes


def torch_conv(w, b, g, x):
    import torch

    wt, bt, xt = torch.from_numpy(w), torch.from_numpy(b), torch.from_numpy(x)

    def call():
        with torch.no_grad():
            torch.relu(torch.nn.functional.conv2d(xt, wt, bt, g.stride))

    return call


def onnx_conv(w, b, g, hw, folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    o = w.shape[0]
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(g.kernel), strides=list(g.stride),
                            pads=[g.padding[0], g.padding[1], g.padding[2], g.padding[3]])
    graph = helper.make_graph(
        [conv, helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", g.channels, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", o, *g.output_hw(*hw)])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = folder / f"conv_c{g.channels}_o{o}_k{g.kernel[0]}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def run_conv(batches=(1, 8), rounds: int = 7, block_ms: float = 20.0, impls=CONV_IMPLS, layers=NATURE_CNN,
             log=print) -> list[dict]:
    """One row per (layer, batch): µs per call of every implementation and the ratios their / ours."""
    import tempfile

    import torch

    from bitrl_compile.bench.int8 import quantize_int8
    from bitrl_compile.bench.timing import onnxruntime, time_calls

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bitrl-cbench-") as tmp:
        for name, values, hw, o in layers:
            g = geometry(values)
            w = (rng.standard_normal((o, g.channels, *g.kernel)) * (2 / g.k) ** 0.5).astype(np.float32)
            b = (rng.standard_normal(o) * 0.1).astype(np.float32)
            fp32 = onnx_conv(w, b, g, hw, Path(tmp))
            # post-ReLU-like inputs in [0, 1] (the first layer's frames / 255), as the policy feeds each layer
            calib = [rng.random((1, g.channels, *hw)).astype(np.float32) for _ in range(8)]
            models = {"ort_fp32": fp32}
            if "ort_int8_dynamic" in impls:
                models["ort_int8_dynamic"] = quantize_int8(fp32, "dynamic")
            if "ort_int8_static" in impls:
                models["ort_int8_static"] = quantize_int8(fp32, "static", calib)
            for batch in batches:
                x = rng.random((batch, g.channels, *hw)).astype(np.float32)
                call, spec, weight_bytes = ours_conv(g, hw, o, x, rng, fold=FOLDED.get(name))
                fns = {"ours": call}
                if "torch" in impls:
                    fns["torch"] = torch_conv(w, b, g, x)
                for impl, path in models.items():
                    if impl in impls:
                        fns[impl] = onnxruntime(path, x, 1)
                _, us = time_calls(fns, rounds, block_ms / 1e3, cpu_clock=True)
                oh, ow = g.output_hw(*hw)
                row = {"layer": name, "geometry": g.text(), "hw": list(hw), "o": o, "batch": batch, "us": us,
                       "ours_input": "nhwc pixels, /255 folded" if name in FOLDED else "nchw float32",
                       "speedup": {k: us[k] / us["ours"] for k in us if k != "ours"},
                       "macs": g.k * o * oh * ow * batch, "kernel_isa": spec.isa, "weight_bytes": weight_bytes}
                rows.append(row)
                log(format_conv_row(row))
    return rows


CONV_HEADER = (f"{'layer':<20} {'batch':>5} | " + " ".join(f"{CONV_LABELS[i]:>12}" for i in CONV_IMPLS)
               + " | " + " ".join(f"{'x ' + CONV_LABELS[i]:>15}" for i in CONV_IMPLS[1:]) + f" | {'GMAC/s':>6}")


def format_conv_row(row: dict) -> str:
    us, sp = row["us"], row["speedup"]
    times = " ".join(f"{us[i]:12.1f}" if i in us else f"{'-':>12}" for i in CONV_IMPLS)
    ratios = " ".join(f"{sp[i]:14.2f}x" if i in sp else f"{'-':>15}" for i in CONV_IMPLS[1:])
    return (f"{row['layer']:<20} {row['batch']:>5} | {times} | {ratios} | "
            f"{row['macs'] / us['ours'] / 1e3:6.1f}")


ARM_IMPLS = ("ours", "generic", "ort_int8_static")
ARM_LABELS = {"ours": "ours", "generic": "TensorIR generic", "ort_int8_static": "ORT int8 st"}


def arm_conv_counts(batches=(1, 8), board: str = "rasp4", kernels=None, log=print,
                    impls=ARM_IMPLS) -> dict:
    """Guest instructions per call inside each of NatureCNN's conv kernels compiled for `board`, under
    `qemu-aarch64 -cpu <its core>` with the bench's TCG plugin (child.py kernels mode), per layer and batch.
    `kernels`: the module that builds them (default targets.conv_kernels; a bench can pass another version).
    `impls` beside ours: "generic" (conv_kernels' LLVM-vectorised TensorIR kernel, what aarch64 ran before
    targets/conv_neon.py) and "ort_int8_static" (ONNX Runtime's aarch64 wheel in the guest, QLinearConv + ReLU
    quantized as run_conv does; instructions inside its library per session.run)."""
    import tempfile

    import tvm
    from tvm.support import cc

    from bitrl_compile import targets
    from bitrl_compile.bench.int8 import quantize_int8
    from bitrl_compile.bench.machine import build_plugin
    from bitrl_compile.bench.report import guest_onnxruntime, run_child
    from bitrl_compile.devices import qemu_python_command

    if kernels is None:
        from bitrl_compile.targets import conv_kernels as kernels
    target = targets.get_target(board)
    tvm_target = targets.tvm_target(target)
    spec = targets.kernel_spec(tvm_target)
    plugin = build_plugin()
    command = qemu_python_command(target.qemu_cpu)
    impls = ["ours", *(i for i in impls if i != "ours")]
    if "ort_int8_static" in impls:
        try:
            site = guest_onnxruntime()
            command = [f"{a}{os.pathsep}{site}" if a.startswith("PYTHONPATH=") else a for a in command]
        except RuntimeError as e:
            log(f"  ONNX Runtime is not measured under qemu: {e}")
            impls.remove("ort_int8_static")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bitrl-cbench-") as tmp:
        cases = []
        for name, values, hw, o in NATURE_CNN:
            g = geometry(values)
            w_shape = kernels.kernel_weights(np.zeros((o, g.channels, *g.kernel), np.int8)).shape
            for impl in impls:
                if impl == "ort_int8_static":
                    w = (rng.standard_normal((o, g.channels, *g.kernel)) * (2 / g.k) ** 0.5).astype(np.float32)
                    fp32 = onnx_conv(w, (rng.standard_normal(o) * 0.1).astype(np.float32), g, hw, Path(tmp))
                    calib = [rng.random((1, g.channels, *hw)).astype(np.float32) for _ in range(8)]
                    lib = str(quantize_int8(fp32, "static", calib))
                else:
                    if impl == "ours":
                        func = kernels.conv_kernel(g, hw, o, "relu", False, spec)
                    else:
                        sch = tvm.s_tir.Schedule(kernels.conv_primfunc(g, hw, o, "relu", False, spec))
                        kernels.apply_schedule(sch, spec)
                        func = sch.mod["main"]
                    lib = str(Path(tmp) / f"conv_c{g.channels}_{impl}.so")
                    tvm.compile(tvm.IRModule({"main": func}), target=tvm_target).export_library(
                        lib, fcompile=cc.cross_compiler(target.cc))
                for batch in batches:
                    case = {"impl": impl, "calls": 3, "layer": name, "batch": batch,
                            "macs": g.k * o * int(np.prod(g.output_hw(*hw))) * batch}
                    if impl == "ort_int8_static":
                        case.update(onnx=lib, x_shape=[batch, g.channels, *hw])
                    else:
                        case.update(lib=lib, name="main", args=[
                            [[batch, g.channels * hw[0] * hw[1]], "float32"], [list(w_shape), "int8"],
                            [[1], "float32"], [[o], "float32"], [[batch, o, *g.output_hw(*hw)], "float32"]])
                    cases.append(case)
        log(f"  counting conv kernel instructions under qemu-aarch64 -cpu {target.qemu_cpu} ({len(cases)} cases)")
        counts_file = Path(tmp) / "counts.txt"
        command = [*command[:-1], "-E", "TVM_NUM_THREADS=1", "-E", "OMP_NUM_THREADS=1", command[-1]]
        case_range = run_child({"mode": "kernels", "cases": cases}, 1, command=command, timeout=1800,
                               env={"QEMU_PLUGIN": f"file={plugin},out={counts_file}"})["case_range"]
        lines = {int(v[0]): [int(c) for c in v[1:]] for v in
                 (line.split() for line in counts_file.read_text().splitlines() if line.strip())}
    rows: dict = {impl: {} for impl in impls}
    for i, case in enumerate(cases):
        in_lib = (lines[2 * i + 1][1 + case_range[i]] - lines[2 * i][1 + case_range[i]]) / case["calls"]
        rows[case["impl"]][f"{case['layer']} x{case['batch']}"] = {
            "instructions_per_call": in_lib, "per_1000_macs": round(1000 * in_lib / case["macs"], 1)}
    isa = ("vpdpbusd" if spec.isa in getattr(kernels, "VNNI_ISAS", ()) else
           "smull/smlal" if spec.isa in getattr(getattr(kernels, "conv_neon", None), "NEON_ISAS", ()) else
           "TensorIR, LLVM-vectorised")
    return {"board": board, "cpu": target.qemu_cpu, "isa": isa, "counts": rows.pop("ours"), "baselines": rows}


def format_arm_conv_counts(counts: dict) -> str:
    """The table of arm_conv_counts: instructions per call per layer and batch, ours and the baselines (x = their
    count / ours), and the three layers' sum per batch."""
    impls = ["ours", *counts["baselines"]]
    table = {"ours": counts["counts"], **counts["baselines"]}
    lines = [(f"{counts['board']} ({counts['cpu']}, ours: {counts['isa']}) conv kernels, guest instructions per call "
              "inside each library (qemu plugin), 1 thread; x = their count / ours"),
             f"{'layer':<26} | " + " | ".join(f"{ARM_LABELS.get(i, i):>24}" for i in impls)]
    keys = list(counts["counts"])
    batches = sorted({k.rsplit(' x', 1)[1] for k in keys}, key=int)
    sums = {b: {i: sum(table[i][k]["instructions_per_call"] for k in keys if k.endswith(f" x{b}")) for i in impls}
            for b in batches}
    for key, get in [*((k, lambda i, k=k: table[i][k]["instructions_per_call"]) for k in keys),
                     *((f"3 convs x{b}", lambda i, b=b: sums[b][i]) for b in batches)]:
        ours = get("ours")
        cells = [f"{ours:>24,.0f}"] + [f"{get(i):>15,.0f} ({get(i) / ours:4.2f}x)" for i in impls[1:]]
        lines.append(f"{key:<26} | " + " | ".join(cells))
    return "\n".join(lines)
