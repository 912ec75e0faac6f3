"""CleanRL agents: the state_dicts of ppo.py (actor.*), ppo_continuous_action.py (actor_mean.*, actor_logstd)
and dqn.py (network.*)."""

from __future__ import annotations

from pathlib import Path

from bitrl_compile.frontends.mlp import _build_mlp, _linears
from bitrl_compile.frontends.specs import _check_finite, _default_output, _env_specs
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError


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
