"""--encoder/--pool/--decimals: a stock Hugging Face BitNet checkpoint folder as a state encoder (compile, train)."""

from __future__ import annotations

from pathlib import Path

import click


def encoder_options(command):
    """The three options, for a command taking a BitNet checkpoint folder."""
    for option in reversed((
            click.option("--encoder", type=click.Choice(["text", "numeric"]),
                         help="a stock Hugging Face BitNet checkpoint folder as a state encoder: text (the state "
                              "written as text, a token per byte, the model's own embeddings) or numeric (a "
                              "projection per value); needs --env"),
            click.option("--pool", type=click.Choice(["last", "mean"]),
                         help="with --encoder: features = the last token's hidden state, or the mean [default: last]"),
            click.option("--decimals", type=click.IntRange(min=0),
                         help="with --encoder text: digits after the point per value [default: 2]"))):
        command = option(command)
    return command


def encoder_choice(model: str | None, env_id: str | None, encoder: str | None, pool: str | None,
                   decimals: int | None, what: str = "MODEL") -> dict | None:
    """{"kind", "pool", "decimals"} for the frontend, or None without the options; a usage error (naming the
    option) where they do not apply: `model` (named `what` on the command line) is not a checkpoint folder, no
    --encoder, --decimals without text, or no --env."""
    given = [name for name, value in (("--encoder", encoder), ("--pool", pool), ("--decimals", decimals))
             if value is not None]
    if not given:
        return None
    if not model or not (Path(model).is_dir() and (Path(model) / "config.json").is_file()):
        shown = f"{what} {model} is not one" if model else f"give one with {what}"
        raise click.UsageError(f"{given[0]} applies to a Hugging Face BitNet checkpoint folder (config.json + "
                               f"model.safetensors); {shown}")
    if encoder is None:
        raise click.UsageError(f"{given[0]} needs --encoder text|numeric")
    if decimals is not None and encoder != "text":
        raise click.UsageError("--decimals applies to --encoder text (the digits written per value)")
    if not env_id:
        raise click.UsageError("--encoder needs --env ID: the environment's observations are the encoder's input")
    return {"kind": encoder, "pool": pool, "decimals": decimals}


def stock_backbone_folder(checkpoint: str, env_id: str, encoder: dict, out: str) -> str:
    """OUT/backbone: a backbone folder referring to the stock checkpoint, with the encoder `compile --encoder` makes
    (`bitnet.save_backbone_reference`); what `train --backbone` then loads, and `bitrl-compile OUT/backbone`
    compiles."""
    from bitrl_compile import bitnet
    from bitrl_compile.frontends.bitnet_folders import ENCODER_SEED, encoder_spec

    folder = Path(out) / "backbone"
    spec = encoder_spec(Path(checkpoint), env_id, encoder)
    bitnet.save_backbone_reference(folder, checkpoint, spec, seed=ENCODER_SEED)
    return str(folder)
