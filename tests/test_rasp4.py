"""rasp4 (Cortex-A72, ARMv8.0): cross-compiled artifacts contain no dotprod/LSE instructions and,
run under `qemu-aarch64 -cpu cortex-a72`, equal the numpy reference."""

import re
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

from bitrl_compile import pipeline, reference
from bitrl_compile.devices import EmulatedPolicy
from bitrl_compile.frontends import load_policy
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import ArtifactError, load
from relax_models import mlp, observations

# ARMv8.1+ instructions a Cortex-A72 lacks: dot product, LSE atomics, RDMA, fp16 arithmetic.
FORBIDDEN = re.compile(r"\s(sdot|udot|usdot|ldadd\w*|ldclr\w*|ldeor\w*|ldset\w*|ldsmax\w*|ldumax\w*|"
                       r"ldsmin\w*|ldumin\w*|swp\w*|cas\w*|stadd\w*|sqrdmlah|sqrdmlsh)\s")
FP16_ARITH = re.compile(r"\s(fadd|fmul|fmla|fsub)\s+v\d+\.\d*h")


def _loaded(module, k, output):
    return LoadedPolicy(module=module, onnx_model=None,
                        input={"shape": [k], "dtype": "float32", "preprocess": "none", "normalize": None},
                        output=output, source="test-mlp")


@pytest.fixture(scope="module")
def relu_rasp4(tmp_path_factory):
    out = tmp_path_factory.mktemp("rasp4") / "relu.bitrl"
    return pipeline.compile_policy(_loaded(mlp((6, 96, 64, 4), "relu"), 6,
                                           {"kind": "discrete", "n": 4, "outputs": "logits"}), "rasp4", out)


def _disassemble(artifact, tmp_path) -> str:
    lib = tmp_path / "lib.so"
    with zipfile.ZipFile(artifact) as z:
        lib.write_bytes(z.read("lib.so"))
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "apt-get install binutils-aarch64-linux-gnu"
    return subprocess.run([objdump, "-d", str(lib)], check=True, capture_output=True, text=True).stdout


def test_rasp4_library_is_aarch64_and_has_no_dotprod_or_lse(relu_rasp4, tmp_path):
    asm = _disassemble(relu_rasp4.path, tmp_path)
    assert "file format elf64-littleaarch64" in asm
    assert "bitrl_bitlinear_k6_n96_relu" in asm  # our kernels are in there
    bad = sorted({m.group(1) for m in FORBIDDEN.finditer(asm)} | {m.group(1) for m in FP16_ARITH.finditer(asm)})
    assert not bad, f"instructions a Cortex-A72 cannot run: {bad}"


def test_rasp4_artifact_is_bit_exact_with_the_reference_under_qemu(relu_rasp4):
    x = observations(300, 6)
    with EmulatedPolicy(relu_rasp4.path, cpu="cortex-a72") as policy:
        out = policy.forward(x)
        single = policy.act(x[7])
    np.testing.assert_array_equal(out, reference.run(relu_rasp4.quantized, x))
    assert single == out[7].argmax()


def test_rasp4_artifact_refuses_to_load_natively_and_says_how(relu_rasp4):
    with pytest.raises(ArtifactError, match="qemu-aarch64"):
        load(relu_rasp4.path)


def test_sb3_ppo_cartpole_on_host_and_rasp4_matches_the_reference(sb3_ppo_cartpole, cartpole_obs, tmp_path):
    """SB3's PPO uses Tanh: TVM's tanh and numpy's differ by an ulp, so the float outputs are compared with
    a tolerance of 1e-3 of their range and the actions exactly (bar exact ties)."""
    loaded = load_policy(sb3_ppo_cartpole)
    x = np.concatenate([cartpole_obs, observations(64, 4)])
    outputs = {}
    for target in ("host", "rasp4"):
        result = pipeline.compile_policy(loaded, target, tmp_path / f"{target}.bitrl")
        if target == "host":
            outputs[target] = load(result.path).forward(x)
        else:
            with EmulatedPolicy(result.path) as policy:
                outputs[target] = policy.forward(x)
        expected = reference.run(result.quantized, x)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(outputs[target], expected, rtol=0, atol=1e-3 * scale)
        margin = np.abs(expected[:, 0] - expected[:, 1]) > 2e-3 * scale
        np.testing.assert_array_equal(outputs[target].argmax(1)[margin], expected.argmax(1)[margin])
    np.testing.assert_allclose(outputs["host"], outputs["rasp4"], rtol=0, atol=1e-3 * np.abs(outputs["host"]).max())


def test_bundled_aarch64_runtime_needs_only_tvm_ffi_and_numpy(tmp_path):
    from bitrl_compile.devices import run_python_under_qemu

    loaded = _loaded(mlp((6, 32, 4), "relu"), 6, {"kind": "discrete", "n": 4, "outputs": "logits"})
    result = pipeline.compile_policy(loaded, "rasp4", tmp_path / "b.bitrl", bundle_runtime=True)
    code = ("import os, sys, numpy as np\n"
            "os.environ.pop('BITRL_TVM_RUNTIME', None)  # the guest has tvm-ffi and numpy, no apache-tvm\n"
            "from bitrl_compile.runtime import load\n"
            f"out = load({str(result.path)!r}).forward(np.arange(12, dtype=np.float32).reshape(2, 6))\n"
            "assert 'tvm' not in sys.modules\n"
            "print(out.tobytes().hex())\n")
    r = run_python_under_qemu(code, cpu="cortex-a72")
    assert r.returncode == 0, r.stderr
    expected = reference.run(result.quantized, np.arange(12, dtype=np.float32).reshape(2, 6))
    assert bytes.fromhex(r.stdout.strip().splitlines()[-1]) == expected.astype(np.float32).tobytes()
