"""Memory on the device (issue 16, item 3): the aarch64 runtime under qemu holds the weights once, in the kernels'
layout, while it loads them (`read_artifact(params=False)` + `artifact.load_params`: params.safetensors read once, a
block of rows at a time), into the same parameters as the whole-member reader, and the policy acts as the
reference does.

The backbone: an MLP with three 4096 x 4096 ternary layers compiled for rasp4 (50 M weights: 10 MB stored in base-3,
12.6 MB unpacked), so that a second copy of the stored weights (+10 MB) or of the unpacked ones (+12.6 MB) exceeds
the slack of the bound (one block of rows and its codes, numpy's and qemu's own growth: SLACK)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from bitrl_compile import devices, pipeline, reference
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import artifact, safetensors_np, weights
from relax_models import mlp
from sealing import sealed

SLACK = 8 << 20  # bytes over the parameters that loading may peak at (measured: 4.7 MB, mostly qemu's and numpy's)

GUEST = r"""
import json, sys
import numpy as np
from bitrl_compile import runtime
from bitrl_compile.runtime import artifact, policy

def status():
    return {k: int(v.split()[0]) * 1024 for k, _, v in (l.partition(":") for l in open("/proc/self/status"))
            if k in ("VmHWM", "VmRSS")}

path = sys.argv[1]
runtime.read_artifact(path, params=False)  # the zip reader's own first use (imports, caches) outside the measure
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status()["VmRSS"]
art = runtime.read_artifact(path, params=False)
params = artifact.load_params(art)
peak = status()["VmHWM"] - before
nbytes = sum(v.nbytes for v in params.values())
aligned = all(v.ctypes.data % 64 == 0 for v in params.values())
p = policy.Policy(art.manifest, art.members[artifact.LIB], params, path, art.members.get(artifact.RUNTIME))
obs = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
print(json.dumps({"peak": peak, "params": nbytes, "aligned": aligned, "out": p.forward(obs).tolist()}))
"""


@pytest.fixture(scope="module")
def wide_rasp4(tmp_path_factory):
    torch.set_num_threads(1)
    loaded = LoadedPolicy(module=mlp((8, 4096, 4096, 4096, 4096, 4), "relu"), onnx_model=None,
                          input={"shape": [8], "dtype": "float32", "preprocess": "none", "normalize": None},
                          output={"kind": "discrete", "n": 4, "outputs": "logits"}, source="test-mlp")
    return pipeline.compile_policy(loaded, "rasp4", tmp_path_factory.mktemp("devmem") / "wide.bitrl")


def test_streamed_parameters_equal_the_whole_member_reader(wide_rasp4):
    art = artifact.read_artifact(wide_rasp4.path, params=False, use_env=False)
    streamed = artifact.load_params(art)
    whole, _ = safetensors_np.loads(artifact.read_artifact(wide_rasp4.path, use_env=False).members[artifact.PARAMS])
    whole = weights.unpack_params(whole, art.manifest["weights"])
    assert streamed.keys() == whole.keys()
    for name, value in whole.items():
        assert streamed[name].dtype == value.dtype and streamed[name].ctypes.data % 64 == 0
        np.testing.assert_array_equal(streamed[name], value)


def test_device_holds_the_weights_once_while_loading(wide_rasp4):
    art = artifact.read_artifact(wide_rasp4.path, params=False, use_env=False)
    layouts = art.manifest["weights"]
    unpacked = sum(int(np.prod(weights.compute_shape(s))) for s in layouts.values())
    stored = sum(int(s["shape"][0]) * -(-int(s["shape"][1]) // 5) for s in layouts.values())
    assert min(stored, unpacked) > SLACK  # a second copy of either breaks the bound
    guest = subprocess.run(devices.qemu_python_command("cortex-a72") + ["-c", GUEST, str(wide_rasp4.path)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert guest.returncode == 0, guest.stderr[-2000:]
    r = json.loads(guest.stdout.strip().splitlines()[-1])
    assert r["aligned"]
    assert unpacked <= r["params"] < unpacked + (1 << 20)  # the ternary weights and a few small tensors
    # the load's peak over what was resident before it: the parameters once, plus a block of rows and its codes
    assert r["peak"] <= r["params"] + SLACK, (f"loading peaked {r['peak']:,} bytes over the resident set for "
                                              f"{r['params']:,} bytes of parameters: a second copy?")
    obs = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(r["out"], np.float32), reference.run(wide_rasp4.quantized, obs))


def _rewritten(src, dst, edit, reseal: bool):
    """A copy of the artifact with params.safetensors edited (edit(bytearray)); hashes recomputed if reseal."""
    return sealed(src, dst, member=artifact.PARAMS, edit_member=edit, reseal=reseal)


def test_streamed_parameters_are_checked_and_refused_in_one_line(wide_rasp4, tmp_path):
    header = 8 + int.from_bytes(artifact.read_artifact(wide_rasp4.path, use_env=False)
                                .members[artifact.PARAMS][:8], "little")

    def flip(data):  # a base-3 byte of the first tensor (any tensor: they are all weights or small)
        data[header + 5] = 250

    tampered = artifact.read_artifact(_rewritten(wide_rasp4.path, tmp_path / "t.bitrl", flip, False), params=False,
                                      use_env=False)  # the member is left unread: its hash is checked as it streams
    with pytest.raises(artifact.ArtifactError, match="params.safetensors fails its sha256 check") as e:
        artifact.load_params(tampered)
    assert "\n" not in str(e.value)
    resealed = artifact.read_artifact(_rewritten(wide_rasp4.path, tmp_path / "r.bitrl", flip, True), params=False,
                                      use_env=False)
    with pytest.raises(artifact.ArtifactError, match=r"(cannot be unpacked|unreadable).*recompile"):
        artifact.load_params(resealed)
    short = artifact.read_artifact(_rewritten(wide_rasp4.path, tmp_path / "s.bitrl", lambda d: d.__setitem__(
        slice(0, 8), (len(d) * 2).to_bytes(8, "little")), True), params=False, use_env=False)
    with pytest.raises(artifact.ArtifactError, match="params.safetensors is unreadable"):
        artifact.load_params(short)


def test_bench_says_how_to_make_a_missing_artifact(tmp_path, capsys):
    from repo_scripts import load_script

    bench = load_script("bench/bitnet_device_memory.py", "bitnet_device_memory")
    assert bench.main([str(tmp_path / "2b4t-L30-rasp4.bitrl")]) == 1
    assert "python bench/bitnet_scale.py --layers 30 --targets rasp4" in capsys.readouterr().err
