"""CleanRL's Atari agents (ppo_atari.py, dqn_atari.py): their state_dicts load as NatureCNN policies on (4, 84, 84)
uint8 frames and compile bit-exact; ppo_atari_lstm.py (NatureCNN then an LSTM on (1, 84, 84) frames) as a recurrent
policy with its state explicit; shapes that do not fit are one line.

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


def layer_init(layer, std=2 ** 0.5, bias_const=0.0):  # CleanRL: std=np.sqrt(2)
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


class LSTMAgent(nn.Module):  # cleanrl/ppo_atari_lstm.py
    def __init__(self, n: int, frames: int = 84):
        super().__init__()
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(1, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7 if frames == 84 else 64, 512)), nn.ReLU())
        self.lstm = nn.LSTM(512, 128)
        for name, param in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            elif "weight" in name:
                nn.init.orthogonal_(param, 1.0)
        self.actor = layer_init(nn.Linear(128, n), std=0.01)
        self.critic = layer_init(nn.Linear(128, 1), std=1)

    def get_states(self, x, lstm_state, done):
        hidden = self.network(x / 255.0)
        batch_size = lstm_state[0].shape[1]
        hidden = hidden.reshape((-1, batch_size, self.lstm.input_size))
        done = done.reshape((-1, batch_size))
        new_hidden = []
        for h, d in zip(hidden, done):
            h, lstm_state = self.lstm(
                h.unsqueeze(0),
                ((1.0 - d).view(1, -1, 1) * lstm_state[0], (1.0 - d).view(1, -1, 1) * lstm_state[1]))
            new_hidden += [h]
        return torch.flatten(torch.cat(new_hidden), 0, 1), lstm_state


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
    assert "div255" in calls[0] and "nhwc" not in calls[0]  # /255 in the first conv's quantization; CHW frames
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


def test_ppo_atari_lstm_agent_steps_as_cleanrl_and_compiles(tmp_path):
    """Along a sequence with an episode start in the middle: the loaded module's logits and state are the agent's
    (CleanRL's get_states, done = the step's episode start), and the artifact steps as its reference."""
    torch.manual_seed(4)
    agent = LSTMAgent(4, frames=36)  # 36x36 frames (NatureCNN's smallest) keep the test's compile short
    loaded = load_policy(save(agent, tmp_path / "lstm.pt"))
    assert loaded.source == "cleanrl-ppo-atari-lstm" and loaded.input["shape"] == [1, 36, 36]
    assert loaded.input["recurrent"] == {"layers": 1, "hidden": 128, "state_size": 256}
    x = frames(8, size=36, seed=5)[:, :1]  # FrameStack(1): one grey frame per step
    starts = np.zeros(8, np.float32)
    starts[[0, 5]] = 1
    cleanrl_state, ours = (torch.zeros(1, 1, 128), torch.zeros(1, 1, 128)), torch.zeros(1, 256)
    with torch.no_grad():
        for obs, start in zip(x, starts):
            o, d = torch.from_numpy(obs[None]).float(), torch.tensor([start])
            hidden, cleanrl_state = agent.get_states(o, cleanrl_state, d)
            out, ours = loaded.module(o / 255, ours, d)
            np.testing.assert_allclose(out.numpy(), agent.actor(hidden).numpy(), atol=1e-5)
            np.testing.assert_allclose(ours.numpy()[0], torch.cat([cleanrl_state[0], cleanrl_state[1]]).ravel(),
                                       atol=1e-5)
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "lstm.bitrl")
    with load(compiled.path) as policy:
        state = policy.initial_state()
        for obs, start in zip(x, starts):
            logits, nxt = policy.forward(obs, state, start)
            out, ref_state = reference.run(compiled.quantized, obs[None].astype(np.float32) / 255, state[None],
                                           np.array([start], np.float32))
            np.testing.assert_allclose(logits, out[0], atol=1e-3)
            np.testing.assert_allclose(nxt, ref_state[0], atol=1e-4)
            state = nxt


@pytest.mark.parametrize("case", ["env-layout", "no-head"])
def test_what_does_not_fit_is_one_line(tmp_path, case):
    torch.manual_seed(0)
    sd = PPOAtariAgent(2, frames=36).state_dict()
    config = {}
    if case == "env-layout":  # an env whose frames are not the agent's (channels-last, 3 frames)
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
