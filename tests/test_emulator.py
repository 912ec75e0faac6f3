"""aarch64 artifacts run here under qemu with a real aarch64 Python, and qemu enforces the CPU's ISA.

Needs qemu-aarch64 (Debian qemu-user) and aarch64-linux-gnu-g++/gcc; the first run builds the
aarch64 Python cache (about 20 s, see bitrl_compile/devices/sysroot.py).
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bitrl_compile import devices as emulator
from bitrl_compile import runtime
from bitrl_compile.devices import EmulatedPolicy, EmulatorError, run_python_under_qemu

RASP4 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}


@pytest.fixture(scope="session")
def aarch64_python() -> emulator.Aarch64Python:
    return emulator.ensure_aarch64_python()


@pytest.fixture(scope="session")
def weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def rasp4_artifact(tmp_path_factory, weights):
    """relu(x @ w) compiled for the Raspberry Pi 4 (Cortex-A72) and wrapped as a policy.bitrl."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 4), "float32"), w: R.Tensor((4, 3), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w))
                R.output(y)
            return y

    folder = tmp_path_factory.mktemp("rasp4")
    executable = tvm.compile(Module, target=tvm.target.Target(RASP4))
    executable.export_library(str(folder / "lib.so"), cc="aarch64-linux-gnu-g++")
    manifest = {"target": {"name": "rasp4", "arch": "aarch64"},
                "input": {"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None},
                "output": {"kind": "discrete", "n": 3, "outputs": "logits"},
                "params": ["w"]}
    members = {"lib.so": (folder / "lib.so").read_bytes(),
               "params.safetensors": runtime.safetensors_np.dumps({"w": weights})}
    return runtime.write_artifact(folder / "policy.bitrl", manifest, members)


@pytest.fixture(scope="session")
def emulated(aarch64_python, rasp4_artifact):
    with EmulatedPolicy(rasp4_artifact, cpu="cortex-a72") as policy:
        yield policy


def test_emulated_python_is_aarch64(aarch64_python):
    proc = run_python_under_qemu("import platform, sys; print(platform.machine(), sys.version_info[:2])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "aarch64"


def test_qemu_command_names_cpu_sysroot_and_runtime(aarch64_python):
    cmd = emulator.qemu_python_command("cortex-a76")
    assert cmd[1:3] == ["-cpu", "cortex-a76"]
    guest_root = Path(cmd[cmd.index("-L") + 1])
    assert (guest_root / "usr").resolve() == (aarch64_python.sysroot / "usr").resolve()
    assert f"BITRL_TVM_RUNTIME={aarch64_python.libtvm_runtime}" in cmd
    assert cmd[-1] == str(aarch64_python.python)


def test_emulated_forward_matches_numpy(emulated, weights):
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    expected = np.maximum(x @ weights, 0)
    np.testing.assert_allclose(emulated.forward(x), expected, rtol=1e-5, atol=1e-6)
    single = emulated.forward(x[2])
    assert single.shape == (3,)
    np.testing.assert_allclose(single, expected[2], rtol=1e-5, atol=1e-6)


def test_emulated_policy_exposes_manifest_and_obs_shape(emulated):
    assert emulated.obs_shape == (4,)
    assert emulated.manifest["target"]["name"] == "rasp4"


def test_emulated_act_returns_argmax(emulated, weights):
    x = np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)
    expected = np.argmax(np.maximum(x @ weights, 0), axis=-1)
    np.testing.assert_array_equal(emulated.act(x), expected)
    action = emulated.act(x[0])
    assert np.ndim(action) == 0 and int(action) == expected[0]


def test_emulated_sampled_act_is_repeatable_with_a_seeded_rng(emulated):
    x = np.random.default_rng(3).standard_normal((16, 4)).astype(np.float32)
    first = emulated.act(x, deterministic=False, rng=np.random.default_rng(7))
    again = emulated.act(x, deterministic=False, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (16,) and set(first.tolist()) <= {0, 1, 2}


def test_wrong_obs_shape_raises_the_runtime_valueerror(emulated):
    message = "observation has shape (5,); this policy expects (4,) or a batch (B, 4)"
    with pytest.raises(ValueError, match=re.escape(message)):
        emulated.forward(np.zeros(5, np.float32))
    assert emulated.forward(np.zeros(4, np.float32)).shape == (3,)  # still serving


def test_native_load_of_aarch64_artifact_points_to_qemu(rasp4_artifact):
    with pytest.raises(runtime.ArtifactError, match="qemu"):
        runtime.load(rasp4_artifact)


def test_emulated_load_error_reaches_the_caller(aarch64_python, tmp_path):
    broken = tmp_path / "broken.bitrl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(runtime.ArtifactError, match="not a policy.bitrl artifact"):
        EmulatedPolicy(broken)


def test_closed_emulated_policy_refuses_calls(aarch64_python, rasp4_artifact):
    policy = EmulatedPolicy(rasp4_artifact)
    policy.close()
    with pytest.raises(EmulatorError, match="closed"):
        policy.forward(np.zeros(4, np.float32))


SDOT_C = """
#include <arm_neon.h>
int dot16(const signed char *a, const signed char *b) {
    return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), vld1q_s8(a), vld1q_s8(b)));
}
"""


def test_sdot_sigills_on_cortex_a72_and_runs_on_cortex_a76(aarch64_python, tmp_path):
    (tmp_path / "sdot.c").write_text(SDOT_C)
    lib = tmp_path / "sdot.so"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-march=armv8.2-a+dotprod", "-shared", "-fPIC",
                    "-o", str(lib), str(tmp_path / "sdot.c")], check=True)
    disassembly = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True,
                                 text=True, check=True).stdout
    assert re.search(r"\bsdot\b", disassembly)
    code = (f"import ctypes\nlib = ctypes.CDLL({str(lib)!r})\n"
            "a = (ctypes.c_byte * 16)(*range(16)); b = (ctypes.c_byte * 16)(*[2] * 16)\n"
            "print(lib.dot16(a, b))")
    pi4 = run_python_under_qemu(code, cpu="cortex-a72", cwd=tmp_path)
    assert pi4.returncode == -signal.SIGILL, (pi4.returncode, pi4.stderr)
    pi5 = run_python_under_qemu(code, cpu="cortex-a76", cwd=tmp_path)
    assert pi5.returncode == 0, pi5.stderr
    assert pi5.stdout.strip() == str(2 * sum(range(16)))


def test_guest_proc_cpuinfo_lists_the_emulated_cpus_features(aarch64_python):
    code = "print(next(line for line in open('/proc/cpuinfo') if line.startswith('Features')))"
    pi4 = run_python_under_qemu(code, cpu="cortex-a72")
    pi5 = run_python_under_qemu(code, cpu="cortex-a76")
    assert pi4.returncode == 0 and pi5.returncode == 0, pi4.stderr + pi5.stderr
    pi4_features, pi5_features = pi4.stdout.split(":")[1].split(), pi5.stdout.split(":")[1].split()
    assert "asimd" in pi4_features and "asimddp" not in pi4_features and "atomics" not in pi4_features
    assert {"asimd", "asimddp", "atomics", "fphp"} <= set(pi5_features)
    assert emulator.cpu_features("cortex-a76") == pi5_features


def test_unknown_cpu_model_is_one_clear_error(aarch64_python):
    with pytest.raises(EmulatorError, match="cpu help"):
        emulator.qemu_python_command("cortex-z9")


def test_emulated_policy_loads_an_artifact_that_requires_asimd(aarch64_python, rasp4_artifact, tmp_path):
    art = runtime.read_artifact(rasp4_artifact)
    manifest = dict(art.manifest, target=dict(art.manifest["target"], cpu_features=["asimd"]))
    path = runtime.write_artifact(tmp_path / "asimd.bitrl", manifest, art.members)
    with EmulatedPolicy(path) as policy:
        assert policy.forward(np.ones(4, np.float32)).shape == (3,)
