"""Recurrent policies (issue 17): sb3-contrib RecurrentPPO's LSTM actor with its state explicit,
`state = policy.initial_state(batch)`, `action, state = policy.act(obs, state, episode_start)`: the LSTM's matmuls
ternary (BitLinear), the gates in float. A RecurrentPPO trained here on CartPole, real gymnasium episodes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from capi_lib import open_libbitrl
from sealing import sealed

pytest.importorskip("sb3_contrib")


@pytest.fixture(scope="module")
def recurrent_ppo(tmp_path_factory):
    """(the SB3 model, its zip): 2 LSTM layers of 16 units, a 16-unit MLP, 256 steps of CartPole."""
    import torch
    from sb3_contrib import RecurrentPPO

    torch.set_num_threads(1)
    model = RecurrentPPO("MlpLstmPolicy", "CartPole-v1", n_steps=64, batch_size=64, seed=0,
                         policy_kwargs={"lstm_hidden_size": 16, "n_lstm_layers": 2, "net_arch": [16]})
    model.learn(256)
    path = tmp_path_factory.mktemp("recurrent") / "rppo.zip"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def compiled(recurrent_ppo, tmp_path_factory):
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy

    loaded = load_policy(recurrent_ppo[1])
    return compile_policy(loaded, "host", tmp_path_factory.mktemp("recurrent-out") / "rppo.bitrl")


def _episodes(steps: int, seed: int = 1):
    """CartPole observations and episode starts of a policy acting at random (the states it would see)."""
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    space = env.action_space
    space.seed(seed)
    start = True
    for _ in range(steps):
        yield obs, start
        obs, _, terminated, truncated, _ = env.step(space.sample())
        start = terminated or truncated
        if start:
            obs, _ = env.reset()


def test_the_loaded_module_is_sb3_contribs_actor(recurrent_ppo):
    """The torch module the frontend builds (two Linear layers per LSTM layer) acts as SB3's predict, state by
    state, over episodes with resets."""
    import torch

    from bitrl_compile.frontends import load_policy
    from bitrl_compile.trainers import distill

    model, path = recurrent_ppo
    loaded = load_policy(path)
    with pytest.raises(ValueError, match="distillation of a recurrent .LSTM. policy is not supported yet"):
        distill.check_distillable(loaded, "CartPole-v1")  # --keep and finetune say so in one line
    assert loaded.source == "sb3-recurrent-ppo" and loaded.input["recurrent"] == {"layers": 2, "hidden": 16,
                                                                                 "state_size": 64}
    assert "LSTM 2x16" in loaded.description
    sb3_state, ours = None, torch.zeros(1, 64)
    for obs, start in _episodes(300):
        action, sb3_state = model.predict(obs, state=sb3_state, episode_start=np.array([start]), deterministic=True)
        with torch.no_grad():
            out, ours = loaded.module(torch.from_numpy(obs[None]), ours, torch.tensor([float(start)]))
        assert int(out.argmax(1)[0]) == int(action)
        h, c = sb3_state  # [layers, 1, hidden] each
        np.testing.assert_allclose(ours.numpy()[0], np.concatenate([h[:, 0].ravel(), c[:, 0].ravel()]), atol=1e-5)


def test_the_artifact_steps_as_the_reference_does(compiled):
    """Step by step over episodes, the artifact's action and next state against the numpy reference of the
    quantized module given the same state (float gates: TVM's sigmoid/tanh against numpy's, within the check's
    tolerance); a batch of rows steps as the rows do one by one."""
    from bitrl_compile import reference
    from bitrl_compile.runtime import load

    with load(compiled.path) as policy:
        assert policy.state_size == 64 and policy.initial_state().shape == (64,)
        assert policy.initial_state(3).shape == (3, 64) and not policy.initial_state(3).any()
        state = policy.initial_state()
        rows = []
        for obs, start in _episodes(120):
            action, nxt = policy.act(obs, state, start)
            out, ref_state = reference.run(compiled.quantized, obs[None].astype(np.float32), state[None],
                                           np.array([float(start)], np.float32))
            assert int(action) == int(np.argmax(out)), "the action is the argmax of the reference's logits"
            np.testing.assert_allclose(nxt, ref_state[0], atol=1e-4)
            logits, again = policy.forward(obs, state, start)
            np.testing.assert_array_equal(again, nxt)
            np.testing.assert_allclose(logits, out[0], atol=1e-3)
            rows.append((obs, state, start))
            state = nxt
        obs, states, starts = (np.stack(x) for x in zip(*rows))
        actions, nxt = policy.act(obs, states, starts)
        singles = [policy.act(o, s, e) for o, s, e in rows]
        np.testing.assert_array_equal(actions, [a for a, _ in singles])
        np.testing.assert_allclose(nxt, np.stack([s for _, s in singles]), atol=1e-6)
        # episode_start resets: any state with start=1 steps as the initial state does
        reset, _ = policy.forward(obs[0], np.full(64, 0.7, np.float32), True)
        np.testing.assert_array_equal(reset, policy.forward(obs[0], None, True)[0])


def test_int8_lstm_layers_compile_and_step_as_the_reference_does(recurrent_ppo, tmp_path):
    """The first LSTM layer in int8 (mixed precision: both its matmuls, whose outputs meet in the gates' add) compiles
    (it failed in TVM's FuseTIR, "Inconsistent buffers y and lv8", the int8 kernel fused with the add) and steps as
    the numpy reference does; every kernel of ours, the generic ternary one too, is its own call in the plans."""
    from bitrl_compile import pipeline, reference, targets
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.runtime import load

    loaded = load_policy(recurrent_ppo[1])
    mixed = pipeline.compile_policy(loaded, "host", tmp_path / "int8.bitrl", int8_layers=(0, 1))
    assert [layer["precision"] for layer in mixed.manifest["layers"]] == ["int8"] * 2 + ["ternary"] * 4
    with load(mixed.path) as policy:
        state = policy.initial_state()
        for obs, start in _episodes(80, seed=2):
            logits, nxt = policy.forward(obs, state, start)
            out, ref_state = reference.run(mixed.quantized, obs[None].astype(np.float32), state[None],
                                           np.array([float(start)], np.float32))
            np.testing.assert_allclose(logits, out[0], atol=1e-3)
            np.testing.assert_allclose(nxt, ref_state[0], atol=1e-4)
            assert int(policy.act(obs, state, start)[0]) == int(np.argmax(logits))
            state = nxt
    generic = targets.kernel_spec(None)  # no tensor intrinsic: a kernel TVM would otherwise fuse with the add
    with pytest.warns(UserWarning, match="no tensorized BitLinear kernel"):
        _, lowered, _ = pipeline.run_passes(pipeline.to_relax(loaded), targets.tvm_target(targets.get_target("host")),
                                            generic, specs=(loaded.input, loaded.output), int8_layers=(0,))
    calls = [c["func"] for c in pipeline.entry_plans(lowered, lambda s: None)["act"]["calls"]]
    assert sum(f.startswith(("bitrl_bitlinear_", "bitrl_int8linear_")) for f in calls) == 6, calls


def test_bad_states_are_one_line(compiled, sb3_ppo_cartpole, tmp_path):
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy
    from bitrl_compile.runtime import load

    obs = np.zeros(4, np.float32)
    with load(compiled.path) as policy:
        for state, start, words in [(np.zeros(63, np.float32), 0, "state has shape (63,)"),
                                    (np.zeros((2, 64), np.float32), 0, "this step takes float (64,)"),
                                    (np.full(64, np.nan, np.float32), 0, "state contains NaN"),
                                    (None, [0, 1], "episode_start has shape (2,)")]:
            with pytest.raises(ValueError, match=re.escape(words)) as e:
                policy.act(obs, state, start)
            assert "\n" not in str(e.value)
    plain = compile_policy(load_policy(sb3_ppo_cartpole), "host", tmp_path / "plain.bitrl").path
    with load(plain) as policy:
        with pytest.raises(ValueError, match="not a recurrent policy: it takes no state"):
            policy.act(obs, False)  # deterministic given positionally: refused, not taken for a state
        with pytest.raises(ValueError, match="not a recurrent policy"):
            policy.initial_state()


def test_readers_refuse_a_state_that_does_not_match(compiled, tmp_path):
    from bitrl_compile.runtime import ArtifactError, load

    def size(m):
        m["input"]["recurrent"]["state_size"] = 66

    def no_state(m):
        del m["input"]["recurrent"]

    def plan(m):
        m["input"]["recurrent"] = {"layers": 1, "hidden": 16, "state_size": 32}  # the plans carry 64

    for edit, words in [(size, "recurrent state_size is 66, not 2 x 2 layers x 16"),
                        (no_state, r"entry_points.\w+ takes 3 inputs, not 1"),
                        (plan, "entry_points.+ does not take .obs, state, episode_start. and return .result, state. with the 32")]:
        with pytest.raises(ArtifactError, match=words):
            load(sealed(compiled.path, tmp_path / f"{edit.__name__}.bitrl", edit))


def test_compile_measures_and_run_plays_a_recurrent_policy(recurrent_ppo, tmp_path):
    """compile --env measures the ternary LSTM against the original along the original's episodes, each policy
    carrying its own state (reset where an episode starts); `run --env` plays it."""
    import json
    import zipfile

    from click.testing import CliRunner

    from bitrl_compile import fidelity
    from bitrl_compile.cli import main
    from bitrl_compile.frontends import load_policy

    model, path = recurrent_ppo
    out = tmp_path / "rppo.bitrl"
    r = CliRunner().invoke(main, [str(path), "--env", "CartPole-v1", "--episodes", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(out) as z:
        record = json.loads(z.read("manifest.json"))["fidelity"]
    assert record["states"] >= 2 and 0 <= record["agreement"] <= 1 and record["episodes"] == 2
    assert "return" in record and "action agreement" in r.stdout
    # the measure's fp32 side, stepped in order with resets, is sb3-contrib's own predict on those states
    loaded = load_policy(path)
    fp32 = fidelity.original_forward(loaded)
    states, starts = fidelity.visited(fp32, loaded.output, "CartPole-v1")
    assert starts[0] and starts.sum() == fidelity.ROLLOUTS and len(states) == record["states"]
    outs = fidelity.in_order(fp32, states, starts)
    sb3_state, sb3 = None, []
    for obs, start in zip(states, starts):
        action, sb3_state = model.predict(obs, state=sb3_state, episode_start=np.array([start]), deterministic=True)
        sb3.append(int(action))
    np.testing.assert_array_equal(outs.argmax(1), sb3)
    r = CliRunner().invoke(main, ["run", str(out), "--env", "CartPole-v1", "--episodes", "2"])
    assert r.exit_code == 0 and "mean return" in r.output, r.output


def test_the_c_api_steps_as_python_does(compiled, tmp_path):
    """bitrl_act_recurrent / bitrl_forward_recurrent give the Python runtime's actions, outputs and states step by
    step (next_state written over state, as a control loop would); the one-state calls refuse a recurrent policy,
    and the C reader refuses the manifests the Python reader refuses."""
    from bitrl_compile.runtime import ArtifactError, load

    lib = open_libbitrl()
    handle = lib.bitrl_load(str(compiled.path).encode())
    assert handle, lib.bitrl_last_error()
    try:
        assert lib.bitrl_state_size(handle) == 64
        steps = list(_episodes(60, seed=3))
        c_state = np.zeros((2, 64), np.float32)  # two environments: the same episode, the second one step behind
        with load(compiled.path) as policy:
            py_state = policy.initial_state(2)
            for (obs_a, start_a), (obs_b, start_b) in zip(steps[1:], steps[:-1]):
                obs = np.ascontiguousarray(np.stack([obs_a, obs_b]), np.float32)
                start = np.array([start_a, start_b], np.float32)
                actions = np.full(2, -1, np.int64)
                assert lib.bitrl_act_recurrent(handle, obs.ctypes.data, c_state.ctypes.data, start.ctypes.data, 2,
                                               actions.ctypes.data, c_state.ctypes.data) == 0, lib.bitrl_last_error()
                py_actions, py_state = policy.act(obs, py_state, start)
                np.testing.assert_array_equal(actions, py_actions)
                np.testing.assert_array_equal(c_state, py_state)
            out, nxt = np.zeros((2, 2), np.float32), np.zeros((2, 64), np.float32)
            assert lib.bitrl_forward_recurrent(handle, obs.ctypes.data, c_state.ctypes.data, start.ctypes.data, 2,
                                               out.ctypes.data, nxt.ctypes.data) == 0, lib.bitrl_last_error()
            want_out, want_state = policy.forward(obs, py_state, start)
            np.testing.assert_array_equal(out, want_out)
            np.testing.assert_array_equal(nxt, want_state)
        assert lib.bitrl_act(handle, obs.ctypes.data, 2, actions.ctypes.data) == -1
        assert "is a recurrent policy" in lib.bitrl_last_error().decode()
        assert lib.bitrl_act_recurrent(handle, obs.ctypes.data, None, start.ctypes.data, 2, actions.ctypes.data,
                                       nxt.ctypes.data) == -1
        assert "state is NULL" in lib.bitrl_last_error().decode()
    finally:
        lib.bitrl_free(handle)

    def size(m):
        m["input"]["recurrent"]["state_size"] = 66

    def smaller(m):
        m["input"]["recurrent"] = {"layers": 1, "hidden": 16, "state_size": 32}

    def no_state(m):
        del m["input"]["recurrent"]

    def extra_input(m):  # a plan input no caller passes: the C API would read past its arrays
        m["entry_points"]["act"]["inputs"].append(dict(m["entry_points"]["act"]["inputs"][2]))

    with pytest.raises(ArtifactError, match="entry_points.act takes 4 inputs, not 3"):
        load(sealed(compiled.path, tmp_path / "py-extra.bitrl", extra_input))
    for edit, words in [(extra_input, "entry_points.act takes 4 inputs, not 3"),
                        (size, "input.recurrent.state_size is not 2 x layers x hidden"),
                        (smaller, "does not take (obs, state, episode_start)"),
                        (no_state, "takes 3 inputs, not 1")]:
        bad = sealed(compiled.path, tmp_path / f"c-{edit.__name__}.bitrl", edit)
        assert not lib.bitrl_load(str(bad).encode())
        assert words in lib.bitrl_last_error().decode(), lib.bitrl_last_error()


def test_the_rasp4_artifact_steps_under_qemu(recurrent_ppo, compiled, tmp_path):
    """Cross-compiled for the Pi 4 and run under qemu (cortex-a72): step by step over episodes, its actions and
    next states against the host artifact's given the same state (float gates: within the check's tolerance),
    through the emulator's protocol (state and episode starts travel with the observation)."""
    from bitrl_compile.devices import EmulatedPolicy
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy
    from bitrl_compile.runtime import load

    rasp4 = compile_policy(load_policy(recurrent_ppo[1]), "rasp4", tmp_path / "rppo-rasp4.bitrl")
    steps = list(_episodes(40, seed=4))
    obs = np.stack([o for o, _ in steps]).astype(np.float32)
    starts = np.array([s for _, s in steps], np.float32)
    with EmulatedPolicy(rasp4.path, cpu="cortex-a72") as emulated, load(compiled.path) as host:
        assert emulated.initial_state(2).shape == (2, 64)
        state = emulated.initial_state()
        for o, start in zip(obs, starts):
            action, nxt = emulated.act(o, state, start)
            host_action, host_next = host.act(o, state, start)
            assert int(action) == int(host_action)
            np.testing.assert_allclose(nxt, host_next, atol=1e-4)
            state = nxt
        states = np.random.default_rng(0).standard_normal((len(obs), 64)).astype(np.float32) * 0.5
        out, nxt = emulated.forward(obs, states, starts)  # a batch, in one message
        want_out, want_next = host.forward(obs, states, starts)
        np.testing.assert_allclose(out, want_out, atol=1e-3)
        np.testing.assert_allclose(nxt, want_next, atol=1e-4)
        with pytest.raises(ValueError, match="state has shape"):
            emulated.act(obs[0], np.zeros(3, np.float32), 0)


@pytest.fixture(scope="module")
def lossy_recurrent_ppo(tmp_path_factory):
    """A RecurrentPPO a little further trained (2048 steps, ~5 s) than `recurrent_ppo`, whose plain ternary compile
    loses agreement (~45 % weighted on its episodes; the tiny one's keeps 100 %)."""
    import torch
    from sb3_contrib import RecurrentPPO

    torch.set_num_threads(1)
    model = RecurrentPPO("MlpLstmPolicy", "CartPole-v1", n_steps=128, batch_size=128, n_epochs=2, learning_rate=3e-3,
                         seed=0, policy_kwargs={"lstm_hidden_size": 16, "n_lstm_layers": 2, "net_arch": [16]})
    model.learn(2048)
    path = tmp_path_factory.mktemp("recurrent-lossy") / "rppo.zip"
    model.save(path)
    return model, path


def test_keep_distils_a_recurrent_policy_through_time(lossy_recurrent_ppo, tmp_path):
    """--keep on a RecurrentPPO whose ptq loses: the student (every Linear the compiler's BitLinear but the
    top-ranked layer, int8; trained through time on DAgger episodes) compiles to an artifact whose agreement along the original's episodes (the
    manifest's fidelity record) is above ptq's and keeps the target; the student's ternary forward is the numpy
    reference of its compiled artifact, step by step along an episode, each with its own state."""
    import dataclasses
    import json
    import zipfile

    import torch

    from bitrl_compile import fidelity, reference
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy
    from bitrl_compile.trainers import distill_recurrent, recovery
    from bitrl_compile.trainers.distill import DistillArgs, _ternary

    loaded = load_policy(lossy_recurrent_ppo[1])
    out, given, lines = tmp_path / "kept.bitrl", [], []

    def compile_fn(policy, int8_layers, measure):
        given.append(policy)
        return compile_policy(policy, "host", out, int8_layers=int8_layers, measure=measure)

    result, attempts = recovery.keep(loaded, "CartPole-v1", 0.98, compile_fn, log=lines.append,
                                     distill_args=DistillArgs(budget_s=25, updates_per_round=60))
    int8 = attempts[-1].int8_layers  # the top-ranked layer, int8 in training and in the artifact
    assert [a.step for a in attempts] == ["ptq", f"distill + int8 layers {list(int8)}"] and attempts[-1].kept, lines
    assert len(int8) == 1 and any(f"with layer {int8[0]} int8" in line for line in lines), lines
    with zipfile.ZipFile(out) as z:
        record = json.loads(z.read("manifest.json"))["fidelity"]
    assert fidelity.shared(record) >= 0.98 > fidelity.shared(attempts[0].record), (record, attempts[0].record)
    assert record["states"] == attempts[0].record["states"] and given[-1].recovery == "distill"

    student = given[-1].module
    state, ref_state = student.initial_state(1), np.zeros((1, 64), np.float32)
    for obs, start in _episodes(150, seed=5):
        x = obs[None].astype(np.float32)
        with torch.no_grad(), _ternary(student, False, int8):
            ours, state = student(torch.from_numpy(x), state, torch.tensor([float(start)]))
        ref, ref_state = reference.run(result.quantized, x, ref_state, np.array([float(start)], np.float32))
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
        np.testing.assert_allclose(state.numpy(), ref_state, atol=1e-4)
        state = torch.from_numpy(np.asarray(ref_state, np.float32))  # each step from the same state
    plain = dataclasses.replace(loaded, input={k: v for k, v in loaded.input.items() if k != "recurrent"})
    with pytest.raises(ValueError, match="not a recurrent policy"):
        distill_recurrent.distill(plain, "CartPole-v1")
    from click.testing import CliRunner

    from bitrl_compile.cli import main

    r = CliRunner().invoke(main, ["finetune", str(lossy_recurrent_ppo[1]), "--env", "CartPole-v1", "--method", "distill",
                                  "--output", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 1 and "no format holds a recurrent student" in r.output and "--keep" in r.output, r.output


@pytest.fixture(scope="module")
def compiled_box(tmp_path_factory):
    """A Box RecurrentPPO (Pendulum-v1: one action in [-2, 2], a learned log_std, so a "sample" entry point):
    1 LSTM layer of 8 units, 32 steps of training (~1 s), compiled for this machine."""
    import torch
    from sb3_contrib import RecurrentPPO

    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy

    torch.set_num_threads(1)
    model = RecurrentPPO("MlpLstmPolicy", "Pendulum-v1", n_steps=32, batch_size=32, n_epochs=1, seed=0,
                         policy_kwargs={"lstm_hidden_size": 8, "n_lstm_layers": 1, "net_arch": [8]})
    model.learn(32)
    folder = tmp_path_factory.mktemp("recurrent-box")
    model.save(folder / "rppo.zip")
    return compile_policy(load_policy(folder / "rppo.zip"), "host", folder / "rppo.bitrl")


def _pendulum_episodes(steps: int, seed: int = 2, length: int = 15):
    """Pendulum-v1 observations and episode starts, a reset every `length` steps (its own episodes last 200)."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    env.action_space.seed(seed)
    for i in range(steps):
        if i % length == 0:
            obs, _ = env.reset(seed=seed + i)
        yield obs, i % length == 0
        obs, *_ = env.step(env.action_space.sample())


def _sample_both(lib, handle, policy, steps, seed: int):
    """bitrl_sample_recurrent and Python's act(deterministic=False) stepping two environments (the same episodes, the
    second one step behind) with the same noise per step (Policy._noise's draws of rng seed + step: uniform [B, 1]
    for Discrete, standard normal [B, *shape] for Box); each checked equal at every step. Returns the C actions and
    the deterministic ones, per step."""
    spec = policy.output_spec
    discrete = spec["kind"] == "discrete"
    c_state = np.zeros((2, policy.state_size), np.float32)
    py_state = policy.initial_state(2)
    sampled, greedy = [], []
    for k, ((obs_a, start_a), (obs_b, start_b)) in enumerate(zip(steps[1:], steps[:-1])):
        obs = np.ascontiguousarray(np.stack([obs_a, obs_b]), np.float32)
        start = np.array([start_a, start_b], np.float32)
        rng = np.random.default_rng(seed + k)
        noise = rng.random((2, 1)) if discrete else rng.standard_normal((2, *spec["shape"]))
        noise = np.ascontiguousarray(noise, np.float32)
        actions = np.full(2, -1, np.int64) if discrete else np.full((2, *spec["shape"]), np.nan, np.float32)
        greedy.append(policy.act(obs, py_state, start)[0])
        assert lib.bitrl_sample_recurrent(handle, obs.ctypes.data, c_state.ctypes.data, start.ctypes.data,
                                          noise.ctypes.data, 2, actions.ctypes.data, c_state.ctypes.data) == 0, \
            lib.bitrl_last_error()
        py_actions, py_state = policy.act(obs, py_state, start, deterministic=False,
                                          rng=np.random.default_rng(seed + k))
        np.testing.assert_array_equal(actions, py_actions)
        np.testing.assert_array_equal(c_state, py_state)
        sampled.append(actions)
    return np.stack(sampled), np.stack(greedy)


def test_the_c_api_samples_as_python_does(compiled, compiled_box):
    """bitrl_sample_recurrent gives Python's stochastic actions and next states for the same noise, step by step over
    episodes with resets (next_state written over state), for a Discrete (CartPole) and a Box (Pendulum) RecurrentPPO;
    the noise is what moves the actions (they differ from the deterministic ones); four threads stepping the same
    episodes at once on one policy get the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    from bitrl_compile.runtime import load

    lib = open_libbitrl()
    cases = [(compiled.path, list(_episodes(40, seed=6))), (compiled_box.path, list(_pendulum_episodes(40)))]
    for path, steps in cases:
        handle = lib.bitrl_load(str(path).encode())
        assert handle, lib.bitrl_last_error()
        try:
            assert lib.bitrl_has_sample(handle) == 1
            with load(path) as policy:
                sampled, greedy = _sample_both(lib, handle, policy, steps, seed=10)
                assert not np.array_equal(sampled, greedy), "the noise must change some actions"
                with ThreadPoolExecutor(4) as pool:  # ctypes lets go of the GIL: the C calls overlap
                    runs = [pool.submit(_sample_both, lib, handle, policy, steps, 10) for _ in range(4)]
                for run in runs:
                    np.testing.assert_array_equal(run.result()[0], sampled)
        finally:
            lib.bitrl_free(handle)


def test_the_c_api_refuses_sampling_it_cannot_do_in_one_line(compiled, sb3_ppo_cartpole, tmp_path):
    """bitrl_sample_recurrent refuses a policy that is not recurrent, a recurrent one without a "sample" entry point
    and NULL or NaN noise; bitrl_load refuses a sample entry point taking another size of noise; bitrl_sample refuses
    a recurrent policy, naming bitrl_sample_recurrent."""
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.pipeline import compile_policy

    def no_sample(m):
        del m["entry_points"]["sample"]

    lib = open_libbitrl()
    obs, state = np.zeros((1, 4), np.float32), np.zeros((1, 64), np.float32)
    start, noise, action = np.ones(1, np.float32), np.full((1, 1), 0.5, np.float32), np.zeros(1, np.int64)

    def sample(handle, noise=noise):
        rc = lib.bitrl_sample_recurrent(handle, obs.ctypes.data, state.ctypes.data, start.ctypes.data,
                                        None if noise is None else noise.ctypes.data, 1, action.ctypes.data,
                                        state.ctypes.data)
        error = lib.bitrl_last_error().decode()
        assert rc == -1 and "\n" not in error
        return error

    plain = compile_policy(load_policy(sb3_ppo_cartpole), "host", tmp_path / "plain.bitrl").path
    deterministic = sealed(compiled.path, tmp_path / "no-sample.bitrl", no_sample)
    for path, words in [(plain, "is not a recurrent policy (bitrl_state_size is 0); call bitrl_sample"),
                        (deterministic, 'has no "sample" entry point (its actions are deterministic); call bitrl_act')]:
        handle = lib.bitrl_load(str(path).encode())
        assert handle, lib.bitrl_last_error()
        try:
            assert words in sample(handle)
        finally:
            lib.bitrl_free(handle)
    def wide_noise(m):  # more noise per row than the caller passes: the C API would read past its array
        m["entry_points"]["sample"]["inputs"][3]["shape"] = ["batch", 4]

    assert not lib.bitrl_load(str(sealed(compiled.path, tmp_path / "wide-noise.bitrl", wide_noise)).encode())
    assert "entry point sample does not take (obs, state, episode_start, noise)" in lib.bitrl_last_error().decode()
    handle = lib.bitrl_load(str(compiled.path).encode())
    assert handle, lib.bitrl_last_error()
    try:
        assert "noise is NULL" in sample(handle, None)
        assert "noise[0] is NaN (row 0, value 0)" in sample(handle, np.full((1, 1), np.nan, np.float32))
        assert lib.bitrl_sample(handle, obs.ctypes.data, noise.ctypes.data, 1, action.ctypes.data) == -1
        assert "is a recurrent policy" in lib.bitrl_last_error().decode()
        assert "call bitrl_sample_recurrent with the state" in lib.bitrl_last_error().decode()
    finally:
        lib.bitrl_free(handle)
