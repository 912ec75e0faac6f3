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
from relax_models import mlp


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
