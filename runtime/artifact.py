"""The `policy.bitrl` artifact: one zip holding a compiled library, packed parameters and a manifest.

Members:
    manifest.json        format version, target, versions, input/output spec, layers, member hashes
    lib.so               the compiled Relax VM library for the target (exported by TVM)
    params.safetensors   packed parameters, passed to the library's `main` after the observation
    libtvm_runtime.so    optional: the target's TVM runtime (--bundle-runtime), for devices without apache-tvm

The manifest lists the sha256 of every other member; `read_artifact` verifies them all.
The compiler writes artifacts with `write_artifact` from this module (one definition of the
format), atomically with `files.write_atomic`: a temporary file in the destination folder, then a rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .files import write_atomic

FORMAT = "bitrl"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIB = "lib.so"
PARAMS = "params.safetensors"
RUNTIME = "libtvm_runtime.so"


class ArtifactError(ValueError):
    """A policy.bitrl file that cannot be used; the message names the problem and the fix."""


@dataclass
class Artifact:
    path: Path
    manifest: dict
    members: dict[str, bytes]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(path: str | os.PathLike, manifest: dict, members: dict[str, bytes],
                   force: bool = False) -> Path:
    """Write manifest + members as one zip, atomically. Refuses to overwrite unless force."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                    members={name: sha256(data) for name, data in members.items()})

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            for name, data in members.items():
                z.writestr(name, data)

    write_atomic(path, write)
    return path


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify an artifact: zip structure, format version, and every member's sha256."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    data = path.read_bytes()
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = set(z.namelist())
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path}: not a policy.bitrl artifact (not a zip, or truncated); "
                            "recompile it with `bitrl-compile MODEL -o FILE`") from None
    if MANIFEST not in names:
        raise ArtifactError(f"{path}: no {MANIFEST} inside; not a policy.bitrl artifact")
    try:
        manifest = json.loads(z.read(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path}: {MANIFEST} is unreadable ({e}); recompile the artifact") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is newer than this runtime "
                            f"reads ({FORMAT_VERSION}); upgrade bitrl-compile on this device")
    members = {}
    for name, digest in manifest.get("members", {}).items():
        if name not in names:
            raise ArtifactError(f"{path}: member {name} is missing; the file is incomplete, recompile it")
        try:
            blob = z.read(name)
        except (zipfile.BadZipFile, OSError) as e:
            raise ArtifactError(f"{path}: member {name} is corrupt ({e}); recompile the artifact") from None
        if sha256(blob) != digest:
            raise ArtifactError(f"{path}: member {name} fails its sha256 check (tampered or corrupt); "
                                "recompile the artifact")
        members[name] = blob
    for required in (LIB, PARAMS):
        if required not in members:
            raise ArtifactError(f"{path}: member {required} is missing; recompile the artifact")
    return Artifact(path=path, manifest=manifest, members=members)
