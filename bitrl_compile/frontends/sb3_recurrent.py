"""sb3-contrib RecurrentPPO (RecurrentActorCriticPolicy, an LSTM actor) as a torch module with its state explicit.

    out, state = RecurrentPolicy(obs [B, obs_dim], state [B, 2 L H], episode_start [B])

The actor of RecurrentPPO: observations flattened, `lstm_actor` (L layers of H units), then the MLP
`mlp_extractor.policy_net` and `action_net`. The critic (its own LSTM, or a shared one) is not part of acting and
is left out. The LSTM's state travels in and out of every call as one float32 row per environment,

    state[b] = [h_0, ..., h_{L-1}, c_0, ..., c_{L-1}]     (2 L H values; zeros: `initial_state`)

and `episode_start[b] = 1` zeroes that row's state before the step, as SB3 does (`(1 - episode_start) * h`).
Each LSTM layer is written with two Linear layers, `ih` (input to the four gates, carrying both of torch's
biases) and `hh` (the previous h to the gates, no bias), so the compiler makes both matmuls ternary (BitLinear:
per-row int8 activations of x and of h) and leaves the gates (sigmoid, tanh, the cell update) in float:

    gates = ih(x) + hh(h);  i, f, g, o = split(gates)   (torch's order)
    c' = sigmoid(f) c + sigmoid(i) tanh(g);  h' = sigmoid(o) tanh(c')

Policy files only (never unpickled): the caller (`frontends/sb3.py`) reads spaces and kwargs statically.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from bitrl_compile.frontends import sb3_cnn
from bitrl_compile.frontends.mlp import _build_mlp, _check_layer, _linears
from bitrl_compile.frontends.specs import _check_finite
from bitrl_compile.loaded import ModelLoadError

POLICY_CLASSES = ("RecurrentActorCriticPolicy", "RecurrentMultiInputActorCriticPolicy")


class LSTMLayer(nn.Module):
    """One LSTM layer as two Linear layers (the module docstring); torch.nn.LSTM's weights copied in."""

    def __init__(self, n_in: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(n_in, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates, n = self.ih(x) + self.hh(h), self.hidden
        # slices, not chunk(): a split lowers to one kernel with four outputs, which a plan cannot call
        i, f, g, o = gates[:, :n], gates[:, n:2 * n], gates[:, 2 * n:3 * n], gates[:, 3 * n:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class RecurrentPolicy(nn.Module):
    """obs, state, episode_start -> (the actor's raw output, the next state): the module docstring. `features`
    (optional) turns the observation into the LSTM's input: a CnnLstmPolicy's NatureCNN and its linear (images
    transposed to channels-first first when `channels_last`), else the observation flattened."""

    def __init__(self, obs_dim: int, hidden: int, layers: int, head: nn.Module, features: nn.Module | None = None,
                 channels_last: bool = False):
        super().__init__()
        self.obs_dim, self.hidden, self.layers = obs_dim, hidden, layers
        self.lstm = nn.ModuleList(LSTMLayer(obs_dim if i == 0 else hidden, hidden) for i in range(layers))
        self.head = head
        self.features, self.channels_last = features, channels_last

    @property
    def state_size(self) -> int:
        return 2 * self.layers * self.hidden

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.state_size)

    def forward(self, obs: torch.Tensor, state: torch.Tensor, episode_start: torch.Tensor):
        keep = (1.0 - episode_start).reshape(-1, 1)
        n, hidden = self.layers, self.hidden
        if self.features is None:
            x = obs.flatten(1)
        else:
            x = self.features(obs.permute(0, 3, 1, 2) if self.channels_last else obs)
        hs, cs = [], []
        for i, layer in enumerate(self.lstm):
            h = state[:, i * hidden:(i + 1) * hidden] * keep
            c = state[:, (n + i) * hidden:(n + i + 1) * hidden] * keep
            x, c = layer(x, h, c)
            hs.append(x)
            cs.append(c)
        return self.head(x), torch.cat(hs + cs, dim=1)


def _lstm_weights(sd: dict, path: Path) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(W_ih, W_hh, b_ih + b_hh) per layer of `lstm_actor`; refuses what the module cannot express."""
    keys = [k for k in sd if k.startswith("lstm_actor.")]
    odd = [k for k in keys if not re.fullmatch(r"lstm_actor\.(weight|bias)_(ih|hh)_l\d+", k)]
    if odd:
        raise ModelLoadError(f"{path}: lstm_actor has {odd[0]!r}: bidirectional or projected LSTMs (proj_size) are "
                             "not supported; train with the default lstm_kwargs")
    n = len({int(k.rsplit("_l", 1)[1]) for k in keys})
    if n == 0:
        raise ModelLoadError(f"{path}: policy.pth has no lstm_actor; not a RecurrentPPO policy")
    layers = []
    for i in range(n):
        w_ih, w_hh = sd.get(f"lstm_actor.weight_ih_l{i}"), sd.get(f"lstm_actor.weight_hh_l{i}")
        if w_ih is None or w_hh is None:
            raise ModelLoadError(f"{path}: lstm_actor layer {i} lacks weight_ih or weight_hh; the file is incomplete")
        _check_layer(path, f"lstm_actor layer {i} (input)", w_ih, None)
        _check_layer(path, f"lstm_actor layer {i} (hidden)", w_hh, None)
        hidden = w_hh.shape[1]
        if tuple(w_hh.shape) != (4 * hidden, hidden) or w_ih.shape[0] != 4 * hidden:
            raise ModelLoadError(f"{path}: lstm_actor layer {i} has weights {tuple(w_ih.shape)} and "
                                 f"{tuple(w_hh.shape)}; an LSTM of {hidden} units has [4x{hidden}, in] and "
                                 f"[4x{hidden}, {hidden}]")
        bias = torch.zeros(4 * hidden)
        for name in (f"lstm_actor.bias_ih_l{i}", f"lstm_actor.bias_hh_l{i}"):
            if name in sd:
                _check_layer(path, name, None, sd[name])
                if tuple(sd[name].shape) != (4 * hidden,):
                    raise ModelLoadError(f"{path}: {name} has shape {tuple(sd[name].shape)}, not ({4 * hidden},)")
                bias = bias + sd[name].float()
        _check_finite({f"lstm_actor layer {i}": torch.cat([w_ih.flatten(), w_hh.flatten(), bias])}, path)
        layers.append((w_ih.float(), w_hh.float(), bias))
    return layers


def build_recurrent(path: Path, sd: dict, activation: str, obs_dim: int, features: nn.Module | None = None,
                    channels_last: bool = False) -> RecurrentPolicy:
    """The actor of a RecurrentActorCriticPolicy state_dict as a RecurrentPolicy (float32, eval); `obs_dim` is the
    LSTM's input width (the features extractor's output when there is one)."""
    lstm = _lstm_weights(sd, path)
    hidden = lstm[0][1].shape[1]
    if lstm[0][0].shape[1] != obs_dim:
        raise ModelLoadError(f"{path}: lstm_actor takes {lstm[0][0].shape[1]} inputs but the "
                             f"{'features extractor gives' if features is not None else 'observation has'} "
                             f"{obs_dim} values; a features extractor other than Flatten or NatureCNN is not "
                             "supported yet")
    for i, (w_ih, _, _) in enumerate(lstm[1:], 1):
        if w_ih.shape[1] != hidden:
            raise ModelLoadError(f"{path}: lstm_actor layer {i} takes {w_ih.shape[1]} inputs, not {hidden}")
    head_layers = _linears(sd, "mlp_extractor.policy_net.", path) + [
        ("action_net", sd.get("action_net.weight"), sd.get("action_net.bias"))]
    if head_layers[-1][1] is None:
        raise ModelLoadError(f"{path}: policy.pth has no action_net; not an actor-critic state_dict")
    head = _build_mlp(path, head_layers, activation, [hidden])  # activation after every policy_net layer
    policy = RecurrentPolicy(obs_dim, hidden, len(lstm), head, features, channels_last)
    with torch.no_grad():
        for layer, (w_ih, w_hh, bias) in zip(policy.lstm, lstm):
            layer.ih.weight.copy_(w_ih)
            layer.ih.bias.copy_(bias)
            layer.hh.weight.copy_(w_hh)
    return policy.eval()


def load_recurrent(path: Path, data: dict, sd: dict, activation: str, input_spec: dict, output: dict,
                   cfg: dict | None = None):
    """The LoadedPolicy of a RecurrentPPO zip (spaces and specs already read by frontends/sb3.py): the actor as a
    RecurrentPolicy and input["recurrent"] (runtime/specs.py) saying what its state is."""
    import math

    from bitrl_compile.loaded import LoadedPolicy

    if data.get("use_sde"):
        raise ModelLoadError(f"{path}: RecurrentPPO with gSDE is not supported yet; train with use_sde=False")
    if input_spec.get("kind") == "dict" or input_spec.get("preprocess") == "text":
        raise ModelLoadError(f"{path}: recurrent policies on {input_spec.get('kind') or input_spec['preprocess']} "
                             "observations are not supported yet (MlpLstmPolicy on vectors and CnnLstmPolicy on "
                             "images are)")
    features, channels_last = None, False
    cnn_prefix = sb3_cnn.extractor_prefix(sd)
    if cnn_prefix is not None:  # CnnLstmPolicy: NatureCNN and its linear, then the LSTM
        if len(input_spec["shape"]) != 3:
            raise ModelLoadError(f"{path}: a CnnLstmPolicy on observations of shape {input_spec['shape']}; "
                                 "NatureCNN takes images (C, H, W)")
        layout = sb3_cnn.image_layout(cfg or {}, path)
        cnn, linear = sb3_cnn.checked_cnn(sd, cnn_prefix, input_spec["shape"], "NatureCNN's", path)
        features, channels_last = nn.Sequential(cnn, linear), layout == "hwc"
        obs_dim = linear[0].out_features
        if channels_last:
            c, h, w = input_spec["shape"]
            input_spec = dict(input_spec, shape=[h, w, c])
    elif input_spec.get("preprocess") == "image":
        obs_dim = math.prod(input_spec["shape"])  # MlpLstmPolicy on a flattened image (SB3 scales it too)
    else:
        obs_dim = math.prod(input_spec["shape"]) if input_spec.get("preprocess") != "onehot" else int(input_spec["n"])
    policy = build_recurrent(path, sd, activation, obs_dim, features, channels_last)
    if output["kind"] == "continuous" and "log_std" in sd and sd["log_std"].numel() == math.prod(output["shape"]):
        _check_finite({"log_std": sd["log_std"]}, path)
        output["log_std"] = sd["log_std"].ravel().tolist()
    input_spec = dict(input_spec, recurrent={"layers": policy.layers, "hidden": policy.hidden,
                                             "state_size": policy.state_size})
    head = [m.out_features for m in policy.head.net if isinstance(m, nn.Linear)]
    desc = (f"sb3-contrib RecurrentPPO: {'NatureCNN, ' if features is not None else ''}LSTM "
            f"{policy.layers}x{policy.hidden} then MLP {head} {activation}, "
            f"{'discrete' if output['kind'] == 'discrete' else 'continuous'} actions")
    return LoadedPolicy(policy, None, input_spec, output, "sb3-recurrent-ppo", desc)
