"""BitNet b1.58 models as frozen state encoders: encoders, `BitNetBackbone`, its checkpoints, compile and train glue.

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

from bitrl_compile.bitnet.checkpoint import (
    checkpoint_files,
    model_from_checkpoint,
    read_checkpoint,
    save_bitnet,
)
from bitrl_compile.bitnet.model import BitNetConfig, BitNetForCausalLM, BitNetModel, set_quantized
from bitrl_compile.loaded import LoadedPolicy, ModelLoadError
from bitrl_compile.runtime import text as text_io
from bitrl_compile.runtime.files import write_atomic
from bitrl_compile.runtime.policy import postprocess


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


def check_encoder(cfg: BitNetConfig, spec: EncoderSpec) -> None:
    """ValueError (one line) if `spec` cannot sit in front of a model of config `cfg`."""
    if spec.kind not in ("numeric", "text") or spec.pool not in ("last", "mean"):
        raise ValueError(f"encoder kind {spec.kind!r} / pool {spec.pool!r}: use numeric|text and last|mean")
    if spec.kind == "text" and cfg.vocab_size < 256:
        raise ValueError(f"a text encoder needs byte tokens: vocab_size {cfg.vocab_size} < 256")
    tokens = spec.input_length() if spec.kind == "text" else -(-spec.obs_dim // spec.patch) + 1
    if tokens > cfg.max_position_embeddings:
        raise ValueError(f"the {spec.kind} encoder makes {tokens} tokens, more than max_position_embeddings "
                         f"{cfg.max_position_embeddings}; raise it or use fewer decimals / larger patches")


class BitNetBackbone(nn.Module):
    """Observation -> features [B, D]: a state encoder, a BitNetModel, and pooling (last token or mean)."""

    def __init__(self, model: BitNetModel, spec: EncoderSpec):
        super().__init__()
        check_encoder(model.config, spec)
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


def load_backbone(path, mem_available: int | None = None) -> BitNetBackbone:
    """A backbone checkpoint written by `save_backbone` (or any BitNet checkpoint plus a "bitrl_backbone" entry), or
    a reference written by `save_backbone_reference`."""
    folder, hf, _ = checkpoint_files(path)
    if "bitrl_backbone" not in hf:
        raise ModelLoadError(f"{folder}: config.json has no \"bitrl_backbone\" entry: a language model, not a state "
                             "encoder; give --encoder text|numeric and --env ID (or in Python: stock_backbone(path, "
                             "EncoderSpec(...)))")
    folder, hf, tensors = read_checkpoint(path, mem_available)
    try:
        spec = EncoderSpec(**hf["bitrl_backbone"])
    except TypeError as e:
        raise ModelLoadError(f"{folder}/config.json: bad \"bitrl_backbone\" entry ({e})") from None
    enc = {k[len("encoder."):]: v.float() for k, v in tensors.items() if k.startswith("encoder.")}
    rows = embedding_rows(spec) if "bitrl_checkpoint" in hf else None  # a stock checkpoint's table: the rows read
    backbone = BitNetBackbone(model_from_checkpoint(folder, hf, tensors, rows).model, spec)
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


# ------------------------------------------------------------------------------------------------ stock checkpoints

def stock_backbone(path, spec: EncoderSpec, *, seed: int = 0, mem_available: int | None = None,
                   trim_embeddings: bool = False, progress=None) -> BitNetBackbone:
    """A Hugging Face BitNet checkpoint (a language model: no "bitrl_backbone" entry) as a state encoder: the same as
    `torch.manual_seed(seed); BitNetBackbone(load_bitnet(path).model, spec)` (the numeric encoder's projections are
    drawn from `seed`; the global RNG is left alone). The config, the encoder and the memory are checked before any
    tensor is read. trim_embeddings: embed_tokens keeps only the rows the encoder reads (`embedding_rows`; the
    2B4T table is 1.3 GB in float32), lm_head is dropped: for a backbone loaded to be compiled.
    `progress(done, total)` is called after each layer is loaded."""
    folder, hf, _ = checkpoint_files(path)
    if "bitrl_backbone" in hf:
        raise ModelLoadError(f"{folder}: a state encoder already (\"bitrl_backbone\" in config.json); use it as it "
                             "is, without --encoder/--pool/--decimals (load_backbone)")
    try:
        check_encoder(BitNetConfig.from_hf(hf, f"{folder / 'config.json'}"), spec)
    except ModelLoadError:
        raise
    except ValueError as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    folder, hf, tensors = read_checkpoint(path, mem_available)
    model = model_from_checkpoint(folder, hf, tensors, embedding_rows(spec) if trim_embeddings else None,
                                  progress).model
    del tensors
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BitNetBackbone(model, spec).eval()


def save_backbone_reference(folder, checkpoint, spec: EncoderSpec, *, seed: int = 0) -> Path:
    """A backbone folder that refers to a stock checkpoint instead of copying it: config.json holds
    "bitrl_backbone" (the encoder) and "bitrl_checkpoint" (the checkpoint folder, absolute), model.safetensors the
    numeric encoder's projections (drawn from `seed` as `stock_backbone` draws them). `load_backbone(folder)`
    gives the backbone `stock_backbone(checkpoint, spec, seed=seed)` gives; `bitrl-compile FOLDER` compiles it."""
    from safetensors.torch import save

    ckpt, hf, _ = checkpoint_files(checkpoint)
    if "bitrl_backbone" in hf:
        raise ModelLoadError(f"{ckpt}: a state encoder already (\"bitrl_backbone\" in config.json); use it as it is")
    cfg = BitNetConfig.from_hf(hf, f"{ckpt / 'config.json'}")
    try:
        check_encoder(cfg, spec)
    except ValueError as e:
        raise ModelLoadError(f"{ckpt}: {e}") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.kind == "numeric":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # BitNetBackbone's first draws are its NumericEncoder's
            encoder = NumericEncoder(spec.obs_dim, cfg.hidden_size, spec.patch)
        write_atomic(folder / "model.safetensors", save(
            {f"encoder.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}))
    else:
        (folder / "model.safetensors").unlink(missing_ok=True)
    entry = {"bitrl_backbone": asdict(spec), "bitrl_checkpoint": str(ckpt.resolve()), "bitrl_encoder_seed": seed}
    write_atomic(folder / "config.json", (json.dumps(entry, indent=2) + "\n").encode())
    return folder


# ------------------------------------------------------------------------------------------------ compile and train

TEXT_BYTES = b" +-.0123456789;"  # every byte runtime.text.serialize writes (signed fixed-width numbers, ';')


def embedding_rows(spec: EncoderSpec) -> int:
    """Rows of embed_tokens the encoder reads: byte codes 0..max(TEXT_BYTES) for text, none for numeric."""
    return max(TEXT_BYTES) + 1 if spec.kind == "text" else 0


def backbone_policy(backbone: BitNetBackbone, description: str = "", *, copy_module: bool = True) -> LoadedPolicy:
    """The LoadedPolicy `pipeline.compile_policy` compiles into a "features" artifact (`Policy.features(obs)`).
    The module holds the float master weights: the ternarize pass quantizes them exactly as BitLinear does. It has
    no lm_head, and of embed_tokens only the rows the encoder reads (`embedding_rows`; one zero row for numeric).
    copy_module=False uses `backbone` itself (no second copy of the weights; the backbone is then float and
    trimmed: for one loaded only to be compiled)."""
    emb = backbone.model.embed_tokens
    rows = embedding_rows(backbone.spec)
    trimmed = nn.Embedding(max(rows, 1), emb.embedding_dim)
    with torch.no_grad():
        trimmed.weight.zero_()
        trimmed.weight[:rows] = emb.weight[:rows]
    if copy_module:
        module = copy.deepcopy(backbone, {id(emb): trimmed})
    else:
        module = backbone
        module.model.embed_tokens = trimmed
        if isinstance(module.encoder, TextEncoder):
            module.encoder.embed_tokens = trimmed
    module = set_quantized(module, False).eval()
    spec, cfg = backbone.spec, backbone.model.config
    desc = description or (f"BitNet b1.58 backbone ({spec.kind} encoder, {cfg.num_hidden_layers} layers, "
                           f"d={cfg.hidden_size}, {spec.pool} token)")
    return LoadedPolicy(module, None, input_spec(backbone), {"kind": "features", "dim": backbone.dim}, "bitnet", desc)


def input_spec(backbone: BitNetBackbone) -> dict:
    """The manifest's input spec of a backbone: observations, their text serialisation or normalisation."""
    spec = backbone.spec
    if spec.kind == "text":
        inp = {"shape": [spec.obs_dim], "dtype": "float32", "preprocess": "text",
               "text": {"decimals": spec.decimals, "length": spec.input_length()}, "normalize": None}
    else:
        inp = {"shape": [spec.obs_dim], "dtype": "float32", "preprocess": "none", "normalize": spec.normalize}
    inp["max_batch"] = None  # no static buffers for 2**20 rows of attention scores; see pipeline.to_relax
    return inp


class FrozenBitNet:
    """A BitNet backbone frozen for a trainer (`dim`, `source`, `__call__(obs, update=False) -> [B, dim]`, in
    torch), with the policy interface (runtime.PolicyLike) of a compiled "features" artifact."""

    def __init__(self, backbone: BitNetBackbone, source: str = "bitnet"):
        self.backbone = set_quantized(backbone, True).eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.dim, self.source = backbone.dim, source
        self.manifest = {"input": input_spec(backbone), "output": {"kind": "features", "dim": backbone.dim}}

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        return self.backbone.features(np.asarray(obs))

    def features(self, obs) -> np.ndarray:
        """Features [D] for one observation or [B, D] for a batch."""
        x = np.asarray(obs)
        return self(x[None])[0] if x.ndim == 1 else self(x)

    forward = features  # a backbone's raw output is its features

    def act(self, obs, deterministic: bool = True, rng: np.random.Generator | None = None):
        """A backbone has no actions: the runtime's ValueError for output kind "features"."""
        return postprocess(self.manifest["output"], self.forward(obs), deterministic, rng, self.source)

    def close(self) -> None:
        """Nothing to release (the module belongs to the caller)."""


def parameter_count(backbone: nn.Module) -> int:
    return sum(p.numel() for p in backbone.parameters())
