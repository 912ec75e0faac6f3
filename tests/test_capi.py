"""The C API (runtime/capi, bitrl.h): built with `bitrl-compile capi`'s flags, it gives the Python runtime's actions
and bit-identical forward outputs, on the host and cross-built for rasp4 under qemu; bad input is -1/NULL and one
line of bitrl_last_error(), never an abort; one policy is safe from 8 threads at once."""

import ctypes
import hashlib
import json
import math
import shlex
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from bitrl_compile import pipeline
from bitrl_compile.cli.capi import capi_cmd
from bitrl_compile.devices import EmulatedPolicy
from bitrl_compile.devices.capi import CFLAGS, run_under_qemu, source_dir, tvm_ffi_include
from bitrl_compile.frontends import load_policy
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import load, safetensors_np
from relax_models import mlp

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bitrl_compile" / "examples" / "cartpole_ppo.safetensors"
EXAMPLE = ROOT / "examples" / "c" / "control_loop.c"
THREADS = Path(__file__).resolve().parent / "capi_threads.c"
NEEDED_OK = {"libc.so.6", "libz.so.1", "libm.so.6", "libdl.so.2", "libpthread.so.0"}


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("capi")
    loaded = load_policy(DEMO)
    box = LoadedPolicy(  # a Box policy: normalisation in, tanh squash and rescaling out, Gaussian sampling
        module=mlp((3, 32, 2), "relu"), onnx_model=None, source="test-box",
        input={"shape": [3], "dtype": "float32", "preprocess": "none",
               "normalize": {"mean": [0.1, -0.2, 0.3], "var": [1.5, 0.5, 2.0], "eps": 1e-8, "clip": 5.0}},
        output={"kind": "continuous", "shape": [2], "low": [-2.0, -1.0], "high": [2.0, 1.0], "squash": "tanh",
                "log_std": [-0.5, -1.0]})
    return SimpleNamespace(host=pipeline.compile_policy(loaded, "host", folder / "host.bitrl").path,
                           rasp4=pipeline.compile_policy(loaded, "rasp4", folder / "rasp4.bitrl").path,
                           box=pipeline.compile_policy(box, "host", folder / "box.bitrl").path)


def _flags(target: str) -> list[str]:
    result = CliRunner().invoke(capi_cmd, ["--target", target, "--cflags", "--libs"])
    assert result.exit_code == 0, result.output
    return shlex.split(result.stdout.strip().splitlines()[-1])


def _cc(compiler: str, source: Path, out: Path, flags: list[str]) -> Path:
    subprocess.run([compiler, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", str(source), "-o", str(out), *flags,
                    "-lpthread"], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("capi-host")
    flags = _flags("host")
    libdir = Path(next(f[2:] for f in flags if f.startswith("-L")))
    return SimpleNamespace(lib=libdir / "libbitrl.so", control_loop=_cc("cc", EXAMPLE, folder / "control_loop", flags),
                           threads=_cc("cc", THREADS, folder / "capi_threads", flags))


@pytest.fixture(scope="module")
def python_policy(artifacts):
    """The Python runtime's policy; loaded before libbitrl in this process, so TVM's libraries come first."""
    with load(artifacts.host) as policy:
        yield policy


@pytest.fixture(scope="module")
def capi(host_build, python_policy):
    lib = ctypes.CDLL(str(host_build.lib))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.bitrl_load.restype, lib.bitrl_load.argtypes = p, [ctypes.c_char_p]
    lib.bitrl_last_error.restype = ctypes.c_char_p
    for name in ("bitrl_obs_size", "bitrl_output_size", "bitrl_action_size", "bitrl_max_batch"):
        getattr(lib, name).restype, getattr(lib, name).argtypes = i64, [p]
    lib.bitrl_is_discrete.argtypes = lib.bitrl_has_sample.argtypes = lib.bitrl_free.argtypes = [p]
    lib.bitrl_act.argtypes = lib.bitrl_forward.argtypes = [p, p, i64, p]
    lib.bitrl_sample.argtypes = [p, p, p, i64, p]
    return lib


@pytest.fixture(scope="module")
def policy(capi, artifacts):
    handle = capi.bitrl_load(str(artifacts.host).encode())
    assert handle, capi.bitrl_last_error()
    yield handle
    capi.bitrl_free(handle)


def _error(capi) -> str:
    return capi.bitrl_last_error().decode()


def _lines(obs: np.ndarray) -> str:
    return "".join(" ".join(f"{float(v):.9g}" for v in row) + "\n" for row in obs)


# ------------------------------------------------------------------------------------------ the library

def test_library_links_no_tvm_and_builds_warning_free(host_build, tmp_path):
    dynamic = subprocess.run(["readelf", "-d", str(host_build.lib)], check=True, capture_output=True, text=True).stdout
    needed = {line.split("[")[1].split("]")[0] for line in dynamic.splitlines() if "(NEEDED)" in line}
    needed = {name for name in needed if not name.startswith("ld-linux")}  # the dynamic loader: thread-locals
    assert needed <= NEEDED_OK, f"libbitrl links more than libc/zlib/libm: {needed - NEEDED_OK}"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(host_build.lib)], check=True, capture_output=True,
                             text=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines()}
    assert {"bitrl_load", "bitrl_act", "bitrl_forward", "bitrl_free", "TVMFFIErrorSetRaisedFromCStrParts"} <= exported
    assert not [s for s in exported if s.startswith(("json_", "bitrl_zip", "bitrl_sha"))], "internals are exported"
    sources = [str(source_dir() / s) for s in ("bitrl.c", "json.c", "params.c", "sha256.c", "zip.c")]
    subprocess.run(["cc", *CFLAGS, "-Werror", "-shared", f"-I{tvm_ffi_include()}", *sources, "-o",
                    str(tmp_path / "libbitrl.so"), "-lz", "-ldl", "-lm"], check=True, capture_output=True, text=True)


def test_sha256_matches_hashlib(tmp_path):
    main = tmp_path / "sha.c"
    main.write_text('#include <stdio.h>\n#include <stdlib.h>\n#include "internal.h"\n'
                    "int main(void) { static unsigned char buf[1 << 16]; size_t n = fread(buf, 1, sizeof buf, stdin);\n"
                    "char hex[65]; bitrl_sha256_hex(buf, n, hex); puts(hex); return 0; }\n")
    exe = tmp_path / "sha"
    subprocess.run(["cc", "-std=c11", f"-I{source_dir()}", f"-I{tvm_ffi_include()}", str(main),
                    str(source_dir() / "sha256.c"), "-o", str(exe)], check=True, capture_output=True)
    rng = np.random.default_rng(0)
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 65535):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        out = subprocess.run([str(exe)], input=data, capture_output=True, check=True).stdout.decode().strip()
        assert out == hashlib.sha256(data).hexdigest(), f"sha256 of {n} bytes"


# ------------------------------------------------------------------------------- results equal Python's

def test_control_loop_actions_and_outputs_equal_the_python_runtime(host_build, artifacts, python_policy, cartpole_obs):
    run = subprocess.run([str(host_build.control_loop), str(artifacts.host)], input=_lines(cartpole_obs),
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.array(run.stdout.split(), np.int64), python_policy.act(cartpole_obs))
    run = subprocess.run([str(host_build.control_loop), "--forward", str(artifacts.host)],
                         input=_lines(cartpole_obs), capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    out = np.array([[np.float32(v) for v in line.split()] for line in run.stdout.splitlines()])
    np.testing.assert_array_equal(out, python_policy.forward(cartpole_obs))


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_forward_act_and_sample_are_bit_identical_to_python(capi, policy, python_policy, cartpole_obs, batch):
    obs = np.ascontiguousarray(cartpole_obs[:batch])
    out = np.zeros((batch, capi.bitrl_output_size(policy)), np.float32)
    actions = np.full(batch, -1, np.int64)
    assert capi.bitrl_forward(policy, obs.ctypes.data, batch, out.ctypes.data) == 0, _error(capi)
    assert capi.bitrl_act(policy, obs.ctypes.data, batch, actions.ctypes.data) == 0, _error(capi)
    np.testing.assert_array_equal(out, python_policy.forward(obs))
    np.testing.assert_array_equal(actions, python_policy.act(obs))
    assert capi.bitrl_obs_size(policy) == 4 and capi.bitrl_action_size(policy) == 1 and capi.bitrl_is_discrete(policy) == 1
    assert capi.bitrl_has_sample(policy) == 1  # the demo samples (PPO logits): from the caller's uniform noise
    noise = np.random.default_rng(batch).random((batch, 1))
    sampled = np.full(batch, -1, np.int64)
    assert capi.bitrl_sample(policy, obs.ctypes.data, noise.astype(np.float32).ctypes.data, batch,
                             sampled.ctypes.data) == 0, _error(capi)
    want = python_policy.act(obs, deterministic=False, rng=np.random.default_rng(batch))  # the same uniform draws
    np.testing.assert_array_equal(sampled, want)


def test_box_policy_actions_are_floats_equal_to_python(capi, artifacts, policy, python_policy, cartpole_obs):
    """Loaded while the demo policy is: each keeps its own kernels (lib.so is opened by a name of its own)."""
    handle = capi.bitrl_load(str(artifacts.box).encode())
    assert handle, _error(capi)
    try:
        demo_out = np.zeros((8, 2), np.float32)
        assert capi.bitrl_forward(policy, cartpole_obs[:8].ctypes.data, 8, demo_out.ctypes.data) == 0, _error(capi)
        np.testing.assert_array_equal(demo_out, python_policy.forward(cartpole_obs[:8]))
        assert (capi.bitrl_obs_size(handle), capi.bitrl_action_size(handle), capi.bitrl_is_discrete(handle)) == (3, 2, 0)
        obs = (np.random.default_rng(0).standard_normal((37, 3)) * 3).astype(np.float32)
        out, actions, sampled = (np.zeros((37, 2), np.float32) for _ in range(3))
        noise = np.random.default_rng(5).standard_normal((37, 2))
        assert capi.bitrl_forward(handle, obs.ctypes.data, 37, out.ctypes.data) == 0, _error(capi)
        assert capi.bitrl_act(handle, obs.ctypes.data, 37, actions.ctypes.data) == 0, _error(capi)
        assert capi.bitrl_sample(handle, obs.ctypes.data, noise.astype(np.float32).ctypes.data, 37,
                                 sampled.ctypes.data) == 0, _error(capi)
        with load(artifacts.box) as box:
            np.testing.assert_array_equal(out, box.forward(obs))
            np.testing.assert_array_equal(actions, box.act(obs))
            np.testing.assert_array_equal(sampled, box.act(obs, deterministic=False, rng=np.random.default_rng(5)))
        assert np.all(np.abs(actions) <= [2.0, 1.0]) and not np.array_equal(actions, sampled)
    finally:
        capi.bitrl_free(handle)


def test_eight_threads_give_the_sequential_results(host_build, artifacts):
    run = subprocess.run([str(host_build.threads), str(artifacts.host), "8", "1000"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok 8 threads x 1000 calls")


def test_rasp4_control_loop_under_qemu_equals_the_emulated_python_runtime(artifacts, cartpole_obs, tmp_path):
    exe = _cc("aarch64-linux-gnu-gcc", EXAMPLE, tmp_path / "control_loop", _flags("rasp4"))
    header = subprocess.run(["readelf", "-h", str(exe)], check=True, capture_output=True, text=True).stdout
    assert "AArch64" in header
    acts = run_under_qemu([str(exe), str(artifacts.rasp4)], cpu="cortex-a72", input=_lines(cartpole_obs), timeout=120)
    assert acts.returncode == 0, acts.stderr
    outs = run_under_qemu([str(exe), "--forward", str(artifacts.rasp4)], cpu="cortex-a72", input=_lines(cartpole_obs),
                          timeout=120)
    assert outs.returncode == 0, outs.stderr
    with EmulatedPolicy(artifacts.rasp4, cpu="cortex-a72") as emulated:
        want_actions, want_out = emulated.act(cartpole_obs), emulated.forward(cartpole_obs)
    np.testing.assert_array_equal(np.array(acts.stdout.split(), np.int64), want_actions)
    out = np.array([[np.float32(v) for v in line.split()] for line in outs.stdout.splitlines()])
    np.testing.assert_array_equal(out, want_out)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_calls_return_minus_one_and_say_why(capi, policy, cartpole_obs):
    obs = np.ascontiguousarray(cartpole_obs[:4])
    out = np.zeros((4, 2), np.float32)
    actions = np.zeros(4, np.int64)
    cases = [
        (lambda: capi.bitrl_act(None, obs.ctypes.data, 1, actions.ctypes.data), "policy is NULL"),
        (lambda: capi.bitrl_act(policy, None, 1, actions.ctypes.data), "obs is NULL"),
        (lambda: capi.bitrl_forward(policy, obs.ctypes.data, 1, None), "out is NULL"),
        (lambda: capi.bitrl_act(policy, obs.ctypes.data, 0, actions.ctypes.data), "batch is 0; give 1 to"),
        (lambda: capi.bitrl_forward(policy, obs.ctypes.data, -3, out.ctypes.data), "batch is -3"),
        (lambda: capi.bitrl_act(policy, obs.ctypes.data, capi.bitrl_max_batch(policy) + 1, actions.ctypes.data),
         "batch is 1048577"),
    ]
    for call, message in cases:
        assert call() == -1
        assert message in _error(capi) and "\n" not in _error(capi)
    for value, name in ((math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf")):
        bad = obs.copy()
        bad[1, 2] = value
        assert capi.bitrl_act(policy, bad.ctypes.data, 4, actions.ctypes.data) == -1
        assert f"obs[6] is {name} (row 1, value 2)" in _error(capi)
    if capi.bitrl_has_sample(policy) == 1:
        assert capi.bitrl_sample(policy, obs.ctypes.data, None, 4, actions.ctypes.data) == -1
        assert "noise is NULL" in _error(capi)
        noise = np.array([[0.5], [np.nan], [0.1], [0.2]], np.float32)
        assert capi.bitrl_sample(policy, obs.ctypes.data, noise.ctypes.data, 4, actions.ctypes.data) == -1
        assert "noise[1] is NaN" in _error(capi)
    assert capi.bitrl_obs_size(None) == -1 and capi.bitrl_is_discrete(None) == -1
    assert capi.bitrl_act(policy, obs.ctypes.data, 4, actions.ctypes.data) == 0  # a good call still works


def _rewrite(src: Path, dst: Path, manifest=None, members=None, raw_manifest: bytes | None = None,
             keep_hashes: bool = False) -> Path:
    """A copy of an artifact with its manifest and members changed; hashes recomputed unless keep_hashes."""
    with zipfile.ZipFile(src) as z:
        m = json.loads(z.read("manifest.json"))
        blobs = {name: z.read(name) for name in z.namelist() if name != "manifest.json"}
    if members:
        blobs = members(blobs)
    if manifest:
        m = manifest(m)
    if not keep_hashes:
        m["members"] = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()
                        if name in m["members"]}
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", raw_manifest if raw_manifest is not None else json.dumps(m))
        for name, data in blobs.items():
            z.writestr(name, data)
    return dst


def _corrupt_weights(blobs):
    params, meta = safetensors_np.loads(blobs["params.safetensors"])
    params["p0"] = np.full_like(params["p0"], 255)
    return dict(blobs, **{"params.safetensors": safetensors_np.dumps(params, meta)})


def _flip_deflate_byte(path: Path, dst: Path) -> Path:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("lib.so")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def test_bad_artifacts_give_null_and_one_line(capi, artifacts, tmp_path):
    host = artifacts.host
    cases = {
        "missing": (tmp_path / "nope.bitrl", "no such artifact file"),
        "not a zip": (tmp_path / "junk.bitrl", "not a policy.bitrl artifact (not a zip"),
        "truncated": (tmp_path / "half.bitrl", "not a policy.bitrl artifact"),
        "corrupt deflate": (_flip_deflate_byte(host, tmp_path / "flip.bitrl"), "member lib.so"),
        "tampered": (_rewrite(host, tmp_path / "tampered.bitrl", keep_hashes=True,
                              members=lambda b: dict(b, **{"params.safetensors": b["params.safetensors"][:-1] + b"\1"})),
                     "member params.safetensors fails its sha256 check (tampered or corrupt)"),
        "missing member": (_rewrite(host, tmp_path / "nolib.bitrl", keep_hashes=True,
                                    members=lambda b: {k: v for k, v in b.items() if k != "lib.so"}),
                           "member lib.so is missing"),
        "bad manifest": (_rewrite(host, tmp_path / "json.bitrl", raw_manifest=b'{"format": "bitrl",'),
                         "manifest.json is not valid JSON"),
        "newer format": (_rewrite(host, tmp_path / "v9.bitrl", manifest=lambda m: dict(m, format_version=9)),
                         "upgrade bitrl-compile"),
        "no entry points": (_rewrite(host, tmp_path / "old.bitrl",
                                     manifest=lambda m: {k: v for k, v in m.items() if k != "entry_points"}),
                            "has no entry_points"),
        "text": (_rewrite(host, tmp_path / "text.bitrl",
                          manifest=lambda m: dict(m, input=dict(m["input"], preprocess="text"))),
                 "serialised to text"),
        "cpu": (_rewrite(host, tmp_path / "cpu.bitrl",
                         manifest=lambda m: dict(m, target=dict(m["target"], cpu_features=["no_such_flag"]))),
                "needs CPU features [no_such_flag]"),
        "base3": (_rewrite(host, tmp_path / "base3.bitrl", members=_corrupt_weights), "base-3 byte out of range"),
        "plan": (_rewrite(host, tmp_path / "plan.bitrl", manifest=lambda m: dict(m, entry_points=dict(
            m["entry_points"], forward=dict(m["entry_points"]["forward"], calls=[{"func": "nope", "args": []}])))),
            "calls nope, which its lib.so does not export"),
        "kernel check": (_rewrite(host, tmp_path / "shape.bitrl", manifest=lambda m: dict(m, entry_points=dict(
            m["entry_points"], forward=dict(m["entry_points"]["forward"], inputs=[
                dict(m["entry_points"]["forward"]["inputs"][0], shape=["batch", 5])])))),
            "a test call failed (bitrl_load: kernel bitrl_bitlinear_k4_n64_relu of entry point forward failed"),
        "arch": (artifacts.rasp4, "compiled for aarch64 (target rasp4) and this machine is x86_64"),
    }
    (tmp_path / "junk.bitrl").write_bytes(b"hello " * 100)
    (tmp_path / "half.bitrl").write_bytes(host.read_bytes()[: host.stat().st_size // 2])
    for name, (path, message) in cases.items():
        assert not capi.bitrl_load(str(path).encode()), name
        error = _error(capi)
        assert message in error and "\n" not in error, f"{name}: {error}"
        assert ("recompile" in error or "upgrade" in error or "no such" in error or "target device" in error
                or "Python runtime" in error), f"{name}: the error names no fix: {error}"
    assert not capi.bitrl_load(None) and "path is NULL" in _error(capi)
