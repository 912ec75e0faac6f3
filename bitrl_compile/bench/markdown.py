"""report.md of `bitrl-compile bench`: the header, the summary the CLI prints, one section per question."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {"bitrl": "ternary (bitrl)", "torch": "torch fp32", "onnxruntime": "ONNX Runtime fp32",
          "onnxruntime-int8": "ONNX Runtime int8", "python": "python (bare interpreter)",
          "numpy": "python + numpy"}


def replace_section(path: Path, begin: str, end: str, text: str) -> bool:
    """Put `text` between the marker lines `begin` and `end` of the document at `path` (a generated table in a
    hand-written page); False, and nothing written, when the document lacks either marker."""
    doc = path.read_text() if path.is_file() else ""
    if begin not in doc or end not in doc.split(begin, 1)[1]:
        return False
    head, rest = doc.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
    return True


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render_markdown(r: dict) -> str:
    """report.md: header (command, machine, policy), summary, one section per question, the plots."""
    m = r["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    out = [f"# bitrl-compile bench: {Path(r['model']['path']).name} for `{r['target']['name']}`", "",
           f"Reproduce: `{r['command']}`", "",
           (f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, load average {m['load_average'][0]} at the "
            f"start; {versions}. Date: {r['date']}."), "",
           (f"Policy: {r['model']['source']} ({r['model']['description']}); observation "
            f"{r['model']['input']['shape']}, output {json.dumps(r['model']['output'])}. "
            f"Target: {r['target']['name']} ({r['target']['device']})."), ""]
    out += summary_lines(r) + _md_memory(r["memory"])
    out += _md_latency(r["latency"]) if r["latency"]["kind"] == "wall_clock" else _md_instructions(r["latency"])
    out += _md_energy(r["energy"]) + _md_returns(r["returns"], r["agreement"])
    out += ["## Plots", ""] + [f"![{name}]({name})" for name in r["plots"]] + [""]
    return "\n".join(out)


def summary_lines(r: dict) -> list[str]:
    """The report's summary: one line each for memory, latency, energy and return kept."""
    mem, lat, energy, ret = r["memory"], r["latency"], r["energy"], r["returns"]
    rss = mem["rss"]
    memory = (f"- **Memory**: parameters {mem['param_ratio_fp32_over_bitrl']:.1f}x smaller than fp32 "
              f"({mem['param_bytes']['fp32']:,} -> {mem['param_bytes']['bitrl']:,} bytes); artifact file "
              f"{mem['artifact']['bytes']:,} bytes; peak RSS {_mib(rss['bitrl']['peak_rss'])} for our runtime")
    if mem.get("rss_ratio_torch_over_bitrl"):
        memory += (f" vs {_mib(rss['torch']['peak_rss'])} for torch ({mem['rss_ratio_torch_over_bitrl']:.1f}x) "
                   f"and {_mib(rss['onnxruntime']['peak_rss'])} for ONNX Runtime")
    lines = ["## Summary", "", memory + f" (a bare python: {_mib(rss['python']['peak_rss'])})."]
    others = [i for i in lat["results"] if i != "bitrl"]
    if lat["kind"] == "wall_clock":
        parts = [f"batch {b}: ours {v['p50_us']:.1f} µs p50, "
                 + ", ".join(f"{LABELS[i]} {lat['p50_ratio_over_bitrl'][i][b]:.2f}x" for i in others)
                 for b, v in lat["results"]["bitrl"].items()]
        lines.append(f"- **Latency** ({lat['threads']} thread(s); ratio = their p50 / ours): " + "; ".join(parts) + ".")
    else:
        parts = [f"batch {b}: ours {v['instructions_per_call']:,.0f}, "
                 + ", ".join(f"{LABELS[i]} {lat['ratio_over_bitrl'][i][b]:.2f}x" for i in others)
                 for b, v in lat["results"]["bitrl"].items()]
        lines.append(f"- **Instructions per act()** under qemu -cpu {lat['cpu']} (a count, not a time; "
                     "ratio = theirs / ours): " + "; ".join(parts) + ".")
    e, ratio = energy["per_call"], energy["ratio_over_bitrl"]
    lines.append(f"- **Energy (estimate)**: {e['bitrl']['total_pj'] / 1e3:,.2f} nJ per call vs "
                 f"{e['fp32']['total_pj'] / 1e3:,.2f} nJ fp32 ({ratio['fp32']:.1f}x) and "
                 f"{e['onnxruntime-int8']['total_pj'] / 1e3:,.2f} nJ int8 ({ratio['onnxruntime-int8']:.1f}x), linear "
                 "layers only; " + ("measured counters below." if energy["counters"]["available"]
                                    else "no energy counters on this machine."))
    if ret:
        kept = f"{100 * ret['kept']:.1f}%" if ret["kept"] is not None else "n/a (negative returns)"
        if ret["kept"] is None and ret["kept_over_random"] is not None:
            kept += f", {100 * ret['kept_over_random']:.1f}% of fp32's gain over random actions"
        lines.append(f"- **Return kept**: {kept} ({ret['mean']['bitrl']:.1f} vs {ret['mean'][ret['fp32_impl']]:.1f} "
                     f"fp32, mean over {ret['episodes']} episodes of {ret['env']}).")
    else:
        lines.append("- **Return kept**: not measured (no `--env`).")
    return lines + [""]


def _md_memory(mem: dict) -> list[str]:
    a, bpw, pb = mem["artifact"], mem["bits_per_weight"], mem["param_bytes"]
    members = [[name, f"{v['bytes']:,}", f"{v['stored_bytes']:,}"] for name, v in a["members"].items()]
    members += [["zip headers", "", f"{a['zip_overhead_bytes']:,}"],
                [f"**{Path(a['path']).name}** (file size)", "", f"**{a['bytes']:,}**"]]
    params = [["fp32 (torch / ONNX)", f"{pb['fp32']:,}", "32", "32"],
              [f"int8 {mem.get('int8_method', 'dynamic')} (ONNX Runtime)", f"{pb['onnxruntime-int8']:,}", "8",
               f"{8 * pb['onnxruntime-int8'] / mem['ternary_weights']:.2f}"],
              ["ternary (ours)", f"{pb['bitrl']:,}", f"{bpw['weights_only']:.2f}", f"{bpw['with_scales_and_biases']:.2f}"]]
    bare = mem["rss"]["python"]["peak_rss"]
    rss = [[LABELS[kind], _mib(v["rss_start"]), _mib(v["rss_loaded"]), f"**{_mib(v['peak_rss'])}**",
            _mib(v["peak_rss"] - bare), ", ".join(v["modules"]) or "-"] for kind, v in mem["rss"].items()]
    host = (" The target is not this machine's architecture, so these processes run a host (x86-64) build of "
            "the same policy.") if mem.get("measured_with_host_build") else ""
    return ["## Memory", "",
            (f"{mem['parameters']:,} parameters, {mem['ternary_weights']:,} of them weights of linear layers "
             f"(ternary in the artifact); fp32: {mem['fp32_bytes']:,} bytes."), "",
            _table(["artifact member", "bytes", "bytes in the file (deflated)"], members), "",
            _table(["parameters as", "bytes", "bits per weight", "bits per weight incl. scales, biases"], params), "",
            "File sizes: " + ", ".join(f"{k} {v:,} B" for k, v in mem["files"].items()) + " (the input, then the "
            "baselines this bench wrote).", "",
            (f"Peak resident memory of one fresh process per implementation that imports its engine, loads the "
             f"model and runs {mem['rss_calls']} act() calls at each batch size "
             "(`bitrl_compile/bench/child.py`, memory mode). "
             "Peak = VmHWM from the child's own /proc/self/status. getrusage's ru_maxrss is not used: Linux "
             "carries the parent's high-water mark over fork+exec, so every child would report at least the size "
             "of the bench process. The baselines import `bitrl_compile.runtime` only for the observation and "
             "action code that every implementation shares (Python and numpy)." + host), "",
            _table(["process", "RSS at start", "after loading", "peak RSS", "peak above bare python",
                    "heavy modules imported"], rss), ""]


def _md_latency(lat: dict) -> list[str]:
    def cpu(v, key):
        return f"{v[key]:.1f}" if key in v else "n/a"

    rows = [[LABELS[impl], b, f"{v['p50_us']:.1f}", f"{v['p99_us']:.1f}", f"{v['mean_us']:.1f}",
             cpu(v, "cpu_p50_us"), cpu(v, "cpu_p99_us"), f"{v['p50_us_per_obs']:.2f}",
             f"{lat['p50_ratio_over_bitrl'][impl][b]:.2f}x", v["calls"]]
            for impl, by_b in lat["results"].items() for b, v in by_b.items()]
    return ["## Latency", "",
            (f"act() (observation in, action out) timed call by call with `time.perf_counter_ns`, in one process "
             f"holding every implementation, {lat['threads']} thread(s) each (torch set_num_threads, ONNX Runtime "
             f"intra_op_num_threads, TVM_NUM_THREADS, OMP/MKL/OpenBLAS), in {lat['rounds']} rounds that alternate "
             "between them after a warm-up, on the same 64-byte aligned observations. The wall-clock p99 is "
             "sensitive to other load on the machine (see the load average above); the CPU-time columns (the "
             "calling thread's `time.thread_time_ns`, measured at one thread only, where every implementation "
             "computes on the calling thread) leave out the time other processes held the core."), "",
            _table(["implementation", "batch", "p50 µs", "p99 µs", "mean µs", "CPU p50 µs", "CPU p99 µs",
                    "p50 µs per obs", "p50 / ours", "calls"], rows), ""]


def _md_instructions(lat: dict) -> list[str]:
    rows = [[LABELS[impl], b, f"{v['instructions_per_call']:,.0f}",
             "; ".join(f"{k} {n:,.0f}" for k, n in v["in_library"].items()) or "-",
             f"{v['instructions_per_obs']:,.0f}", f"{lat['ratio_over_bitrl'][impl][b]:.2f}x"]
            for impl, by_b in lat["results"].items() for b, v in by_b.items()]
    return ["## Instructions per call (not time)", "",
            ("The target is an aarch64 board. Here it runs under qemu, whose timings say nothing about the board, "
             f"so this section counts **guest instructions per act() call** instead. Method: {lat['method']}. "
             f"{lat['qemu']}. Instructions are not time: a Cortex-A72 retires them at different rates (cache "
             "misses, NEON, branches)."), "",
            _table(["implementation", "batch", "instructions per call", "of which in its libraries",
                    "per observation", "theirs / ours"], rows), ""] + [f"- {n}" for n in lat["notes"]] + [""]


def _md_energy(energy: dict) -> list[str]:
    names = {"fp32": "fp32", "onnxruntime-int8": f"int8 {energy.get('int8_method', 'dynamic')} (ORT)",
             "bitrl": "ternary (ours)"}
    rows = [[names[impl], ", ".join(f"{n:,} {op}" for op, n in v["operations"].items()),
             f"{v['weight_bytes']:,} B from {v['memory_tier']}", f"{v['compute_pj'] / 1e3:,.2f}",
             f"{v['weight_memory_pj'] / 1e3:,.2f}", f"**{v['total_pj'] / 1e3:,.2f}**",
             f"{energy['ratio_over_bitrl'][impl]:.1f}x"] for impl, v in energy["per_call"].items()]
    figures = ", ".join(f"{op} {pj} pJ" for op, pj in energy["energy_pj"].items())
    tiers = ", ".join(f"{t['name']} {t['pj']:g} pJ" for t in energy["memory_pj_per_64bit"])
    c = energy["counters"]
    return ["## Energy (an estimate, not a measurement)", "",
            ("Model: the operations of the linear layers per batch-1 call, counted from the layer shapes, times "
             f"the energy per operation from {energy['source']}: {figures}; the weights are read once per call, "
             f"at the energy per 64-bit access of the smallest memory that holds them: {tiers}. A ternary "
             "product is counted as one 32-bit add per weight (add, subtract or skip the int8 activation; no "
             "multiply), zeros included. Left out, alike for all: activations, activation functions, instruction "
             "fetch and the interpreter around the network, which dominate on a general-purpose CPU (see the "
             "latency or instruction counts)."), "",
            _table(["parameters as", "operations per call", "weights read", "arithmetic nJ", "weights nJ",
                    "total nJ", "theirs / ours"], rows), "",
            f"Measured: {c['how']}." if c["available"] else f"Energy counters: unavailable here ({c['why']}).", ""]


def _md_returns(ret: dict | None, agree: dict) -> list[str]:
    out = ["## Return kept", ""]
    if ret:
        rows = [[LABELS.get(k, "random actions"), f"{ret['mean'][k]:.1f} ± {ret['std'][k]:.1f}",
                 f"{min(v):.1f} .. {max(v):.1f}"] for k, v in ret["episodes_returns"].items()]
        kept = f"**{100 * ret['kept']:.1f}%**" if ret["kept"] is not None else "n/a (fp32 mean return <= 0)"
        line = f"Return kept (ternary mean / fp32 mean): {kept}"
        if ret["kept_over_random"] is not None:
            line += f"; relative to random actions, (ternary - random) / (fp32 - random): {100 * ret['kept_over_random']:.1f}%"
        if ret["int8_kept"] is not None:
            line += f"; ONNX Runtime int8 keeps {100 * ret['int8_kept']:.1f}%"
        out += [(f"{ret['env']}, {ret['episodes']} episodes, episode i reset with seed {ret['seeds'][0]} + i, "
                 "deterministic actions."), "", _table(["policy", "mean return ± std", "min .. max"], rows), "",
                line + ".", ""]
    else:
        out += ["Skipped: no `--env` given.", ""]
    out += [(f"Agreement on {agree['observations']} observations ({agree['source']}): the ternary artifact "
             f"(running as {agree['bitrl_runs_on']}) picks the fp32 action on {100 * agree['bitrl_vs_fp32']:.1f}% "
             f"of them, ONNX Runtime int8 on {100 * agree['int8_vs_fp32']:.1f}%. The artifact's raw outputs differ "
             "from the numpy reference of the quantized network by at most "
             f"{agree['bitrl_max_abs_diff_vs_reference']:.3g}."), ""]
    return out
