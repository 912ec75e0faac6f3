"""Stable-Baselines3 `CnnPolicy` (NatureCNN) for PPO, A2C and DQN: the features extractor rebuilt from policy.pth.

SB3's NatureCNN is `cnn` = Conv2d(C, 32, 8, stride 4), ReLU, Conv2d(32, 64, 4, 2), ReLU, Conv2d(64, 64, 3, 1), ReLU,
Flatten and `linear` = Linear(n_flatten, features_dim), ReLU; the state_dict holds its weights under
`features_extractor.` (PPO/A2C; `pi_features_extractor.` is the same module) or `q_net.features_extractor.` (DQN).
Strides are not in a state_dict: the kernel sizes 8, 4, 3 identify NatureCNN and give them; other CNNs (custom
extractors) are refused by name.

Images: SB3 wraps an environment whose images are channels-last (H, W, C: gymnasium's image envs, Atari, MiniGrid)
in VecTransposeImage and saves the transposed space (C, H, W). The artifact takes what the environment gives: its
input is (H, W, C) and the module transposes to (C, H, W) first; `config={"image_layout": "chw"}` keeps (C, H, W)
for an environment that is channels-first already. /255 is the input spec's preprocess "image" (SB3's
normalize_images), compiled into the artifact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bitrl_compile.frontends.specs import _check_finite
from bitrl_compile.loaded import ModelLoadError

NATURE_KERNELS = ((8, 4), (4, 2), (3, 1))  # NatureCNN's (kernel size, stride) per conv layer: cnn.0, cnn.2, cnn.4
PREFIXES = ("pi_features_extractor.", "features_extractor.", "q_net.features_extractor.")


class SB3CnnPolicy(nn.Module):
    """[B, H, W, C] (or [B, C, H, W]) images -> the head's output: transpose, NatureCNN, its linear, the head."""

    def __init__(self, cnn: nn.Sequential, linear: nn.Sequential, head: nn.Module, channels_last: bool):
        super().__init__()
        self.cnn, self.linear, self.head, self.channels_last = cnn, linear, head, channels_last

    def forward(self, x):
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.head(self.linear(self.cnn(x)))


def extractor_prefix(sd: dict) -> str | None:
    """The state_dict prefix of the policy's CNN features extractor, or None for an MLP policy."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "cnn.") for k in sd):
            return prefix
    return None


def _tensor(sd: dict, key: str, ndim: int, path: Path) -> torch.Tensor:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or not t.is_floating_point():
        raise ModelLoadError(f"{path}: policy.pth lacks {key} (a {ndim}-D float tensor): not SB3's NatureCNN; "
                             "save the model again with stable-baselines3")
    _check_finite({key: t}, path)
    return t


def nature_cnn(sd: dict, prefix: str, path: Path) -> tuple[nn.Sequential, nn.Sequential, int]:
    """(cnn, linear, features_dim) with the weights of the NatureCNN under `prefix`."""
    convs = sorted({k[len(prefix) + 4:].split(".")[0] for k in sd if k.startswith(prefix + "cnn.")}, key=int)
    if convs != ["0", "2", "4"]:
        raise ModelLoadError(f"{path}: the features extractor has layers cnn.{', cnn.'.join(convs)}, not NatureCNN's "
                             "cnn.0, cnn.2, cnn.4: custom CNN extractors are not supported (their strides are not in "
                             "the file); use SB3's CnnPolicy default")
    return nature_layers(sd, [f"{prefix}cnn.{i}" for i in convs], f"{prefix}linear.0", path,
                         "a custom CNN extractor is not supported")


def nature_layers(sd: dict, convs: list[str], linear_key: str, path: Path,
                  other: str) -> tuple[nn.Sequential, nn.Sequential, int]:
    """(cnn, linear, features_dim): NatureCNN's three convolutions (ReLU after each, then Flatten) from the weights
    named `convs`, and its Linear + ReLU from `linear_key`; `other` ends the error for a layer of another shape."""
    layers: list[nn.Module] = []
    for name, (kernel, stride) in zip(convs, NATURE_KERNELS):
        w = _tensor(sd, f"{name}.weight", 4, path)
        b = _tensor(sd, f"{name}.bias", 1, path)
        if tuple(w.shape[2:]) != (kernel, kernel) or (layers and w.shape[1] != layers[-2].out_channels):
            raise ModelLoadError(f"{path}: {name}.weight has shape {tuple(w.shape)}, not NatureCNN's "
                                 f"{kernel}x{kernel} kernel on the previous layer's channels; {other}")
        conv = nn.Conv2d(w.shape[1], w.shape[0], kernel, stride)
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(b)
        layers += [conv, nn.ReLU()]
    w = _tensor(sd, f"{linear_key}.weight", 2, path)
    b = _tensor(sd, f"{linear_key}.bias", 1, path)
    linear = nn.Linear(w.shape[1], w.shape[0])
    linear.weight.data.copy_(w)
    linear.bias.data.copy_(b)
    return nn.Sequential(*layers, nn.Flatten()), nn.Sequential(linear, nn.ReLU()), int(w.shape[0])


def cnn_policy(sd: dict, prefix: str, input_spec: dict, head: nn.Module, cfg: dict, path: Path) -> nn.Module:
    """The whole policy on the environment's images; `input_spec` (the saved, channels-first space's) is changed to
    the (H, W, C) the environment gives unless `cfg["image_layout"]` is "chw"."""
    if len(input_spec["shape"]) != 3:
        raise ModelLoadError(f"{path}: a CnnPolicy on observations of shape {input_spec['shape']}; NatureCNN takes "
                             "images (C, H, W)")
    layout = image_layout(cfg, path)
    cnn, linear = checked_cnn(sd, prefix, input_spec["shape"], "NatureCNN's", path)
    if layout == "hwc":
        c, h, w = input_spec["shape"]
        input_spec["shape"] = [h, w, c]
    return SB3CnnPolicy(cnn, linear, head, layout == "hwc").eval()


def image_layout(cfg: dict, path: Path) -> str:
    """config "image_layout": "hwc" (the default: the environment's images are channels-last) or "chw"."""
    layout = str(cfg.get("image_layout", "hwc")).lower()
    if layout not in ("hwc", "chw"):
        raise ModelLoadError(f"{path}: config \"image_layout\" is {layout!r}; give \"hwc\" (the environment's images "
                             "are channels-last, SB3 transposed them) or \"chw\"")
    return layout


def checked_cnn(sd: dict, prefix: str, chw: list[int], what: str, path: Path) -> tuple[nn.Sequential, nn.Sequential]:
    """The NatureCNN under `prefix` and its linear, checked to fit images of the saved shape (C, H, W)."""
    cnn, linear, _ = nature_cnn(sd, prefix, path)
    c, h, w = chw
    with torch.no_grad():
        n_flatten = cnn(torch.zeros(1, c, h, w)).shape[1]
    if linear[0].in_features != n_flatten:
        raise ModelLoadError(f"{path}: {what} linear layer takes {linear[0].in_features} features but the "
                             f"convolutions give {n_flatten} on {c}x{h}x{w} images; the file does not match its space")
    return cnn, linear


def key_prefix(sd: dict, name: str, path: Path) -> str:
    """The state_dict prefix of a Dict image key's NatureCNN in SB3's CombinedExtractor."""
    for p in PREFIXES:
        if f"{p}extractors.{name}.linear.0.weight" in sd:
            return f"{p}extractors.{name}."
    raise ModelLoadError(f"{path}: observation key {name!r} is an image but policy.pth has no NatureCNN for it; save "
                         "the model again with stable-baselines3")


class SB3CombinedPolicy(nn.Module):
    """A MultiInputPolicy's flat row [B, total] -> the head's output: SB3's CombinedExtractor. Each key is its slice of
    the row (runtime/specs.py's layout); an image key is reshaped to its (H, W, C) (or (C, H, W)), transposed,
    divided by 255 (SB3's normalize_images) and run through its NatureCNN and linear; a Discrete key's one value,
    its index, becomes its one-hot of n floats (SB3's preprocess_obs), here so that the compiled artifact does it;
    the others are taken as they are; the features are concatenated in key order, then the head."""

    def __init__(self, parts: list, cnns: list, head: nn.Module):
        super().__init__()
        # per key: (offset, size, None | (index into cnns, shape, channels_last, scale), one-hot n or 0)
        self.parts = parts
        for offset, _, _, n in parts:  # 0..n-1 per Discrete key: a buffer, which becomes a parameter of the artifact
            if n:  # (a torch.arange in forward would be folded into a constant that its kernel plan cannot pass)
                self.register_buffer(f"arange{offset}", torch.arange(n, dtype=torch.float32))
        self.cnns = nn.ModuleList(cnns)
        self.head = head

    def forward(self, x):
        features = []
        for offset, size, image, n in self.parts:
            part = x[:, offset:offset + size]
            if n:  # [B, 1] index -> [B, n] one-hot (an index outside [0, n) would give zeros: the readers refuse it)
                part = (part == getattr(self, f"arange{offset}")).to(part.dtype)
            elif image is not None:
                index, shape, channels_last, scale = image
                part = part.reshape(-1, *shape)
                if channels_last:
                    part = part.permute(0, 3, 1, 2)
                if scale:
                    part = part / 255.0
                part = self.cnns[index](part)
            features.append(part)
        return self.head(torch.cat(features, dim=1))


def combined_policy(sd: dict, input_spec: dict, head: nn.Module, cfg: dict, normalize_images: bool,
                    path: Path) -> nn.Module:
    """The MultiInputPolicy on the flat row of `input_spec` (its keys; an image key's shape, saved channels-first,
    becomes the environment's (H, W, C) unless cfg["image_layout"] is "chw"), with a NatureCNN per image key and a
    one-hot per Discrete key."""
    layout = image_layout(cfg, path)
    parts, cnns, offset = [], [], 0
    for key in input_spec["keys"]:
        size = int(torch.tensor(key["shape"]).prod())
        image = None
        if key.get("preprocess") == "image":
            cnn, linear = checked_cnn(sd, key_prefix(sd, key["name"], path), key["shape"],
                                      f"key {key['name']!r}'s NatureCNN", path)
            if layout == "hwc":
                c, h, w = key["shape"]
                key["shape"] = [h, w, c]
            image = (len(cnns), tuple(key["shape"]), layout == "hwc", normalize_images)
            cnns.append(nn.Sequential(cnn, linear))
        parts.append((offset, size, image, int(key["n"]) if key.get("preprocess") == "onehot" else 0))
        offset += size
    return SB3CombinedPolicy(parts, cnns, head).eval()


def combined_features(sd: dict, input_spec: dict, path: Path) -> int:
    """The width of the CombinedExtractor's output: each image key's NatureCNN features, each Discrete key's n
    one-hot values, each other key's values."""
    width = 0
    for key in input_spec["keys"]:
        if key.get("preprocess") == "onehot":
            width += int(key["n"])
        elif key.get("preprocess") == "image":
            width += int(_tensor(sd, key_prefix(sd, key["name"], path) + "linear.0.weight", 2, path).shape[0])
        else:
            width += int(torch.tensor(key["shape"]).prod())
    return width
