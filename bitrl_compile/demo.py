"""The built-in demo: the shipped CartPole PPO policy, compiled for host and rasp4, run, compared.

One table: parameters, fp32 bytes, artifact bytes, bits/weight, mean return fp32 vs ternary
(numpy reference, host artifact, rasp4 artifact under qemu), agreement of actions and outputs with
the reference on the observations the fp32 policy visits, and act() latency on this machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

DEMO_POLICY = "cartpole_ppo.safetensors"
DEMO_ENV = "CartPole-v1"


def demo_policy_path() -> Path:
    return Path(str(resources.files("bitrl_compile") / "examples" / DEMO_POLICY))


def _latency_us(fn, obs, calls: int) -> float:
    for _ in range(min(50, calls)):
        fn(obs)
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        fn(obs)
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e6)


def run_demo(out: Path, episodes: int = 10, target_names=("host", "rasp4"),
             log: Callable[[str], None] = print, latency_calls: int = 2000) -> str:
    from bitrl_compile import targets

    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    for name in target_names:  # before the folder exists and before minutes of work: one line naming the fix
        targets.check_toolchain(targets.get_target(name))

    import torch

    from bitrl_compile import pipeline, reference
    from bitrl_compile.devices import open_policy
    from bitrl_compile.evaluate import evaluate
    from bitrl_compile.frontends import load_policy

    out.mkdir(parents=True, exist_ok=True)
    loaded = load_policy(demo_policy_path())
    module = loaded.module.eval()
    n_params = sum(p.numel() for p in module.parameters())

    def fp32_forward(obs):
        with torch.no_grad():
            return module(torch.as_tensor(np.asarray(obs, np.float32)).reshape(-1, *loaded.input["shape"])).numpy()

    rows = []
    visited: list = []
    log(f"[1/4] fp32 policy: {episodes} episodes of {DEMO_ENV}")
    fp32_returns, _ = evaluate(lambda o: int(np.argmax(fp32_forward(o)[0])), DEMO_ENV, episodes, record=visited)
    obs_batch = np.stack(visited).astype(np.float32)

    compiled = {}
    for name in target_names:
        log(f"[2/4] compiling for {name}")
        compiled[name] = pipeline.compile_policy(loaded, name, out / f"cartpole_{name}.bitrl", force=True,
                                                 log=lambda s: log(f"      {s}"))
    quantized = next(iter(compiled.values())).quantized

    def ref_forward(obs):
        return reference.run(quantized, np.asarray(obs, np.float32).reshape(-1, *loaded.input["shape"]))

    log(f"[3/4] ternary numpy reference: {episodes} episodes")
    ref_returns, _ = evaluate(lambda o: int(np.argmax(ref_forward(o)[0])), DEMO_ENV, episodes)
    ref_out = ref_forward(obs_batch)
    fp32_out = fp32_forward(obs_batch)
    rows.append(("fp32 torch (original)", demo_policy_path().stat().st_size, n_params * 4, 32.0, fp32_returns,
                 float(np.mean(fp32_out.argmax(1) == ref_out.argmax(1))), None,
                 _latency_us(fp32_forward, obs_batch[:1], latency_calls)))
    rows.append(("ternary numpy reference", None, None, None, ref_returns, 1.0, 0.0, None))

    for name, result in compiled.items():
        log(f"[4/4] {name} artifact: {episodes} episodes" + (" under qemu" if name != "host" else ""))
        policy = open_policy(str(result.path))
        try:
            returns, _ = evaluate(policy.act, DEMO_ENV, episodes)
            outputs = policy.forward(obs_batch)
            latency = _latency_us(policy.act, obs_batch[0], latency_calls) \
                if type(policy).__name__ != "EmulatedPolicy" else None
        finally:
            if hasattr(policy, "close"):
                policy.close()
        weights = sum(layer["in"] * layer["out"] for layer in result.manifest["layers"])
        packed = sum(v.nbytes for v in result.params.values() if v.dtype == np.uint8)
        param_bytes = sum(v.nbytes for v in result.params.values())
        rows.append((f"ternary {name} artifact", result.path.stat().st_size, param_bytes, 8 * packed / weights, returns,
                     float(np.mean(outputs.argmax(1) == ref_out.argmax(1))),
                     float(np.max(np.abs(outputs - ref_out))), latency))

    header = (f"bitrl-compile demo: {DEMO_ENV}, PPO policy {list(loaded.input['shape'])} -> "
              f"{loaded.output['n']} actions, {n_params:,} parameters; {episodes} episodes, seeds 0..{episodes - 1}; "
              f"agreement on {len(obs_batch)} observations the fp32 policy visited")
    cols = ("", "file bytes", "param bytes", "bits/weight", "mean return", "actions = ref", "max |out - ref|", "act() µs (host)")
    table = [cols]
    for name, size, params, bits, returns, agree, diff, lat in rows:
        table.append((name, "" if size is None else f"{size:,}", "" if params is None else f"{params:,}",
                      "" if bits is None else f"{bits:.2f}",
                      f"{np.mean(returns):.1f} ± {np.std(returns):.1f}", f"{100 * agree:.2f}%",
                      "" if diff is None else ("0 (bit-exact)" if diff == 0 else f"{diff:.2e}"),
                      "" if lat is None else f"{lat:.1f}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = [header, ""]
    for i, r in enumerate(table):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    kept = 100 * np.mean(rows[-1][4]) / max(np.mean(fp32_returns), 1e-9)
    lines.append("")
    param_bytes = sum(v.nbytes for v in next(iter(compiled.values())).params.values())
    lines.append(f"return kept by the ternary artifact: {kept:.1f}% of fp32; parameters {n_params * 4 / param_bytes:.1f}x "
                 "smaller than fp32 (base-3 weights plus fp32 scales and biases; the file adds the compiled code)")
    lines.append("rasp4 runs under qemu-aarch64 -cpu cortex-a72 (timings there are not device timings)")
    return "\n".join(lines)
