"""Observation normalisation statistics (SB3 VecNormalize, JSON, .npz) and the warning when a policy looks
trained on normalised observations but none were given."""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np

from bitrl_compile.loaded import LoadedPolicy, ModelLoadError


def read_normalization(path, *, trust_pickle: bool = False) -> dict | None:
    """Observation statistics as {"mean", "var", "eps", "clip"} from JSON, .npz or (trusted) vecnormalize.pkl."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such normalisation file; check the --vecnormalize path")
    data = path.read_bytes()
    if path.suffix == ".json" or data.lstrip()[:1] == b"{":
        try:
            d = json.loads(data)
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e}); write {{\"mean\": [...], \"var\": [...]}}") from None
    elif data.startswith(b"PK"):
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (ValueError, zipfile.BadZipFile) as e:
            raise ModelLoadError(f"{path}: not a readable .npz of arrays ({e}); save mean and var with np.savez") \
                from None
    else:
        if not trust_pickle:
            raise ModelLoadError(f"{path}: SB3's vecnormalize.pkl is a pickle that can run code when loaded; pass "
                                 "--trust-pickle (trust_pickle=True) if you trust it, or give the statistics as "
                                 "JSON {\"mean\": [...], \"var\": [...], \"clip_obs\": 10.0, \"epsilon\": 1e-8}")
        try:
            vn = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - unpickling trusted data can raise anything
            raise ModelLoadError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); install stable-baselines3 "
                                 "or give the statistics as JSON") from None
        if not getattr(vn, "norm_obs", True):
            warnings.warn(f"{path}: VecNormalize has norm_obs=False; observations are not normalised", stacklevel=3)
            return None
        rms = getattr(vn, "obs_rms", None)
        if not hasattr(rms, "mean"):
            raise ModelLoadError(f"{path}: no obs_rms with mean/var (Dict observations are not supported yet)")
        d = {"mean": rms.mean, "var": rms.var, "clip_obs": getattr(vn, "clip_obs", None),
             "epsilon": getattr(vn, "epsilon", 1e-8)}
    if isinstance(d.get("obs_rms"), dict):
        d = {**d, **d["obs_rms"]}
    if "mean" not in d or "var" not in d:
        raise ModelLoadError(f"{path}: normalisation statistics need \"mean\" and \"var\" (found {sorted(d)})")
    clip = d.get("clip_obs", d.get("clip"))
    eps = d.get("epsilon", d.get("eps", 1e-8))
    return {"mean": np.asarray(d["mean"], np.float64).ravel().tolist(),
            "var": np.asarray(d["var"], np.float64).ravel().tolist(),
            "eps": float(np.asarray(eps)), "clip": None if clip is None else float(np.asarray(clip))}


def _warn_if_normalisation_missing(loaded: LoadedPolicy, path: Path) -> None:
    """SB3 runs keep VecNormalize statistics beside the model; CleanRL continuous PPO always normalises."""
    if loaded.source.startswith("sb3-"):
        for c in [path.parent / "vecnormalize.pkl", *sorted(path.parent.glob("*/vecnormalize.pkl"))]:
            if c.is_file():
                warnings.warn(f"{path}: found {c}: the policy was probably trained on VecNormalize-d observations; "
                              f"pass --vecnormalize {c} (with --trust-pickle) or its statistics as JSON",
                              stacklevel=4)
                return
    if loaded.source == "cleanrl-ppo" and loaded.output.get("kind") == "continuous":
        warnings.warn(f"{path}: CleanRL continuous PPO trains on NormalizeObservation-ed observations; pass their "
                      "statistics (--vecnormalize stats.json) or the policy will see raw ones", stacklevel=4)
