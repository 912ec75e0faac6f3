"""Recurrent policies from torch.export (issue 17): a program forward(obs, state, episode_start) -> (output, next
state) written with torch's own nn.LSTM compiles as a recurrent policy, its LSTM's matmuls ternary (it runs in
Python through the Relax VM: TVM's LSTM unroll has a layers x batch dimension the plans do not take); and
`passes/split_to_slices.py`: a split's parts (torch.chunk, TVM's unrolled LSTM gates) become strided slices, so the
entry points' plans can call every kernel and the numpy reference can check the artifact."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

from bitrl_compile import pipeline, reference
from bitrl_compile.frontends import load_policy
from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.runtime import load


class LSTMPolicy(nn.Module):
    """A user's recurrent policy: torch's nn.LSTM (2 layers of 16), a linear head; the state one row of h then c of
    every layer, reset where episode_start is 1 (the contract frontends/sb3_recurrent.py documents)."""

    def __init__(self, hidden: int = 16, layers: int = 2):
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.lstm = nn.LSTM(4, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, obs, state, episode_start):
        state = state * (1.0 - episode_start).reshape(-1, 1)
        parts = [state[:, i * self.hidden:(i + 1) * self.hidden] for i in range(2 * self.layers)]
        h, c = torch.stack(parts[:self.layers]), torch.stack(parts[self.layers:])  # [layers, B, hidden] each
        out, (h1, c1) = self.lstm(obs.unsqueeze(1), (h, c))
        nxt = torch.cat([h1[i] for i in range(self.layers)] + [c1[i] for i in range(self.layers)], dim=1)
        return self.head(out[:, 0]), nxt


def _export(module, path, dynamic: bool = True):
    examples = (torch.zeros(2, 4), torch.zeros(2, 64), torch.zeros(2))
    batch = Dim("batch", min=1, max=64)
    shapes = ({0: batch}, {0: batch}, {0: batch}) if dynamic else None
    with warnings.catch_warnings():  # torch: nn.LSTM's flat weights "must be registered as buffers"
        warnings.simplefilter("ignore", UserWarning)
        torch.export.save(torch.export.export(module, examples, dynamic_shapes=shapes), path)
    return path


def test_a_torch_export_lstm_program_compiles_as_a_recurrent_policy(tmp_path):
    torch.manual_seed(0)
    module = LSTMPolicy().eval()
    path = _export(module, tmp_path / "lstm.pt2")
    loaded = load_policy(path, config={"env": "CartPole-v1", "recurrent": {"layers": 2}})
    assert loaded.input["recurrent"] == {"layers": 2, "hidden": 16, "state_size": 64}
    lines = []
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "lstm.bitrl", log=lines.append)
    assert not any("not compared" in line for line in lines), lines  # the reference ran (no split left)
    # TVM's unrolled nn.LSTM keeps a (layers x batch) dimension the plans cannot take: the entry points run through
    # the Relax VM (Python; the C API needs plans and refuses the artifact in one line)
    assert any("runs through the Relax VM" in line for line in lines), lines
    assert len(pipeline.bitlinear_layers(compiled.quantized)) == 5  # ih and hh of both layers, the head
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=3)
    with load(compiled.path) as policy:
        state, start = policy.initial_state(), 1.0
        for _ in range(40):
            logits, nxt = policy.forward(obs, state, start)
            out, ref_state = reference.run(compiled.quantized, obs[None].astype(np.float32), state[None],
                                           np.array([start], np.float32))
            np.testing.assert_allclose(logits, out[0], atol=1e-3)
            np.testing.assert_allclose(nxt, ref_state[0], atol=1e-4)
            action, again = policy.act(obs, state, start)
            np.testing.assert_array_equal(again, nxt)
            obs, _, terminated, truncated, _ = env.step(int(action))
            state, start = nxt, float(terminated or truncated)
            if terminated or truncated:
                obs, _ = env.reset()


class Chunked(nn.Module):
    """torch.chunk in a policy: a split of three parts, each used."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 48), nn.Linear(16, 2)

    def forward(self, x):
        a, b, c = torch.chunk(self.fc(x), 3, dim=1)
        return self.out(torch.relu(a) * torch.sigmoid(b) + torch.tanh(c))


def test_a_split_becomes_slices_and_the_artifact_is_checked(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "chunk.pt2"
    torch.export.save(torch.export.export(Chunked().eval(), (torch.zeros(2, 4),),
                                          dynamic_shapes=({0: Dim("batch", min=1, max=32)},)), path)
    lines = []
    compiled = pipeline.compile_policy(load_policy(path, config={"env": "CartPole-v1"}), "host",
                                       tmp_path / "chunk.bitrl", log=lines.append)
    assert not any("not compared" in line for line in lines), lines
    assert "relax.split" not in compiled.quantized.script()
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    with load(compiled.path) as policy:
        np.testing.assert_allclose(policy.forward(x), reference.run(compiled.quantized, x), atol=1e-5)


@pytest.mark.parametrize("case", ["fixed batch", "layers"])
def test_a_recurrent_program_that_does_not_fit_is_one_line(tmp_path, case):
    torch.manual_seed(0)
    path = _export(LSTMPolicy().eval(), tmp_path / "lstm.pt2", dynamic=case != "fixed batch")
    config = {"recurrent": {"layers": 3}} if case == "layers" else {}
    words = "fixed batch of 2" if case == "fixed batch" else r"64 values, not 2 x 3 layers"
    with pytest.raises(ModelLoadError, match=words) as e:
        load_policy(path, config=config)
    assert "\n" not in str(e.value)
