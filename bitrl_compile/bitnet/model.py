"""The BitNet b1.58 transformer (the 2B4T family) in torch: config, BitLinear, BitNetModel, BitNetForCausalLM.

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

Checkpoints of these models are read and written by `bitrl_compile.bitnet.checkpoint`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitrl_compile.loaded import ModelLoadError
from bitrl_compile.quant import bitlinear_ste

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


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
        archs = d.get("architectures")
        if d.get("model_type") is None and isinstance(archs, list) and archs and not any(
                "BitNet" in str(a) for a in archs):
            raise bad(f"architectures is {archs!r}, not ['BitNetForCausalLM']; give a BitNet b1.58 checkpoint")
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
        return bitlinear_ste(x, self.weight)


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
