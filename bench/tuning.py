"""Tuned vs default schedule of the BitLinear kernel, on the layer shapes of `bitrl-compile bench-kernels`.

    python bench/tuning.py                                  # N = K in 64..4096, batch 1 and 32, 32 trials each, host
    python bench/tuning.py --target x86-avx2 --db targets/tuned   # also store the records in the repository
    python bench/tuning.py --sizes 1024 --batches 1 --trials 8    # what CI runs (about a minute)
    python bench/tuning.py --markdown docs/tuning.md --json docs/tuning.json

For each square layer and batch it runs `bitrl_compile.targets.autotune.tune` (MetaSchedule over the
kernel's schedule knobs, every candidate checked against the numpy reference), then prints the default
and the tuned kernel's time measured side by side in this run (TVM's time_evaluator, one thread,
taking turns), the speedup, how far each is from the bandwidth bound (weight bytes / numpy copy
bandwidth of a buffer of the same size), and the knobs. Without --db the records go to a temporary
folder and the repository is left alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bitrl_compile.bench.kernels import copy_bandwidth
from bitrl_compile.bench.machine import machine
from bitrl_compile.bench.markdown import replace_section
from bitrl_compile.runtime.weights import tiles_packed_shape
from bitrl_compile.targets import autotune, get_target, kernel_spec, tuning, tvm_target


def run(sizes, batches, trials: int, target: str, db: str | None, threads: int, log=print) -> dict:
    spec = kernel_spec(tvm_target(get_target(target)))
    rows, started = [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bitrl-bench-tuning-") as tmp:
        for n in sizes:
            key = tuning.KernelKey(n, n, "none")
            t0 = time.monotonic()
            results, _, _ = autotune.tune([key], target, trials=trials, batches=batches, db=db or tmp,
                                           threads=threads, log=lambda s: None)
            seconds = time.monotonic() - t0
            weight_bytes = int(np.prod(tiles_packed_shape(n, n, spec.layout)))
            bound_us = weight_bytes / copy_bandwidth(weight_bytes) * 1e6
            for r in results:
                rows.append({"n": n, "batch": r.batch, "trials": r.trials, "default_us": r.default_us,
                             "tuned_us": r.tuned_us, "speedup": r.speedup, "bound_us": bound_us,
                             "knobs": {k: v for k, v in r.knobs.items() if v != 1}, "stored": r.stored,
                             "tuning_s": seconds / len(results)})
                log(format_row(rows[-1]))
    return {"meta": {"target": target, "isa": spec.isa, "trials": trials, "threads": threads,
                     "minutes": (time.monotonic() - started) / 60, "machine": machine(),
                     "commit": _commit(), "database": str(db) if db else None},
            "rows": rows}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


HEADER = (f"{'N=K':>5} {'batch':>5} {'trials':>6} | {'default µs':>10} {'tuned µs':>9} {'speedup':>8} | "
          f"{'default/bound':>13} {'tuned/bound':>11} | {'tuning s':>8}  knobs")


def format_row(r: dict) -> str:
    knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "(default)"
    return (f"{r['n']:>5} {r['batch']:>5} {r['trials']:>6} | {r['default_us']:>10.2f} {r['tuned_us']:>9.2f} "
            f"{r['speedup']:>7.2f}x | {r['default_us'] / r['bound_us']:>12.1f}x {r['tuned_us'] / r['bound_us']:>10.1f}x"
            f" | {r['tuning_s']:>8.0f}  {knobs}")


def report(result: dict, command: str) -> str:
    m = result["meta"]
    title = (f"bitrl-compile tuning benchmark: target {m['target']} ({m['isa']} kernels), {m['trials']} "
             f"MetaSchedule trials per layer and batch, {m['threads']} thread(s), {m['minutes']:.1f} min in all")
    lines = [title,
             f"machine: {m['machine']['cpu']}, {m['machine']['cores']} cores; commit {m['commit']}",
             f"command: {command}", "", HEADER, "-" * len(HEADER)]
    lines += [format_row(r) for r in result["rows"]]
    lines += ["", "default/tuned µs: one call, measured side by side in this run (TVM time_evaluator, taking turns, best of 9);",
              "bound: 2-bit weight bytes / numpy copy bandwidth of a buffer of that size (read + write);",
              "a tuned kernel is kept only when it beats the default by 3% (else the default is stored)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024,4096")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--target", default="host")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--db", help="folder of tuning databases to store the records in (default: a temporary one)")
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--markdown", help="replace the table between this target's markers in a markdown file")
    parser.add_argument("--from-json", help="only render a saved --json result (with --markdown)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        command = result["meta"].get("command", "")
    else:
        command = "python bench/tuning.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(HEADER, flush=True)
        result = run(sizes, batches, args.trials, args.target, args.db, args.threads,
                     log=lambda s: print(s, flush=True))
        result["meta"]["command"] = command.strip()
    text = report(result, command.strip())
    print()
    print(text)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        path = Path(args.markdown)
        target = result["meta"]["target"]
        begin, end = f"<!-- bench/tuning.py {target}: begin -->", f"<!-- bench/tuning.py {target}: end -->"
        if not replace_section(path, begin, end, f"```\n{text}\n```"):
            raise SystemExit(f"{path} has no {begin} ... {end} markers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
