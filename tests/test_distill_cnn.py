"""Recovery of convolutional policies (issue 17): the BitConv2d straight-through function against the numpy
reference, and an SB3 DQN CnnPolicy trained here on a pixel task, recovered by `bitrl-compile MODEL --env ID --keep`
and by `bitrl-compile finetune MODEL --method distill` (a .pt2 student), each artifact measured against SB3's
deterministic predict on the frames SB3's policy visits.

The task: CartPole-v1 seen as 36x36x3 uint8 frames (the cart and pole drawn from the state, the last three frames
in the channels), NatureCNN's smallest input. A DQN trained for 600 steps acts on the frames (both actions, by
position) with Q-values whose gaps the plain ternary compile loses (about 30 % agreement)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bitrl_compile import fidelity, quant
from bitrl_compile.cli import main as cli
from bitrl_compile.frontends import load_policy
from bitrl_compile.runtime import load
from bitrl_compile.trainers import distill
from bitrl_compile.trainers.export import reference_forward

torch.set_num_threads(1)
ENV = "BitrlPixelCartPole-v0"
SIZE = 36


class PixelCartPole(gym.ObservationWrapper):
    """CartPole-v1 as 36x36x3 uint8 frames: cart and pole drawn from the state; channel k is the frame k steps ago
    (the velocities are in their differences)."""

    def __init__(self):
        super().__init__(gym.make("CartPole-v1"))
        self.observation_space = gym.spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
        self.frames = np.zeros((SIZE, SIZE, 3), np.uint8)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.frames = np.repeat(self._draw(obs)[..., None], 3, axis=-1)
        return self.frames.copy(), info

    def observation(self, obs):
        self.frames = np.concatenate([self._draw(obs)[..., None], self.frames[..., :2]], axis=-1)
        return self.frames.copy()

    @staticmethod
    def _draw(state) -> np.ndarray:
        x, _, theta, _ = (float(v) for v in state)
        frame = np.zeros((SIZE, SIZE), np.uint8)
        cx = min(max(round((x + 2.4) / 4.8 * (SIZE - 1)), 0), SIZE - 1)
        frame[28:31, max(cx - 3, 0):cx + 4] = 255
        t = np.linspace(0, 1, 24)
        i, j = np.round(28 - 20 * t * np.cos(theta)).astype(int), np.round(cx + 20 * t * np.sin(theta)).astype(int)
        inside = (i >= 0) & (i < SIZE) & (j >= 0) & (j < SIZE)
        frame[i[inside], j[inside]] = 200
        return frame


if ENV not in gym.registry:
    gym.register(ENV, entry_point=PixelCartPole)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(SB3 DQN CnnPolicy, its .zip): 600 steps, about 10 s of one core."""
    import stable_baselines3 as sb3

    model = sb3.DQN("CnnPolicy", ENV, seed=0, learning_starts=64, buffer_size=2000, batch_size=32, learning_rate=2e-3,
                    train_freq=2, target_update_interval=50, exploration_fraction=0.5,
                    policy_kwargs={"features_extractor_kwargs": {"features_dim": 64}})
    model.learn(600)
    path = tmp_path_factory.mktemp("cnn") / "dqn_pixels.zip"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def visited(teacher):
    """Frames SB3's deterministic policy visits (seeded resets), its actions and its Q-values on them."""
    model, _ = teacher
    env = gym.make(ENV)
    frames, (frame, _) = [], env.reset(seed=123)
    while len(frames) < 400:
        frames.append(frame)
        frame, _, terminated, truncated, _ = env.step(int(model.predict(frame, deterministic=True)[0]))
        if terminated or truncated:
            frame, _ = env.reset(seed=123 + len(frames))
    frames = np.stack(frames)
    with torch.no_grad():
        q = model.q_net(model.policy.obs_to_tensor(frames)[0]).numpy()
    return frames, model.predict(frames, deterministic=True)[0], q


def _agreement(outputs: np.ndarray, visited) -> tuple[float, float]:
    """(the share of SB3's actions taken, that share weighted by SB3's stakes: its best-two Q gap, fidelity.py's
    rule). The teacher is barely trained: a fifth of its gaps are under a tenth of the median."""
    _, actions, q = visited
    weighted = fidelity.compare({"kind": "discrete", "n": 2, "outputs": "q_values"}, outputs, q)["weighted"]
    return float(np.mean(outputs.argmax(1) == actions)), weighted


def _artifact_agreement(artifact, visited) -> tuple[float, float]:
    with load(artifact) as policy:
        return _agreement(policy.forward(visited[0]), visited)


@pytest.fixture(scope="module")
def ptq_agreement(teacher, visited):
    """The plain ternary compile's agreement with SB3's predict (its numpy reference, which every compile checks the
    artifact against)."""
    return _agreement(reference_forward(load_policy(teacher[1]))(visited[0]), visited)


# ------------------------------------------------------------------------------------------------ the STE

@pytest.mark.parametrize("per_channel, int8", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("geometry", [(3, 32, 8, 4, 0, 36), (32, 64, 4, 2, 0, 8), (64, 64, 3, 1, 0, 3),
                                      (16, 8, 3, 1, 1, 5)])
def test_bitconv2d_ste_is_the_reference_in_the_forward_pass(geometry, per_channel, int8):
    c, o, k, stride, pad, hw = geometry
    rng = np.random.default_rng(c + o + k)
    x = np.maximum(rng.standard_normal((5, c, hw, hw)), 0).astype(np.float32) * np.float32([[[[0.01]]], [[[1]]],
                                                                                           [[[7]]], [[[300]]],
                                                                                           [[[0]]]])
    w = (rng.standard_normal((o, c, k, k)) * 0.1).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    flat = w.reshape(o, -1)
    q, gamma = quant.quantize_weight_int8(flat) if int8 else quant.ternarize_weight(flat, per_channel)
    want = quant.bitconv2d_reference(x, q.reshape(w.shape), gamma, b, (stride, stride), (pad,) * 4)
    got = quant.bitconv2d_ste(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), (stride, stride),
                              (pad, pad), per_channel, int8)
    np.testing.assert_array_equal(got.numpy(), want)  # bit for bit (the epilogue could round twice: never here)


def test_bitconv2d_ste_gradients_are_straight_through():
    """d/dx is the convolution's with the fake-quantized weights, d/dW with the fake-quantized activations: what
    bitlinear_ste gives a Linear."""
    rng = np.random.default_rng(0)
    x = torch.tensor(np.abs(rng.standard_normal((3, 4, 9, 9))).astype(np.float32), requires_grad=True)
    w = torch.tensor((rng.standard_normal((6, 4, 3, 3)) * 0.2).astype(np.float32), requires_grad=True)
    g = torch.from_numpy(rng.standard_normal((3, 6, 4, 4)).astype(np.float32))
    (quant.bitconv2d_ste(x, w, None, (2, 2), (0, 0)) * g).sum().backward()
    xq = x.detach().clone().requires_grad_(True)
    wq = w.detach().clone().requires_grad_(True)
    s = 127 / x.detach().reshape(3, -1).abs().amax(1).reshape(3, 1, 1, 1)
    x_fake = xq + ((xq * s).round() / s - xq).detach()
    w_fake = quant.ternarize_weight_ste(wq.reshape(6, -1)).reshape(w.shape)
    (torch.nn.functional.conv2d(x_fake, w_fake, None, 2) * g).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), xq.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), wq.grad.numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ recovery

def test_keep_recovers_a_cnn_policy_by_distillation(teacher, visited, ptq_agreement, tmp_path):
    out = tmp_path / "kept.bitrl"
    result = CliRunner().invoke(cli, ["compile", str(teacher[1]), "--env", ENV, "--keep", "0.98",
                                      "--keep-budget", "24", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "keep 98 %: ptq" in result.output and "keep 98 %: distill" in result.output, result.output
    with load(out) as policy:
        assert policy.manifest["recovery"] == "distill" and policy.manifest["fidelity"]["weighted"] >= 0.98
    agreement = _artifact_agreement(out, visited)
    print(f"SB3 predict agreement on {len(visited[0])} visited frames (weighted): PTQ "
          f"{100 * ptq_agreement[0]:.1f} % ({100 * ptq_agreement[1]:.1f} %), --keep 0.98 {100 * agreement[0]:.1f} % "
          f"({100 * agreement[1]:.1f} %)")
    assert agreement[0] > ptq_agreement[0] + 0.5 and agreement[0] >= 0.9  # one round of distillation: 94-96 %
    assert agreement[1] >= 0.98


def test_finetune_distill_writes_a_program_that_compiles_to_what_was_trained(teacher, visited, ptq_agreement,
                                                                              tmp_path):
    """The file path of a CNN student (the --keep test trains one; here the run stops at its target, reached by the
    scale/bias calibration alone, which keeps the test short): finetune writes a .pt2 that compiles, with only
    --env, to an artifact computing the trained network's reference bit for bit."""
    student = tmp_path / "dqn-ternary.pt2"
    result = CliRunner().invoke(cli, ["finetune", str(teacher[1]), "--env", ENV, "--method", "distill",
                                      "--agreement", "0.5", "--episodes", "1", "-o", str(student),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "(0 rounds" in result.output, result.output
    out = tmp_path / "student.bitrl"
    result = CliRunner().invoke(cli, ["compile", str(student), "--env", ENV, "-o", str(out)])
    assert result.exit_code == 0, result.output
    frames = visited[0]
    with load(out) as policy:
        got = policy.forward(frames)
        # the program carries its specs and how it was made (extra/bitrl_config.json): a Q-network, distilled
        assert policy.manifest["output"]["outputs"] == "q_values" and policy.manifest["recovery"] == "distill"
        assert "sample" not in policy.manifest["entry_points"]  # Q-values are not sampled as logits
    trained = load_policy(teacher[1])  # the student's weights in the teacher's module: the network as trained
    weights = load_policy(student, config={"env": ENV}).module.state_dict()
    trained.module.load_state_dict({k.removeprefix("policy."): v for k, v in weights.items()})
    np.testing.assert_array_equal(got, reference_forward(trained)(frames))  # the artifact computes it, bit for bit
    agreement = _agreement(got, visited)
    print(f"SB3 predict agreement on {len(frames)} visited frames (weighted): PTQ {100 * ptq_agreement[0]:.1f} % "
          f"({100 * ptq_agreement[1]:.1f} %), finetune --method distill, calibrated {100 * agreement[0]:.1f} % "
          f"({100 * agreement[1]:.1f} %)")
    assert agreement[0] > ptq_agreement[0] + 0.2  # calibrated: 66 % against PTQ's 31 %


def test_the_reference_of_a_cnn_numbers_its_layers_as_the_compiler(teacher, visited, tmp_path):
    """export.reference_forward of a CNN (the held-out measure of distillation) is the artifact, bit for bit, with
    the first convolution int8 and per-channel scales (--int8-layers 0 --per-channel, what distillation trains for),
    and distillation's forward pass (bitconv2d_ste, bitlinear_ste) is that reference up to float rounding."""
    from bitrl_compile import pipeline

    loaded = load_policy(teacher[1])
    out = tmp_path / "int8.bitrl"
    pipeline.compile_policy(loaded, "host", out, per_channel=True, int8_layers=[0])
    frames = visited[0][:64]
    want = reference_forward(loaded, per_channel=True, int8_layers=(0,))(frames)
    with load(out) as policy:
        np.testing.assert_array_equal(policy.forward(frames), want)
    with torch.no_grad():
        mine = distill.ste_forward(loaded.module, torch.from_numpy(frames.astype(np.float32) / 255), True, (0,))
    np.testing.assert_allclose(mine.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_cnn_student_needs_a_program_path(teacher, tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        distill.distill(load_policy(teacher[1]), ENV, tmp_path / "student.safetensors",
                        distill.DistillArgs(budget_s=1))
