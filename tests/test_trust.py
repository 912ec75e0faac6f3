"""The trust model (docs/security.md): the manifest is hashed (format 2), Ed25519 signatures checked when trusted
keys are configured (`bitrl-compile keygen`/`sign`, load(trusted_keys=...), BITRL_TRUSTED_KEYS, `run --trusted-key`),
limits of the artifact reader (members, sizes, zip bombs, JSON depth), and a lib.so the loader refuses as one line.
The C API's side of the same checks is in test_capi.py."""

import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitrl_compile import pipeline
from bitrl_compile.cli import main
from bitrl_compile.loaded import LoadedPolicy
from bitrl_compile.runtime import ArtifactError, load, read_artifact, signing
from bitrl_compile.runtime.artifact import MAX_MEMBERS, sign_artifact
from relax_models import mlp

AARCH64_LIB = Path.home() / ".cache" / "bitrl-compile" / "aarch64-py311" / "sysroot" / "lib" / "aarch64-linux-gnu"


@pytest.fixture(autouse=True)
def no_trusted_keys_from_the_environment(monkeypatch):
    monkeypatch.delenv(signing.ENV, raising=False)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    lp = LoadedPolicy(module=mlp((4, 16, 2)), onnx_model=None,
                      input={"shape": [4], "dtype": "float32", "preprocess": "none", "normalize": None},
                      output={"kind": "discrete", "n": 2, "outputs": "logits"}, source="test", description="")
    return pipeline.compile_policy(lp, "host", tmp_path_factory.mktemp("trust") / "p.bitrl").path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return [signing.write_keypair(folder / name) for name in ("release", "other")]  # (private, public, id)


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def rewrite(src: Path, dst: Path, manifest=None, members=None, raw_manifest: bytes | None = None) -> Path:
    """What an attacker does: change the manifest or members and recompute every hash, manifest.sha256 included
    (signatures.json is kept, as it was)."""
    blobs = members_of(src)
    m = json.loads(blobs.pop("manifest.json"))
    blobs.pop("manifest.sha256", None)
    if members:
        blobs = members(blobs)
    if manifest:
        m = manifest(m)
    if isinstance(m, dict) and isinstance(m.get("members"), dict):
        m["members"] = {n: hashlib.sha256(blobs[n]).hexdigest() if n in blobs and isinstance(d, str) else d
                        for n, d in m["members"].items()}
    text = raw_manifest if raw_manifest is not None else json.dumps(m).encode()
    return write_zip(dst, {"manifest.json": text, "manifest.sha256": hashlib.sha256(text).hexdigest().encode(),
                           **blobs})


def refused(path, match: str, **kwargs) -> str:
    with pytest.raises(ArtifactError) as info:
        load(path, **kwargs)
    message = str(info.value)
    assert match in message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------ the manifest is hashed

def test_a_manifest_edited_in_place_fails_its_sha256(artifact, tmp_path):
    blobs = members_of(artifact)
    m = json.loads(blobs["manifest.json"])
    m["input"]["normalize"] = {"mean": [0, 0, 0, 0], "var": [1e6] * 4, "eps": 1e-8, "clip": None}
    blobs["manifest.json"] = json.dumps(m, indent=2, sort_keys=True).encode()  # manifest.sha256 left as it was
    path = write_zip(tmp_path / "edited.bitrl", blobs)
    refused(path, "manifest.json fails its sha256 check (tampered or corrupt); recompile the artifact")
    with pytest.raises(ArtifactError, match="manifest.json fails its sha256"):
        read_artifact(path, payload=False)  # inspect's read


def test_format_2_artifacts_carry_the_manifest_hash(artifact):
    art = read_artifact(artifact)
    assert art.manifest["format_version"] == 2
    assert members_of(artifact)["manifest.sha256"].decode().strip() == hashlib.sha256(art.manifest_bytes).hexdigest()
    blobs = members_of(artifact)
    del blobs["manifest.sha256"]
    path = write_zip(artifact.parent / "nohash.bitrl", blobs)
    refused(path, "member manifest.sha256 is missing")


@pytest.mark.parametrize("version", [True, 1.5, "2", 0, -1, None])
def test_format_version_must_be_a_positive_int(artifact, tmp_path, version):
    path = rewrite(artifact, tmp_path / "v.bitrl", manifest=lambda m: dict(m, format_version=version))
    refused(path, "format_version")
    assert "not a positive integer" in refused(path, "format_version")


def test_format_1_loads_without_keys_and_never_with_them(artifact, tmp_path, keys):
    blobs = members_of(artifact)
    m = json.loads(blobs.pop("manifest.json"))
    del blobs["manifest.sha256"]
    path = write_zip(tmp_path / "v1.bitrl", {"manifest.json": json.dumps(dict(m, format_version=1)).encode(), **blobs})
    with load(path) as policy:
        assert policy.act(np.zeros(4, np.float32)) in (0, 1)
    refused(path, "format 1 artifacts cannot be signed", trusted_keys=[keys[0][1]])
    with pytest.raises(ArtifactError, match="cannot be signed"):
        sign_artifact(path, keys[0][0])


@pytest.mark.parametrize("case, change, says", [
    ("a list", lambda m: [m], "holds a JSON list, not an object"),
    ("a string", lambda m: "bitrl", "holds a JSON str, not an object"),
    ("unknown member", lambda m: dict(m, members=dict(m["members"], **{"evil.so": "0" * 64})),
     "manifest lists unknown member 'evil.so'"),
    ("bad digest", lambda m: dict(m, members=dict(m["members"], **{"lib.so": 5})), "with an invalid sha256"),
    ("no members", lambda m: {k: v for k, v in m.items() if k != "members"}, "has no members list"),
    ("more outputs than the network", lambda m: dict(m, output=dict(m["output"], n=7)),
     "the output spec says 7 actions but the network outputs 2 values"),
    ("NaN-free bounds", lambda m: dict(m, input=dict(m["input"], normalize={"mean": [0] * 4, "var": [1] * 4,
                                                                             "eps": -1.0})), "eps must be"),
    ("target not an object", lambda m: dict(m, target="x86_64"), "manifest target is not an object"),
])
def test_malformed_manifests_are_one_line(artifact, tmp_path, case, change, says):
    refused(rewrite(artifact, tmp_path / "m.bitrl", manifest=change), says)


def test_nesting_deeper_than_64_is_refused(artifact, tmp_path):
    for depth in (65, 100_000):  # 100k: deeper than Python's recursion limit
        deep = b"[" * depth + b"]" * depth
        text = b'{"format": "bitrl", "format_version": 2, "x": ' + deep + b"}"
        path = rewrite(artifact, tmp_path / f"deep{depth}.bitrl", raw_manifest=text)
        refused(path, "nests deeper than 64 levels")


# ---------------------------------------------------------------------------------------------- signatures

def test_keygen_and_sign_commands(artifact, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["keygen", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "k").read_bytes() and b"PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    assert runner.invoke(main, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 1  # never overwritten silently
    signed = tmp_path / "s.bitrl"
    signed.write_bytes(artifact.read_bytes())
    before = members_of(signed)
    result = runner.invoke(main, ["sign", str(signed), "--key", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    after = members_of(signed)
    assert {n: b for n, b in after.items() if n != "signatures.json"} == before  # manifest and members unchanged
    key_id = hashlib.sha256(signing.public_key(tmp_path / "k.pub")).hexdigest()
    assert json.loads(after["signatures.json"])[0]["key"] == key_id and key_id in result.output
    result = runner.invoke(main, ["sign", str(signed), "--key", str(tmp_path / "k.pub")])
    assert result.exit_code == 1 and "a public key (give the private key NAME, not NAME.pub)" in result.output
    result = runner.invoke(main, ["inspect", str(signed)], env={signing.ENV: str(tmp_path / "k.pub")})
    assert result.exit_code == 0 and f"verified by trusted key {key_id[:16]}" in result.output, result.output


def test_load_with_trusted_keys(artifact, tmp_path, keys, monkeypatch):
    (private, public, key_id), (other_private, other_public, _) = keys
    unsigned = tmp_path / "u.bitrl"
    unsigned.write_bytes(artifact.read_bytes())
    refused(unsigned, "is not signed by any trusted key (keys: ", trusted_keys=[public])
    signed = tmp_path / "s.bitrl"
    signed.write_bytes(artifact.read_bytes())
    sign_artifact(signed, private)
    sign_artifact(signed, other_private)
    assert read_artifact(signed).signed_by == [key_id, signing.key_id(signing.public_key(other_public))]
    raw = signing.public_key(public)
    for trusted in ([public], [str(public)], [public.read_bytes()], [raw], public):
        with load(signed, trusted_keys=trusted) as policy:
            assert policy.act(np.zeros(4, np.float32)) in (0, 1)
    only_other = tmp_path / "o.bitrl"
    only_other.write_bytes(artifact.read_bytes())
    sign_artifact(only_other, other_private)
    refused(only_other, f"is not signed by any trusted key (keys: {key_id[:16]})", trusted_keys=[public])
    monkeypatch.setenv(signing.ENV, f"{public}:")
    refused(unsigned, "is not signed by any trusted key")  # the environment alone enforces it
    load(signed).close()
    monkeypatch.setenv(signing.ENV, str(tmp_path / "missing.pub"))
    refused(signed, "does not exist; fix the path or unset BITRL_TRUSTED_KEYS")
    monkeypatch.setenv(signing.ENV, str(private))
    refused(signed, "this is the private key: give NAME.pub")


def test_a_signed_artifact_changed_after_signing_is_refused(artifact, tmp_path, keys):
    private, public, _ = keys[0]
    signed = tmp_path / "s.bitrl"
    signed.write_bytes(artifact.read_bytes())
    sign_artifact(signed, private)
    bounds = rewrite(signed, tmp_path / "t.bitrl", manifest=lambda m: dict(m, stats={}))  # every hash consistent
    refused(bounds, "does not verify (the manifest was changed after signing", trusted_keys=[public])
    load(bounds).close()  # without keys the hashes are all that is checked: they only catch accidents
    blobs = members_of(signed)
    blobs["signatures.json"] = b'[{"key": "zz", "signature": "x"}]'
    bad = write_zip(tmp_path / "bad.bitrl", blobs)
    refused(bad, "signatures.json holds an entry without a key id", trusted_keys=[public])
    sign_artifact(bad, private)  # signing again (as the message says) replaces the broken signatures.json
    load(bad, trusted_keys=[public]).close()


def test_run_command_enforces_trusted_keys(artifact, tmp_path, keys):
    private, public, _ = keys[0]
    result = CliRunner().invoke(main, ["run", str(artifact), "--env", "CartPole-v1", "--episodes", "1",
                                       "--trusted-key", str(public)])
    assert result.exit_code == 1 and "is not signed by any trusted key" in result.output, result.output
    signed = tmp_path / "s.bitrl"
    signed.write_bytes(artifact.read_bytes())
    sign_artifact(signed, private)
    result = CliRunner().invoke(main, ["run", str(signed), "--env", "CartPole-v1", "--episodes", "1"],
                                env={signing.ENV: str(public)})
    assert result.exit_code == 0 and "mean return" in result.output, result.output


def test_the_runtime_imports_cryptography_only_for_signatures(artifact, keys):
    code = ("import sys\nfrom bitrl_compile.runtime import load\n"
            f"load({str(artifact)!r}).close()\n"
            "assert 'cryptography' not in sys.modules, 'cryptography imported without keys'\n")
    env = {k: v for k, v in os.environ.items() if k != signing.ENV}
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)


# ------------------------------------------------------------------------------------------------- limits

def test_a_zip_bomb_is_refused_before_inflating(artifact, tmp_path):
    """The issue's case: a 1 MB artifact made `inspect` peak at 2.1 GB. Now the zip directory's sizes are checked
    first: `inspect` and `load` refuse it at once, in a child process whose peak memory stays small."""
    bomb = tmp_path / "bomb.bitrl"
    blobs = members_of(artifact)
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in blobs.items():
            if name != "lib.so":
                z.writestr(name, data)
        with z.open("lib.so", "w") as f:
            for _ in range(16):
                f.write(bytes(16 << 20))  # 256 MiB of zeros: about 1.1 MB stored
    assert bomb.stat().st_size < 2 << 20
    code = ("from bitrl_compile.runtime import ArtifactError, read_artifact\n"
            f"try:\n    read_artifact({str(bomb)!r})\nexcept ArtifactError as e:\n    print(e)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.splitlines()
    assert "member lib.so would inflate" in out[0] and "a zip bomb" in out[0], out
    assert int(out[1]) < 200 * 1024, f"peak RSS {int(out[1]) // 1024} MiB reading a 1 MB artifact"  # kB
    result = CliRunner().invoke(main, ["inspect", str(bomb)])
    assert result.exit_code == 1 and "a zip bomb" in result.output


def test_zip_structure_limits(artifact, tmp_path):
    blobs = members_of(artifact)
    many = dict(blobs, **{f"x{i}": b"" for i in range(MAX_MEMBERS)})
    refused(write_zip(tmp_path / "many.bitrl", many), f"more than an artifact's {MAX_MEMBERS}")
    refused(write_zip(tmp_path / "extra.bitrl", dict(blobs, **{"run_me.sh": b"echo"})), "unknown member 'run_me.sh'")
    runtime_added = dict(blobs, **{"libtvm_runtime.so": b"\x7fELF"})  # not in the (signed) manifest's list
    refused(write_zip(tmp_path / "added.bitrl", runtime_added), "in the zip but not in the manifest's members list")
    twice = tmp_path / "twice.bitrl"
    write_zip(twice, blobs)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(twice, "a") as z:
        z.writestr("lib.so", b"other")
    refused(twice, "holds member lib.so twice")
    bz2 = write_zip(tmp_path / "bz2.bitrl", blobs, compression=zipfile.ZIP_BZIP2)
    refused(bz2, "compression method 12 (expected STORED or DEFLATE)")


# ------------------------------------------------------------------------------------ a lib.so that won't load

@pytest.mark.parametrize("kind", ["garbage", "aarch64", "truncated"])
def test_a_lib_so_the_loader_refuses_is_one_line(artifact, tmp_path, kind):
    if kind == "aarch64":
        if not (AARCH64_LIB / "libz.so.1").exists():
            pytest.skip("the emulator's aarch64 sysroot is not built")
        lib, says = (AARCH64_LIB / "libz.so.1").read_bytes(), "a library for aarch64, and this machine is x86_64"
    elif kind == "truncated":  # the loader would map past the end of the file: SIGBUS, unless checked first
        lib = members_of(artifact)["lib.so"]
        lib, says = lib[: len(lib) // 2], "truncated: a segment ends past the file"
    else:
        lib, says = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an ELF library"
    path = rewrite(artifact, tmp_path / f"{kind}.bitrl", members=lambda b: dict(b, **{"lib.so": lib}))
    message = refused(path, f"lib.so cannot be loaded ({says}); recompile the artifact for this machine")
    assert "/tmp/bitrl-" not in message  # not the deleted temporary file's name
    result = CliRunner().invoke(main, ["run", str(path), "--env", "CartPole-v1", "--episodes", "1"])
    assert result.exit_code == 1 and "lib.so cannot be loaded" in result.output, result.output


# ------------------------------------------------------------------------------- open_policy and the emulator

def test_open_policy_enforces_trusted_keys(artifact, tmp_path, keys, monkeypatch):
    """One home for "open an artifact here, trusting these keys": devices.open_policy (what `run` calls)."""
    from bitrl_compile.devices import open_policy

    private, public, _ = keys[0]
    monkeypatch.delenv(signing.ENV, raising=False)
    with pytest.raises(ArtifactError, match="is not signed by any trusted key"):
        open_policy(artifact, [public])
    signed = tmp_path / "s.bitrl"
    signed.write_bytes(artifact.read_bytes())
    sign_artifact(signed, private)
    with open_policy(signed, [public]) as policy:
        assert policy.act(np.zeros(4, np.float32)) in (0, 1)
    monkeypatch.setenv(signing.ENV, str(public))
    with pytest.raises(ArtifactError, match="is not signed by any trusted key"):
        open_policy(artifact)


def test_the_emulator_verifies_on_the_host_before_starting_the_guest(artifact, keys, monkeypatch):
    """The guest's Python has no `cryptography`: EmulatedPolicy checks the signature here, so an unsigned artifact
    is refused in one line naming the artifact (not the verified copy), before qemu starts."""
    from bitrl_compile.devices import EmulatedPolicy

    monkeypatch.setenv(signing.ENV, str(keys[0][1]))
    with pytest.raises(ArtifactError) as e:
        EmulatedPolicy(artifact)
    assert str(e.value).startswith(f"{artifact} is not signed by any trusted key"), str(e.value)
    with pytest.raises(ArtifactError, match="cannot be read"):
        EmulatedPolicy(artifact.with_name("missing.bitrl"))
