"""Recovery of convolutional policies (issue 17): the BitConv2d straight-through function against the numpy
reference, and an SB3 PPO CnnPolicy trained here on a pixel task, recovered by `recovery.keep` (what
`bitrl-compile MODEL --env ID --keep 0.99 --keep-rule plain` runs) and by `bitrl-compile finetune MODEL --method
distill` (a .pt2 student), each artifact measured against SB3's deterministic predict on the frames SB3's policy
visits.

The task: bitrl_compile.envs' BitrlPixelCartPole-v0, CartPole-v1 seen as 36x36x3 uint8 frames (NatureCNN's smallest
input). A PPO trained for 4096 steps acts on the frames with logits whose plain ternary compile loses about 40 % of
SB3's actions; its median best-two logit gap is about a third of a logit, and no visited frame is a near-tie under a
tenth of it (a 600-step DQN's were: a fifth of its gaps were under a tenth of the median)."""

import math

import numpy as np
import pytest
import torch

from bitrl_compile import fidelity, quant
from bitrl_compile.envs import PIXEL_CARTPOLE as ENV
from bitrl_compile.frontends import load_policy
from bitrl_compile.runtime import load
from bitrl_compile.trainers import distill
from bitrl_compile.trainers.export import reference_forward

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(SB3 PPO CnnPolicy, its .zip): 4 envs, 4096 steps."""
    import stable_baselines3 as sb3
    from stable_baselines3.common.env_util import make_vec_env

    model = sb3.PPO("CnnPolicy", make_vec_env(ENV, 4, seed=0), seed=0, n_steps=64, batch_size=64, n_epochs=4,
                    learning_rate=1e-3, policy_kwargs={"features_extractor_kwargs": {"features_dim": 64},
                                                       "net_arch": [64]})
    model.learn(4096)
    path = tmp_path_factory.mktemp("cnn") / "ppo_pixels.zip"
    model.save(path)
    return model, path


def sb3_logits(model, frames: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.policy.get_distribution(model.policy.obs_to_tensor(frames)[0]).distribution.logits.numpy()


@pytest.fixture(scope="module")
def visited(teacher):
    """400 frames SB3's deterministic policy visits (reset seeds 123...), its actions (predict) and logits on them."""
    model, _ = teacher
    frames, _ = fidelity.visited(lambda x: sb3_logits(model, x), {"kind": "discrete", "n": 2}, ENV, rollouts=100,
                                 max_states=400, seed=123)
    actions = model.predict(frames, deterministic=True)[0]
    logits = sb3_logits(model, frames)
    assert np.array_equal(logits.argmax(1), actions)  # the deterministic predict is the logits' argmax
    return frames, actions, logits


def _agreement(outputs: np.ndarray, visited) -> tuple[float, float]:
    """(the share of SB3's actions taken, that share weighted by SB3's stakes: its best-two probability gap,
    fidelity.py's rule)."""
    _, actions, logits = visited
    weighted = fidelity.compare({"kind": "discrete", "n": 2}, outputs, logits)["weighted"]
    return float(np.mean(outputs.argmax(1) == actions)), weighted


def _artifact_agreement(artifact, visited) -> tuple[float, float]:
    with load(artifact) as policy:
        return _agreement(policy.forward(visited[0]), visited)


@pytest.fixture(scope="module")
def ptq_agreement(teacher, visited):
    """The plain ternary compile's agreement with SB3's predict (its numpy reference, which every compile checks the
    artifact against)."""
    return _agreement(reference_forward(load_policy(teacher[1]))(visited[0]), visited)


# ------------------------------------------------------------------------------------------------ the tasks

def test_pixel_cartpole64_stacks_four_antialiased_frames_in_which_the_velocities_show():
    """BitrlPixelCartPole64-v0 (bench/distill.py --cnn's task): 64x64x4 uint8, channel k the frame k steps ago, and
    a step's move (a tenth of a pixel of the cart, a fifth of the pole's tip) changes the frame: the velocities
    are in the channels' differences, which the 36x36 frames of v0 mostly round away."""
    import gymnasium as gym

    from bitrl_compile.envs import PIXEL_CARTPOLE_64, draw_antialiased

    env = gym.make(PIXEL_CARTPOLE_64)
    first, _ = env.reset(seed=0)
    assert first.shape == (64, 64, 4) and first.dtype == np.uint8
    assert all(np.array_equal(first[..., k], first[..., 0]) for k in range(4))  # a still start: 4 equal frames
    frames = [first[..., 0]] * 4  # the newest last
    for _ in range(5):
        obs, *_ = env.step(1)
        frames.append(obs[..., 0])
        np.testing.assert_array_equal(obs, np.stack(frames[:-5:-1], -1))  # channel k: k steps ago
    assert not np.array_equal(frames[-1], frames[-2])
    state = np.zeros(4)
    still = draw_antialiased(state)
    assert still.max() == 255 and (still > 0).mean() < 0.1  # a thin pole on a black background
    for moved in ([0.01, 0, 0, 0], [0, 0, 0.003, 0]):  # about 0.1 pixel: cart, then the pole's tip
        assert np.abs(draw_antialiased(np.array(moved)).astype(int) - still).sum() > 100


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

def test_keep_recovers_a_cnn_policy_to_sb3s_actions(teacher, visited, ptq_agreement, tmp_path):
    """--keep 0.99 --keep-rule plain: the plain compile falls short on the reference (not compiled), distillation
    (six DAgger rounds at most: rounds, not seconds) is compiled and kept, alone or with one int8 layer; the
    artifact takes SB3's deterministic action on 99 % of the frames SB3 visits."""
    from bitrl_compile import pipeline
    from bitrl_compile.trainers import recovery

    out, lines = tmp_path / "kept.bitrl", []

    def compile_fn(policy, int8_layers, measure):
        return pipeline.compile_policy(policy, "host", out, int8_layers=int8_layers, measure=measure)

    _, attempts = recovery.keep(load_policy(teacher[1]), ENV, 0.99, compile_fn, rule="plain", log=lines.append,
                                distill_args=distill.DistillArgs(budget_s=math.inf, max_rounds=6, updates_per_round=150))
    # distillation alone, or with the layer it ranks first int8 (which one a machine's teacher needs differs: the
    # tiny teacher's near-ties depend on the CPU's float paths in SB3's training)
    steps = [a.step for a in attempts]
    assert steps[:2] == ["ptq", "distill"] and steps[2:] in ([], [steps[-1]]), lines
    assert steps[-1].startswith("distill") and attempts[-1].kept, lines
    assert "ptq: agreement" in lines[0] and "(numpy reference; not compiled)" in lines[0], lines
    with load(out) as policy:
        assert policy.manifest["recovery"] == "distill" and policy.manifest["fidelity"]["agreement"] >= 0.99
    agreement = _artifact_agreement(out, visited)
    print(f"SB3 predict agreement on {len(visited[0])} visited frames, plain (weighted): PTQ "
          f"{100 * ptq_agreement[0]:.1f} % ({100 * ptq_agreement[1]:.1f} %), --keep 0.99 --keep-rule plain "
          f"{100 * agreement[0]:.1f} % ({100 * agreement[1]:.1f} %)")
    assert ptq_agreement[0] < 0.9  # the premise: plain ternarization loses SB3's actions
    assert agreement[0] >= 0.99 and agreement[1] >= 0.99


def test_finetune_distill_writes_a_program_that_compiles_to_what_was_trained(teacher, visited, ptq_agreement,
                                                                              tmp_path):
    """The file path of a CNN student (the --keep test trains one; here the run stops at its target, reached by the
    scale/bias calibration alone, which keeps the test short): finetune writes a .pt2 that compiles, with only
    --env, to an artifact computing the trained network's reference (to the ulp: the tanh)."""
    from click.testing import CliRunner

    from bitrl_compile.cli import main as cli

    student = tmp_path / "ppo-ternary.pt2"
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
        # the program carries its specs and how it was made (extra/bitrl_config.json): the policy's logits, distilled
        assert policy.manifest["output"] == load_policy(teacher[1]).output
        assert policy.manifest["recovery"] == "distill"
    trained = load_policy(teacher[1])  # the student's weights in the teacher's module: the network as trained
    weights = load_policy(student, config={"env": ENV}).module.state_dict()
    trained.module.load_state_dict({k.removeprefix("policy."): v for k, v in weights.items()})
    # the artifact computes it: to the ulp (the head's tanh: TVM's and numpy's can differ in the last bit)
    np.testing.assert_allclose(got, reference_forward(trained)(frames), rtol=1e-6, atol=1e-6)
    agreement = _agreement(got, visited)
    print(f"SB3 predict agreement on {len(frames)} visited frames, plain (weighted): PTQ {100 * ptq_agreement[0]:.1f} % "
          f"({100 * ptq_agreement[1]:.1f} %), finetune --method distill, calibrated {100 * agreement[0]:.1f} % "
          f"({100 * agreement[1]:.1f} %)")
    assert agreement[0] > ptq_agreement[0] + 0.2  # calibrated: 90-97 % against PTQ's 55-65 %


def test_the_reference_of_a_cnn_numbers_its_layers_as_the_compiler(teacher, visited, tmp_path):
    """export.reference_forward of a CNN (the held-out measure of distillation) is the artifact (to the ulp: the
    head's tanh), with the first convolution int8 and per-channel scales (--int8-layers 0 --per-channel, what
    distillation trains for), and distillation's forward pass (bitconv2d_ste, bitlinear_ste) is that reference up to float rounding."""
    from bitrl_compile import pipeline

    loaded = load_policy(teacher[1])
    out = tmp_path / "int8.bitrl"
    pipeline.compile_policy(loaded, "host", out, per_channel=True, int8_layers=[0])
    frames = visited[0][:64]
    want = reference_forward(loaded, per_channel=True, int8_layers=(0,))(frames)
    with load(out) as policy:
        np.testing.assert_allclose(policy.forward(frames), want, rtol=1e-6, atol=1e-6)  # tanh: to the ulp
    with torch.no_grad():
        mine = distill.ste_forward(loaded.module, torch.from_numpy(frames.astype(np.float32) / 255), True, (0,))
    np.testing.assert_allclose(mine.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_cnn_student_needs_a_program_path(teacher, tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        distill.distill(load_policy(teacher[1]), ENV, tmp_path / "student.safetensors",
                        distill.DistillArgs(budget_s=1))
