"""Stock Hugging Face BitNet checkpoints from the command line: `bitrl-compile FOLDER --encoder text|numeric --env ID`
compiles the same artifact as wrapping the checkpoint in Python (`BitNetBackbone(load_bitnet(F).model, spec)` and
`pipeline.compile_policy`), bf16 and packed; `train --backbone FOLDER --encoder ...` trains heads on it; bad
folders, options that do not apply and checkpoints too large for the memory left are one line, exit 1 or 2, and
write nothing.

The checkpoints are tiny random ones (1 layer, d = 32, byte vocabulary) with norm weights drawn from U(0.5, 1.5):
with unit norms and bf16 embeddings the first activation quantizer sees exact ties (x_i / max|x| * 127 = k + 1/2
in exact arithmetic), which float32 rounds one way in TVM and the other in numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bitrl_compile import bitnet, pipeline
from bitrl_compile.cli import main as cli_main
from bitrl_compile.runtime import load

CFG = bitnet.BitNetConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
ENV = "CartPole-v1"


def stock_checkpoint(folder, packed=False, seed=1, cfg=CFG):
    torch.manual_seed(seed)
    model = bitnet.BitNetForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return bitnet.save_bitnet(model, folder, dtype=torch.bfloat16, packed=packed)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    return {"bf16": stock_checkpoint(root / "bf16"), "packed": stock_checkpoint(root / "packed", packed=True)}


def cli(*args, env=None):
    torch.set_num_threads(1)
    return CliRunner().invoke(cli_main, [str(a) for a in args], prog_name="bitrl-compile", env=env)


def _observations(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 4)) * rng.uniform(0.1, 3, (n, 1))).astype(np.float32)


@pytest.mark.parametrize(("layout", "encoder", "extra", "spec"), [
    ("bf16", "text", ["--pool", "mean", "--decimals", "1"], {"kind": "text", "pool": "mean", "decimals": 1}),
    ("packed", "numeric", [], {"kind": "numeric"}),
])
def test_cli_compiles_a_stock_checkpoint_as_python_wrapping_does(stock, tmp_path, layout, encoder, extra, spec):
    out = tmp_path / "cli.bitrl"
    r = cli(stock[layout], "--encoder", encoder, "--env", ENV, *extra, "-o", out)
    assert r.exit_code == 0, r.output
    torch.manual_seed(0)  # what the CLI draws the numeric encoder's projections from
    backbone = bitnet.BitNetBackbone(bitnet.load_bitnet(stock[layout]).model,
                                     bitnet.EncoderSpec(obs_dim=4, env=ENV, **spec)).eval()
    python = pipeline.compile_policy(bitnet.backbone_policy(backbone), "host", tmp_path / "python.bitrl")
    a, b = load(out), load(python.path)
    for key in ("input", "output", "layers", "target"):
        assert a.manifest[key] == b.manifest[key], key
    assert a.manifest["output"] == {"kind": "features", "dim": 32}
    obs = _observations()
    np.testing.assert_array_equal(a.features(obs), b.features(obs))  # bit-identical
    expected = backbone.features(obs)
    assert np.abs(a.features(obs) - expected).max() <= 1e-2 * np.abs(expected).max()


def test_artifact_holds_no_lm_head_and_only_the_embedding_rows_its_encoder_reads(stock, tmp_path):
    backbone = bitnet.stock_backbone(stock["bf16"], bitnet.EncoderSpec(kind="text", obs_dim=4))
    module = bitnet.backbone_policy(backbone).module
    names = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert not any("lm_head" in n for n in names)
    assert names["model.embed_tokens.weight"] == (max(bitnet.backbone.TEXT_BYTES) + 1, 32)  # 60 of 256 rows
    np.testing.assert_array_equal(module.model.embed_tokens.weight.detach(),
                                  backbone.model.embed_tokens.weight.detach()[:60])
    assert backbone.model.embed_tokens.weight.shape == (256, 32)  # the caller's backbone is left alone
    numeric = bitnet.backbone_policy(bitnet.stock_backbone(stock["bf16"], bitnet.EncoderSpec(obs_dim=4))).module
    assert numeric.model.embed_tokens.weight.shape == (1, 32)


def test_train_backbone_accepts_a_stock_checkpoint(stock, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--env", ENV, "--backbone", stock["packed"], "--encoder", "numeric", "--steps", 256,
            "--num-envs", 4, "--num-steps", 64, "--eval-every", 0, "--eval-episodes", 1, "--no-progress",
            "--no-tensorboard", "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "policy.safetensors").is_file()
    reference = json.loads((out / "backbone" / "config.json").read_text())
    assert reference["bitrl_checkpoint"] == str(stock["packed"].resolve())
    obs = _observations(8)
    trained_on = bitnet.load_backbone(out / "backbone")
    compiled_from = bitnet.stock_backbone(stock["packed"], bitnet.EncoderSpec(obs_dim=4, env=ENV))
    np.testing.assert_array_equal(trained_on.features(obs), compiled_from.features(obs))


def _llama(folder):
    stock_checkpoint(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama",
                                                    "architectures": ["LlamaForCausalLM"]}))


def _edit(**changes):
    def make(folder):
        stock_checkpoint(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return make


BAD = {  # folder maker, extra arguments, environment, exit code, what the line says
    "not BitNet": (_llama, [], None, 1, "model_type is 'llama', not 'bitnet'"),
    "silu FFN": (_edit(hidden_act="silu"), [], None, 1, "hidden_act 'silu' is not supported"),
    "no num_hidden_layers": (_edit(num_hidden_layers=None), [], None, 1, "missing key 'num_hidden_layers'"),
    "too large for the memory left": (stock_checkpoint, [], {bitnet.checkpoint.MEM_ENV: "100000"}, 1,
                                      "KiB is available"),
    "text with too many tokens": (stock_checkpoint, ["--decimals", "12"], None, 1,
                                  "more than max_position_embeddings 64"),
    "no --env": (stock_checkpoint, ["--no-env"], None, 2, "--encoder needs --env"),
    "--decimals with numeric": (stock_checkpoint, ["--numeric", "--decimals", "1"], None, 2,
                                "--decimals applies to --encoder text"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_stock_checkpoints_and_options_give_one_line_and_write_nothing(case, tmp_path):
    make, extra, env, code, says = BAD[case]
    folder = tmp_path / "ckpt"
    make(folder)
    encoder = "numeric" if "--numeric" in extra else "text"
    env_args = [] if "--no-env" in extra else ["--env", ENV]
    extra = [a for a in extra if a not in ("--numeric", "--no-env")]
    out = tmp_path / "out.bitrl"
    r = cli(folder, "--encoder", encoder, *env_args, *extra, "-o", out, env=env)
    lines = [line for line in r.output.splitlines() if line.startswith(("bitrl-compile:", "Error:"))]
    assert r.exit_code == code and len(lines) == 1 and says in lines[0], r.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_encoder_options_on_a_policy_file_are_a_usage_error_naming_the_option(tmp_path):
    policy = tmp_path / "policy.safetensors"
    policy.write_bytes(b"\0" * 16)
    r = cli(policy, "--pool", "mean")
    assert r.exit_code == 2 and "--pool applies to a Hugging Face BitNet checkpoint folder" in r.output, r.output
    r = cli("train", "--env", ENV, "--encoder", "text", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "--encoder applies to a Hugging Face BitNet checkpoint folder" in r.output
    assert not (tmp_path / "run").exists()


def test_memory_needed_comes_from_the_config_and_the_headers(stock):
    _, hf, files = bitnet.checkpoint_files(stock["packed"])
    needed, held, copies = bitnet.memory_needed(bitnet.BitNetConfig.from_hf(hf), files)
    params = sum(int(np.prod(s)) for s in bitnet.expected_shapes(CFG).values())
    assert copies == 4 * params  # nothing is float32 in the file: every tensor gets a float32 copy
    assert held < files[0].stat().st_size and needed == held + copies
    with pytest.raises(bitnet.CheckpointTooLarge, match=r"needs .* KiB of float32 copies\) and .* KiB is available"):
        bitnet.load_bitnet(stock["packed"], mem_available=needed - 1)
    assert bitnet.load_bitnet(stock["packed"], mem_available=needed).config == CFG


B2B4T = {"model_type": "bitnet", "hidden_act": "relu2", "vocab_size": 128256, "hidden_size": 2560,
         "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20, "num_key_value_heads": 5,
         "rope_theta": 500000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True}


def test_a_2b4t_packed_checkpoint_is_measured_from_its_headers_alone(tmp_path):
    """The published packed layout's header (uint8 projections [out/4, in] + bf16 scales, bf16 embeddings and
    norms) without its 1.2 GB of data: the check reads only config.json and the header."""
    cfg = bitnet.BitNetConfig.from_hf(B2B4T)
    header, offset = {}, 0
    for name, shape in bitnet.expected_shapes(cfg).items():
        packed = name.endswith("_proj.weight")
        entries = [(name, "U8", [-(-shape[0] // 4), shape[1]])] if packed else [(name, "BF16", list(shape))]
        entries += [(name + "_scale", "BF16", [1])] if packed else []
        for n, dtype, s in entries:
            size = int(np.prod(s)) * (1 if dtype == "U8" else 2)
            header[n] = {"dtype": dtype, "shape": s, "data_offsets": [offset, offset + size]}
            offset += size
    head = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head)
    (tmp_path / "config.json").write_text(json.dumps(B2B4T))
    _, hf, files = bitnet.checkpoint_files(tmp_path)
    needed, held, copies = bitnet.memory_needed(cfg, files)
    params = sum(int(np.prod(s)) for s in bitnet.expected_shapes(cfg).values())
    assert held == offset and copies == 4 * params and needed == held + copies and 2.4e9 < params < 2.5e9
    with pytest.raises(bitnet.CheckpointTooLarge) as err:
        bitnet.check_memory(tmp_path, hf, files, mem_available=6 << 30)
    assert "2.41 B parameters" in str(err.value) and "6.00 GiB is available" in str(err.value)
