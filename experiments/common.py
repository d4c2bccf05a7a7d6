"""What the experiment commands share: bare config names, recognizing a finished run, and the
pieces of their result tables."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any
from collections.abc import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from spafl_jax import configuration
from spafl_jax import files
from spafl_jax import reporting
from spafl_jax import train

# The command-line pieces every command shares live with the runner's command.
from spafl_jax.cli import CONFIG_DIR  # noqa: F401  (re-exported)
from spafl_jax.cli import define_config_flag  # noqa: F401
from spafl_jax.cli import exit_with_error  # noqa: F401
from spafl_jax.cli import parse_flags  # noqa: F401
from spafl_jax.cli import reporting_stops  # noqa: F401
from spafl_jax.cli import resolve_config_argument  # noqa: F401

SUMMARY_FILENAME = 'summary.json'
# A run's compact record: what research/results/ keeps of it (kilobytes; never checkpoints or figures).
RECORD_FILENAMES = (
    train.CONFIG_FILENAME,
    reporting.METRICS_FILENAME,
    SUMMARY_FILENAME,
    train.DIVERGED_FILENAME,
)


def finished_summary(directory: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The summary of a finished run of this config in `directory`, else None.

    As the runner judges it: a field added to the config since the run was recorded counts at the
    value the run had (`train.ADDED_FIELDS`), and how the state was stored does not count.
    """
    summary_path = os.path.join(directory, SUMMARY_FILENAME)
    if not os.path.isfile(summary_path):
        return None
    try:
        recorded = train.recorded_config(directory)
    except (OSError, ValueError):
        return None
    if recorded is None or train.changed_fields(recorded, config, resuming=False):
        return None  # e.g. more rounds asked for: train_and_evaluate extends or refuses the run
    with open(summary_path) as f:
        return json.load(f)


def read_record(directory: str, filename: str) -> Any:
    """A run's JSON record (`config.json`, `summary.json`) in `directory`, or None if absent."""
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_status(directory: str) -> str:
    """'finished', 'diverged at round N', 'stopped at round N' or 'missing', from a run's records
    (a summary of fewer rounds than config.json asks for is that of a run since extended)."""
    if finished_record(directory) is not None:
        return 'finished'
    diverged = read_record(directory, train.DIVERGED_FILENAME)
    if diverged is not None:
        return f'diverged at round {diverged["round"]}'
    path = os.path.join(directory, reporting.METRICS_FILENAME)
    records = reporting.read_metrics(path) if os.path.isfile(path) else []
    return f'stopped at round {records[-1]["round"]}' if records else 'missing'


def finished_record(directory: str) -> dict[str, Any] | None:
    """The summary of a run whose summary covers all the rounds its config.json asks for."""
    summary = read_record(directory, SUMMARY_FILENAME)
    config = read_record(directory, 'config.json')
    if summary is None or (
        config is not None and summary.get('round', config['rounds']) != config['rounds']
    ):
        return None
    return summary


def copy_record(directory: str, destination: str) -> list[str]:
    """Copies the compact record of the run in `directory` (those of `RECORD_FILENAMES` it has)
    into `destination`, made if missing; a file already there is replaced, atomically. Returns the
    names copied."""
    copied = []
    for name in RECORD_FILENAMES:
        data = files.read_bytes(os.path.join(directory, name))
        if data is not None:
            os.makedirs(destination, exist_ok=True)
            files.write_atomic(os.path.join(destination, name), data)
            copied.append(name)
    return copied


def keep_record(directory: str, destination: str | None, log: Callable[[str], None]) -> None:
    """`copy_record(directory, destination)`, said in `log`; nothing where `destination` is None
    (no --records_to)."""
    if destination is not None and copy_record(directory, destination):
        log(f'  record copied to {destination}')


def check_records_to(records_to: str, workdir: str) -> None:
    """ValueError naming `--records_to` and the fix unless it is a directory other than
    `workdir` that can be made and written."""
    if os.path.realpath(records_to) == os.path.realpath(workdir):
        raise ValueError(
            f'--records_to={records_to} is the --workdir itself: give the folder the records '
            'are kept in (e.g. research/results/<study>), or leave the flag out.'
        )
    try:
        os.makedirs(records_to, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f'--records_to={records_to} cannot be made ({e.strerror}): give a writable folder.'
        ) from None
    if not os.access(records_to, os.W_OK):
        raise ValueError(f'--records_to={records_to} is not writable: give a writable folder.')


def unfinished_note(directories: dict[Any, str]) -> str:
    """' (seed 2: diverged at round 35)' for the seeds ({seed: directory}) that did not finish."""
    notes = [
        f'seed {seed}: {status}'
        for seed, status in ((seed, run_status(d)) for seed, d in directories.items())
        if status != 'finished'
    ]
    return f' ({"; ".join(notes)})' if notes else ''


def config_of_records(directories: Sequence[str]) -> ml_collections.ConfigDict:
    """The config of the first run among `directories` that wrote its config.json (the table's
    setting when it is rebuilt from records alone); ValueError naming the places if none did."""
    for directory in directories:
        config = read_record(directory, 'config.json')
        if config is not None:
            return ml_collections.ConfigDict(config)
    raise ValueError(
        f'no config.json in any of {", ".join(directories)}: the records are not '
        'there (check --workdir).'
    )


# Config fields that say how a run was executed or recorded, not what it computes: left out where
# tables list the settings in which runs differ (the fields a resumed run may change, its length
# aside).
EXECUTION_FIELDS = tuple(f for f in configuration.RESUMABLE_FIELDS if f != 'rounds')


def differing_settings(
    configs: dict[str, dict[str, Any]],
    ignore: Sequence[str] = ('seed', 'method', *EXECUTION_FIELDS),
) -> dict[str, str]:
    """{label: 'field value, ...'} for every config field whose value is not the same in all
    `configs` (flattened one level: `baseline.fedpm_prior`), `ignore`d fields and fields that some
    records lack (added to the config since) left out."""
    flat = {}
    for label, config in configs.items():
        items = {}
        for key, value in config.items():
            if isinstance(value, dict):
                items.update({f'{key}.{k}': v for k, v in value.items()})
            elif key not in ignore:
                items[key] = value
        flat[label] = items
    # A field missing from a record was added after that run, which had its default then.
    keys = sorted(set.intersection(*(set(items) for items in flat.values()))) if flat else []
    varying = [k for k in keys if len({json.dumps(items.get(k)) for items in flat.values()}) > 1]
    return {
        label: ', '.join(f'{k} {items.get(k)}' for k in varying) for label, items in flat.items()
    }


def parse_seeds(values: Sequence[str]) -> list[int]:
    """`--seeds` as integers; a usage error naming the flag otherwise."""
    from absl import app  # pylint: disable=g-import-not-at-top

    try:
        return [int(s) for s in values]
    except ValueError:
        raise app.UsageError(f'--seeds must be integers, got {",".join(values)}') from None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value); NaN if any value is NaN."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def percent_cell(row: dict[str, Any], field: str) -> str:
    """`row[field_mean] ± row[field_std]` as percentages with two decimals, the mean alone where
    the row is one seed's (`row['seeds']`); '–' where a seed's value is missing (a run that has not
    finished, or diverged: the row's name says which)."""
    mean, std = row[f'{field}_mean'], row[f'{field}_std']
    if not math.isfinite(mean):
        return '–'
    if len(str(row['seeds']).split()) == 1:
        return f'{100 * mean:.2f}'
    return f'{100 * mean:.2f} ± {100 * std:.2f}'


def number_cell(value: float, spec: str = '.4g') -> str:
    """`value` formatted by `spec`, or '–' where it is missing (NaN)."""
    return format(value, spec) if math.isfinite(value) else '–'


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """The rows' `columns`, floats at full precision (repr)."""
    text = io.StringIO(newline='')
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction='ignore')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    files.write_atomic(path, text.getvalue())


def setting_sentence(config: ml_collections.ConfigDict) -> str:
    """The federated setting of a table, in one sentence's first half."""
    return (
        f'{config.num_clients} clients, {config.clients_per_round} per round, '
        f'alpha {config.alpha}, batch {config.batch_size}, {config.local_epochs} local '
        f'epoch(s), lr {config.lr}'
    )


def learning_curves(
    workdir: str,
    method_names: Sequence[str],
    seeds: Sequence[int],
    value: Callable[[dict], float] = lambda record: record['accuracy'],
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{name: (rounds, mean, std)} of `value(record)` (accuracy by default) from
    `<workdir>/<name>/seed<seed>/metrics.jsonl`, over the seeds whose record holds that round
    (sample std, 0 where one seed)."""
    curves = {}
    for name in method_names:
        by_round: dict[int, list[float]] = {}
        for seed in seeds:
            path = os.path.join(workdir, name, f'seed{seed}', reporting.METRICS_FILENAME)
            if os.path.isfile(path):
                for record in reporting.read_metrics(path):
                    if 'accuracy' in record:  # evaluated rounds
                        by_round.setdefault(int(record['round']), []).append(float(value(record)))
        rounds = np.array(sorted(by_round), np.int64)
        stats = np.array([mean_std(by_round[r]) for r in rounds], np.float64).reshape(-1, 2)
        curves[name] = (rounds, stats[:, 0], stats[:, 1])
    return curves


def plot_learning_curves(curves: dict, path: str, title: str = '', gbit: dict | None = None) -> str:
    """Mean accuracy (%) against the round, one line per method or setting, ± std shaded; with
    `gbit` ({name: (rounds, mean Gbit sent so far, std)}), a second panel against the bits sent."""
    fig = Figure(figsize=(11.5 if gbit else 6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
    axes = fig.subplots(1, 2 if gbit else 1, squeeze=False)[0]
    for name, (rounds, mean, std) in curves.items():
        if len(rounds) == 0:
            continue
        (line,) = axes[0].plot(
            rounds, 100 * mean, marker='.' if len(rounds) < 30 else None, label=name
        )
        axes[0].fill_between(
            rounds,
            100 * (mean - std),
            100 * (mean + std),
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
        if gbit:
            sent = dict(zip(gbit[name][0].tolist(), gbit[name][1].tolist()))
            points = [
                (sent[r], 100 * m)
                for r, m in zip(rounds.tolist(), mean.tolist())
                if sent.get(r, 0.0) > 0
            ]
            if points:
                axes[1].plot(*zip(*points), color=line.get_color(), label=name)
            else:  # nothing to place on a log axis
                axes[1].plot([], [], color=line.get_color(), label=f'{name} (sends nothing)')
    axes[0].set_title(title)
    axes[0].set_xlabel('round')
    if gbit:
        axes[1].set_xscale('log')
        axes[1].set_xlabel('Gbit sent so far, up + down (log scale)')
        axes[1].set_title('accuracy against communication')
    for ax in axes:
        ax.set_ylabel('accuracy (%), mean over clients')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return reporting.save_figure(fig, path, dpi=fig.dpi)
