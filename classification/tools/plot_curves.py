#!/usr/bin/env python3
"""Plot training curves (loss, top-1, learning rate) from a run's ``summary.csv`` into one PNG.

``train.py`` calls :func:`plot_summary` at the end of every run; run it by hand for a run in progress::

    python classification/tools/plot_curves.py output/train/<run>/summary.csv [-o curves.png]
"""
from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence


def read_summary(path: str) -> dict[str, list[float]]:
    """Read timm's ``summary.csv`` into columns of floats (non-numeric cells become NaN)."""
    cols: dict[str, list[float]] = {}
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            if row.get('epoch') == 'epoch':  # a repeated header (appended after a resume)
                continue
            for k, v in row.items():
                try:
                    cols.setdefault(k, []).append(float(v))
                except (TypeError, ValueError):
                    cols.setdefault(k, []).append(float('nan'))
    if not cols.get('epoch'):
        raise ValueError(f'{path} has no epoch rows')
    return cols


def plot_summary(summary_csv: str, out_png: str, title: str | None = None) -> str:
    """Write a three-panel PNG (loss, top-1/top-5, lr per epoch) and return its path.

    Raises:
        ValueError: ``summary_csv`` has no epoch rows or no ``train_loss`` column (not a train.py summary).
        OSError: ``summary_csv`` cannot be read or ``out_png`` cannot be written.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cols = read_summary(summary_csv)
    if 'train_loss' not in cols:
        raise ValueError(f'{summary_csv} has no train_loss column (columns: {", ".join(cols)}); '
                         'expected the summary.csv of a train.py run')
    ep = cols['epoch']
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax = axes[0]
    ax.plot(ep, cols['train_loss'], 'o-', label='train loss')
    if 'eval_loss' in cols:
        ax.plot(ep, cols['eval_loss'], 's-', label='val loss')
    ax.set_title('loss')
    ax = axes[1]
    for key, style in (('eval_top1', 'o-'), ('eval_top5', 's--'), ('eval_ema_top1', '^-')):
        if key in cols:
            ax.plot(ep, cols[key], style, label=key.replace('eval_', 'val '))
    ax.set_title('accuracy (%)')
    ax = axes[2]
    ax.plot(ep, cols.get('lr', cols.get('train_lr', [])), 'o-', label='lr (end of epoch)')
    ax.set_yscale('log')
    ax.set_title('learning rate')
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(summary_csv))))
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('summary', help='summary.csv written by train.py')
    p.add_argument('-o', '--out', default='', help='PNG path (default: training_curves.png beside the CSV)')
    args = p.parse_args(argv)
    if not os.path.isfile(args.summary):
        p.error(f'argument summary: expected an existing summary.csv file, got {args.summary!r}')
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.summary)), 'training_curves.png')
    if os.path.isdir(out):
        p.error(f'argument -o/--out: expected a PNG file name, got the folder {out!r}')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = os.path.splitext(out)[1].lstrip('.').lower()
    if suffix not in formats:  # matplotlib would refuse it only after reading and drawing
        p.error(f'argument -o/--out: expected a file name ending in an image format ({", ".join(sorted(formats))}), '
                f'got {out!r}')
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # -o into a new folder is fine
    except OSError as e:
        p.error(f'argument -o/--out: cannot create the folder of {out!r}: {e}')
    try:
        print(plot_summary(args.summary, out))
    except ValueError as e:
        p.error(f'argument summary: {e}')
    except OSError as e:
        p.error(f'argument -o/--out: cannot write {out!r}: {e}')


if __name__ == '__main__':
    main()
