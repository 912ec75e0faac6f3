"""Mixed precision (issue 14): int8 layers beside ternary ones.

The int8 kernel (targets/int8_kernels.py) equals `quant.bitlinear_reference` bit for bit on x86; an artifact with
--int8-layers first,last keeps those layers' weights as int8 tensors, runs on the host (Python runtime and C API
give the same outputs, equal to the numpy reference) and on rasp4 under qemu; `auto` picks the layer that matters
on a constructed case; bad --int8-layers values are one line and exit 1."""

from __future__ import annotations

import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from click.testing import CliRunner

from bitrl_compile import pipeline, precision, quant, reference, targets
from bitrl_compile.cli import main as cli_main
from bitrl_compile.cli.capi import capi_cmd
from bitrl_compile.devices import EmulatedPolicy
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import ArtifactError, load, safetensors_np
from bitrl_compile.targets import int8_kernels
from capi_lib import open_libbitrl
from relax_models import mlp, observations
from sealing import sealed

ROOT = Path(__file__).resolve().parents[1]
HOST = targets.tvm_target(targets.get_target("host"))


def _loaded(module, k, output):
    return LoadedPolicy(module=module, onnx_model=None,
                        input={"shape": [k], "dtype": "float32", "preprocess": "none", "normalize": None},
                        output=output, source="test-mlp")


DISCRETE = {"kind": "discrete", "n": 4, "outputs": "q_values"}


# ------------------------------------------------------------------------------------------------ the kernel

@pytest.mark.parametrize("spec", [targets.kernel_spec(HOST), targets.kernel_spec(None)], ids=lambda s: s.isa)
@pytest.mark.parametrize("k,n,activation", [(7, 5, "relu"), (100, 37, "none"), (256, 64, "none"),
                                            (512, 256, "relu")])
def test_int8_kernel_is_bit_exact_with_the_reference(spec, k, n, activation):
    func = int8_kernels.int8_kernel(k, n, activation, spec)
    fn = tvm.compile(tvm.IRModule({"main": func}), target=HOST)[int8_kernels.int8_kernel_name(k, n, activation)]
    rng = np.random.default_rng(k + n)
    w_q, scale = quant.quantize_weight_int8(rng.standard_normal((n, k)).astype(np.float32))
    w_q[0] = 127  # the largest accumulators: +-127 weights against +-127 activations
    w_q[-1] = -127
    bias = rng.standard_normal(n).astype(np.float32)
    for batch in (1, 3, 9):
        x = (rng.standard_normal((batch, k)) * rng.uniform(0.01, 10, (batch, 1))).astype(np.float32)
        x[0] = 0 if batch > 1 else x[0]  # the absmax epsilon
        y = tvm.runtime.tensor(np.zeros((batch, n), np.float32))
        fn(*(tvm.runtime.tensor(a) for a in (x, w_q, scale, bias)), y)
        want = quant.apply_activation(quant.bitlinear_reference(x, w_q, scale, bias), activation)
        np.testing.assert_array_equal(y.numpy(), want, err_msg=f"batch {batch}")


# ------------------------------------------------------------------------------------------------ artifacts

@pytest.fixture(scope="module")
def mixed_host(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    loaded = _loaded(mlp((6, 96, 64, 4), "relu"), 6, DISCRETE)
    return pipeline.compile_policy(loaded, "host", folder / "mixed.bitrl", int8_layers=[0, -1])


def test_int8_layers_are_int8_tensors_and_the_manifest_says_so(mixed_host):
    layers = mixed_host.manifest["layers"]
    assert [la["precision"] for la in layers] == ["int8", "ternary", "int8"]
    assert [la["shape"] for la in layers] == [[96, 6], [64, 96], [4, 64]]
    assert [la["bytes"] for la in layers] == [96 * 6, 64 * 20, 4 * 64]  # int8 as is; base-3 5 trits a byte
    with zipfile.ZipFile(mixed_host.path) as z:
        params, _ = safetensors_np.loads(z.read("params.safetensors"))
    int8 = {name: v.shape for name, v in params.items() if v.dtype == np.int8}
    assert sorted(int8.values()) == [(4, 64), (96, 6)]
    assert not set(int8) & set(mixed_host.manifest["weights"])  # not base-3 packed, nothing to unpack
    assert mixed_host.manifest["stats"]["int8_weights"] == 96 * 6 + 4 * 64
    assert mixed_host.manifest["stats"]["ternary_weights"] == 64 * 96


def test_host_artifact_equals_the_reference_and_the_c_api(mixed_host, tmp_path):
    x = observations(100, 6)
    with load(mixed_host.path) as policy:
        out = policy.forward(x)
    np.testing.assert_array_equal(out, reference.run(mixed_host.quantized, x))
    flags = shlex.split(CliRunner().invoke(capi_cmd, ["--target", "host", "--cflags", "--libs"]).stdout
                        .strip().splitlines()[-1])
    exe = tmp_path / "control_loop"
    subprocess.run(["cc", "-std=c11", "-O2", str(ROOT / "examples" / "c" / "control_loop.c"), "-o", str(exe), *flags],
                   check=True, capture_output=True, text=True)
    lines = "".join(" ".join(f"{float(v):.9g}" for v in row) + "\n" for row in x)
    run = subprocess.run([str(exe), "--forward", str(mixed_host.path)], input=lines, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.array([[np.float32(v) for v in line.split()] for line in run.stdout.splitlines()]),
                                  out)


def test_rasp4_artifact_with_int8_layers_equals_the_reference_under_qemu(tmp_path):
    loaded = _loaded(mlp((6, 64, 4), "relu"), 6, DISCRETE)
    result = pipeline.compile_policy(loaded, "rasp4", tmp_path / "mixed.bitrl", int8_layers=[0, -1])
    assert [la["precision"] for la in result.manifest["layers"]] == ["int8", "int8"]
    x = observations(40, 6)
    with EmulatedPolicy(result.path, cpu="cortex-a72") as policy:
        np.testing.assert_array_equal(policy.forward(x), reference.run(result.quantized, x))
    lib = tmp_path / "lib.so"
    with zipfile.ZipFile(result.path) as z:
        lib.write_bytes(z.read("lib.so"))
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], check=True, capture_output=True,
                         text=True).stdout
    assert "bitrl_int8linear_k64_n4_none" in asm and not re.search(r"\s(sdot|udot|usdot)\s", asm)  # A72: no dotprod


# ------------------------------------------------------------------------------------------------ auto

def _last_layer_matters():
    """Layers 0 and 1 are +-a (ternary loses nothing); the last layer's rows share one big common component and
    differ by small amounts: per-tensor ternary rounds the differences away (the actions collapse), per-channel
    int8 keeps them (a Q-network with small gaps between actions, as SB3's DQN on CartPole)."""
    m = mlp((6, 64, 64, 4), "relu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight.copy_(0.3 * torch.sign(torch.randn(lin.weight.shape, generator=g)))
        m[4].weight.copy_(torch.randn(1, 64, generator=g) + 0.2 * torch.randn(4, 64, generator=g))
    return _loaded(m, 6, DISCRETE)


def test_auto_picks_the_layer_that_matters():
    loaded = _last_layer_matters()
    choice = pipeline.auto_int8_layers(loaded)
    assert choice.ranking[0]["index"] == 2 and choice.ranking[0]["gain"] > 0.1
    assert choice.layers == [2] and choice.reached
    assert choice.errors[0] > 0.2 and choice.error <= precision.TOLERANCE


def test_auto_keeps_all_ternary_when_it_is_within_the_tolerance():
    m = mlp((6, 64, 4), "relu")
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight.copy_(0.3 * torch.sign(lin.weight))
    choice = pipeline.auto_int8_layers(_loaded(m, 6, DISCRETE))
    assert choice.layers == [] and choice.reached


def test_parse_int8_layers():
    assert precision.parse_int8_layers("first,last") == [0, -1]
    assert precision.parse_int8_layers(" 0, 2 ") == [0, 2]
    assert precision.parse_int8_layers("AUTO") == "auto"
    for bad in ("", "x", "1,,2", "-1", "first;last"):
        with pytest.raises(ValueError, match="--int8-layers"):
            precision.parse_int8_layers(bad)


# ------------------------------------------------------------------------------------------------ the command line

@pytest.fixture(scope="module")
def dqn_zip(sb3_trained):
    """A tiny SB3 DQN on CartPole (3 linear layers: 4 -> 64 -> 64 -> 2, ReLU)."""
    return sb3_trained("dqn", "CartPole-v1").path


def test_cli_int8_layers_and_inspect(dqn_zip, tmp_path):
    out = tmp_path / "dqn.bitrl"
    r = CliRunner().invoke(cli_main, [str(dqn_zip), "--int8-layers", "first,last", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli_main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if line.strip().startswith("bitlinear")]
    assert [row[5] for row in rows] == ["int8", "ternary", "int8"], r.output
    assert "256 bytes" in r.output and "int8 weights" in r.output  # layer 0: 64 x 4 int8 weights


def test_cli_int8_layers_auto_measures_on_the_states_of_the_env(dqn_zip, tmp_path):
    out = tmp_path / "auto.bitrl"
    r = CliRunner().invoke(cli_main, [str(dqn_zip), "--int8-layers", "auto", "--env", "CartPole-v1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    line = next(line for line in r.output.splitlines() if "int8 layers (auto, on" in line)
    assert "observations)" in line and "relative error removed per layer" in line
    assert out.exists()


@pytest.mark.parametrize("value,message", [("7", "int8 layer 7 does not exist: the policy has 3 linear layer"),
                                           ("garbage", "'garbage' is not a layer")])
def test_cli_bad_int8_layers_are_one_line_and_exit_1(dqn_zip, tmp_path, value, message):
    out = tmp_path / "x.bitrl"
    r = CliRunner().invoke(cli_main, [str(dqn_zip), "--int8-layers", value, "-o", str(out)])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("bitrl-compile: error")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert not out.exists()


def _layer0(m):
    return m["layers"][0]


MALFORMED = [(lambda m: _layer0(m).update(precision="int4"), "layers[0].precision"),
             (lambda m: _layer0(m).update(bytes=-1), "layers[0].bytes"),
             (lambda m: _layer0(m).update(index="0"), "layers[0].index"),
             (lambda m: _layer0(m).update(shape=[4]), "layers[0].shape")]


def test_both_readers_check_the_layer_fields_and_keep_them_optional(mixed_host, tmp_path):
    lib = open_libbitrl()
    for i, (edit, field) in enumerate(MALFORMED):
        path = sealed(mixed_host.path, tmp_path / f"bad{i}.bitrl", edit)
        with pytest.raises(ArtifactError, match=re.escape(f"manifest {field}")):
            load(path)
        assert not lib.bitrl_load(str(path).encode())
        error = lib.bitrl_last_error().decode()
        assert f"manifest {field}" in error and "\n" not in error, error

    def old(m):  # an artifact of before mixed precision: no index, shape, precision, bytes
        m["layers"] = [{k: v for k, v in la.items() if k not in ("index", "shape", "precision", "bytes")}
                       for la in m["layers"]]
        m["stats"].pop("int8_weights")

    path = sealed(mixed_host.path, tmp_path / "old.bitrl", old)
    x = observations(8, 6)
    with load(path) as policy:
        np.testing.assert_array_equal(policy.forward(x), reference.run(mixed_host.quantized, x))
    handle = lib.bitrl_load(str(path).encode())
    assert handle, lib.bitrl_last_error()
    lib.bitrl_free(handle)
