"""Observation normalisation statistics (SB3 VecNormalize, JSON, .npz) and the warning when a policy looks
trained on normalised observations but none were given."""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from bitrl_compile.frontends.sb3 import trained_with_vecnormalize
from bitrl_compile.frontends.zips import check_zip_directory
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime.specs import check_normalize

MAX_STATS_BYTES = 64 << 20  # statistics of an observation of MAX_VALUES values, as JSON, with room to spare


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_npz(data: bytes, path: Path) -> dict:
    """Arrays of an .npz, each .npy header checked against its member's size before numpy allocates it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            check_zip_directory(zf, str(path), MAX_STATS_BYTES)
            out = {}
            for info in zf.infolist()[:16]:
                with zf.open(info) as f:
                    read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
                    if read_header is None:
                        raise ModelLoadError(f"{path}: member {info.filename[:60]!r} has an unknown .npy version; "
                                             "save mean and var with np.savez")
                    shape, _, dtype = read_header(f)
                    if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
                        raise ModelLoadError(f"{path}: member {info.filename[:60]!r} declares a {shape} {dtype} "
                                             "array that its bytes do not hold; save mean and var with np.savez")
                with zf.open(info) as f:
                    out[info.filename.removesuffix(".npy")] = np.lib.format.read_array(f, allow_pickle=False)
            return out
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: not a readable .npz of arrays ({str(e)[:160]}); save mean and var with "
                             "np.savez") from None


def read_normalization(path, *, trust_pickle: bool = False) -> dict | None:
    """Observation statistics as {"mean", "var", "eps", "clip"} from JSON, .npz or (trusted) vecnormalize.pkl; a
    Dict observation's (per key: obs_rms a dict of key -> {"mean", "var"}, norm_obs_keys the keys normalised) as
    {"keys": {name: {"mean", "var"}}, "eps", "clip"}, which the input spec folds in its key order."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such normalisation file; check the --vecnormalize path")
    if path.stat().st_size > MAX_STATS_BYTES:
        raise ModelLoadError(f"{path}: {path.stat().st_size} bytes is more than the limit {MAX_STATS_BYTES} for "
                             "normalisation statistics; give the statistics file saved with the policy")
    data = path.read_bytes()
    if path.suffix == ".json" or data.lstrip()[:1] == b"{":
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({str(e)[:160]}); write {{\"mean\": [...], \"var\": "
                                 "[...]}") from None
        if not isinstance(d, dict):
            raise ModelLoadError(f"{path}: the statistics are a JSON {type(d).__name__}, not an object; write "
                                 "{\"mean\": [...], \"var\": [...]}")
    elif data.startswith(b"PK"):
        d = _read_npz(data, path)
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
        if isinstance(rms, dict):  # a Dict observation: one RunningMeanStd per key, those of norm_obs_keys used
            names = getattr(vn, "norm_obs_keys", None) or list(rms)
            rms = {name: {"mean": getattr(rms.get(name), "mean", None), "var": getattr(rms.get(name), "var", None)}
                   for name in names}
        elif not hasattr(rms, "mean"):
            raise ModelLoadError(f"{path}: VecNormalize has no obs_rms with mean/var; give the statistics as JSON "
                                 "{\"mean\": [...], \"var\": [...]}")
        else:
            rms = {"mean": rms.mean, "var": rms.var}
        d = {"obs_rms": rms, "clip_obs": getattr(vn, "clip_obs", None), "epsilon": getattr(vn, "epsilon", 1e-8)}
    clip = d.get("clip_obs", d.get("clip"))
    eps = d.get("epsilon", d.get("eps", 1e-8))
    per_key = _per_key(d)
    if per_key is not None:
        return _key_statistics(per_key, d.get("norm_obs_keys"), eps, clip, path)
    if isinstance(d.get("obs_rms"), dict):
        d = {**d, **d["obs_rms"]}
    if "mean" not in d or "var" not in d:
        raise ModelLoadError(f"{path}: normalisation statistics need \"mean\" and \"var\" (found {sorted(d)[:8]})")
    norm = {"mean": _as_list(d["mean"]), "var": _as_list(d["var"]), "eps": _as_scalar(eps),
            "clip": None if clip is None else _as_scalar(clip)}
    try:
        check_normalize(norm, len(norm["mean"]) if isinstance(norm["mean"], list) else None, str(path))
    except ValueError as e:
        raise ModelLoadError(f"{e}; give the statistics saved with the policy") from None
    return norm


def _per_key(d: dict) -> dict | None:
    """The per-key statistics of a Dict observation's VecNormalize ({"obs_rms" or "keys": {name: {"mean", "var"}}}),
    or None when the statistics are of one array."""
    for field in ("keys", "obs_rms"):
        stats = d.get(field)
        if isinstance(stats, dict) and stats and "mean" not in stats and all(isinstance(v, dict) for v in stats.values()):
            return stats
    return None


def _key_statistics(stats: dict, names, eps, clip, path: Path) -> dict:
    """{"keys": {name: {"mean", "var"}}, "eps", "clip"}, each key's statistics checked; the keys of `names`
    (VecNormalize's norm_obs_keys) when given. frontends/specs.py folds them into one vector in the input's key
    order."""
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelLoadError(f"{path}: norm_obs_keys must be a list of key names, got {str(names)[:60]}")
        missing = [n for n in names if n not in stats]
        if missing:
            raise ModelLoadError(f"{path}: norm_obs_keys names {missing[0]!r} but the statistics have no such key; "
                                 "give the statistics saved with the policy")
        stats = {n: stats[n] for n in names}
    eps, clip = _as_scalar(eps), None if clip is None else _as_scalar(clip)
    out = {}
    for name, rms in stats.items():
        norm = {"mean": _as_list(rms.get("mean")), "var": _as_list(rms.get("var")), "eps": eps, "clip": clip}
        try:
            check_normalize(norm, None, f"{path}: key {name!r}")
        except ValueError as e:
            raise ModelLoadError(f"{e}; give the statistics saved with the policy") from None
        out[str(name)] = {"mean": norm["mean"], "var": norm["var"]}
    return {"keys": out, "eps": eps, "clip": clip}


def _as_list(value):
    """A numpy array's values as a list; anything else as it is (check_normalize says what is wrong)."""
    return value.ravel().tolist() if isinstance(value, np.ndarray) else value


def _as_scalar(value):
    """A 0-d / 1-element numpy value as a Python number; anything else as it is."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    return value.item() if isinstance(value, np.generic) else value


_STATS_PATTERNS = ("*vecnorm*.pkl", "*vec_norm*.pkl", "*vecnorm*.json", "*vec_norm*.json", "*vecnorm*.npz",
                   "*vec_norm*.npz")


def _statistics_files(path: Path) -> list[Path]:
    """Files beside the model (or one folder down, as rl-zoo saves them) that look like VecNormalize statistics."""
    found: set[Path] = set()
    for folder, depth in ((path.parent, ""), (path.parent, "*/")):
        for pattern in _STATS_PATTERNS:
            found.update(p for p in folder.glob(depth + pattern) if p.is_file() and p != path)
            if len(found) > 20:
                break
    return sorted(found, key=lambda p: (len(p.relative_to(path.parent).parts), str(p)))[:5]


def _warn_if_normalisation_missing(loaded: LoadedPolicy, path: Path) -> None:
    """SB3 zips record whether the env was a VecNormalize (`sb3.trained_with_vecnormalize`), and runs keep its
    statistics beside the model; CleanRL continuous PPO always normalises."""
    if loaded.source.startswith("sb3-"):
        used = trained_with_vecnormalize(path)
        if used is False:
            return
        files = _statistics_files(path)
        how = "(with --trust-pickle for a .pkl) or its statistics as JSON {\"mean\": [...], \"var\": [...]}"
        if used:
            where = f"found {', '.join(map(str, files))}: pass --vecnormalize {files[0]}" if files else \
                "pass the vecnormalize.pkl saved with `env.save(...)` (VecNormalize) as --vecnormalize FILE"
            warnings.warn(f"{path}: this SB3 model was trained inside a VecNormalize (its data records "
                          "_last_original_obs) but no statistics were given: with norm_obs=True its actions will be "
                          f"wrong; {where} {how}", stacklevel=4)
        elif files:
            warnings.warn(f"{path}: found {', '.join(map(str, files))}: the policy was probably trained on "
                          f"VecNormalize-d observations; pass --vecnormalize {files[0]} {how}", stacklevel=4)
        return
    if loaded.source == "cleanrl-ppo" and loaded.output.get("kind") == "continuous":
        warnings.warn(f"{path}: CleanRL continuous PPO trains on NormalizeObservation-ed observations; pass their "
                      "statistics (--vecnormalize stats.json) or the policy will see raw ones", stacklevel=4)
