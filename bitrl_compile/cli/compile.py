"""Commands that make and read artifacts: compile (the default), inspect, tune, targets."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from bitrl_compile.cli.bitnet_options import encoder_choice, encoder_options
from bitrl_compile.cli.common import batch_sizes, guard, option_value
from bitrl_compile.cli.train import finetune_cmd


@click.command("compile")
@click.argument("model", type=click.Path())
@click.option("--target", "-t", default="host", show_default=True, help="rasp4, rasp5, x86-avx2, x86-avx512, x86-amx, host")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="artifact path [default: MODEL stem + .bitrl]")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--env", "env_id", help="gymnasium env id: its action and observation spaces define and check the specs (every format)")
@click.option("--vecnormalize", type=click.Path(exists=True, dir_okay=False),
              help="observation statistics to bake in (SB3 vecnormalize.pkl needs --trust-pickle; or JSON/npz)")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--per-channel", is_flag=True, help="one weight scale per output channel instead of per tensor")
@click.option("--features", is_flag=True, help="compile the MLP's torso (all layers but the last) as a backbone "
              "whose output is features (policy.features(obs)), for `bitrl-compile train --backbone`")
@click.option("--bundle-runtime", is_flag=True,
              help="put the target's libtvm_runtime.so (3 MB) in the artifact: the device then needs only "
                   "`pip install apache-tvm-ffi numpy`")
@click.option("--db", "tuning_db", type=click.Path(file_okay=False),
              help="folder of tuning databases (<target>.json) [default: the repository's targets/tuned]")
@click.option("--no-tuning", is_flag=True, help="use the default kernel schedules, ignoring tuning databases")
@click.option("--qat", "qat_env", metavar="ENV",
              help="first recover the return of the ternary policy on gymnasium ENV (as `bitrl-compile finetune` "
                   "does, with the recovery that fits the algorithm: distillation by default, which keeps a DQN a "
                   "Q-network and a TD3/SAC actor that actor; writes MODEL stem + -ternary.safetensors), then "
                   "compile that: for policies whose plain ternary version loses return")
@click.option("--qat-steps", type=click.IntRange(min=1),
              help="recovery steps (distillation: rollout states) [default: finetune's]")
@click.option("--episodes", type=click.IntRange(min=1),
              help="with --env: also compare the returns of N deterministic episodes (ternary, fp32, random)")
@click.option("--int8-layers", "int8_layers", metavar="LAYERS",
              help="keep these linear layers in int8 (mixed precision): comma-separated 0-based indices, first, "
                   "last (e.g. first,last), or auto: the fewest layers, by measured sensitivity, that bring the "
                   "outputs within 2 %% of fp32 (98 %% of the actions), on the states the policy visits in --env "
                   "(else on random observations)")
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), metavar="SHARE",
              help="with --env: recover until the ternary policy keeps SHARE of the original (e.g. 0.98; its action "
                   "agreement weighted by the original's stakes, or with --episodes its score): plain, then "
                   "distillation, then distillation with its most sensitive layer int8, then int8 layers alone; "
                   "the first that keeps it is written, and if none does, nothing is")
@click.option("--keep-budget", type=click.FloatRange(min=1), default=180, show_default=True, metavar="SECONDS",
              help="--keep's time, CPU seconds of one core for the whole recovery: measurements and compiles "
                   "included, distillation gets what they leave")
@click.option("--keep-rule", type=click.Choice(["weighted", "plain"]), default="weighted", show_default=True,
              help="--keep's agreement: weighted by the original's stakes (a near-tie counts little), or plain (every "
                   "visited state counts one: what a comparison with the original's own predict counts)")
@encoder_options
@click.option("--force", is_flag=True, help="overwrite the output file")
@click.option("--debug", is_flag=True, help="show tracebacks")
def compile_cmd(model, target, output, config, env_id, vecnormalize, trust_pickle, per_channel, features,
                bundle_runtime, tuning_db, no_tuning, qat_env, qat_steps, episodes, int8_layers, keep, keep_budget,
                keep_rule, encoder, pool, decimals, force, debug):
    """Compile MODEL (torch .pt/.pt2, TorchScript, safetensors, SB3 .zip, CleanRL, ONNX, BitNet checkpoint folder:
    a backbone, or a stock Hugging Face one with --encoder and --env).

    With --env, the ternary policy is measured against the original on the states the original visits (action
    agreement; with --episodes N the returns too), printed, recorded in the manifest, and below 98 % a warning
    names the recovery; --keep SHARE recovers until SHARE is kept (trainers/recovery.py)."""
    if episodes and not env_id:
        raise click.UsageError("--episodes needs --env (the environment to run the episodes in)")
    if keep is not None and not env_id:
        raise click.UsageError("--keep needs --env (the environment whose states measure what is kept)")
    if keep is not None and (qat_env or int8_layers is not None or features):
        raise click.UsageError("--keep chooses the recovery and the int8 layers itself: drop --qat, --int8-layers "
                               "and --features")
    bitnet_encoder = encoder_choice(model, env_id, encoder, pool, decimals)  # a usage error where they do not apply
    with guard(debug):
        from bitrl_compile import targets
        from bitrl_compile.runtime.files import check_output

        out = Path(output) if output else Path(model).with_suffix(".bitrl") if not Path(model).is_dir() \
            else Path(model).with_name(Path(model).name + ".bitrl")  # a BitNet backbone folder
        # what would fail at the end, checked before the minutes of loading, fine-tuning and compiling
        check_output(out, force=force, inputs=[p for p in (model, config, vecnormalize) if p])
        targets.check_toolchain(targets.get_target(target))
        from bitrl_compile.precision import parse_int8_layers

        int8 = parse_int8_layers(int8_layers) if int8_layers is not None else None

        from bitrl_compile.frontends import load_policy
        from bitrl_compile.pipeline import compile_policy, with_progress

        original = (model, config, vecnormalize)  # what the fidelity measure compares with
        if qat_env:  # the fine-tuned file carries its architecture and observation statistics
            tuned = Path(model).with_name(Path(model).stem + "-ternary.safetensors")
            logs = Path(model).with_name(Path(model).stem + "-qat")  # beside the model, not in the cwd
            click.get_current_context().invoke(finetune_cmd, model=model, env_id=qat_env, steps=qat_steps,
                                               output=str(tuned), out=str(logs), config=config, vecnormalize=vecnormalize,
                                               trust_pickle=trust_pickle, force=force, no_progress=True,
                                               method="auto", per_channel=per_channel, debug=debug)
            model, config, vecnormalize = str(tuned), None, None
        cfg = json.loads(Path(config).read_text()) if config else None
        if env_id:
            cfg = dict(cfg or {}, env=env_id)
        t0 = time.perf_counter()
        loaded = load_policy(model, config=cfg, trust_pickle=trust_pickle, vecnormalize=vecnormalize,
                             encoder=bitnet_encoder)
        if features:
            from bitrl_compile.trainers.export import features_policy

            loaded = features_policy(loaded)
        hook = fp32 = None
        calibration = None  # --int8-layers auto: measured on the states the original visits in --env
        if env_id and loaded.output.get("kind") in ("discrete", "continuous"):  # no env, no measure
            from bitrl_compile import fidelity

            fp32 = loaded if original[0] == model else load_policy(
                original[0], config=dict(json.loads(Path(original[1]).read_text()) if original[1] else {},
                                         env=env_id), trust_pickle=trust_pickle, vecnormalize=original[2])
            if keep is None:  # --keep measures the original itself, once for all its attempts
                base = fidelity.baseline(fp32, env_id, episodes=episodes or 0)
                hook = fidelity.compile_hook(fp32, env_id, episodes=episodes or 0, base=base)
                calibration = base.states if int8 == "auto" else None

        def compile_with(loaded, int8_layers, measure):
            return compile_policy(loaded, target, out, per_channel=per_channel, force=force,
                                  bundle_runtime=bundle_runtime, tuning_db=tuning_db, tuning=not no_tuning,
                                  log=with_progress(lambda s: click.echo(f"  {s}", err=True)), measure=measure,
                                  int8_layers=int8_layers, calibration=calibration)

        if keep is not None:
            if fp32 is None:
                raise click.UsageError(f"--keep needs a policy with actions; this one outputs "
                                       f"{loaded.output.get('kind')!r}")
            from bitrl_compile.trainers import recovery

            result, _ = recovery.keep(loaded, env_id, keep, compile_with, episodes=episodes or 0,
                                      budget=keep_budget, per_channel=per_channel, rule=keep_rule,
                                      log=lambda s: click.echo(f"  {s}", err=True))
        else:
            result = compile_with(loaded, int8, hook)
        click.echo(_summary(result.manifest, out, time.perf_counter() - t0))
        if "fidelity" in result.manifest:
            record = result.manifest["fidelity"]
            click.echo(f"  {fidelity.describe(record)}")
            alarm = fidelity.warning(record, per_channel=per_channel, recovered=bool(qat_env))
            if alarm:
                click.echo(f"bitrl-compile: warning: {alarm}", err=True)


def _summary(manifest: dict, path: Path, seconds: float | None = None) -> str:
    """The layers and kernels of a manifest whose structure read_artifact checked (optional fields may be absent)."""
    layers = manifest.get("layers", [])
    target = manifest["target"]
    n_weights = sum(layer["in"] * layer["out"] for layer in layers)
    n_int8 = sum(layer["in"] * layer["out"] for layer in layers if layer.get("precision") == "int8")
    size = path.stat().st_size
    lines = [f"{path}: {size:,} bytes, target {target.get('name', '?')} ({target.get('device', target['arch'])})"]
    lines.append(f"  {len(layers)} BitLinear layers, {n_weights - n_int8:,} ternary weights"
                 + (f" and {n_int8:,} int8 weights (mixed precision)" if n_int8 else "")
                 + f" ({4 * n_weights:,} bytes as fp32)")
    for layer in layers:
        bits = layer.get("weight_bits_per_param")
        stored = f", {layer['bytes']:,} bytes" if "bytes" in layer else ""
        lines.append(f"    {layer['name']:<12} {layer['in']:>6} -> {layer['out']:<6} {layer.get('activation', '?'):<8} "
                     f"{layer.get('precision', 'ternary'):<7} {layer.get('layout', '?')} "
                     f"({'?' if bits is None else f'{bits:g}'} bits/weight{stored}), {layer.get('scale', '?')}")
    for kernel in manifest.get("kernels", []):
        knobs = " ".join(f"{k}={v}" for k, v in kernel.get("knobs", {}).items() if v != 1) or "default knobs"
        where = (", ".join(f"{p} tuned at batch {kernel[p]['batch']}: {kernel[p]['us']:g} µs vs default "
                           f"{kernel[p]['default_us']:g} µs" for p in ("gemv", "gemm") if p in kernel)
                 if kernel.get("schedule") == "tuned" else f"default schedule: {kernel.get('reason', 'tuning off')}")
        lines.append(f"    kernel {kernel.get('kernel', '?'):<36} {kernel.get('isa', '?'):<12} {knobs}; {where}")
    if seconds is not None:
        lines.append(f"  compiled in {seconds:.1f} s")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
@click.option("--debug", is_flag=True)
def inspect_cmd(artifact, as_json, debug):
    """Show an artifact's manifest, layers, bits per weight and member sizes."""
    with guard(debug):
        from bitrl_compile.cli.trust import signature_line
        from bitrl_compile.runtime.artifact import read_artifact

        # never inflates lib.so, never loads it; the manifest's structure is checked (runtime/manifest.py)
        art = read_artifact(artifact, payload=False, use_env=False)
        if as_json:
            click.echo(json.dumps(art.manifest, indent=2, sort_keys=True))
            return
        m = art.manifest
        versions, source = m.get("versions", {}), m.get("source", {})
        click.echo(_summary(m, Path(artifact)))
        click.echo(f"  format v{m['format_version']}, compiled by bitrl-compile {versions.get('bitrl_compile', '?')} "
                   f"with TVM {versions.get('tvm', '?')}; source: {source.get('format', '?')}")
        click.echo(f"  input: shape {m['input']['shape']}, preprocess {m['input'].get('preprocess', 'none')}, "
                   f"normalisation {'baked in' if m['input'].get('normalize') else 'none'}")
        offset = 0
        for key in m["input"].get("keys") or []:  # a Dict observation: where each key goes in the flat row
            size = math.prod(key["shape"])
            click.echo(f"    key {key['name']!r:<20} {key['shape']!s:<12} {key.get('dtype', 'float32'):<8} values "
                       f"[{offset}, {offset + size})" + (", normalised" if key.get("normalize") else ""))
            offset += size
        click.echo(f"  output: {json.dumps(m['output'])}")
        entries = m.get("entry_points") or {}
        click.echo("  entry points:" + ("" if entries else " none (an older artifact: numpy prepares observations and "
                                                          "actions, the VM runs main; the C API cannot load it)"))
        for name, plan in sorted(entries.items()):
            click.echo(f"    {name:<9} {len(plan['calls']):>2} kernels: {' -> '.join(c['func'] for c in plan['calls'])}")
        for name, (_, size) in art.sizes.items():
            digest = f"  sha256 {m['members'][name][:16]}…" if name in m["members"] else ""
            click.echo(f"  member {name:<20} {size:>10,} bytes{digest}")
        click.echo(signature_line(art))
        if "fidelity" in m:
            from bitrl_compile.fidelity import describe

            click.echo(f"  fidelity: {describe(m['fidelity'])}")
        stats = m.get("stats", {})
        if stats.get("ternary_weights", 0) + stats.get("int8_weights", 0) and "param_bytes" in stats:
            bits = 8 * stats["param_bytes"] / (stats.get("ternary_weights", 0) + stats.get("int8_weights", 0))
            click.echo(f"  parameters: {stats['param_bytes']:,} bytes = {bits:.2f} bits per weight incl. scales/bias")


@click.command("tune")
@click.argument("model", type=click.Path())
@click.option("--target", "-t", default="host", show_default=True, help="rasp4, rasp5, x86-avx2, x86-avx512, x86-amx, host")
@click.option("--trials", default=32, show_default=True, type=click.IntRange(min=1),
              help="MetaSchedule trials per kernel and batch")
@click.option("--batch", "batches", default="1", show_default=True, callback=option_value(batch_sizes),
              help="batch sizes to tune, comma-separated: 1 tunes the policy step (GEMV), e.g. 32 the GEMM rows")
@click.option("--db", "tuning_db", type=click.Path(file_okay=False),
              help="folder of tuning databases to update (<target>.json) [default: the repository's targets/tuned]")
@click.option("--rpc", help="HOST:PORT of TVM's RPC server on the device (needed for rasp4/rasp5), e.g. 127.0.0.1:9090 "
              "through `ssh -N -L 9090:127.0.0.1:9090 pi@BOARD` (README, Tuning)")
@click.option("--tracker", metavar="HOST:PORT", help="TVM's RPC tracker of a farm of boards (instead of --rpc): "
              "candidates are measured on every server registered under --key, in parallel (`bitrl-compile tracker`; "
              "docs/tuning.md)")
@click.option("--key", "tracker_key", help="the tracker key of the boards to measure on [default: the target's name]")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="kernel threads while measuring")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="architecture/spec JSON for state_dicts")
@click.option("--env", "env_id", help="gymnasium env id: its action and observation spaces define and check the specs (every format)")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling (executes code from the file!)")
@click.option("--per-channel", is_flag=True, help="tune the per-output-channel-scale kernels")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--debug", is_flag=True, help="show tracebacks")
def tune_cmd(model, target, trials, batches, tuning_db, rpc, tracker, tracker_key, threads, config, env_id,
             trust_pickle, per_channel, seed, debug):
    """Tune MODEL's BitLinear kernels for a target with MetaSchedule and store the result in the
    target's tuning database, which later compiles apply. Ctrl-C keeps what was found."""
    with guard(debug):
        from bitrl_compile.targets import get_target
        from bitrl_compile.targets.remote import Remote

        remote = Remote.of(rpc, tracker, tracker_key, get_target(target).name)  # bad options: before loading
        if remote is not None and remote.tracker is not None:
            remote.servers()  # the tracker answers and has boards under the key, else the command that adds one

        from bitrl_compile.frontends import load_policy
        from bitrl_compile.pipeline import kernel_keys
        from bitrl_compile.targets import autotune

        sizes = batches  # already parsed and checked by option_value(batch_sizes): a usage error otherwise
        cfg = json.loads(Path(config).read_text()) if config else None
        if env_id:
            cfg = dict(cfg or {}, env=env_id)
        loaded = load_policy(model, config=cfg, trust_pickle=trust_pickle)
        keys = kernel_keys(loaded, per_channel)
        rows, path, seconds = autotune.tune(keys, target, trials=trials, batches=sizes, db=tuning_db, rpc=rpc,
                                          tracker=tracker, tracker_key=tracker_key, threads=threads, seed=seed,
                                          log=lambda s: click.echo(s, err=True))
        click.echo(autotune.summary(rows))
        click.echo(f"tuned {len(keys)} kernel(s) x {len(sizes)} batch size(s) in {seconds:.0f} s; "
                   f"database {path} (compiles for {target} now use it)")


@click.command("targets")
def targets_cmd():
    """List the known targets."""
    from bitrl_compile import targets

    for name in targets.known_targets():
        t = targets.get_target(name)
        click.echo(f"{name:<11} {t.device}  [{t.arch}, {'cross: ' + t.cc if t.cc else 'host compiler'}]")

