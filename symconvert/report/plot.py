"""The report's PNG (``symconvert report --plot``): parameters and symmetrisation error per
layer, the fine-tuning curves and the accuracy of every model measured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from symconvert.errors import SymconvertError
from symconvert.io.files import atomic_write
from symconvert.report.options import COMPARE_KINDS
from symconvert.report.render import Report, report_task


def plot_report(report: Report, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a PNG: per-layer parameters before/after, per-layer symmetrisation error,
    the fine-tuning curves (DIR/metrics.jsonl, and the baselines' when compared) and the
    accuracy of every model measured. At least 1400×1000 pixels."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SymconvertError(f"--plot {path}: write a .png file (e.g. --plot report.png).")
    if path.parent and not path.parent.exists():
        raise SymconvertError(f"--plot {path}: the folder {path.parent} does not exist.")
    layers = report["layers"]
    n = max(len(layers), 1)
    height = max(10.0, 4.0 + 0.32 * n)
    fig, axes = plt.subplots(2, 2, figsize=(16, height), dpi=dpi,
                             gridspec_kw={"height_ratios": [max(1.0, n / 12), 1.0]})
    fig.suptitle(f"symconvert report — {report['model']}, {report['scheme']}: parameters "
                 f"{report['params']['before']:,} → {report['params']['after']:,} "
                 f"(−{report['params']['saved_fraction']:.1%})", fontsize=15)
    _plot_layers(axes[0], layers, n)
    _plot_curves(axes[1][0], report)
    _plot_accuracy(axes[1][1], report)
    for row in axes:
        for a in row:
            a.tick_params(axis="x", labelsize=11)
            a.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return path


def _plot_layers(axes: Any, layers: list[dict[str, Any]], n: int) -> None:
    """Top row: parameters before/after and the symmetrisation error, per layer."""
    names = [e["name"] for e in layers]
    ys = list(range(len(layers)))
    label_size = 11 if n <= 20 else 9 if n <= 40 else 7

    ax = axes[0]
    if layers:
        ax.barh([y - 0.2 for y in ys], [e["params_before"] for e in layers], height=0.4,
                label="before", color="#9aa9bd")
        ax.barh([y + 0.2 for y in ys], [e["params_after"] for e in layers], height=0.4,
                label="after (free parameters)", color="#2b6cb0")
        ax.set_yticks(ys, names, fontsize=label_size)
        ax.invert_yaxis()
        ax.legend(fontsize=11)
    else:
        ax.text(0.5, 0.5, "no converted layers", ha="center", va="center", fontsize=13)
    ax.set_title("parameters per converted layer", fontsize=13)
    ax.set_xlabel("parameters", fontsize=12)

    ax = axes[1]
    errors = [e["symmetrization_error"] for e in layers]
    if layers and any(x is not None for x in errors):
        ax.barh(ys, [x or 0.0 for x in errors], color="#c05621")
        ax.set_yticks(ys, names, fontsize=label_size)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "symmetrisation error not available", ha="center", va="center",
                fontsize=13)
    ax.set_title("symmetrisation error ‖W − unpack(pack(W))‖ / ‖W‖ (source weights)",
                 fontsize=12)
    ax.set_xlabel("relative Frobenius distance", fontsize=12)


def _plot_curves(ax: Any, report: Report) -> None:
    # epoch 0 = before fine-tuning (the converted / pruned / source model), when measured
    acc = report.get("accuracy") or {}
    # the task's metric: a classifier's top-1 (in %), a language model's perplexity (raw)
    metric = report_task(report).metric
    key, name = metric.key, f"eval {metric.axis_label}"
    start = {"symmetric": (acc.get("converted") or {}).get(key)}
    curves = {"symmetric": (report.get("curves") or {}).get("finetuned") or []}
    for kind in COMPARE_KINDS:
        entry = (report.get("compare") or {}).get(kind) or {}
        if entry.get("curve"):
            curves[kind] = entry["curve"]
            start[kind] = (entry.get("before_finetune") or {}).get(key)
    drawn = False
    loss_ax = None
    for (label, rows), color in zip(curves.items(), ("#2b6cb0", "#c05621", "#2f855a"), strict=False):
        pts = [(r.get("epoch", i + 1), metric.plotted(r[f"eval_{key}"]))
               for i, r in enumerate(rows) if isinstance(r.get(f"eval_{key}"), (int, float))]
        if pts and start.get(label) is not None:
            pts.insert(0, (0, metric.plotted(start[label])))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color,
                    label=f"{label}: {name.split(' (')[0]}")
            drawn = True
        loss = [(r.get("epoch", i + 1), r["train_loss"]) for i, r in enumerate(rows)
                if isinstance(r.get("train_loss"), (int, float))]
        if loss:
            loss_ax = loss_ax or ax.twinx()
            loss_ax.plot(*zip(*loss, strict=True), linestyle="--", marker="x", color=color,
                         label=f"{label}: train loss")
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no fine-tuning metrics (metrics.jsonl)", ha="center", va="center",
                fontsize=13)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0 = before fine-tuning)", fontsize=12)
        ax.set_ylabel(name, fontsize=12)
        handles, labels = ax.get_legend_handles_labels()
        if loss_ax is not None:
            loss_ax.set_ylabel("train loss", fontsize=12)
            h2, l2 = loss_ax.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=10, loc="center right")
    ax.set_title("fine-tuning curves", fontsize=13)


def _plot_accuracy(ax: Any, report: Report) -> None:
    acc = report["accuracy"]
    metric = report_task(report).metric
    key, name = metric.key, metric.axis_label
    bars = [(label, acc[k][key]) for k, label in
            (("source", "source"), ("converted", "converted\n(before FT)"),
             ("calibrated", "calibrated\n(before FT)"), ("finetuned", "fine-tuned"))
            if isinstance(acc.get(k), dict) and key in acc[k]]
    for kind in COMPARE_KINDS:
        entry = (report.get("compare") or {}).get(kind) or {}
        if key in entry:
            bars.append((f"{kind}\nbaseline", entry[key]))
    if not bars:
        ax.text(0.5, 0.5, f"accuracy not measured:\n{acc.get('reason', '')[:60]}",
                ha="center", va="center", fontsize=13)
    else:
        labels, values = zip(*bars, strict=True)
        ax.bar(labels, [metric.plotted(v) for v in values], color="#4a5568")
        for i, v in enumerate(values):
            ax.text(i, metric.plotted(v), f"{metric.plotted(v):.2f}", ha="center", va="bottom",
                    fontsize=11)
        ax.set_ylabel(name, fontsize=12)
        if metric.percent:
            low = min(values) * 100
            ax.set_ylim(max(0.0, low - 10), 108)  # headroom for the value labels
        ax.tick_params(axis="x", labelsize=11)
    ax.set_title(f"{name.split(' (')[0]} on the {acc.get('split', 'eval')} split", fontsize=13)


__all__ = ["plot_report"]
