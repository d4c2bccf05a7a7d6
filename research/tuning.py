r"""The record of a tuning sweep: every run in a folder against a reference config, in one table.

    python research/tuning.py --runs=research/results/tune_fmnist --config=fmnist.py \
        --rounds=50,100 --goal_round=100

Each sub-folder of --runs is one run (`experiments/main.py --config=... --config.FIELD=VALUE
--workdir=<runs>/<name>`), read from its compact record: config.json, metrics.jsonl and, once it
finished, summary.json. Nothing runs. A row gives the settings where the run differs from --config
(the default being tuned), accuracy and density at the --rounds asked for, the best accuracy and its
round, and the last round's: `<runs>/tuning.md`, `<runs>/tuning.csv` and `<runs>/tuning_curves.png`
(every run's accuracy and density by round).
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import sys
from typing import Any
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # no install needed

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections

from experiments import common
from spafl_jax import files
from spafl_jax import reporting
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = common.define_config_flag(
    os.path.join(common.CONFIG_DIR, 'default.py'),
    "The config being tuned: each run's settings are shown where they differ from it.",
)
_RUNS = flags.DEFINE_string(
    'runs', None, 'Folder of the sweep: one sub-folder per run.', required=True
)
_ROUNDS = flags.DEFINE_list(
    'rounds',
    ['50', '100'],
    'Rounds whose accuracy and density the table '
    'shows (the nearest evaluated round at or before each).',
)


def settings(config: dict[str, Any], reference: dict[str, Any], ignore: Sequence[str] = ()) -> str:
    """`field value, ...` for every setting where `config` differs from `reference`."""
    changed = common.differing_settings(
        {'run': config, 'reference': reference},
        ignore=('rounds', *common.EXECUTION_FIELDS, *ignore),
    )
    return changed['run'] or '(the reference)'


def at_round(records: Sequence[dict[str, Any]], round_index: int) -> dict[str, Any] | None:
    """The last evaluated record at or before `round_index`, if the run reached that round."""
    before = [r for r in records if r['round'] <= round_index]
    if not before or records[-1]['round'] < round_index:
        return None
    return before[-1]


def evaluated(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if 'accuracy' in r and math.isfinite(r['accuracy'])]


def collect(
    runs_dir: str, reference: ml_collections.ConfigDict, rounds: Sequence[int]
) -> list[dict[str, Any]]:
    """A row per run folder (sorted by name) from its records."""
    reference_dict = json.loads(json.dumps(reference.to_dict()))
    rows = []
    for name in sorted(os.listdir(runs_dir)):
        directory = os.path.join(runs_dir, name)
        config = common.read_record(directory, 'config.json')
        metrics_path = os.path.join(directory, reporting.METRICS_FILENAME)
        if config is None or not os.path.isfile(metrics_path):
            continue
        records = evaluated(reporting.read_metrics(metrics_path))
        if not records:
            continue
        best = max(records, key=lambda r: r['accuracy'])
        last = records[-1]
        row = {
            'run': name,
            'settings': settings(config, reference_dict),
            'setting': settings(config, reference_dict, ignore=('seed',)),
            'seed': config['seed'],
            'rounds': config['rounds'],
            'status': common.run_status(directory),
            'last_round': last['round'],
            'accuracy_last': last['accuracy'],
            'density_last': last['density'],
            'accuracy_best': best['accuracy'],
            'best_round': best['round'],
        }
        for r in rounds:
            record = at_round(records, r)
            row[f'accuracy_{r}'] = record['accuracy'] if record else float('nan')
            row[f'density_{r}'] = record['density'] if record else float('nan')
        row['curve'] = [(rec['round'], rec['accuracy'], rec['density']) for rec in records]
        rows.append(row)
    return rows


def write_table(
    rows: Sequence[dict[str, Any]], runs_dir: str, rounds: Sequence[int], command: str
) -> None:
    columns = (
        ['run', 'settings', 'rounds', 'status', 'last_round']
        + [f'{field}_{r}' for r in rounds for field in ('accuracy', 'density')]
        + ['accuracy_best', 'best_round', 'accuracy_last', 'density_last']
    )
    common.write_csv(os.path.join(runs_dir, 'tuning.csv'), rows, columns)
    cell = lambda v, scale=100, digits=1: '–' if math.isnan(v) else f'{scale * v:.{digits}f}'
    header = ['run', 'settings (where they differ from the reference)']
    header += [f'r{r}: accuracy (%) / density' for r in rounds]
    header += ['best accuracy (%) (round)', 'last round: accuracy (%) / density']
    lines = [
        f'Command: `{command}`',
        '',
        '| ' + ' | '.join(header) + ' |',
        '|' + '---|' * len(header),
    ]
    for row in rows:
        cells = [row['run'], row['settings']]
        cells += [
            f'{cell(row[f"accuracy_{r}"])} / {cell(row[f"density_{r}"], 1, 3)}' for r in rounds
        ]
        cells.append(f'{cell(row["accuracy_best"])} ({row["best_round"]})')
        unfinished = '' if row['status'] == 'finished' else f' ({row["status"]} of {row["rounds"]})'
        cells.append(
            f'{cell(row["accuracy_last"])} / {cell(row["density_last"], 1, 3)}{unfinished}'
        )
        lines.append('| ' + ' | '.join(cells) + ' |')
    groups = seed_groups(rows)
    if groups:
        lines += [
            '',
            'Settings run with several seeds, finished runs only: mean ± sample std over seeds.',
            '',
            '| settings | seeds | last round: accuracy (%) | density |',
            '|---|---|---|---|',
        ]
        for setting, members in groups.items():
            accuracy = common.mean_std([m['accuracy_last'] for m in members])
            density = common.mean_std([m['density_last'] for m in members])
            lines.append(
                f'| {setting} | {" ".join(str(m["seed"]) for m in members)} | '
                f'{100 * accuracy[0]:.1f} ± {100 * accuracy[1]:.1f} | '
                f'{density[0]:.3f} ± {density[1]:.3f} |'
            )
    files.write_atomic(os.path.join(runs_dir, 'tuning.md'), '\n'.join(lines) + '\n')


def seed_groups(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{settings without the seed: its finished runs} for settings finished with several seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row['status'] == 'finished':
            groups.setdefault(row['setting'], []).append(row)
    return {k: sorted(v, key=lambda m: m['seed']) for k, v in groups.items() if len(v) > 1}


def plot_curves(rows: Sequence[dict[str, Any]], path: str) -> str:
    """Accuracy and density against the round, one line per run, and each run's last accuracy
    against its last density (the trade-off being tuned); the legend below, in columns."""
    legend_rows = math.ceil(len(rows) / 4)
    fig = Figure(figsize=(15, 4.4 + 0.22 * legend_rows), dpi=110)
    FigureCanvasAgg(fig)
    accuracy_ax, density_ax, trade_ax = fig.subplots(1, 3)
    handles = []
    for i, row in enumerate(rows):
        # Ten colours, then the next line style and marker: every run stays tellable apart.
        style, marker = ('-', '--', ':', '-.')[i // 10 % 4], 'os^D'[i // 10 % 4]
        rounds, accuracy, density = zip(*row['curve'])
        (line,) = accuracy_ax.plot(rounds, [100 * a for a in accuracy], style, linewidth=1.2)
        density_ax.plot(rounds, density, style, color=line.get_color(), linewidth=1.2)
        trade_ax.plot(
            row['density_last'],
            100 * row['accuracy_last'],
            marker,
            color=line.get_color(),
            markersize=6,
            markeredgecolor='black' if row['settings'] == '(the reference)' else 'none',
        )
        handles.append((line, row['run']))
    accuracy_ax.set_ylabel('accuracy (%), mean over clients')
    density_ax.set_ylabel('density (mean over layers of kept rows)')
    for ax in (accuracy_ax, density_ax):
        ax.set_xlabel('round')
    trade_ax.set_xlabel('last round: density')
    trade_ax.set_ylabel('last round: accuracy (%)')
    trade_ax.set_title('trade-off (black edge: the reference config)', fontsize=9)
    for ax in (accuracy_ax, density_ax, trade_ax):
        ax.grid(True, alpha=0.3)
    fig.legend(
        [h for h, _ in handles],
        [n for _, n in handles],
        loc='lower center',
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.22 * legend_rows / (4.4 + 0.22 * legend_rows) + 0.02, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=fig.dpi, format='png')
    files.write_atomic(path, buffer.getvalue())
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    try:
        rounds = [int(r) for r in _ROUNDS.value]
    except ValueError:
        common.exit_with_error(f'--rounds must be integers, got {",".join(_ROUNDS.value)}.')
    runs_dir = _RUNS.value
    if not os.path.isdir(runs_dir):
        common.exit_with_error(f"--runs={runs_dir}: no such folder (give the sweep's folder).")
    rows = collect(runs_dir, _CONFIG.value, rounds)
    if not rows:
        common.exit_with_error(
            f'--runs={runs_dir}: no run records (config.json and metrics.jsonl) in its sub-folders.'
        )
    command = 'python research/tuning.py ' + ' '.join(
        shlex.quote(a.replace(common.CONFIG_DIR + os.sep, '')) for a in sys.argv[1:]
    )
    write_table(rows, runs_dir, rounds, command)
    plot_curves(rows, os.path.join(runs_dir, 'tuning_curves.png'))
    with open(os.path.join(runs_dir, 'tuning.md')) as f:
        print(f.read(), end='')


if __name__ == '__main__':
    sys.argv = common.resolve_config_argument(sys.argv)
    app.run(main, flags_parser=common.parse_flags)
