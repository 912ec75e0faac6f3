"""BitNet b1.58 checkpoints in the Hugging Face layout: read, validate, load (`load_bitnet`) and write (`save_bitnet`).

A checkpoint is a folder with `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`), tensors `model.embed_tokens.weight`, `model.layers.N.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.N.self_attn.attn_sub_norm.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`,
`model.layers.N.mlp.ffn_sub_norm.weight`, `model.layers.N.{input,post_attention}_layernorm.weight`,
`model.norm.weight`, `lm_head.weight` (absent when tie_word_embeddings). Master weights in bf16, f16 or f32; or the
packed form of `microsoft/bitnet-b1.58-2B-4T`: each projection `weight` uint8 [ceil(out/4), in]
(`layouts.pack_hf_bitnet`) plus `weight_scale` = 1/gamma. A packed projection is loaded as the float weight
W = W_t / (weight_scale * f), f = the fraction of non-zero trits: absmean ternarization of W gives back W_t
exactly and gamma = 1/weight_scale (to float32 rounding), so the ternary forward and the compiler reproduce the
packed model.

Errors are `ModelLoadError`s of one line that name the file, the tensor or the key and the fix.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from bitrl_compile import layouts
from bitrl_compile.bitnet.model import BitNetConfig, BitNetForCausalLM, rope_tables
from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.runtime.files import write_atomic

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


MEM_ENV = "BITRL_MEM_AVAILABLE"  # bytes of memory to assume free instead of /proc/meminfo's MemAvailable


def checkpoint_files(path) -> tuple[Path, dict, list[Path]]:
    """(folder, config.json dict, safetensors files) of a Hugging Face-layout checkpoint folder (or its
    model.safetensors), the config checked as BitNet b1.58 (`BitNetConfig.from_hf`) before any tensor is read. A
    backbone reference (config.json with "bitrl_backbone" and "bitrl_checkpoint": a stock checkpoint folder, see
    `backbone.save_backbone_reference`) gives the referenced checkpoint's config and files plus its own encoder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder; give a BitNet checkpoint folder "
                             "(config.json + model.safetensors)")
    cfg = read_config(folder)
    if isinstance(cfg, dict) and "bitrl_checkpoint" in cfg:
        target = Path(str(cfg["bitrl_checkpoint"]))
        target = target if target.is_absolute() else folder / target
        if not (target / "config.json").is_file():
            raise ModelLoadError(f"{folder / 'config.json'}: bitrl_checkpoint {str(target)!r} is not a checkpoint "
                                 "folder (no config.json); the backbone refers to a checkpoint that moved")
        _, stock, files = checkpoint_files(target)
        own = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
        return folder, {**stock, "bitrl_backbone": cfg.get("bitrl_backbone"), "bitrl_checkpoint": str(target)}, \
            files + own
    BitNetConfig.from_hf(cfg, f"{folder / 'config.json'}")
    if path.is_file() and path.name != "config.json":
        files = [path]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = folder / "model.safetensors.index.json"
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    else:
        raise ModelLoadError(f"{folder}: no model.safetensors (or model.safetensors.index.json); "
                             "BitNet checkpoints are read from safetensors only")
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"{file}: shard named in the index is missing; download it again")
    return folder, cfg, files


def read_config(folder: Path) -> dict:
    """A checkpoint folder's config.json as a dict (not checked as BitNet)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json; a Hugging Face-layout checkpoint is a folder with "
                             "config.json and model.safetensors")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{cfg_path}: not readable JSON ({e}); fix or re-download it") from None


def read_checkpoint(path, mem_available: int | None = None) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(folder, config.json dict, tensors) of a Hugging Face-layout checkpoint folder (or its model.safetensors).
    Refused before any tensor is read when loading it needs more memory than is available (`check_memory`)."""
    from safetensors import SafetensorError, safe_open

    folder, cfg, files = checkpoint_files(path)
    check_memory(folder, cfg, files, mem_available)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                                 "the file is truncated or corrupt, download or save it again") from None
    return folder, cfg, tensors


# ------------------------------------------------------------------------------------------------ memory

def _stored_tensors(file: Path) -> dict[str, tuple[str, int]]:
    """{name: (safetensors dtype, bytes)} from a file's header alone; {} if the header is unreadable (the load
    then reports the file)."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100 << 20:
                return {}
            header = json.loads(f.read(n))
        return {name: (str(h["dtype"]), int(h["data_offsets"][1]) - int(h["data_offsets"][0]))
                for name, h in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        return {}


def memory_needed(cfg: BitNetConfig, files: list[Path]) -> tuple[int, int, int]:
    """(bytes needed to load, bytes of the tensors as stored, bytes of their float32 copies) from config.json and
    the safetensors headers: the loader holds every stored tensor, and a float32 copy of each one that is not
    float32 already (bf16/f16 master weights, packed projections unpacked to their full shape)."""
    stored: dict[str, tuple[str, int]] = {}
    sizes = {}
    for file in files:
        found = _stored_tensors(file)
        stored.update(found)
        sizes[file] = sum(b for _, b in found.values()) if found else file.stat().st_size
    copies = sum(4 * math.prod(shape) for name, shape in expected_shapes(cfg).items()
                 if stored.get(name, ("", 0))[0] != "F32")
    held = sum(sizes.values())
    return held + copies, held, copies


def memory_available(mem_available: int | None = None) -> int | None:
    """Bytes free for a load: `mem_available`, else $BITRL_MEM_AVAILABLE, else /proc/meminfo's MemAvailable (None:
    unknown, no check)."""
    if mem_available is not None:
        return int(mem_available)
    env = os.environ.get(MEM_ENV)
    if env is not None:
        try:
            return int(env)
        except ValueError:
            raise ModelLoadError(f"${MEM_ENV} is {env[:40]!r}; give the available memory in bytes, e.g. "
                                 "8000000000") from None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**8 else f"{n:,}"


def _gib(n: int) -> str:
    """Bytes for a message: 9.63 GiB, 412.5 MiB, 88.1 KiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.{2 if shift == 30 else 1}f} {unit}"
    return f"{n / 1024:.1f} KiB"


def check_memory(folder: Path, hf: dict, files: list[Path], mem_available: int | None = None) -> None:
    """Refuse a checkpoint whose load needs more memory than is available, before reading any tensor."""
    available = memory_available(mem_available)
    if available is None:
        return
    cfg = BitNetConfig.from_hf(hf, f"{folder / 'config.json'}")
    needed, held, copies = memory_needed(cfg, files)
    if needed > available:
        params = sum(math.prod(s) for s in expected_shapes(cfg).values())
        raise CheckpointTooLarge(
            f"{folder}: loading this checkpoint needs {_gib(needed)} ({_count(params)} parameters: "
            f"{_gib(held)} of tensors as stored + {_gib(copies)} of float32 copies) and {_gib(available)} is "
            "available; free memory or use a machine with more")


class CheckpointTooLarge(ModelLoadError):
    """Loading the checkpoint needs more memory than is available."""


def _master_from_packed(name: str, packed: torch.Tensor, scale: torch.Tensor | None, shape, where: str):
    """Float weight W whose absmean ternarization is exactly the packed trits with gamma = 1/weight_scale."""
    n, k = shape
    if scale is None:
        raise ModelLoadError(f"{where}: {name} is packed uint8 but {name}_scale is missing; "
                             "packed BitNet weights need their weight_scale tensor")
    if tuple(packed.shape) != (-(-n // 4), k):
        raise ModelLoadError(f"{where}: {name} has packed shape {list(packed.shape)}; config.json implies "
                             f"[{-(-n // 4)}, {k}] (4 trits per byte along the {n} outputs)")
    if scale.dtype not in _FLOAT_DTYPES or scale.numel() != 1:
        raise ModelLoadError(f"{where}: {name}_scale must be one float, got {scale.dtype} {list(scale.shape)}")
    ws = float(scale.float().reshape(()))
    if not math.isfinite(ws) or ws <= 0:
        raise ModelLoadError(f"{where}: {name}_scale is {ws}; it must be a positive finite 1/gamma")
    try:
        trits = layouts.unpack_hf_bitnet(packed.numpy(), n)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {name}: {e}") from None
    nonzero = float(np.count_nonzero(trits)) / trits.size
    c = np.float32(1.0 / (ws * nonzero)) if nonzero else np.float32(0)
    # torch's allocator (64-byte aligned, unlike numpy's 16): TVM's import takes the tensor without a copy
    weight = torch.empty((n, k), dtype=torch.float32)
    np.multiply(trits, c, out=weight.numpy(), dtype=np.float32)
    return weight


def bitnet_state_dict(cfg: BitNetConfig, tensors: dict[str, torch.Tensor], where: str,
                      ignore_prefixes: tuple[str, ...] = (), embedding_rows: int | None = None,
                      consume: bool = False, progress=None) -> dict[str, torch.Tensor]:
    """Check names, shapes and dtypes of checkpoint tensors against `cfg`; float32 state_dict of BitNetForCausalLM.
    Raises ModelLoadError naming the first missing, unexpected, mis-shaped or non-finite tensor.
    `embedding_rows`: keep only that many rows of embed_tokens (at least one; a state encoder reads no more), so
    the 128,256-row table of 2B4T is never converted to float32. `consume`: pop each stored tensor from `tensors`
    as its float32 copy is made (at most one layer's stored and float copies coexist). `progress(done, total)` is
    called after each layer."""
    expected = expected_shapes(cfg)
    packed_scales = {f"{name}_scale" for name in tensors if tensors[name].dtype == torch.uint8}
    unexpected = [n for n in tensors if n not in expected and n not in packed_scales
                  and not n.endswith("rotary_emb.inv_freq") and not n.startswith(ignore_prefixes)]
    if unexpected:
        name = unexpected[0]
        hint = ("tie_word_embeddings is true in config.json but the file has lm_head.weight; set it to false"
                if name == "lm_head.weight" else "a different architecture, or num_hidden_layers too small?")
        raise ModelLoadError(f"{where}: unexpected tensor {name} ({len(unexpected)} unexpected in all; {hint})")
    state = {}
    for name, shape in expected.items():
        if name not in tensors:
            fix = ("set tie_word_embeddings to true if the output layer shares the embeddings"
                   if name == "lm_head.weight" else "the checkpoint is incomplete or num_hidden_layers is too large")
            raise ModelLoadError(f"{where}: tensor {name} is missing ({fix})")
        t = tensors.pop(name) if consume else tensors[name]
        if name == "lm_head.weight" and embedding_rows is not None:
            continue  # a state encoder has no output layer: not converted (tied to the trimmed table below)
        if name == "model.embed_tokens.weight" and embedding_rows is not None and tuple(t.shape) == shape:
            shape = (max(1, min(embedding_rows, shape[0])), shape[1])
            t = t[:shape[0]].clone()  # not a view: the whole table is released (also when stored as float32)
        if t.dtype == torch.uint8 and name.endswith("_proj.weight") and ".layers." in name:
            t = _master_from_packed(name, t, tensors.get(f"{name}_scale"), shape, where)
        elif t.dtype not in _FLOAT_DTYPES:
            raise ModelLoadError(f"{where}: tensor {name} has dtype {t.dtype}; expected bf16, f16 or f32 master "
                                 "weights (or uint8 packed projections with weight_scale)")
        elif tuple(t.shape) != shape:
            raise ModelLoadError(f"{where}: tensor {name} has shape {list(t.shape)}; config.json implies "
                                 f"{list(shape)}")
        t = t.float()
        if not torch.isfinite(t).all():
            raise ModelLoadError(f"{where}: tensor {name} contains NaN or Inf; the checkpoint is corrupt")
        state[name] = t
        if progress is not None and name.endswith("post_attention_layernorm.weight"):
            progress(int(name.split(".")[2]) + 1, cfg.num_hidden_layers)
    if cfg.tie_word_embeddings or embedding_rows is not None:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def expected_shapes(cfg: BitNetConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and (unpacked) shapes that `cfg` implies; no lm_head when embeddings are tied."""
    d, inter, q, kv = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim,
                       cfg.num_key_value_heads * cfg.head_dim)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "self_attn.attn_sub_norm.weight": (q,), p + "mlp.gate_proj.weight": (inter, d),
                       p + "mlp.up_proj.weight": (inter, d), p + "mlp.down_proj.weight": (d, inter),
                       p + "mlp.ffn_sub_norm.weight": (inter,), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def load_bitnet(path, mem_available: int | None = None) -> BitNetForCausalLM:
    """A Hugging Face-layout BitNet b1.58 checkpoint (folder, or its model.safetensors) as a float32 model.
    `mem_available` (bytes; default $BITRL_MEM_AVAILABLE or MemAvailable): refuse before loading above it."""
    return model_from_checkpoint(*read_checkpoint(path, mem_available))


def model_from_checkpoint(folder: Path, hf: dict, tensors: dict[str, torch.Tensor],
                          embedding_rows: int | None = None, progress=None) -> BitNetForCausalLM:
    """The float32 model of checked checkpoint tensors; each stored tensor is dropped from `tensors` as it is
    converted. `embedding_rows` (for a state encoder, which reads only those rows): embed_tokens keeps its first
    rows (at least one) and lm_head is that trimmed table: the model is then an encoder, not a language model.
    `progress(done, total)`: called after each layer is converted."""
    cfg = BitNetConfig.from_hf(hf, f"{folder / 'config.json'}")
    ignore = ("encoder.",) if "bitrl_backbone" in hf else ()
    state = bitnet_state_dict(cfg, tensors, str(folder), ignore, embedding_rows, consume=True, progress=progress)
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned (no copy of the weights)
        model = BitNetForCausalLM(cfg)
        if embedding_rows is not None:
            rows = state["model.embed_tokens.weight"].shape[0]
            model.model.embed_tokens = torch.nn.Embedding(rows, cfg.hidden_size)
            model.lm_head = torch.nn.Linear(cfg.hidden_size, rows, bias=False)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings or embedding_rows is not None:
        model.lm_head.weight = model.model.embed_tokens.weight
    cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    model.model.rope_cos, model.model.rope_sin = cos, sin
    return model.eval()


def save_bitnet(model: BitNetForCausalLM, folder, *, dtype: torch.dtype = torch.bfloat16, packed: bool = False,
                extra_config: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + model.safetensors in the Hugging Face layout (atomically per file). packed=True stores the
    projections as the 2B4T checkpoint does: uint8 trits packed along the outputs plus weight_scale = 1/gamma."""
    from safetensors.torch import save

    from bitrl_compile.quant import ternarize_weight

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if packed:
        cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "bitlinear",
                                      "quantization_mode": "offline"}
    cfg.update(extra_config or {})
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if packed and name.endswith("_proj.weight") and ".layers." in name:
            w_t, gamma = ternarize_weight(t.detach().float().numpy())
            out[name] = torch.from_numpy(layouts.pack_hf_bitnet(w_t))
            out[f"{name}_scale"] = torch.tensor([1.0 / float(gamma[0])], dtype=dtype)
        else:
            out[name] = t.detach().to(dtype).contiguous()
    for name, t in (extra_tensors or {}).items():
        out[name] = t.detach().float().contiguous()
    write_atomic(folder / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    write_atomic(folder / "model.safetensors", save(out, metadata={"format": "pt"}))
    return folder
