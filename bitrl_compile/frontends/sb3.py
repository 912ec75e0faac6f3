"""Stable-Baselines3 .zip files: the JSON parts of `data` (never unpickled), classes from a static pickle scan,
`policy.pth` with torch.load(weights_only=True); PPO, A2C, DQN, SAC and TD3 MLP policies, and their MultiInput
policies on Dict observations of vector keys (CombinedExtractor: each key flattened, concatenated)."""

from __future__ import annotations

import ast
import base64
import json
import math
import pickletools
import re
import zipfile
from pathlib import Path

from bitrl_compile.frontends import sb3_cnn, sb3_recurrent
from bitrl_compile.frontends.mlp import _TORCH_ACTIVATIONS, _build_mlp, _linears, check_state_dict
from bitrl_compile.frontends.specs import _check_finite, _is_image, _space_to_specs
from bitrl_compile.frontends.torch_files import _torch_load_weights
from bitrl_compile.frontends.zips import check_torch_zip, check_zip_directory, read_member
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime.specs import MAX_VALUES, check_real_dtype, check_shape, check_specs

# Limits of the SB3 zip beside those of every model zip (frontends/zips.py): real SB3 zips hold 6 members stored
# uncompressed, `data` of tens of KB, class pickles under 2 KB.
MAX_DATA_BYTES = 32 << 20   # the JSON `data` member
MAX_WEIGHTS_BYTES = 1 << 30  # policy.pth, and the total of its records
MAX_SERIALIZED = 1 << 20    # a base64 pickle of a class or of policy_kwargs, scanned statically


def _read_data(path: Path, zf: zipfile.ZipFile) -> dict:
    """The JSON `data` member as a dict, within the limits."""
    check_zip_directory(zf, str(path))
    raw = read_member(zf, "data", MAX_DATA_BYTES, str(path))
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: the SB3 'data' member is not JSON ({e}); save the model again") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: the SB3 'data' member is nested too deeply; save the model again") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: the SB3 'data' member is a JSON {type(data).__name__}, not an object; "
                             "save the model again with stable-baselines3")
    return data


def _serialized(field, what: str, path: Path) -> str | None:
    """The base64 pickle of a `data` field ({":type:", ":serialized:"}), or None; refused when oversized."""
    ser = field.get(":serialized:") if isinstance(field, dict) else None
    if ser is None:
        return None
    if not isinstance(ser, str) or len(ser) > MAX_SERIALIZED:
        size = len(ser) if isinstance(ser, str) else type(ser).__name__
        raise ModelLoadError(f"{path}: the SB3 {what} is not a short base64 string ({size}); save the model again")
    return ser


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


def _read_weights(path: Path, zf: zipfile.ZipFile) -> bytes:
    """policy.pth within the limits; it is itself a zip (torch's format), whose directory is checked too, since
    torch allocates each record at its declared size."""
    raw = read_member(zf, "policy.pth", MAX_WEIGHTS_BYTES, str(path))
    check_torch_zip(raw, f"{path}:policy.pth", MAX_WEIGHTS_BYTES)
    return raw


def trained_with_vecnormalize(path: Path) -> bool | None:
    """Whether an SB3 PPO/A2C zip was trained inside a VecNormalize, from its `data` alone: on-policy algorithms
    keep the un-normalised first observation (`_last_original_obs`) only when the env is a VecNormalize. None when
    the zip cannot tell: off-policy algorithms (DQN, SAC, TD3) fill that field either way, a model saved before
    training has no last observation, and an unreadable file is reported by the load itself."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = _read_data(path, zf)
        source = _sb3_algorithm(data, path)
    except (ModelLoadError, zipfile.BadZipFile, OSError, KeyError):
        return None
    if source not in ("sb3-ppo", "sb3-a2c") or not isinstance(data.get("_last_obs"), dict):
        return None
    return isinstance(data.get("_last_original_obs"), dict)


def _sb3_int(value, what: str, path: Path, minimum: int = 1) -> int:
    """An integer field of an SB3 space: a JSON int, or the decimal string SB3 writes for numpy ints."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value > MAX_VALUES:
        raise ModelLoadError(f"{path}: SB3 {what} must be an integer in [{minimum}, {MAX_VALUES}], got "
                             f"{str(value)[:40]!r}; save the model again with stable-baselines3")
    return value


# A subspace as gymnasium prints it inside a Dict's repr (SB3 data's "spaces" field): 'name': Kind(...)
_KEY = re.compile(r"""\s*('(?:[^'\\]|\\.){1,200}'|"(?:[^"\\]|\\.){1,200}")\s*:\s*(\w+)\(""")
_BOX = re.compile(r"(.*), \((\d+(?:, \d+)*),?\), (\w+)", re.DOTALL)
MAX_KEYS = 64


def _dict_spaces(text, path: Path) -> list[tuple[str, dict]]:
    """The subspaces of a Dict observation space, in its order (CombinedExtractor's), from the repr SB3 writes as
    the space's "spaces" field: "{'position': Box(-1.0, 1.0, (2,), float32), 'goal': Discrete(3)}". Box keys give
    their shape and dtype; other kinds their name (frontends/specs.py says which are supported)."""
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: cannot read the Dict observation space from SB3 data ({why}); save the model "
                              "again with stable-baselines3 >= 2.0")

    if not isinstance(text, str) or not text.startswith("{") or len(text) > MAX_SERIALIZED:
        raise bad("no \"spaces\" text")
    keys, i = [], 1
    while text[i:].strip() != "}":
        m = _KEY.match(text, i)
        if m is None or len(keys) >= MAX_KEYS:
            raise bad(f"at {text[i:i + 40]!r}" if m is None else f"more than {MAX_KEYS} keys")
        name, kind = ast.literal_eval(m.group(1)), m.group(2)
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        if depth:
            raise bad(f"key {name!r} is cut short")
        args = text[m.end():j - 1]
        space = {"type": kind}
        try:
            if kind == "Box":
                box = _BOX.fullmatch(args)
                if box is None:
                    raise bad(f"key {name!r}: {args[-40:]!r}")
                space["shape"] = list(check_shape([int(d) for d in box.group(2).split(",")], f"key {name!r} shape",
                                                  str(path)))
                space["dtype"] = box.group(3)
                check_real_dtype(space["dtype"], f"{path}: observation key {name!r}")
            elif kind == "MultiBinary" and re.fullmatch(r"\d{1,9}", args.strip()):
                space["shape"], space["dtype"] = [int(args)], "int8"
            elif kind == "Discrete":
                space["n"] = int(args.split(",")[0]) if re.match(r"\d{1,9}", args.strip()) else 0
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        keys.append((name, space))
        i = j + (1 if text[j:j + 1] == "," else 0)
    if not keys or len({k for k, _ in keys}) != len(keys):
        raise bad("no keys" if not keys else "a repeated key")
    return keys


def _sb3_space(d, what: str, path: Path) -> dict:
    if not isinstance(d, dict) or not isinstance(d.get(":type:"), str):
        raise ModelLoadError(f"{path}: SB3 data has no readable {what}; re-save with stable-baselines3 >= 2.0")
    kind = re.search(r"spaces\.\w+\.(\w+)'", d[":type:"])
    kind = kind.group(1) if kind else d[":type:"][:60]
    space = {"type": kind}
    if kind == "Dict" and what == "observation_space":
        space["keys"] = _dict_spaces(d.get("spaces"), path)
    elif kind == "Discrete":
        if "n" not in d:
            raise ModelLoadError(f"{path}: the SB3 Discrete {what} has no \"n\"; save the model again")
        space["n"] = _sb3_int(d["n"], f"{what} n", path)
        if _sb3_int(d.get("start", 0) or 0, f"{what} start", path, minimum=-MAX_VALUES) != 0:
            raise ModelLoadError(f"{path}: Discrete {what} with start={d['start']} is not supported yet")
    elif kind in ("Box", "MultiBinary"):
        if "_shape" not in d:
            raise ModelLoadError(f"{path}: the SB3 {kind} {what} has no \"_shape\"; save the model again")
        try:
            space["shape"] = list(check_shape(d["_shape"], f"SB3 {what} _shape", str(path)))
            space["dtype"] = d.get("dtype", "float32")
            if what == "observation_space":
                check_real_dtype(space["dtype"], f"{path}: SB3 {what}")
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
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
    ser = _serialized(data.get("policy_class"), "policy_class", path)
    if not ser:
        raise ModelLoadError(f"{path}: SB3 data has no policy_class; is this a Stable-Baselines3 model?")
    try:
        _, globs = _pickle_strings_and_globals(ser)
    except Exception as e:  # noqa: BLE001 - genops raises ValueError and others on malformed input
        raise ModelLoadError(f"{path}: unreadable policy_class in SB3 data ({e}); save the model again") from None
    module, name = globs[0] if globs else ("?", "?")
    if "Cnn" in name and not (name in ("ActorCriticCnnPolicy", "RecurrentActorCriticCnnPolicy")
                              or module.startswith("stable_baselines3.dqn.")):
        raise ModelLoadError(f"{path}: {name} ({module}) is not supported yet: of the CNN policies, PPO, A2C and "
                             "DQN CnnPolicy and RecurrentPPO CnnLstmPolicy are (frontends/sb3_cnn.py)")
    for family in ("dqn", "sac", "td3"):
        if module.startswith(f"stable_baselines3.{family}."):
            return f"sb3-{family}"
    if module == "stable_baselines3.common.policies" and name in ("ActorCriticPolicy", "MlpPolicy",
                                                                  "MultiInputActorCriticPolicy",
                                                                  "ActorCriticCnnPolicy"):
        return "sb3-ppo" if "clip_range" in data else "sb3-a2c"
    if module == "sb3_contrib.common.recurrent.policies":
        if name not in ("RecurrentActorCriticPolicy", "RecurrentActorCriticCnnPolicy"):
            raise ModelLoadError(f"{path}: {name} is not supported yet (RecurrentPPO's MlpLstmPolicy and "
                                 "CnnLstmPolicy are)")
        return "sb3-recurrent-ppo"
    raise ModelLoadError(f"{path}: SB3 policy class {module}.{name} is not supported yet (PPO, A2C, DQN, SAC, "
                         "TD3 MLP and MultiInput policies are)")


def _sb3_policy_kwargs(data: dict, path: Path) -> tuple[dict, str | None]:
    """Readable policy_kwargs and the activation class name found statically in its pickle."""
    pk = data.get("policy_kwargs") or {}
    if not isinstance(pk, dict):
        raise ModelLoadError(f"{path}: the SB3 policy_kwargs is a {type(pk).__name__}, not an object; save the "
                             "model again")
    ser = _serialized(pk, "policy_kwargs", path)
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


_EXTRACTOR_KEY = re.compile(r"(?:^|\.)features_extractor\.extractors\.([^.]+)\.")


def _combined_extractor(obs_space: dict, sd: dict, path: Path) -> None:
    """SB3's CombinedExtractor (MultiInputPolicy): nn.Flatten per vector key, a NatureCNN per image key
    (frontends/sb3_cnn.py: combined_policy), concatenated in the Dict space's order, which is the flat input of
    runtime/specs.py (frontends/specs.py writes its keys). Checked here: CNN weights only for image keys, no custom
    extractor."""
    images = {name for name, sub in obs_space["keys"] if _is_image(sub)}
    for k in sd:
        m = _EXTRACTOR_KEY.search(k)
        if m is not None and m.group(1) not in images:
            raise ModelLoadError(f"{path}: observation key {m.group(1)!r} has a CNN in the CombinedExtractor but is "
                                 "not an image key of the observation space (uint8 (C, H, W)); the file does not "
                                 "match its space")
        if "features_extractor." in k and ".extractors." not in k:
            raise ModelLoadError(f"{path}: a custom features extractor ({k}) is not supported yet; use SB3's "
                                 "CombinedExtractor (the MultiInputPolicy default)")


def _load_sb3(path: Path, zf: zipfile.ZipFile, cfg: dict) -> LoadedPolicy:
    data = _read_data(path, zf)
    source = _sb3_algorithm(data, path)
    kwargs, act_name = _sb3_policy_kwargs(data, path)
    default_act = "tanh" if source in ("sb3-ppo", "sb3-a2c", "sb3-recurrent-ppo") else "relu"
    if act_name is not None and act_name not in _TORCH_ACTIVATIONS:
        raise ModelLoadError(f"{path}: activation {act_name} is not supported yet ({sorted(_TORCH_ACTIVATIONS)} are)")
    activation = _TORCH_ACTIVATIONS.get(act_name, default_act) if act_name else default_act
    obs_space = _sb3_space(data.get("observation_space"), "observation_space", path)
    act_space = _sb3_space(data.get("action_space"), "action_space", path)
    where = f"{path}:policy.pth"
    sd = check_state_dict(_torch_load_weights(_read_weights(path, zf), where), where,
                          "save the model again with stable-baselines3")
    cnn_prefix = sb3_cnn.extractor_prefix(sd) if obs_space["type"] != "Dict" else None  # a CnnPolicy's NatureCNN
    if obs_space["type"] == "Dict":
        _combined_extractor(obs_space, sd, path)
    try:
        input_spec = _space_to_specs(obs_space, "input")
        if input_spec["preprocess"] == "image" and kwargs.get("normalize_images") is False:
            input_spec["preprocess"] = "none"
        squash = "tanh" if source in ("sb3-sac", "sb3-td3") or kwargs.get("squash_output") else "clip"
        outputs = "q_values" if source == "sb3-dqn" else "logits"
        output = _space_to_specs(act_space, "output", outputs, squash)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    try:
        check_specs(input_spec, output, f"{path}: SB3 spaces")
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if source == "sb3-recurrent-ppo":  # an LSTM actor: its state in and out of every call
        return sb3_recurrent.load_recurrent(path, data, sd, activation, input_spec, output, cfg)
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
    # Dict keys the module prepares: a NatureCNN per image key (its shape becomes the env's (H, W, C)), a one-hot
    # per Discrete key
    prepared = [k["name"] for k in input_spec.get("keys") or [] if k.get("preprocess") in ("image", "onehot")]
    width = sb3_cnn.combined_features(sd, input_spec, path) if prepared else None
    mlp = _build_mlp(path, layers, activation, [layers[0][1].shape[1]] if cnn_prefix else
                     [width] if prepared else input_spec["shape"])
    if cnn_prefix:  # the NatureCNN and its linear before the MLP; the input becomes the env's (H, W, C) images
        mlp = sb3_cnn.cnn_policy(sd, cnn_prefix, input_spec, mlp, cfg, path)
    if prepared:
        mlp = sb3_cnn.combined_policy(sd, input_spec, mlp, cfg, kwargs.get("normalize_images") is not False, path)
    algo = source.split("-")[1].upper()
    sizes = [layers[0][1].shape[1]] + [w.shape[0] for _, w, _ in layers]
    desc = f"SB3 {algo} {'CnnPolicy (NatureCNN) then ' if cnn_prefix else ''}MLP policy {sizes} {activation}, " \
           f"{act_space['type']} actions"
    if obs_space["type"] == "Dict":
        desc = f"SB3 {algo} MultiInput policy (keys {', '.join(k for k, _ in obs_space['keys'])}) " \
               f"{sizes} {activation}, {act_space['type']} actions"
    return LoadedPolicy(mlp, None, input_spec, output, source, desc)
