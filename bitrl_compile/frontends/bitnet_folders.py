"""Checkpoint folders (config.json + safetensors): a BitNet backbone (config.json's "bitrl_backbone") as it is, or a
stock Hugging Face BitNet checkpoint (a language model) wrapped as a state encoder whose input the environment
gives (`encoder={"kind": "text"|"numeric", "pool": ..., "decimals": ...}`, the CLI's --encoder/--pool/--decimals)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from bitrl_compile import bitnet
from bitrl_compile.frontends.specs import _env_spaces, _space_name
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError

ENCODER_SEED = 0  # the numeric encoder's projections of a stock checkpoint are drawn from this seed


def is_checkpoint_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def load_bitnet_folder(path: Path, env_id: str | None, encoder: dict | None) -> LoadedPolicy:
    """The features policy of a checkpoint folder (see the module docstring)."""
    folder, hf, _ = bitnet.checkpoint_files(path)  # config.json checked as BitNet before any tensor is read
    if "bitrl_backbone" in hf:
        if encoder:
            raise ModelLoadError(f"{folder}: a state encoder already (\"bitrl_backbone\" in config.json); compile it "
                                 "without --encoder/--pool/--decimals")
        return bitnet.backbone_policy(bitnet.load_backbone(folder))
    if not encoder or not encoder.get("kind"):
        raise ModelLoadError(f"{folder}: a Hugging Face BitNet checkpoint (a language model: config.json has no "
                             "\"bitrl_backbone\" entry); give --encoder text|numeric and --env ID to compile it as "
                             "a state encoder")
    spec = encoder_spec(folder, env_id, encoder)
    backbone = bitnet.stock_backbone(folder, spec, seed=ENCODER_SEED, trim_embeddings=True,  # compiled only
                                      progress=_load_progress(folder))
    cfg = backbone.model.config
    description = (f"BitNet b1.58 checkpoint {folder.name} as a state encoder ({spec.kind} encoder for {env_id}, "
                   f"{cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {spec.pool} token)")
    return bitnet.backbone_policy(backbone, description, copy_module=False)  # loaded only to be compiled


def _load_progress(folder: Path):
    """A line on stderr per layer loaded, with the elapsed time and resident memory, for checkpoints whose load
    takes a while (more than 4 layers; 2B4T's 30 take minutes): the compile's first stage."""
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if total > 4:
            print(f"  [{time.perf_counter() - t0:6.1f} s, RSS {_rss_gib():.2f} GiB] loaded layer {done}/{total} of "
                  f"{folder.name}", file=sys.stderr, flush=True)

    return progress


def _rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 2**20
    except (OSError, StopIteration, ValueError):
        return 0.0


def encoder_spec(folder: Path, env_id: str | None, encoder: dict) -> bitnet.EncoderSpec:
    """The EncoderSpec of --encoder/--pool/--decimals for `env_id`'s observations (a Box, flattened)."""
    if not env_id:
        raise ModelLoadError(f"{folder}: --encoder needs --env ID: the environment's observations are the encoder's "
                             "input")
    obs_space, _ = _env_spaces(folder, env_id)
    if obs_space["type"] != "Box" or not obs_space.get("shape"):
        raise ModelLoadError(f"{folder}: {env_id}'s observation space is {_space_name(obs_space)}; the BitNet "
                             "encoders take Box vectors")
    decimals = encoder.get("decimals")
    return bitnet.EncoderSpec(kind=encoder["kind"], obs_dim=math.prod(int(d) for d in obs_space["shape"]),
                              pool=encoder.get("pool") or "last", decimals=2 if decimals is None else int(decimals),
                              env=env_id)
