"""CleanRL's Atari agents (ppo_atari.py, dqn_atari.py): their state_dicts load as NatureCNN policies on (4, 84, 84)
uint8 frames and compile bit-exact; ppo_atari_lstm.py and shapes that do not fit are one line.

The agent classes below are CleanRL's own layer for layer (the user's code: CleanRL is a set of scripts, not a
package), with its orthogonal initialisation; the frames are real uint8 arrays as its AtariPreprocessing +
FrameStack(4) wrappers give them (no ALE here: what the frontend must get right is the layout and the /255).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bitrl_compile import pipeline, reference
from bitrl_compile.frontends import load_policy
from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.runtime import load


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class PPOAtariAgent(nn.Module):  # cleanrl/ppo_atari.py
    def __init__(self, n: int, frames: int = 84):
        super().__init__()
        flat = 64 * 7 * 7 if frames == 84 else 64
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(4, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(flat, 512)), nn.ReLU())
        self.actor = layer_init(nn.Linear(512, n), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1)

    def logits(self, x):
        return self.actor(self.network(x / 255.0))


class QNetwork(nn.Module):  # cleanrl/dqn_atari.py
    def __init__(self, n: int):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n))

    def forward(self, x):
        return self.network(x / 255.0)


def frames(n: int, size: int = 84, seed: int = 0) -> np.ndarray:
    """n stacks of 4 grey uint8 frames, channels-first: a moving bright block on a textured background."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 90, (n, 4, size, size), dtype=np.uint8)
    for i in range(n):
        for t in range(4):
            r, c = (7 * i + 3 * t) % (size - 12), (11 * i + 5 * t) % (size - 12)
            out[i, t, r:r + 12, c:c + 12] = 236
    return out


def save(agent: nn.Module, path):
    torch.save(agent.state_dict(), path)
    return path


def test_ppo_atari_agent_compiles_bit_exact_on_its_frames(tmp_path):
    torch.manual_seed(0)
    agent = PPOAtariAgent(6)
    loaded = load_policy(save(agent, tmp_path / "ppo_atari.pt"), config={"output": {"kind": "discrete", "n": 6}})
    assert loaded.source == "cleanrl-ppo-atari" and "NatureCNN on 4x84x84" in loaded.description
    assert loaded.input["shape"] == [4, 84, 84] and loaded.input["preprocess"] == "image"
    x = frames(16)
    with torch.no_grad():  # the loaded float policy is the agent's actor on x / 255 (the runtime applies the /255)
        want = agent.logits(torch.from_numpy(x).float())
        mine = loaded.module(torch.from_numpy(x).float() / 255)
    np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "ppo_atari.bitrl")
    calls = [c["func"] for c in compiled.manifest["entry_points"]["forward"]["calls"]]
    assert calls[0].endswith("div255")  # the /255 is the first conv's quantization step, no transpose (CHW frames)
    with load(compiled.path) as policy:
        np.testing.assert_array_equal(policy.forward(x), reference.run(compiled.quantized, x.astype(np.float32) / 255))
        assert policy.act(x).shape == (16,)


def test_dqn_atari_q_network_loads_as_its_q_values(tmp_path):
    torch.manual_seed(1)
    q = QNetwork(4)
    loaded = load_policy(save(q, tmp_path / "dqn_atari.pt"))  # the action count from network.9
    assert loaded.source == "cleanrl-dqn-atari" and loaded.output == {"kind": "discrete", "n": 4,
                                                                       "outputs": "q_values"}
    x = torch.from_numpy(frames(8, seed=3)).float()
    with torch.no_grad():
        np.testing.assert_allclose(loaded.module(x / 255).numpy(), q(x).numpy(), rtol=1e-5, atol=1e-6)


def test_other_frame_sizes_come_from_the_linear_layer_or_the_config(tmp_path):
    torch.manual_seed(2)
    loaded = load_policy(save(PPOAtariAgent(3, frames=36), tmp_path / "small.pt"))
    assert loaded.input["shape"] == [4, 36, 36]
    with pytest.raises(ModelLoadError, match=r"obs_shape.*\[4, 50, 50\].*3136") as e:
        load_policy(save(PPOAtariAgent(3), tmp_path / "a.pt"), config={"obs_shape": [4, 50, 50]})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["lstm", "env-layout", "no-head"])
def test_what_does_not_fit_is_one_line(tmp_path, case):
    torch.manual_seed(0)
    sd = PPOAtariAgent(2, frames=36).state_dict()
    config = {}
    if case == "lstm":  # cleanrl/ppo_atari_lstm.py: the LSTM after the CNN
        lstm = nn.LSTM(512, 128)
        sd.update({f"lstm.{k}": v for k, v in lstm.state_dict().items()})
        words = "ppo_atari_lstm.py.*not supported yet"
    elif case == "env-layout":  # an env whose frames are not the agent's (channels-last, 3 frames)
        import bitrl_compile.envs  # noqa: F401 - registers the pixel task

        config = {"env": "bitrl_compile.envs:BitrlPixelCartPole-v0"}
        words = r"\[36, 36, 3\] but the agent takes \[4, 36, 36\]"
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(("actor.", "critic."))}
        sd["critic.weight"], sd["actor.weight"] = torch.zeros(1, 512), torch.zeros(2, 5)  # a head of the wrong width
        words = "actor takes 5 features but network.7 gives 512"
    torch.save(sd, tmp_path / "agent.pt")
    with pytest.raises(ModelLoadError, match=words) as e:
        load_policy(tmp_path / "agent.pt", config=config)
    assert "\n" not in str(e.value)
