"""Ed25519 signatures of artifacts: who made this policy.bitrl (docs/security.md).

What is signed is manifest.json's exact bytes: the manifest lists the sha256 of every other member, so one
signature covers the whole artifact. signatures.json holds a list of

    {"algorithm": "ed25519", "key": KEY_ID, "signature": BASE64}

where KEY_ID is the sha256 (hex) of the raw 32-byte public key. Trusted keys come from the caller and from
BITRL_TRUSTED_KEYS (colon-separated paths of public key PEM files); with any configured, `load` refuses an
artifact without a valid signature by one of them.

Public keys are read here without `cryptography` (an Ed25519 PEM is a fixed 12-byte DER prefix and the key), so
a device imports it only to verify a signature, to sign, or to make keys; `pip install cryptography` if absent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .files import write_atomic

ENV = "BITRL_TRUSTED_KEYS"
ALGORITHM = "ed25519"
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # DER SubjectPublicKeyInfo of an Ed25519 key
MAX_KEY_FILE = 64 << 10
MAX_SIGNATURES = 64
_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----(.*?)-----END \1-----", re.DOTALL)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SigningError(ValueError):
    """A key or signature that cannot be used; the message names the problem and the fix."""


def _crypto():
    """cryptography's Ed25519 classes, imported only when a signature is made or checked."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError("checking or making signatures needs the `cryptography` package; "
                           "run `pip install cryptography`") from None
    return ed25519, serialization, InvalidSignature


def key_id(raw: bytes) -> str:
    """A public key's id: the sha256 (hex) of its raw 32 bytes."""
    return hashlib.sha256(raw).hexdigest()


def _from_pem(text: bytes, where: str) -> bytes:
    match = _PEM.search(text)
    if match is None:
        raise SigningError(f"{where} is not a PEM public key; give the NAME.pub file `bitrl-compile keygen` wrote")
    if match.group(1) != b"PUBLIC KEY":
        hint = " (this is the private key: give NAME.pub)" if b"PRIVATE" in match.group(1) else ""
        raise SigningError(f"{where} holds a {match.group(1).decode()}, not a PUBLIC KEY{hint}")
    try:
        der = base64.b64decode(b"".join(match.group(2).split()), validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"{where}: its PEM body is not base64; give the NAME.pub file `bitrl-compile keygen` "
                           "wrote") from None
    if len(der) != len(SPKI_PREFIX) + 32 or not der.startswith(SPKI_PREFIX):
        raise SigningError(f"{where} is not an Ed25519 public key (artifacts are signed with Ed25519); make one "
                           "with `bitrl-compile keygen`")
    return der[len(SPKI_PREFIX):]


def public_key(key, origin: str = "") -> bytes:
    """A trusted key as its raw 32 bytes: a path to a PEM file, PEM bytes, raw bytes, or a cryptography key."""
    if hasattr(key, "public_bytes_raw"):
        return key.public_bytes_raw()
    if isinstance(key, (bytes, bytearray, memoryview)):
        key = bytes(key)
        if len(key) == 32:
            return key
        if key.lstrip().startswith(b"-----BEGIN"):
            return _from_pem(key, "a trusted key (PEM bytes)")
        raise SigningError(f"a trusted key of {len(key)} bytes is neither PEM nor a raw 32-byte Ed25519 key")
    if not isinstance(key, (str, os.PathLike)):
        raise SigningError(f"a trusted key must be a path, PEM bytes or 32 raw bytes, not {type(key).__name__}")
    path = Path(key)
    where = f"trusted key {path}{origin}"
    if not path.is_file():
        raise SigningError(f"{where} does not exist; fix the path" + (f" or unset {ENV}" if origin else ""))
    if path.stat().st_size > MAX_KEY_FILE:
        raise SigningError(f"{where} is {path.stat().st_size:,} bytes, too large for a public key file")
    return _from_pem(path.read_bytes(), where)


def trusted_keys(keys: Iterable | None = None, use_env: bool = True) -> list[bytes]:
    """The keys `keys` names plus those of BITRL_TRUSTED_KEYS (unless use_env is False), raw, without repeats."""
    if isinstance(keys, (str, bytes, bytearray, os.PathLike)) or hasattr(keys, "public_bytes_raw"):
        keys = [keys]
    raw = [public_key(k) for k in (keys or [])]
    if use_env:
        raw += [public_key(p, f" (from {ENV})") for p in os.environ.get(ENV, "").split(":") if p.strip()]
    return list(dict.fromkeys(raw))


def parse_signatures(value) -> list[dict]:
    """signatures.json's entries, each {"algorithm", "key", "signature"} checked for form (not verified)."""
    fix = "sign the artifact again with `bitrl-compile sign`"
    if not isinstance(value, list) or len(value) > MAX_SIGNATURES:
        raise SigningError(f"signatures.json must be a list of at most {MAX_SIGNATURES} signatures; {fix}")
    entries = []
    for item in value:
        if not isinstance(item, dict) or item.get("algorithm", ALGORITHM) != ALGORITHM:
            raise SigningError(f"signatures.json holds an entry that is not an {ALGORITHM} signature; {fix}")
        key, signature = item.get("key"), item.get("signature")
        if not isinstance(key, str) or not _HEX64.fullmatch(key) or not isinstance(signature, str):
            raise SigningError(f"signatures.json holds an entry without a key id and a signature; {fix}")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 64:
            raise SigningError(f"signatures.json holds a signature that is not 64 base64-encoded bytes; {fix}")
        entries.append({"algorithm": ALGORITHM, "key": key, "signature": signature})
    return entries


def verify(message: bytes, entries: list[dict], keys: list[bytes]) -> list[str]:
    """The ids of `keys` whose signature among `entries` verifies `message`; SigningError when a trusted key's
    signature is there but wrong (the manifest changed after signing). Imports cryptography only if a trusted key
    signed."""
    by_id = {key_id(k): k for k in keys}
    candidates = [(e, by_id[e["key"]]) for e in entries if e["key"] in by_id]
    if not candidates:
        return []
    ed25519, _, invalid = _crypto()
    verified, wrong = [], []
    for entry, raw in candidates:
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(entry["signature"]), message)
            verified.append(entry["key"])
        except invalid:
            wrong.append(entry["key"])
    if not verified and wrong:
        raise SigningError(f"the signature by trusted key {wrong[0][:16]} does not verify (the manifest was changed "
                           "after signing, or the signature is corrupt); do not use this file, or sign it again with "
                           "`bitrl-compile sign`")
    return verified


def _private_key(key, ed25519, serialization):
    from cryptography.exceptions import UnsupportedAlgorithm

    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    where = "the private key" if isinstance(key, (bytes, bytearray)) else f"private key {key}"
    if not isinstance(key, (bytes, bytearray)):
        path = Path(key)
        if not path.is_file():
            raise SigningError(f"{where} does not exist; make a key pair with `bitrl-compile keygen --out NAME`")
        if path.stat().st_size > MAX_KEY_FILE:
            raise SigningError(f"{where} is too large for a key file")
        key = path.read_bytes()
    try:
        loaded = serialization.load_pem_private_key(bytes(key), password=None)
    except TypeError:
        raise SigningError(f"{where} is encrypted; give an unencrypted PEM PKCS8 key "
                           "(`bitrl-compile keygen` writes one)") from None
    except (ValueError, UnsupportedAlgorithm):
        what = "a public key (give the private key NAME, not NAME.pub)" if b"PUBLIC KEY-----" in key else \
            "not a PEM private key (give the NAME file `bitrl-compile keygen` wrote)"
        raise SigningError(f"{where} is {what}") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{where} is not an Ed25519 key; make one with `bitrl-compile keygen`")
    return loaded


def sign(message: bytes, private_key) -> dict:
    """A signatures.json entry: `message` signed with `private_key` (a PEM file path, PEM bytes, or a key)."""
    ed25519, serialization, _ = _crypto()
    key = _private_key(private_key, ed25519, serialization)
    raw = key.public_key().public_bytes_raw()
    return {"algorithm": ALGORITHM, "key": key_id(raw), "signature": base64.b64encode(key.sign(message)).decode()}


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM PKCS8, public PEM)."""
    ed25519, serialization, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def write_keypair(out: str | os.PathLike, force: bool = False) -> tuple[Path, Path, str]:
    """A new key pair written as OUT (private, mode 0600) and OUT.pub (public); returns both paths and the key id."""
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it (a key pair cannot be recovered)")
    if not private_path.parent.is_dir():
        raise FileNotFoundError(f"folder {private_path.parent} does not exist; create it first")
    private, public = generate_keypair()
    write_atomic(private_path, private, mode=0o600)
    write_atomic(public_path, public, mode=0o644)
    return private_path, public_path, key_id(_from_pem(public, str(public_path)))
