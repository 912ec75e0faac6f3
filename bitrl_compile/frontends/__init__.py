"""Load a policy file SAFELY into a float32 torch module plus the input/output specs of the manifest.

`load_policy(path)` detects the format by content (the extension is only a hint) and returns a
`LoadedPolicy`: `module` (eval, float32; `forward(x [B, *obs_shape]) -> [B, out_dim]` on observations
that are already one-hot / scaled and normalised) or `onnx_model`, plus `input` / `output` dicts in the
form `bitrl_compile.runtime.policy` consumes:

    input  = {"shape": [4], "dtype": "float32", "preprocess": "none" | "onehot" | "image", "n": 16 (onehot),
              "normalize": None | {"mean": [...], "var": [...], "eps": 1e-8, "clip": 10.0 | None}}
    output = {"kind": "discrete", "n": 2, "outputs": "logits" | "q_values"}
           | {"kind": "continuous", "shape": [1], "low": [-2.0], "high": [2.0],
              "squash": "tanh" | "clip" | "none", "log_std": [...] | None}

Formats
    sb3-ppo, sb3-a2c, sb3-dqn, sb3-sac, sb3-td3   Stable-Baselines3 `.zip` with an MLP policy. The cloudpickled
        `data` member is never unpickled: spaces come from its JSON fields, classes (policy class, activation_fn)
        from a static `pickletools.genops` scan of the `:serialized:` strings; `policy.pth` is read with
        `torch.load(weights_only=True)` and layer sizes come from tensor shapes. PPO/A2C: actor MLP + action_net
        (logits; or Box mean clipped to the bounds, log_std kept for sampling). DQN: q_net (q_values).
        SAC: latent_pi + mu, tanh-squashed to the Box. TD3: the actor MLP without its final Tanh, squash "tanh"
        (the runtime applies tanh and rescales). Discrete observations -> "onehot", uint8 HxWxC/CxHxW -> "image".
        CNN, Dict-observation, recurrent and gSDE-SAC policies raise "not supported yet".
    cleanrl-ppo, cleanrl-dqn   `torch.save(agent.state_dict())` of CleanRL's ppo.py (actor.0/2/4, Tanh),
        ppo_continuous_action.py (actor_mean.*, actor_logstd, Tanh, actions clipped) and dqn.py (network.0/2/4,
        ReLU). The action space comes from `config={"env": "CartPole-v1"}` (gymnasium.make) or
        `config={"output": {...}}`; without either a discrete head is assumed (n = output width).
    state-dict   a `.safetensors` file whose metadata key "config" holds the JSON config below (write one with
        `save_mlp_policy`), or a `.safetensors` / `.pt` state_dict (`torch.load(weights_only=True)`) plus `config=`.
    torch-export   `torch.export.save` programs (`.pt2`). `torch.export.load` unpickles some members, so every
        member that is not raw tensor bytes or JSON must load with `torch.load(weights_only=True)` first;
        programs exported with a fixed batch size are re-exported with a dynamic batch dimension.
    torchscript   `torch.jit.load` (TorchScript archives hold TorchScript code, not Python pickles). A ScriptModule
        cannot be torch.exported, so it is converted with `torch._export.converter.TS2EPConverter` and re-exported
        with a dynamic batch dimension; the returned module is that program's `.module()`.
    onnx   `onnx.load` + `onnx.checker.check_model`; `onnx_model` is set instead of `module`. A fixed batch size in
        the graph's input/output is turned into a symbolic "batch" dimension (with a warning).
    pickle   `torch.save(model)` of a whole nn.Module: only with `trust_pickle=True` (`--trust-pickle`).

Config (dict, JSON string or path to a JSON file)
    {"arch": "mlp", "obs_shape": [4], "hidden": [64, 64], "activation": "tanh" | "relu" | "elu" | "leaky_relu"
     | "silu" | "gelu" | "sigmoid", "output": {...output spec...}, "input": {...optional input spec...},
     "env": "CartPole-v1" (optional: specs from gymnasium spaces)}
    The state_dict of an "mlp" holds `net.0.weight, net.0.bias, net.2.weight, ...`: an nn.Sequential of Linear
    layers with the activation between them and none after the last; observations with more than one dimension
    are flattened first. For every format, "input" / "output" entries of the config override what was detected.

Observation normalisation (SB3 VecNormalize, CleanRL NormalizeObservation) is baked into `input["normalize"]`
from `vecnormalize=`: SB3's `vecnormalize.pkl` is a pickle and is read only with `trust_pickle=True`; the safe
alternative is a JSON file {"mean": [...], "var": [...], "clip_obs": 10.0, "epsilon": 1e-8} or an `.npz` with the
same keys (`obs_rms.mean` style nesting {"obs_rms": {"mean", "var"}} is accepted too). The runtime computes
clip((x - mean) / sqrt(var + eps), -clip, clip), exactly as VecNormalize does.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime.artifact import write_atomic

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU,
               "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
_TORCH_ACTIVATIONS = {cls.__name__: name for name, cls in ACTIVATIONS.items()}
_NOT_POLICY_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                     b"%PDF": "a PDF document", b"\x7fELF": "an ELF binary", b"\x1f\x8b": "a gzip archive"}
_FORMATS_HELP = ("SB3 .zip, CleanRL state_dict, .safetensors + config, torch.export .pt2, TorchScript, .onnx, "
                 "pickled nn.Module (--trust-pickle)")


class _PickledCode(ModelLoadError):
    """The file holds pickled Python objects that torch.load(weights_only=True) refuses."""


class MLPPolicy(nn.Module):
    """Observation (flattened) -> Linear -> activation -> ... -> Linear; keys net.0.weight, net.0.bias, ..."""

    def __init__(self, sizes: list[int], activation: str = "tanh", obs_shape: list[int] | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            if i:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(n_in, n_out))
        self.net = nn.Sequential(*layers)
        self.activation = activation
        self.flatten = obs_shape is not None and len(obs_shape) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) if self.flatten else x)


# ---------------------------------------------------------------- entry point

def load_policy(path, *, config: dict | str | None = None, trust_pickle: bool = False,
                vecnormalize: str | None = None) -> LoadedPolicy:
    """Load a policy file of any supported format (detected by content); see the module docstring."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():  # a BitNet backbone checkpoint folder (docs/bitnet.md)
        from bitrl_compile import bitnet

        return bitnet.backbone_policy(bitnet.load_backbone(path))
    if path.is_dir():
        raise ModelLoadError(f"{path}: a folder without config.json; give a policy file or a BitNet backbone folder "
                             "(config.json + model.safetensors)")
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file; check the path")
    cfg = _read_config(config)
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, what in _NOT_POLICY_MAGIC.items():
        if head.startswith(magic):
            raise ModelLoadError(f"{path}: this is {what}, not a policy file; give one of: {_FORMATS_HELP}")
    if _is_complete_zip(path):
        loaded = _load_zip(path, cfg, trust_pickle)
    elif head.startswith(b"PK"):
        raise ModelLoadError(f"{path}: truncated or corrupt zip archive; copy or save the file again")
    elif path.suffix == ".safetensors" or _looks_like_safetensors(head):
        loaded = _load_safetensors(path, cfg)
    elif path.suffix == ".onnx" or head[:1] == b"\x08":
        loaded = _load_onnx(path, cfg)
    elif head[:1] == b"\x80":  # a pickle: legacy torch.save, or plain pickle.dump
        loaded = _load_torch_pickle(path, cfg, trust_pickle)
    else:
        raise ModelLoadError(f"{path}: unrecognised file format; give one of: {_FORMATS_HELP}")
    return _finish(loaded, path, cfg, trust_pickle, vecnormalize)


def _is_complete_zip(path: Path) -> bool:
    """A zip whose end-of-central-directory record ends the file (a truncated SB3 .zip can still contain the
    record of a nested torch archive, which zipfile.is_zipfile accepts)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65557))
        tail = f.read()
    i = tail.rfind(b"PK\x05\x06")
    return i >= 0 and i + 22 + int.from_bytes(tail[i + 20:i + 22], "little") == len(tail)


def _load_zip(path: Path, cfg: dict, trust_pickle: bool) -> LoadedPolicy:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "data" in names and "policy.pth" in names:
                return _load_sb3(path, zf, cfg)
            if any(n.endswith("archive_format") or "/models/" in n for n in names):
                return _load_torch_export(path, zf, cfg, trust_pickle)
            if any("/code/" in n or n.endswith("constants.pkl") for n in names):
                return _load_torchscript(path, cfg)
            if any(n.endswith("data.pkl") for n in names):
                return _load_torch_pickle(path, cfg, trust_pickle)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ModelLoadError(f"{path}: corrupt zip archive ({e}); copy or save the file again") from None
    raise ModelLoadError(f"{path}: a zip archive but not a known policy format; give one of: {_FORMATS_HELP}")


# ---------------------------------------------------------------- config and specs

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
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"config {text[:80]}: not readable JSON ({e}); give a dict or a JSON file") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"config {text[:80]}: must be a JSON object, e.g. {{\"arch\": \"mlp\", ...}}")
    return cfg


def _space_to_specs(space: dict, role: str, outputs: str = "logits", squash: str = "clip") -> dict:
    """A space as plain data ({"type": "Box"|"Discrete"|..., ...}) -> input or output spec."""
    kind = space["type"]
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
    return {"type": type(space).__name__}


def _env_specs(path: Path, env_id: str, outputs: str, squash: str) -> tuple[dict, dict]:
    import gymnasium
    try:
        env = gymnasium.make(env_id)
    except Exception as e:  # noqa: BLE001 - gymnasium raises several error types for unknown ids / missing extras
        raise ModelLoadError(f"{path}: config env {env_id!r} cannot be made ({e}); give a gymnasium id or "
                             "an explicit \"output\" spec") from None
    try:
        return (_space_to_specs(_gym_space(env.observation_space), "input"),
                _space_to_specs(_gym_space(env.action_space), "output", outputs, squash))
    except ValueError as e:
        raise ModelLoadError(f"{path}: env {env_id}: {e}") from None
    finally:
        env.close()


def _default_output(out_dim: int, outputs: str = "logits") -> dict:
    return {"kind": "discrete", "n": out_dim, "outputs": outputs}


def _complete_output(spec: dict, out_dim: int, path: Path) -> dict:
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


def _complete_input(spec: dict, path: Path) -> dict:
    shape = [int(d) for d in spec["shape"]]
    pre = spec.get("preprocess", "none")
    if pre not in ("none", "onehot", "image"):
        raise ModelLoadError(f"{path}: input \"preprocess\" must be none, onehot or image, got {pre!r}")
    out = {"shape": shape, "dtype": "float32", "preprocess": pre, "normalize": None}
    if pre == "onehot":
        out["n"] = int(spec.get("n", shape[0]))
        if shape != [out["n"]]:
            raise ModelLoadError(f"{path}: a one-hot input of n={out['n']} must have shape [{out['n']}]")
    norm = spec.get("normalize")
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


def _finish(loaded: LoadedPolicy, path: Path, cfg: dict, trust_pickle: bool, vecnormalize) -> LoadedPolicy:
    """Apply config overrides and normalisation, check the network's output width against the output spec."""
    loaded.input = {**loaded.input, **cfg.get("input", {})}
    if cfg.get("output"):
        loaded.output = {**loaded.output, **cfg["output"]}
    if vecnormalize is not None:
        loaded.input["normalize"] = read_normalization(vecnormalize, trust_pickle=trust_pickle)
    loaded.input = _complete_input(loaded.input, path)
    if loaded.module is not None:
        module = loaded.module
        if isinstance(module, torch.fx.GraphModule):  # an exported graph: its dtypes are baked into the ops
            bad = [n for n, t in module.state_dict().items() if t.is_floating_point() and t.dtype != torch.float32]
            if bad:
                raise ModelLoadError(f"{path}: tensor {bad[0]} is not float32; export the model in float32")
        else:
            module = module.float()
        module = module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        _check_finite(module.state_dict(), path)
        x = torch.zeros(2, *loaded.input["shape"])
        try:
            with torch.no_grad():
                y = module(x)
        except Exception as e:  # noqa: BLE001 - any failure of user code: report it in one line
            raise ModelLoadError(f"{path}: the network fails on an observation of shape {loaded.input['shape']} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the right "
                                 "\"obs_shape\" in the config") from None
        if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 2:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ModelLoadError(f"{path}: the network must return one tensor [batch, out_dim], got {shape}; "
                                 "wrap it so that forward returns the action head only")
        out_dim = int(y.shape[1])
        loaded.module = module
    else:
        out_dim = _onnx_out_dim(loaded.onnx_model, path)
    loaded.output = _complete_output(loaded.output or _default_output(out_dim), out_dim, path)
    if loaded.input["normalize"] is None:
        _warn_if_normalisation_missing(loaded, path)
    return loaded


def _check_finite(tensors: dict, path: Path) -> None:
    for name, t in tensors.items():
        t = torch.as_tensor(t)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{path}: tensor {name} contains NaN or Inf; fix or retrain the model")


# ---------------------------------------------------------------- normalisation statistics

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


# ---------------------------------------------------------------- state dicts and MLPs

def _torch_load_weights(data: bytes | Path, where: str):
    """torch.load(weights_only=True): tensors and plain containers only, never user classes."""
    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ..." on plain pickles
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _PickledCode(f"{where}: contains pickled Python objects (code) besides tensors; load it only if "
                             "you trust it, with --trust-pickle (trust_pickle=True)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelLoadError(f"{where}: corrupt or truncated torch file ({msg}); save it again") from None


def _linears(sd: dict, prefix: str, path: Path) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Linear layers `{prefix}{i}.weight/.bias` in index order."""
    found = []
    for key in sd:
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", key)
        if m:
            found.append((int(m.group(1)), key[: -len(".weight")]))
    layers = []
    for _, name in sorted(found):
        w = sd[name + ".weight"]
        if w.ndim != 2:
            raise ModelLoadError(f"{path}: {name}.weight has shape {tuple(w.shape)}: convolutional policies "
                                 "are not supported yet (MLP policies are)")
        layers.append((name, w, sd.get(name + ".bias")))
    return layers


def _build_mlp(path: Path, layers, activation: str, obs_shape: list[int]) -> MLPPolicy:
    """An MLPPolicy holding copies of the given (name, weight, bias) layers; checks chaining and finiteness."""
    if not layers:
        raise ModelLoadError(f"{path}: no Linear layers found; is this a policy network?")
    sizes = [layers[0][1].shape[1]]
    for name, w, b in layers:
        if w.shape[1] != sizes[-1]:
            raise ModelLoadError(f"{path}: {name}.weight has {w.shape[1]} inputs but the previous layer has "
                                 f"{sizes[-1]} outputs; the state_dict does not match an MLP")
        if b is None or tuple(b.shape) != (w.shape[0],):
            raise ModelLoadError(f"{path}: {name}.bias is missing or has the wrong shape; expected ({w.shape[0]},)")
        _check_finite({f"{name}.weight": w, f"{name}.bias": b}, path)
        sizes.append(w.shape[0])
    if math.prod(obs_shape) != sizes[0]:
        raise ModelLoadError(f"{path}: observation shape {obs_shape} has {math.prod(obs_shape)} values but the "
                             f"first layer takes {sizes[0]}; check the env / \"obs_shape\"")
    mlp = MLPPolicy(sizes, activation, obs_shape)
    linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, (_, w, b) in zip(linears, layers):
            lin.weight.copy_(w.float())
            lin.bias.copy_(b.float())
    return mlp


def _state_dict_mismatch(expected: dict, got: dict) -> str:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
             for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if items]
    return "; ".join(parts)


def _load_mlp_config(path: Path, sd: dict, cfg: dict) -> LoadedPolicy:
    """The generic "mlp" architecture: net.0.weight, ... plus a config."""
    if cfg.get("arch", "mlp") != "mlp":
        raise ModelLoadError(f"{path}: config arch {cfg.get('arch')!r} is not supported yet (\"mlp\" is)")
    weights = [k for k in sd if k.startswith("net.") and k.endswith(".weight")]
    env_in, env_out = _env_specs(path, cfg["env"], "logits", "clip") if cfg.get("env") else (None, None)
    obs_shape = cfg.get("obs_shape") or (env_in and env_in["shape"])
    if not obs_shape or "hidden" not in cfg:
        raise ModelLoadError(f"{path}: the config needs \"obs_shape\" and \"hidden\" (e.g. {{\"arch\": \"mlp\", "
                             "\"obs_shape\": [4], \"hidden\": [64, 64], \"activation\": \"tanh\", \"output\": ...}})")
    output = {**(env_out or {}), **cfg.get("output", {})}
    last = sd.get(f"net.{2 * len(cfg['hidden'])}.weight")
    if output.get("kind") == "discrete" and "n" in output:
        out_dim = int(output["n"])
    elif output.get("kind") == "continuous" and "shape" in output:
        out_dim = math.prod(output["shape"])
    elif last is not None and last.ndim == 2:
        out_dim = int(last.shape[0])
    else:
        out_dim = 1 if not weights else int(sd[max(weights)].shape[0])
    try:
        mlp = MLPPolicy([math.prod(obs_shape), *cfg["hidden"], out_dim], cfg.get("activation", "tanh"),
                        list(obs_shape))
    except ValueError as e:
        raise ModelLoadError(f"{path}: config: {e}") from None
    problems = _state_dict_mismatch(mlp.state_dict(), sd)
    if problems:
        raise ModelLoadError(f"{path}: state_dict does not match the config's MLP ({problems}); fix \"hidden\", "
                             "\"obs_shape\" or \"output\"")
    _check_finite(sd, path)
    mlp.load_state_dict({k: v.float() for k, v in sd.items()})
    input_spec = {**(env_in or {}), **cfg.get("input", {}), "shape": list(obs_shape)}
    input_spec.setdefault("preprocess", "none")
    desc = f"MLP {[math.prod(obs_shape), *cfg['hidden'], out_dim]} {mlp.activation}"
    return LoadedPolicy(mlp, None, input_spec, output or _default_output(out_dim), "state-dict", desc)


def _load_state_dict(path: Path, sd, cfg: dict) -> LoadedPolicy:
    """Dispatch a plain state_dict by its keys: CleanRL agents, or the generic "mlp" with a config."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path}: holds a {type(sd).__name__}, not a state_dict of tensors; save "
                             "`model.state_dict()` or an exported program")
    if sd and all(re.match(r"\d+\.", k) for k in sd):  # the state_dict of a bare nn.Sequential
        sd = {f"net.{k}": v for k, v in sd.items()}
    keys = set(sd)
    if {"actor.0.weight", "critic.0.weight"} <= keys or {"actor_mean.0.weight", "actor_logstd"} <= keys \
            or ("network.0.weight" in keys and all(k.startswith("network.") for k in keys)):
        return _load_cleanrl(path, sd, cfg)
    if any(k.startswith("net.") for k in keys) or cfg:
        if not cfg:
            raise ModelLoadError(f"{path}: a state_dict needs an architecture: pass config= (JSON) with "
                                 "{\"arch\": \"mlp\", \"obs_shape\": [...], \"hidden\": [...], \"output\": {...}}")
        return _load_mlp_config(path, sd, cfg)
    raise ModelLoadError(f"{path}: state_dict with keys like {sorted(keys)[:3]} is not a known policy layout; "
                         "save an nn.Sequential as net.* with a config (save_mlp_policy), or export it (torch.export)")


def save_mlp_policy(path, module_or_state_dict, config: dict) -> None:
    """Write an MLP policy as .safetensors with the JSON config in the metadata (atomic: temp file + rename)."""
    from safetensors.torch import save

    sd = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, nn.Module) \
        else dict(module_or_state_dict)
    sd = {(k if k.startswith("net.") else f"net.{k}"): v.detach().float().contiguous() for k, v in sd.items()}
    config = {"arch": "mlp", **config}
    _load_mlp_config(Path(path), sd, config)  # validate before writing
    data = save(sd, metadata={"config": json.dumps(config)})
    path = Path(path)
    write_atomic(path, data)


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and int.from_bytes(head[:8], "little") < (1 << 27) and head[8:9] == b"{"


def _load_safetensors(path: Path, cfg: dict) -> LoadedPolicy:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({e}); save it again") from None
    if "config" in meta:
        try:
            cfg = {**json.loads(meta["config"]), **cfg}
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path}: the metadata \"config\" is not JSON ({e}); rewrite it with "
                                 "save_mlp_policy") from None
    return _load_state_dict(path, sd, cfg)


# ---------------------------------------------------------------- CleanRL

def _load_cleanrl(path: Path, sd: dict, cfg: dict) -> LoadedPolicy:
    if "network.0.weight" in sd:
        source, prefix, activation, outputs = "cleanrl-dqn", "network.", "relu", "q_values"
    elif "actor_mean.0.weight" in sd:
        source, prefix, activation, outputs = "cleanrl-ppo", "actor_mean.", "tanh", "logits"
    else:
        source, prefix, activation, outputs = "cleanrl-ppo", "actor.", "tanh", "logits"
    layers = _linears(sd, prefix, path)
    continuous = prefix == "actor_mean."
    env_in, env_out = _env_specs(path, cfg["env"], outputs, "clip") if cfg.get("env") else ({}, {})
    in_dim = layers[0][1].shape[1] if layers else 0
    obs_shape = cfg.get("obs_shape") or env_in.get("shape") or [in_dim]
    mlp = _build_mlp(path, layers, cfg.get("activation", activation), list(obs_shape))
    output = {**env_out, **cfg.get("output", {})}
    if continuous:
        if output.get("kind") != "continuous":
            raise ModelLoadError(f"{path}: a CleanRL continuous-action agent needs the action bounds: pass "
                                 "config={\"env\": \"<gymnasium id>\"} or {\"output\": {\"kind\": \"continuous\", "
                                 "\"low\": [...], \"high\": [...]}}")
        _check_finite({"actor_logstd": sd["actor_logstd"]}, path)
        if output.get("log_std") is None:
            output["log_std"] = sd["actor_logstd"].ravel().tolist()
    input_spec = {"preprocess": "none", **env_in, "shape": list(obs_shape)}
    desc = f"CleanRL {source.split('-')[1]} agent, MLP {[in_dim] + [w.shape[0] for _, w, _ in layers]} {activation}"
    return LoadedPolicy(mlp, None, input_spec, output or _default_output(mlp.net[-1].out_features, outputs),
                        source, desc)


# ---------------------------------------------------------------- Stable-Baselines3

def _pickle_strings_and_globals(b64: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Statically list the strings and the globals (module, name) a pickle references. Never unpickles."""
    strings: list[str] = []
    found: list[tuple[str, str]] = []
    memo: dict[int, object] = {}
    stack: list[object] = []  # only the last pushed values matter for STACK_GLOBAL
    for op, arg, _ in pickletools.genops(base64.b64decode(b64)):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            found.append((module, name))
            stack.append(None)
        elif op.name == "STACK_GLOBAL":
            if len(stack) >= 2 and isinstance(stack[-2], str) and isinstance(stack[-1], str):
                found.append((stack[-2], stack[-1]))
            stack.append(None)
        elif op.name in ("MEMOIZE",):
            memo[len(memo)] = stack[-1] if stack else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = stack[-1] if stack else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo.get(int(arg)))
        elif isinstance(arg, str):
            strings.append(arg)
            stack.append(arg)
        elif op.name not in ("PROTO", "FRAME", "STOP"):
            stack.append(None)
    return strings, found


def _sb3_space(d, what: str, path: Path) -> dict:
    if not isinstance(d, dict) or ":type:" not in d:
        raise ModelLoadError(f"{path}: SB3 data has no readable {what}; re-save with stable-baselines3 >= 2.0")
    kind = re.search(r"spaces\.\w+\.(\w+)'", d[":type:"])
    kind = kind.group(1) if kind else d[":type:"]
    space = {"type": kind}
    if kind == "Discrete":
        space["n"] = int(d["n"])
        if int(d.get("start", 0) or 0) != 0:
            raise ModelLoadError(f"{path}: Discrete {what} with start={d['start']} is not supported yet")
    elif kind in ("Box", "MultiBinary"):
        space["shape"] = [int(s) for s in d["_shape"]]
        space["dtype"] = d.get("dtype", "float32")
        if kind == "Box" and what == "action_space":
            size = math.prod(space["shape"])
            for key in ("low", "high"):
                vals = str(d.get(key, "")).replace("[", " ").replace("]", " ").split()
                try:
                    arr = [float(v) for v in vals]
                except ValueError:
                    arr = []
                if len(arr) == 1:
                    arr = arr * size
                if len(arr) != size:
                    raise ModelLoadError(f"{path}: cannot read the action bounds from SB3 data; pass "
                                         "config={\"output\": {\"kind\": \"continuous\", \"low\": ..., \"high\": ...}}")
                space[key] = arr
    return space


def _sb3_algorithm(data: dict, path: Path) -> str:
    pc = data.get("policy_class")
    ser = pc.get(":serialized:") if isinstance(pc, dict) else None
    if not ser:
        raise ModelLoadError(f"{path}: SB3 data has no policy_class; is this a Stable-Baselines3 model?")
    try:
        _, globs = _pickle_strings_and_globals(ser)
    except Exception as e:  # noqa: BLE001 - genops raises ValueError and others on malformed input
        raise ModelLoadError(f"{path}: unreadable policy_class in SB3 data ({e}); save the model again") from None
    module, name = globs[0] if globs else ("?", "?")
    if "Cnn" in name:
        raise ModelLoadError(f"{path}: {name} (CNN policies) is not supported yet; use an MLP policy")
    if "MultiInput" in name:
        raise ModelLoadError(f"{path}: {name} (Dict observations) is not supported yet")
    for family in ("dqn", "sac", "td3"):
        if module.startswith(f"stable_baselines3.{family}."):
            return f"sb3-{family}"
    if module == "stable_baselines3.common.policies" and name in ("ActorCriticPolicy", "MlpPolicy"):
        return "sb3-ppo" if "clip_range" in data else "sb3-a2c"
    raise ModelLoadError(f"{path}: SB3 policy class {module}.{name} is not supported yet (PPO, A2C, DQN, SAC, "
                         "TD3 MLP policies are)")


def _sb3_policy_kwargs(data: dict, path: Path) -> tuple[dict, str | None]:
    """Readable policy_kwargs and the activation class name found statically in its pickle."""
    pk = data.get("policy_kwargs") or {}
    ser = pk.get(":serialized:") if isinstance(pk, dict) else None
    activation = None
    if ser:
        try:
            _, globs = _pickle_strings_and_globals(ser)
        except Exception as e:  # noqa: BLE001 - malformed pickle stream
            raise ModelLoadError(f"{path}: unreadable policy_kwargs in SB3 data ({e}); save the model again") \
                from None
        for module, name in globs:
            if module.startswith("torch.nn.modules.activation"):
                activation = name
                break
    return {k: v for k, v in pk.items() if not k.startswith(":")}, activation


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


def _load_sb3(path: Path, zf: zipfile.ZipFile, cfg: dict) -> LoadedPolicy:
    try:
        data = json.loads(zf.read("data"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: the SB3 'data' member is not JSON ({e}); save the model again") from None
    source = _sb3_algorithm(data, path)
    kwargs, act_name = _sb3_policy_kwargs(data, path)
    default_act = "tanh" if source in ("sb3-ppo", "sb3-a2c") else "relu"
    if act_name is not None and act_name not in _TORCH_ACTIVATIONS:
        raise ModelLoadError(f"{path}: activation {act_name} is not supported yet ({sorted(_TORCH_ACTIVATIONS)} are)")
    activation = _TORCH_ACTIVATIONS.get(act_name, default_act) if act_name else default_act
    obs_space = _sb3_space(data.get("observation_space"), "observation_space", path)
    act_space = _sb3_space(data.get("action_space"), "action_space", path)
    sd = _torch_load_weights(zf.read("policy.pth"), f"{path}:policy.pth")
    if any(k.startswith(("features_extractor.cnn", "pi_features_extractor.cnn")) for k in sd):
        raise ModelLoadError(f"{path}: CNN feature extractors are not supported yet; use an MLP policy")
    try:
        input_spec = _space_to_specs(obs_space, "input")
        if input_spec["preprocess"] == "image" and kwargs.get("normalize_images") is False:
            input_spec["preprocess"] = "none"
        squash = "tanh" if source in ("sb3-sac", "sb3-td3") or kwargs.get("squash_output") else "clip"
        outputs = "q_values" if source == "sb3-dqn" else "logits"
        output = _space_to_specs(act_space, "output", outputs, squash)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if source in ("sb3-ppo", "sb3-a2c"):
        layers = _linears(sd, "mlp_extractor.policy_net.", path) + [("action_net", sd.get("action_net.weight"),
                                                                    sd.get("action_net.bias"))]
        if layers[-1][1] is None:
            raise ModelLoadError(f"{path}: policy.pth has no action_net; not an ActorCriticPolicy state_dict")
        if output["kind"] == "continuous" and "log_std" in sd and sd["log_std"].numel() == math.prod(output["shape"]):
            _check_finite({"log_std": sd["log_std"]}, path)
            output["log_std"] = sd["log_std"].ravel().tolist()
    elif source == "sb3-dqn":
        layers = _linears(sd, "q_net.q_net.", path)
    elif source == "sb3-sac":
        if data.get("use_sde") or "actor.mu.0.weight" in sd:
            raise ModelLoadError(f"{path}: SAC with gSDE is not supported yet; train with use_sde=False")
        layers = _linears(sd, "actor.latent_pi.", path) + [("actor.mu", sd.get("actor.mu.weight"),
                                                            sd.get("actor.mu.bias"))]
    else:  # td3 (and DDPG, which saves a TD3Policy): the actor ends in Tanh, which squash "tanh" applies
        layers = _linears(sd, "actor.mu.", path)
    if any(w is None for _, w, _ in layers):
        raise ModelLoadError(f"{path}: policy.pth lacks the actor's output layer; the file is incomplete")
    mlp = _build_mlp(path, layers, activation, input_spec["shape"])
    algo = source.split("-")[1].upper()
    sizes = [layers[0][1].shape[1]] + [w.shape[0] for _, w, _ in layers]
    desc = f"SB3 {algo} MLP policy {sizes} {activation}, {act_space['type']} actions"
    return LoadedPolicy(mlp, None, input_spec, output, source, desc)


# ---------------------------------------------------------------- torch.export, TorchScript, pickled modules

def _program_module(ep, check_guards: bool = True) -> torch.fx.GraphModule:
    """`ep.module()` with the ordinary train()/eval() back: torch makes them raise on exported modules, but the
    graph was captured in one mode already, so for a policy they only need to be harmless flags."""
    module = ep.module(check_guards=check_guards)
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module


def _dynamic_batch(module: nn.Module, obs_shape: list[int], path: Path, what: str) -> nn.Module:
    """Re-export with a dynamic batch dimension; the program's module accepts any batch and re-exports."""
    x = torch.zeros(2, *obs_shape)
    try:
        ep = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - export raises many types; report the first line
        raise ModelLoadError(f"{path}: the {what} cannot be exported with a dynamic batch dimension "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); export it with "
                             "dynamic_shapes={0: Dim('batch')} on the batch axis") from None
    return _program_module(ep)


def _pt2_unsafe_members(zf: zipfile.ZipFile) -> list[str]:
    """Members of a .pt2 that torch.export.load would unpickle and that are not plain tensor archives."""
    raw: set[str] = set()
    for name in zf.namelist():
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            folder = name.rsplit("/", 1)[0] + "/"
            for meta in json.loads(zf.read(name)).get("config", {}).values():
                p = meta.get("path_name", "")
                if not meta.get("use_pickle") and not p.startswith(("custom_obj", "opaque")):
                    raw.add(folder + p)
    unsafe = []
    for name in zf.namelist():
        base = name.rsplit("/", 1)[-1]
        if name in raw or name.endswith((".json", "/")) or base in (
                "archive_format", "archive_version", "version", "byteorder", "serialization_id", ".format_version",
                ".storage_alignment"):
            continue
        data = zf.read(name)
        try:
            if not data.startswith(b"PK"):
                raise ValueError
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - anything not loadable as weights only is treated as code
            unsafe.append(name)
    return unsafe


def _load_torch_export(path: Path, zf: zipfile.ZipFile, cfg: dict, trust_pickle: bool) -> LoadedPolicy:
    if not trust_pickle:
        unsafe = _pt2_unsafe_members(zf)
        if unsafe:
            raise ModelLoadError(f"{path}: the exported program holds pickled objects ({', '.join(unsafe[:3])}) "
                                 "that could run code; pass --trust-pickle (trust_pickle=True) if you trust it")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - deserialisation errors of many kinds
        raise ModelLoadError(f"{path}: cannot load the exported program ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}); save it again with this torch version") from None
    user_inputs = ep.graph_signature.user_inputs
    if len(user_inputs) != 1:
        raise ModelLoadError(f"{path}: the program takes {len(user_inputs)} inputs; a policy takes one observation")
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    shape = list(node.meta["val"].shape)
    obs_shape = [int(d) for d in (cfg.get("obs_shape") or shape[1:])]
    if isinstance(shape[0], int):  # a fixed batch size: guards would reject other batches
        module = _dynamic_batch(_program_module(ep, check_guards=False), obs_shape, path, "program")
    else:
        module = _program_module(ep)
    return LoadedPolicy(module, None, {"shape": obs_shape, "preprocess": "none"}, {}, "torch-export",
                        f"torch.export program, obs {obs_shape}")


def _infer_obs_shape(module: nn.Module, cfg: dict, path: Path) -> list[int]:
    if cfg.get("obs_shape"):
        return [int(d) for d in cfg["obs_shape"]]
    for name, p in module.named_parameters():
        if name.endswith("weight"):
            if p.ndim == 2:
                return [int(p.shape[1])]
            break
    raise ModelLoadError(f"{path}: cannot infer the observation shape; pass config={{\"obs_shape\": [...]}}")


def _load_torchscript(path: Path, cfg: dict) -> LoadedPolicy:
    from torch._export.converter import TS2EPConverter

    try:
        sm = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - RuntimeError for most archive problems
        raise ModelLoadError(f"{path}: cannot load the TorchScript archive ({str(e).splitlines()[0][:160]}); "
                             "save it again") from None
    sm = sm.float().eval()
    obs_shape = _infer_obs_shape(sm, cfg, path)
    try:
        ep = TS2EPConverter(sm, (torch.zeros(2, *obs_shape),)).convert()
    except Exception as e:  # noqa: BLE001 - the converter covers most but not all TorchScript
        raise ModelLoadError(f"{path}: TorchScript cannot be converted to torch.export "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); export the original module "
                             "with torch.export.save or to ONNX instead") from None
    module = _dynamic_batch(_program_module(ep), obs_shape, path, "converted TorchScript")
    with torch.no_grad():
        x = torch.randn(3, *obs_shape, generator=torch.Generator().manual_seed(0))
        if not torch.allclose(module(x), sm(x), rtol=1e-5, atol=1e-6):
            raise ModelLoadError(f"{path}: the TorchScript conversion changed the outputs; export the original "
                                 "module with torch.export.save instead")
    return LoadedPolicy(module, None, {"shape": obs_shape, "preprocess": "none"}, {}, "torchscript",
                        f"TorchScript module, obs {obs_shape}")


def _load_torch_pickle(path: Path, cfg: dict, trust_pickle: bool) -> LoadedPolicy:
    try:
        obj = _torch_load_weights(path, str(path))
    except _PickledCode:
        if not trust_pickle:
            raise ModelLoadError(f"{path}: the file contains pickled code (a torch.save of a whole model or other "
                                 "Python objects) that runs when loaded; pass --trust-pickle (trust_pickle=True) "
                                 "only if you trust its source, or save model.state_dict() instead") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - unpickling trusted data can raise anything
            raise ModelLoadError(f"{path}: cannot unpickle ({type(e).__name__}: {str(e)[:160]}); make the "
                                 "model's classes importable or save a state_dict") from None
    if isinstance(obj, nn.Module):
        obs_shape = _infer_obs_shape(obj, cfg, path)
        return LoadedPolicy(obj, None, {"shape": obs_shape, "preprocess": "none"}, {}, "pickle",
                            f"pickled {type(obj).__name__}, obs {obs_shape}")
    return _load_state_dict(path, obj, cfg)


# ---------------------------------------------------------------- ONNX

def _load_onnx(path: Path, cfg: dict) -> LoadedPolicy:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - DecodeError, ValidationError, ...
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else 'truncated?'}); export it again") from None
    g = model.graph
    _check_finite({t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in g.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)},
                  path)
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelLoadError(f"{path}: the ONNX graph has {len(inputs)} inputs and {len(g.output)} outputs; a "
                             "policy takes one observation and returns one tensor")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelLoadError(f"{path}: the ONNX input must be float32; export with a float32 example input")
    dims = inputs[0].type.tensor_type.shape.dim
    if cfg.get("obs_shape"):
        obs_shape = [int(d) for d in cfg["obs_shape"]]
    elif len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[1:]):
        obs_shape = [d.dim_value for d in dims[1:]]
    else:
        raise ModelLoadError(f"{path}: the ONNX input shape is not [batch, fixed dims]; pass "
                             "config={\"obs_shape\": [...]}")
    for value in (inputs[0], g.output[0]):
        d0 = value.type.tensor_type.shape.dim
        if d0 and d0[0].HasField("dim_value"):
            warnings.warn(f"{path}: {value.name} has a fixed batch size {d0[0].dim_value}; treating it as dynamic",
                          stacklevel=4)
            d0[0].dim_param = "batch"
    return LoadedPolicy(None, model, {"shape": obs_shape, "preprocess": "none"}, {}, "onnx",
                        f"ONNX graph (opset {model.opset_import[0].version if model.opset_import else '?'}), "
                        f"obs {obs_shape}")


def _onnx_out_dim(model, path: Path) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise ModelLoadError(f"{path}: the ONNX output must have shape [batch, out_dim] with a fixed out_dim")
    return int(dims[1].dim_value)
