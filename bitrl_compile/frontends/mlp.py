"""MLP policies: MLPPolicy (net.0.weight, ...), building one from Linear layers of a state_dict, the generic
"mlp" config architecture, and save_mlp_policy (.safetensors with the JSON config in its metadata)."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from bitrl_compile.frontends.specs import _check_finite, _default_output, _env_specs
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime.files import write_atomic
from bitrl_compile.runtime.specs import check_count, check_shape

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU,
               "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
_TORCH_ACTIVATIONS = {cls.__name__: name for name, cls in ACTIVATIONS.items()}


class MLPPolicy(nn.Module):
    """Observation (flattened) -> Linear -> activation -> ... -> Linear; keys net.0.weight, net.0.bias, ...

    shared_row: the last Linear has one output more, its first, which is added to every other (`shared_row`)."""

    def __init__(self, sizes: list[int], activation: str = "tanh", obs_shape: list[int] | None = None,
                 shared_row: bool = False):
        super().__init__()
        self.shared_row = bool(shared_row)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
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
        y = self.net(x.flatten(1) if self.flatten else x)
        return y[:, 1:] + y[:, :1] if getattr(self, "shared_row", False) else y  # (older pickles: none)


def shared_row(mlp: MLPPolicy) -> MLPPolicy:
    """The same function with the last layer W, b split into a shared row and the differences: W' = [w; W - w]
    (w the mean row), b' = [0; b], the shared output added to every other (MLPPolicy.shared_row). For a
    Q-network: its Q-values share a large common part (the state's value) and differ by gaps a hundred times
    smaller, and quantizing each row of W on its own scale blurs the gaps with errors of the common part's
    size; quantized apart, the common part's error shifts every action's value alike. Measured on an RL-Zoo DQN
    Acrobot (Q-values -51..2.5, median best-two gap 0.77), the last layer int8, the rest fp32: 91.8 % of the
    stake-weighted actions as one matrix, 99.8 % split."""
    if mlp.shared_row:
        return mlp
    lins = [m for m in mlp.net if isinstance(m, nn.Linear)]
    sizes = [lins[0].in_features, *[m.out_features for m in lins[:-1]], lins[-1].out_features + 1]
    out = MLPPolicy(sizes, mlp.activation, shared_row=True)
    out.flatten = mlp.flatten
    state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    last = f"net.{len(mlp.net) - 1}"
    w, b = state[f"{last}.weight"], state[f"{last}.bias"]
    common = w.mean(0, keepdim=True)
    state[f"{last}.weight"] = torch.cat([common, w - common])
    state[f"{last}.bias"] = torch.cat([torch.zeros(1, dtype=b.dtype), b])
    out.load_state_dict(state)
    return out


def check_state_dict(obj, where: str, fix: str) -> dict:
    """`obj` if it is a state_dict ({str: tensor}), as torch.load of a weights file should give; otherwise a
    one-line refusal naming what it holds (the readers below index it as one)."""
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{where}: holds a {type(obj).__name__}, not a state_dict of tensors; {fix}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ModelLoadError(f"{where}: a state_dict key is a {type(key).__name__} ({str(key)[:40]!r}), not a "
                                 f"name; {fix}")
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{where}: {key[:80]!r} is a {type(value).__name__}, not a tensor; {fix}")
    return obj


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
        if isinstance(w, torch.Tensor) and w.ndim > 2:
            raise ModelLoadError(f"{path}: {name}.weight has shape {tuple(w.shape)}: convolutional policies "
                                 "are not supported yet (MLP policies are)")
        layers.append((name, w, sd.get(name + ".bias")))
    return layers


def _check_layer(path: Path, name: str, w, b) -> None:
    """A Linear layer's weight [out, in] and bias [out], floating point, each a tensor."""
    for part, t, ndim in (("weight", w, 2), ("bias", b, 1)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ModelLoadError(f"{path}: {name}.{part} is a {type(t).__name__}, not a tensor; the state_dict "
                                 "does not match an MLP")
        if t is not None and (t.ndim != ndim or not t.is_floating_point()):
            raise ModelLoadError(f"{path}: {name}.{part} is a {t.dtype} tensor of shape {tuple(t.shape)}; a Linear "
                                 f"layer's {part} is a {ndim}-D floating-point tensor: the state_dict does not "
                                 "match an MLP")


def _build_mlp(path: Path, layers, activation: str, obs_shape: list[int]) -> MLPPolicy:
    """An MLPPolicy holding copies of the given (name, weight, bias) layers; checks chaining and finiteness."""
    if not layers:
        raise ModelLoadError(f"{path}: no Linear layers found; is this a policy network?")
    try:
        obs_shape = list(check_shape(obs_shape, "observation shape (\"obs_shape\")", str(path)))
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    for name, w, b in layers:
        _check_layer(path, name, w, b)
    sizes = [layers[0][1].shape[1]]
    for name, w, b in layers:
        if w.shape[1] != sizes[-1]:
            raise ModelLoadError(f"{path}: {name}.weight has {w.shape[1]} inputs but the previous layer has "
                                 f"{sizes[-1]} outputs; the state_dict does not match an MLP")
        if 0 in w.shape:
            raise ModelLoadError(f"{path}: {name}.weight has shape {tuple(w.shape)}: a layer without weights; "
                                 "the state_dict does not match an MLP")
        if b is None or tuple(b.shape) != (w.shape[0],):
            raise ModelLoadError(f"{path}: {name}.bias is missing or has the wrong shape; expected ({w.shape[0]},)")
        _check_finite({f"{name}.weight": w, f"{name}.bias": b}, path)
        sizes.append(w.shape[0])
    if math.prod(obs_shape) != sizes[0]:
        raise ModelLoadError(f"{path}: observation shape {obs_shape} has {math.prod(obs_shape)} values but the "
                             f"first layer takes {sizes[0]}; check the env / \"obs_shape\"")
    try:
        mlp = MLPPolicy(sizes, activation, obs_shape)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, (_, w, b) in zip(linears, layers):
            lin.weight.copy_(w.float())
            lin.bias.copy_(b.float())
    return mlp


def _state_dict_mismatch(expected: dict[str, tuple[int, ...]], got: dict) -> str:
    """What differs between the expected {key: shape} and a state_dict: missing, unexpected, mis-shaped keys."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [f"{k} {tuple(got[k].shape)} (expected {expected[k]})"
              for k in expected if k in got and tuple(got[k].shape) != expected[k]]
    parts = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
             for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if items]
    return "; ".join(parts)


def _config_sizes(path: Path, cfg: dict, obs_shape, sd: dict, env_out: dict | None) -> tuple[list[int], dict]:
    """The MLP's layer sizes [obs, *hidden, out] from the config, every one a checked positive int, and the
    output spec; nothing is allocated here, so a config declaring absurd layers costs nothing."""
    where = f"{path}: config"
    try:
        obs_shape = check_shape(obs_shape, "\"obs_shape\"", where)
        hidden = cfg["hidden"]
        if not isinstance(hidden, list) or len(hidden) > 64:
            raise ValueError(f"{where}: \"hidden\" must be a list of layer widths, got {str(hidden)[:60]!r}")
        hidden = [check_count(h, "each \"hidden\" width", where) for h in hidden]
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    for key in ("output", "input"):
        if not isinstance(cfg.get(key, {}), dict):
            raise ModelLoadError(f"{where}: \"{key}\" must be an object (a spec), got {str(cfg[key])[:60]!r}")
    output = {**(env_out or {}), **cfg.get("output", {})}
    weights = [k for k in sd if k.startswith("net.") and k.endswith(".weight")]
    last = sd.get(f"net.{2 * len(hidden)}.weight")
    try:
        if output.get("kind") == "discrete" and "n" in output:
            out_dim = check_count(output["n"], "output \"n\"", where)
        elif output.get("kind") == "continuous" and "shape" in output:
            out_dim = math.prod(check_shape(output["shape"], "output \"shape\"", where))
        elif last is not None and last.ndim == 2:
            out_dim = int(last.shape[0])
        else:
            out_dim = 1 if not weights or sd[max(weights)].ndim == 0 else int(sd[max(weights)].shape[0])
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    return [math.prod(obs_shape), *hidden, out_dim], output


def _load_mlp_config(path: Path, sd: dict, cfg: dict) -> LoadedPolicy:
    """The generic "mlp" architecture: net.0.weight, ... plus a config. The config's sizes are checked against
    the weights' shapes before the module is built."""
    if cfg.get("arch", "mlp") != "mlp":
        raise ModelLoadError(f"{path}: config arch {str(cfg.get('arch'))[:40]!r} is not supported yet (\"mlp\" is)")
    env_in, env_out = _env_specs(path, cfg["env"], "logits", "clip") if cfg.get("env") else (None, None)
    obs_shape = cfg.get("obs_shape") or (env_in and env_in["shape"])
    if not obs_shape or "hidden" not in cfg:
        raise ModelLoadError(f"{path}: the config needs \"obs_shape\" and \"hidden\" (e.g. {{\"arch\": \"mlp\", "
                             "\"obs_shape\": [4], \"hidden\": [64, 64], \"activation\": \"tanh\", \"output\": ...}})")
    sizes, output = _config_sizes(path, cfg, obs_shape, sd, env_out)
    shared = bool(cfg.get("shared_row"))  # the last layer's first row shared by every output (`shared_row`)
    if shared:
        sizes = [*sizes[:-1], sizes[-1] + 1]
    expected = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        expected[f"net.{2 * i}.weight"] = (n_out, n_in)
        expected[f"net.{2 * i}.bias"] = (n_out,)
    problems = _state_dict_mismatch(expected, sd)
    if problems:
        raise ModelLoadError(f"{path}: state_dict does not match the config's MLP {sizes} ({problems}); fix "
                             "\"hidden\", \"obs_shape\" or \"output\"")
    bad = next((k for k, v in sd.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise ModelLoadError(f"{path}: {bad[:80]} is a {sd[bad].dtype} tensor; an MLP's weights are floating point: "
                             "save them as float32")
    try:
        mlp = MLPPolicy(sizes, cfg.get("activation", "tanh"), list(obs_shape), shared_row=shared)
    except ValueError as e:
        raise ModelLoadError(f"{path}: config: {e}") from None
    _check_finite(sd, path)
    mlp.load_state_dict({k: v.float() for k, v in sd.items()})
    input_spec = {**(env_in or {}), **cfg.get("input", {}), "shape": list(obs_shape)}
    input_spec.setdefault("preprocess", "none")
    desc = f"MLP {sizes} {mlp.activation}" + (" (shared row)" if shared else "")
    recovery = cfg.get("trained", {}).get("recovery") if isinstance(cfg.get("trained"), dict) else None
    return LoadedPolicy(mlp, None, input_spec, output or _default_output(sizes[-1] - shared), "state-dict", desc,
                        recovery if isinstance(recovery, str) else None)


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
