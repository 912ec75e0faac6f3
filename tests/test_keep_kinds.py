"""--keep --keep-rule plain on issue 17's other kinds: an SB3 MultiInputPolicy (Dict observations, vector keys) and
an sb3-contrib RecurrentPPO (LSTM), each trained here until it decides most states (4096 steps), recovered by
`recovery.keep` (what `bitrl-compile MODEL --env ID --keep 0.99 --keep-rule plain` runs) and checked against SB3's
own deterministic predict: the artifact takes SB3's action on at least 99 % of the observations SB3's policy visits
(every observation counting one, near-ties too). Distillation is bounded by rounds, not
seconds (budget_s inf: the learning rate decays by rounds alone), so the result does not depend on the machine's
speed, and runs every round (agreement 1.0): stopping at the held-out target (99.5 %) leaves students that keep
98.2-98.9 % of the LSTM's actions on SB3's own episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bitrl_compile import pipeline
from bitrl_compile.envs import DICT_CARTPOLE
from bitrl_compile.frontends import load_policy
from bitrl_compile.runtime import load
from bitrl_compile.trainers import distill, recovery

torch.set_num_threads(1)
VISITED = 1000


def keep(path, env_id: str, out, **distill_kw):
    """recovery.keep(..., 0.99, rule="plain") compiling for the host into `out`: (attempts, log lines)."""
    lines: list[str] = []

    def compile_fn(policy, int8_layers, measure):
        return pipeline.compile_policy(policy, "host", out, int8_layers=int8_layers, measure=measure)

    _, attempts = recovery.keep(load_policy(path), env_id, 0.99, compile_fn, rule="plain", log=lines.append,
                                distill_args=distill.DistillArgs(budget_s=math.inf, **distill_kw))  # rounds decide
    return attempts, lines


def sb3_visits(model, env_id: str, steps: int = VISITED, seed: int = 123, recurrent: bool = False):
    """SB3's deterministic predict along its own episodes (reset seeds seed, seed + 1, ...; a recurrent model's
    state carried): the observations, where each episode starts, SB3's actions."""
    import gymnasium as gym

    env = gym.make(env_id)
    obs, starts, actions = [], [], []
    o, _ = env.reset(seed=seed)
    state, start = None, True
    while len(obs) < steps:
        if recurrent:
            a, state = model.predict(o, state=state, episode_start=np.array([start]), deterministic=True)
        else:
            a, _ = model.predict(o, deterministic=True)
        obs.append(o)
        starts.append(start)
        actions.append(int(a))
        o, _, terminated, truncated, _ = env.step(int(a))
        start = terminated or truncated
        if start:
            o, _ = env.reset(seed=seed + int(np.sum(starts)))
    return obs, np.asarray(starts), np.asarray(actions)


def test_keep_plain_recovers_a_dict_policy_to_sb3s_actions(tmp_path):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    model = PPO("MultiInputPolicy", make_vec_env(DICT_CARTPOLE, 4, seed=0), seed=0, n_steps=64, batch_size=64,
                n_epochs=4, learning_rate=1e-3, policy_kwargs={"net_arch": [64, 64]})
    model.learn(4096)
    model.save(tmp_path / "dict.zip")
    out = tmp_path / "dict.bitrl"
    attempts, lines = keep(tmp_path / "dict.zip", DICT_CARTPOLE, out, max_rounds=6, agreement=1.0)
    assert [a.step for a in attempts] == ["ptq", "distill"] and attempts[-1].kept, lines  # all ternary
    assert attempts[0].share < 0.9, lines  # ptq loses it
    obs, _, actions = sb3_visits(model, DICT_CARTPOLE)
    batch = {key: np.stack([o[key] for o in obs]) for key in ("position", "velocity")}
    with load(out) as policy:
        assert policy.manifest["input"]["kind"] == "dict" and policy.manifest["recovery"] == "distill"
        agreement = float(np.mean(policy.act(batch) == actions))
    print(f"Dict PPO: SB3 predict agreement on {len(actions)} visited observations: PTQ "
          f"{100 * attempts[0].record['agreement']:.1f} % (fidelity states), --keep 0.99 --keep-rule plain "
          f"{100 * agreement:.1f} %")
    assert agreement >= 0.99


def test_keep_plain_recovers_a_recurrent_policy_to_sb3s_actions(tmp_path):
    pytest.importorskip("sb3_contrib")
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    model = RecurrentPPO("MlpLstmPolicy", make_vec_env("CartPole-v1", 4, seed=0), seed=0, n_steps=128,
                         batch_size=128, n_epochs=4, learning_rate=3e-3,
                         policy_kwargs={"lstm_hidden_size": 16, "n_lstm_layers": 2, "net_arch": [16]})
    model.learn(4096)
    model.save(tmp_path / "rppo.zip")
    out = tmp_path / "rppo.bitrl"
    attempts, lines = keep(tmp_path / "rppo.zip", "CartPole-v1", out, max_rounds=10, updates_per_round=30,
                           agreement=1.0)
    # one distillation through time, the first LSTM layer's input weights (4 observations in) int8
    assert [a.step for a in attempts] == ["ptq", "distill + int8 layers [0]"] and attempts[-1].kept, lines
    assert "(numpy reference; not compiled)" in lines[0] and attempts[0].share < 0.9, lines  # ptq loses it
    obs, starts, actions = sb3_visits(model, "CartPole-v1", recurrent=True)
    with load(out) as policy:
        state, taken = None, []
        for o, start in zip(obs, starts):  # the artifact's own state along SB3's episodes
            out, state = policy.forward(np.asarray(o, np.float32)[None], state, np.array([float(start)], np.float32))
            taken.append(int(np.argmax(out[0])))
    agreement = float(np.mean(np.asarray(taken) == actions))
    print(f"RecurrentPPO: SB3 predict agreement on {len(actions)} visited observations: PTQ "
          f"{100 * attempts[0].record['agreement']:.1f} % (fidelity states), --keep 0.99 --keep-rule plain "
          f"{100 * agreement:.1f} %")
    # kept: >= 99 % plain on keep's own measure (the states of 3 episodes of the original); on SB3's 1000 here too.
    # Measured on SB3's first 1000 (and 4000) visited states, teachers of seeds 0, 1, 2 (trainers/recovery.py):
    # every layer ternary 99.2, 99.4, 99.2 % (99.2, 99.1, 99.0 %) after 7 rounds, misses near-ties under a tenth of
    # the teacher's median logit gap; with layer 0 int8 after 10 rounds 99.3, 99.9, 99.5 % (99.5, 99.8, 99.4 %)
    assert agreement >= 0.99
