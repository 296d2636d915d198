"""Training curves: a run's `<save>.metrics.csv` (one row per epoch) drawn as one PNG.

Four panels: training loss; accuracy (train, and validation overall and per cell type: the `acc` and
`acc_<CELLTYPE>` columns, absent when training on everything); learning rate; pseudo-labelled wells in
training. Columns a run does not have are left out of their panel.

matplotlib is optional: without it `plot_training_curves` logs a one-line note and returns False.
It draws on a Figure with the Agg canvas directly (no pyplot), so it never touches the process-wide
backend and is safe to call during training, in a process without a display.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cellpaint.core.atomic import atomic_write

log = logging.getLogger("cellpaint")


def default_output(metrics_csv: Path) -> Path:
    """results/run.metrics.csv -> results/run.curves.png (anything else: the same name with .png)."""
    metrics_csv = Path(metrics_csv)
    name = metrics_csv.name
    if name.endswith(".metrics.csv"):
        return metrics_csv.with_name(name[: -len(".metrics.csv")] + ".curves.png")
    return metrics_csv.with_suffix(".png")


def read_metrics(metrics_csv: Path) -> pd.DataFrame:
    """The metrics table, sorted by epoch; empty when the file has a header (or nothing) but no rows."""
    try:
        history = pd.read_csv(metrics_csv)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    if "epoch" in history:
        history = history.sort_values("epoch", kind="stable").reset_index(drop=True)
    return history


def _series(history: pd.DataFrame, column: str) -> np.ndarray | None:
    if column not in history:
        return None
    values = pd.to_numeric(history[column], errors="coerce").to_numpy(dtype=float)
    return values if np.isfinite(values).any() else None


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.45")


def _minor_log_label(v: float, _pos=None) -> str:
    """Plain labels at 2, 3 and 5 times a power of ten; the other minor ticks unlabelled."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** np.floor(np.log10(v)))
    return f"{v:g}" if lead in (2, 3, 5) else ""


def draw(history: pd.DataFrame, title: str = ""):
    """The four-panel matplotlib Figure of a metrics table (needs matplotlib)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    x = _series(history, "epoch")
    x = np.arange(len(history), dtype=float) if x is None else x
    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    (ax_loss, ax_acc), (ax_lr, ax_pl) = fig.subplots(2, 2, sharex=True)
    marker = "o" if len(x) <= 40 else None

    loss = _series(history, "train_loss")
    if loss is None:
        _empty(ax_loss, "no train_loss column")
    else:
        ax_loss.plot(x, loss, marker=marker, ms=3, color="C0", label="train")
        positive = loss[np.isfinite(loss)]
        if positive.size and positive.min() > 0 and positive.max() / positive.min() > 20:
            ax_loss.set_yscale("log")
            ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax_loss.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
        ax_loss.legend(loc="upper right")
    ax_loss.set_title("loss")

    train_acc = _series(history, "train_acc")
    if train_acc is not None:
        ax_acc.plot(x, train_acc, ls="--", marker=marker, ms=2, color="0.35", label="train")
    val = _series(history, "acc")
    if val is not None:
        ax_acc.plot(x, val, marker=marker, ms=3, lw=2.2, color="k", label="validation")
        best = int(np.nanargmax(val))
        ax_acc.annotate(f"best {val[best]:.4f}\nepoch {x[best]:g}", (x[best], val[best]),
                        xytext=(0, -28), textcoords="offset points", ha="center", fontsize=8,
                        arrowprops=dict(arrowstyle="-", color="0.5"))
    cell_types = sorted(c for c in history.columns if c.startswith("acc_"))
    for i, column in enumerate(cell_types):
        values = _series(history, column)
        if values is not None:
            ax_acc.plot(x, values, lw=1.1, alpha=0.85, color=f"C{(i + 1) % 10}",
                        label=f"val {column[len('acc_'):]}")
    if train_acc is None and val is None and not cell_types:
        _empty(ax_acc, "no accuracy columns")
    else:
        ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.legend(loc="lower right", fontsize=8, ncol=2)
        if val is None:
            ax_acc.text(0.02, 0.97, "no validation fold (--cv-number -1)", transform=ax_acc.transAxes,
                        va="top", fontsize=8, color="0.45")
    ax_acc.set_title("accuracy")

    lr = _series(history, "lr")
    if lr is None:
        _empty(ax_lr, "no lr column")
    else:
        ax_lr.plot(x, lr, marker=marker, ms=3, color="C2")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set_title("learning rate (last step of the epoch)")

    pl = _series(history, "pseudo_labels")
    if pl is None:
        _empty(ax_pl, "no pseudo_labels column")
    else:
        pl = np.nan_to_num(pl)
        ax_pl.bar(x, pl, width=0.8 if len(x) < 2 else 0.8 * float(np.min(np.diff(x)) or 1), color="C4")
        if not pl.any():
            _empty(ax_pl, "no pseudo-labels")
    ax_pl.set_title("pseudo-labelled wells in training")

    for ax in (ax_loss, ax_acc, ax_lr, ax_pl):
        ax.grid(alpha=0.3)
    for ax in (ax_lr, ax_pl):
        ax.set_xlabel("epoch")
    if title:
        fig.suptitle(title)
    return fig


def _title(metrics_csv: Path, history: pd.DataFrame) -> str:
    name = metrics_csv.name[: -len(".metrics.csv")] if metrics_csv.name.endswith(".metrics.csv") else metrics_csv.stem
    parts = [f"{name}: {len(history)} epoch{'s' if len(history) != 1 else ''}"]
    val = _series(history, "acc")
    if val is not None:
        best = int(np.nanargmax(val))
        epoch = history["epoch"].iloc[best] if "epoch" in history else best
        parts.append(f"best validation accuracy {val[best]:.4f} (epoch {epoch})")
    seconds = _series(history, "seconds")
    if seconds is not None:
        total = float(np.nansum(seconds))
        parts.append((f"{total / 3600:.2f} h" if total >= 3600 else f"{total / 60:.1f} min" if total >= 60
                      else f"{total:.0f} s") + " of epochs")
    return ", ".join(parts)


def plot_training_curves(metrics_csv: Path, out_png: Path) -> bool:
    """Draw `metrics_csv` into `out_png` (written atomically). False, with a one-line note in the log, when
    matplotlib is not installed or the CSV is missing or has no rows."""
    metrics_csv, out_png = Path(metrics_csv), Path(out_png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("training curves skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    try:
        history = read_metrics(metrics_csv)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        log.warning("training curves skipped: cannot read %s (%s)", metrics_csv, " ".join(str(e).split()))
        return False
    if history.empty:
        log.warning("training curves skipped: %s has no rows yet", metrics_csv)
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = draw(history, _title(metrics_csv, history))
    FigureCanvasAgg(fig)
    with atomic_write(out_png, "wb") as f:
        fig.savefig(f, format="png")
    log.info("wrote training curves to %s", out_png)
    return True
