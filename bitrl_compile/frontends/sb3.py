"""Stable-Baselines3 .zip files: the JSON parts of `data` (never unpickled), classes from a static pickle scan,
`policy.pth` with torch.load(weights_only=True); PPO, A2C, DQN, SAC and TD3 MLP policies."""

from __future__ import annotations

import base64
import json
import math
import pickletools
import re
import zipfile
from pathlib import Path

from bitrl_compile.frontends.mlp import _TORCH_ACTIVATIONS, _build_mlp, _linears
from bitrl_compile.frontends.specs import _check_finite, _space_to_specs
from bitrl_compile.frontends.torch_files import _torch_load_weights
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError


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
