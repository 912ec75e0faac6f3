"""Memory on the device for the 2B4T-shaped backbone (issue 16, item 3): peak RSS of the aarch64 runtime running a
rasp4 artifact under qemu-aarch64, stage by stage, split into weights, activations/workspace, code and qemu.

    nice -n 10 python bench/bitnet_device_memory.py /work/scratch/2b4t-L30-rasp4.bitrl   # about 8 min, writes docs
    python bench/bitnet_device_memory.py ARTIFACT --loaders streamed --batches 1 --no-docs   # one run, printed only

Make the artifact with `python bench/bitnet_scale.py --layers 30 --targets rasp4` (it writes
$BITRL_SCRATCH/2b4t-L30-rasp4.bitrl; 2-3 min and 12 GiB). Each loader runs in a fresh qemu process (the cached
aarch64 Python of `bitrl_compile.devices`, -cpu of the artifact), which reports after each stage (imports, reading
the zip, unpacking the weights, opening lib.so, `features` at each batch): VmHWM (the stage's own peak: it is reset
after each report) and VmRSS of /proc/self/status (under qemu-user: of the qemu process, which holds the guest), and the host's /proc/self/smaps split into the
guest's mappings (those /proc/self/maps, which qemu emulates, lists; guest and host addresses coincide here) and
qemu's own (its binary and heap, and the translation cache: its largest rwx mapping). Loaders:

    load       `runtime.load(path)` as runtime/policy.py reads an artifact
    streamed   `read_artifact(path, params=False)` then `artifact.load_params(art)`: params.safetensors read once,
               a block of rows at a time, into the kernels' layout (runtime/weights.py: read_params), then `Policy`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "bitnet.md"
BEGIN, END = "<!-- bitnet_device_memory.py: begin -->", "<!-- bitnet_device_memory.py: end -->"
SCRATCH = Path(os.environ.get("BITRL_SCRATCH", "/work/scratch"))
DEFAULT = SCRATCH / "2b4t-L30-rasp4.bitrl"
MAKE = "python bench/bitnet_scale.py --layers 30 --targets rasp4"
GIB = 2**30
DEVICE_BUDGET = 1 << 30


# ----------------------------------------------------------------------------- the measured (guest) process

def _ranges(path: str) -> list[tuple[int, int, str]]:
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, parts[1]))
    return out


def memory() -> dict:
    """VmHWM, VmRSS and the resident bytes split into the guest's mappings, qemu's own and its translation cache."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = int(value.split()[0]) * 1024
    guest = sorted((s, e) for s, e, _ in _ranges("/proc/self/maps"))
    split = {"guest": 0, "qemu": 0, "tcg": 0}
    rss, current, flags = {}, None, ""
    with open("/proc/self/smaps") as f:  # qemu-user 7.2 passes it through: the host's view of the process
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:
                current, flags = int(parts[0].split("-")[0], 16), parts[1]
            elif parts and parts[0] == "Rss:" and current is not None:
                rss[current] = (int(parts[1]) * 1024, flags)
    import bisect

    starts = [s for s, _ in guest]
    for start, (size, flags) in rss.items():
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and guest[i][0] <= start < guest[i][1]:
            split["guest"] += size
        else:
            split["qemu"] += size
            if flags == "rwxp":
                split["tcg"] = max(split["tcg"], size)
    return {**status, **split}


def reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux's clear_refs 5; under qemu-user it reaches the qemu process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(path: str, loader: str, batches: list[int]) -> None:
    """Load `path` with `loader` and run features at each batch, printing one JSON line per stage."""
    t0 = time.monotonic()

    def mark(stage: str, **extra) -> None:
        print(json.dumps({"stage": stage, "t": round(time.monotonic() - t0, 1), **memory(), **extra}), flush=True)
        reset_peak()  # VmHWM is then each stage's own peak; the run's is the largest

    mark("python")
    import numpy as np

    from bitrl_compile import runtime
    from bitrl_compile.runtime import artifact, policy, tvm_runtime

    tvm_runtime._import_tvm_ffi()
    mark("imports")
    if loader == "load":
        p = runtime.load(path)
        mark("loaded", params=sum(v.nbytes for v in p._params_np.values()))
    else:
        art = runtime.read_artifact(path, params=False)
        mark("zip read")
        params = artifact.load_params(art)
        nbytes = sum(v.nbytes for v in params.values())
        mark("weights unpacked", params=nbytes)
        p = policy.Policy(art.manifest, art.members[artifact.LIB], params, path, art.members.get(artifact.RUNTIME))
        del params, art
        mark("loaded", params=nbytes)
    shape = p.manifest["input"]["shape"]
    rng = np.random.default_rng(0)
    for batch in batches:
        features = p.features(rng.standard_normal((batch, *shape)).astype(np.float32))
        mark(f"features b={batch}", finite=bool(np.isfinite(features).all()))


# ------------------------------------------------------------------------------------------------ the host

def run(path: Path, loader: str, batches: list[int], cpu: str, log=print) -> list[dict]:
    from bitrl_compile import devices

    cmd = devices.qemu_python_command(cpu) + [str(Path(__file__).resolve()), "--child", loader, str(path),
                                              "--batches", ",".join(map(str, batches))]
    env = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stages = []
    for line in proc.stdout:
        if line.startswith("{"):
            stages.append(json.loads(line))
            s = stages[-1]
            log(f"  [{loader}] {s['stage']:<18} {s['t']:7.1f} s  VmHWM {s['VmHWM'] / 2**20:7.1f} MiB  "
                f"RSS {s['VmRSS'] / 2**20:7.1f} MiB (guest {s['guest'] / 2**20:.1f}, qemu {s['qemu'] / 2**20:.1f})")
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"the guest ({loader}) failed: {err.strip().splitlines()[-1:] or proc.returncode}")
    return stages


def stored_bytes(path: Path) -> dict:
    """Bytes of the artifact's ternary weights as stored (base-3) and unpacked (kernel layout), and the rest."""
    from bitrl_compile.runtime import artifact, weights

    art = artifact.read_artifact(path, params=False, use_env=False)
    layouts = art.manifest.get("weights", {})
    import math

    import numpy as np

    stored = sum(int(s["shape"][0]) * -(-int(s["shape"][1]) // 5) for s in layouts.values())
    unpacked = sum(math.prod(weights.compute_shape(s)) for s in layouts.values())
    return {"stored": stored, "unpacked": unpacked, "lib": art.sizes[artifact.LIB][1],
            "params_member": art.sizes[artifact.PARAMS][1], "file": path.stat().st_size,
            "ternary": int(sum(np.prod(s["shape"]) for s in layouts.values())), "layers": len(layouts),
            "description": art.manifest.get("source", {}).get("description", "")}


def summarize(stages: list[dict]) -> dict:
    by = {s["stage"]: s for s in stages}
    loaded = by["loaded"]
    feats = [s for s in stages if s["stage"].startswith("features")]
    return {"imports_rss": by["imports"]["VmRSS"], "imports_guest": by["imports"]["guest"],
            "loaded_rss": loaded["VmRSS"], "loaded_hwm": loaded["VmHWM"], "params": loaded["params"],
            "code_guest": loaded["guest"] - loaded["params"],
            "workspace": {s["stage"]: s["VmHWM"] - loaded["VmRSS"] for s in feats},  # the stage's own peak
            "hwm": max(s["VmHWM"] for s in stages), "qemu": max(s["qemu"] for s in stages),
            "tcg": max(s["tcg"] for s in stages), "seconds": stages[-1]["t"]}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(r: dict, command: str) -> str:
    b, loaders = r["bytes"], r["loaders"]
    names = {"load": "`runtime.load`", "streamed": "streamed (`load_params`, by hand)"}
    cols = list(loaders)
    s = {k: summarize(v) for k, v in loaders.items()}
    head = "| | " + " | ".join(names[c] for c in cols) + " |"
    lines = [(f"Artifact: `{Path(r['path']).name}`, {b['file']:,} bytes ({b['description']}): {b['layers']} "
              f"ternary projections, {b['ternary']:,} weights; lib.so {b['lib']:,} bytes, params.safetensors "
              f"{b['params_member']:,}."), "",
             head, "|---" * (len(cols) + 1) + "|"]

    def row(label, f):
        lines.append(f"| {label} | " + " | ".join(f(c) for c in cols) + " |")

    row(f"weights as stored (base-3, 1.6 bits each: {mib(b['stored'])})",
        lambda c: "held whole, then copied" if c == "load" else "one block of rows at a time")
    row(f"weights unpacked (kernel layout, 2 bits each: {mib(b['unpacked'])}), and the other parameters",
        lambda c: mib(s[c]["params"]))
    for stage in s[cols[0]]["workspace"]:
        row(f"activations and workspace, `features` {stage.split()[-1]} (peak over the loaded state)",
            lambda c, stage=stage: mib(s[c]["workspace"].get(stage, 0)))
    row("the guest's other pages once loaded: code and runtime (python, numpy, tvm-ffi, libtvm_runtime, lib.so), "
        "and heap that malloc kept after the loader freed it", lambda c: mib(s[c]["code_guest"]))
    row("qemu's own pages (its binary, heap and translation cache)",
        lambda c: f"{mib(s[c]['qemu'])} (cache {mib(s[c]['tcg'])})")
    row("**peak RSS (VmHWM of the qemu process)**", lambda c: f"**{mib(s[c]['hwm'])}**")
    row("peak minus qemu's own pages (what a Pi would hold)", lambda c: f"**{mib(s[c]['hwm'] - s[c]['qemu'])}**")
    row("wall time under qemu, load and every call (cores shared with other jobs)",
        lambda c: f"{s[c]['seconds']:.0f} s")
    lines += ["", "Stage by stage (the stage's peak / RSS at its end, of the qemu process):", "",
              "| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    stages = list(dict.fromkeys(st["stage"] for c in sorted(cols, key=lambda c: -len(loaders[c]))
                                for st in loaders[c]))
    for stage in stages:
        cells = []
        for c in cols:
            hit = next((st for st in loaders[c] if st["stage"] == stage), None)
            cells.append("" if hit is None else f"{mib(hit['VmHWM'])} / {mib(hit['VmRSS'])}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", f"Reproduce: `{command}` ({r['machine']}, {r['qemu']})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", default=str(DEFAULT))
    parser.add_argument("--child")
    parser.add_argument("--batches", default="1,13", help="features calls, in states (the numeric encoder of "
                                                           "CartPole-v1 makes 5 tokens of a state: 13 states, 65)")
    parser.add_argument("--loaders", default="load,streamed")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/bitnet.md")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        child(args.artifact, args.child, batches)
        return 0
    path = Path(args.artifact)
    if not path.is_file():
        print(f"{path} does not exist; make it with `{MAKE}` (a 2B4T-shaped checkpoint with random weights "
              "compiled for rasp4)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    from bitrl_compile import devices
    from bitrl_compile.bench import machine
    from bitrl_compile.runtime import read_artifact

    cpu = devices.qemu_cpu(read_artifact(path, payload=False, use_env=False).manifest)
    report = {"path": str(path), "bytes": stored_bytes(path), "loaders": {},
              "machine": machine.summary(),
              "qemu": subprocess.run([devices.qemu_binary(), "--version"], capture_output=True,
                                     text=True, check=False).stdout.splitlines()[0] + f", -cpu {cpu}"}
    for loader in args.loaders.split(","):
        report["loaders"][loader] = run(path, loader, batches, cpu)
    command = "python bench/bitnet_device_memory.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                        " " + " ".join(sys.argv[1:] if argv is None else argv))
    text = render(report, command)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "bitnet_device_memory.json").write_text(json.dumps(report, indent=1))
    from bitrl_compile.bench.markdown import replace_section

    if not args.no_docs and replace_section(DOCS, BEGIN, END, text):
        print(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
