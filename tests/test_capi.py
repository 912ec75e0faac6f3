"""The C API (runtime/capi, bitrl.h): built with `bitrl-compile capi`'s flags, it gives the Python runtime's actions
and bit-identical forward outputs, on the host and cross-built for rasp4 under qemu; bad input is -1/NULL and one
line of bitrl_last_error(), never an abort; one policy is safe from 8 threads at once."""

import base64
import ctypes
import hashlib
import json
import math
import re
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
from bitrl_compile.devices.capi import CFLAGS, SOURCES, run_under_qemu, source_dir, tvm_ffi_include
from bitrl_compile.frontends import load_policy
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import ArtifactError, load, safetensors_np, signing
from bitrl_compile.runtime.artifact import sign_artifact
from capi_lib import DECLARATIONS, open_libbitrl
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
    return open_libbitrl(host_build.lib)


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
    sources = [str(source_dir() / s) for s in SOURCES]
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


def test_capi_lib_declares_every_bitrl_h_function_and_refuses_a_wrong_arity(capi):
    """tests/capi_lib.py, which every in-process test of the C API uses, declares each BITRL_API function of bitrl.h
    with its number of arguments, and a call with too few or too many raises instead of passing garbage to C."""
    header = (source_dir() / "bitrl.h").read_text()
    found = re.findall(r"^BITRL_API [^;(]*?\b(bitrl_\w+)\(([^)]*)\)", header, re.MULTILINE)
    assert len(found) == header.count("\nBITRL_API ") > 0
    arity = {name: 0 if params.strip() == "void" else params.count(",") + 1 for name, params in found}
    assert arity == {name: len(argtypes) for name, (_, argtypes) in DECLARATIONS.items()}
    assert capi.bitrl_version().decode() == re.search(r'#define BITRL_VERSION "([^"]+)"', header)[1]
    for call in (lambda: capi.bitrl_act(None, None, 1), lambda: capi.bitrl_act(None, None, 1, None, None),
                 lambda: capi.bitrl_last_error(None)):
        with pytest.raises(TypeError, match="this function takes"):
            call()


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
    """A copy of an artifact with its manifest and members changed; hashes (of the members and of the manifest:
    an attacker who rewrites the zip consistently) recomputed unless keep_hashes."""
    with zipfile.ZipFile(src) as z:
        m = json.loads(z.read("manifest.json"))
        blobs = {name: z.read(name) for name in z.namelist() if name not in ("manifest.json", "manifest.sha256")}
        old_text, old_hash = z.read("manifest.json"), z.read("manifest.sha256")
    if members:
        blobs = members(blobs)
    if manifest:
        m = manifest(m)
    if not keep_hashes:
        m["members"] = {name: hashlib.sha256(blobs[name]).hexdigest() if name in blobs else digest
                        for name, digest in m["members"].items()}
    text = raw_manifest if raw_manifest is not None else json.dumps(m).encode()
    if keep_hashes and manifest is None and raw_manifest is None:
        text = old_text
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", text)
        z.writestr("manifest.sha256", old_hash if keep_hashes else hashlib.sha256(text).hexdigest() + "\n")
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


# ----------------------------------------------------------------------------------- trust and limits (C)

EVIL = """#include <stdio.h>
__attribute__((constructor)) static void evil(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("native code of the artifact ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def release_key(tmp_path_factory):
    return signing.write_keypair(tmp_path_factory.mktemp("capi-keys") / "release")  # (private, public, key id)


def _load_trusted(capi, path: Path, keys: list[Path]):
    array = (ctypes.c_char_p * max(len(keys), 1))(*[str(k).encode() for k in keys])
    return capi.bitrl_load_trusted(str(path).encode(), array, len(keys))


def test_nothing_native_runs_before_the_signature_is_checked(capi, host_build, artifacts, release_key, tmp_path,
                                                            monkeypatch):
    """An attacker replaces lib.so by a library whose constructor runs on dlopen and rewrites the zip consistently
    (every sha256 recomputed, the manifest's too). With trusted keys, neither runtime loads it: the marker file
    that constructor would create never appears. Without keys it does: loading an artifact runs its code."""
    private, public, key_id = release_key
    monkeypatch.delenv(signing.ENV, raising=False)
    signed = tmp_path / "signed.bitrl"
    signed.write_bytes(artifacts.host.read_bytes())
    sign_artifact(signed, private)
    marker = tmp_path / "marker"
    (tmp_path / "evil.c").write_text(EVIL)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(tmp_path / "evil.c"), "-o",
                    str(tmp_path / "evil.so")], check=True, capture_output=True)
    evil_lib = (tmp_path / "evil.so").read_bytes()
    evil = _rewrite(signed, tmp_path / "evil.bitrl", members=lambda b: dict(b, **{"lib.so": evil_lib}))
    unsigned = _rewrite(artifacts.host, tmp_path / "evil-unsigned.bitrl",
                        members=lambda b: dict(b, **{"lib.so": evil_lib}))
    with pytest.raises(ArtifactError, match=f"the signature by trusted key {key_id[:16]} does not verify"):
        load(evil, trusted_keys=[public])
    with pytest.raises(ArtifactError, match="is not signed by any trusted key"):
        load(unsigned, trusted_keys=[public])
    assert not _load_trusted(capi, evil, [public])
    assert f"the signature by trusted key {key_id[:16]} does not verify" in _error(capi)
    assert not _load_trusted(capi, unsigned, [public]) and "is not signed by any trusted key" in _error(capi)
    monkeypatch.setenv(signing.ENV, str(public))
    assert not capi.bitrl_load(str(evil).encode()) and "does not verify" in _error(capi)
    with pytest.raises(ArtifactError, match="does not verify"):
        load(evil)
    assert not marker.exists(), "the artifact's native code ran before its signature was checked"
    handle = capi.bitrl_load(str(signed).encode())  # the genuine signed artifact, keys from the environment
    assert handle, _error(capi)
    capi.bitrl_free(handle)
    monkeypatch.delenv(signing.ENV)
    run = subprocess.run([str(host_build.threads), str(evil), "1", "1"], capture_output=True, text=True, check=False)
    assert run.returncode != 0 and marker.exists(), "without keys the constructor runs (the test's premise)"
    assert not _load_trusted(capi, signed, [private]) and "this is the private key: give NAME.pub" in _error(capi)
    assert not _load_trusted(capi, signed, [tmp_path / "none.pub"]) and "does not exist" in _error(capi)


def _bomb(src: Path, dst: Path, size: int = 128 << 20) -> Path:
    with zipfile.ZipFile(src) as z:
        blobs = {name: z.read(name) for name in z.namelist() if name != "lib.so"}
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in blobs.items():
            z.writestr(name, data)
        with z.open("lib.so", "w") as f:
            for _ in range(size >> 24):
                f.write(bytes(16 << 20))
    return dst


def _members(src: Path, change) -> dict:
    with zipfile.ZipFile(src) as z:
        blobs = {name: z.read(name) for name in z.namelist()}
    change(blobs)
    return blobs


def _zip(dst: Path, blobs: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(dst, "w", compression=compression) as z:
        for name, data in blobs.items():
            z.writestr(name, data)
    return dst


def _cut_into_last_segment(lib: bytes) -> bytes:
    """An ELF64 library cut one byte short of the end of its last loadable segment (PT_LOAD): a file cut in half
    may still hold every segment when the tail is symbols and debug sections."""
    phoff, phentsize, phnum = (int.from_bytes(lib[a:b], "little") for a, b in ((0x20, 0x28), (0x36, 0x38),
                                                                                 (0x38, 0x3A)))
    headers = [lib[phoff + i * phentsize: phoff + (i + 1) * phentsize] for i in range(phnum)]
    ends = [int.from_bytes(h[8:16], "little") + int.from_bytes(h[32:40], "little") for h in headers
            if int.from_bytes(h[0:4], "little") == 1]  # p_type PT_LOAD: p_offset + p_filesz
    return lib[: max(ends) - 1]


def _big_safetensors_header(blobs):
    """params.safetensors with a 17 MiB header (incompressible metadata, so that no zip limit refuses it first)."""
    params, meta = safetensors_np.loads(blobs["params.safetensors"])
    pad = base64.b64encode(np.random.default_rng(0).integers(0, 256, 13 << 20, dtype=np.uint8).tobytes()).decode()
    blobs["params.safetensors"] = safetensors_np.dumps(params, dict(meta, pad=pad))


def test_c_reader_limits_and_manifest_checks(capi, artifacts, tmp_path):
    host = artifacts.host
    edited = _members(host, lambda b: b.update({"manifest.json": b["manifest.json"].replace(b'"squash"', b'"squash" ')
                                                if b'"squash"' in b["manifest.json"] else b["manifest.json"] + b" "}))
    cases = {
        "manifest edited": (_zip(tmp_path / "edited.bitrl", edited),
                            "manifest.json fails its sha256 check (tampered or corrupt); recompile the artifact"),
        "no manifest hash": (_zip(tmp_path / "nohash.bitrl", _members(host, lambda b: b.pop("manifest.sha256"))),
                             "member manifest.sha256 is missing"),
        "zip bomb": (_bomb(host, tmp_path / "bomb.bitrl"), "(more than 100:1, a zip bomb)"),
        "many members": (_zip(tmp_path / "many.bitrl", _members(host, lambda b: b.update(
            {f"x{i}": b"" for i in range(16)}))), "more than an artifact's 16"),
        "unknown member": (_zip(tmp_path / "sh.bitrl", _members(host, lambda b: b.update({"run.sh": b"x"}))),
                           "unknown member 'run.sh'"),
        "unlisted runtime": (_zip(tmp_path / "rt.bitrl", _members(host, lambda b: b.update(
            {"libtvm_runtime.so": b"x"}))), "in the zip but not in the manifest's members list"),
        "bzip2": (_zip(tmp_path / "bz2.bitrl", _members(host, lambda b: None), zipfile.ZIP_BZIP2),
                  "compression method 12"),
        "list manifest": (_rewrite(host, tmp_path / "list.bitrl", raw_manifest=b"[1, 2]"),
                          "manifest.json holds no JSON object"),
        "unknown listed": (_rewrite(host, tmp_path / "ul.bitrl", manifest=lambda m: dict(
            m, members=dict(m["members"], **{"evil.so": "0" * 64}))), "manifest lists unknown member 'evil.so'"),
        "deep JSON": (_rewrite(host, tmp_path / "deep.bitrl", raw_manifest=b"[" * 65 + b"]" * 65),
                      "at most 64 levels of nesting"),
        "garbage lib.so": (_rewrite(host, tmp_path / "garbage.bitrl", members=lambda b: dict(b, **{"lib.so": b"x" * 999})),
                           "lib.so cannot be loaded (not an ELF library); recompile the artifact for this machine"),
        "truncated lib.so": (_rewrite(host, tmp_path / "half-lib.bitrl", members=lambda b: dict(
            b, **{"lib.so": _cut_into_last_segment(b["lib.so"])})), "truncated: a segment ends past the file"),
        "safetensors header": (_rewrite(host, tmp_path / "st.bitrl", members=lambda b: (_big_safetensors_header(b), b)[1]),
                               "params.safetensors declares a header of"),
    }
    for version in (True, 1.5, "2", 0, -1):
        cases[f"format_version {version!r}"] = (
            _rewrite(host, tmp_path / f"v{version}.bitrl", manifest=lambda m, v=version: dict(m, format_version=v)),
            "manifest format_version is not a positive integer")
    cases["duplicate"] = (_zip(tmp_path / "dup.bitrl", _members(host, lambda b: None)), "holds member lib.so twice")
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(tmp_path / "dup.bitrl", "a") as z:
        z.writestr("lib.so", b"other")
    for name, (path, message) in cases.items():
        assert not capi.bitrl_load(str(path).encode()), name
        error = _error(capi)
        assert message in error and "\n" not in error, f"{name}: {error}"


def test_rasp4_signature_check_under_qemu(artifacts, release_key, tmp_path):
    """bitrl_load_trusted cross-built for aarch64: the emulator's Debian sysroot provides libcrypto.so.3."""
    private, public, _ = release_key
    signed = tmp_path / "rasp4-signed.bitrl"
    signed.write_bytes(artifacts.rasp4.read_bytes())
    sign_artifact(signed, private)
    exe = _cc("aarch64-linux-gnu-gcc", THREADS, tmp_path / "capi_threads", _flags("rasp4"))
    ok = run_under_qemu([str(exe), str(signed), "2", "20", str(public)], cpu="cortex-a72", timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("ok 2 threads"), ok.stderr
    refused = run_under_qemu([str(exe), str(artifacts.rasp4), "1", "1", str(public)], cpu="cortex-a72", timeout=120)
    assert refused.returncode == 1 and "is not signed by any trusted key" in refused.stderr, refused.stderr
