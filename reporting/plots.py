"""PNG figures for a run: confusion matrix, ROC, per-round curves and method bars.

Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, not
through pyplot: no GUI backend is ever touched, no global figure registry grows (so
nothing needs closing and runs in threads cannot interfere), and each PNG is written
atomically. With ``synthetic=True`` the figure carries a red "synthetic data" banner, so a
smoke-test figure can never be mistaken for clinical results.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from reporting.results import SYNTHETIC_LABEL
from savlt_model.atomic import atomic_write
from savlt_model.errors import SavltError

_MAX_NAME = 12


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, synthetic: bool) -> Path:
    if synthetic:
        fig.text(
            0.5,
            0.005,
            SYNTHETIC_LABEL,
            ha="center",
            va="bottom",
            color="white",
            fontsize=10,
            fontweight="bold",
            bbox={"facecolor": "#c0392b", "edgecolor": "none", "pad": 3},
        )
    fig.tight_layout(rect=(0, 0.05 if synthetic else 0, 1, 1))
    # tight_layout leaves a placeholder layout engine behind, for which savefig draws the
    # whole figure once more before it renders; the layout is already done, so drop it:
    # the same PNG bytes, a quarter less time per figure (docs/simulation.md)
    fig.set_layout_engine(None)
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


def short_name(name: str) -> str:
    """Axis label for a class: short names as they are, long ones as initials or cut.

    ``high-grade_squamous_intraepithelial_lesion`` -> ``HSIL`` (a hyphenated word gives one
    initial), ``mild_inflammation`` -> ``mild inflam.``.
    """
    words = [w for w in re.split(r"[_\s]+", name) if w]
    if len(name) <= _MAX_NAME:
        return " ".join(words) or name
    if len(words) >= 3:
        return "".join(w[0].upper() for w in words)
    return " ".join(words)[: _MAX_NAME - 1].rstrip() + "."


def plot_confusion(
    cm: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str,
    short_names: Mapping[str, str] | None = None,
    synthetic: bool = False,
) -> Path:
    """Counts and row-normalised percentages (recall per true class); colour = the percent."""
    counts = np.asarray(cm)
    n = len(class_names)
    if counts.shape != (n, n):
        raise SavltError(f"confusion matrix shape {counts.shape} does not match {n} classes")
    short_names = short_names or {}
    labels = [short_names.get(c, short_name(c)) for c in class_names]
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    size = 2.0 + 0.9 * n
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(n):
        for j in range(n):
            text = f"{counts[i, j]}\n{100 * frac[i, j]:.0f}%" if totals[i, 0] else "0"
            color = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path, synthetic)


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str,
    synthetic: bool = False,
) -> Path:
    """Binary ROC per label -> (0/1 labels, scores); AUC (percent) in the legend.

    A curve whose labels hold a single class has no ROC and is left out (listed in the
    legend title), so one centre without positives does not stop the figure.
    """
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    skipped = []
    for label, (y, scores) in curves.items():
        y = np.asarray(y).astype(int)
        scores = np.asarray(scores, dtype=np.float64)
        if y.shape != scores.shape or y.ndim != 1:
            raise SavltError(f"ROC curve {label!r}: labels {y.shape} and scores {scores.shape}")
        if np.unique(y).size < 2:
            skipped.append(label)
            continue
        fpr, tpr, _ = roc_curve(y, scores)
        ax.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {100 * roc_auc_score(y, scores):.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    legend_title = f"no ROC (one class): {', '.join(skipped)}" if skipped else None
    if ax.get_legend_handles_labels()[0] or skipped:
        ax.legend(loc="lower right", title=legend_title, fontsize=8, title_fontsize=8)
    return _save(fig, path, synthetic)


def plot_reliability(
    bins: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
    title: str,
    synthetic: bool = False,
) -> Path:
    """Reliability diagram: accuracy vs top-class confidence per bin, one line per centre
    (label -> (mean confidence, accuracy, count) per bin; empty bins are NaN and skipped)."""
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for label, (conf, acc, count) in bins.items():
        keep = np.asarray(count) > 0
        ax.plot(
            np.asarray(conf)[keep], np.asarray(acc)[keep], marker="o", ms=3, lw=1.2, label=label
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path, synthetic)


def plot_risk_coverage(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str,
    target: float | None = None,
    synthetic: bool = False,
) -> Path:
    """Error rate among the accepted scans vs the share accepted (most confident first),
    one line per centre (label -> (coverage, risk)); ``target``: the referral coverage."""
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    for label, (cov, risk) in curves.items():
        ax.plot(np.asarray(cov), 100 * np.asarray(risk), lw=1.5, label=label)
    if target is not None:
        ax.axvline(target, ls="--", color="grey", lw=1, label=f"target coverage {target:.0%}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("coverage (share of scans the model reads)")
    ax.set_ylabel("error among accepted scans (%)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path, synthetic)


def _ordered(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Per round, the mean of the non-None ``key`` values (several seeds are averaged)."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            by_round.setdefault(int(r["round"]), []).append(float(r[key]))
    rounds = sorted(by_round)
    return rounds, [float(np.mean(by_round[k])) for k in rounds]


def plot_round_curves(
    history: Sequence[dict],
    path: str | Path,
    title: str,
    metric: str = "acc_multiclass",
    synthetic: bool = False,
) -> Path:
    """``metric`` per round, one panel per centre and one line per method; a loss row below
    when any row has a loss. Rows sharing (method, center, round), e.g. seeds, are averaged.
    """
    for i, r in enumerate(history):
        if not isinstance(r, dict) or not {"method", "center", "round"} <= r.keys():
            raise SavltError(f"history row {i} needs method, center and round: {r!r}")
    if not any(r.get(metric) is not None for r in history):
        raise SavltError(f"no history row has a value for {metric!r}; nothing to plot")
    centers = _ordered([r["center"] for r in history])
    methods = _ordered([r["method"] for r in history])
    has_loss = any(r.get("loss") is not None for r in history)
    keys = [metric, "loss"] if has_loss else [metric]

    fig = _new_figure(4.0 * len(centers) + 0.5, 3.2 * len(keys) + 0.6)
    axes = fig.subplots(len(keys), len(centers), squeeze=False, sharex="col")
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for col, center in enumerate(centers):
        for row, key in enumerate(keys):
            ax = axes[row][col]
            for method in methods:
                rows = [r for r in history if r["center"] == center and r["method"] == method]
                rounds, values = _series(rows, key)
                if rounds:
                    ax.plot(rounds, values, marker="o", ms=3, color=colors[method], label=method)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(str(center))
            if row == len(keys) - 1:
                ax.set_xlabel("round")
    handles = {
        lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)
    }
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="best")
    fig.suptitle(title)
    return _save(fig, path, synthetic)


def plot_method_bars(
    summary_rows: Sequence[dict],
    path: str | Path,
    title: str,
    metric: str = "acc_multiclass",
    synthetic: bool = False,
) -> Path:
    """Grouped bars of ``<metric>_mean`` with ``<metric>_std`` error bars from
    :func:`reporting.results.summarize`: centre groups, one bar per method (per method
    and K when the rows mix shot counts). A missing (None) mean leaves a gap.
    """
    mean_key, std_key = f"{metric}_mean", f"{metric}_std"
    if not summary_rows:
        raise SavltError("no summary rows to plot")
    for r in summary_rows:
        if mean_key not in r:
            raise SavltError(f"summary row {r.get('method')}/{r.get('center')} lacks {mean_key}")
    mixed_k = len({r.get("shots") for r in summary_rows}) > 1

    def series_name(r: dict) -> str:
        return f"{r['method']} K={r.get('shots')}" if mixed_k else str(r["method"])

    centers = _ordered([r["center"] for r in summary_rows])
    series = _ordered([series_name(r) for r in summary_rows])
    lookup = {(series_name(r), r["center"]): r for r in summary_rows}
    width = 0.8 / len(series)
    x = np.arange(len(centers))

    fig = _new_figure(max(5.0, 1.2 + len(centers) * (0.6 + 0.35 * len(series))), 4.2)
    ax = fig.add_subplot()
    for i, name in enumerate(series):
        rows = [lookup.get((name, c)) for c in centers]
        means = [np.nan if r is None or r[mean_key] is None else r[mean_key] for r in rows]
        stds = [0.0 if r is None or r.get(std_key) is None else r[std_key] for r in rows]
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(x + offset, means, width, yerr=stds, capsize=3, label=name, color=f"C{i % 10}")
    ax.set_xticks(x, [str(c) for c in centers])
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(series), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title(title)
    return _save(fig, path, synthetic)
