"""`bitrl-compile train`, `finetune` and `compile --features` as a user runs them: subprocesses, tiny budgets."""

import json
import subprocess
import sys

import pytest


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bitrl_compile.cli", *map(str, args)], capture_output=True,
                          check=False, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-train") / "run"
    r = cli("train", "--env", "CartPole-v1", "--steps", 512, "--seed", 1, "--out", out, "--eval-episodes", 2,
            "--no-progress", "--norm-obs")  # RL Zoo does not normalise CartPole's observations; the tests do
    assert r.returncode == 0, r.stderr
    assert "deterministic return" in r.stdout and "policy.safetensors" in r.stdout
    return out


def test_train_writes_policy_checkpoint_logs_and_plot(trained):
    for name in ("policy.safetensors", "checkpoint.safetensors", "progress.csv", "learning_curve.png", "args.json"):
        assert (trained / name).stat().st_size > 0, name
    args = json.loads((trained / "args.json").read_text())
    assert args["seed"] == 1 and args["total_timesteps"] == 512 and args["heads_bits"] == 32


def test_finetune_then_compile_then_train_heads_on_the_compiled_backbone(trained, tmp_path):
    ternary = tmp_path / "ternary.safetensors"
    r = cli("finetune", trained / "policy.safetensors", "--env", "CartPole-v1", "--method", "ppo", "--steps", 512,
            "--episodes", 2, "-o", ternary, "--out", tmp_path / "qat", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "ternary (PTQ)" in r.stdout and "after 512 QAT steps" in r.stdout and ternary.is_file()
    assert not list(tmp_path.glob("*.tmp"))  # written to a temporary file, then renamed into place

    r = cli(ternary, "--features", "-o", tmp_path / "backbone.bitrl")
    assert r.returncode == 0, r.stderr
    assert "2 BitLinear layers" in r.stdout
    manifest = json.loads(cli("inspect", "--json", tmp_path / "backbone.bitrl").stdout)
    assert manifest["output"] == {"kind": "features", "dim": 64} and manifest["input"]["normalize"] is not None

    r = cli("train", "--env", "CartPole-v1", "--steps", 256, "--backbone", tmp_path / "backbone.bitrl",
            "--heads-bits", "1.58", "--out", tmp_path / "heads", "--eval-episodes", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "CompiledBackbone" in r.stderr or "backbone.bitrl" in r.stderr


def test_compile_with_qat_distils_first_then_compiles_the_ternary_policy(trained, tmp_path):
    model = tmp_path / "policy.safetensors"
    model.write_bytes((trained / "policy.safetensors").read_bytes())
    r = cli(model, "--qat", "CartPole-v1", "--qat-steps", 256, "-o", tmp_path / "p.bitrl")
    assert r.returncode == 0, r.stderr
    assert "ternary (PTQ)" in r.stdout and "after distillation" in r.stdout and "3 BitLinear layers" in r.stdout
    assert (tmp_path / "policy-ternary.safetensors").is_file() and (tmp_path / "p.bitrl").is_file()
    assert (tmp_path / "policy-qat" / "progress.csv").is_file()  # the fine-tune's logs, beside the model
    manifest = json.loads(cli("inspect", "--json", tmp_path / "p.bitrl").stdout)
    assert manifest["input"]["normalize"] is not None  # the statistics came along with the fine-tuned file
    assert manifest["recovery"] == "distill" and manifest["output"]["outputs"] == "logits"


def test_running_a_backbone_artifact_as_a_policy_is_a_one_line_error(tmp_path, trained):
    r = cli(trained / "policy.safetensors", "--features", "-o", tmp_path / "b.bitrl")
    assert r.returncode == 0, r.stderr
    r = cli("run", tmp_path / "b.bitrl", "--env", "CartPole-v1", "--episodes", 1)
    assert r.returncode == 1 and "features(obs)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--env", "NoSuchEnv-v0", "--steps", 10], "unknown environment"),
    (["train", "--env", "CartPole-v1", "--steps", 10, "--backbone", "missing.bitrl"], "no such backbone"),
    (["finetune", "missing.safetensors", "--env", "CartPole-v1"], "no such file"),
])
def test_bad_train_and_finetune_arguments_are_one_line_errors(tmp_path, args, message):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("bitrl-compile: error:") and message in r.stderr and r.stderr.count("\n") == 1


def test_finetune_refuses_a_policy_for_another_environment(trained, tmp_path):
    r = cli("finetune", trained / "policy.safetensors", "--env", "Acrobot-v1", "--steps", 10, "--episodes", 1,
            "-o", tmp_path / "x.safetensors")
    assert r.returncode == 1 and "bitrl-compile: error:" in r.stderr, r.stderr


def test_heads_bits_must_be_one_of_the_supported_widths():
    r = cli("train", "--env", "CartPole-v1", "--heads-bits", "4")
    assert r.returncode == 2 and "'32', '8', '1.58'" in r.stderr


def test_train_prints_its_settings_presets_apply_and_options_override(tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--env", "CartPole-v1", "--steps", 128, "--num-envs", 2, "--learning-rate", 5e-4, "--vec",
            "async", "--out", out, "--eval-episodes", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "settings (RL Zoo's PPO settings" in r.stderr and "learning_rate=0.0005" in r.stderr
    assert "async vector envs" in r.stderr
    args = json.loads((out / "args.json").read_text())
    assert (args["num_envs"], args["learning_rate"], args["vec"]) == (2, 5e-4, "async")  # given
    assert (args["num_steps"], args["update_epochs"], args["gamma"], args["anneal_clip"]) == (32, 20, 0.98, True)
