"""bench/policy_matrix.py (issue 14's benchmark) and bench/zoo.py (RL Zoo's settings, shared with bench/distill.py):
the settings table, the report's rendering, and one tiny row end to end (a tiny SB3 PPO compiled for real), so the
script cannot silently rot. No timing assertions."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitrl_compile import fidelity
from repo_scripts import load_script

zoo = load_script("bench/zoo.py", "zoo")
matrix = load_script("bench/policy_matrix.py", "bench_policy_matrix")
distill_bench = load_script("bench/distill.py", "bench_distill")


def test_every_row_of_the_issue_has_rl_zoo_settings():
    rows = zoo.rows()
    assert len(rows) == 2 * 5 + 3 + 2 * 2  # PPO, A2C on five envs; DQN on three; SAC, TD3 on two
    assert ("dqn", "Pendulum-v1") not in rows and ("sac", "CartPole-v1") not in rows
    assert zoo.rows(["td3"], ["LunarLanderContinuous-v3"]) == [("td3", "LunarLanderContinuous-v3")]


def test_ppo_settings_are_the_presets_and_gsde_is_replaced():
    from bitrl_compile.trainers import presets

    assert zoo.ZOO[("ppo", "CartPole-v1")] == presets.ZOO["CartPole-v1"]  # one home for RL Zoo's PPO settings
    s = zoo.sb3_settings("ppo", "CartPole-v1", scale=0.05)
    assert (s["n_envs"], s["steps"], s["normalize"]) == (8, 5000, False)
    assert s["kwargs"]["learning_rate"](0.5) == pytest.approx(5e-4)  # "lin_0.001", SB3's progress remaining
    s = zoo.sb3_settings("a2c", "MountainCarContinuous-v0")
    assert "use_sde" not in s["kwargs"] and "sde_sample_freq" not in s["kwargs"] and s["normalize"]
    assert s["kwargs"]["policy_kwargs"] == {"ortho_init": False}  # gSDE's log_std_init dropped with it
    assert zoo.dropped("a2c", "MountainCarContinuous-v0") == ["use_sde", "sde_sample_freq", "log_std_init=0.0"]
    assert zoo.dropped("dqn", "CartPole-v1") == [] and zoo.sb3_settings("td3", "Pendulum-v1")["noise"] == ("normal", 0.1)
    assert distill_bench.teacher is zoo.teacher  # bench/distill.py trains and caches through the same table


def test_a_training_killed_mid_way_resumes_from_its_checkpoint(tmp_path):
    """A real SB3 TD3 training (Pendulum, a tiny budget) killed with SIGKILL right after a checkpoint, then run
    again: it resumes there (no step trained twice from the start), ends with the cached zip of the best evaluated
    model and leaves no checkpoint behind. The checkpoint is written at every step here (CHECKPOINT_SECONDS = 0) so
    the kill falls between any two of its files."""
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    code = ("import sys; sys.path.insert(0, 'bench'); import zoo; from pathlib import Path; "
            f"zoo.CACHE = Path({str(cache)!r}); zoo.CHECKPOINT_SECONDS = 0; "
            "zoo.teacher('td3', 'Pendulum-v1', 0, scale=0.6)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(zoo.__file__).parents[1])
    state = cache / "sb3-td3-Pendulum-v1-seed0-scale0.6.ckpt" / "state.json"
    deadline = time.monotonic() + 300
    while not state.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    child.kill()
    assert child.wait() != 0, "the training ended before it could be killed"
    lines = []
    zoo_cache = zoo.CACHE
    try:
        zoo.CACHE = cache
        path = zoo.teacher("td3", "Pendulum-v1", 0, log=lines.append, scale=0.6)
    finally:
        zoo.CACHE = zoo_cache
    resumed = int(lines[0].split("resumed at ")[1].split()[0])
    assert 0 < resumed < 12_000 and "of 12000 steps" in lines[0], lines[0]
    assert lines[-1].startswith("trained sb3-td3-Pendulum-v1-seed0-scale0.6.zip")
    left = sorted(p.name for p in cache.iterdir())  # the zip and the lock file; no checkpoint, no .tmp left
    assert left == [path.with_suffix(".lock").name, path.name], left

    from stable_baselines3 import TD3

    assert 10_000 <= TD3.load(path, device="cpu").num_timesteps <= 12_000  # evaluated past learning_starts


def test_a_second_process_waits_for_the_training_and_reads_its_model(tmp_path, monkeypatch):
    """Two queues sharing a row must not train one model twice (their checkpoints would overwrite each other's):
    while another holds the model's lock, teacher() waits, then returns what the other cached, training nothing."""
    import fcntl
    import threading

    monkeypatch.setattr(zoo, "CACHE", tmp_path)
    path = zoo.cache_path("td3", "Pendulum-v1", 0)
    with open(path.with_suffix(".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        got = []
        waiter = threading.Thread(target=lambda: got.append(zoo.teacher("td3", "Pendulum-v1", 0, log=got.append)))
        waiter.start()
        waiter.join(2.0)
        assert waiter.is_alive() and not got  # waiting, not training
        path.write_bytes(b"the other process's model")
    waiter.join(60)
    assert got == [path] and path.read_bytes() == b"the other process's model"


def test_seeds_are_a_count_or_a_list():
    assert matrix.parse_seeds("5") == [0, 1, 2, 3, 4] and matrix.parse_seeds("3,4") == [3, 4]
    assert matrix.parse_seeds("4,") == [4]  # one seed, not seeds 0-3
    with pytest.raises(SystemExit) as e:
        matrix.main(["--seeds", "x", "--table-only"])
    assert e.value.code == 2


def _unit(algo, env_id, seed, fp32, random, **cols):
    columns = {"fp32": {"return": fp32, "random": random, "return_ours": fp32, "seconds": 1.0, "dropped": [],
                        "vecnormalize": False}}
    for name, value in cols.items():
        columns[name.replace("_", "-")] = value
    return {"algo": algo, "env": env_id, "seed": seed, "columns": columns}


def test_the_table_scores_every_column_and_checks_the_goal():
    held = {"heldout": True}
    units = [_unit("dqn", "CartPole-v1", s, 500.0, 20.0, ptq={"return": 20.0, "seconds": 5.0},
                   rl_finetune={"skipped": "DQN is not actor-critic", "seconds": 0.0},
                   keep={"return": 500.0, "step": "distill", "seconds": 100.0, **held}) for s in range(2)]
    units += [_unit("sac", "Pendulum-v1", 0, -150.0, -1250.0, ptq={"return": -700.0, "seconds": 6.0},
                    rl_finetune={"return": -161.0, "seconds": 50.0},
                    keep={"return": -1000.0, "step": None, "seconds": 200.0, **held})]
    text = matrix.render(units, ["ptq", "rl-finetune", "keep"], {"episodes": 10})
    lines: dict[str, str] = {}
    for line in text.splitlines():  # the returns table (the seconds table comes after it)
        if line.startswith("| SB3"):
            lines.setdefault(line.split(" | ")[0], line)
    dqn = lines["| SB3 DQN CartPole-v1"]
    assert "| 2 | 500.0 ± 0.0 | 20.0 ± 0.0 (0 %) | n/a | distill ×2 | 100.0 % | 100 |" in dqn
    assert "(50 %)" in lines["| SB3 SAC Pendulum-v1"] and "(99 %)" in lines["| SB3 SAC Pendulum-v1"]
    assert "not kept ×1" in text
    assert "1 of 2 rows met; not met: SB3 SAC Pendulum-v1 (22.7 %, 200 s, 1 not kept)" in text
    # a seed not kept (a compile that wrote nothing) misses the goal, whatever the row's mean score
    units.append(_unit("dqn", "CartPole-v1", 2, 500.0, 20.0, ptq={"return": 20.0, "seconds": 5.0},
                       keep={"return": 495.0, "step": None, "seconds": 150.0, **held}))
    text = matrix.render(units, ["ptq", "keep"], {"episodes": 10})
    assert "0 of 2 rows met" in text and "SB3 DQN CartPole-v1 (99.7 %, 150 s, 1 not kept)" in text
    # a --keep pick scored on the episodes it was picked on is not counted (and is marked)
    units[-1]["columns"]["keep"] = {"return": 500.0, "step": "ptq", "seconds": 2.0}
    text = matrix.render(units, ["ptq", "keep"], {"episodes": 10})
    assert "distill ×2, ptq ×1 †" in text and "0 of 1 rows met" in text
    assert "not yet measured held-out: SB3 DQN CartPole-v1" in text
    # asked for three seeds, a row measured on fewer is listed apart, not counted as met or not
    text = matrix.render(units, ["ptq", "keep"], {"episodes": 10, "seeds": 3})
    assert "0 of 0 rows met" in text
    assert "not counted yet, on fewer seeds: SB3 SAC Pendulum-v1 (1 of 3 seeds, 22.7 %, 200 s, 1 not kept)" in text


def _noisy(seed, fp32_returns, keep_returns):
    """A LunarLander-like seed: fp32 and the --keep pick's returns on the same ten held-out episodes."""
    unit = _unit("dqn", "LunarLander-v3", seed, float(np.mean(fp32_returns)), -200.0,
                 keep={"return": float(np.mean(keep_returns)), "returns": keep_returns, "step": "distill",
                       "seconds": 100.0, "heldout": True})
    unit["columns"]["fp32"]["returns"] = fp32_returns
    return unit


def test_a_seed_below_the_target_within_its_noise_is_judged_with_its_row():
    fp32 = [250.0, -50.0] * 5  # a mean of 100 over a random policy's -200: a span of 300
    noise = np.asarray([100.0, -100.0, -100.0, 100.0] * 2 + [100.0, -100.0])
    # seed 0 keeps 92 % of its span on episodes as noisy as LunarLander's; seeds 1-2 102 and 103 %: the row 99 %
    units = [_noisy(s, fp32, list(np.asarray(fp32) + shift + noise)) for s, shift in enumerate([-24.0, 6.0, 9.0])]
    assert matrix.seed_error(units[0], "keep") == pytest.approx(np.std(noise, ddof=1) / np.sqrt(10) / 300)
    text = matrix.render(units, ["keep"], {"episodes": 10})
    assert "| distill ×3 | 99.0 % | 100 |" in text
    assert "1 of 1 rows met" in text and "seeds below 98 % within their noise: SB3 DQN LunarLander-v3 (1)" in text
    # the same shortfall on episodes that do not vary (as CartPole's 500 every time) is beyond any noise
    units.append(_noisy(3, fp32, [x - 24.0 for x in fp32]))
    assert matrix.seed_error(units[-1], "keep") == 0.0
    text = matrix.render(units, ["keep"], {"episodes": 10})
    assert "0 of 1 rows met; not met: SB3 DQN LunarLander-v3 (97.2 %, 100 s, 1 of 2 seeds below 98 % beyond their " \
           "noise)" in text


def test_one_tiny_row_end_to_end(sb3_trained, tmp_path, monkeypatch):
    """A tiny SB3 PPO stands in for the cached model: fp32 through SB3's predict, the plain compile and the PPO
    fine-tune compiled and run for real, cached per column, the report written."""
    monkeypatch.setattr(zoo, "CACHE", tmp_path / "cache")
    model = zoo.cache_path("ppo", "CartPole-v1", 0, scale=0.001)
    model.parent.mkdir()
    shutil.copy(sb3_trained("ppo", "CartPole-v1").path, model)
    argv = ["--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "1", "--scale", "0.001", "--columns",
            "ptq,rl-finetune,keep", "--qat-steps", "256", "--episodes", "2", "--heldout-episodes", "3", "--heldout-max", "6", "--budget", "6", "--runs",
            str(tmp_path / "runs"), "--out", str(tmp_path)]
    assert matrix.main(argv) == 0
    unit = tmp_path / "runs" / "ppo-CartPole-v1-seed0"
    fp32, ptq, rl = (json.loads((unit / f"{c}.json").read_text()) for c in ("fp32", "ptq", "rl-finetune"))
    # --keep decides on episodes of its own; what it wrote is scored on the evaluation's, which it never saw
    keep = json.loads((unit / "keep.json").read_text())
    assert keep["heldout"] == 3 and keep["log"]
    if keep["kept"]:
        assert keep["selection"]["seed"] == matrix.KEEP_SEED != matrix.EVAL_SEED and keep["engine"] == "artifact"
        # 3 held-out episodes, 6 where the score's standard error on 3 was above 2 % (at most 6: --heldout-max)
        n = keep["heldout_episodes"]
        assert len(keep["returns"]) == len(keep["returns_fp32"]) == n and np.isfinite(keep["random"])
        first = fidelity.score_error(keep["returns"][:3], keep["returns_fp32"][:3],
                                     np.mean(keep["returns_fp32"][:3]) - fidelity.random_return("CartPole-v1", 3,
                                                                                                matrix.EVAL_SEED))
        assert n == (3 if first is None or first <= matrix.HELDOUT_ERROR else 6), (n, first)
        assert keep["return"] == pytest.approx(np.mean(keep["returns"]))
        assert keep["returns_fp32"][:2] == pytest.approx(fp32["returns"])  # the fp32 column's first episodes
        assert 0 <= keep["bench_cpu_seconds"] and keep["cpu_seconds"] >= 0
    else:
        assert keep["step"] is None and keep["return_on"] == "selection"
    assert fp32["return"] == pytest.approx(fp32["return_ours"])  # SB3's predict = our reading of the model
    assert len(fp32["returns"]) == 2 and np.isfinite(fp32["random"])
    assert 0 <= ptq["agreement"] <= 1 and ptq["return"] > 0 and rl["steps"] >= 256
    # every cell names the commit it was measured with (the checkout's HEAD; "unknown" only outside git)
    assert ptq["code"] == rl["code"] == fp32["code"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():
        assert ptq["code"].split("-")[0] != "unknown"
    report = (tmp_path / "policy_matrix.md").read_text()
    assert (tmp_path / "policy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # and the picture of it
    assert "| SB3 PPO CartPole-v1 | 1 |" in report and "budgets × 0.001" in report
    assert json.loads((tmp_path / "policy_matrix.json").read_text())["units"][0]["columns"]["ptq"] == ptq
    (unit / "ptq.json").write_text(json.dumps({**ptq, "return": 123.0}))  # cached: a second run measures nothing
    assert matrix.main(argv) == 0
    assert "123.0 ± 0.0" in (tmp_path / "policy_matrix.md").read_text()
    # cells of another model (its cache lost and trained again into something else) are not mixed with this one's
    assert len(fp32["teacher"]) == 64
    (unit / "fp32.json").write_text(json.dumps({**fp32, "teacher": "0" * 64}))
    (unit / "ptq.json").unlink()
    assert matrix.main(argv) == 0
    assert not (unit / "ptq.json").exists()
    # an older cell without the digest is adopted when the fp32 return of the same episodes matches
    older = {k: v for k, v in fp32.items() if k != "teacher"}
    (unit / "fp32.json").write_text(json.dumps(older))
    assert matrix.main(argv) == 0
    assert json.loads((unit / "fp32.json").read_text())["teacher"] == fp32["teacher"]
    assert json.loads((unit / "ptq.json").read_text())["return"] == ptq["return"]  # measured again, same model


def test_stale_cells_name_the_two_models():
    assert matrix.stale_cells({"teacher": "a" * 64}, "a" * 64, 1.0) is None
    assert "aaaaaaaaaaaa" in matrix.stale_cells({"teacher": "a" * 64}, "b" * 64, 1.0)
    assert matrix.stale_cells({"return_ours": 500.0}, "b" * 64, 500.0) is None
    assert "was 500.0, now 9.5" in matrix.stale_cells({"return_ours": 500.0}, "b" * 64, 9.5)


def test_teacher_noise_measures_copies_of_the_teacher_and_the_pick(sb3_trained, tmp_path, monkeypatch):
    """bench/teacher_noise.py on a tiny SB3 PPO: a copy perturbed by 0 is the teacher (every action, every episode,
    a score of 100 % with no error), the matrix's --keep pick (here a real ternary artifact) is measured the same
    way on the first row, and the table is written whole."""
    from bitrl_compile.pipeline import compile_policy

    monkeypatch.setattr(zoo, "CACHE", tmp_path / "cache")
    model = zoo.cache_path("ppo", "CartPole-v1", 0, scale=0.001)
    model.parent.mkdir()
    shutil.copy(sb3_trained("ppo", "CartPole-v1").path, model)
    noise = load_script("bench/teacher_noise.py", "bench_teacher_noise")
    cell = noise.policy_matrix.unit_dir(tmp_path / "runs", "ppo", "CartPole-v1", 0)
    cell.mkdir(parents=True)
    compile_policy(noise.policy_matrix.load_teacher("ppo", "CartPole-v1", model), "host", cell / "keep.bitrl")
    out = tmp_path / "noise.md"
    assert noise.main(["--algo", "ppo", "--env", "CartPole-v1", "--seed", "0", "--scale", "0.001", "--episodes",
                       "3", "--sigmas", "0,0.05", "--draws", "1", "--runs", str(tmp_path / "runs"),
                       "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "policy" not in line]
    assert len(rows) == 3 and rows[0].startswith("| --keep pick (?, ?) |")
    assert rows[1] == "| fp32, weights × (1 + 0 N(0,1)), draw 0 | 100.00 % | 100.00 % | 100.0 ± 0.0 % | 100 % |"
    assert "weights × (1 + 0.05 N(0,1))" in rows[2]
