"""BitNet b1.58 at the published 2B4T shape: compile time, peak memory and artifact bytes (issue 16, item 2).

    python bench/bitnet_scale.py [--layers 2,4,30] [--targets host,rasp4] [--folder /work/scratch/bitnet-2b4t]

Generates (once, if missing) a checkpoint of the 2B4T configuration with random weights in the published packed
layout (uint8 projections packed 4 trits per byte along the outputs + bf16 weight_scale, bf16 embeddings and
norms; written tensor by tensor, never a 2.4 B-parameter model in memory), then for each depth (a copy of the
checkpoint of its own with the first N layers' shapes) compiles it with
`bitrl-compile FOLDER --encoder numeric --env CartPole-v1 -t TARGET` in a subprocess under /usr/bin/time -v and
prints: layers, parameters, compile wall time, peak RSS, artifact bytes against the bf16 and packed safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitrl_compile.bitnet.synthetic import CONFIG_2B4T, write_packed_checkpoint

SCRATCH = Path(os.environ.get("BITRL_SCRATCH", "/work/scratch"))


def checkpoint(layers: int, log=print) -> Path:
    """The 2B4T-shaped packed checkpoint with `layers` layers under SCRATCH (generated if missing)."""
    folder = SCRATCH / f"bitnet-2b4t-L{layers}"
    if not (folder / "model.safetensors").is_file():
        t0 = time.perf_counter()
        log(f"generating {folder} ...")
        write_packed_checkpoint(folder, {**CONFIG_2B4T, "num_hidden_layers": layers}, log=log)
        log(f"generated {folder} in {time.perf_counter() - t0:.0f} s "
            f"({(folder / 'model.safetensors').stat().st_size / 2**30:.2f} GiB)")
    return folder


def parameters(cfg: dict) -> int:
    """Parameters of the checkpoint (projections unpacked, tied embeddings once): 2.41 B for 2B4T."""
    from bitrl_compile import bitnet

    return sum(math.prod(s) for s in bitnet.expected_shapes(bitnet.BitNetConfig.from_hf(cfg)).values())


def compile_once(folder: Path, target: str, out: Path, log=print) -> dict:
    """`bitrl-compile FOLDER --encoder numeric --env CartPole-v1 -t TARGET` under /usr/bin/time -v: wall time, peak
    RSS (the process's maximum resident set) and the artifact's bytes; the compile's progress lines go to `log`."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "bitrl_compile.cli", str(folder), "--encoder", "numeric",
           "--env", "CartPole-v1", "-t", target, "-o", str(out), "--force"]
    env = {**os.environ, "BITRL_MEM_AVAILABLE": os.environ.get("BITRL_MEM_AVAILABLE", str(64 << 30))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("  [") or "Error" in line:
            log(line.rstrip())
    proc.wait()
    wall = time.perf_counter() - t0
    text = "".join(lines)
    refused = proc.returncode == 3 and "disagrees with the numpy reference" in text  # see docs/bitnet.md, Scale
    if proc.returncode != 0 and not refused:
        raise RuntimeError(f"compile failed ({proc.returncode}):\n{text[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    return {"wall_s": wall, "peak_rss": rss, "artifact_bytes": None if refused else out.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,4,30", help="depths to compile (comma-separated), at the 2B4T width")
    ap.add_argument("--targets", default="host", help="comma-separated: host, rasp4")
    args = ap.parse_args()
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        folder = checkpoint(layers)
        cfg = json.loads((folder / "config.json").read_text())
        n = parameters(cfg)
        for target in args.targets.split(","):
            out = SCRATCH / f"2b4t-L{layers}-{target}.bitrl"
            print(f"compiling {layers} layers for {target} ...", flush=True)
            r = compile_once(folder, target, out)
            rows.append({"layers": layers, "target": target, "params": n, **r,
                         "bf16_bytes": 2 * n, "packed_bytes": (folder / "model.safetensors").stat().st_size})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| layers | target | parameters | compile wall | peak RSS | artifact | bf16 safetensors | packed "
          "safetensors | artifact / packed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['target']} | {r['params'] / 1e9:.3f} B | {r['wall_s']:.0f} s | "
              f"{r['peak_rss'] / 2**30:.2f} GiB | {_mib(r['artifact_bytes'])} | "
              f"{r['bf16_bytes'] / 2**30:.2f} GiB | {r['packed_bytes'] / 2**30:.2f} GiB | "
              f"{_ratio(r['artifact_bytes'], r['packed_bytes'])} |")


def _mib(n) -> str:
    return "refused by the check" if n is None else f"{n / 2**20:.1f} MiB"


def _ratio(a, b) -> str:
    return "-" if a is None else f"{a / b:.3f}"


if __name__ == "__main__":
    main()
