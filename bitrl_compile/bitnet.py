"""BitNet b1.58 transformers (the 2B4T family) as frozen state encoders: model, checkpoints, encoders, compile glue.

Architecture (names and tensor shapes as in Hugging Face's `BitNetForCausalLM`, so checkpoints load both ways):

    tokens -> embed_tokens -> L x [ h += o_proj(attn_sub_norm(attention(input_layernorm(h))))          (SubLN)
                                    h += down_proj(ffn_sub_norm(relu(gate_proj(x))^2 * up_proj(x)))  x = post_attention_layernorm(h) ]
           -> norm -> hidden states                 (BitNetModel)      -> lm_head (not quantized)   (BitNetForCausalLM)

RMSNorm pre-norm; rotary position embeddings (rotate-half, theta from the config); grouped-query attention
(num_key_value_heads <= num_attention_heads), causal; no biases. The seven projections of every layer are
`BitLinear`s: ternary absmean weights per tensor and per-token absmax int8 activations, with the straight-through
functions of `bitrl_compile.quant` (the same math the compiler and the numpy reference use). `quantized=False`
runs them as plain float matmuls of the master weights: that is what transformers' `BitNetModel` computes for a
checkpoint without a quantization_config, and what `pipeline.compile_policy` is given (its ternarize pass
quantizes those master weights with the same formulas).

Checkpoints (`load_bitnet`, `save_bitnet`): a folder with `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`), tensors `model.embed_tokens.weight`, `model.layers.N.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.N.self_attn.attn_sub_norm.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`,
`model.layers.N.mlp.ffn_sub_norm.weight`, `model.layers.N.{input,post_attention}_layernorm.weight`,
`model.norm.weight`, `lm_head.weight` (absent when tie_word_embeddings). Master weights in bf16, f16 or f32; or the
packed form of `microsoft/bitnet-b1.58-2B-4T`: each projection `weight` uint8 [ceil(out/4), in]
(`layouts.pack_hf_bitnet`) plus `weight_scale` = 1/gamma. A packed projection is loaded as the float weight
W = W_t / (weight_scale * f), f = the fraction of non-zero trits: absmean ternarization of W gives back W_t
exactly and gamma = 1/weight_scale (to float32 rounding), so the ternary forward and the compiler reproduce the
packed model.

State encoders (`BitNetBackbone` = encoder + BitNetModel + pooling; features = the last token's final hidden state,
or the mean over tokens):
    numeric   each observation value (or a patch of `patch` values) becomes a token through its own learned
              projection x_j . W_j + b_j (float, like the embedding table), then a learned readout token
              ends the sequence. Observations are normalised first with statistics stored in the checkpoint.
    text      the observation is written as text (`bitrl_compile.runtime.text`, fixed width, byte-level tokens:
              no downloaded tokenizer) and embedded with the model's own `embed_tokens` (vocab >= 256); the
              final ';' is the readout token.
A backbone checkpoint is a BitNet checkpoint whose config.json also holds "bitrl_backbone" (encoder settings,
observation statistics) and whose safetensors also hold `encoder.*`: transformers loads it as a BitNetModel.
`backbone_policy` turns a backbone into the LoadedPolicy `pipeline.compile_policy` compiles (manifest output
{"kind": "features", "dim": D}, `Policy.features(obs)`); `FrozenBitNet` is the trainer's backbone in torch.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitrl_compile import layouts
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.quant import quantize_activations_ste, ternarize_weight_ste
from bitrl_compile.runtime import text as text_io
from bitrl_compile.runtime.artifact import write_atomic

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ config

@dataclass
class BitNetConfig:
    """The architecture fields of a Hugging Face BitNet config.json (defaults: a tiny byte-level model)."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> BitNetConfig:
        """Validate a Hugging Face config dict; ModelLoadError (one line, naming the key) if it is not BitNet b1.58."""
        def bad(msg: str) -> ModelLoadError:
            return ModelLoadError(f"{where}: {msg}")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        if d.get("model_type") not in ("bitnet", None):
            raise bad(f"model_type is {d.get('model_type')!r}, not 'bitnet'; give a BitNet b1.58 checkpoint")
        if d.get("hidden_act", "relu2") != "relu2":
            raise bad(f"hidden_act {d.get('hidden_act')!r} is not supported; BitNet b1.58 2B4T uses 'relu2'")
        if d.get("attention_bias", False) or d.get("mlp_bias", False):
            raise bad("attention_bias/mlp_bias are true; BitNet b1.58 has no biases")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
        if rope_type != "default":
            raise bad(f"rope type {rope_type!r} is not supported (only the default rotary embedding)")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0)) if isinstance(rope, dict) else None
        fields = {}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                raise bad(f"missing key {name!r}")
            fields[name] = d[name]
        fields["num_key_value_heads"] = d.get("num_key_value_heads") or d["num_attention_heads"]
        fields["head_dim"] = d.get("head_dim") or 0
        fields["max_position_embeddings"] = d.get("max_position_embeddings", 2048)
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "head_dim" else 1):
                raise bad(f"{name} must be a positive integer, got {value!r}")
        eps = d.get("rms_norm_eps", 1e-5)
        if not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise bad(f"rms_norm_eps must be a small positive number, got {eps!r}")
        if not isinstance(theta, (int, float)) or theta <= 1:
            raise bad(f"rope_theta must be a number > 1, got {theta!r}")
        cfg = cls(**fields, rms_norm_eps=float(eps), rope_theta=float(theta),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
        if fields["head_dim"] == 0 and cfg.hidden_size % cfg.num_attention_heads:
            raise bad(f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                      f"{cfg.num_attention_heads}; give head_dim")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise bad(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of num_key_value_heads "
                      f"{cfg.num_key_value_heads}")
        if cfg.head_dim % 2:
            raise bad(f"head_dim {cfg.head_dim} must be even for rotary embeddings")
        return cfg

    def to_hf(self) -> dict:
        """config.json contents that transformers' BitNetConfig and our loader both read."""
        return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
                "attention_bias": False, "attention_dropout": 0.0, **asdict(self),
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": False}


# ------------------------------------------------------------------------------------------------ model

class BitLinear(nn.Linear):
    """A bias-free projection. quantized: ternary absmean weight (per tensor) times per-token int8 activations,
    straight-through gradients; otherwise the float master weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.quantized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight)
        return F.linear(quantize_activations_ste(x), ternarize_weight_ste(self.weight))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(head_dim: int, n_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n_positions, head_dim] of the default rotary embedding (frequencies repeated for both halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = BitLinear(cfg.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = BitLinear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.v_proj = BitLinear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.o_proj = BitLinear(self.n_heads * self.head_dim, cfg.hidden_size)
        self.attn_sub_norm = RMSNorm(self.n_heads * self.head_dim, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = h.shape[0], h.shape[1]
        q = self.q_proj(h).reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).reshape(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).reshape(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.n_heads // self.n_kv
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            k = k[:, :, None].expand(b, self.n_kv, groups, n, self.head_dim).reshape(b, self.n_heads, n, -1)
            v = v[:, :, None].expand(b, self.n_kv, groups, n, self.head_dim).reshape(b, self.n_heads, n, -1)
        scores = torch.matmul(q, k.transpose(2, 3)) * (self.head_dim ** -0.5) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        out = out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim)
        return self.o_proj(self.attn_sub_norm(out))


class MLP(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.gate_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = BitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.relu(self.gate_proj(x))
        return self.down_proj(self.ffn_sub_norm(g * g * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class BitNetModel(nn.Module):
    """Token embeddings, decoder layers and the final norm: `forward` returns the normed hidden states [B, T, D]."""

    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        n = h.shape[1]
        if n > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {n} tokens is longer than max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = self.rope_cos[:n], self.rope_sin[:n]
        pos = torch.arange(n, device=h.device)  # causal mask (arange/where: TVM 0.27 cannot legalize full(-inf))
        mask = torch.where(pos[None, :] > pos[:, None], float("-inf"), 0.0).to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)


class BitNetForCausalLM(nn.Module):
    """BitNetModel plus the (float, never quantized) lm_head; state_dict keys are Hugging Face's.
    `model` wraps an existing BitNetModel (e.g. a backbone's) instead of initialising a new one."""

    def __init__(self, cfg: BitNetConfig, model: BitNetModel | None = None):
        super().__init__()
        self.config = cfg
        self.model = model if model is not None else BitNetModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if model is None:
            init_weights(self)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) projections and embeddings, unit norm weights (transformers' initialisation)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


def set_quantized(module: nn.Module, quantized: bool) -> nn.Module:
    """Switch every BitLinear of `module` between the ternary forward and the float master weights."""
    for m in module.modules():
        if isinstance(m, BitLinear):
            m.quantized = quantized
    return module


# ------------------------------------------------------------------------------------------------ checkpoints

def _read_checkpoint(path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(folder, config.json dict, tensors) of a Hugging Face-layout checkpoint folder (or its model.safetensors)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder; give a BitNet checkpoint folder "
                             "(config.json + model.safetensors)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json; a Hugging Face-layout checkpoint is a folder with "
                             "config.json and model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_path}: not readable JSON ({e}); fix or re-download it") from None
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
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"{file}: shard named in the index is missing; download it again")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                                 "the file is truncated or corrupt, download or save it again") from None
    return folder, cfg, tensors


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
        trits = layouts.unpack_hf_bitnet(packed.numpy(), n).astype(np.float32)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {name}: {e}") from None
    nonzero = float(np.mean(trits != 0))
    c = np.float32(1.0 / (ws * nonzero)) if nonzero else np.float32(0)
    return torch.from_numpy(trits * c)


def bitnet_state_dict(cfg: BitNetConfig, tensors: dict[str, torch.Tensor], where: str,
                      ignore_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Check names, shapes and dtypes of checkpoint tensors against `cfg`; float32 state_dict of BitNetForCausalLM.
    Raises ModelLoadError naming the first missing, unexpected, mis-shaped or non-finite tensor."""
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
        t = tensors[name]
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
    if cfg.tie_word_embeddings:
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


def load_bitnet(path) -> BitNetForCausalLM:
    """A Hugging Face-layout BitNet b1.58 checkpoint (folder, or its model.safetensors) as a float32 model."""
    return _model_from(*_read_checkpoint(path))


def _model_from(folder: Path, hf: dict, tensors: dict[str, torch.Tensor]) -> BitNetForCausalLM:
    cfg = BitNetConfig.from_hf(hf, f"{folder / 'config.json'}")
    ignore = ("encoder.",) if "bitrl_backbone" in hf else ()
    state = bitnet_state_dict(cfg, tensors, str(folder), ignore)
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned (no copy of the weights)
        model = BitNetForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
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


# ------------------------------------------------------------------------------------------------ state encoders

class NumericEncoder(nn.Module):
    """[B, obs_dim] normalised observations -> [B, n_tokens + 1, D]: patch j of `patch` values becomes the token
    x_j . W_j + b_j (own projection per patch, so positions need no extra embedding); a learned readout token
    ends the sequence."""

    def __init__(self, obs_dim: int, hidden: int, patch: int = 1):
        super().__init__()
        self.obs_dim, self.patch = obs_dim, patch
        self.n_tokens = -(-obs_dim // patch)
        self.weight = nn.Parameter(torch.randn(self.n_tokens, patch, hidden) / math.sqrt(patch))
        self.bias = nn.Parameter(torch.randn(self.n_tokens, hidden) * 0.02)
        self.readout = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.n_tokens * self.patch - self.obs_dim
        if pad:
            x = F.pad(x, (0, pad))
        x = x.reshape(x.shape[0], self.n_tokens, self.patch, 1)
        tokens = (x * self.weight).sum(dim=2) + self.bias
        return torch.cat((tokens, self.readout.expand(x.shape[0], 1, -1)), dim=1)


class TextEncoder(nn.Module):
    """[B, L] byte codes (float, as the runtime passes them) -> token embeddings of the model's embed_tokens."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(codes.long())


@dataclass
class EncoderSpec:
    kind: str = "numeric"                # "numeric" | "text"
    obs_dim: int = 4
    patch: int = 1                       # numeric: values per token
    decimals: int = 2                    # text: digits after the point
    pool: str = "last"                   # "last" (readout token) | "mean"
    normalize: dict | None = None        # numeric: {"mean", "var", "eps", "clip"} applied before the encoder
    env: str | None = None               # what it was pretrained on (informational)

    def input_length(self) -> int:
        return text_io.text_length(self.obs_dim, self.decimals) if self.kind == "text" else self.obs_dim


class BitNetBackbone(nn.Module):
    """Observation -> features [B, D]: a state encoder, a BitNetModel, and pooling (last token or mean)."""

    def __init__(self, model: BitNetModel, spec: EncoderSpec):
        super().__init__()
        if spec.kind not in ("numeric", "text") or spec.pool not in ("last", "mean"):
            raise ValueError(f"encoder kind {spec.kind!r} / pool {spec.pool!r}: use numeric|text and last|mean")
        if spec.kind == "text" and model.config.vocab_size < 256:
            raise ValueError(f"a text encoder needs byte tokens: vocab_size {model.config.vocab_size} < 256")
        tokens = spec.input_length() if spec.kind == "text" else -(-spec.obs_dim // spec.patch) + 1
        if tokens > model.config.max_position_embeddings:
            raise ValueError(f"the {spec.kind} encoder makes {tokens} tokens, more than max_position_embeddings "
                             f"{model.config.max_position_embeddings}; raise it or use fewer decimals / larger patches")
        self.spec, self.model = spec, model
        self.encoder = NumericEncoder(spec.obs_dim, model.config.hidden_size, spec.patch) \
            if spec.kind == "numeric" else TextEncoder(model.embed_tokens)
        self.dim = model.config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised observations [B, obs_dim] (numeric) or byte codes [B, L] (text); see `prepare`."""
        h = self.model(inputs_embeds=self.encoder(x))
        # the last token by its positive index: TVM's take(mode="fast") reads index -1 out of bounds
        return h[:, h.shape[1] - 1] if self.spec.pool == "last" else h.mean(dim=1)

    def prepare(self, obs: np.ndarray) -> torch.Tensor:
        """Raw observations [B, obs_dim] -> the forward's input, with the runtime's exact float32 operations."""
        x = np.asarray(obs, np.float32).reshape(len(obs), -1)
        if self.spec.kind == "text":
            return torch.from_numpy(text_io.serialize(x, self.spec.decimals).astype(np.float32))
        norm = self.spec.normalize
        if norm:
            x = (x - np.asarray(norm["mean"], np.float32)) / np.sqrt(np.asarray(norm["var"], np.float32)
                                                                    + np.float32(norm.get("eps", 1e-8)))
            if norm.get("clip") is not None:
                x = np.clip(x, -norm["clip"], norm["clip"])
        return torch.from_numpy(np.ascontiguousarray(x, np.float32))

    def features(self, obs: np.ndarray) -> np.ndarray:
        """Raw observations -> float32 features [B, D] (no gradients)."""
        with torch.no_grad():
            return self(self.prepare(obs)).numpy()


def new_backbone(cfg: BitNetConfig, spec: EncoderSpec, seed: int = 0) -> BitNetBackbone:
    torch.manual_seed(seed)
    lm = BitNetForCausalLM(cfg)
    return BitNetBackbone(lm.model, spec)


def save_backbone(backbone: BitNetBackbone, folder, dtype: torch.dtype = torch.float32) -> Path:
    """A BitNet checkpoint (Hugging Face layout, lm_head tied to the embeddings: an encoder has no output layer)
    plus "bitrl_backbone" in config.json and the numeric encoder's encoder.* tensors."""
    cfg = copy.copy(backbone.model.config)
    cfg.tie_word_embeddings = True
    extra = {f"encoder.{k}": v for k, v in backbone.encoder.state_dict().items() if not k.startswith("embed")}
    return save_bitnet(BitNetForCausalLM(cfg, backbone.model), folder, dtype=dtype,
                       extra_config={"bitrl_backbone": asdict(backbone.spec)}, extra_tensors=extra)


def load_backbone(path) -> BitNetBackbone:
    """A backbone checkpoint written by `save_backbone` (or any BitNet checkpoint plus a "bitrl_backbone" entry)."""
    folder, hf, tensors = _read_checkpoint(path)
    if "bitrl_backbone" not in hf:
        raise ModelLoadError(f"{folder}: config.json has no \"bitrl_backbone\" entry; this is a language model, "
                             "not a state encoder: wrap it with BitNetBackbone(load_bitnet(path).model, EncoderSpec(...))")
    try:
        spec = EncoderSpec(**hf["bitrl_backbone"])
    except TypeError as e:
        raise ModelLoadError(f"{folder}/config.json: bad \"bitrl_backbone\" entry ({e})") from None
    enc = {k[len("encoder."):]: v.float() for k, v in tensors.items() if k.startswith("encoder.")}
    backbone = BitNetBackbone(_model_from(folder, hf, tensors).model, spec)
    del tensors
    want = {k: tuple(v.shape) for k, v in backbone.encoder.state_dict().items() if not k.startswith("embed")}
    for name, shape in want.items():
        if name not in enc:
            raise ModelLoadError(f"{folder}: tensor encoder.{name} is missing (the numeric encoder's weights)")
        if tuple(enc[name].shape) != shape:
            raise ModelLoadError(f"{folder}: tensor encoder.{name} has shape {list(enc[name].shape)}; "
                                 f"bitrl_backbone implies {list(shape)}")
    backbone.encoder.load_state_dict(enc, strict=False)
    return backbone.eval()


# ------------------------------------------------------------------------------------------------ compile and train

def backbone_policy(backbone: BitNetBackbone, description: str = "") -> LoadedPolicy:
    """The LoadedPolicy `pipeline.compile_policy` compiles into a "features" artifact (`Policy.features(obs)`).
    The module holds the float master weights: the ternarize pass quantizes them exactly as BitLinear does."""
    module = set_quantized(copy.deepcopy(backbone), False).eval()
    spec = backbone.spec
    if spec.kind == "text":
        inp = {"shape": [spec.obs_dim], "dtype": "float32", "preprocess": "text",
               "text": {"decimals": spec.decimals, "length": spec.input_length()}, "normalize": None}
    else:
        inp = {"shape": [spec.obs_dim], "dtype": "float32", "preprocess": "none", "normalize": spec.normalize}
    inp["max_batch"] = None  # no static buffers for 2**20 rows of attention scores; see pipeline.to_relax
    cfg = backbone.model.config
    desc = description or (f"BitNet b1.58 backbone ({spec.kind} encoder, {cfg.num_hidden_layers} layers, "
                           f"d={cfg.hidden_size}, {spec.pool} token)")
    return LoadedPolicy(module, None, inp, {"kind": "features", "dim": backbone.dim}, "bitnet", desc)


class FrozenBitNet:
    """The trainer's backbone interface (`dim`, `source`, `__call__(obs, update=False) -> [B, dim]`) in torch."""

    def __init__(self, backbone: BitNetBackbone, source: str = "bitnet"):
        self.backbone = set_quantized(backbone, True).eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.dim, self.source = backbone.dim, source

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        return self.backbone.features(np.asarray(obs))


def parameter_count(backbone: nn.Module) -> int:
    return sum(p.numel() for p in backbone.parameters())
