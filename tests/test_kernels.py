"""BitLinear kernels of every ISA equal the numpy reference bit for bit, on x86 and under qemu (A72, A76).

Covers: the GEMV rows (batch % rows) and the register-blocked GEMM rows, K and N that are not multiples
of the tile, per-tensor and per-channel scales, fused ReLU, and the adversarial accumulator test: all
weights +1 or -1 against activations of +-127 at K = 4096 and 16384 (int16 partial sums in widening
multiply-accumulate kernels overflow there if they live across tiles). AVX-512 VNNI cannot run on this
CPU (and qemu's TCG has no AVX-512): its tile layout and schedule run here through the generic kernel
with the same tile shape, and its library is checked to contain vpdpbusd.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm
from kernel_guest import GUEST_RUNNER

from bitrl_compile import quant, targets
from bitrl_compile.quant import apply_activation
from bitrl_compile.runtime.weights import pack_tiles
from bitrl_compile.targets import kernels

HOST = targets.tvm_target(targets.get_target("host"))
BATCHES = (1, 3, 4, 5, 9)  # rows = 4: GEMV only, GEMV, one block, block + 1, two blocks + 1
# (K, N, activation, per_channel): tails in K and N, tiny layers, a policy-sized layer
SHAPES = [(7, 5, "relu", True), (100, 37, "none", False), (64, 64, "relu", False)]
OVERFLOW_K = (4096, 16384)


def _case(k: int, n: int, per_channel: bool, seed: int, rows: int = max(BATCHES)):
    rng = np.random.default_rng(seed)
    w_t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    gamma = rng.uniform(0.01, 2, n if per_channel else 1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 10, (rows, 1))
    x[0] = 0  # the absmax epsilon
    return w_t, gamma, bias, x.astype(np.float32)


def _overflow_case(k: int, rows: int = max(BATCHES)):
    """Weights all +1 (row 0), all -1 (row 1), alternating; activations +-1 -> x_q = +-127 everywhere."""
    n = 16
    w_t = np.where(np.arange(k)[None, :] % 2 == np.arange(n)[:, None] % 2, 1, -1).astype(np.int8)
    w_t[0], w_t[1] = 1, -1
    x = np.where(np.random.default_rng(k).random((rows, k)) < 0.5, -1, 1).astype(np.float32)
    x[0] = 1
    x[1] = -1
    x[3] = np.where(w_t[2] > 0, 1, -1)  # |acc| = 127 K in row 2, through the tile decoding
    return w_t, np.ones(1, np.float32), np.zeros(n, np.float32), x


def _expected(x, w_t, gamma, bias, activation):
    return apply_activation(quant.bitlinear_reference(x, w_t, gamma, bias), activation)


def _run_host(spec, k, n, activation, per_channel, w_t, gamma, bias, x, batches=BATCHES, knobs=kernels.DEFAULT_KNOBS):
    func = kernels.bitlinear_kernel(k, n, activation, per_channel, spec=spec, knobs=knobs)
    fn = tvm.compile(tvm.IRModule({"main": func}), target=HOST)[kernels.kernel_name(k, n, activation, per_channel)]
    w = tvm.runtime.tensor(pack_tiles(w_t, spec.layout))
    outs = []
    for b in batches:
        y = tvm.runtime.tensor(np.zeros((b, n), np.float32))
        fn(tvm.runtime.tensor(x[:b]), w, tvm.runtime.tensor(gamma), tvm.runtime.tensor(bias), y)
        outs.append(y.numpy())
    return outs


def _host_runs(spec) -> bool:
    from tvm.target.codegen import target_has_features

    return all(target_has_features(f, HOST) for f in spec.features)


HOST_SPECS = [targets.kernel_spec(HOST), targets.kernel_spec(isa="generic"),
              # the AVX-512 VNNI tile shape (tiles16x4, 4 rows per block) through plain TIR
              dataclasses.replace(targets.kernel_spec(isa="generic"), tile_n=16, rows=4, vector=16),
              # the lookup-table kernels this CPU can run (x86: slower than the dot-product ones, kept exact)
              *[s for s in targets.KERNELS if s.method == "lut" and not s.isa.startswith("neon") and _host_runs(s)]]


@pytest.mark.parametrize("spec", HOST_SPECS, ids=lambda s: f"{s.isa}-{s.layout}-rows{s.rows}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}{s[2]}{'pc' if s[3] else ''}")
def test_host_kernels_are_bit_exact_with_the_reference(spec, shape):
    k, n, activation, per_channel = shape
    w_t, gamma, bias, x = _case(k, n, per_channel, seed=k + n)
    for b, out in zip(BATCHES, _run_host(spec, k, n, activation, per_channel, w_t, gamma, bias, x)):
        np.testing.assert_array_equal(out, _expected(x[:b], w_t, gamma, bias, activation), err_msg=f"batch {b}")


@pytest.mark.parametrize("spec", [targets.kernel_spec(HOST), *HOST_SPECS[3:]], ids=lambda s: s.isa)
@pytest.mark.parametrize("k", OVERFLOW_K)
def test_host_kernel_accumulators_do_not_overflow(k, spec):
    w_t, gamma, bias, x = _overflow_case(k)
    _, (_, s, acc) = quant.bitlinear_reference(x, w_t, gamma, bias, return_int=True)
    assert acc[0, 0] == 127 * k and acc[0, 1] == -127 * k and acc[3, 2] == 127 * k
    for b, out in zip(BATCHES, _run_host(spec, k, 16, "none", False, w_t, gamma, bias, x)):
        np.testing.assert_array_equal(out, quant.fma_f32(acc[:b].astype(np.float32), 1 / s[:b, None],
                                                         np.zeros((b, 16), np.float32)))


# GEMM panels (avx512-vnni; this CPU's kernel if it has AVX-512 VNNI and no AMX): blocks of 4 rows x 4, 2 or
# 1 output tiles (N / 16 a multiple of 4, of 2, odd) over the whole of K with the accumulators in registers,
# then single rows; K not a multiple of 16, and 16 (one K step: the per-step intrinsic instead); 1000 x 128
# is large enough to split its two groups of 4 output tiles across threads (kernels.PARALLEL_MIN_WORK)
PANEL_BATCHES = (4, 7, 8, 16, 19)
PANEL_SHAPES = [(1000, 128, "relu", False), (256, 32, "none", True), (80, 48, "none", False), (16, 64, "none", False)]
needs_panel = pytest.mark.skipif(not kernels.panel_used(targets.kernel_spec(HOST), 2),
                                 reason="this CPU's kernel has no GEMM panels")


@needs_panel
@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}{s[2]}{'pc' if s[3] else ''}")
def test_gemm_panels_are_bit_exact_with_the_reference(shape):
    k, n, activation, per_channel = shape
    spec = targets.kernel_spec(HOST)
    assert kernels.panel_tiles(n // 16) == {128: 4, 64: 4, 32: 2, 48: 1}[n] and kernels.panel_used(spec, -(-k // 16)) == (k > 16)
    w_t, gamma, bias, x = _case(k, n, per_channel, seed=k + n, rows=max(PANEL_BATCHES))
    knobs = kernels.Knobs(gemm_unroll=2) if k == 256 else kernels.DEFAULT_KNOBS  # the knob of the panel's K loop
    outs = _run_host(spec, k, n, activation, per_channel, w_t, gamma, bias, x, PANEL_BATCHES, knobs)
    for b, out in zip(PANEL_BATCHES, outs):
        np.testing.assert_array_equal(out, _expected(x[:b], w_t, gamma, bias, activation), err_msg=f"batch {b}")


def test_gemm_panels_keep_their_accumulators_in_registers(tmp_path):
    """The avx512-vnni panel loop (4 rows x 4 tiles x 4 planes = 64 vpdpbusd per K step) stores nothing;
    compiled for any AVX-512 VNNI CPU, so this runs on every x86 machine."""
    from bitrl_compile.bench.kernels import disassemble, inner_loops

    tvm_target = targets.tvm_target(targets.get_target("x86-avx512"))
    spec = targets.kernel_spec(tvm_target)
    assert kernels.panel_used(spec, 64)
    lib = tvm.compile(tvm.IRModule({"main": kernels.bitlinear_kernel(1024, 64, "none", spec=spec)}), target=tvm_target)
    lib.export_library(str(tmp_path / "panel.so"))
    loops = [lp for lp in inner_loops(disassemble(tmp_path / "panel.so", "objdump")) if lp["macs"] % (64 * 64) == 0]
    assert loops and all(lp["stores"] == 0 for lp in loops), loops


def test_gemm_panels_tune_only_their_unroll_and_keep_gemv_records_valid():
    from bitrl_compile.targets import tuning

    vnni, key = targets.kernel_spec(isa="avx512-vnni"), tuning.KernelKey(256, 256)
    assert [name for name, _ in tuning.knob_slots(tuning.workload(key, vnni, 8), vnni)] == ["gemm_unroll"]
    assert "bitrl.gemm" in tuning.workload(key, vnni, 8).attrs  # per-step GEMM records are stale
    assert "bitrl.gemm" not in tuning.workload(key, vnni, 1).attrs  # GEMV records are not
    assert "bitrl.gemm" not in tuning.workload(tuning.KernelKey(16, 64), vnni, 8).attrs  # one K step: no panel


# AMX (this CPU's kernel if it has AMX): tiles of 16 rows, then 4-row blocks, then single rows; K >= 128
# (kernels.AMX_MIN_STEPS), K not a multiple of 64 (zero-padded last tile product), 1 or 2 output tiles
# per intrinsic (N / 16 odd or even)
AMX_BATCHES = (16, 17, 21, 32, 37)
AMX_SHAPES = [(128, 32, "relu", False), (1000, 48, "none", True), (520, 96, "tanh", False)]
needs_amx = pytest.mark.skipif(targets.kernel_spec(HOST).amx_rows == 0, reason="this CPU has no AMX")


@needs_amx
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}{s[2]}{'pc' if s[3] else ''}")
def test_amx_tile_products_are_bit_exact_with_the_reference(shape):
    k, n, activation, per_channel = shape
    spec = targets.kernel_spec(HOST)
    assert kernels.amx_used(spec, -(-k // 16))
    w_t, gamma, bias, x = _case(k, n, per_channel, seed=k + n, rows=max(AMX_BATCHES))
    outs = _run_host(spec, k, n, activation, per_channel, w_t, gamma, bias, x, AMX_BATCHES)
    for b, out in zip(AMX_BATCHES, outs):
        want = _expected(x[:b], w_t, gamma, bias, activation)
        if activation == "tanh":  # TVM and numpy tanh may differ by an ulp
            np.testing.assert_allclose(out, want, rtol=0, atol=1e-6, err_msg=f"batch {b}")
        else:
            np.testing.assert_array_equal(out, want, err_msg=f"batch {b}")


@needs_amx
@pytest.mark.parametrize("k", OVERFLOW_K)
def test_amx_accumulators_do_not_overflow(k):
    spec = targets.kernel_spec(HOST)
    w_t, gamma, bias, x = _overflow_case(k, rows=max(AMX_BATCHES))
    _, (_, s, acc) = quant.bitlinear_reference(x, w_t, gamma, bias, return_int=True)
    for b, out in zip(AMX_BATCHES, _run_host(spec, k, 16, "none", False, w_t, gamma, bias, x, AMX_BATCHES)):
        np.testing.assert_array_equal(out, quant.fma_f32(acc[:b].astype(np.float32), 1 / s[:b, None],
                                                         np.zeros((b, 16), np.float32)))


@needs_amx
def test_amx_kernel_uses_tile_products_and_the_runtime_asks_for_the_tile_state(tmp_path):
    spec = targets.kernel_spec(HOST)
    lib = tvm.compile(tvm.IRModule({"main": kernels.bitlinear_kernel(256, 64, "relu", spec=spec)}), target=HOST)
    lib.export_library(str(tmp_path / "amx.so"))
    asm = subprocess.run(["objdump", "-d", str(tmp_path / "amx.so")], check=True, capture_output=True, text=True).stdout
    assert {"tdpbssd", "ldtilecfg", "tileloadd", "tilestored", "vpdpbusd"} <= set(re.findall(r"\t([a-z0-9]+)\s", asm))
    # a fresh process that only loads the library through our runtime can run the AMX tiles
    code = ("import numpy as np, sys; from bitrl_compile.runtime import tvm_runtime as rt; "
            "fn = rt.load_module(sys.argv[1])['bitrl_bitlinear_k256_n64_relu']; "
            "a = [rt.aligned(np.ones((32, 256), np.float32)), rt.aligned(np.full((4, 16, 16, 4), 0x55, np.uint8)), "
            "rt.aligned(np.ones(1, np.float32)), rt.aligned(np.zeros(64, np.float32)), "
            "rt.aligned(np.zeros((32, 64), np.float32))]; fn(*[rt.to_device(v) for v in a]); print(a[-1].sum())")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "amx.so")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert float(proc.stdout) == 0.0  # all weights 0 (code 1 everywhere), so relu(0 * x + 0) = 0


# ------------------------------------------------------------------------------------ aarch64 under qemu

def _arm_cases():
    cases = [(f"k{k}n{n}{act}", k, n, act, pc, _case(k, n, pc, seed=k * n)) for k, n, act, pc in SHAPES]
    cases += [(f"overflow{k}", k, 16, "none", False, _overflow_case(k)) for k in OVERFLOW_K]
    return cases


@pytest.fixture(scope="module", params=[("rasp4", None), ("rasp4", "neon"), ("rasp5", None)],
                ids=lambda p: f"{p[0]}-{p[1] or 'default'}")
def arm_build(request, tmp_path_factory):
    """Every ARM test kernel of one target (its default kernel or the one named), cross-compiled, and their
    disassembly."""
    from tvm.support import cc

    board, isa = request.param
    target = targets.get_target(board)
    tvm_target = targets.tvm_target(target)
    spec = targets.kernel_spec(tvm_target, isa=isa)
    folder = tmp_path_factory.mktemp(board)
    inputs, expected, asm = {}, {}, []
    for key, k, n, act, pc, (w_t, gamma, bias, x) in _arm_cases():
        lib = tvm.compile(tvm.IRModule({"main": kernels.bitlinear_kernel(k, n, act, pc, spec=spec)}), target=tvm_target)
        lib.export_library(str(folder / f"{key}.so"), fcompile=cc.cross_compiler(target.cc))
        asm.append(subprocess.run([shutil.which("aarch64-linux-gnu-objdump"), "-d", str(folder / f"{key}.so")],
                                  check=True, capture_output=True, text=True).stdout)
        path = str(folder / key)
        inputs.update({f"{path}/name": np.array(kernels.kernel_name(k, n, act, pc)), f"{path}/n": np.array(n),
                       f"{path}/batches": np.array(BATCHES), f"{path}/x": x, f"{path}/gamma": gamma,
                       f"{path}/bias": bias, f"{path}/w": pack_tiles(w_t, spec.layout)})
        expected.update({f"{path}/{b}": _expected(x[:b], w_t, gamma, bias, act) for b in BATCHES})
    np.savez(folder / "inputs.npz", **inputs)
    return target, spec, folder, expected, "\n".join(asm)


def test_arm_kernels_are_bit_exact_under_qemu(arm_build):
    from bitrl_compile.devices import run_python_under_qemu

    target, spec, folder, expected, _ = arm_build
    argv = f"import sys; sys.argv = ['-c', {str(folder / 'inputs.npz')!r}, {str(folder / 'out.npz')!r}]\n"
    proc = run_python_under_qemu(argv + GUEST_RUNNER, cpu=target.qemu_cpu, timeout=600, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(np.load(folder / "out.npz"))
    assert sorted(out) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(out[key], value, err_msg=f"{target.name} ({spec.isa}) {key}")


def test_arm_kernels_use_the_intended_instructions(arm_build):
    target, spec, _, _, asm = arm_build
    mnemonics = set(re.findall(r"^\s+[0-9a-f]+:\s+(?:[0-9a-f]{8}\s+)?([a-z][a-z0-9.]*)", asm, re.MULTILINE))
    if target.name == "rasp4":  # Cortex-A72: no dotprod; widening multiply-accumulate or table lookups
        assert not mnemonics & {"sdot", "udot", "usdot"}
        assert spec.isa in ("neon-lut", "neon")
        wanted = {"tbl", "zip1", "zip2"} if spec.isa == "neon-lut" else {"smull", "smlal", "sadalp"}
        assert wanted <= mnemonics, sorted(mnemonics)
    else:  # Cortex-A76
        assert spec.isa == "neon-dotprod"
        assert "sdot" in mnemonics


def test_x86_kernels_use_the_intended_instructions(tmp_path):
    for name, isa, wanted in (("x86-avx2", "avx2", {"vpmaddubsw", "vpmaddwd"}),
                              ("x86-avx512", "avx512-vnni", {"vpdpbusd"}),
                              ("x86-amx", "amx", {"tdpbssd", "ldtilecfg", "vpdpbusd"})):
        tvm_target = targets.tvm_target(targets.get_target(name))
        spec = targets.kernel_spec(tvm_target)
        assert spec.isa == isa
        lib = tvm.compile(tvm.IRModule({"main": kernels.bitlinear_kernel(256, 64, "relu", spec=spec)}),
                          target=tvm_target)
        lib.export_library(str(tmp_path / f"{name}.so"))
        asm = subprocess.run(["objdump", "-d", str(tmp_path / f"{name}.so")], check=True, capture_output=True,
                             text=True).stdout
        mnemonics = set(re.findall(r"^\s+[0-9a-f]+:\s+(?:[0-9a-f]{2} )+\s*([a-z][a-z0-9]*)", asm, re.MULTILINE))
        assert wanted <= mnemonics, (name, sorted(m for m in mnemonics if m.startswith("vp")))
