"""--keep (issue 14, item 3): recovery steps in order (plain ternary, distillation, int8 layers by sensitivity),
each compiled and measured on the states the original visits before anything is written; the first that keeps
the target is written, and when none does, one line says how far each got and nothing is written. Real policy
files, real compiles, real CartPole episodes."""

from __future__ import annotations

import json
import zipfile

import pytest

from bitrl_compile import pipeline
from bitrl_compile.frontends import load_policy
from bitrl_compile.trainers import distill, recovery


def manifest_of(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("manifest.json"))


def compiler(out):
    def compile_fn(loaded, int8_layers, measure):
        return pipeline.compile_policy(loaded, "host", out, int8_layers=int8_layers, measure=measure)

    return compile_fn


NO_TRAINING = distill.DistillArgs(max_rounds=0, calibrate=False, budget_s=5)  # the student stays the teacher


def test_a_policy_that_keeps_its_actions_is_written_by_the_first_step(sb3_trained, tmp_path):
    from torch import nn

    path = sb3_trained("ppo", "CartPole-v1", policy_kwargs={"activation_fn": nn.ReLU, "net_arch": [32, 16]}).path
    out = tmp_path / "ppo.bitrl"
    result, attempts = recovery.keep(load_policy(path, config={"env": "CartPole-v1"}), "CartPole-v1", 0.98,
                                     compiler(out))
    assert [a.step for a in attempts] == ["ptq"] and attempts[0].kept
    manifest = manifest_of(out)
    assert result.path == out and manifest["fidelity"]["weighted"] >= 0.98 and "recovery" not in manifest


def test_mixed_precision_is_written_when_it_is_the_first_to_keep(q_network, tmp_path):
    """The Q-network whose tiny action gaps ternarization erases: with the target set to what the all-int8 network
    keeps (measured first), the plain and the (untrained) distilled compiles fall short and the first int8 step
    that reaches it is written, its layers int8 in the manifest."""
    loaded = load_policy(q_network, config={"env": "CartPole-v1"})
    from bitrl_compile import fidelity

    probe = pipeline.compile_policy(loaded, "host", tmp_path / "probe.bitrl", int8_layers=[0, 1],
                                    measure=fidelity.compile_hook(loaded, "CartPole-v1"))
    target = fidelity.shared(probe.manifest["fidelity"])
    out = tmp_path / "q.bitrl"
    result, attempts = recovery.keep(loaded, "CartPole-v1", target, compiler(out), distill_args=NO_TRAINING)
    assert result.path == out
    assert attempts[0].step == "ptq" and attempts[0].share < target, "premise: int8 must keep more than ternary"
    assert attempts[1].step == "distill" and not attempts[1].kept
    assert attempts[-1].kept and "int8 layers" in attempts[-1].step and all(not a.kept for a in attempts[:-1])
    manifest = manifest_of(out)
    int8 = [layer["index"] for layer in manifest["layers"] if layer["precision"] == "int8"]
    assert int8 == list(attempts[-1].int8_layers) and manifest["fidelity"] == attempts[-1].record


def test_a_target_no_step_keeps_says_how_far_each_got_and_writes_nothing(q_network, tmp_path):
    out = tmp_path / "q.bitrl"
    with pytest.raises(recovery.NotKept) as e:
        recovery.keep(load_policy(q_network, config={"env": "CartPole-v1"}), "CartPole-v1", 1.5, compiler(out),
                      distill_args=NO_TRAINING)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--keep 1.5 not met: the best recovery (")
    for step in ("ptq: agreement", "distill: agreement", "distill + int8 layers [", "; int8 layers [0, 1]",
                 "nothing was written"):
        assert step in message, message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_cli_keeps_the_target_or_says_what_is_missing(sb3_trained, sb3_ppo_cartpole, tmp_path):
    from click.testing import CliRunner
    from torch import nn

    from bitrl_compile.cli import main

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    r = cli(sb3_ppo_cartpole, "--keep", "0.98", "-o", tmp_path / "x.bitrl")
    assert r.exit_code == 2 and "--keep needs --env" in r.output
    r = cli(sb3_ppo_cartpole, "--env", "CartPole-v1", "--keep", "0.98", "--int8-layers", "first", "-o", tmp_path / "x.bitrl")
    assert r.exit_code == 2 and "drop --qat, --int8-layers and --features" in r.output
    r = cli(sb3_ppo_cartpole, "--env", "CartPole-v1", "--keep", "1.5", "-o", tmp_path / "x.bitrl")
    assert r.exit_code == 2 and not (tmp_path / "x.bitrl").exists()
    path = sb3_trained("ppo", "CartPole-v1", policy_kwargs={"activation_fn": nn.ReLU, "net_arch": [32, 16]}).path
    out = tmp_path / "kept.bitrl"
    r = cli(path, "--env", "CartPole-v1", "--keep", "0.98", "-o", out)
    assert r.exit_code == 0, r.output
    assert "keep 98 %: ptq: agreement 100.0 % - kept" in r.stderr and manifest_of(out)["fidelity"]["weighted"] == 1.0
    r = cli(path, "--env", "CartPole-v1", "--keep", "0.99", "--keep-rule", "plain", "-o", tmp_path / "plain.bitrl")
    assert r.exit_code == 0 and "keep 99 %: ptq: agreement 100.0 % plain - kept" in r.stderr, r.output


def test_the_plain_rule_counts_every_state_and_hopeless_steps_are_not_compiled(q_network, tmp_path):
    """rule "plain": the share is the plain agreement, whatever the weighted one or the score; an unknown rule is
    one line. A step whose numpy reference misses the target is measured there and not compiled; the one that
    keeps it is written."""
    record = {"agreement": 0.9, "weighted": 0.995, "score": 1.0}
    assert recovery.share(record) == 1.0 and recovery.share(record, "plain") == 0.9
    # with episodes the score decides, not the higher of it and the agreement
    assert recovery.share({"agreement": 0.99, "weighted": 0.995, "score": 0.934}) == 0.934
    with pytest.raises(ValueError, match="agreement rule 'most' is not one of weighted, plain"):
        recovery.share(record, "most")
    lines: list[str] = []
    out = tmp_path / "q.bitrl"
    result, tried = recovery.keep(load_policy(q_network, config={"env": "CartPole-v1"}), "CartPole-v1", 1.0,
                                  compiler(out), rule="plain", distill_args=NO_TRAINING, log=lines.append)
    # every plain agreement short of 100 % misses; the Q-network's rows differ by 2 % of a common vector, which only
    # the last layer int8 with its shared row split off keeps (frontends.mlp.shared_row)
    assert tried[0].step == "ptq" and all(a.record["agreement"] < 1 for a in tried[:-1])
    assert tried[-1].kept and tried[-1].step.endswith("(shared row)") and tried[-1].record["agreement"] == 1.0
    missed = [line for line in lines if line.startswith("keep 100 %") and not line.endswith("kept")]
    assert missed and all("(numpy reference; not compiled)" in line for line in missed), lines
    assert result.path == out and list(tmp_path.iterdir()) == [out]


def test_the_budget_covers_the_whole_recovery():
    """--keep-budget is CPU seconds of the whole recovery: distillation gets what the measurements and compiles
    leave (four more like the plain one), at least a quarter of it, and says when the recovery will overrun."""
    assert recovery.distill_budget(180, spent=10, step=5) == pytest.approx(180 * (1 - recovery.BUDGET_MARGIN) - 30)
    # and one step per int8-only attempt (a 3-layer MLP: 3 more)
    assert recovery.distill_budget(180, spent=10, step=5, after=7) == pytest.approx(180 * (1 - recovery.BUDGET_MARGIN) - 45)
    lines: list[str] = []
    assert recovery.distill_budget(180, spent=150, step=20, log=lines.append) == 45
    assert len(lines) == 1 and "take 230 of the 180 CPU s; distillation gets 45 s" in lines[0]


def test_with_episodes_each_distillation_checks_its_students_return(q_network, tmp_path):
    """With episodes (the return decides), distillation ends by measuring its best students' return on episodes
    of their own (DistillArgs.select_episodes, select_target = the target). A target no step reaches: both run."""
    loaded = load_policy(q_network, config={"env": "CartPole-v1"})
    lines: list[str] = []
    with pytest.raises(recovery.NotKept):
        recovery.keep(loaded, "CartPole-v1", 50.0, compiler(tmp_path / "q.bitrl"), episodes=2, budget=8,
                      log=lines.append)
    selections = [line for line in lines if "selection by return" in line]
    assert len(selections) == 2, lines  # all ternary, then with the top-ranked layer int8
    assert list(tmp_path.iterdir()) == []
