"""bench/cleanrl_zoo.py: CleanRL-style agents trained (tiny budgets, real gymnasium envs) and saved as CleanRL
saves them are read by our frontend as the user's CleanRL files they stand for."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from bitrl_compile.evaluate import evaluate
from bitrl_compile.frontends import load_policy
from repo_scripts import load_script

cleanrl_zoo = load_script("bench/cleanrl_zoo.py", "cleanrl_zoo")
SCALE = 0.005  # dqn: 2500 steps, learning from step 50; ppo: 4 updates of 4 x 128 steps
KEYS = {"cleanrl-dqn": ["network.0", "network.2", "network.4"],  # dqn.py saves the Q-net, ppo.py the Agent
        "cleanrl-ppo": ["critic.0", "critic.2", "critic.4", "actor.0", "actor.2", "actor.4"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cleanrl-cache")
    lines = []
    paths = {algo: cleanrl_zoo.teacher(algo, "CartPole-v1", 0, log=lines.append, scale=SCALE, cache=cache)
             for algo in cleanrl_zoo.ALGOS}
    return cache, paths, lines


def test_agents_are_cached_under_cleanrl_names_and_written_whole(trained):
    cache, paths, lines = trained
    names = sorted(p.name for p in cache.iterdir())  # no temp file left beside them
    assert names == [f"{a}-CartPole-v1-seed0-x0.005.cleanrl_model" for a in ("cleanrl-dqn", "cleanrl-ppo")]
    done = [x for x in lines if x.startswith("trained ")]
    assert [x.split(" in ")[0] for x in done] == [f"trained {p.name}" for p in paths.values()]
    assert lines[-1] == done[-1] and any("episodic return" in x for x in lines)  # progress, then the last
    logged = len(lines)
    found = cleanrl_zoo.teacher("cleanrl-dqn", "CartPole-v1", 0, log=lines.append, scale=SCALE, cache=cache)
    assert found == paths["cleanrl-dqn"] and len(lines) == logged  # found, not retrained


@pytest.mark.parametrize("algo", ["cleanrl-dqn", "cleanrl-ppo"])
def test_the_file_is_a_plain_state_dict_of_cleanrls_keys(trained, algo):
    sd = torch.load(trained[1][algo], weights_only=True)
    assert sorted(sd) == sorted(f"{k}.{p}" for k in KEYS[algo] for p in ("weight", "bias"))
    assert sd[f"{KEYS[algo][-1]}.weight"].shape[0] == 2 and sd[f"{KEYS[algo][0]}.weight"].shape[1] == 4


@pytest.mark.parametrize("algo", ["cleanrl-dqn", "cleanrl-ppo"])
def test_our_frontend_reads_it_as_a_cleanrl_agent_with_the_trainers_outputs(trained, algo):
    path = trained[1][algo]
    loaded = load_policy(path, config=cleanrl_zoo.config(algo, "CartPole-v1"))
    assert loaded.source == algo and loaded.output["n"] == 2
    assert loaded.output["outputs"] == ("q_values" if algo == "cleanrl-dqn" else "logits")
    space = gym.make("CartPole-v1").observation_space
    space.seed(1)
    obs = torch.as_tensor(np.stack([space.sample() for _ in range(64)]).clip(-5, 5))
    head = cleanrl_zoo.policy_head(algo, cleanrl_zoo.load_network(path, algo, "CartPole-v1"))
    with torch.no_grad():
        ours, theirs = loaded.module(obs).numpy(), head(obs).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert np.ptp(theirs) > 0  # not a constant network

    def act(o):
        with torch.no_grad():
            return int(loaded.module(torch.as_tensor(o)[None]).argmax(1))

    returns = cleanrl_zoo.fp32_returns(path, algo, "CartPole-v1", 2, 10_000)
    assert returns == evaluate(act, "CartPole-v1", 2, 10_000)[0] and all(r >= 1 for r in returns)


def test_a_seed_repeats_its_run_and_another_seed_does_not(trained, tmp_path):
    again, other = (cleanrl_zoo.teacher("cleanrl-ppo", "CartPole-v1", seed, log=lambda s: None, scale=SCALE,
                                        cache=tmp_path) for seed in (0, 1))
    a, b, c = (torch.load(p, weights_only=True) for p in (trained[1]["cleanrl-ppo"], again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["actor.4.weight"], c["actor.4.weight"])


def test_settings_are_cleanrls_defaults_and_scale_shrinks_the_budget():
    d, p = cleanrl_zoo.settings("cleanrl-dqn"), cleanrl_zoo.settings("cleanrl-ppo")
    assert (d.total_timesteps, d.learning_rate, d.buffer_size, d.target_network_frequency, d.batch_size,
            d.end_e, d.exploration_fraction, d.learning_starts, d.train_frequency) == \
        (500_000, 2.5e-4, 10_000, 500, 128, 0.05, 0.5, 10_000, 10)
    assert (p.total_timesteps, p.num_envs, p.num_steps, p.num_minibatches, p.update_epochs, p.ent_coef) == \
        (500_000, 4, 128, 4, 4, 0.01)
    small = cleanrl_zoo.settings("cleanrl-dqn", scale=0.1)
    assert (small.total_timesteps, small.learning_starts, small.exploration_fraction) == (50_000, 1000, 0.5)
    with pytest.raises(ValueError, match="unknown algo 'dqn'; use one of cleanrl-dqn, cleanrl-ppo"):
        cleanrl_zoo.teacher("dqn", "CartPole-v1", 0)
