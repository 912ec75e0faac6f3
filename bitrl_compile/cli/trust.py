"""Commands of the trust model (docs/security.md): keygen, sign; and inspect's line on signatures.

    bitrl-compile keygen --out release                  release (private, 0600) and release.pub (public)
    bitrl-compile sign policy.bitrl --key release        add release's signature to policy.bitrl
    BITRL_TRUSTED_KEYS=release.pub bitrl-compile run policy.bitrl --env CartPole-v1   refuses unsigned artifacts

`run` (and every other caller) verifies signatures through `devices.open_policy`, which checks an artifact of
another architecture on the host before the emulator runs it.
"""

from __future__ import annotations

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
