"""Between the trainer and the compiler: the files a PPO run writes, and policy files checked or turned into
backbones on their way in.

    output_spec        the manifest output spec of an action space (argmax, or the mean clipped to the Box)
    export_policy      policy.safetensors: the actor as a compilable MLP (`bitrl-compile policy.safetensors`)
    save_like          a policy file with another policy's specs (what `distill` writes for an MLP)
    save_program       a convolutional policy as a torch.export program (.pt2) with its /255 inside (what `distill`
                       writes for a CNN: `bitrl-compile student.pt2 --env ID` loads it with today's frontends)
    save_checkpoint    checkpoint.safetensors: agent, Adam state, observation statistics (`load_checkpoint`
                       restores them; there is no resume of a run yet)
    features_policy    a policy's torso as a LoadedPolicy with output kind "features" (`bitrl-compile --features`)
    reference_forward  `obs batch -> network output` of a policy in numpy: what its artifact computes (MLPs, CNNs)
    reference_act      `obs -> action` of the same (argmax, or squash/clip to the bounds, as the runtime does)
    check_policy_fits  a policy file is an MLP (or a CNN on images) for an environment's spaces (before `finetune`)
    layers             the Linear and Conv2d layers of a module in the compiler's numbering (execution order)
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from bitrl_compile.evaluate import make_env
from bitrl_compile.frontends import ACTIVATIONS, MLPPolicy, save_mlp_policy
from bitrl_compile.quant import (
    apply_activation,
    bitconv2d_reference,
    bitlinear_reference,
    quantize_weight_int8,
    ternarize_weight,
)
from bitrl_compile.runtime.policy import normalization, postprocess, prepare_observations
from bitrl_compile.trainers.backbones import ObsNormalizer, TorchBackbone, linears, normalize, torso_module


def output_spec(space: gym.Space, log_std: list[float] | None = None) -> dict:
    """The manifest output spec for an action space (deterministic actions: argmax, or the mean clipped)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"kind": "discrete", "n": int(space.n), "outputs": "logits"}
    if isinstance(space, gym.spaces.Box):
        return {"kind": "continuous", "shape": list(space.shape), "low": space.low.astype(float).ravel().tolist(),
                "high": space.high.astype(float).ravel().tolist(), "squash": "clip", "log_std": log_std}
    raise ValueError(f"{type(space).__name__} action spaces are not supported (Discrete and Box are)")


# ------------------------------------------------------------------------------------------------ what a run writes

def export_policy(path: Path, agent: nn.Module, backbone, env_id: str, action_space: gym.Space, args,
                  extra: dict | None = None) -> dict:
    """Write the actor of a `ppo.Agent` as a compilable MLP (.safetensors + config): the heads alone (no backbone),
    or the frozen torso followed by the actor head as one MLP. With a compiled backbone only the heads are written
    (they take its features; the config names the backbone). `args` is the run's `ppo.Args`. Returns the config."""
    log_std = agent.actor_logstd.detach().ravel().tolist() if not agent.discrete else None
    heads = [(lin.weight, lin.bias) for lin in linears(agent.actor)]
    trained = {"algo": "PPO (bitrl_compile.trainers.ppo)", "env": env_id, "seed": args.seed,
               "heads_bits": args.heads_bits, "steps": args.total_timesteps, **(extra or {})}
    if isinstance(backbone, ObsNormalizer):
        layers, stats, obs_dim = heads, backbone.stats(), backbone.dim
    elif isinstance(backbone, TorchBackbone) and all(isinstance(m, (nn.Linear, ACTIVATIONS[args.activation]))
                                                     for m in backbone.module):
        layers = [(lin.weight, lin.bias) for lin in linears(backbone.module)] + heads
        stats, obs_dim = backbone.stats, linears(backbone.module)[0].in_features
        trained["backbone"] = backbone.source
    else:
        layers, stats, obs_dim = heads, None, backbone.dim
        trained["backbone"] = getattr(backbone, "source", type(backbone).__name__)
        trained["input_is_backbone_features"] = True
    state = {f"net.{2 * i}.{k}": t.detach().clone() for i, (w, b) in enumerate(layers) for k, t in
             (("weight", w), ("bias", b))}
    config = {"arch": "mlp", "obs_shape": [obs_dim], "hidden": [w.shape[0] for w, _ in layers[:-1]],
              "activation": args.activation, "output": output_spec(action_space, log_std),
              "input": {"shape": [obs_dim], "preprocess": "none", "normalize": stats}, "trained": trained}
    save_mlp_policy(path, state, config)
    return config


def save_like(path: Path, loaded, module: MLPPolicy, trained: dict) -> dict:
    """Write `module` (an MLPPolicy of `loaded`'s architecture) as a policy file with `loaded`'s input spec
    (observation statistics included) and output spec (a DQN stays a Q-network, a squashed actor keeps its squash
    and bounds), plus `trained` (what made it). Returns the config."""
    lins = linears(module)
    config = {"arch": "mlp", "obs_shape": list(loaded.input["shape"]), "hidden": [lin.out_features for lin in lins[:-1]],
              "activation": module.activation, "output": dict(loaded.output), "input": dict(loaded.input),
              "trained": trained, **({"shared_row": True} if getattr(module, "shared_row", False) else {})}
    save_mlp_policy(path, module.state_dict(), config)
    return config


def save_program(path: Path, loaded, module: nn.Module, trained: dict) -> dict:
    """Write `module` (a convolutional policy of `loaded`'s architecture, taking its prepared input) as a torch.export
    program with a dynamic batch, the input spec's /255 ("image") done inside it first, so that the frontends load it
    as they load any .pt2 (input: the environment's frames, preprocess "none"; actions from --env). The config a
    safetensors policy carries (its specs, `trained`) rides along as the archive's extra file bitrl_config.json.
    Returns that config."""
    from bitrl_compile.runtime.files import write_atomic

    image = loaded.input.get("preprocess", "none") == "image"
    if loaded.input.get("preprocess", "none") not in ("none", "image") or loaded.input.get("normalize"):
        raise ValueError(f"a convolutional policy with input preprocess {loaded.input.get('preprocess')!r} or "
                         "observation statistics cannot be written as a program; distil one on plain frames")
    program = _Program(copy.deepcopy(module).float().eval(), image)
    shape = [int(d) for d in loaded.input["shape"]]
    with torch.no_grad():
        ep = torch.export.export(program, (torch.zeros(2, *shape),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    config = {"arch": "torch-export", "obs_shape": shape, "input": {"shape": shape, "preprocess": "none"},
              "output": dict(loaded.output), "trained": trained}
    buffer = io.BytesIO()
    torch.export.save(ep, buffer, extra_files={"bitrl_config.json": json.dumps(config)})
    write_atomic(path, buffer.getvalue())
    return config


class _Program(nn.Module):
    """A policy on the environment's observations: /255 first for an image input (the artifact's "image")."""

    def __init__(self, policy: nn.Module, image: bool):
        super().__init__()
        self.policy, self.image = policy, image

    def forward(self, x):
        return self.policy(x / 255.0 if self.image else x)  # torch's x / 255.0 is numpy's x / float32(255)


def save_checkpoint(path: Path, agent: nn.Module, optimizer: torch.optim.Optimizer, backbone, args,
                    global_step: int) -> None:
    """agent.*, optimizer.* and obs_rms.* tensors plus JSON metadata (args, optimizer groups, step) in safetensors."""
    from safetensors.torch import save

    from bitrl_compile.runtime.files import write_atomic

    tensors = {f"agent.{k}": v.detach().contiguous() for k, v in agent.state_dict().items()}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optimizer.{i}.{k}"] = torch.as_tensor(v).contiguous()
    if isinstance(backbone, ObsNormalizer):
        tensors["obs_rms.mean"] = torch.from_numpy(backbone.rms.mean.copy())
        tensors["obs_rms.var"] = torch.from_numpy(backbone.rms.var.copy())
        tensors["obs_rms.count"] = torch.tensor(float(backbone.rms.count), dtype=torch.float64)
    meta = {"args": json.dumps(dataclasses.asdict(args)), "global_step": str(global_step),
            "param_groups": json.dumps(opt["param_groups"])}
    write_atomic(path, save(tensors, metadata=meta))


def load_checkpoint(path: str | Path, agent: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    backbone=None) -> dict:
    """Restore what save_checkpoint wrote into an agent built with the same args; returns the metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    agent.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("agent.")})
    if optimizer is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    if isinstance(backbone, ObsNormalizer) and "obs_rms.mean" in tensors:
        backbone.rms.mean, backbone.rms.var = tensors["obs_rms.mean"].numpy(), tensors["obs_rms.var"].numpy()
        backbone.rms.count = float(tensors["obs_rms.count"])
    return {"args": json.loads(meta["args"]), "global_step": int(meta["global_step"])}


# ------------------------------------------------------------------------------------------------ policy files in

def features_policy(loaded):
    """A LoadedPolicy of an MLP policy's torso whose manifest output is {"kind": "features", "dim": D}: compile it
    with `pipeline.compile_policy` (or `bitrl-compile MODEL --features`) to run a backbone in the runtime."""
    from bitrl_compile.loaded import LoadedPolicy

    if not isinstance(loaded.module, MLPPolicy):
        raise ValueError(  # noqa: TRY004 - a user error (exit code 1)
            f"only MLP policies have a torso to compile as a backbone (got {loaded.description})")
    torso, dim = torso_module(loaded.module, bits=32.0)
    for m in torso:
        if isinstance(m, nn.Linear):
            m.__class__ = nn.Linear  # plain float layers: the compiler ternarizes them exactly as QuantLinear did
    return LoadedPolicy(torso.eval(), None, dict(loaded.input), {"kind": "features", "dim": dim},
                        f"{loaded.source}-torso", f"torso of {loaded.description} -> {dim} features")


def reference_forward(loaded, ternary: bool = True, per_channel: bool = False, int8_layers=()):
    """`obs batch -> network output [B, out]` of an MLP policy in numpy: with ternary=True every Linear is the
    BitLinear reference (`quant.bitlinear_reference`: what the compiled artifact computes, bit for bit for ReLU;
    per_channel as `bitrl-compile --per-channel`; the Linears numbered in int8_layers with int8 weights, as
    `--int8-layers`), else float32."""
    if not isinstance(loaded.module, MLPPolicy) and loaded.module is not None:
        return _layered_reference(loaded, ternary, per_channel, int8_layers)
    if not isinstance(loaded.module, MLPPolicy) or loaded.module.activation not in ("relu", "tanh"):
        raise ValueError(f"the numpy reference runs ReLU/Tanh MLP policies (got {loaded.description})")
    activation = loaded.module.activation
    layers = []
    for i, lin in enumerate(linears(loaded.module)):
        w, b = lin.weight.detach().numpy().astype(np.float32), lin.bias.detach().numpy().astype(np.float32)
        if not ternary:
            layers.append((w, b))
        else:
            layers.append((*(quantize_weight_int8(w) if i in int8_layers else ternarize_weight(w, per_channel)), b))
    stats = loaded.input.get("normalize")

    shared = getattr(loaded.module, "shared_row", False)

    def forward(obs):
        x = normalize(np.asarray(obs, np.float32), stats)
        for i, layer in enumerate(layers):
            x = bitlinear_reference(x, *layer) if ternary else (x @ layer[0].T + layer[1]).astype(np.float32)
            if i < len(layers) - 1:
                x = apply_activation(x, activation)
        return x[:, 1:] + x[:, :1] if shared else x

    return forward


def layers(module: nn.Module) -> list[nn.Module]:
    """The Linear and Conv2d layers of a module in the order it runs them, which is the compiler's numbering of
    its BitLinear/BitConv2d layers (--int8-layers) for modules that call their children in definition order
    (nn.Sequential stacks, frontends' MLPPolicy and SB3CnnPolicy)."""
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def conv_padding(conv: nn.Conv2d, name: str = "policy") -> tuple[int, int]:
    """(ph, pw) of a Conv2d the compiler runs as BitConv2d (dilation 1, groups 1, zero padding given as numbers);
    ValueError naming the layer otherwise."""
    if isinstance(conv.padding, str) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"{name}: {conv} is not a plain convolution (numeric zero padding, dilation 1, groups 1); "
                         "the ternary convolution runs those only")
    return int(conv.padding[0]), int(conv.padding[1])


def _layered_reference(loaded, ternary: bool, per_channel: bool, int8_layers):
    """reference_forward of a torch module of Linear/Conv2d layers (a CNN policy): a copy whose every such layer is
    its numpy reference (`bitlinear_reference`, `bitconv2d_reference`, with the ternary or int8 weights the
    compiler makes) and whose Tanh/Sigmoid are apply_activation's, on observations prepared as the artifact
    prepares them (`prepare_observations`: /255, statistics). A program (torch.export's GraphModule) has no layers
    to replace, and other layers' torch math may differ from the artifact's by an ulp: their reference is the
    pipeline's (`reference.run` of the quantized Relax module: one torch.export, about a second)."""
    leaves = [m for m in loaded.module.modules() if not list(m.children())]
    if isinstance(loaded.module, torch.fx.GraphModule) or not all(isinstance(m, _KNOWN) for m in leaves):
        return _pipeline_reference(loaded, ternary, per_channel, int8_layers)
    module = copy.deepcopy(loaded.module).float().eval()
    norm = normalization(loaded.input)
    if ternary:
        for i, m in enumerate(layers(module)):
            w = m.weight.detach().numpy().astype(np.float32)
            b = None if m.bias is None else m.bias.detach().numpy().astype(np.float32)
            flat = w.reshape(w.shape[0], -1)
            q, gamma = quantize_weight_int8(flat) if i in int8_layers else ternarize_weight(flat, per_channel)
            if isinstance(m, nn.Conv2d):
                ph, pw = conv_padding(m, loaded.description)
                m.forward = _numpy_layer(bitconv2d_reference, q.reshape(w.shape), gamma, b, tuple(m.stride),
                                         (ph, pw, ph, pw))
            else:
                m.forward = _numpy_layer(bitlinear_reference, q, gamma, b)
        for m in module.modules():
            for kind, name in ((nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid")):
                if isinstance(m, kind):
                    m.forward = lambda x, name=name: torch.from_numpy(apply_activation(x.numpy(), name))

    def forward(obs):
        x, _ = prepare_observations(loaded.input, np.asarray(obs), norm)
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return forward


# The layers a layered reference runs exactly as the artifact does (others: the pipeline's reference).
_KNOWN = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Flatten, nn.Identity)


def _numpy_layer(fn, *args):
    return lambda x: torch.from_numpy(fn(x.detach().numpy(), *args))


def _pipeline_reference(loaded, ternary: bool, per_channel: bool, int8_layers):
    from bitrl_compile import pipeline, reference

    mod = pipeline.to_relax(loaded)
    if ternary:
        mod = pipeline.int8_quantizer(mod, per_channel)(tuple(int8_layers))
    norm = normalization(loaded.input)

    def forward(obs):
        x, _ = prepare_observations(loaded.input, np.asarray(obs), norm)
        return np.asarray(reference.run(mod, x))

    return forward


def reference_act(loaded, ternary: bool = True, per_channel: bool = False):
    """`obs -> action` of an MLP policy in numpy (`reference_forward` of one observation, then the output spec's
    deterministic post-processing: argmax, or the squash/clip to the action bounds, as the runtime does)."""
    forward, spec = reference_forward(loaded, ternary, per_channel), loaded.output

    def act(obs):
        out = postprocess(spec, forward(np.asarray(obs, np.float32)[None]), deterministic=True)[0]
        return int(out) if spec["kind"] == "discrete" else out

    return act


def check_policy_fits(loaded, env_id: str, name: str = "policy", convolutional: bool = False) -> None:
    """Raise ValueError unless `loaded` is an MLP policy (or with `convolutional`, a module with Conv2d layers: a
    CNN policy, for distillation) for env_id's observation and action spaces."""
    env = make_env(env_id)  # a missing dependency (Box2D) is one line naming the pip command
    obs_dim, action_space = int(np.prod(env.observation_space.shape)), env.action_space
    obs_shape = [int(d) for d in env.observation_space.shape or ()]
    env.close()
    convolutional = convolutional and isinstance(loaded.module, nn.Module) and \
        any(isinstance(m, nn.Conv2d) for m in loaded.module.modules())
    if convolutional and loaded.input["shape"] != obs_shape:
        raise ValueError(f"{name}: a convolutional policy on observations of shape {loaded.input['shape']}, and "
                         f"{env_id}'s are {obs_shape}; give the env it was trained on")
    if not convolutional and (not isinstance(loaded.module, MLPPolicy) or loaded.input["shape"] != [obs_dim]):
        cnn = isinstance(loaded.module, nn.Module) and any(isinstance(m, nn.Conv2d) for m in loaded.module.modules())
        raise ValueError(f"{name}: finetune needs an MLP policy for {env_id}'s {obs_dim}-value observations "
                         f"(got {loaded.description}, input {loaded.input['shape']}); "
                         + ("a CNN policy is fine-tuned by distillation (--method distill)" if cnn else
                            "give the env it was trained on"))
    want = output_spec(action_space)
    if loaded.output["kind"] != want["kind"] or loaded.output.get("n") != want.get("n"):
        raise ValueError(f"{name}: its actions ({loaded.output['kind']}, {loaded.output.get('n', '')}) do not match "
                         f"{env_id}'s {action_space}; give the environment it was trained on")
