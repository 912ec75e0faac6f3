"""Plain state_dicts (from .safetensors or a weights-only torch file), dispatched by their keys to a CleanRL
agent or to the generic "mlp" with a config; .safetensors files (config in the metadata)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bitrl_compile.frontends.cleanrl import _load_cleanrl
from bitrl_compile.frontends.mlp import _load_mlp_config, check_state_dict
from bitrl_compile.frontends.zips import first_line
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError


def _load_state_dict(path: Path, sd, cfg: dict) -> LoadedPolicy:
    """Dispatch a plain state_dict by its keys: CleanRL agents, or the generic "mlp" with a config."""
    sd = check_state_dict(sd, str(path), "save `model.state_dict()` or an exported program")
    if sd and all(re.match(r"\d+\.", k) for k in sd):  # the state_dict of a bare nn.Sequential
        sd = {f"net.{k}": v for k, v in sd.items()}
    keys = set(sd)
    if {"actor.0.weight", "critic.0.weight"} <= keys or {"actor_mean.0.weight", "actor_logstd"} <= keys \
            or ("network.0.weight" in keys and all(k.startswith("network.") for k in keys)) \
            or {"network.0.weight", "actor.weight", "critic.weight"} <= keys:  # ppo_atari.py
        return _load_cleanrl(path, sd, cfg)
    if any(k.startswith("net.") for k in keys) or cfg:
        if not cfg:
            raise ModelLoadError(f"{path}: a state_dict needs an architecture: pass config= (JSON) with "
                                 "{\"arch\": \"mlp\", \"obs_shape\": [...], \"hidden\": [...], \"output\": {...}}")
        return _load_mlp_config(path, sd, cfg)
    raise ModelLoadError(f"{path}: state_dict with keys like {sorted(keys)[:3]} is not a known policy layout; "
                         "save an nn.Sequential as net.* with a config (save_mlp_policy), or export it (torch.export)")


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and int.from_bytes(head[:8], "little") < (1 << 27) and head[8:9] == b"{"


def _load_safetensors(path: Path, cfg: dict) -> LoadedPolicy:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError) as e:  # the library's message can span lines and quote the header
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({first_line(e)}); save it again") \
            from None
    if "config" in meta:
        try:
            saved = json.loads(meta["config"])
        except (json.JSONDecodeError, RecursionError) as e:
            raise ModelLoadError(f"{path}: the metadata \"config\" is not JSON ({str(e)[:120] or 'too deep'}); "
                                 "rewrite it with save_mlp_policy") from None
        if not isinstance(saved, dict):
            raise ModelLoadError(f"{path}: the metadata \"config\" is a JSON {type(saved).__name__}, not an "
                                 "object; rewrite it with save_mlp_policy")
        cfg = {**saved, **cfg}
    return _load_state_dict(path, sd, cfg)
