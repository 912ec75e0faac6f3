"""Commands of the trust model (docs/security.md): keygen, sign; and what run and inspect use of it.

    bitrl-compile keygen --out release                  release (private, 0600) and release.pub (public)
    bitrl-compile sign policy.bitrl --key release        add release's signature to policy.bitrl
    BITRL_TRUSTED_KEYS=release.pub bitrl-compile run policy.bitrl --env CartPole-v1   refuses unsigned artifacts
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import click

from bitrl_compile.cli.common import guard


@click.command("keygen")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="NAME: writes NAME (the private key, mode 0600: keep it secret) and NAME.pub (the public key)")
@click.option("--force", is_flag=True, help="overwrite an existing key pair")
@click.option("--debug", is_flag=True)
def keygen_cmd(out, force, debug):
    """Make an Ed25519 key pair for signing artifacts (`bitrl-compile sign`); devices trust NAME.pub."""
    with guard(debug):
        from bitrl_compile.runtime.signing import write_keypair

        private, public, key_id = write_keypair(out, force=force)
        click.echo(f"private key {private} (keep it secret), public key {public}; key id {key_id}")


@click.command("sign")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False),
              help="the private key (PEM PKCS8, as `bitrl-compile keygen` writes it)")
@click.option("--debug", is_flag=True)
def sign_cmd(artifact, key, debug):
    """Sign ARTIFACT's manifest (which lists every member's sha256) with KEY; the file is rewritten atomically,
    its manifest and members unchanged. Devices then load it with the public key as a trusted key."""
    with guard(debug):
        from bitrl_compile.runtime.artifact import sign_artifact

        key_id = sign_artifact(artifact, key)
        click.echo(f"{artifact}: signed by key {key_id}")


def signature_line(art) -> str:
    """inspect's line on who signed an artifact, and whether the keys of BITRL_TRUSTED_KEYS accept it."""
    from bitrl_compile.runtime import signing

    signed = ", ".join(k[:16] for k in art.signed_by)
    line = f"  signatures: key {signed}" if signed else "  signatures: none (unsigned)"
    try:
        keys = signing.trusted_keys(None)
        if keys:
            ok = signing.verify(art.manifest_bytes, art.signatures, keys) if art.manifest["format_version"] >= 2 \
                else []
            line += (f"; verified by trusted key {ok[0][:16]} of {signing.ENV}" if ok else
                     f"; not signed by any key of {signing.ENV}: load refuses it")
        elif signed:
            line += f" (not verified here: no trusted keys configured; set {signing.ENV})"
    except ValueError as e:
        line += f"; {e}"
    return line


def open_trusted(artifact, keys=()):
    """open_policy(artifact), with the signature checked against `keys` plus BITRL_TRUSTED_KEYS when any are
    configured. An artifact of another architecture is verified here and its verified bytes handed to the
    emulator (whose Python has no `cryptography`)."""
    from bitrl_compile import runtime
    from bitrl_compile.devices import EmulatedPolicy, open_policy, qemu_cpu
    from bitrl_compile.runtime import signing
    from bitrl_compile.runtime.policy import host_arch

    trusted = signing.trusted_keys(list(keys))
    if not trusted:
        return open_policy(artifact)
    art = runtime.read_artifact(artifact, trusted, payload=False)
    if art.manifest.get("target", {}).get("arch") == host_arch():
        return runtime.load(artifact, trusted)
    folder = tempfile.mkdtemp(prefix="bitrl-verified-")
    try:
        copy = os.path.join(folder, "policy.bitrl")
        shutil.copyfile(artifact, copy)
        art = runtime.read_artifact(copy, trusted)  # the bytes the emulator reads are the ones verified
        saved = os.environ.pop(signing.ENV, None)
        try:
            return EmulatedPolicy(copy, cpu=qemu_cpu(art.manifest))  # reads the copy while it starts
        finally:
            if saved is not None:
                os.environ[signing.ENV] = saved
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
