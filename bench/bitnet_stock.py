"""A stock Hugging Face BitNet checkpoint through `bitrl-compile FOLDER --encoder text|numeric --env ID`: what the
features artifact keeps of the checkpoint (no lm_head; of embed_tokens only the rows its encoder reads), in bytes.

    nice -n 10 python bench/bitnet_stock.py                       # a 32k-vocabulary model, about a minute
    python bench/bitnet_stock.py --vocab 128256 --hidden 256      # the 2B4T vocabulary at a small width

The checkpoint: random weights (seed 0), untied lm_head (the worst case: both [vocab, d] tensors in the file),
saved in f32, bf16 and the packed 2B4T layout. Each row compiles it for the host with the CLI; "all rows" compiles the
same text backbone with the whole embedding table (what the artifact held before it was trimmed). The last table
is arithmetic from the published 2B4T shapes (vocab 128256, d 2560, tied embeddings).
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import torch
from click.testing import CliRunner

from bitrl_compile import bitnet, pipeline
from bitrl_compile.bitnet import backbone as backbone_module
from bitrl_compile.cli import main as cli_main


def params_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        return z.getinfo("params.safetensors").file_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = bitnet.BitNetConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64)
    tmp = Path(tempfile.mkdtemp(prefix="bitnet-stock-"))
    torch.manual_seed(0)
    model = bitnet.BitNetForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    rows, refused = [], []
    for layout in ("f32", "bf16", "packed"):
        folder = bitnet.save_bitnet(model, tmp / layout, dtype=torch.bfloat16 if layout != "f32" else torch.float32,
                                    packed=layout == "packed")
        size = (folder / "model.safetensors").stat().st_size
        for encoder in ("text", "numeric"):
            out = tmp / f"{layout}-{encoder}.bitrl"
            r = CliRunner().invoke(cli_main, [str(folder), "--encoder", encoder, "--env", "CartPole-v1", "-o",
                                              str(out)])
            if r.exit_code:
                refused.append(f"{layout} -> {encoder}: exit {r.exit_code}, " + next(
                    (line for line in r.output.splitlines() if line.startswith("bitrl-compile:")), "?"))
                continue
            rows.append((f"{layout} safetensors -> {encoder} encoder", size, out.stat().st_size, params_bytes(out)))
    spec = bitnet.EncoderSpec(kind="text", obs_dim=4)
    full = bitnet.BitNetBackbone(bitnet.load_bitnet(tmp / "f32").model, spec)
    keep = backbone_module.embedding_rows
    backbone_module.embedding_rows = lambda s: cfg.vocab_size  # the whole table, as before trimming
    try:
        out = pipeline.compile_policy(bitnet.backbone_policy(full), "host", tmp / "all-rows.bitrl").path
    finally:
        backbone_module.embedding_rows = keep
    rows.append(("f32 safetensors -> text encoder, all embedding rows (before)",
                 (tmp / "f32" / "model.safetensors").stat().st_size, out.stat().st_size, params_bytes(out)))
    print(f"Checkpoint: vocab {cfg.vocab_size}, d {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
          f"{cfg.num_hidden_layers} layers, untied lm_head; compiled for the host.\n")
    print("| input -> artifact | checkpoint bytes | artifact bytes | params.safetensors bytes | smaller |")
    print("|---|---:|---:|---:|---:|")
    for name, ckpt, art, params in rows:
        print(f"| {name} | {ckpt:,} | {art:,} | {params:,} | {ckpt / art:.1f}x |")
    for line in refused:
        print(f"\nrefused: {line}")
    text_rows = backbone_module.embedding_rows(spec)
    d, vocab = 2560, 128256
    print(f"\n2B4T shapes (arithmetic): embed_tokens {vocab:,} x {d} = {vocab * d * 4:,} bytes as float32 "
          f"({vocab * d * 2:,} in bf16); the text encoder keeps {text_rows} rows = {text_rows * d * 4:,} bytes, the "
          f"numeric encoder none; lm_head (tied in 2B4T) is never in the artifact.")


if __name__ == "__main__":
    main()
