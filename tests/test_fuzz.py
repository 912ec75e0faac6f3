"""The readers of untrusted input under fuzzing (bench/fuzz.py's properties, derandomized hypothesis, ~1 minute).

For every mutation of a real valid file (an artifact compiled here, a PPO CartPole .zip, an MLP .safetensors with
its config, a config on its own), each reader loads it or refuses it with a ValueError of one line (for the C API:
NULL and one line of bitrl_last_error; for `inspect`: exit 1 and one line): never another exception type, a crash,
a hang or a memory blow-up. Inputs run in worker subprocesses (bench/fuzz.py's Sandbox), so a crash is a signal
seen here. `python3 bench/fuzz.py --minutes 10` runs the same properties longer with random seeds.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from repo_scripts import load_script

fuzz = load_script("bench/fuzz.py", "bench_fuzz")

# Examples per (reader, family): the cheap readers get more; about 30 s of fuzzing in all on 2 cores, after about
# 20 s building the seeds (the demo compile, a 64-step PPO) and starting the workers.
EXAMPLES = {"artifact.read": 40, "artifact.load": 30, "cli.inspect": 30, "safetensors.loads": 60, "sb3": 25,
            "safetensors+config": 30, "config": 50, "capi.load": 40}
# Readers with a known open finding (none today): a (reader, family) entry marks that case xfail with its reason.
XFAIL: dict[tuple[str, str], str] = {}


def _case(target: str, family: str):
    reason = XFAIL.get((target, family))
    marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
    return pytest.param(target, family, id=f"{target}-{family}", marks=marks)


@pytest.fixture(scope="module")
def boxes(tmp_path_factory, sb3_ppo_cartpole):
    corpus = fuzz.build_corpus(tmp_path_factory.mktemp("fuzz"), sb3_zip=sb3_ppo_cartpole, bomb_mb=256)
    sandboxes = fuzz.Sandboxes(corpus, timeout=10.0, mem_flag_mb=200)
    yield sandboxes
    counts = sandboxes.counts()
    print(f"\nfuzz inputs tried: {sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    sandboxes.close()


@pytest.mark.parametrize("target,family", [_case(t, f) for t, spec in fuzz.TARGETS.items() for f in spec.families])
def test_reader_loads_or_refuses_in_one_line(boxes, target, family):
    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def check(rng):
        result, _, what, extra = fuzz.fuzz_one(boxes, target, family, rng)
        assert not result.failed, f"{target} on {what} {extra or ''}: {result.outcome}: {result.detail}"

    check()


def test_seeds_load_and_the_harness_sees_every_failure_class(boxes):
    """The harness itself: every seed loads; a signal, a hang, a blow-up and a wrong exception type are failures,
    a one-line ValueError is a refusal, and the worker is restarted after each."""
    for name, target in fuzz.TARGETS.items():
        result = boxes.run(name, fuzz.seed_input(boxes.corpus, target))
        assert result.outcome == fuzz.OK, (name, result)
    box = boxes.boxes["capi"]  # the quickest worker to restart
    assert box.run("_crash", b"").outcome == "crash:SIGSEGV"
    timeout, box.timeout = box.timeout, 1.0
    try:
        assert box.run("_hang", b"").outcome == "hang"
    finally:
        box.timeout = timeout
    blowup = box.run("_blowup", b"", {"mb": 600})
    assert blowup.outcome == "memory", blowup
    assert box.run("_blowup", b"", {"mb": 8}).outcome == fuzz.OK
    assert box.run("_raise", b"", {"exc": "KeyError('x')"}).outcome == "wrong-type:KeyError"
    assert box.run("_raise", b"", {"exc": "ValueError('two\\nlines')"}).outcome == "message:multi-line"
    assert box.run("_raise", b"", {"exc": "ValueError('bad input; fix it')"}).outcome == fuzz.REFUSED
    assert box.run("capi.load", boxes.corpus.artifact).outcome == fuzz.OK


# ------------------------------------------------------------------------------- the findings, as reproducers

def _refused(result) -> None:
    assert result.outcome in (fuzz.OK, fuzz.REFUSED), f"{result.outcome}: {result.detail}"


def test_inspect_refuses_a_call_that_is_not_an_object(boxes):
    manifest = copy.deepcopy(boxes.corpus.manifest)
    manifest["entry_points"]["act"]["calls"][1] = 1
    data = fuzz.seal_artifact(manifest, boxes.corpus.members)  # hashes recomputed: what an attacker does
    _refused(boxes.run("cli.inspect", data))


def test_sb3_refuses_a_policy_pth_whose_pickle_is_malformed(boxes):
    members = dict(boxes.corpus.sb3_members)
    inner = fuzz.zip_members(members["policy.pth"])
    pth = fuzz.zip_bytes([fuzz.entry(n, b"." if n.endswith("data.pkl") else d, 0) for n, d in inner])
    data = fuzz.zip_bytes([fuzz.entry(n, pth if n == "policy.pth" else d) for n, d in boxes.corpus.sb3_members])
    _refused(boxes.run("sb3", data))  # data.pkl is a pickle of one STOP opcode: "pop from empty list"


def test_capi_refuses_a_truncated_lib_so(boxes):
    """Found by bench/fuzz.py (fixed since): bitrl_load died of SIGBUS, the dynamic loader mapping past the end."""
    members = dict(boxes.corpus.members)
    members["lib.so"] = members["lib.so"][: len(members["lib.so"]) // 2]
    data = fuzz.seal_artifact(boxes.corpus.manifest, members)
    _refused(boxes.run("capi.load", data, {"act": False}))


def _manifest_case(edit):
    def build(corpus):
        manifest = copy.deepcopy(corpus.manifest)
        edit(manifest)
        return fuzz.seal_artifact(manifest, corpus.members)
    return build


def _params_dtype(corpus):
    header, body = fuzz.st_split(corpus.params)
    header["p2"]["dtype"] = "F32\n"
    return fuzz.seal_artifact(corpus.manifest, dict(corpus.members, **{"params.safetensors": fuzz.st_join(header, body)}))


def _mlp_dtype(corpus):
    header, body = fuzz.st_split(corpus.mlp)
    header["net.0.weight"]["dtype"] = "F32\n"
    return fuzz.st_join(header, body)


def _pth_edit(edit):
    def build(corpus):
        members = dict(corpus.sb3_members)
        sd = fuzz.torch_load(members["policy.pth"])
        edit(sd)
        pth = fuzz._torch_bytes(sd)
        return fuzz.zip_bytes([fuzz.entry(n, pth if n == "policy.pth" else d) for n, d in corpus.sb3_members])
    return build


# (reader, how to build the input, what it did before the fix) found by bench/fuzz.py: one-line reproducers
FOUND = [
    ("artifact.load", _manifest_case(lambda m: m.update(weights="F32")), ("AttributeError: 'str' object has no "
     "attribute 'items' (manifest weights not an object)")),
    ("artifact.load", _manifest_case(lambda m: m["weights"]["p0"]["shape"].pop()), ("IndexError (a weights shape "
     "of one value)")),
    ("artifact.load", _manifest_case(lambda m: m["params"].__setitem__(5, ["p5"])), ("TypeError: unhashable type: "
     "'list' (a params name that is a list)")),
    ("artifact.load", _manifest_case(lambda m: m.update(entry_points=[m["entry_points"]])), ("AttributeError: "
     "'list' object has no attribute 'get' (entry_points a list)")),
    ("artifact.load", _params_dtype, ("ArtifactError of two lines (a params.safetensors dtype with a newline is "
     "echoed)")),
    ("cli.inspect", _manifest_case(lambda m: m["kernels"].__setitem__(0, -1.0)), ("internal error (exit 3): "
     "'float' object is not subscriptable (a kernels entry not an object)")),
    ("cli.inspect", _manifest_case(lambda m: m["kernels"][0].update(isa=["avx512-vnni"])), ("internal error "
     "(exit 3): unsupported format string passed to list.__format__")),
    ("safetensors+config", _mlp_dtype, "ModelLoadError of two lines (the safetensors library's error echoed)"),
    ("sb3", _pth_edit(lambda sd: sd.update({"mlp_extractor.policy_net.2.weight": None})), ("AttributeError: "
     "'NoneType' object has no attribute 'ndim' (a state_dict value that is not a tensor)")),
    ("sb3", _pth_edit(lambda sd: sd.update({"action_net.weight": sd["action_net.weight"].reshape(-1)})),
     "IndexError: tuple index out of range (a 1-D action_net.weight)"),
]


@pytest.mark.parametrize("target,build,wrong", [pytest.param(t, b, w, id=f"{t}-{i}")
                                                for i, (t, b, w) in enumerate(FOUND)])
def test_found_by_fuzzing_is_refused_in_one_line(boxes, target, build, wrong):
    """Inputs the fuzzer found (`wrong`: what they did before issue 15's fixes), now refused in one line."""
    _refused(boxes.run(target, build(boxes.corpus)))
