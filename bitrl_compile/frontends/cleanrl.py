"""CleanRL agents: the state_dicts of ppo.py (actor.*), ppo_continuous_action.py (actor_mean.*, actor_logstd)
and dqn.py (network.*), and of the Atari agents ppo_atari.py, dqn_atari.py (NatureCNN, `_load_cleanrl_atari`) and ppo_atari_lstm.py
(NatureCNN then an LSTM, its state explicit: `_atari_lstm`).
"""

from __future__ import annotations

from pathlib import Path

from bitrl_compile.frontends.mlp import _build_mlp, _linears
from bitrl_compile.frontends.specs import _check_finite, _default_output, _env_specs
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError


def _load_cleanrl(path: Path, sd: dict, cfg: dict) -> LoadedPolicy:
    first = sd.get("network.0.weight")
    if getattr(first, "ndim", 2) == 4:
        return _load_cleanrl_atari(path, sd, cfg)
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
    mlp = _build_mlp(path, layers, cfg.get("activation", activation), obs_shape)  # checks obs_shape
    if not isinstance(cfg.get("output", {}), dict):
        raise ModelLoadError(f"{path}: config \"output\" must be an object (a spec), got {str(cfg['output'])[:60]!r}")
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


ATARI_CONVS = ("network.0", "network.2", "network.4")  # Conv2d, ReLU, Conv2d, ReLU, Conv2d, ReLU, Flatten, Linear


def _load_cleanrl_atari(path: Path, sd: dict, cfg: dict) -> LoadedPolicy:
    """CleanRL's Atari agents: `network` = NatureCNN (network.0/2/4: 8x8/4, 4x4/2, 3x3/1) and Linear(3136, 512)
    (network.7), ReLU; then `actor` (ppo_atari.py: logits) or network.9 (dqn_atari.py: Q-values). They take what
    their wrappers give, (4, 84, 84) uint8 frames channels-first, and divide by 255 in forward: here the input spec's
    preprocess "image" (/255 in the artifact), no transpose. The frame size comes from config "obs_shape" or from the
    linear layer's width (square frames)."""
    from torch import nn

    from bitrl_compile.frontends.sb3_cnn import SB3CnnPolicy, nature_layers

    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("network.") and k.endswith(".weight")
                   and getattr(sd[k], "ndim", 0) == 4)
    missing = [k for k in (*(f"{c}.weight" for c in ATARI_CONVS), "network.7.weight") if k not in sd]
    if convs != [0, 2, 4] or missing:
        raise ModelLoadError(f"{path}: a CleanRL agent with convolutions network.{convs} and without "
                             f"{missing or 'nothing'}: not ppo_atari.py's or dqn_atari.py's NatureCNN (network.0, .2, "
                             ".4 and the Linear network.7); other CNNs: export the agent with torch.export")
    cnn, linear, features = nature_layers(sd, list(ATARI_CONVS), "network.7", path,
                                          "not CleanRL's Atari network; export the agent with torch.export")
    if any(k.startswith("lstm.") for k in sd):
        return _atari_lstm(path, sd, cfg, cnn, linear)
    if "actor.weight" in sd:
        source, outputs, head_key = "cleanrl-ppo-atari", "logits", "actor"
    elif "network.9.weight" in sd:
        source, outputs, head_key = "cleanrl-dqn-atari", "q_values", "network.9"
    else:
        raise ModelLoadError(f"{path}: a CleanRL Atari network without a head (actor.weight or network.9.weight); "
                             "save the whole agent's state_dict")
    layers = [(head_key, sd[f"{head_key}.weight"], sd.get(f"{head_key}.bias"))]
    if layers[0][1].shape[1] != features:
        raise ModelLoadError(f"{path}: {head_key} takes {layers[0][1].shape[1]} features but network.7 gives "
                             f"{features}; the file is not one agent")
    head = _build_mlp(path, layers, "relu", [features])
    input_spec, output = _atari_specs(path, sd, cfg, cnn, linear, outputs)
    n = head.net[-1].out_features
    output = {**(output or _default_output(n, outputs)), "outputs": outputs}
    module = SB3CnnPolicy(cnn, linear, nn.Sequential(head), channels_last=False).eval()
    desc = (f"CleanRL {source.split('-')[1]} Atari agent, NatureCNN on {'x'.join(map(str, input_spec['shape']))} "
            f"frames, linear {features}, {n} actions")
    return LoadedPolicy(module, None, input_spec, output, source, desc)


def _atari_lstm(path: Path, sd: dict, cfg: dict, cnn, linear) -> LoadedPolicy:
    """ppo_atari_lstm.py: `network` (NatureCNN, Linear(3136, 512), ReLU), `lstm` (nn.LSTM(512, 128)), `actor`
    Linear(128, n), on (1, 84, 84) frames: frontends/sb3_recurrent.py's RecurrentPolicy with the network as its
    features. Its `done` masking ((1 - done) * state before the step) is RecurrentPolicy's episode_start."""
    from torch import nn

    from bitrl_compile.frontends.sb3_recurrent import build_recurrent

    if "actor.weight" not in sd:
        raise ModelLoadError(f"{path}: a CleanRL Atari LSTM agent without actor.weight; save the whole agent's "
                             "state_dict")
    mapped = {"lstm_actor." + k[5:]: v for k, v in sd.items() if k.startswith("lstm.")}
    mapped.update({f"action_net.{k}": sd[f"actor.{k}"] for k in ("weight", "bias") if f"actor.{k}" in sd})
    features = nn.Sequential(cnn, linear)
    policy = build_recurrent(path, mapped, "relu", linear[0].out_features, features)
    input_spec, output = _atari_specs(path, sd, cfg, cnn, linear, "logits")
    n = policy.head.net[-1].out_features
    output = {**(output or _default_output(n, "logits")), "outputs": "logits"}
    input_spec["recurrent"] = {"layers": policy.layers, "hidden": policy.hidden, "state_size": policy.state_size}
    desc = (f"CleanRL ppo Atari LSTM agent, NatureCNN on {'x'.join(map(str, input_spec['shape']))} frames, "
            f"LSTM {policy.layers}x{policy.hidden}, {n} actions")
    return LoadedPolicy(policy, None, input_spec, output, "cleanrl-ppo-atari-lstm", desc)


def _atari_specs(path: Path, sd: dict, cfg: dict, cnn, linear, outputs: str) -> tuple[dict, dict]:
    """(input spec, output spec or {}) of a CleanRL Atari agent: channels-first uint8 frames of config "obs_shape"
    or of the size network.7's width implies (square), checked against the convolutions and the env if given."""
    import torch

    channels = int(sd["network.0.weight"].shape[1])
    shape = [int(d) for d in cfg.get("obs_shape") or [channels, *_square_frame(linear[0].in_features, path)]]
    with torch.no_grad():
        try:
            width = cnn(torch.zeros(1, *shape)).shape[1] if len(shape) == 3 else -1
        except RuntimeError:
            width = -1
    if width != linear[0].in_features:
        raise ModelLoadError(f"{path}: config \"obs_shape\" {shape}: the convolutions do not give network.7's "
                             f"{linear[0].in_features} features on it; give the (C, H, W) frames the agent was "
                             "trained on")
    output = cfg.get("output", {})
    if not isinstance(output, dict):
        raise ModelLoadError(f"{path}: config \"output\" must be an object (a spec), got {str(output)[:60]!r}")
    input_spec = {"shape": shape, "dtype": "float32", "preprocess": "image"}
    if cfg.get("env"):
        env_in, env_out = _env_specs(path, cfg["env"], outputs, "clip")
        if env_in.get("shape") != shape:
            raise ModelLoadError(f"{path}: env {cfg['env']} gives observations of shape {env_in.get('shape')} but the "
                                 f"agent takes {shape} frames (CleanRL's Atari wrappers: grey 84x84, 4 stacked); give "
                                 "an env id whose observations are the wrapped frames, or the actions with "
                                 "config={\"output\": {\"kind\": \"discrete\", \"n\": N}}")
        input_spec = {**env_in, "shape": shape}
        output = {**env_out, **output}
    if output and output.get("kind") != "discrete":
        raise ModelLoadError(f"{path}: CleanRL's Atari agents have discrete actions; the output spec says "
                             f"{output.get('kind')!r}")
    return input_spec, output


def _square_frame(n_flatten: int, path: Path) -> tuple[int, int]:
    """(H, W) of the square frame whose NatureCNN output is n_flatten values (64 channels), e.g. 3136 -> 84 x 84."""
    for size in range(36, 1025):
        s = ((size - 8) // 4 + 1 - 4) // 2 + 1 - 2
        if 64 * s * s == n_flatten:
            return size, size
    raise ModelLoadError(f"{path}: network.7 takes {n_flatten} features, which no square frame gives; pass "
                         "config={\"obs_shape\": [C, H, W]}")
