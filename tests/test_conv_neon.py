"""The aarch64 NEON BitConv2d kernel (targets/conv_neon.py): cross-compiled for rasp4 (Cortex-A72), run under
`qemu-aarch64 -cpu cortex-a72`, bit-exact against quant.bitconv2d_reference; its inner loops keep their int16
accumulators in registers (smlal only, no stores)."""

import json
import shutil

import numpy as np
import pytest
import tvm
from tvm.support import cc

from bitrl_compile import quant, targets
from bitrl_compile.devices import run_python_under_qemu
from bitrl_compile.passes import bitconv_op
from bitrl_compile.targets import conv_kernels, conv_neon

RASP4 = targets.get_target("rasp4")

# (C, kernel, stride, padding (t, l, b, r)), input H x W, O, activation, per-channel gamma, weights, batch, and the
# input's layout and prescale (a folded transpose and / 255: conv_kernels.conv_kernel's keywords)
CASES = [
    ((32, (4, 4), (2, 2), (0, 0, 0, 0)), (20, 20), 64, "relu", False, "trits", 1, {}),  # NatureCNN's conv2
    ((5, (3, 3), (1, 1), (1, 1, 1, 1)), (7, 6), 12, "none", True, "trits", 3, {}),     # channel groups, C % 4, padded
    ((4, (3, 4), (1, 2), (1, 2, 0, 3)), (9, 11), 8, "relu", True, "int8", 3, {}),      # int8 weights: the wide path
    ((3, (8, 8), (4, 4), (0, 1, 2, 3)), (17, 18), 4, "relu", False, "trits", 2,        # conv1-like, odd padding
     {"prescale": ("mul", 0.5)}),
    ((128, (3, 3), (1, 1), (0, 0, 0, 0)), (3, 4), 8, "none", False, "trits", 1, {}),   # 288 groups > 255: wide path
    ((4, (8, 8), (4, 4), (0, 0, 0, 0)), (20, 24), 8, "relu", False, "trits", 2,        # NHWC frames / 255
     {"input_layout": "nhwc", "prescale": ("div", 255.0)}),
    ((3, (3, 3), (2, 1), (1, 1, 1, 1)), (6, 5), 4, "relu", True, "trits", 2, {"input_layout": "nhwc"}),
]

GUEST = """
import json, sys
import numpy as np
from bitrl_compile.runtime import tvm_runtime as rt
for case in json.loads(open(sys.argv[1]).read()):
    d = np.load(case["npz"])
    arrays = [rt.aligned(d[k]) for k in ("x", "w", "gamma", "bias")] + [rt.aligned(np.zeros(case["out"], np.float32))]
    rt.load_module(case["lib"])["main"](*[rt.to_device(a) for a in arrays])
    np.save(case["npz"] + ".out.npy", arrays[-1])
"""


def _build(tmp_path, i, case):
    geometry, hw, o, activation, per_channel, weights, batch, fold = case
    g = bitconv_op.Geometry(*geometry)
    target = targets.tvm_target(RASP4)
    kernel = conv_kernels.conv_kernel(g, hw, o, activation, per_channel, targets.kernel_spec(target), **fold)
    lib = tmp_path / f"conv{i}.so"
    tvm.compile(tvm.IRModule({"main": kernel}), target=target).export_library(
        str(lib), fcompile=cc.cross_compiler(RASP4.cc))
    rng = np.random.default_rng(i)
    # samples of very different magnitudes: each has its own scale
    layout = fold.get("input_layout", "nchw")
    shape = (batch, g.channels, *hw) if layout == "nchw" else (batch, *hw, g.channels)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32([1e-3, 1, 9][:batch]).reshape(-1, 1, 1, 1)
    if "prescale" in fold:  # frames: integers 0..255
        x = rng.integers(0, 256, shape).astype(np.float32)
    w = (rng.integers(-1, 2, (o, g.channels, *g.kernel)) if weights == "trits" else
         rng.integers(-127, 128, (o, g.channels, *g.kernel))).astype(np.int8)
    gamma = (rng.random(o if per_channel else 1) + 0.1).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    npz = tmp_path / f"conv{i}.npz"
    np.savez(npz, x=x.reshape(batch, -1), w=conv_kernels.kernel_weights(w, layout), gamma=gamma, bias=bias)
    want = quant.apply_activation(quant.bitconv2d_reference(x, w, gamma, bias, g.stride, g.padding, layout=layout,
                                                            prescale=fold.get("prescale")), activation)
    return kernel, {"npz": str(npz), "lib": str(lib), "out": list(want.shape)}, want


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv_neon")
    return tmp, [_build(tmp, i, case) for i, case in enumerate(CASES)]


def test_rasp4_convolutions_are_the_neon_kernel_bit_exact_under_qemu(built):
    tmp, cases = built
    for kernel, _, _ in cases:
        assert "conv_neon.py" in json.loads(kernel.attrs["bitrl.schedule"])["reason"]
    config = tmp / "cases.json"
    config.write_text(json.dumps([case for _, case, _ in cases]))
    (tmp / "guest.py").write_text(GUEST)
    r = run_python_under_qemu(f"import runpy, sys; sys.argv = ['guest', {str(config)!r}]; "
                              f"runpy.run_path({str(tmp / 'guest.py')!r})", cpu=RASP4.qemu_cpu)
    assert r.returncode == 0, r.stderr[-2000:]
    for (_, case, want), spec in zip(cases, CASES):
        np.testing.assert_array_equal(np.load(case["npz"] + ".out.npy"), want, err_msg=str(spec))


def test_inner_loops_are_smlal_on_register_accumulators(built):
    from bitrl_compile.bench.kernels import disassemble, inner_loops

    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "apt-get install binutils-aarch64-linux-gnu"
    _, cases = built
    insns = disassemble(cases[0][1]["lib"], objdump)
    ops = {op for _, op, _ in insns}
    assert {"smlal", "saddlp", "addp"} <= ops and "sdot" not in ops  # a Cortex-A72 has no dot product
    loops = [lp for lp in inner_loops(insns) if "smlal" in lp["dot_instructions"]]
    assert loops and all(lp["stores"] == 0 for lp in loops)  # the int16 accumulators never leave registers


def test_blocking_and_what_the_kernel_leaves_to_the_generic_one():
    assert conv_neon.blocking(20, 8, 64) == (3, 4) and conv_neon.blocking(7, 16, 144) == (3, 4)
    g = bitconv_op.Geometry(4, (3, 3), (1, 1), (0, 0, 0, 0))
    spec = targets.kernel_spec(targets.tvm_target(RASP4))
    assert spec.isa in conv_neon.NEON_ISAS
    kernel = conv_kernels.conv_kernel(g, (6, 6), 6, "relu", False, spec)  # O % 4 != 0: the generic kernel
    assert "one hand-written schedule" in json.loads(kernel.attrs["bitrl.schedule"])["reason"]


def test_arm_conv_table_has_every_layer_the_sum_and_the_ratios():
    from bitrl_compile.bench.conv import format_arm_conv_counts

    def row(n):
        return {"instructions_per_call": n, "per_1000_macs": 1.0}

    counts = {"board": "rasp4", "cpu": "cortex-a72", "isa": "smull/smlal",
              "counts": {"conv1 x1": row(100), "conv2 x1": row(300)},
              "baselines": {"ort_int8_static": {"conv1 x1": row(150), "conv2 x1": row(500)}}}
    lines = format_arm_conv_counts(counts).splitlines()
    assert "ORT int8 st" in lines[1] and len(lines) == 5
    assert lines[2].startswith("conv1 x1") and "(1.50x)" in lines[2]
    assert lines[4].startswith("3 convs x1") and "400" in lines[4] and "(1.62x)" in lines[4]
