"""Where a BitNet backbone's prefill time goes per op kind: each TensorIR kernel of the `features` entry point timed
alone (1 thread, random inputs of its shapes, median of REPS), summed per op kind, per layer as the difference of two
depths (bench/llamacpp.py's way), with and without passes/schedule_float.py (the pass swapped for the identity).

    TVM_NUM_THREADS=1 python3 bench/float_ops.py /work/scratch/bitnet-2b4t-L2 /work/scratch/bitnet-2b4t-L4

The checkpoints: bench/llamacpp.py's 2B4T-shaped ones (`packed_checkpoint`); the state: 64 tokens (text encoder,
1 decimal, LunarLander-v3's 8 values), as that bench compiles them.
"""

from __future__ import annotations

import re
import sys
import time
from collections import defaultdict

import numpy as np

REPS = 7
KINDS = [  # (op kind, test on a kernel name), first match
    ("ternary BitLinear GEMMs", lambda n: n.startswith("bitrl_bitlinear")),
    ("attention QK^T and PV (float matmul)", lambda n: re.fullmatch(r"matmul\d*", n) is not None),
    ("RMSNorm / sub-norms (x^2, mean, rsqrt, scale)", lambda n: "mean" in n or n.startswith("power")),
    ("softmax (+ broadcast)", lambda n: "softmax" in n),
    ("RoPE (rotate_half, cos/sin)", lambda n: "concatenate" in n),
    ("relu^2 * up", lambda n: "multiply5" in n),
    ("residual adds", lambda n: n.startswith("add") or re.match(r"fused_multiply\d+_add", n) is not None),
    ("reshapes / transposes / GQA broadcast", lambda n: n.startswith(("reshape", "transpose", "broadcast",
                                                                      "fused_transpose", "strided_slice"))),
]


def kind(name: str) -> str:
    return next((k for k, test in KINDS if test(name)), "other (embedding, mask, casts)")


def lowered(folder: str, scheduled: bool):
    import tvm

    from bitrl_compile import pipeline, targets
    from bitrl_compile.frontends import load_policy
    from bitrl_compile.passes import schedule_float

    loaded = load_policy(folder, config={"env": "LunarLander-v3"},
                         encoder={"kind": "text", "pool": "last", "decimals": 1})
    tvm_target = targets.tvm_target(targets.get_target("host"))
    original = schedule_float.schedule_float
    if not scheduled:
        schedule_float.schedule_float = lambda t: tvm.transform.module_pass(lambda m, c: m, opt_level=0,
                                                                            name="bitrl.ScheduleFloat")
    try:
        _, mod, _ = pipeline.run_passes(pipeline.to_relax(loaded), tvm_target, targets.kernel_spec(tvm_target),
                                        specs=(loaded.input, loaded.output))
    finally:
        schedule_float.schedule_float = original
    return mod, tvm_target


def _dims(ty) -> list[int]:
    from tvm.sym.analyzer import Analyzer
    from tvm.tirx.analysis import undefined_vars

    out = []
    for d in ty.shape.values:
        if not isinstance(d, int) and not hasattr(d, "value"):
            analyzer = Analyzer()
            for v in undefined_vars(d):
                analyzer.bind(v, 1)  # batch 1
            d = analyzer.simplify(d)
        out.append(int(d))
    return out


def kernel_times(mod, tvm_target) -> dict[str, float]:
    """Seconds per op kind of one `features` call."""
    import tvm
    from tvm import relax

    library = tvm.compile(mod, target=tvm_target).mod.imports[0]
    rng = np.random.default_rng(0)
    times: dict[str, float] = defaultdict(float)
    for binding in (b for block in mod["features"].body.blocks for b in block.bindings):
        call = binding.value
        if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.call_tir")):
            continue
        outs = call.ty_args[0]
        outs = list(outs.fields) if isinstance(outs, relax.TupleType) else [outs]
        args = []
        for ty in [a.ty for a in call.args[1].fields] + outs:
            if not hasattr(ty, "shape"):
                args.append(1)  # a symbolic dimension: the batch
                continue
            dtype = str(ty.dtype)
            value = rng.standard_normal(_dims(ty)) if dtype.startswith("float") else rng.integers(0, 3, _dims(ty))
            args.append(tvm.runtime.tensor(value.astype(dtype)))
        function = library.get_function(call.args[0].name_hint)
        function(*args)
        samples = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            function(*args)
            samples.append(time.perf_counter() - t0)
        times[kind(call.args[0].name_hint)] += float(np.median(samples))
    return times


def main(argv=None) -> int:
    shallow, deep = (argv or sys.argv[1:])[:2]
    depth = {f: int(re.search(r"L(\d+)", f).group(1)) for f in (shallow, deep)}
    per_layer = {}
    for scheduled in (False, True):
        t = {f: kernel_times(*lowered(f, scheduled)) for f in (shallow, deep)}
        per_layer[scheduled] = {k: (t[deep].get(k, 0) - t[shallow].get(k, 0)) / (depth[deep] - depth[shallow])
                                for k in set(t[shallow]) | set(t[deep])}
    before, after = per_layer[False], per_layer[True]
    print("| op kind | default legalised µs/layer | schedule_float µs/layer | speedup |")
    print("|---|---:|---:|---:|")
    for k in sorted(before, key=lambda k: -before[k]):
        print(f"| {k} | {before[k] * 1e6:.0f} | {after.get(k, 0) * 1e6:.0f} | "
              f"{before[k] / after[k] if after.get(k, 0) > 0 else float('nan'):.1f}x |")
    floats = [k for k in before if not k.startswith("ternary")]
    fb, fa = sum(before[k] for k in floats), sum(after.get(k, 0) for k in floats)
    print(f"| float ops | {fb * 1e6:.0f} | {fa * 1e6:.0f} | {fb / fa:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
