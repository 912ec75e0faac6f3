"""bench/bitnet_rl.py's results file: a run of one env keeps the rows other runs measured (each with its command),
and the table renders them in BitRL's order with one "Reproduce" line per run."""

from __future__ import annotations

import json

from repo_scripts import load_script

bitnet_rl = load_script("bench/bitnet_rl.py", "bench_bitnet_rl")


def _row(returns: float, command: str | None = None) -> dict:
    row = {kind: {0: [returns], 1: [returns + 2]} for kind in ("fp32", "heads", "compiled", "control")}
    row.update(steps=1000, params=100, pretrain_seconds=10.0, seconds={"fp32": 1.0, "heads": 2.0},
               compiled_info={"artifact_bytes": 1, "max_feature_diff": 0.0, "rows_within_1e-4": 1.0})
    if command:
        row["meta"] = {"command": command, "commit": "abc", "machine": "m", "minutes": 1.0, "jobs": 1,
                       "seeds": [0, 1], "episodes": 10}
    return row


def test_a_run_of_one_env_keeps_the_others_and_each_row_names_its_run(tmp_path):
    old_meta = {"command": "python bench/bitnet_rl.py --envs CartPole-v1 Acrobot-v1", "commit": "old",
                "machine": "m", "minutes": 5.0, "jobs": 1, "seeds": [0, 1], "episodes": 10}
    path = tmp_path / "bitnet_rl.json"  # the older layout: one top-level meta for every env
    old = {"CartPole-v1": _row(500.0), "Acrobot-v1": _row(-80.0)}
    path.write_text(json.dumps({"meta": old_meta, "results": old}))
    results = bitnet_rl.merged(path, {
        "MountainCar-v0": _row(-98.0, "python bench/bitnet_rl.py --envs MountainCar-v0"),
        "CartPole-v1": _row(450.0, "python bench/bitnet_rl.py --envs CartPole-v1")})
    assert results["Acrobot-v1"]["meta"] == old_meta  # kept, with the run that measured it
    assert results["CartPole-v1"]["fp32"][0] == [450.0]  # this run's row replaces the older one
    text = bitnet_rl.render(results)
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "-v" in line]
    assert rows == ["| CartPole-v1", "| Acrobot-v1", "| MountainCar-v0"]  # BitRL's order
    assert "| MountainCar-v0 | -108 | -97.0 ± 1.0 (-98, -96)" in text
    reproduce = [line for line in text.splitlines() if line.startswith("Reproduce:")]
    assert [r.split("`")[1] for r in reproduce] == ["python bench/bitnet_rl.py --envs CartPole-v1",
                                                    "python bench/bitnet_rl.py --envs CartPole-v1 Acrobot-v1",
                                                    "python bench/bitnet_rl.py --envs MountainCar-v0"]
    assert bitnet_rl.merged(tmp_path / "none.json", {"x": 1}) == {"x": 1}
