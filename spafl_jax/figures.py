"""The figures of a SpaFL run: accuracy, density and communication curves (`plot_metrics`) and the
kept filters per client (`plot_sparsity_pattern`), saved as PNG and PDF by `save_figure`.

Matplotlib without pyplot (an Agg canvas per figure), so it runs on the host between rounds and in
notebooks that only have the `metrics.jsonl` of a finished run.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from spafl_jax import files
from spafl_jax.console import bit_unit

_DPI = 120


def _is_number(value: Any) -> bool:
    """An int or a float, not a bool: the values `reporting` writes to TensorBoard as scalars."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: Sequence[Mapping[str, Any]], key: str):
    """Returns (rounds, values) of the records that hold a finite `key`."""
    pairs = [
        (r['round'], float(r[key]))
        for r in records
        if 'round' in r and _is_number(r.get(key)) and math.isfinite(float(r[key]))
    ]
    pairs.sort()
    return (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))


def _new_axes(title: str, ylabel: str):
    fig = Figure(figsize=(6.4, 4.2), dpi=_DPI)
    FigureCanvasAgg(fig)  # Attaches an Agg canvas without touching pyplot.
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel('round')
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def save_figure(fig: Figure, path: str, dpi: float = _DPI, vector: bool = True) -> str:
    """Writes the PNG, and beside it the same figure as PDF (for a paper), atomically and only
    when their bytes change (drawing is deterministic: the PDF carries no creation date)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format='png')
    files.write_atomic(path, buffer.getvalue())
    if vector:
        buffer = io.BytesIO()
        fig.savefig(buffer, format='pdf', metadata={'CreationDate': None, 'ModDate': None})
        files.write_atomic(os.path.splitext(path)[0] + '.pdf', buffer.getvalue())
    return path


_MAIN_LABELS = {
    'accuracy': 'mean over clients',
    'accuracy_weighted': 'weighted by test-set size',
    'density': 'mean over layers (official)',
    'density_weighted': 'weighted by parameters',
}


def _plot_main(ax, records: Sequence[Mapping[str, Any]], key_list, scale: float) -> bool:
    """Draws the curves of `key_list` (those in `_MAIN_LABELS`); whether any had a value."""
    drawn = False
    for key in key_list:
        rounds, values = _series(records, key)
        if rounds.size:
            ax.plot(
                rounds,
                values * scale,
                marker='.' if rounds.size < 50 else None,
                linewidth=1.8,
                label=f'{key}: {_MAIN_LABELS[key]}',
            )
            drawn = True
    return drawn


def _accuracy(records: Sequence[Mapping[str, Any]], out_dir: str) -> str | None:
    """Mean and weighted test accuracy, with the spread over clients as a band."""
    fig, ax = _new_axes('Test accuracy', 'accuracy (%)')
    rounds, mean = _series(records, 'accuracy')
    std_rounds, std = _series(records, 'accuracy_std')
    if rounds.size and np.array_equal(rounds, std_rounds):
        ax.fill_between(
            rounds,
            100 * np.clip(mean - std, 0, 1),
            100 * np.clip(mean + std, 0, 1),
            color='C0',
            alpha=0.18,
            linewidth=0,
            label='± std over clients',
        )
    if _plot_main(ax, records, ['accuracy', 'accuracy_weighted'], 100.0):
        ax.legend(loc='lower right')
        return save_figure(fig, os.path.join(out_dir, 'accuracy.png'))
    return None


def _density(
    records: Sequence[Mapping[str, Any]], layer_keys: Sequence[str], out_dir: str
) -> str | None:
    """Mean and weighted density, and each layer's ('density/<layer>') dashed."""
    fig, ax = _new_axes('Model density (kept fraction)', 'density (%)')
    drawn = _plot_main(ax, records, ['density', 'density_weighted'], 100.0)
    for key in layer_keys:
        rounds, values = _series(records, key)
        if rounds.size:
            ax.plot(
                rounds,
                values * 100.0,
                linewidth=0.8,
                alpha=0.7,
                linestyle='--',
                label=key.removeprefix('density/'),
            )
            drawn = True
    if drawn:
        ax.set_ylim(bottom=0.0)
        ax.legend(fontsize='small', ncol=2 if len(layer_keys) > 4 else 1)
        return save_figure(fig, os.path.join(out_dir, 'density.png'))
    return None


def _communication(records: Sequence[Mapping[str, Any]], out_dir: str) -> str | None:
    """Cumulative bits sent (up, down, total) against the round, with what FedAvg would send on
    the same model and clients (every parameter both ways); a log axis when they are far apart."""
    up_rounds, up = _series(records, 'bits_up')
    down_rounds, down = _series(records, 'bits_down')
    if not (up.size or down.size):
        return None
    fig, ax = _new_axes('Cumulative communication', '')
    ours = []
    if up.size and down.size and np.array_equal(up_rounds, down_rounds):
        ours.append((up_rounds, up + down, 'sent, up + down', dict(linewidth=2.2, color='C0')))
    ours += [
        (up_rounds, up, 'uplink (clients to server)', dict(linewidth=1.2, color='C1')),
        (down_rounds, down, 'downlink (server to clients)', dict(linewidth=1.2, color='C2')),
    ]
    dense_rounds, dense = _series(records, 'bits_dense_equivalent')
    largest_ours = max(float(v.max()) for _, v, _, _ in ours if v.size)
    unit, scale = bit_unit(largest_ours)
    for rounds, values, label, style in ours:
        if values.size:
            ax.plot(rounds, values / scale, label=label, **style)
    if dense.size:
        fedavg = 2.0 * dense  # the dense model each way
        ax.plot(
            dense_rounds,
            fedavg / scale,
            linestyle='--',
            color='0.35',
            linewidth=1.5,
            label='FedAvg on the same model and clients (up + down)',
        )
        if fedavg.max() > 30.0 * largest_ours:
            ax.set_yscale('log')
        if ours[0][1].size and ours[0][0][-1] == dense_rounds[-1] and ours[0][1][-1] > 0:
            ratio = fedavg[-1] / ours[0][1][-1]
            ax.annotate(
                f'{ratio:,.0f}x less than FedAvg'
                if ratio >= 1
                else f'{1 / ratio:,.1f}x more than FedAvg',
                xy=(ours[0][0][-1], ours[0][1][-1] / scale),
                xytext=(-8, 10),
                textcoords='offset points',
                ha='right',
                fontsize='small',
            )
    ax.set_ylabel(f'bits sent so far ({unit})')
    ax.legend(fontsize='small')
    return save_figure(fig, os.path.join(out_dir, 'communication.png'))


def plot_metrics(records: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """Draws accuracy, density and communication curves of a run (PNG, and PDF beside each).

    Args:
      records: as returned by `read_metrics`. 'accuracy*' and 'density*' are
        fractions in [0, 1]; 'accuracy_std' is the spread over clients;
        'bits_up' / 'bits_down' / 'bits_dense_equivalent' are the cumulative bits
        sent through that round (records exist only for evaluated rounds, so
        summing per-round values here would miss the rounds in between).
      out_dir: created if missing.

    Returns:
      Paths of the PNGs written; a figure whose keys are all absent is skipped.
    """
    os.makedirs(out_dir, exist_ok=True)
    keys = set().union(*(r.keys() for r in records)) if records else set()
    paths = []
    if keys & {'accuracy', 'accuracy_weighted'}:
        paths.append(_accuracy(records, out_dir))
    layer_keys = sorted(k for k in keys if k.startswith('density/'))
    if keys & {'density', 'density_weighted'} or layer_keys:
        paths.append(_density(records, layer_keys, out_dir))
    if keys & {'bits_up', 'bits_down'}:
        paths.append(_communication(records, out_dir))
    return [path for path in paths if path]


def plot_sparsity_pattern(
    masks: np.ndarray, out_path: str, layer: str = 'first layer', round_: int | None = None
) -> str:
    """Draws kept filters per client, as in Figure 3 of the SpaFL paper (PNG and PDF).

    Args:
      masks: [clients, filters] of 0/1, 1 where the filter is kept (drawn black).
      out_path: PNG path; its directory is created if missing.
      layer: the layer's name, for the title.
      round_: the round after which the masks hold, for the title.

    Returns:
      out_path.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f'masks must be [clients, filters], got {masks.shape}.')
    num_clients, num_filters = masks.shape
    # Wide enough for each filter and for the title and legend; tall enough per client.
    width = min(max(6.4, 0.06 * num_filters + 3.0), 16.0)
    height = min(max(3.2, 0.25 * num_clients + 1.6), 12.0)
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    kept = masks != 0
    ax.imshow(
        kept.astype(np.float32),
        cmap='gray_r',
        vmin=0.0,
        vmax=1.0,
        aspect='auto',
        interpolation='nearest',
        extent=(-0.5, num_filters - 0.5, num_clients - 0.5, -0.5),
    )
    ax.set_xlabel(f'filter (output row) of {layer}')
    ax.set_ylabel('client')
    density = float(np.mean(kept)) if masks.size else 0.0
    when = f' after round {round_}' if round_ is not None else ''
    ax.set_title(
        f'{layer}: kept filters per client{when}\n'
        f'{int(kept.sum())} of {masks.size} kept ({density:.1%})',
        fontsize='medium',
    )
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(
        handles=[
            Patch(facecolor='black', edgecolor='0.5', label='kept'),
            Patch(facecolor='white', edgecolor='0.5', label='pruned'),
        ],
        loc='upper left',
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        fontsize='small',
    )
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    return save_figure(fig, out_path)
