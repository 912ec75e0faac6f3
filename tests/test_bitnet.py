"""BitNet b1.58 backbones in torch: Hugging Face-layout checkpoints (names, shapes, bf16 and packed forms, bad files)
and hidden states against transformers' own BitNet implementation on the same tiny checkpoints.

Like is compared with like. transformers' `BitNetModel` without a quantization_config has plain float Linear
layers: it is compared with our model with `quantized=False`. Its ternary paths are its BitNet quantizer's layers,
put in with `replace_with_bitnet_linear`: `AutoBitLinear` in "online" mode (absmean ternary weights and per-token
absmax int8 activations computed in the forward, the b1.58 formulas) against our ternary forward, and `BitLinear`
("offline", the packed uint8 + weight_scale checkpoint) against our loader of packed checkpoints. transformers
wraps those functions in torch.compile; they run eagerly here (dynamo disabled) so no C++ build is needed.
Attention uses transformers' "eager" implementation: its SDPA kernel rounds differently by an ulp, and one ulp
before an int8 activation quantizer can move one rounding by a whole int8 step (seen: 1.5e-2 of 4.1 after two
layers), which says nothing about either implementation. With eager attention the float paths agree to 0 and the
ternary paths to about 1e-6.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from bitrl_compile import bitnet, layouts, quant
from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.runtime import text

transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def hf_model():
    """A tiny transformers BitNetForCausalLM (eager attention, random non-unit norms), float32."""
    cfg = transformers.BitNetConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                    bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-bitnet")
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture
def no_dynamo():
    """transformers' BitNet quantizer functions are torch.compile'd; run them eagerly."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def _ids(n=3, t=17, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _with_bitnet_layers(hf_model, linear_class, mode, state):
    """A copy of hf_model whose projections are transformers' BitNet quantizer layers, loaded with `state`."""
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    model = copy.deepcopy(hf_model)
    replace_with_bitnet_linear(model.model, quantization_config=BitNetQuantConfig(linear_class=linear_class,
                                                                                  quantization_mode=mode))
    model = model.to_empty(device="cpu")
    missing = model.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    for m in model.modules():
        if type(m).__name__ == "BitLinear":
            m.dtype = torch.float32
    model.model.rotary_emb.inv_freq = hf_model.model.rotary_emb.inv_freq.clone()  # a buffer to_empty wiped
    return model.eval()


# ------------------------------------------------------------------------------------------------ equivalence

def test_float_forward_equals_transformers_on_a_checkpoint_it_saved(hf_model, hf_checkpoint):
    ours = bitnet.set_quantized(bitnet.load_bitnet(hf_checkpoint), False)
    ids = _ids()
    with torch.no_grad():
        expected = hf_model.model(ids).last_hidden_state
        np.testing.assert_allclose(ours.model(ids), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours(ids), hf_model(ids).logits, rtol=0, atol=1e-5)


def test_ternary_forward_equals_transformers_online_autobitlinear(hf_model, hf_checkpoint, no_dynamo):
    ours = bitnet.load_bitnet(hf_checkpoint)
    theirs = _with_bitnet_layers(hf_model, "autobitlinear", "online", hf_model.state_dict())
    ids = _ids()
    with torch.no_grad():
        h = ours.model(ids)
        np.testing.assert_allclose(h, theirs.model(ids).last_hidden_state, rtol=0, atol=1e-5)
        float_h = bitnet.set_quantized(copy.deepcopy(ours), False).model(ids)
    assert (h - float_h).abs().max() > 1e-2  # the comparison can tell ternary from float


def test_packed_checkpoint_equals_transformers_bitlinear_and_keeps_trits_and_scales(hf_model, hf_checkpoint,
                                                                                   tmp_path, no_dynamo):
    from safetensors.torch import load_file

    ours = bitnet.load_bitnet(hf_checkpoint)
    bitnet.save_bitnet(ours, tmp_path, packed=True, dtype=torch.bfloat16)
    stored = load_file(tmp_path / "model.safetensors")
    q = "model.layers.1.self_attn.q_proj.weight"
    assert stored[q].dtype == torch.uint8 and tuple(stored[q].shape) == (16, 64)
    assert stored[q + "_scale"].dtype == torch.bfloat16 and tuple(stored[q + "_scale"].shape) == (1,)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"

    packed = bitnet.load_bitnet(tmp_path)
    w_t, gamma = quant.ternarize_weight(packed.state_dict()[q].numpy())
    np.testing.assert_array_equal(w_t, layouts.unpack_hf_bitnet(stored[q].numpy(), 64))
    np.testing.assert_allclose(gamma[0], 1 / stored[q + "_scale"].float().item(), rtol=1e-6)

    theirs = _with_bitnet_layers(hf_model, "bitlinear", "offline", {k: v if v.dtype == torch.uint8 else v.float()
                                                                   for k, v in stored.items()})
    ids = _ids()
    with torch.no_grad():
        np.testing.assert_allclose(packed.model(ids), theirs.model(ids).last_hidden_state, rtol=0, atol=1e-5)


def test_our_checkpoints_load_in_transformers(tmp_path):
    torch.manual_seed(3)
    ours = bitnet.set_quantized(bitnet.BitNetForCausalLM(bitnet.BitNetConfig(**TINY, tie_word_embeddings=True)),
                                False).eval()
    bitnet.save_bitnet(ours, tmp_path, dtype=torch.float32)
    theirs = transformers.BitNetModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _ids(2, 9)
    with torch.no_grad():
        np.testing.assert_allclose(ours.model(ids), theirs(ids).last_hidden_state, rtol=0, atol=1e-5)


def test_hf_pack_layout_matches_transformers_pack_weights():
    from transformers.integrations.bitnet import pack_weights

    w_t = np.random.default_rng(0).integers(-1, 2, (12, 7)).astype(np.int8)
    expected = pack_weights(torch.from_numpy(w_t.astype(np.float32)).clone()).numpy()
    np.testing.assert_array_equal(layouts.pack_hf_bitnet(w_t), expected)
    np.testing.assert_array_equal(layouts.unpack_hf_bitnet(expected, 12), w_t)


# ------------------------------------------------------------------------------------------------ names and shapes

def test_names_and_shapes_are_those_of_the_published_2b4t_checkpoint():
    cfg = bitnet.BitNetConfig.from_hf({"model_type": "bitnet", "hidden_act": "relu2", "vocab_size": 128256,
                                       "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
                                       "num_attention_heads": 20, "num_key_value_heads": 5, "rope_theta": 500000.0,
                                       "max_position_embeddings": 4096, "tie_word_embeddings": True})
    shapes = bitnet.expected_shapes(cfg)
    assert len(shapes) == 2 + 30 * 11  # embed, norm, 11 per layer; lm_head tied
    assert shapes["model.embed_tokens.weight"] == (128256, 2560)
    assert shapes["model.layers.29.self_attn.k_proj.weight"] == (640, 2560)  # 5 KV heads of 128
    assert shapes["model.layers.0.self_attn.attn_sub_norm.weight"] == (2560,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2560, 6912)
    assert shapes["model.layers.0.mlp.ffn_sub_norm.weight"] == (6912,)
    assert cfg.head_dim == 128 and cfg.rope_theta == 500000.0
    with torch.device("meta"):
        model = bitnet.BitNetForCausalLM(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"} == shapes
    n_params = sum(p.numel() for p in model.parameters())
    assert 2.4e9 < n_params < 2.5e9  # "2B": 2.41 billion with the tied embeddings counted once


# ------------------------------------------------------------------------------------------------ bad checkpoints

def _tiny_checkpoint(folder, **cfg_changes):
    torch.manual_seed(0)
    model = bitnet.BitNetForCausalLM(bitnet.BitNetConfig(**{**TINY, "num_hidden_layers": 1}))
    bitnet.save_bitnet(model, folder, dtype=torch.bfloat16)
    if cfg_changes:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(cfg_changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _edit_tensors(folder, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors")


Q = "model.layers.0.self_attn.q_proj.weight"
BAD = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{nope"), "not readable JSON"),
    "another architecture": (lambda f: _tiny_checkpoint(f, model_type="llama"), "model_type is 'llama'"),
    "silu MLP": (lambda f: _tiny_checkpoint(f, hidden_act="silu"), "hidden_act 'silu'"),
    "missing key": (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "bitnet"})),
                    "missing key 'vocab_size'"),
    "heads not a multiple of kv heads": (lambda f: _tiny_checkpoint(f, num_key_value_heads=3),
                                         "not a multiple of num_key_value_heads"),
    "llama3 rope scaling": (lambda f: _tiny_checkpoint(f, rope_parameters={"rope_type": "llama3"}),
                            "rope type 'llama3'"),
    "no weights file": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1000]), "truncated or corrupt"),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop("model.norm.weight")),
                       "tensor model.norm.weight is missing"),
    "more layers in config": (lambda f: _tiny_checkpoint(f, num_hidden_layers=2),
                              "tensor model.layers.1.self_attn.q_proj.weight is missing"),
    "mis-shaped tensor": (lambda f: _edit_tensors(f, lambda t: t.update({Q: t[Q][:, :32].contiguous()})),
                          f"tensor {Q} has shape [64, 32]; config.json implies [64, 64]"),
    "unexpected tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"model.layers.0.mlp.fc1.weight": t[Q].clone()})),
                          "unexpected tensor model.layers.0.mlp.fc1.weight"),
    "NaN weights": (lambda f: _edit_tensors(f, lambda t: t[Q].view(-1)[3:5].fill_(float("nan"))),
                    f"tensor {Q} contains NaN"),
    "integer weights": (lambda f: _edit_tensors(f, lambda t: t.update({Q: t[Q].to(torch.int32)})),
                        f"tensor {Q} has dtype torch.int32"),
    "packed without scale": (lambda f: _edit_tensors(f, lambda t: t.update(
        {Q: torch.zeros(16, 64, dtype=torch.uint8)})), f"{Q} is packed uint8 but {Q}_scale is missing"),
    "packed mis-shaped": (lambda f: _edit_tensors(f, lambda t: t.update(
        {Q: torch.zeros(64, 64, dtype=torch.uint8), Q + "_scale": torch.ones(1)})),
        f"{Q} has packed shape [64, 64]; config.json implies [16, 64]"),
    "packed code 3": (lambda f: _edit_tensors(f, lambda t: t.update(
        {Q: torch.full((16, 64), 255, dtype=torch.uint8), Q + "_scale": torch.ones(1)})), "code 3"),
    "untied without lm_head": (lambda f: _edit_tensors(f, lambda t: t.pop("lm_head.weight")),
                               "lm_head.weight is missing (set tie_word_embeddings to true"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_give_one_clear_line(case, tmp_path):
    folder = _tiny_checkpoint(tmp_path / "ckpt")
    breaker, expected = BAD[case]
    breaker(folder)
    with pytest.raises(ModelLoadError) as err:
        bitnet.load_bitnet(folder)
    message = str(err.value)
    assert expected in message and "\n" not in message, message


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _tiny_checkpoint(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / file)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: file for file, part in shards.items() for n in part}}))
    model = bitnet.load_bitnet(folder)
    np.testing.assert_array_equal(model.state_dict()[Q], tensors[Q].float())


# ------------------------------------------------------------------------------------------------ state encoders

def test_text_serialization_has_fixed_width_and_length():
    codes = text.serialize(np.array([[0.0312, -1.2], [12345.0, 0.0]]), decimals=2)
    assert codes.shape == (2, text.text_length(2, 2)) == (2, 18)
    assert bytes(codes[0]).decode() == "   +0.03    -1.20;"
    assert bytes(codes[1]).decode() == "+9999.00    +0.00;"  # clipped to the width
    with pytest.raises(ValueError, match="NaN"):
        text.serialize(np.array([np.nan]), 2)


@pytest.mark.parametrize("kind", ["numeric", "text"])
def test_backbone_checkpoint_round_trip_keeps_features(kind, tmp_path):
    spec = bitnet.EncoderSpec(kind=kind, obs_dim=5, patch=2, decimals=1,
                              normalize={"mean": [0.1] * 5, "var": [2.0] * 5, "eps": 1e-8, "clip": 10.0})
    backbone = bitnet.new_backbone(bitnet.BitNetConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                       max_position_embeddings=64), spec).eval()
    obs = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    before = backbone.features(obs)
    assert before.shape == (4, 32)
    bitnet.save_backbone(backbone, tmp_path)
    loaded = bitnet.load_backbone(tmp_path)
    np.testing.assert_array_equal(loaded.features(obs), before)
    lm = bitnet.load_bitnet(tmp_path)  # still a plain BitNet checkpoint
    assert lm.config.tie_word_embeddings
    tokens = backbone.encoder(backbone.prepare(obs)).shape[1]
    assert tokens == (3 + 1 if kind == "numeric" else text.text_length(5, 1))  # 3 patches of 2 + readout


def test_load_policy_reads_a_backbone_folder_as_a_features_policy(tmp_path):
    from bitrl_compile.frontends import load_policy

    spec = bitnet.EncoderSpec(obs_dim=3, normalize={"mean": [0.0] * 3, "var": [1.0] * 3, "eps": 1e-8, "clip": 5.0})
    bitnet.save_backbone(bitnet.new_backbone(bitnet.BitNetConfig(num_hidden_layers=1), spec), tmp_path / "bb")
    loaded = load_policy(tmp_path / "bb")  # what `bitrl-compile FOLDER` compiles
    assert loaded.output == {"kind": "features", "dim": 64} and loaded.input["normalize"] == spec.normalize
    assert not any(m.quantized for m in loaded.module.modules() if isinstance(m, bitnet.BitLinear))
    with pytest.raises(ModelLoadError, match="folder without config.json"):
        load_policy(tmp_path)
    with pytest.raises(ModelLoadError, match="no \"bitrl_backbone\" entry"):
        _tiny_checkpoint(tmp_path / "lm")
        load_policy(tmp_path / "lm")


def test_frozen_backbone_plugs_into_the_trainer(tmp_path):
    from bitrl_compile.trainers import ppo

    backbone = bitnet.new_backbone(bitnet.BitNetConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1),
                                   bitnet.EncoderSpec(obs_dim=4))
    bitnet.save_backbone(backbone, tmp_path / "bb")
    args = ppo.args_for("CartPole-v1", total_timesteps=512, num_envs=4, num_steps=64, progress=False,
                        backbone=str(tmp_path / "bb"), eval_every=0, eval_episodes=1, tensorboard=False)
    result = ppo.train(args, log=lambda s: None)
    assert result.backbone.dim == 32 and result.global_step == 512
    assert not any(p.requires_grad for p in result.backbone.backbone.parameters())
