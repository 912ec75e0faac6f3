"""The device runtime: no torch, observations of any numeric dtype. (Bad inputs: test_bad_inputs.py.)"""

import hashlib
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from bitrl_compile import pipeline
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import ArtifactError, load, read_artifact
from capi_lib import open_libbitrl
from relax_models import mlp
from sealing import sealed


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    lp = LoadedPolicy(module=mlp((4, 16, 2)), onnx_model=None,
                      input={"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None},
                      output={"kind": "discrete", "n": 2, "outputs": "logits"}, source="test", description="")
    return pipeline.compile_policy(lp, "host", tmp_path_factory.mktemp("rt") / "p.bitrl").path


def test_runtime_never_imports_torch_or_the_tvm_compiler(artifact):
    code = ("import sys, numpy as np\nfrom bitrl_compile.runtime import load\n"
            f"p = load({str(artifact)!r})\nprint(p.act(np.zeros(4, np.float32)))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'tvm' not in sys.modules, 'the TVM compiler was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_integer_and_float64_observations_are_accepted(artifact):
    p = load(artifact)
    assert p.act(np.arange(4)) == p.act(np.arange(4, dtype=np.float32))
    assert p.act(np.arange(4, dtype=np.float64)) == p.act(np.arange(4, dtype=np.float32))


def test_truncated_artifact_is_rejected(artifact, tmp_path):
    bad = tmp_path / "t.bitrl"
    bad.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    with pytest.raises(ArtifactError):
        load(bad)



def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_soak_100k_calls_keep_memory_flat_and_results_identical(artifact):
    policy = load(artifact)
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((8, 4)).astype(np.float32)
    single = batch[0].astype(np.float64)  # exercises the conversion path too
    first_single, first_batch = policy.forward(single), policy.forward(batch)
    for _ in range(2000):  # warm up allocator pools
        policy.act(single)
    before = _rss_bytes()
    for i in range(100_000):
        if i % 10 == 0:
            out = policy.forward(batch)
        else:
            out = policy.forward(single)
        if i % 9973 == 0:
            expected = first_batch if i % 10 == 0 else first_single
            np.testing.assert_array_equal(out, expected)
    growth = _rss_bytes() - before
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100k calls"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    lp = LoadedPolicy(module=mlp((4, 16, 2)), onnx_model=None,
                      input={"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None},
                      output={"kind": "discrete", "n": 2, "outputs": "logits"}, source="test")
    return pipeline.compile_policy(lp, "host", tmp_path_factory.mktemp("bundled") / "b.bitrl", bundle_runtime=True).path


def _load_without_apache_tvm(path) -> subprocess.CompletedProcess:
    code = ("import sys, numpy as np\nfrom bitrl_compile.runtime import tvm_runtime, load\n"
            "tvm_runtime.find_libtvm_runtime = lambda: None  # as on a device without the apache-tvm wheel\n"
            f"print(load({str(path)!r}).act(np.ones(4)))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_bundled_runtime_library_is_used_when_the_device_has_no_apache_tvm(bundled):
    assert "libtvm_runtime.so" in read_artifact(bundled).members
    r = _load_without_apache_tvm(bundled)
    assert r.returncode == 0, r.stderr


def test_a_bundled_runtime_the_loader_refuses_is_one_line(bundled, tmp_path):
    """A garbage libtvm_runtime.so (hashes recomputed) is an ArtifactError naming it, not the temporary file."""
    with zipfile.ZipFile(bundled) as z:
        blobs = {name: z.read(name) for name in z.namelist()}
    blobs["libtvm_runtime.so"] = b"not a library" * 100
    manifest = json.loads(blobs.pop("manifest.json"))
    manifest["members"]["libtvm_runtime.so"] = hashlib.sha256(blobs["libtvm_runtime.so"]).hexdigest()
    text = json.dumps(manifest).encode()
    blobs.update({"manifest.json": text, "manifest.sha256": hashlib.sha256(text).hexdigest().encode()})
    bad = tmp_path / "bad-runtime.bitrl"
    with zipfile.ZipFile(bad, "w") as z:
        for name, data in blobs.items():
            z.writestr(name, data)
    r = _load_without_apache_tvm(bad)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("bitrl_compile.runtime.artifact.ArtifactError"), r.stderr
    assert "libtvm_runtime.so cannot be loaded (not an ELF library); recompile the artifact" in last, last
    assert "/tmp/" not in last.split("bad-runtime.bitrl:")[1]


# ------------------------------------------------------------------------ the manifest's structure (issue 15)

def _act(m):
    return m["entry_points"]["act"]


# (what is edited, the edit, what the one-line refusal says after "manifest ")
MALFORMED = [
    ("weights a string", lambda m: m.update(weights="F32"), "weights is not an object (a string)"),
    ("weights a list", lambda m: m.update(weights=["F32"]), "weights is not an object (a list)"),
    ("a weight shape of one value", lambda m: m["weights"]["p0"]["shape"].pop(), "weights.p0.shape has 1 value"),
    ("a weight layout of zero tiles", lambda m: m["weights"]["p0"].update(compute="tiles0x0"),
     "weights.p0.compute is 'tiles0x0'"),
    ("a weight not in params", lambda m: m["weights"].update(zz=m["weights"]["p0"]), "weights lists zz"),
    ("a params name that is a list", lambda m: m["params"].__setitem__(1, ["p1"]), "params[1] is ['p1']"),
    ("a params name twice", lambda m: m["params"].__setitem__(1, "p0"), "params[1] repeats the name p0"),
    ("entry_points a list", lambda m: m.update(entry_points=[m["entry_points"]]),
     "entry_points is not an object (a list)"),
    ("a call that is not an object", lambda m: _act(m)["calls"].__setitem__(0, 1),
     "entry_points.act.calls[0] is not an object (an integer)"),
    ("an argument out of range", lambda m: _act(m)["calls"][0]["args"].__setitem__(0, "input:9"),
     "entry_points.act.calls[0].args[0] is 'input:9', but entry_points.act has 1 inputs"),
    ("an argument of no form", lambda m: _act(m)["calls"][0]["args"].__setitem__(0, "input:+0"),
     "entry_points.act.calls[0].args[0] is 'input:+0', not input:I"),
    ("a parameter not in params", lambda m: _act(m)["calls"][0]["args"].__setitem__(1, "param:zz"),
     "entry_points.act.calls[0].args[1] is 'param:zz', a parameter not in manifest params"),
    ("a function name with a newline", lambda m: _act(m)["calls"][0].update(func="a\nb"),
     "entry_points.act.calls[0].func is 'a\\nb', not a function name"),
    ("an input without the batch", lambda m: _act(m)["inputs"][0].update(shape=[1, 4]),
     "entry_points.act.inputs[0].shape is [1, 4], not [\"batch\", sizes...]"),
    ("a buffer too large", lambda m: _act(m)["buffers"][0].update(shape=["batch", 2**32]),
     "entry_points.act.buffers[0].shape ['batch', 4294967296] holds more than"),
    ("a buffer viewing an output", lambda m: _act(m)["buffers"][0].update(view="output:0"),
     "entry_points.act.buffers[0].view is 'output:0', not input:I or buffer:I"),
    ("a view of another size", lambda m: _act(m)["buffers"][0].update(view="input:0"),
     "entry_points.act.buffers[0].view is 'input:0', whose dtype or number of values differs"),
    ("batch.min 0", lambda m: m["batch"].update(min=0), "batch.min is 0, not in [1, 1073741824]"),
    ("batch.min above max", lambda m: m["batch"].update(min=5, max=2), "batch.max is 2, not in [5, 1073741824]"),
    ("vm_params a number", lambda m: m.update(vm_params=3), "vm_params is not an object (an integer)"),
    ("a kernels entry a number", lambda m: m["kernels"].__setitem__(0, -1.0), "kernels[0] is not an object"),
    ("a kernel isa a list", lambda m: m["kernels"][0].update(isa=["avx512-vnni"]), "kernels[0].isa is not a string"),
    ("a layer's in a string", lambda m: m["layers"][0].update({"in": "4"}), "layers[0].in is not an integer"),
    ("cpu_features a string", lambda m: m["target"].update(cpu_features="avx2"),
     "target.cpu_features is not a list (a string)"),
    ("target.arch missing", lambda m: m["target"].pop("arch"), "target.arch is not a string (missing)"),
]


@pytest.mark.parametrize("case,edit,says", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_manifest_is_one_line_in_load_and_inspect(artifact, tmp_path, case, edit, says):
    """Found by fuzzing (tests/test_fuzz.py): these were AttributeError, IndexError, TypeError or exit 3."""
    from click.testing import CliRunner

    from bitrl_compile.cli import main

    path = sealed(artifact, tmp_path / "m.bitrl", edit)
    with pytest.raises(ArtifactError) as e:
        load(path)
    message = str(e.value)
    assert f"manifest {says}" in message and "\n" not in message and message.endswith("recompile the artifact")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and f"manifest {says}" in result.stderr, result.output


def test_every_manifest_field_the_readers_use_is_checked_and_valid_ones_pass(artifact, tmp_path):
    """A manifest of only the required fields loads (older and hand-made artifacts); an unbounded batch too."""
    from bitrl_compile.runtime.manifest import check_manifest

    manifest = read_artifact(artifact, payload=False).manifest
    check_manifest(manifest)
    minimal = {k: manifest[k] for k in ("format", "format_version", "members", "target", "input", "output",
                                        "params")}
    check_manifest(minimal)
    path = sealed(artifact, tmp_path / "unbounded.bitrl", lambda m: m["batch"].update(max=None))
    with load(path) as policy:
        assert policy.act(np.zeros(4, np.float32)) in (0, 1)


def test_a_safetensors_dtype_with_a_newline_is_echoed_on_one_line(artifact, tmp_path):
    from bitrl_compile.runtime import safetensors_np

    data = safetensors_np.dumps({"w": np.zeros(2, np.float32)})
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"F32"', b'"F32\\n"')
    bad = len(header).to_bytes(8, "little") + header + data[8 + n:]
    with pytest.raises(ValueError, match="unsupported dtype 'F32\\\\n'") as e:
        safetensors_np.loads(bad)
    assert "\n" not in str(e.value)


def test_a_function_lib_so_does_not_export_is_one_line(artifact, tmp_path):
    path = sealed(artifact, tmp_path / "nosym.bitrl", lambda m: _act(m)["calls"][0].update(func="no_such_kernel"))
    with pytest.raises(ArtifactError, match="entry point act calls no_such_kernel, which its lib.so does not export"):
        load(path)


def test_the_c_api_refuses_the_same_malformed_manifests(artifact, tmp_path):
    """The C reader (runtime/capi/manifest.c) refuses every manifest the Python reader does, in one line."""
    lib = open_libbitrl()
    cases = [(case, edit) for case, edit, _ in MALFORMED] + [
        ("output n 7", lambda m: m["output"].update(n=7)), ("output kind", lambda m: m["output"].update(kind="x"))]
    for i, (case, edit) in enumerate(cases):
        path = sealed(artifact, tmp_path / f"c{i}.bitrl", edit)
        handle = lib.bitrl_load(str(path).encode())
        if handle:
            lib.bitrl_free(handle)
        error = lib.bitrl_last_error().decode()
        assert not handle and "recompile" in error and "\n" not in error, (case, error)
    handle = lib.bitrl_load(str(sealed(artifact, tmp_path / "ok.bitrl", lambda m: m["batch"].update(max=None))).encode())
    assert handle, lib.bitrl_last_error()
    lib.bitrl_free(handle)
