"""Distillation (trainers/distill.py): the fp32 policy teaches its ternary version and the algorithm stays.

Real SB3 policies trained in the session (tiny budgets), real gymnasium envs, real compiles; small distillation
budgets (rounds, not seconds, so that the results do not depend on the machine's speed)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bitrl_compile import fidelity
from bitrl_compile.frontends import load_policy
from bitrl_compile.trainers import distill, selection, standardize
from bitrl_compile.trainers.backbones import normalize
from bitrl_compile.trainers.export import reference_forward


def small(**kw):
    return distill.DistillArgs(**{"budget_s": 600.0, "heldout": 512, "steps_per_round": 64, "updates_per_round": 100,
                                  **kw})


@pytest.fixture(scope="module")
def dqn(sb3_trained):
    """A small DQN whose plain ternary version disagrees with it on a visible fraction of states."""
    return sb3_trained("dqn", "CartPole-v1", steps=3000, learning_starts=200, train_freq=4, gradient_steps=1,
                       target_update_interval=100, learning_rate=1e-3, policy_kwargs={"net_arch": [64, 64]}).path


@pytest.fixture(scope="module")
def distilled_dqn(dqn, tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "dqn-ternary.safetensors"
    result = distill.distill(load_policy(dqn), "CartPole-v1", path, small(max_rounds=6), log=lambda s: None)
    return result, path


def test_dqn_distilled_agrees_more_and_stays_a_q_network(dqn, distilled_dqn):
    result, path = distilled_dqn
    assert result.kind == "q_values"
    assert result.agreement_before < 0.9  # plain ternarization changes visible actions of this DQN
    assert result.agreement_after > result.agreement_before
    student = load_policy(path)
    assert student.output == load_policy(dqn).output and student.output["outputs"] == "q_values"
    assert student.recovery == "distill"


def test_distilled_dqn_compiles_to_the_students_q_values_and_actions(distilled_dqn, tmp_path, cartpole_obs):
    from bitrl_compile import pipeline
    from bitrl_compile.runtime import load

    result, path = distilled_dqn
    loaded = load_policy(path)
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "dqn.bitrl")
    assert compiled.manifest["recovery"] == "distill" and compiled.manifest["output"]["outputs"] == "q_values"
    with load(compiled.path) as artifact:
        q = artifact.forward(cartpole_obs)
        actions = artifact.act(cartpole_obs)
    reference = reference_forward(loaded)(cartpole_obs)  # the numpy BitLinear: what was measured
    x = torch.from_numpy(normalize(cartpole_obs, loaded.input["normalize"]))  # the student's standardised input
    with torch.no_grad():
        trained = distill.ste_forward(result.student, x).numpy()  # what was trained
    np.testing.assert_array_equal(q, reference)  # ReLU: bit for bit
    scale = np.abs(reference).max()  # torch against numpy: an ulp can move one int8 rounding, in a few rows
    assert np.isclose(trained, reference, rtol=1e-4, atol=1e-4 * scale).all(axis=1).mean() >= 0.9
    np.testing.assert_allclose(trained, reference, rtol=0, atol=1e-2 * scale)
    np.testing.assert_array_equal(actions, reference.argmax(1))


def test_a_student_trained_with_an_int8_layer_compiles_to_what_was_trained(dqn, distilled_dqn, tmp_path,
                                                                          cartpole_obs):
    """Mixed precision in training (`int8_layers`, what `--keep` uses): warm-started from the ternary student, the
    layer trained as int8 is int8 in the artifact, which equals the numpy reference bit for bit and the trained
    network within float rounding."""
    from bitrl_compile import pipeline
    from bitrl_compile.runtime import load

    teacher = load_policy(dqn)
    result = distill.distill(teacher, "CartPole-v1", tmp_path / "s.safetensors", small(max_rounds=2, int8_layers=(1,)),
                             log=lambda s: None, start=distilled_dqn[0].policy)
    loaded = load_policy(tmp_path / "s.safetensors")
    compiled = pipeline.compile_policy(loaded, "host", tmp_path / "s.bitrl", int8_layers=[1])
    assert [layer["precision"] for layer in compiled.manifest["layers"]] == ["ternary", "int8", "ternary"]
    with load(compiled.path) as artifact:
        q = artifact.forward(cartpole_obs)
    reference = reference_forward(loaded, int8_layers=(1,))(cartpole_obs)
    with torch.no_grad():
        x = torch.from_numpy(normalize(cartpole_obs, loaded.input["normalize"]))
        trained = distill.ste_forward(result.student, x, int8_layers=(1,)).numpy()
    np.testing.assert_array_equal(q, reference)
    # torch's float ops are not numpy's: an ulp can move one int8 rounding (seen: 1 row of 64, 2e-4 of the output)
    scale = np.abs(reference).max()
    assert np.isclose(trained, reference, rtol=1e-4, atol=1e-4 * scale).all(axis=1).mean() >= 0.9
    np.testing.assert_allclose(trained, reference, rtol=0, atol=1e-2 * scale)
    assert not np.array_equal(reference, reference_forward(loaded)(cartpole_obs))  # the int8 layer is not ternary


def test_the_student_takes_standardised_observations_folded_into_its_first_layer(dqn, distilled_dqn, cartpole_obs):
    """A policy on raw observations: the student's layer 0 takes them standardised by the teacher's states (its
    statistics in the file's input spec, as VecNormalize's are), and the fold alone changes nothing in fp32."""
    teacher = load_policy(dqn)
    assert teacher.input["normalize"] is None
    result, path = distilled_dqn
    norm = load_policy(path).input["normalize"]
    assert norm == result.policy.input["normalize"] and norm["clip"] is None
    std = np.sqrt(np.asarray(norm["var"]) + norm["eps"])
    assert std.min() < 0.5 * std.max()  # CartPole's features differ in spread: a real rescaling, not identity
    assert result.config["trained"]["standardized"] and result.config["input"]["normalize"] == norm
    folded = standardize.fold_to(teacher, norm)
    with torch.no_grad():
        raw = teacher.module(torch.from_numpy(cartpole_obs)).numpy()
        standardised = folded.module(torch.from_numpy(normalize(cartpole_obs, norm))).numpy()
    np.testing.assert_allclose(standardised, raw, rtol=1e-5, atol=1e-5 * np.abs(raw).max())
    assert teacher.input["normalize"] is None and teacher.module is not folded.module  # the teacher is untouched
    with pytest.raises(ValueError, match="statistics of its own"):
        standardize.fold_to(folded, norm)


def test_a_policy_with_statistics_or_without_standardize_keeps_its_input(dqn, tmp_path):
    teacher = load_policy(dqn)
    result = distill.distill(teacher, "CartPole-v1", None, small(max_rounds=1, standardize=False), log=lambda s: None)
    assert result.policy.input["normalize"] is None
    with_stats = standardize.fold_to(teacher, {"mean": [0.0] * 4, "var": [1.0] * 4, "eps": 1e-8, "clip": None})
    assert not standardize.applies(with_stats, True, False, None)  # VecNormalize's statistics stay the only ones
    result = distill.distill(with_stats, "CartPole-v1", None, small(max_rounds=1), log=lambda s: None)
    assert result.policy.input["normalize"] == with_stats.input["normalize"]
    with pytest.raises(ValueError, match="raw observations where the teacher has statistics"):
        distill.distill(with_stats, "CartPole-v1", None, small(max_rounds=1), log=lambda s: None, start=teacher)


def test_continuous_actor_keeps_its_squash_and_bounds(sb3_trained, tmp_path):
    from bitrl_compile import pipeline
    from bitrl_compile.runtime import load
    from bitrl_compile.runtime.policy import postprocess

    sac = load_policy(sb3_trained("sac", "Pendulum-v1", steps=200, policy_kwargs={"net_arch": [32, 32]}).path)
    path = tmp_path / "sac-ternary.safetensors"
    result = distill.distill(sac, "Pendulum-v1", path, small(max_rounds=2, heldout=256), log=lambda s: None)
    student = load_policy(path)
    assert result.kind == "continuous"
    assert student.output == sac.output and student.output["squash"] == "tanh"
    assert student.output["low"] == [-2.0] and student.output["high"] == [2.0]
    obs = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    compiled = pipeline.compile_policy(student, "host", tmp_path / "sac.bitrl")
    with load(compiled.path) as artifact:
        actions = artifact.act(obs)
    np.testing.assert_allclose(actions, postprocess(student.output, reference_forward(student)(obs)), atol=1e-5)
    assert np.all(np.abs(actions) <= 2.0)


def test_finetune_distills_by_default_and_writes_a_q_network(dqn, tmp_path):
    out = tmp_path / "dqn-ternary.safetensors"
    r = subprocess.run([sys.executable, "-m", "bitrl_compile.cli", "finetune", str(dqn), "--env", "CartPole-v1",
                        "--budget", "3", "--episodes", "1", "-o", str(out), "--out", str(tmp_path / "logs")],
                       capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "after distillation" in r.stdout and "round" in r.stderr and "held-out action agreement" in r.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="np") as f:
        config = json.loads(f.metadata()["config"])
    assert config["output"]["outputs"] == "q_values" and config["trained"]["recovery"] == "distill"
    assert (tmp_path / "logs" / "progress.csv").is_file()


@pytest.mark.parametrize("kind", ["q_values", "logits"])
def test_the_ranking_floor_decides_near_ties_the_teachers_way(kind):
    """rule "plain" (floor 0.3): on a state the teacher barely decides (gap 0.01 of its median 1.0), a student that
    leads the teacher's way by less than 0.3 pays the hinge, one that leads by more does not; without the floor
    (the weighted default) a logits student pays only the KL."""
    teacher = torch.tensor([[1.0, 0.0], [0.01, 0.0], [0.0, 1.0]])
    loss = distill.Loss(kind, {"kind": "discrete", "n": 2}, teacher.numpy(), margin=0.5, floor=0.3)
    assert loss.gap_scale == pytest.approx(1.0)
    timid, bold = torch.tensor([[1.0, 0.0], [0.05, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.4, 0.0], [0.0, 1.0]])
    assert loss.hinge(timid, teacher).item() == pytest.approx((0.3 - 0.05) ** 2 / 3, rel=1e-5)
    assert loss.hinge(bold, teacher).item() == 0.0
    assert distill.floor_of(distill.DistillArgs(rule="plain")) == distill.PLAIN_FLOOR
    assert distill.floor_of(distill.DistillArgs()) == 0.0
    if kind == "logits":
        plain = distill.Loss(kind, {"kind": "discrete", "n": 2}, teacher.numpy(), margin=0.5)
        kl = (torch.softmax(teacher, 1) * (torch.log_softmax(teacher, 1) - torch.log_softmax(timid, 1))).sum(1).mean()
        assert plain(timid, teacher).item() == pytest.approx(kl.item(), rel=1e-5)


def test_a_backbone_cannot_be_distilled():
    with pytest.raises(ValueError, match="not a backbone"):
        distill.output_kind({"kind": "features", "dim": 8})


def test_candidates_keep_the_best_by_agreement_then_loss():
    net = torch.nn.Linear(2, 2)
    top = selection.Candidates(3)
    for round_, key in enumerate([(0.5, -1.0), (0.9, -2.0), (0.9, -1.0), (0.7, 0.0), (0.9, -1.0), (0.1, 0.0)]):
        top.offer(key, net, round_)
    assert [(c.round, c.key) for c in top.entries] == [(2, (0.9, -1.0)), (4, (0.9, -1.0)), (1, (0.9, -2.0))]
    assert top.best == 0.9  # of equal keys, the one offered first comes first
    state = top.entries[0].state
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not torch.equal(state["weight"], net.weight)  # a copy, not the live tensor


def test_selection_picks_the_return_then_the_agreement_and_stops_at_the_deadline():
    net = torch.nn.Linear(2, 2)
    top = selection.Candidates(4)
    for round_, key in enumerate([(0.99, 0.0), (0.98, 0.0), (0.97, 0.0), (0.96, 0.0)]):
        top.offer(key, net, round_)
    returns = {0: 450.0, 1: 500.0, 2: 500.0, 3: 600.0}
    ids = {id(c.state): c.round for c in top.entries}
    lines = []
    chosen = selection.select(top, lambda s: returns[ids[id(s)]], deadline=lambda: False, log=lines.append)
    assert chosen.round == 3 and chosen.ret == 600.0
    assert "round 0 (99.0 %): 450.0" in lines[0] and lines[0].endswith("-> round 3")
    # a return tie goes to the higher agreement; past the deadline only the first two are measured
    chosen = selection.select(top, lambda s: returns[ids[id(s)]], deadline=lambda: True)
    assert chosen.round == 1 and top.entries[2].ret is not None  # (measured in the first call)
    returns[3] = 500.0
    assert selection.select(top, lambda s: returns[ids[id(s)]], deadline=lambda: False).round == 1
    # the first accepted by agreement wins, and the rest are not measured
    for c in top.entries:
        c.ret = None
    chosen = selection.select(top, lambda s: returns[ids[id(s)]], deadline=lambda: False,
                            accept=lambda ret: ret >= 490)
    assert chosen.round == 1 and top.entries[2].ret is None
    # past the deadline with nothing accepted: the best of the two measured
    assert selection.select(top, lambda s: returns[ids[id(s)]], deadline=lambda: True,
                          accept=lambda ret: ret > 1000).round == 1


def test_the_selection_score_is_the_one_of_fidelity():
    base = fidelity.Baseline("CartPole-v1", 0, np.zeros((1, 4)), np.zeros((1, 2)), 2, 500.0, 20.0)
    assert selection.score(500.0, base) == 1.0 and selection.score(260.0, base) == 0.5
    flat = fidelity.Baseline("CartPole-v1", 0, np.zeros((1, 4)), np.zeros((1, 2)), 2, 9.0, 9.0)
    assert selection.score(9.0, flat) == 1.0 and selection.score(8.0, flat) == 0.0


def test_selection_by_return_measures_the_candidates_episodes(dqn):
    """select_episodes: the candidates' returns on episodes of their own, through the numpy reference; the student
    returned is the best of them by that return."""
    lines = []
    result = distill.distill(load_policy(dqn), "CartPole-v1", None,
                             small(max_rounds=3, select_episodes=2, candidates=3, select_target=2.0),
                             log=lines.append)  # a target no return reaches: all three measured
    picks = [line for line in lines if "selection by return" in line]
    assert len(picks) == 1 and picks[0].count("round") == 4  # three candidates and the pick
    picked = int(picks[0].rsplit("round ", 1)[1])
    measured = {int(part.split()[1]): float(part.rsplit(": ", 1)[1])
                for part in picks[0].split(": ", 1)[1].rsplit(" -> ", 1)[0].split(", ")}
    assert measured[picked] == max(measured.values())
    student = result.policy  # with its input spec (standardised observations)
    forward = reference_forward(student)
    assert np.mean(fidelity.returns(student, forward, "CartPole-v1", 2, selection.SEED)) == measured[picked]


def test_held_out_states_cover_whole_episodes():
    """The held-out states are spread over every environment's whole episode: on Pendulum (200 steps, never ends
    early) 64 states of 2 environments reach the last step of the second one's episode, which 32 steps from the
    start (the old held-out) never saw."""
    import gymnasium

    from bitrl_compile.trainers.rollouts import Rollouts

    spec = {"kind": "continuous", "shape": [1], "low": [-2.0], "high": [2.0], "squash": "clip"}
    rollouts = Rollouts("Pendulum-v1", 2, 7, spec, None, epsilon=0.0)
    try:
        held = rollouts.whole_episodes(lambda x: np.full((len(x), 1), 0.5, np.float32), 64)
    finally:
        rollouts.close()
    env = gymnasium.make("Pendulum-v1")
    obs, _ = env.reset(seed=8)  # the vector env's second environment: seed + 1
    for _ in range(199):
        obs, *_ = env.step(np.array([0.5], np.float32))
    assert held.shape == (64, 3) and held.dtype == np.float32
    np.testing.assert_array_equal(held[-1], obs.astype(np.float32))
    first, _ = gymnasium.make("Pendulum-v1").reset(seed=7)
    np.testing.assert_array_equal(held[0], first.astype(np.float32))


def test_continuous_loss_is_one_sided_where_the_teacher_saturates():
    """A tanh actor's pre-squash targets past +-3: a student past them the same way costs nothing, one on the other
    side costs its full distance and gets a gradient toward the teacher (clamping both left it none)."""
    spec = {"kind": "continuous", "shape": [1], "low": [-1.0], "high": [1.0], "squash": "tanh"}
    loss = distill.Loss("continuous", spec, np.zeros((4, 1), np.float32), margin=0.5)
    t = torch.tensor([[100.0], [-40.0], [1.0]])
    s = torch.tensor([[10.0], [-5.0], [1.0]], requires_grad=True)
    assert loss(s, t).item() == 0.0
    s = torch.tensor([[-50.0], [-5.0], [1.0]], requires_grad=True)
    value = loss(s, t)
    value.backward()
    assert value.item() == pytest.approx(53.0 ** 2 / 3)
    assert s.grad[0, 0] < 0 and s.grad[1, 0] == 0 and s.grad[2, 0] == 0  # descent raises the first
    s = torch.tensor([[3.0], [-3.0], [5.0]], requires_grad=True)
    assert loss(s, t).item() == pytest.approx(16.0 / 3)  # an unsaturated target: the student unclamped


def test_training_and_held_out_states_start_on_reset_seeds_no_measurement_plays(dqn, monkeypatch):
    """--keep passes its seed to the distillation and measures with it (fidelity: the visited states and the
    episodes, reset seeds seed + i, up to MORE_ROUNDS_MOST times --episodes); the student's training and
    held-out rollouts start elsewhere, so --keep does not measure it on starts it was trained on."""
    from bitrl_compile.trainers import recovery
    from bitrl_compile.trainers.rollouts import Rollouts

    seen = []

    class Recorded(Rollouts):  # the real rollouts, their reset seeds noted
        def __init__(self, env_id, num_envs, seed, *args, **kwargs):
            seen.append(range(seed, seed + num_envs))
            super().__init__(env_id, num_envs, seed, *args, **kwargs)

    monkeypatch.setattr(distill, "Rollouts", Recorded)
    seed = 5
    distill.distill(load_policy(dqn), "CartPole-v1", None, small(seed=seed, max_rounds=1), log=lambda s: None)
    assert len(seen) == 2  # the held-out states', the training's
    measured = set(range(seed, seed + max(fidelity.ROLLOUTS, recovery.MORE_ROUNDS_MOST * 100)))
    assert not any(measured & set(r) for r in seen), seen
