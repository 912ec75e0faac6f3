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
        MultiInputPolicy (Dict observations of vector keys), CnnPolicy (NatureCNN: frontends/sb3_cnn.py), and
        sb3-contrib RecurrentPPO's MlpLstmPolicy (sb3-recurrent-ppo: frontends/sb3_recurrent.py, the LSTM actor
        with its state as input and output, input["recurrent"]); gSDE policies raise "not supported yet".
    cleanrl-ppo, cleanrl-dqn   `torch.save(agent.state_dict())` of CleanRL's ppo.py (actor.0/2/4, Tanh),
        ppo_continuous_action.py (actor_mean.*, actor_logstd, Tanh, actions clipped) and dqn.py (network.0/2/4,
        ReLU). The action space comes from `config={"env": "CartPole-v1"}` (gymnasium.make) or
        `config={"output": {...}}`; without either a discrete head is assumed (n = output width).
    cleanrl-ppo-atari, cleanrl-dqn-atari   ppo_atari.py (network.0/2/4/7 + actor) and dqn_atari.py (network.0-9):
        NatureCNN on (4, 84, 84) uint8 frames channels-first (/255 in the artifact; other square sizes from
        network.7's width, or config "obs_shape"; frontends/cleanrl.py).
    cleanrl-ppo-atari-lstm   ppo_atari_lstm.py: NatureCNN on (1, 84, 84) frames, then nn.LSTM(512, 128) and the
        actor: a RecurrentPolicy (frontends/sb3_recurrent.py) whose features are the network, state explicit.
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
    bitnet   a checkpoint folder (config.json + safetensors): a BitNet backbone ("bitrl_backbone" in config.json), or a
        stock Hugging Face BitNet checkpoint with `encoder=` and config "env" (`bitnet_folders`): a features policy.

The environment (`config={"env": "Pendulum-v1"}`, the CLI's --env) applies to every format: where the file records
no action space (torch-export, torchscript, onnx, pickle) the env's defines the output spec (Box: continuous with
its bounds, squash "clip" unless the config's "output" says; Discrete: discrete); where it does (SB3) they must
agree; the network's observation shape and output width must match the env's spaces. Without an env or an
"output", a network of one output is refused (a one-action discrete policy would always return 0); wider ones
are taken as discrete logits. A .pt2 exported with a bounded batch (Dim("batch", min=1, max=N)) keeps the bound
as input["max_batch"] (the manifest's "batch").

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

Modules, one per family: `sb3`, `cleanrl`, `state_dicts` (.safetensors and plain state_dicts), `mlp` (MLPPolicy,
the "mlp" config, save_mlp_policy), `torch_files` (.pt2, TorchScript, pickles), `onnx`, `bitnet_folders`
(BitNet checkpoint folders); beside them `specs`
(config, input/output specs), `normalization` (read_normalization) and `zips` (the limits on every model zip and
torch archive, checked from the directory before anything is read). This module detects the format
(`load_policy`) and finishes every load (`_finish`: config overrides, normalisation, the output-width check).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import torch

from bitrl_compile.frontends.mlp import ACTIVATIONS, MLPPolicy, save_mlp_policy
from bitrl_compile.frontends.normalization import _warn_if_normalisation_missing, read_normalization
from bitrl_compile.frontends.onnx import _load_onnx, _onnx_out_dim
from bitrl_compile.frontends.sb3 import _load_sb3
from bitrl_compile.frontends.specs import (
    _check_finite,
    _complete_input,
    _complete_output,
    _default_output,
    _env_spaces,
    _read_config,
    _space_name,
    _space_to_specs,
)
from bitrl_compile.frontends.state_dicts import _load_safetensors, _looks_like_safetensors
from bitrl_compile.frontends.torch_files import _load_torch_export, _load_torch_pickle, _load_torchscript
from bitrl_compile.frontends.zips import check_zip_directory
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError

__all__ = ["ACTIVATIONS", "MLPPolicy", "load_policy", "read_normalization", "save_mlp_policy"]


_NOT_POLICY_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                     b"%PDF": "a PDF document", b"\x7fELF": "an ELF binary", b"\x1f\x8b": "a gzip archive"}
_FORMATS_HELP = ("SB3 .zip, CleanRL state_dict, .safetensors + config, torch.export .pt2, TorchScript, .onnx, "
                 "pickled nn.Module (--trust-pickle)")


def load_policy(path, *, config: dict | str | None = None, trust_pickle: bool = False,
                vecnormalize: str | None = None, encoder: dict | None = None) -> LoadedPolicy:
    """Load a policy file of any supported format (detected by content); see the module docstring. `encoder`
    ({"kind": "text"|"numeric", "pool", "decimals"}) wraps a stock BitNet checkpoint folder as a state encoder
    for config "env"'s observations (frontends/bitnet_folders.py)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():  # a BitNet checkpoint folder (docs/bitnet.md)
        from bitrl_compile.frontends.bitnet_folders import load_bitnet_folder

        return load_bitnet_folder(path, _read_config(config).get("env"), encoder)
    if path.is_dir():
        raise ModelLoadError(f"{path}: a folder without config.json; give a policy file or a BitNet checkpoint folder "
                             "(config.json + model.safetensors)")
    if encoder:
        raise ModelLoadError(f"{path}: encoder= (--encoder) applies to a BitNet checkpoint folder, not a policy file")
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
            check_zip_directory(zf, str(path))  # torch and zipfile allocate members at their declared sizes
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


def _finish(loaded: LoadedPolicy, path: Path, cfg: dict, trust_pickle: bool, vecnormalize) -> LoadedPolicy:
    """Apply the env's spaces, config overrides and normalisation, check the network's output width against the
    output spec."""
    for key in ("input", "output"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ModelLoadError(f"{path}: config \"{key}\" must be an object (a spec), got {str(cfg[key])[:60]!r}")
    env = _apply_env(loaded, cfg["env"], path) if cfg.get("env") else None
    loaded.input = {**loaded.input, **cfg.get("input", {})}
    if cfg.get("output"):
        loaded.output = {**loaded.output, **cfg["output"]}
    if vecnormalize is not None:
        loaded.input["normalize"] = read_normalization(vecnormalize, trust_pickle=trust_pickle)
    loaded.input = _complete_input(loaded.input, path)
    if loaded.module is not None:
        loaded.module, out_dim = _check_module(loaded.module, loaded.input["shape"], path,
                                               (loaded.input.get("recurrent") or {}).get("state_size"))
    else:
        out_dim = _onnx_out_dim(loaded.onnx_model, path)
    if env is not None and not cfg.get("output"):
        env_id, action_space = env
        if _spec_size(loaded.output) != out_dim:
            raise ModelLoadError(f"{path}: the network outputs {out_dim} values and {env_id}'s action space is "
                                 f"{_space_name(action_space)}; give the right --env, or a config with \"output\"")
    if not loaded.output and out_dim == 1:
        raise ModelLoadError(f"{path}: the network outputs 1 value and the file does not say what it means (a "
                             "one-action discrete policy would always return 0); give --env ENV_ID, or a config "
                             "with \"output\" (e.g. {\"kind\": \"continuous\", \"low\": [-1], \"high\": [1]})")
    loaded.output = _complete_output(loaded.output or _default_output(out_dim), out_dim, path)
    if loaded.input["normalize"] is None:
        _warn_if_normalisation_missing(loaded, path)
    return loaded


_FORMATS_WITHOUT_SPACES = ("torch-export", "torchscript", "onnx", "pickle")  # files that record no action space


def _apply_env(loaded: LoadedPolicy, env_id, path: Path) -> tuple[str, dict]:
    """--env (config "env") for every format. Where the file records no action space, the env's defines the
    output spec (Box: continuous with its bounds, squash "clip" unless the config says; Discrete: discrete);
    where it does (SB3, and the loaders that read the env themselves), the two must agree. The network's
    observation shape must be the env's (a Discrete observation: a one-hot of its n). Returns (env id, action
    space) for the output-width check."""
    obs_space, action_space = _env_spaces(path, env_id)
    try:
        env_out = _space_to_specs(action_space, "output", loaded.output.get("outputs", "logits"), "clip")
    except ValueError as e:
        raise ModelLoadError(f"{path}: --env {env_id}: {e}; give a config with \"output\"") from None
    if not loaded.output and loaded.source in _FORMATS_WITHOUT_SPACES:
        loaded.output = env_out
    elif loaded.output.get("kind") in ("discrete", "continuous") and (
            loaded.output["kind"] != env_out["kind"] or _spec_size(loaded.output) != _spec_size(env_out)):
        raise ModelLoadError(f"{path}: the policy's action space ({_describe(loaded.output)}) is not {env_id}'s "
                             f"({_space_name(action_space)}); give the --env it was trained on")
    shape = [int(d) for d in loaded.input.get("shape", [])]
    if loaded.input.get("kind") == "dict" and obs_space["type"] != "Dict":
        raise ModelLoadError(f"{path}: the policy takes a Dict observation (keys "
                             f"{[k['name'] for k in loaded.input.get('keys') or []]}) and {env_id}'s observation "
                             f"space is {_space_name(obs_space)}; give the --env it was trained on")
    if obs_space["type"] == "Dict":  # the policy's keys (names, shapes, order) are the env's
        # a Discrete key is its n on both sides (the policy's spec holds its index: shape [1])
        env_keys = [(k, f"Discrete({v['n']})" if v["type"] == "Discrete" else [int(d) for d in v.get("shape", [])])
                    for k, v in obs_space["keys"]]
        ours = [(k["name"], f"Discrete({k['n']})" if k.get("preprocess") == "onehot" else
                 [int(d) for d in k["shape"]]) for k in loaded.input.get("keys") or []]
        if ours == env_keys:
            return env_id, action_space
        raise ModelLoadError(f"{path}: the policy takes keys {ours or shape} and {env_id}'s observation is a Dict of "
                             f"{env_keys}; give the --env it was trained on")
    if obs_space["type"] == "Discrete":
        n = int(obs_space["n"])
        if loaded.input.get("preprocess") == "onehot" and int(loaded.input.get("n", -1)) == n:
            return env_id, action_space
        if shape == [n] and loaded.input.get("preprocess", "none") == "none":
            loaded.input = {**loaded.input, "preprocess": "onehot", "n": n}
            return env_id, action_space
    elif "shape" in obs_space and shape == [int(d) for d in obs_space["shape"]]:
        return env_id, action_space
    raise ModelLoadError(f"{path}: the network takes observations of shape {shape} and {env_id}'s observation "
                         f"space is {_space_name(obs_space)}; give the right --env, or a config with \"obs_shape\"")


def _spec_size(spec: dict) -> int | None:
    """How many values a (possibly partial) output spec needs from the network; None if it does not say."""
    if spec.get("kind") == "discrete" and "n" in spec:
        return int(spec["n"])
    if spec.get("kind") == "continuous" and "shape" in spec:
        return math.prod(int(d) for d in spec["shape"])
    return None


def _describe(spec: dict) -> str:
    return f"Discrete({spec['n']})" if spec["kind"] == "discrete" else f"Box{tuple(spec['shape'])}"


def _check_module(module, obs_shape: list[int], path: Path, state_size: int | None = None):
    """The module in eval mode, float32, without gradients, run once on a batch of 2: (module, output width).
    A recurrent policy's module (`state_size`) takes (obs, state, episode_start) and returns (output, state)."""
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
    x = torch.zeros(2, *obs_shape)
    try:
        with torch.no_grad():
            y = module(x) if not state_size else module(x, torch.zeros(2, state_size), torch.zeros(2))[0]
    except Exception as e:  # noqa: BLE001 - any failure of user code: report it in one line
        raise ModelLoadError(f"{path}: the network fails on an observation of shape {obs_shape} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the right "
                             "\"obs_shape\" in the config") from None
    if isinstance(y, (tuple, list, dict)):
        items = list(y.items()) if isinstance(y, dict) else list(enumerate(y))
        shapes = ", ".join(f"[{k}] {list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                           for k, v in items[:4])
        raise ModelLoadError(f"{path}: the network returns a {type(y).__name__} of {len(items)} outputs ({shapes}); "
                             "a policy returns one tensor [batch, out_dim]: wrap it so that forward returns the "
                             "action head only (e.g. forward(x)[0]) and export it again")
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 2:
        shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelLoadError(f"{path}: the network must return one tensor [batch, out_dim], got {shape}; "
                             "wrap it so that forward returns the action head only")
    return module, int(y.shape[1])
