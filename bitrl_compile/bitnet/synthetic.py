"""Random BitNet b1.58 checkpoints in the published packed layout, written tensor by tensor (no model in memory).

`write_packed_checkpoint(folder, config)` writes config.json + model.safetensors as `microsoft/bitnet-b1.58-2B-4T`
stores them: each projection uint8 [ceil(out/4), in], four trits per byte along the outputs
(`layouts.pack_hf_bitnet`), plus a bf16 `weight_scale` (1/gamma); bf16 embeddings and norms. The safetensors header
is computed from the shapes first and each tensor is generated and appended in turn, so a 2.41 B-parameter
checkpoint (1.10 GiB) takes one tensor's memory. `CONFIG_2B4T` is the published configuration. For benchmarks and
tests of scale (bench/bitnet_scale.py): no hub is reachable here, and the compile's cost does not depend on the
weights' values.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from bitrl_compile import layouts

CONFIG_2B4T = {  # microsoft/bitnet-b1.58-2B-4T's config.json (architecture fields)
    "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
    "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20,
    "num_key_value_heads": 5, "vocab_size": 128256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "attention_bias": False, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
}


def tensor_plan(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, stored shape) of every tensor of a packed checkpoint of `cfg`, in file order."""
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    plan = [("model.embed_tokens.weight", "BF16", (cfg["vocab_size"], d))]
    for n in range(layers):
        p = f"model.layers.{n}."
        for name, (out, inp) in (("self_attn.q_proj", (q, d)), ("self_attn.k_proj", (kv, d)),
                                 ("self_attn.v_proj", (kv, d)), ("self_attn.o_proj", (d, q)),
                                 ("mlp.gate_proj", (inter, d)), ("mlp.up_proj", (inter, d)),
                                 ("mlp.down_proj", (d, inter))):
            plan += [(f"{p}{name}.weight", "U8", (-(-out // 4), inp)), (f"{p}{name}.weight_scale", "BF16", (1,))]
        plan += [(p + "self_attn.attn_sub_norm.weight", "BF16", (q,)), (p + "mlp.ffn_sub_norm.weight", "BF16", (inter,)),
                 (p + "input_layernorm.weight", "BF16", (d,)), (p + "post_attention_layernorm.weight", "BF16", (d,))]
    plan.append(("model.norm.weight", "BF16", (d,)))
    if not cfg.get("tie_word_embeddings", False):
        plan.append(("lm_head.weight", "BF16", (cfg["vocab_size"], d)))
    return plan


def _bf16(x: np.ndarray) -> bytes:
    """float32 -> bf16 bytes (round to nearest even)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def _tensor_bytes(name: str, dtype: str, shape, rng: np.random.Generator, cfg: dict) -> bytes:
    if dtype == "U8":  # trits, about a third zero, packed along the outputs
        out = _unpacked_rows(name, cfg)
        trits = rng.integers(-1, 2, size=(out, shape[1]), dtype=np.int8)
        return layouts.pack_hf_bitnet(trits).tobytes()
    if name.endswith("weight_scale"):  # gamma = gain / sqrt(in): see write_packed_checkpoint
        fan_in = cfg["intermediate_size"] if "down_proj" in name else cfg["hidden_size"]
        return _bf16(np.array([math.sqrt(fan_in) / cfg.get("_gain", GAIN)], np.float32))
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        out = bytearray()
        for start in range(0, shape[0], 8192):  # 8192 rows at a time: no fp32 copy of the whole table
            rows = min(8192, shape[0] - start)
            out += _bf16(rng.standard_normal((rows, shape[1]), np.float32) * np.float32(0.02))
        return bytes(out)
    return _bf16(1.0 + 0.1 * rng.standard_normal(shape, np.float32))  # norms


def _unpacked_rows(name: str, cfg: dict) -> int:
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    return {"q_proj": cfg["num_attention_heads"] * hd, "k_proj": cfg["num_key_value_heads"] * hd,
            "v_proj": cfg["num_key_value_heads"] * hd, "o_proj": d, "gate_proj": inter, "up_proj": inter,
            "down_proj": d}[name.split(".")[-2]]


_SIZES = {"U8": 1, "BF16": 2, "F32": 4}


GAIN = 0.25


def write_packed_checkpoint(folder: Path, cfg: dict, seed: int = 0, gain: float = GAIN,
                            log=lambda s: None) -> Path:
    """config.json + model.safetensors of `cfg` with random weights in the packed layout, written tensor by tensor
    (the header first, from the shapes; then each tensor generated and appended). Atomic: a .partial file renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(cfg)
    header, offset = {}, 0
    for name, dtype, shape in plan:
        size = _SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    partial = folder / "model.safetensors.partial"
    t0 = time.perf_counter()
    with open(partial, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i, (name, dtype, shape) in enumerate(plan):
            data = _tensor_bytes(name, dtype, shape, rng, {**cfg, "_gain": gain})
            assert len(data) == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
            f.write(data)
            if name.endswith("down_proj.weight"):
                log(f"  wrote {name.rsplit('.mlp', 1)[0]} ({f.tell() / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s)")
    os.replace(partial, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder
