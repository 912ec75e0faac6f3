"""The plots of `bitrl-compile bench` (matplotlib, Agg): latency.png, memory.png, energy.png, returns.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitrl_compile.bench.markdown import LABELS

COLORS = {"bitrl": "#2a9d8f", "torch": "#e76f51", "onnxruntime": "#457b9d", "onnxruntime-int8": "#a8dadc",
          "python": "#bbbbbb", "numpy": "#888888"}


def write_plots(report: dict, out: Path) -> list[str]:
    """latency.png, memory.png, energy.png and (with --env) returns.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False})
    names = [_plot_latency(report, plt), _plot_memory(report, plt), _plot_energy(report, plt)]
    if report.get("returns"):
        names.append(_plot_returns(report, plt))
    for name, fig in names:
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return [name for name, _ in names]


def _label_bars(ax, bars, texts):
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)


def _plot_latency(report: dict, plt):
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lat = report["latency"]
    impls = list(lat["results"])
    batches = list(next(iter(lat["results"].values())))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        x = np.arange(len(impls))
        colors = [COLORS[i] for i in impls]
        if lat["kind"] == "wall_clock":
            p50 = [lat["results"][i][b]["p50_us"] for i in impls]
            p99 = [lat["results"][i][b]["p99_us"] for i in impls]
            bars = ax.bar(x, p50, color=colors, label="p50 (wall clock)")
            ax.scatter(x, p99, marker="_", s=900, color="#333333", zorder=3, label="p99 (wall clock)")
            if all("cpu_p99_us" in lat["results"][i][b] for i in impls):
                ax.scatter(x, [lat["results"][i][b]["cpu_p99_us"] for i in impls], marker="o", s=22,
                           color="#333333", zorder=3, label="p99 of the calling thread's CPU time")
            _label_bars(ax, bars, [f"{v:.1f}" for v in p50])
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("µs per act() call (log scale)")
            ax.set_ylim(min(p50) / 2, max(p99) * 2)
        else:
            total = [lat["results"][i][b]["instructions_per_call"] for i in impls]
            inlib = [sum(lat["results"][i][b]["in_library"].values()) for i in impls]
            ax.bar(x, inlib, color=colors)
            ax.bar(x, np.subtract(total, inlib), bottom=inlib, color=colors, alpha=0.35, hatch="//",
                   edgecolor="white")
            _label_bars(ax, ax.bar(x, np.zeros(len(x)), bottom=total), [f"{t / 1e3:,.0f}k" for t in total])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}k"))
            ax.set_ylabel("guest instructions per act() call")
            ax.set_ylim(0, max(total) * 1.12)
        ax.set_xticks(x, [LABELS[i].replace(" ", "\n", 1) for i in impls], fontsize=9)
        ax.set_title(f"batch {b}")
    if lat["kind"] == "wall_clock":
        fig.suptitle(f"act() latency, {lat['threads']} thread(s), {report['machine']['cpu']}", fontsize=11)
        handles, labels = axes[0][0].get_legend_handles_labels()
        handles[labels.index("p50 (wall clock)")] = Patch(color="#777777")  # one swatch for bars of every colour
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02), markerscale=0.5)
    else:
        fig.suptitle(f"instructions per act() under qemu-aarch64 -cpu {lat['cpu']} (a count, not a time)",
                     fontsize=11)
        fig.legend(handles=[Patch(color="#777777", label="inside the engine's own libraries"),
                            Patch(facecolor="#777777", alpha=0.35, hatch="//", edgecolor="white",
                                  label="Python, numpy and glue")],
                   loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return "latency.png", fig


def _plot_memory(report: dict, plt):
    mem = report["memory"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    keys = ["fp32", "onnxruntime-int8", "bitrl"]
    values = [mem["param_bytes"][k] for k in keys]
    bars = ax1.bar(range(3), values, color=[COLORS["torch"], COLORS["onnxruntime-int8"], COLORS["bitrl"]])
    _label_bars(ax1, bars, [f"{v:,} B" for v in values])
    ax1.set_xticks(range(3), ["fp32", "int8 (ORT)", "ternary (ours)"])
    ax1.set_ylabel("parameter bytes (weights, scales, biases)")
    ax1.set_ylim(0, max(values) * 1.15)
    ax1.set_title(f"parameters: {mem['parameters']:,}")
    rss = mem["rss"]
    kinds = list(rss)
    peak = [rss[k]["peak_rss"] / 2**20 for k in kinds]
    bars = ax2.bar(range(len(kinds)), peak, color=[COLORS[k] for k in kinds])
    _label_bars(ax2, bars, [f"{v:.0f}" for v in peak])
    ax2.axhline(rss["python"]["peak_rss"] / 2**20, color="#666666", ls="--", lw=1, label="bare python")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_xticks(range(len(kinds)), [LABELS[k].replace(" (", "\n(").replace(" + ", "\n+ ").replace(" fp32", "\nfp32")
                                       .replace(" int8", "\nint8") for k in kinds], fontsize=8)
    ax2.set_ylabel("peak RSS of the process, MiB")
    ax2.set_ylim(0, max(peak) * 1.15)
    host = " (host build)" if mem.get("measured_with_host_build") else ""
    ax2.set_title(f"one fresh process loads and runs each{host}")
    fig.tight_layout()
    return "memory.png", fig


def _plot_energy(report: dict, plt):
    per = report["energy"]["per_call"]
    keys = ["fp32", "onnxruntime-int8", "bitrl"]
    compute = [per[k]["compute_pj"] / 1e3 for k in keys]
    moved = [per[k]["weight_memory_pj"] / 1e3 for k in keys]
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    ax.bar(range(3), compute, color="#f4a261", label="arithmetic")
    bars = ax.bar(range(3), moved, bottom=compute, color="#264653", label="reading the weights")
    for bar, c, m in zip(bars, compute, moved):
        ax.annotate(f"{c + m:,.1f} nJ", (bar.get_x() + bar.get_width() / 2, c + m), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(3), ["fp32", "int8 (ORT)", "ternary (ours)"])
    ax.set_ylabel("nJ per batch-1 call (ESTIMATE)")
    ax.set_ylim(0, max(np.add(compute, moved)) * 1.15)
    ax.set_title("energy estimate: Horowitz 45 nm figures x operation counts", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return "energy.png", fig


def _plot_returns(report: dict, plt):
    ret = report["returns"]
    keys = [k for k in (ret["fp32_impl"], "bitrl", "onnxruntime-int8", "random") if k in ret["episodes_returns"]]
    labels = {**LABELS, "random": "random actions"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    data = [ret["episodes_returns"][k] for k in keys]
    ax.boxplot(data, widths=0.5, showmeans=True, medianprops={"color": "#333333"},
               meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "#333333"})
    rng = np.random.default_rng(0)
    for i, (k, values) in enumerate(zip(keys, data), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=18, alpha=0.8,
                   color=COLORS.get(k, "#bbbbbb"), zorder=3)
    ax.set_xticks(range(1, len(keys) + 1), [labels[k].replace(" ", "\n", 1) for k in keys])
    ax.set_ylabel("episode return")
    kept = f"; ternary keeps {100 * ret['kept']:.1f}% of fp32" if ret.get("kept") is not None else ""
    ax.set_title(f"{ret['env']}: {ret['episodes']} episodes, seeds {ret['seeds'][0]}..{ret['seeds'][1]}{kept}",
                 fontsize=10)
    fig.tight_layout()
    return "returns.png", fig
