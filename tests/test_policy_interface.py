"""One policy interface, runtime.PolicyLike (manifest, forward, act, features, close): the native Policy, the
emulated one (an aarch64 artifact under qemu) and the trainers' frozen backbones all implement it, so code that
takes a policy never asks which class it got."""

from __future__ import annotations

import numpy as np
import pytest

from bitrl_compile import bitnet, pipeline
from bitrl_compile.demo import demo_policy_path
from bitrl_compile.devices import EmulatedPolicy, open_policy
from bitrl_compile.frontends import load_policy
from bitrl_compile.runtime import Policy, PolicyLike
from bitrl_compile.trainers import backbones, export


@pytest.fixture(scope="module")
def demo_artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interface")
    loaded = load_policy(demo_policy_path())
    return {target: pipeline.compile_policy(loaded, target, folder / f"{target}.bitrl").path
            for target in ("host", "rasp4")}


def test_native_and_emulated_policies_share_the_interface_and_the_outputs(demo_artifacts, cartpole_obs):
    native, emulated = open_policy(demo_artifacts["host"]), open_policy(demo_artifacts["rasp4"])
    try:
        assert isinstance(native, Policy) and isinstance(emulated, EmulatedPolicy)
        for policy in (native, emulated):
            assert isinstance(policy, PolicyLike)
            assert policy.manifest["output"]["kind"] == "discrete"
            with pytest.raises(ValueError, match="not a backbone"):
                policy.features(cartpole_obs)
        # both kernels are bit-exact against the same reference, so the two machines agree exactly
        np.testing.assert_array_equal(native.forward(cartpole_obs), emulated.forward(cartpole_obs))
        np.testing.assert_array_equal(native.act(cartpole_obs), emulated.act(cartpole_obs))
    finally:
        native.close()
        emulated.close()
    native.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        native.forward(cartpole_obs)


def test_trainer_backbones_share_the_interface(demo_artifacts, tmp_path, cartpole_obs):
    torso = backbones.load_backbone(demo_policy_path())  # the demo policy's ternary torso, in torch
    features = pipeline.compile_policy(export.features_policy(load_policy(demo_policy_path())), "host",
                                       tmp_path / "features.bitrl").path
    compiled = backbones.load_backbone(features)  # the same torso compiled, run by the runtime
    small = bitnet.new_backbone(bitnet.BitNetConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1),
                                bitnet.EncoderSpec(obs_dim=4))
    bitnet.save_backbone(small, tmp_path / "bb")
    frozen = backbones.load_backbone(tmp_path / "bb")
    for backbone, dim in ((torso, 64), (compiled, 64), (frozen, 32)):
        assert isinstance(backbone, PolicyLike)
        assert backbone.manifest["output"] == {"kind": "features", "dim": dim}
        assert backbone.features(cartpole_obs).shape == (len(cartpole_obs), dim)
        assert backbone.features(cartpole_obs[0]).shape == (dim,)
        np.testing.assert_array_equal(backbone.forward(cartpole_obs), backbone.features(cartpole_obs))
        with pytest.raises(ValueError, match="is a backbone"):
            backbone.act(cartpole_obs)
        backbone.close()
