"""The device runtime: no torch, clear errors for bad observations and bad artifacts."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from bitrl_compile import pipeline
from bitrl_compile.frontends import LoadedPolicy
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


@pytest.mark.parametrize("obs,message", [
    (np.zeros(5, np.float32), "expects"),
    (np.zeros((3, 5), np.float32), "expects"),
    (np.zeros((0, 4), np.float32), "batch size 0"),
    (np.array([0, np.nan, 0, 0], np.float32), "NaN"),
    (np.array([0, np.inf, 0, 0], np.float32), "NaN or Inf"),
    (np.array(["a", "b", "c", "d"]), "numeric"),
])
def test_bad_observations_raise_value_error(artifact, obs, message):
    with pytest.raises(ValueError, match=message):
        load(artifact).act(obs)


def test_integer_and_float64_observations_are_accepted(artifact):
    p = load(artifact)
    assert p.act(np.arange(4)) == p.act(np.arange(4, dtype=np.float32))
    assert p.act(np.arange(4, dtype=np.float64)) == p.act(np.arange(4, dtype=np.float32))


def _rewrite(src, dst, change):
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


def test_tampered_member_fails_its_hash(artifact, tmp_path):
    bad = tmp_path / "bad.bitrl"
    _rewrite(artifact, bad, lambda m: m.update({"params.safetensors": m["params.safetensors"][:-1] + b"\x01"}))
    with pytest.raises(ArtifactError, match="sha256"):
        load(bad)


def test_newer_format_version_asks_for_an_upgrade(artifact, tmp_path):
    def bump(m):
        manifest = json.loads(m["manifest.json"])
        manifest["format_version"] = 99
        m["manifest.json"] = json.dumps(manifest).encode()

    bad = tmp_path / "new.bitrl"
    _rewrite(artifact, bad, bump)
    with pytest.raises(ArtifactError, match="newer than this runtime"):
        read_artifact(bad)


def test_missing_member_is_named(artifact, tmp_path):
    bad = tmp_path / "missing.bitrl"
    _rewrite(artifact, bad, lambda m: m.pop("lib.so"))
    with pytest.raises(ArtifactError, match="lib.so is missing"):
        load(bad)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04truncated"])
def test_non_artifacts_are_rejected(tmp_path, content):
    bad = tmp_path / "x.bitrl"
    bad.write_bytes(content)
    with pytest.raises(ArtifactError, match="not a policy.bitrl"):
        load(bad)


def test_truncated_artifact_is_rejected(artifact, tmp_path):
    bad = tmp_path / "t.bitrl"
    bad.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    with pytest.raises(ArtifactError):
        load(bad)


def test_interrupted_write_leaves_no_file_behind(tmp_path):
    from bitrl_compile.runtime import write_artifact

    class Boom(bytes):
        def __len__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_artifact(tmp_path / "p.bitrl", {"target": {}}, {"lib.so": b"x", "params.safetensors": Boom(b"y")})
    assert list(tmp_path.iterdir()) == []
