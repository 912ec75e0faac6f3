"""Input/output specs of the manifest: the config, spaces (gymnasium or plain data) -> specs, completing and
checking them (the spec forms are drawn in the package docstring), and the finiteness check of tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.runtime.specs import check_shape


def _read_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    text = str(config)
    try:
        if text.lstrip().startswith("{"):
            cfg = json.loads(text)
        else:
            cfg = json.loads(Path(text).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"config {text[:80]!r}: not readable JSON ({str(e)[:160]}); give a dict or a JSON file") \
            from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"config {text[:80]!r}: must be a JSON object, e.g. {{\"arch\": \"mlp\", ...}}")
    return cfg


def _config_obs_shape(cfg: dict, path: Path) -> list[int] | None:
    """The config's "obs_shape" checked (a non-empty list of positive ints within the limit), or None."""
    if not cfg.get("obs_shape"):
        return None
    try:
        return list(check_shape(cfg["obs_shape"], "\"obs_shape\"", f"{path}: config"))
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _is_image(space: dict) -> bool:
    return space["type"] == "Box" and space.get("dtype") == "uint8" and len(space.get("shape", ())) == 3


def _dict_input_spec(space: dict) -> dict:
    """A Dict observation space ({"type": "Dict", "keys": [(name, space), ...]} in the space's order, which is
    SB3's CombinedExtractor's) -> the input spec of runtime/specs.py: one flat vector, the keys flattened and
    concatenated (a Discrete key as its index: one value). ValueError (one line naming the key) for a key the
    compiled policy cannot take yet."""
    keys = []
    for name, sub in space["keys"]:
        kind = sub["type"]
        if kind in ("Box", "MultiBinary") and _is_image(sub):  # SB3 runs a NatureCNN on it (frontends/sb3_cnn.py)
            keys.append({"name": name, "shape": list(sub["shape"]), "dtype": "uint8", "preprocess": "image",
                         "normalize": False})
            continue
        if kind == "Discrete":  # SB3 one-hot encodes it (preprocess_obs): the row holds the index, the module one-hots
            keys.append({"name": name, "shape": [1], "dtype": "int64", "preprocess": "onehot", "n": sub.get("n"),
                         "normalize": False})
            continue
        if kind not in ("Box", "MultiBinary") or "shape" not in sub:
            raise ValueError(f"observation key {name!r} is a {_space_name(sub)} space, which is not supported yet "
                             "in a Dict observation (Box, MultiBinary and Discrete keys are)")
        keys.append({"name": name, "shape": list(sub["shape"]), "dtype": str(sub.get("dtype", "float32")),
                     "preprocess": "none", "normalize": False})
    total = sum(math.prod(k["shape"]) for k in keys)
    return {"kind": "dict", "keys": keys, "shape": [total], "dtype": "float32", "preprocess": "none"}


def _space_to_specs(space: dict, role: str, outputs: str = "logits", squash: str = "clip") -> dict:
    """A space as plain data ({"type": "Box"|"Discrete"|"Dict"|..., ...}) -> input or output spec."""
    kind = space["type"]
    if role == "input" and kind == "Dict":
        return _dict_input_spec(space)
    if role == "input":
        if kind == "Discrete":
            return {"shape": [space["n"]], "dtype": "float32", "preprocess": "onehot", "n": space["n"]}
        if kind in ("Box", "MultiBinary"):
            image = kind == "Box" and space.get("dtype") == "uint8" and len(space["shape"]) == 3
            return {"shape": list(space["shape"]), "dtype": "float32", "preprocess": "image" if image else "none"}
    else:
        if kind == "Discrete":
            return {"kind": "discrete", "n": space["n"], "outputs": outputs}
        if kind == "Box":
            return {"kind": "continuous", "shape": list(space["shape"]), "low": space["low"],
                    "high": space["high"], "squash": squash, "log_std": None}
    raise ValueError(f"{kind} {role} spaces are not supported yet (Box and Discrete are)")


def _gym_space(space) -> dict:
    import gymnasium.spaces as S
    if isinstance(space, S.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, S.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype),
                "low": np.asarray(space.low, np.float64).ravel().tolist(),
                "high": np.asarray(space.high, np.float64).ravel().tolist()}
    if isinstance(space, S.Dict):  # the keys in the space's order, each a space of its own
        return {"type": "Dict", "keys": [(str(k), _gym_space(v)) for k, v in space.spaces.items()]}
    return {"type": type(space).__name__}


def _env_spaces(path: Path, env_id, what: str = "--env") -> tuple[dict, dict]:
    """The observation and action spaces of a gymnasium environment, as plain data (see `_gym_space`)."""
    import gymnasium
    if not isinstance(env_id, str) or (env_id not in gymnasium.registry and ":" not in env_id):  # pkg:Id imports
        raise ModelLoadError(f"{path}: unknown environment {str(env_id)[:80]!r} ({what}); give a gymnasium id such "
                             "as CartPole-v1 or Pendulum-v1, or a config with \"output\"")
    from bitrl_compile.evaluate import EnvUnavailable, make_env

    try:
        env = make_env(env_id)
    except EnvUnavailable as e:  # a missing extra (Box2D, MuJoCo): the pip command, in one line
        raise ModelLoadError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - gymnasium raises several error types for other failures
        raise ModelLoadError(f"{path}: environment {env_id!r} cannot be made ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); install what it "
                             "needs, or give a config with \"output\"") from None
    try:
        return _gym_space(env.observation_space), _gym_space(env.action_space)
    finally:
        env.close()


def _space_name(space: dict) -> str:
    """A space as gymnasium prints it, for messages: Box(1,), Discrete(2)."""
    if space["type"] == "Discrete":
        return f"Discrete({space['n']})"
    if "shape" in space:
        return f"{space['type']}{tuple(space['shape'])}"
    return space["type"]


def _env_specs(path: Path, env_id: str, outputs: str, squash: str) -> tuple[dict, dict]:
    obs_space, action_space = _env_spaces(path, env_id)
    try:
        return (_space_to_specs(obs_space, "input"), _space_to_specs(action_space, "output", outputs, squash))
    except ValueError as e:
        raise ModelLoadError(f"{path}: env {env_id}: {e}") from None


def _default_output(out_dim: int, outputs: str = "logits") -> dict:
    return {"kind": "discrete", "n": out_dim, "outputs": outputs}


def _complete_output_spec(spec: dict, out_dim: int, path: Path) -> dict:
    spec = dict(spec)
    kind = spec.get("kind")
    if kind == "discrete":
        spec.setdefault("n", out_dim)
        spec.setdefault("outputs", "logits")
        if int(spec["n"]) != out_dim:
            raise ModelLoadError(f"{path}: output spec says {spec['n']} actions but the network outputs "
                                 f"{out_dim} values; fix the config's \"output\"")
        if spec["outputs"] not in ("logits", "q_values"):
            raise ModelLoadError(f"{path}: output \"outputs\" must be \"logits\" or \"q_values\"")
        return {"kind": "discrete", "n": int(spec["n"]), "outputs": spec["outputs"]}
    if kind == "continuous":
        shape = [int(d) for d in spec.get("shape", [out_dim])]
        size = math.prod(shape)
        if size != out_dim:
            raise ModelLoadError(f"{path}: output spec shape {shape} has {size} values but the network outputs "
                                 f"{out_dim}; fix the config's \"output\"")
        squash = spec.get("squash", "clip")
        if squash not in ("tanh", "clip", "none"):
            raise ModelLoadError(f"{path}: output \"squash\" must be \"tanh\", \"clip\" or \"none\", got {squash!r}")
        bounds = {}
        for key, default in (("low", -math.inf), ("high", math.inf)):
            value = spec.get(key, None if squash != "none" else default)
            if value is None:
                raise ModelLoadError(f"{path}: continuous output spec needs \"{key}\" (the action bounds)")
            bounds[key] = np.broadcast_to(np.asarray(value, np.float64).ravel(), (size,)).tolist()
        log_std = spec.get("log_std")
        if log_std is not None:
            log_std = np.asarray(log_std, np.float64).ravel().tolist()
            if len(log_std) != size:
                log_std = None
        return {"kind": "continuous", "shape": shape, **bounds, "squash": squash, "log_std": log_std}
    raise ModelLoadError(f"{path}: output spec \"kind\" must be \"discrete\" or \"continuous\", got {kind!r}")


def _complete_input_spec(spec: dict, path: Path) -> dict:
    shape = [int(d) for d in spec["shape"]]
    pre = spec.get("preprocess", "none")
    if pre not in ("none", "onehot", "image"):
        raise ModelLoadError(f"{path}: input \"preprocess\" must be none, onehot or image, got {pre!r}")
    out = {"shape": shape, "dtype": "float32", "preprocess": pre, "normalize": None}
    if spec.get("kind", "flat") != "flat":  # a Dict observation: its keys (checked with the rest: check_specs)
        out = {"kind": spec["kind"], "keys": [dict(k) for k in spec.get("keys") or []], **out}
    if "max_batch" in spec:  # a bounded batch the program was exported with (see pipeline.to_relax)
        out["max_batch"] = spec["max_batch"]
    if spec.get("recurrent") is not None:  # a recurrent policy's state (runtime/specs.py checks it)
        out["recurrent"] = spec["recurrent"]
    if pre == "onehot":
        out["n"] = int(spec.get("n", shape[0]))
        if shape != [out["n"]]:
            raise ModelLoadError(f"{path}: a one-hot input of n={out['n']} must have shape [{out['n']}]")
    norm = spec.get("normalize")
    if norm and "keys" in norm:  # per-key statistics (VecNormalize on a Dict observation)
        norm = _fold_key_statistics(norm, out, path)
    elif norm and out.get("kind") == "dict":  # statistics of the flat vector: every key is normalised
        for key in out["keys"]:
            key["normalize"] = True
    if norm:
        mean = np.asarray(norm["mean"], np.float64).ravel()
        var = np.asarray(norm["var"], np.float64).ravel()
        if mean.size != math.prod(shape) or var.size != mean.size:
            raise ModelLoadError(f"{path}: normalisation statistics have {mean.size}/{var.size} values but the "
                                 f"observation has shape {shape}; give the statistics of this policy's env")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
            raise ModelLoadError(f"{path}: normalisation statistics contain NaN/Inf or negative variances")
        clip = norm.get("clip")
        out["normalize"] = {"mean": mean.tolist(), "var": var.tolist(), "eps": float(norm.get("eps", 1e-8)),
                            "clip": None if clip is None else float(clip)}
    return out


def unit_var(eps: float) -> float:
    """The variance v for which float32 sqrt(v + eps) is exactly 1, so that (x - 0) / sqrt(v + eps) is x bit for
    bit in float32 (runtime.policy.normalize and the entry points): a key that is not normalised."""
    eps32 = np.float32(eps)
    v = np.float32(1) - eps32
    for _ in range(8):
        total = np.float32(v + eps32)
        if total == 1:
            return float(v)
        v = np.nextafter(v, np.float32(-np.inf) if total > 1 else np.float32(np.inf), dtype=np.float32)
    raise ValueError(f"normalisation eps {eps} leaves no variance v with sqrt(v + eps) == 1 in float32")


def _fold_key_statistics(norm: dict, spec: dict, path: Path) -> dict:
    """Per-key statistics {"keys": {name: {"mean", "var"}}, "eps", "clip"} -> one mean/var over the flat vector of
    a Dict observation (the manifest's key order); keys without statistics pass unchanged (mean 0, `unit_var`),
    and the input spec's keys record which are normalised."""
    if spec.get("kind") != "dict":
        raise ModelLoadError(f"{path}: the statistics are per key (keys {sorted(norm['keys'])[:6]}, a Dict "
                             "observation's VecNormalize) but the policy takes one array; give its own statistics")
    stats, keys = norm["keys"], spec["keys"]
    unknown = [name for name in stats if name not in {k["name"] for k in keys}]
    if unknown:
        raise ModelLoadError(f"{path}: the statistics have key {unknown[0]!r}, which the policy's observation lacks "
                             f"(its keys: {', '.join(k['name'] for k in keys)}); give the statistics of this policy")
    eps = float(norm.get("eps", 1e-8))
    raw = [k["name"] for k in keys if k["name"] not in stats]
    if raw and norm.get("clip") is not None:
        raise ModelLoadError(f"{path}: VecNormalize leaves key {raw[0]!r} unnormalised and clips the others at "
                             f"{norm['clip']}: one clip over the flat observation would clip {raw[0]!r} too, which "
                             "is not supported yet; normalise every key (norm_obs_keys=None) or give statistics "
                             "with \"clip_obs\": null")
    mean, var = [], []
    for key in keys:
        size = math.prod(key["shape"])
        key["normalize"] = key["name"] in stats
        if not key["normalize"]:
            mean.append(np.zeros(size))
            var.append(np.full(size, unit_var(eps)))
            continue
        m = np.asarray(stats[key["name"]]["mean"], np.float64).ravel()
        v = np.asarray(stats[key["name"]]["var"], np.float64).ravel()
        if m.size != size or v.size != size:
            raise ModelLoadError(f"{path}: the statistics of key {key['name']!r} have {m.size}/{v.size} values but "
                                 f"the key has shape {key['shape']}; give the statistics of this policy's env")
        mean.append(m)
        var.append(v)
    return {"mean": np.concatenate(mean), "var": np.concatenate(var), "eps": eps, "clip": norm.get("clip")}


def _check_finite(tensors: dict, path: Path) -> None:
    for name, t in tensors.items():
        t = torch.as_tensor(t)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{path}: tensor {name} contains NaN or Inf; fix or retrain the model")


def _complete_output(spec, out_dim: int, path: Path) -> dict:
    """The output spec completed and checked; the config's "output" can hold anything JSON does, so a malformed
    value's TypeError/ValueError/KeyError becomes the one-line refusal naming the fix."""
    return _malformed_spec(_complete_output_spec, "output", path, spec, out_dim, path)


def _complete_input(spec, path: Path) -> dict:
    """The input spec completed and checked (see `_complete_output`)."""
    return _malformed_spec(_complete_input_spec, "input", path, spec, path)


def _malformed_spec(complete, role: str, path: Path, spec, *args) -> dict:
    if not isinstance(spec, dict):
        raise ModelLoadError(f"{path}: the {role} spec is a {type(spec).__name__}, not an object; fix the config's "
                             f"\"{role}\"")
    try:
        return complete(spec, *args)
    except ModelLoadError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        detail = f"no {e}" if isinstance(e, KeyError) else str(e).strip().splitlines()[0][:120] if str(e) else ""
        raise ModelLoadError(f"{path}: the {role} spec is malformed ({type(e).__name__}: {detail}); fix the "
                             f"config's \"{role}\"") from None
