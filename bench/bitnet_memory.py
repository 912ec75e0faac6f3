"""Memory of a >= 10M-parameter BitNet b1.58 backbone: artifact bytes vs fp32 safetensors, and peak RSS of the runtime
process vs a torch fp32 process doing the same forward (each in a fresh child process).

    nice -n 10 python bench/bitnet_memory.py                  # writes the table into docs/bitnet.md (about 2 min)
    python bench/bitnet_memory.py --layers 2 --no-docs        # a quicker look, printed only

The backbone: hidden 512, FFN 1376, 4 layers, 8 query / 2 key-value heads, numeric encoder for 8 observation values
(LunarLander-sized), 11.2M parameters, random weights (seed 0: bytes and RSS do not depend on training). It is saved
as a BitNet checkpoint in float32 (the baseline file) and compiled with `pipeline.compile_policy` for the host and
rasp4. Peak RSS is VmHWM from the child's own /proc/self/status after loading and `--calls` features() calls at
batch 1 and 16 (getrusage's ru_maxrss is not used: Linux carries the parent's high-water mark over an exec).
Children: the runtime (`bitrl_compile.runtime.load(...).features`, numpy + tvm-ffi + libtvm_runtime.so, no torch),
torch fp32 (`bitnet.load_backbone` of the float32 checkpoint, BitLinear layers switched to float, `torch.inference_mode`),
and the bare imports of each (no model) so that the model's own share can be read off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bitrl_compile.bench import machine

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "bitnet.md"
BEGIN, END = "<!-- bitnet_memory.py: begin -->", "<!-- bitnet_memory.py: end -->"


def child(kind: str, path: str, obs_dim: int, calls: int) -> dict:
    """The measured process: load what `kind` needs, run the forward, report VmHWM. Imports happen here."""
    import numpy as np

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((b, obs_dim)).astype(np.float32) for b in (1, 16)]
    if kind in ("runtime", "runtime-import"):
        from bitrl_compile.runtime import load

        if kind == "runtime":
            policy = load(path)
            for obs in batches * calls:
                policy.features(obs)
    elif kind in ("torch", "torch-import"):
        import torch

        torch.set_num_threads(1)
        if kind == "torch":
            from bitrl_compile import bitnet

            backbone = bitnet.set_quantized(bitnet.load_backbone(path), False).eval()
            with torch.inference_mode():
                for obs in batches * calls:
                    backbone(backbone.prepare(obs))
    elif kind != "python":
        raise ValueError(kind)
    modules = sorted(m for m in ("torch", "tvm", "tvm_ffi", "numpy") if m in sys.modules)
    return {**machine.status_bytes(), "modules": modules}


def run_child(kind: str, path: Path, obs_dim: int, calls: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path), "--obs-dim", str(obs_dim),
           "--calls", str(calls)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def measure(args) -> dict:
    import torch

    from bitrl_compile import bitnet, pipeline

    cfg = bitnet.BitNetConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16)
    backbone = bitnet.new_backbone(cfg, bitnet.EncoderSpec(obs_dim=args.obs_dim), seed=0).eval()
    work = Path(tempfile.mkdtemp(prefix="bitnet-memory-"))
    bitnet.save_backbone(backbone, work / "fp32", dtype=torch.float32)
    fp32_bytes = (work / "fp32" / "model.safetensors").stat().st_size
    bitnet.save_backbone(backbone, work / "bf16", dtype=torch.bfloat16)
    projections = [m for m in backbone.modules() if isinstance(m, bitnet.BitLinear)]
    fp32_weight_bytes = sum(m.weight.numel() * 4 for m in projections)
    report = {"params": bitnet.parameter_count(backbone), "projection_params": fp32_weight_bytes // 4,
              "config": vars(args), "fp32_file": fp32_bytes,
              "bf16_file": (work / "bf16" / "model.safetensors").stat().st_size,
              "fp32_projection_bytes": fp32_weight_bytes, "artifacts": {}}
    for target in args.targets:
        path = work / f"{target}.bitrl"
        compiled = pipeline.compile_policy(bitnet.backbone_policy(backbone), target, path)
        with zipfile.ZipFile(path) as z:
            members = {i.filename: {"bytes": i.file_size, "stored": i.compress_size} for i in z.infolist()}
        weight_bytes = sum(compiled.params[name].nbytes for name in compiled.manifest["weights"])
        report["artifacts"][target] = {"bytes": path.stat().st_size, "members": members,
                                       "ternary_weight_bytes": weight_bytes,
                                       "other_param_bytes": sum(v.nbytes for k, v in compiled.params.items()
                                                                if k not in compiled.manifest["weights"])}
    host = work / "host.bitrl"
    report["rss"] = {kind: run_child(kind, host if kind.startswith("runtime") else work / "fp32", args.obs_dim,
                                     args.calls)
                     for kind in ("python", "runtime-import", "runtime", "torch-import", "torch")}
    report["machine"] = f"{machine.summary()}, torch {torch.__version__}"
    return report


def render(r: dict, command: str) -> str:
    a = r["artifacts"]
    rows = [["fp32 safetensors (baseline)", f"{r['fp32_file']:,}", "1.0x", f"{r['fp32_projection_bytes']:,}", "1.0x"],
            ["bf16 safetensors (how 2B4T master weights ship)", f"{r['bf16_file']:,}",
             f"{r['fp32_file'] / r['bf16_file']:.1f}x", f"{r['fp32_projection_bytes'] // 2:,}", "2.0x"]]
    for target, v in a.items():
        rows.append([f"policy.bitrl, {target}", f"{v['bytes']:,}", f"**{r['fp32_file'] / v['bytes']:.1f}x**",
                     f"{v['ternary_weight_bytes']:,}", f"**{r['fp32_projection_bytes'] / v['ternary_weight_bytes']:.1f}x**"])
    lines = [(f"Backbone: {r['params']:,} parameters ({r['projection_params']:,} in the 28 ternary projections; "
             f"hidden {r['config']['hidden']}, FFN {r['config']['ffn']}, {r['config']['layers']} layers, 8/2 heads, "
             f"numeric encoder for {r['config']['obs_dim']} values)."), "",
             "| file | bytes | smaller than fp32 | projection weights, bytes | smaller than fp32 |",
             "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    host = a.get("host", next(iter(a.values())))
    m = host["members"]
    lines += ["", (f"Inside the host artifact (a zip): lib.so {m['lib.so']['bytes']:,} bytes "
              f"({m['lib.so']['stored']:,} stored), params.safetensors {m['params.safetensors']['bytes']:,} "
              f"(ternary weights base-3, 1.6 bits each: {host['ternary_weight_bytes']:,}; norms, encoder, RoPE "
              f"tables, scales and zero biases in float32: {host['other_param_bytes']:,})."), ""]
    rss = r["rss"]
    base = {"runtime": rss["runtime-import"]["VmHWM"], "torch": rss["torch-import"]["VmHWM"]}
    lines += ["| process (fresh child, batch 1 and 16) | peak RSS | model's share (peak minus the bare imports) |",
              "|---|---:|---:|",
              f"| bare python | {mib(rss['python']['VmHWM'])} | |",
              f"| runtime imports only (numpy, tvm-ffi) | {mib(base['runtime'])} | |",
              (f"| **runtime: load policy.bitrl + features()** | **{mib(rss['runtime']['VmHWM'])}** | "
              f"{mib(rss['runtime']['VmHWM'] - base['runtime'])} |"),
              f"| torch import only | {mib(base['torch'])} | |",
              (f"| **torch fp32: load the fp32 checkpoint + the same forward** | **{mib(rss['torch']['VmHWM'])}** | "
              f"{mib(rss['torch']['VmHWM'] - base['torch'])} |"),
              "", (f"Peak RSS, torch fp32 / runtime: **{rss['torch']['VmHWM'] / rss['runtime']['VmHWM']:.1f}x** "
              f"(model's share: {(rss['torch']['VmHWM'] - base['torch']) / max(rss['runtime']['VmHWM'] - base['runtime'], 1):.1f}x)."),
              "", (f"torch's share holds the fp32 weights ({mib(r['fp32_file'])}), the pages of the safetensors file "
                   "they were read from (mapped, file-backed) and torch's working memory. A lower bound for any torch "
                   f"fp32 process is its import plus the weights, {mib(base['torch'] + r['fp32_file'])}: "
                   f"{(base['torch'] + r['fp32_file']) / rss['runtime']['VmHWM']:.1f}x the runtime's peak. The "
                   "runtime's share holds the unpacked kernel-layout weights (2 bits per weight), the artifact's bytes "
                   "and transient int8 codes while base-3 weights are unpacked at load (a layer at a time)."),
              "", f"Reproduce: `{command}` ({r['machine']})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--path")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--obs-dim", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--targets", nargs="+", default=["host", "rasp4"])
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/bitnet.md")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.path, args.obs_dim, args.calls)))
        return 0
    report = measure(args)
    command = "python bench/bitnet_memory.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + " ".join(sys.argv[1:] if argv is None else argv))
    text = render(report, command)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "bitnet_memory.json").write_text(json.dumps(report, indent=1))
    from bitrl_compile.bench.markdown import replace_section  # here: the measured children import no more

    if not args.no_docs and replace_section(DOCS, BEGIN, END, text):
        print(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
