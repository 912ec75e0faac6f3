"""The `policy.bitrl` artifact: one zip holding a compiled library, packed parameters and a manifest.

Members:
    manifest.json        format version, target, versions, input/output spec, layers, member hashes
    manifest.sha256      the sha256 of manifest.json's exact bytes (format 2): the manifest is hashed too
    lib.so               the compiled Relax VM library for the target (exported by TVM)
    params.safetensors   packed parameters, passed to the library's `main` after the observation
    libtvm_runtime.so    optional: the target's TVM runtime (--bundle-runtime), for devices without apache-tvm
    signatures.json      optional: Ed25519 signatures of manifest.json's bytes (`bitrl-compile sign`)

The manifest lists the sha256 of every payload member and manifest.sha256 holds the manifest's: together they
catch corruption and accidents, not an attacker (who recomputes them). A signature of the manifest by a trusted
key covers everything (signing.py, docs/security.md). `read_artifact` checks the zip's declared sizes before
decompressing anything (limits below: a zip bomb is refused cheaply), then the hashes and, when trusted keys
are configured, the signatures; nothing native is loaded here.
The compiler writes artifacts with `write_artifact` from this module (one definition of the format),
atomically with `files.write_atomic`: a temporary file in the destination folder, then a rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import signing
from .files import write_atomic
from .manifest import ManifestError, check_manifest

FORMAT = "bitrl"
FORMAT_VERSION = 2  # 2: manifest.sha256 (and optional signatures.json); 1: the manifest was not hashed
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
SIGNATURES = "signatures.json"
LIB = "lib.so"
PARAMS = "params.safetensors"
RUNTIME = "libtvm_runtime.so"
PAYLOAD = (LIB, PARAMS, RUNTIME)  # the members manifest["members"] lists with their sha256
KNOWN = (MANIFEST, MANIFEST_HASH, *PAYLOAD, SIGNATURES)

# Limits of the reader (runtime/capi/internal.h has the same numbers): far above any policy, far below what
# would exhaust a device's memory. Checked on the zip directory's declared sizes before anything is inflated.
MAX_MEMBERS = 16
MAX_MEMBER_BYTES = 2 << 30  # 2 GiB: a larger member needs zip64, which artifacts never use
MAX_TOTAL_BYTES = 4 << 30  # all members, uncompressed
MAX_FILE_BYTES = MAX_TOTAL_BYTES + (64 << 20)
MAX_SMALL = {MANIFEST: 16 << 20, MANIFEST_HASH: 128, SIGNATURES: 64 << 10}
MAX_RATIO, RATIO_FROM = 100, 1 << 20  # a member over 1 MiB may not inflate more than 100:1 (zip bombs)
MAX_JSON_DEPTH = 64
RECOMPILE = "recompile the artifact"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(ValueError):
    """A policy.bitrl file that cannot be used; the message names the problem and the fix."""


@dataclass
class Artifact:
    path: Path
    manifest: dict
    members: dict[str, bytes]  # the payload members' bytes (empty when read with payload=False)
    manifest_bytes: bytes = b""
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # every member: (stored, uncompressed) bytes
    signatures: list[dict] = field(default_factory=list)  # signatures.json's entries (not verified by this alone)
    verified_by: list[str] = field(default_factory=list)  # key ids whose signature verified against trusted keys

    @property
    def signed_by(self) -> list[str]:
        """The key ids signatures.json names (whether they verify needs the public keys: verified_by)."""
        return [entry["key"] for entry in self.signatures]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    """The bytes write_artifact stores for a manifest (hashed and signed exactly as written)."""
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def write_artifact(path: str | os.PathLike, manifest: dict, members: dict[str, bytes],
                   force: bool = False) -> Path:
    """Write manifest + members as one zip, atomically. Refuses to overwrite unless force."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    unknown = [name for name in members if name not in PAYLOAD]
    if unknown:
        raise ValueError(f"artifact members {unknown} are not part of the format; members are {list(PAYLOAD)}")
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                    members={name: sha256(data) for name, data in members.items()})
    text = manifest_bytes(manifest)
    write_atomic(path, lambda f: _write_zip(f, text, members, None))
    return path


def _write_zip(f, text: bytes, members: dict[str, bytes], signatures: bytes | None) -> None:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(MANIFEST, text)
        z.writestr(MANIFEST_HASH, sha256(text) + "\n")
        for name, data in members.items():
            z.writestr(name, data)
        if signatures is not None:
            z.writestr(SIGNATURES, signatures)


# ------------------------------------------------------------------------------------------------ reading

def _fail(path, message: str) -> ArtifactError:
    return ArtifactError(f"{path}: {message}")


def _directory(path, source) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """The zip (`source`: its bytes, or the open file) and its members by name, every declared size checked
    against the limits (nothing inflated)."""
    try:
        z = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
        infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
            NotImplementedError):
        raise _fail(path, "not a policy.bitrl artifact (not a zip, or truncated); recompile it with "
                          "`bitrl-compile MODEL -o FILE`") from None
    if len(infos) > MAX_MEMBERS:
        raise _fail(path, f"the zip has {len(infos)} members, more than an artifact's {MAX_MEMBERS}; "
                          f"not a policy.bitrl artifact, {RECOMPILE}")
    by_name: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        if name in by_name:
            raise _fail(path, f"the zip holds member {name} twice (a reader would pick one at random); {RECOMPILE}")
        if name not in KNOWN:
            raise _fail(path, f"unknown member {name[:80]!r} (an artifact holds only {', '.join(KNOWN)}); "
                              f"{RECOMPILE}")
        by_name[name] = info
        if info.flag_bits & 1:
            raise _fail(path, f"member {name} is encrypted; {RECOMPILE}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _fail(path, f"member {name} uses zip compression method {info.compress_type} (expected STORED "
                              f"or DEFLATE); {RECOMPILE}")
        size, stored = info.file_size, info.compress_size
        limit = MAX_SMALL.get(name, MAX_MEMBER_BYTES)
        if size > limit:
            raise _fail(path, f"member {name} declares {size:,} bytes, more than the limit of {limit:,}; "
                              f"not a policy.bitrl artifact (or corrupt), {RECOMPILE}")
        if info.compress_type == zipfile.ZIP_STORED and stored != size:
            raise _fail(path, f"member {name} is corrupt (stored sizes differ); {RECOMPILE}")
        if size > RATIO_FROM and size > MAX_RATIO * max(stored, 1):
            raise _fail(path, f"member {name} would inflate {stored:,} bytes to {size:,} (more than {MAX_RATIO}:1, "
                              f"a zip bomb); not a policy.bitrl artifact, {RECOMPILE}")
        total += size
    if total > MAX_TOTAL_BYTES:
        raise _fail(path, f"its members declare {total:,} bytes in all, more than the limit of {MAX_TOTAL_BYTES:,}; "
                          f"{RECOMPILE}")
    return z, by_name


def _read(path, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes: zipfile stops at the declared size (checked in _directory) and checks the CRC-32."""
    try:
        data = z.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, struct.error,
            NotImplementedError) as e:
        raise _fail(path, f"member {info.filename} is corrupt ({str(e)[:120]}); {RECOMPILE}") from None
    if len(data) != info.file_size:
        raise _fail(path, f"member {info.filename} is truncated; the file is incomplete, recompile it")
    return data


def _depth(value) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(raw: bytes, what: str, path) -> object:
    """JSON of a member, nesting at most MAX_JSON_DEPTH deep; ArtifactError (one line) otherwise."""
    try:
        value = json.loads(raw)
    except RecursionError:
        value = None
        deep = True
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise _fail(path, f"{what} is not valid JSON ({str(e)[:120]}); {RECOMPILE}") from None
    else:
        deep = _depth(value) > MAX_JSON_DEPTH
    if deep:
        raise _fail(path, f"{what} nests deeper than {MAX_JSON_DEPTH} levels; not a policy.bitrl artifact, "
                          f"{RECOMPILE}")
    return value


def _check_manifest(path, manifest, names: Iterable[str]) -> int:
    """The manifest's form: an object of format "bitrl", a version this runtime reads, a members list of the
    payload members with their sha256 (every payload member in the zip listed). Returns the format version."""
    if not isinstance(manifest, dict):
        raise _fail(path, f"{MANIFEST} holds a JSON {type(manifest).__name__}, not an object; "
                          f"not a policy.bitrl artifact, {RECOMPILE}")
    if manifest.get("format") != FORMAT:
        raise _fail(path, f"manifest format is {str(manifest.get('format'))[:40]!r}, expected {FORMAT!r}; "
                          "not a policy.bitrl artifact")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise _fail(path, f"manifest format_version {str(version)[:40]!r} is not a positive integer; {RECOMPILE}")
    if version > FORMAT_VERSION:
        raise _fail(path, f"artifact format version {version} is newer than this runtime reads ({FORMAT_VERSION}); "
                          "upgrade bitrl-compile on this device")
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise _fail(path, f"manifest has no members list; {RECOMPILE}")
    for name, digest in listed.items():
        if name not in PAYLOAD:
            raise _fail(path, f"manifest lists unknown member {name[:80]!r} (members are {', '.join(PAYLOAD)}); "
                              f"{RECOMPILE}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _fail(path, f"manifest lists member {name} with an invalid sha256; {RECOMPILE}")
    for name in names:
        if name in PAYLOAD and name not in listed:
            raise _fail(path, f"member {name} is in the zip but not in the manifest's members list (added after "
                              f"compiling?); {RECOMPILE}")
    for required in (LIB, PARAMS):
        if required not in listed:
            raise _fail(path, f"member {required} is missing; {RECOMPILE}")
    return version


NO_KEYS = "trust it without keys (no trusted_keys / --trusted-key / BITRL_TRUSTED_KEYS)"


def _check_signatures(path, version: int, text: bytes, entries: list[dict], keys: list[bytes]) -> list[str]:
    """The key ids of trusted keys whose signature of the manifest verifies; ArtifactError if there is none."""
    ids = ", ".join(signing.key_id(k)[:16] for k in keys)
    if version < 2:
        raise _fail(path, f"format {version} artifacts cannot be signed, and trusted keys are configured "
                          f"(keys: {ids}); recompile it and sign it with `bitrl-compile sign`, or {NO_KEYS}")
    try:
        verified = signing.verify(text, entries, keys)
    except signing.SigningError as e:
        raise _fail(path, str(e)) from None
    if not verified:
        raise ArtifactError(f"{path} is not signed by any trusted key (keys: {ids}); sign it with "
                            f"`bitrl-compile sign`, or {NO_KEYS}")
    return verified


def read_artifact(path: str | os.PathLike, trusted_keys: Iterable | None = None, *, payload: bool = True,
                  use_env: bool = True, signatures: bool = True, params: bool = True) -> Artifact:
    """Read and verify an artifact: limits, zip structure, format version, the manifest's sha256, signatures
    when trusted keys are configured, the manifest's structure (manifest.py), and every payload member's sha256.

    trusted_keys: public keys (PEM file paths, PEM bytes, or raw 32-byte Ed25519 keys), joined by the paths
    in BITRL_TRUSTED_KEYS unless use_env is False. When there are any, the artifact must carry a valid
    signature by one of them. payload=False checks everything but leaves lib.so and the parameters unread
    (what `inspect` needs: a cheap look that never decompresses them). signatures=False leaves signatures.json
    unread (what `sign` needs to replace a broken one; no trusted keys then). params=False leaves
    params.safetensors in the file, unread and so not yet checked against its sha256: `load_params(art)` then
    reads it once, front to back, and checks it (the stored parameters are never held whole). The file is read a
    member at a time, never whole."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such artifact file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"{size:,} bytes, more than an artifact's limit of {MAX_FILE_BYTES:,}; "
                          "not a policy.bitrl artifact")
    try:
        keys = signing.trusted_keys(trusted_keys, use_env=use_env)
    except signing.SigningError as e:
        raise _fail(path, str(e)) from None
    with open(path, "rb") as f:
        return _read_open(path, f, keys, payload=payload, signatures=signatures, params=params)


def _read_open(path: Path, f, keys: list[bytes], *, payload: bool, signatures: bool, params: bool) -> Artifact:
    z, infos = _directory(path, f)
    if MANIFEST not in infos:
        raise _fail(path, f"no {MANIFEST} inside; not a policy.bitrl artifact")
    text = _read(path, z, infos[MANIFEST])
    manifest = parse_json(text, MANIFEST, path)
    version = _check_manifest(path, manifest, infos)
    if MANIFEST_HASH in infos:
        recorded = _read(path, z, infos[MANIFEST_HASH]).decode("ascii", "replace").strip()
        if recorded != sha256(text):
            raise _fail(path, f"{MANIFEST} fails its sha256 check (tampered or corrupt); {RECOMPILE}")
    elif version >= 2:
        raise _fail(path, f"member {MANIFEST_HASH} is missing; the file is incomplete, recompile it")
    entries: list[dict] = []
    if SIGNATURES in infos and (signatures or keys):
        try:
            entries = signing.parse_signatures(parse_json(_read(path, z, infos[SIGNATURES]), SIGNATURES, path))
        except signing.SigningError as e:
            raise _fail(path, str(e)) from None
    verified = _check_signatures(path, version, text, entries, keys) if keys else []
    try:  # the structure of every field the readers use (runtime/manifest.py), once hashes and signatures pass
        check_manifest(manifest)
    except ManifestError as e:
        raise _fail(path, f"{e}; {RECOMPILE}") from None
    listed = manifest["members"]
    missing = [name for name in listed if name not in infos]
    if missing:
        raise _fail(path, f"member {missing[0]} is missing; the file is incomplete, recompile it")
    members = {}
    for name, digest in listed.items():
        if not payload or (name == PARAMS and not params):
            continue
        blob = _read(path, z, infos[name])
        if sha256(blob) != digest:
            raise _fail(path, f"member {name} fails its sha256 check (tampered or corrupt); {RECOMPILE}")
        members[name] = blob
    return Artifact(path=path, manifest=manifest, members=members, manifest_bytes=text,
                    sizes={n: (i.compress_size, i.file_size) for n, i in infos.items()},
                    signatures=entries, verified_by=verified)


class _Hashing:
    """A member's stream (zipfile's: it inflates chunk by chunk and checks the CRC-32 at the end) that hashes
    what is read through it."""

    def __init__(self, stream):
        self.stream, self.hash, self.read_bytes = stream, hashlib.sha256(), 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.hash.update(data)
        self.read_bytes += len(data)
        return data


def _tampered(path, info: zipfile.ZipInfo, digest: str) -> bool:
    """Whether a member's bytes fail their sha256 (or cannot be read whole), read again chunk by chunk."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f).open(info) as member:
            while chunk := member.read(4 << 20):
                h.update(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, struct.error, ValueError):
        return True
    return h.hexdigest() != digest


def load_params(art: Artifact) -> dict:
    """The parameters of an artifact read with params=False, as `Policy` takes them (weights unpacked into their
    compute layout): params.safetensors read once from the file, front to back (`weights.read_params`), and
    checked against the manifest's sha256 (and the zip's CRC-32) once read, before anything uses them. Peak
    memory: the unpacked parameters plus a block of stored rows and their codes; never the stored member whole.
    The file is opened again (the sha256 ties what is read now to the manifest read before).
    ArtifactError (one line) if the member is corrupt, tampered with or not a safetensors file."""
    from . import weights  # numpy: only a loader needs it

    path = art.path
    digest = art.manifest["members"][PARAMS]
    try:
        with open(path, "rb") as f:
            z, infos = _directory(path, f)
            if PARAMS not in infos:
                raise _fail(path, f"member {PARAMS} is missing; the file is incomplete, recompile it")
            info = infos[PARAMS]
            with z.open(info) as member:
                stream = _Hashing(member)
                params = weights.read_params(stream, info.file_size, art.manifest.get("weights", {}))
                stream.read(1)  # the end: zipfile checks the CRC-32 there
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, struct.error) as e:
        raise _fail(path, f"member {PARAMS} is corrupt ({str(e)[:120]}); {RECOMPILE}") from None
    except ArtifactError:
        raise
    except ValueError as e:  # a tampered member is the likelier cause: say so if its hash says so
        raise _fail(path, f"member {PARAMS} fails its sha256 check (tampered or corrupt); {RECOMPILE}"
                    if _tampered(path, info, digest) else f"{PARAMS} is unreadable ({e}); {RECOMPILE}") from None
    if stream.read_bytes != info.file_size or stream.hash.hexdigest() != digest:
        raise _fail(path, f"member {PARAMS} fails its sha256 check (tampered or corrupt); {RECOMPILE}")
    return params


def sign_artifact(path: str | os.PathLike, private_key: str | os.PathLike | bytes) -> str:
    """Add an Ed25519 signature of the manifest (private key: a PEM PKCS8 file or its bytes) to signatures.json,
    replacing an older signature by the same key; the manifest and every other member stay byte for byte.
    The artifact is verified first and rewritten atomically. Returns the key id."""
    art = read_artifact(path, use_env=False, signatures=False)
    if art.manifest["format_version"] < 2:
        raise _fail(path, f"format {art.manifest['format_version']} artifacts cannot be signed (their manifest "
                          "is not hashed); recompile it with this bitrl-compile, then sign it")
    entry = signing.sign(art.manifest_bytes, private_key)
    try:  # the other keys' signatures stay; a signatures.json that cannot be read is replaced
        old = read_artifact(path, use_env=False, payload=False).signatures
    except ArtifactError:
        old = []
    entries = [e for e in old if e["key"] != entry["key"]] + [entry]
    blob = json.dumps(entries, indent=2).encode()
    if len(blob) > MAX_SMALL[SIGNATURES]:
        raise _fail(path, f"too many signatures ({len(entries)}) for {SIGNATURES}'s limit; drop old ones")
    mode = os.stat(path).st_mode & 0o777
    write_atomic(path, lambda f: _write_zip(f, art.manifest_bytes, art.members, blob), mode=mode)
    return entry["key"]
