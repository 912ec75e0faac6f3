"""The rasp4 kernel's GEMM rows (targets/gemm_neon.py: batch >= 8, int16 `mla` by element on register blocks of
8 rows x 16 channels) equal the numpy reference bit for bit under `qemu-aarch64 -cpu cortex-a72` and a76, across
the lookup-table path's batches (< 8), full blocks, the 4/2/1-row tails, K and N tails, per-channel scales, a fused
ReLU and the int16 chunks (all activations +-127 against all-+1 / all--1 rows at K = 4096); its inner loop
keeps the accumulators in registers (no stores) and uses `mla`, never a dot product."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from kernel_guest import GUEST_RUNNER

from bitrl_compile import quant, targets
from bitrl_compile.quant import apply_activation
from bitrl_compile.runtime.weights import pack_tiles
from bitrl_compile.targets import gemm_neon, kernels

BATCHES = (7, 8, 15, 22)  # lookup tables only; one block; block + 4 + 2 + 1; 2 blocks + 4 + 2
SHAPES = [(100, 37, "relu", True), (64, 48, "none", True), (520, 24, "none", False)]  # 520: 5 chunks of 104
OVERFLOW_K = 4096
def _case(k, n, per_channel, seed):
    rng = np.random.default_rng(seed)
    w_t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    gamma = rng.uniform(0.01, 2, n if per_channel else 1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = (rng.standard_normal((max(BATCHES), k)) * rng.uniform(0.01, 10, (max(BATCHES), 1))).astype(np.float32)
    x[0] = 0  # the absmax epsilon
    x[3, ::7] = 0.5 * np.abs(x[3]).max() * np.sign(x[3, ::7])  # exact .5 products: round half to even
    return w_t, gamma, bias, x


def _overflow_case(k):
    n = 16
    w_t = np.where(np.arange(k)[None, :] % 2 == np.arange(n)[:, None] % 2, 1, -1).astype(np.int8)
    w_t[0], w_t[1] = 1, -1
    x = np.where(np.random.default_rng(k).random((max(BATCHES), k)) < 0.5, -1, 1).astype(np.float32)
    x[0], x[1] = 1, -1
    x[9] = np.where(w_t[2] > 0, 1, -1)
    return w_t, np.ones(1, np.float32), np.zeros(n, np.float32), x


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tvm.support import cc

    target = targets.get_target("rasp4")
    tvm_target = targets.tvm_target(target)
    spec = targets.kernel_spec(tvm_target)
    assert gemm_neon.supports(spec)
    folder = tmp_path_factory.mktemp("gemm_neon")
    cases = [(f"k{k}n{n}{a}", k, n, a, pc, _case(k, n, pc, k * n)) for k, n, a, pc in SHAPES]
    cases.append((f"overflow{OVERFLOW_K}", OVERFLOW_K, 16, "none", False, _overflow_case(OVERFLOW_K)))
    inputs, expected, asm = {}, {}, []
    for key, k, n, act, pc, (w_t, gamma, bias, x) in cases:
        lib = tvm.compile(tvm.IRModule({"main": kernels.bitlinear_kernel(k, n, act, pc, spec=spec)}),
                          target=tvm_target)
        lib.export_library(str(folder / f"{key}.so"), fcompile=cc.cross_compiler(target.cc))
        if key.startswith("k520"):
            asm = subprocess.run([shutil.which("aarch64-linux-gnu-objdump"), "-d", "--no-show-raw-insn",
                                  str(folder / f"{key}.so")], check=True, capture_output=True, text=True).stdout
        path = str(folder / key)
        inputs.update({f"{path}/name": np.array(kernels.kernel_name(k, n, act, pc)), f"{path}/n": np.array(n),
                       f"{path}/batches": np.array(BATCHES), f"{path}/x": x, f"{path}/gamma": gamma,
                       f"{path}/bias": bias, f"{path}/w": pack_tiles(w_t, spec.layout)})
        expected.update({f"{path}/{b}": apply_activation(quant.bitlinear_reference(x[:b], w_t, gamma, bias), act)
                         for b in BATCHES})
    np.savez(folder / "inputs.npz", **inputs)
    return folder, expected, asm


@pytest.mark.parametrize("cpu", ["cortex-a72", "cortex-a76"])
def test_gemm_rows_are_bit_exact_under_qemu(built, cpu):
    from bitrl_compile.devices import run_python_under_qemu

    folder, expected, _ = built
    argv = f"import sys; sys.argv = ['-c', {str(folder / 'inputs.npz')!r}, {str(folder / cpu)!r}]\n"
    proc = run_python_under_qemu(argv + GUEST_RUNNER, cpu=cpu, timeout=600, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(np.load(folder / f"{cpu}.npz"))
    assert sorted(out) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(out[key], value, err_msg=f"{cpu} {key}")


def test_inner_loop_is_mla_by_element_on_register_accumulators(built):
    from bitrl_compile.bench import kernels as bench_kernels

    assert bench_kernels.DOT_MACS["mla"] == 8  # 8 int16 lanes per `mla v.8h`
    inner_loops = bench_kernels.inner_loops
    _, _, asm = built
    insns = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in
             re.finditer(r"^\s+([0-9a-f]+):\s+([a-z][\w.]*)\s*(.*)$", asm, re.MULTILINE)]
    ops = {op for _, op, _ in insns}
    assert not ops & {"sdot", "udot", "usdot"}  # a Cortex-A72 has no dot product
    loops = [(i, lp) for i, lp in enumerate(inner_loops(insns)) if "mla" in lp["dot_instructions"]]
    assert loops and all(lp["stores"] == 0 for _, lp in loops)  # the int16 accumulators never leave registers
    big = max(lp["macs"] for _, lp in loops)
    assert any(lp["macs"] == big and lp["per_1000_macs"] <= 160 for _, lp in loops), loops
    assert re.search(r"\bmla\s+v\d+\.8h, v\d+\.8h, v\d+\.h\[\d\]", asm)  # by element: no dup per activation
    assert "tbl" in ops  # the weight decode (and the lookup-table path for small batches)


def test_chunks_fit_int16():
    for kp in (8, 104, 520, 2560, 6912, 8 * 37):
        c = gemm_neon.chunk(kp)
        assert kp % c == 0 and c % 8 == 0 and c <= 256 and c * 127 < 2 ** 15
