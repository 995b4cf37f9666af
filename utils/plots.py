"""Charts written as PNG files, drawn headless with matplotlib (Agg backend): the per-layer channel chart of a
prune, the |gamma| histogram of sparsity training, and the per-epoch training curves (results.png).

Every chart is rendered in memory and written atomically, so an interrupted run never leaves half a PNG.
"""
import csv
import io
import math

import numpy as np

from utils.io import write_bytes_atomic


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); imported on first use (it is slow to import)."""
    import matplotlib
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def channel_chart(layers, before, after, path, title=''):
    """Bar chart of each prunable layer's channels before (grey) and after (blue) a prune.

    layers, before, after: equal-length sequences (layer index, channel counts)."""
    plt = _pyplot()
    n = max(len(layers), 1)
    fig, ax = plt.subplots(figsize=(min(max(6.4, 0.18 * n), 24), 4.2))
    x = np.arange(len(layers))
    ax.bar(x, before, color='0.75', label='before')
    ax.bar(x, after, color='tab:blue', label='after')
    step = max(1, math.ceil(n / 60))                  # at most ~60 tick labels
    ax.set_xticks(x[::step], [str(i) for i in layers][::step], fontsize=7, rotation=90)
    ax.set_xlabel('layer')
    ax.set_ylabel('channels')
    ax.set_title(title or 'channels per layer, before / after')
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def gamma_histogram(values, path, title='', small=0.01, bins=60):
    """Histogram of |gamma| values (a 1-D array) from 0 to their maximum, with a red line at `small`; written to
    `path`. Returns (counts, edges) as numpy arrays."""
    g = np.abs(np.asarray(values, dtype=np.float64))
    hi = float(g.max()) if g.size and g.max() > 0 else 1.0
    counts, edges = np.histogram(g, bins=bins, range=(0.0, hi))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align='edge', color='tab:blue')
    ax.axvline(small, color='tab:red', linewidth=1)
    share = float((g < small).mean()) if g.size else 0.0
    ax.set_title(f"{title}  ({g.size} channels, {share:.1%} < {small:g})".strip())
    ax.set_xlabel('|gamma|')
    ax.set_ylabel('channels')
    fig.tight_layout()
    _save(fig, path)
    return counts, edges


RESULT_PANELS = (('box', 'obj', 'cls', 'sparsity', 'total'), ('precision', 'recall', 'f1'),
                 ('mAP50', 'mAP50_95'), ('gamma_small_share', 'gamma_p50'))


def _column(rows, key):
    out = []
    for r in rows:
        try:
            out.append(float(r.get(key, 'nan')))
        except ValueError:
            out.append(float('nan'))
    return np.array(out)


def results_png(csv_path, path):
    """Training curves from a train.py results.csv: losses, P/R/F1, mAP and the sparsity statistics per epoch
    (a panel whose columns are all empty, e.g. sparsity without -sr, says so)."""
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    epochs = _column(rows, 'epoch')
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(RESULT_PANELS), figsize=(4 * len(RESULT_PANELS), 3.4))
    for ax, keys in zip(axes, RESULT_PANELS):
        drawn = False
        for key in keys:
            y = _column(rows, key)
            if np.isfinite(y).any():
                ax.plot(epochs, y, marker='.', label=key)
                drawn = True
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes)
        ax.set_xlabel('epoch')
    fig.tight_layout()
    return _save(fig, path)
