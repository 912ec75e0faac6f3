"""Compile knows when it loses (issue 14, item 3): with --env, the ternary policy is measured against the original
on the states the original visits, printed, recorded in the manifest, shown by inspect, and below 98 % a warning
names the recovery. Real SB3 policies (tests/conftest.py's sb3_trained), real gymnasium environments."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from bitrl_compile.cli import main
from bitrl_compile.fidelity import score_text


def compile_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def manifest_of(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("manifest.json"))


def test_a_policy_that_keeps_its_actions_compiles_without_a_warning_and_inspect_shows_the_measure(
        sb3_trained, tmp_path):
    from torch import nn

    path = sb3_trained("ppo", "CartPole-v1", policy_kwargs={"activation_fn": nn.ReLU, "net_arch": [32, 16]}).path
    out = tmp_path / "ppo.bitrl"
    r = compile_cli(path, "--env", "CartPole-v1", "-o", out)
    assert r.exit_code == 0, r.output
    assert "action agreement 100.0 % (100.0 % weighted by the fp32 policy's stakes) on" in r.stdout
    assert "states the fp32 policy visits in CartPole-v1" in r.stdout and "warning" not in r.stderr
    record = manifest_of(out)["fidelity"]
    assert record["env"] == "CartPole-v1" and record["agreement"] == record["weighted"] == 1.0
    assert record["engine"] == "artifact"
    assert record["rule"] == "same action (argmax)" and 1 <= record["states"] <= 2000
    assert "return" not in record  # no --episodes: no episodes run
    r = compile_cli("inspect", out)
    assert r.exit_code == 0 and "fidelity: action agreement 100.0 %" in r.stdout, r.output
    assert json.loads(compile_cli("inspect", "--json", out).stdout)["fidelity"] == record


def test_a_q_network_with_tiny_gaps_loses_and_the_warning_names_the_recovery(q_network, tmp_path):
    out = tmp_path / "q.bitrl"
    r = compile_cli(q_network, "--env", "CartPole-v1", "--episodes", "2", "-o", out)
    assert r.exit_code == 0, r.output
    record = manifest_of(out)["fidelity"]
    assert record["agreement"] < 0.98 and record["weighted"] < 0.98
    assert 0 < record["q_gap"] < 0.2 and record["q_error"] > record["q_gap"]  # errors beyond the gaps
    assert record["episodes"] == 2 and record["return"] < record["return_fp32"] and record["score"] < 0.5
    assert {"return_random", "states"} <= set(record)
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "recovery: --keep 0.98 or --qat CartPole-v1, or --per-channel" in warnings[0], r.stderr
    assert f"keeps only {score_text(record)} of the fp32 policy's return over 2 episodes" in warnings[0]
    assert record["score_error"] >= 0  # the paired standard error of the two episodes' score
    assert f"action agreement {100 * record['agreement']:.1f} %" in r.stdout and "over 2 episodes" in r.stdout


def test_the_measure_compares_actions_on_the_states_the_fp32_policy_visits(q_network):
    """fidelity.measure on its own: the fp32 policy plays both actions on its states, the ternary one (here the
    numpy reference of the quantized module, as on a machine that cannot run the artifact) mostly one."""
    from bitrl_compile import fidelity, pipeline, reference, targets
    from bitrl_compile.frontends import load_policy

    loaded = load_policy(q_network, config={"env": "CartPole-v1"})
    tvm_target = targets.tvm_target(targets.get_target("host"))
    quantized, _, _ = pipeline.run_passes(pipeline.to_relax(loaded), tvm_target, targets.kernel_spec(tvm_target),
                                          specs=(loaded.input, loaded.output))
    fp32 = fidelity.original_forward(loaded)
    states = fidelity.visited_states(fp32, loaded.output, "CartPole-v1")
    assert len(np.unique(fp32(states).argmax(1))) == 2

    def ternary(obs):
        return np.asarray(reference.run(quantized, np.asarray(obs, np.float32)), np.float32)

    result = fidelity.measure(loaded, ternary, "CartPole-v1", engine="reference")
    expected = float((ternary(states).argmax(1) == fp32(states).argmax(1)).mean())
    assert result.states == len(states) and result.agreement == pytest.approx(expected) and result.agreement < 0.98
    assert fidelity.warning(result.record()) is not None
    # the original measured once (what compile --keep and --int8-layers auto share) gives the same record
    base = fidelity.baseline(loaded, "CartPole-v1", episodes=2)
    assert np.array_equal(base.states, states) and base.ret_fp32 is not None and base.ret_random is not None
    shared = fidelity.measure(loaded, ternary, "CartPole-v1", engine="reference", episodes=2, base=base)
    assert shared.record() == fidelity.measure(loaded, ternary, "CartPole-v1", engine="reference",
                                               episodes=2).record()
    with pytest.raises(ValueError, match="baseline was measured on CartPole-v1 .seed 0, 2 episodes"):
        fidelity.measure(loaded, ternary, "CartPole-v1", episodes=3, base=base)


def test_a_continuous_policy_is_measured_with_the_stated_rule(sb3_trained, tmp_path):
    """TD3 Pendulum: agreement = share of states where |a - a_fp32| <= 5 % of the action range (4), recomputed
    here from SB3's own deterministic actions and the artifact's."""
    from bitrl_compile import fidelity
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.runtime import load

    run = sb3_trained("td3", "Pendulum-v1", policy_kwargs={"net_arch": [32, 32]})
    out = tmp_path / "td3.bitrl"
    r = compile_cli(run.path, "--env", "Pendulum-v1", "-o", out)
    assert r.exit_code == 0, r.output
    record = manifest_of(out)["fidelity"]
    assert record["kind"] == "continuous" and "5 % of the action range" in record["rule"] and "error" in record
    loaded = load_policy(run.path, config={"env": "Pendulum-v1"})
    states = fidelity.visited_states(fidelity.original_forward(loaded), loaded.output, "Pendulum-v1")
    assert len(states) == record["states"] == 600  # 3 episodes of 200 steps
    sb3_actions = run.model.predict(states, deterministic=True)[0].reshape(len(states), -1)
    with load(out) as policy:
        ours = np.asarray(policy.act(states)).reshape(len(states), -1)
    diff = np.abs(ours - sb3_actions) / 4.0
    assert record["agreement"] == pytest.approx(float((diff <= 0.05).all(axis=1).mean()), abs=2 / len(states))
    assert record["error"] == pytest.approx(float(diff.mean()), rel=0.05, abs=1e-3)
    assert (record["agreement"] < 0.98) == ("recovery: --keep 0.98 or --qat Pendulum-v1" in r.stderr)


def test_without_env_nothing_is_measured_and_episodes_need_an_env(sb3_ppo_cartpole, tmp_path):
    r = compile_cli(sb3_ppo_cartpole, "--episodes", "3", "-o", tmp_path / "x.bitrl")
    assert r.exit_code == 2 and "--episodes needs --env" in r.output
    out = tmp_path / "plain.bitrl"
    r = compile_cli(sb3_ppo_cartpole, "-o", out)
    assert r.exit_code == 0 and "agreement" not in r.output and "fidelity" not in manifest_of(out)


def test_with_episodes_the_return_decides_the_warning_else_the_agreement():
    from bitrl_compile.fidelity import kept, warning

    record = {"env": "CartPole-v1", "states": 1500, "agreement": 0.752}
    assert "recovery: --keep 0.98 or --qat CartPole-v1, or --per-channel" in warning(record)
    assert warning(record, per_channel=True).endswith("recovery: --keep 0.98 or --qat CartPole-v1")
    after = warning(record, recovered=True)  # after --qat: no "plain ternarization" and no --qat to suggest again
    assert "after recovery" in after and "--qat " not in after and "--per-channel" in after
    assert "--episodes N" in after
    assert warning({**record, "agreement": 0.98}) is None
    # a discrete record carries the stake-weighted agreement, which the target checks
    assert warning({**record, "weighted": 0.985}) is None
    assert "only 90.0 % of the fp32 policy's stakes on its states" in warning({**record, "agreement": 0.99,
                                                                                "weighted": 0.9})
    # with episodes the score decides, both ways: a policy that disagrees where actions hardly matter keeps its
    # return (quiet); one that agrees on 99 % of the states but loses 6.6 % of the return is warned about
    assert warning({**record, "score": 1.0, "episodes": 10}) is None and kept({**record, "score": 1.0}) == 1.0
    loud = warning({**record, "agreement": 0.99, "score": 0.934, "episodes": 10})
    assert loud.startswith("the ternary policy keeps only 93.4 % of the fp32 policy's return over 10 episodes")
    assert "action agreement 99.0 %" in loud and "recovery: --keep 0.98" in loud
    assert "--episodes N" not in warning({**record, "score": 0.5, "episodes": 10}, recovered=True)
    assert kept({**record, "score": 0.5}, "plain") == 0.752  # the plain rule: the plain agreement alone


def test_where_the_return_is_noise_the_agreement_decides():
    from bitrl_compile.fidelity import kept, score_error, score_text, warning

    record = {"env": "LunarLander-v3", "states": 2000, "agreement": 0.97, "weighted": 0.99, "episodes": 30}
    # LunarLander-like: the score 90 % within two of its standard errors (6 %) of 98 %; the agreement reaches it
    noisy = {**record, "score": 0.90, "score_error": 0.06}
    assert kept(noisy) == pytest.approx(0.99) and warning(noisy) is None
    assert score_text(noisy) == "90.0 ± 6.0 %"
    # ... but not a score below it beyond its noise, nor a noisy score without the agreement
    assert kept({**noisy, "score": 0.80}) == pytest.approx(0.92) and warning({**noisy, "score": 0.80})
    assert kept({**noisy, "weighted": 0.95}) == pytest.approx(0.95)
    assert "keeps only 90.0 ± 6.0 % of the fp32" in warning({**noisy, "weighted": 0.95})
    # a score at the target keeps whatever the agreement; deterministic returns (error 0) decide alone
    assert kept({**noisy, "score": 1.0, "weighted": 0.5}) == 1.0
    assert kept({**noisy, "score_error": 0.0}) == 0.90 and kept({**record, "score": 0.9}) == 0.90
    # the error: std of the paired per-episode differences / sqrt(n) / the span
    assert score_error([1.0, 3.0], [2.0, 2.0], 10.0) == pytest.approx(np.std([-1, 1], ddof=1) / np.sqrt(2) / 10)
    assert score_error([500.0] * 5, [500.0] * 5, 480.0) == 0.0
    assert score_error([1.0], [2.0], 10.0) is None and score_error([1.0, 2.0], None, 10.0) is None


def test_a_score_within_noise_of_the_target_is_measured_on_more_episodes(q_network):
    """Sequential testing (fidelity.MoreEpisodes, what --keep decides with): a score that alone decides and is
    within two standard errors of the target gets `factor` times the episodes played more, round after round
    while it stays within noise (up to `most`), the fp32 and random sides measured on the same reset seeds, and
    the record counts them all; outside the noise, where the agreement reaches the target too, or with no budget
    left, nothing more is run, and a round is cut to the budget's rest."""
    from bitrl_compile import fidelity
    from bitrl_compile.frontends import load_policy

    loaded = load_policy(q_network, config={"env": "CartPole-v1"})
    fp32 = fidelity.original_forward(loaded)

    def shaky(obs):  # the fp32 policy, with the other action on a fixed slice of the states: returns that vary
        out = fp32(obs)
        flip = (np.abs(np.asarray(obs, np.float64)[:, 2]) * 1e4 % 1.0) < 0.1
        out[flip] = out[flip][:, ::-1]
        return out

    base = fidelity.baseline(loaded, "CartPole-v1", episodes=4)
    first = fidelity.measure(loaded, shaky, "CartPole-v1", engine="reference", episodes=4, base=base)
    target = first.weighted + 0.03  # the agreement short of it, the score (89 ± 7 % here) within its noise
    assert first.score_error > 0 and abs(first.score - target) < 2 * first.score_error
    within = fidelity.MoreEpisodes(loaded, "CartPole-v1", target=target, most=12)
    assert within.extension(first) == 8
    longer = fidelity.measure(loaded, shaky, "CartPole-v1", engine="reference", episodes=4, base=base, more=within)
    ours, theirs = (fidelity.returns(loaded, f, "CartPole-v1", 12) for f in (shaky, fp32))
    assert longer.episodes == 12 and longer.record()["episodes"] == 12
    assert longer.ret == pytest.approx(np.mean(ours)) and longer.ret_fp32 == pytest.approx(np.mean(theirs))
    assert longer.ret_random == pytest.approx(
        (4 * fidelity.random_return("CartPole-v1", 4) + 8 * fidelity.random_return("CartPole-v1", 8, 4)) / 12)
    assert longer.score_error == pytest.approx(
        fidelity.score_error(ours, theirs, longer.ret_fp32 - longer.ret_random))
    assert longer.agreement == first.agreement  # the states compared are the same

    # round after round: 4 -> 12 -> 36 while the score stays within noise (80 ± 12 % on 12 episodes here)
    heard = []
    rounds = fidelity.MoreEpisodes(loaded, "CartPole-v1", target=target, most=36, log=heard.append)
    assert rounds.within_noise(longer) and rounds.extension(longer) == 24
    third = fidelity.measure(loaded, shaky, "CartPole-v1", engine="reference", episodes=4, base=base, more=rounds)
    ours, theirs = (fidelity.returns(loaded, f, "CartPole-v1", 36) for f in (shaky, fp32))
    assert third.episodes == 36 and third.ret == pytest.approx(np.mean(ours))
    assert third.ret_fp32 == pytest.approx(np.mean(theirs))
    assert third.ret_random == pytest.approx((4 * fidelity.random_return("CartPole-v1", 4) + 8 * fidelity.random_return(
        "CartPole-v1", 8, 4) + 24 * fidelity.random_return("CartPole-v1", 24, 12)) / 36)
    assert rounds.extension(third) == 0  # at `most`
    assert [line.rsplit(": ", 1)[1] for line in heard] == ["8 more", "24 more"]  # each round, with its score
    assert heard[1].startswith(f"score {fidelity.score_text(longer.record())} over 12 episodes, within noise of")

    # the budget: a round costs its episodes and the fp32 side's not measured yet; cut to what is left, but not
    # below as many as were played
    budgeted = fidelity.MoreEpisodes(loaded, "CartPole-v1", target=target, most=100, left=lambda: 30.0)
    assert budgeted.extension(longer, seconds_per_episode=1.0, first=12) == 15  # 24 wanted, 2 s each: 15 fit
    budgeted.sides(12, 24)  # the fp32 side measured once: then only ours cost
    assert budgeted.extension(longer, seconds_per_episode=1.0, first=12) == 24
    assert fidelity.MoreEpisodes(loaded, "CartPole-v1", target=target, most=100, left=lambda: 20.0).extension(
        longer, seconds_per_episode=1.0, first=12) == 0  # 10 would fit: fewer than the 12 played

    # a score below the target within its noise that the agreement would keep is measured on more episodes too
    assert fidelity.MoreEpisodes(loaded, "CartPole-v1", target=first.score + 0.01, most=12).extension(
        dataclasses.replace(first, weighted=first.score + 0.02)) == 8
    # far from the target, the score and the agreement at it, or no budget left: the first measurement decides
    for more in (fidelity.MoreEpisodes(loaded, "CartPole-v1", target=first.score + 3 * first.score_error, most=12),
                 fidelity.MoreEpisodes(loaded, "CartPole-v1", target=min(first.weighted, first.score) - 0.01,
                                       most=12),
                 fidelity.MoreEpisodes(loaded, "CartPole-v1", target=target, most=12, left=lambda: 0.0)):
        assert not more.extension(first, seconds_per_episode=0.01, first=4)
        again = fidelity.measure(loaded, shaky, "CartPole-v1", engine="reference", episodes=4, base=base, more=more)
        assert again.record() == first.record()

def test_the_weighted_agreement_counts_states_by_the_fp32_policys_stakes():
    """Stakes: the best-two Q gap of a Q-network, the best-two probability gap of logits; a disagreement where the
    fp32 policy is indifferent costs little, one where it is sure costs much."""
    from bitrl_compile import fidelity

    q_spec = {"kind": "discrete", "n": 3, "outputs": "q_values"}
    fp32 = np.array([[10.0, 9.9, 0.0], [5.0, 1.0, 0.0], [0.0, 3.0, 2.0]])
    assert fidelity.stakes(q_spec, fp32) == pytest.approx([0.1, 4.0, 1.0])
    ours = np.array([[9.0, 9.5, 0.0], [5.0, 1.0, 0.0], [0.0, 3.0, 2.0]])  # disagrees on the indifferent state only
    result = fidelity.compare(q_spec, ours, fp32)
    assert result["agreement"] == pytest.approx(2 / 3) and result["weighted"] == pytest.approx(5.0 / 5.1)
    ours[1] = [0.0, 1.0, 0.0]  # and on the sure one
    assert fidelity.compare(q_spec, ours, fp32)["weighted"] == pytest.approx(1.0 / 5.1)
    logits = {"kind": "discrete", "n": 2, "outputs": "logits"}
    p = fidelity.stakes(logits, np.array([[0.0, 0.0], [np.log(3.0), 0.0]]))
    assert p == pytest.approx([0.0, 0.5])  # probabilities (1/2, 1/2) and (3/4, 1/4)
    assert fidelity.weighted_agreement(np.array([False, True]), p) == 1.0
    assert fidelity.weighted_agreement(np.array([False, True]), np.zeros(2)) == 0.5  # no stakes: plain agreement
    box = {"kind": "continuous", "shape": [1], "low": [-1.0], "high": [1.0], "squash": "clip"}
    assert fidelity.stakes(box, np.zeros((2, 1))) is None and "weighted" not in fidelity.compare(
        box, np.zeros((2, 1), np.float32), np.zeros((2, 1), np.float32))


# ------------------------------------------------------------------------------------------------ bad input

class NeedsAnExtra:
    """A registered environment whose constructor raises what gymnasium's Box2D and MuJoCo envs raise."""

    def __init__(self, **kwargs):
        import gymnasium

        raise gymnasium.error.DependencyNotInstalled(
            'Frobnicator is not installed, you can install it by run `pip install "gymnasium[frob]"`')


def _box2d_missing() -> bool:
    try:
        import Box2D  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.parametrize("env_id,extra", [
    ("BitrlNeedsAnExtra-v0", 'pip install "gymnasium[frob]"'),
    pytest.param("LunarLander-v3", 'pip install swig && pip install "gymnasium[box2d]"',
                 marks=pytest.mark.skipif(not _box2d_missing(), reason="Box2D is installed here")),
])
def test_a_missing_environment_dependency_is_one_line_naming_the_pip_extra(q_network, tmp_path, env_id, extra):
    import gymnasium

    from bitrl_compile.evaluate import EnvUnavailable, make_env

    if env_id not in gymnasium.registry:
        gymnasium.register(id=env_id, entry_point=NeedsAnExtra)
    with pytest.raises(EnvUnavailable) as e:
        make_env(env_id)
    assert extra in str(e.value) and "\n" not in str(e.value)
    r = compile_cli(q_network, "--env", env_id, "-o", tmp_path / "x.bitrl")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and extra in lines[0] and env_id in lines[0], r.stderr


def test_the_manifest_check_accepts_a_fidelity_record_and_refuses_a_malformed_one():
    from bitrl_compile.runtime.manifest import ManifestError, check_manifest

    base = {"target": {"arch": "x86_64"}, "params": ["p0"], "input": {"shape": [4], "dtype": "float32"},
            "output": {"kind": "discrete", "n": 2}}
    good = {"env": "CartPole-v1", "states": 1500, "agreement": 0.971, "engine": "artifact", "q_gap": 0.24,
            "return": 9.0, "return_fp32": 500.0, "episodes": 3}
    check_manifest({**base, "fidelity": good})
    check_manifest({**base, "fidelity": {**good, "weighted": 0.99, "score": 0.5, "score_error": 0.12}})
    for edit, says in [({"agreement": 1.5}, "fidelity.agreement is 1.5, not in [0, 1]"),
                       ({"score_error": -0.1}, "fidelity.score_error is -0.1, not a standard error (>= 0)"),
                       ({"score_error": "big"}, "fidelity.score_error is not a number"),
                       ({"weighted": -0.5}, "fidelity.weighted is -0.5, not in [0, 1]"),
                       ({"states": "many"}, "fidelity.states is not an integer"),
                       ({"env": None}, "fidelity.env is not a string (null)"),
                       ({"return": "9"}, "fidelity.return is not a number")]:
        with pytest.raises(ManifestError, match=f"manifest {says}".replace("[", r"\[").replace("]", r"\]")
                           .replace("(", r"\(").replace(")", r"\)")):
            check_manifest({**base, "fidelity": {**good, **edit}})
