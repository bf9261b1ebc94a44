"""One figure that reads without the table: per cell, every exporter's IOPS
and mean latency (median bar, min-max whisker, each repetition a dot), and
start-up and teardown latency per exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fio import BenchError


def draw(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib: tools/bench installs it (pip extra bench)"
        ) from None
    cells = [c["name"] for c in report["cells"]]
    labels = [p["label"] for p in report["peers"]]
    summary = report["summary"]
    startup = report.get("startup") or {}
    rows = 3 if startup else 2
    fig, axes = plt.subplots(rows, 1, figsize=(11, 4 * rows), constrained_layout=True)
    width = 0.8 / max(1, len(labels))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric, title in (
        (axes[0], "iops", "IOPS (higher is better)"),
        (axes[1], "lat_us", "mean completion latency, us (log scale; lower is better)"),
    ):
        for i, label in enumerate(labels):
            xs, med, lo, hi = [], [], [], []
            for j, cell in enumerate(cells):
                s = summary[cell][label][metric]
                x = j + (i - (len(labels) - 1) / 2) * width
                xs.append(x)
                med.append(s["median"])
                lo.append(s["median"] - s["low"])
                hi.append(s["high"] - s["median"])
                dots = [
                    r[metric] for r in report["samples"] if r["cell"] == cell and r["peer"] == label
                ]
                ax.plot([x] * len(dots), dots, ".", color="black", markersize=3, zorder=3)
            ax.bar(
                xs,
                med,
                width,
                yerr=[lo, hi],
                capsize=3,
                label=label,
                color=colours[i % len(colours)],
                alpha=0.85,
            )
        ax.set_xticks(range(len(cells)), [c["label"] for c in report["cells"]])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if metric == "lat_us":
            ax.set_yscale("log")
    axes[0].legend(ncols=min(len(labels), 5), loc="upper left", fontsize="small")
    ratios = report.get("ratios", {})
    if ratios:
        text = "   ".join(
            f"{c}: {r['median']:.2f} [{r['low']:.2f}-{r['high']:.2f}]" for c, r in ratios.items()
        )
        axes[0].text(
            0.0,
            -0.16,
            f"io_uring/classic paired IOPS ratio, median [min-max]:  {text}",
            transform=axes[0].transAxes,
            fontsize="small",
        )
    if startup:
        ax = axes[2]
        names = list(startup)
        for k, (key, title) in enumerate(
            (("start_ms", "start -> first read"), ("stop_ms", "stop -> mount gone"))
        ):
            xs = [i + (k - 0.5) * 0.35 for i in range(len(names))]
            s = [startup[n][key] for n in names]
            med = [x["median"] for x in s]
            ax.bar(
                xs,
                med,
                0.35,
                label=title,
                yerr=[
                    [m - x["low"] for m, x in zip(med, s, strict=True)],
                    [x["high"] - m for m, x in zip(med, s, strict=True)],
                ],
                capsize=3,
            )
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"export start-up and teardown, ms (median, min-max of {s[0]['n']})")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fp = report["fingerprint"]
    fig.suptitle(
        f"fio randrw 70/30 4k libaio direct, null-co 1G; {report['repeat']} interleaved "
        f"repetitions x {report['runtime']:g}s; kernel {fp['kernel']}, "
        f"{fp['possible_cpus']} CPUs; reference --queues {report['queues']}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
