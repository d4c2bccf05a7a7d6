r"""Ablation: a config run with each step estimator, importance update on and off, several seeds.

    python experiments/ablation.py --config=fmnist.py --config.rounds=20 --seeds=1,2,3 \
        --workdir=/tmp/ablation_fmnist
    python experiments/ablation.py --config=default.py --seeds=1,2 --workdir=/tmp/ablation_digits

Each (estimator, importance_update, seed) run is a plain `train.train_and_evaluate` run in its own
sub-workdir `<workdir>/<estimator>__<importance_update>/seed<seed>`. A finished run of the same
config (summary.json written) is skipped and an unfinished one resumes from its checkpoint, so a
killed ablation goes on where it stopped when the same command is run again. The table of mean ±
sample standard deviation over seeds of the final accuracy and densities is written to
`<workdir>/ablation.md` and `<workdir>/ablation.csv`, every setting's accuracy by round to
`<workdir>/ablation_curves.png`. With --records_to=research/results/<study>, each run's compact
record (config.json, metrics.jsonl, summary.json) is copied to the same sub-path there as the run
finishes, diverges or is stopped. With --records_only nothing runs: the tables and the figure are
rebuilt from those records, as committed under research/results/.
"""

from __future__ import annotations

import copy
import functools
import os
import shlex
import sys
import time
from typing import Any
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # no install needed

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import ml_collections

from experiments import common
from spafl_jax import configuration
from spafl_jax import files
from spafl_jax import train

ESTIMATORS = ('long_tailed', 'identity', 'outside_unit')
# `all_after` is the importance update on (our default); `none` switches it off.
IMPORTANCE_UPDATES = ('all_after', 'none')
# Final-round summary fields that the table reports, in this order.
REPORTED = ('accuracy', 'density', 'density_weighted')

_CONFIG = common.define_config_flag(
    os.path.join(common.CONFIG_DIR, 'default.py'),
    'Config file (a bare name is looked up in '
    'spafl_jax/configs/); override fields with --config.FIELD=VALUE.',
)
_WORKDIR = flags.DEFINE_string(
    'workdir',
    None,
    'Directory of the ablation: one sub-directory per run, and ablation.md / ablation.csv.',
    required=True,
)
_SEEDS = flags.DEFINE_list('seeds', ['1', '2', '3'], 'Seeds of every setting.')
_ESTIMATORS = flags.DEFINE_list('estimators', list(ESTIMATORS), 'Step estimators to compare.')
_IMPORTANCE_UPDATES = flags.DEFINE_list(
    'importance_updates', list(IMPORTANCE_UPDATES), 'importance_update values to compare.'
)
_RECORDS_ONLY = flags.DEFINE_bool(
    'records_only',
    False,
    'Run nothing: rebuild the tables and the '
    "figure from the runs' records in --workdir (--config unused).",
)
_RECORDS_TO = flags.DEFINE_string(
    'records_to',
    None,
    "Also copy each run's compact record (config.json, metrics.jsonl, summary.json) to "
    '<records_to>/<estimator>__<importance_update>/seed<seed> as it finishes or stops, e.g. '
    'research/results/ablation_fmnist500; then `ablation.py --records_only --workdir=<records_to>` '
    'rebuilds the tables from them.',
)


def setting_name(estimator: str, importance_update: str) -> str:
    return f'{estimator}__{importance_update}'


def run_dir(workdir: str, estimator: str, importance_update: str, seed: int) -> str:
    return os.path.join(workdir, setting_name(estimator, importance_update), f'seed{seed}')


def run_ablation(
    config: ml_collections.ConfigDict,
    workdir: str,
    seeds: Sequence[int],
    estimators: Sequence[str] = ESTIMATORS,
    importance_updates: Sequence[str] = IMPORTANCE_UPDATES,
    log: Callable[[str], None] = print,
    records_to: str | None = None,
) -> None:
    """Runs every (estimator, importance_update, seed) not done yet; a diverged run is logged and
    left without a summary (a NaN in the table). With `records_to`, each run's compact record is
    copied to the same place under it when the run finishes, diverges or stops (a run done before:
    straight away)."""
    jobs = [(e, u, s) for e in estimators for u in importance_updates for s in seeds]
    # Every setting is validated before the first (long) run starts.
    for estimator, importance_update, _ in jobs[:: len(seeds)]:
        probe = copy.deepcopy(config)
        probe.estimator, probe.importance_update = estimator, importance_update
        configuration.validate(probe)
    start = time.time()
    for i, (estimator, importance_update, seed) in enumerate(jobs, 1):
        directory = run_dir(workdir, estimator, importance_update, seed)
        prefix = (
            f'[{i}/{len(jobs)}] estimator={estimator} importance_update={importance_update} '
            f'seed={seed}'
        )
        run_config = copy.deepcopy(config)
        run_config.estimator = estimator
        run_config.importance_update = importance_update
        run_config.seed = seed
        keep = functools.partial(
            common.keep_record,
            directory,
            records_to and run_dir(records_to, estimator, importance_update, seed),
            log,
        )
        if common.finished_summary(directory, run_config) is not None:
            log(f'{prefix}: done before, skipped')
            keep()
            continue
        # An unfinished run in `directory` resumes from its newest checkpoint.
        log(f'{prefix}: running in {directory}')
        run_start = time.time()
        try:
            summary = train.train_and_evaluate(run_config, directory)
        except train.NonFiniteError as e:
            log(f'{prefix}: diverged ({e})')  # a result too: NaN, not the end of the ablation
            continue
        finally:
            keep()  # also the record of a run stopped part-way, up to its last round
        log(
            f'{prefix}: accuracy {100 * summary["accuracy"]:.2f}% density '
            f'{100 * summary["density"]:.2f}% (weights {100 * summary["density_weighted"]:.2f}%) '
            f'in {time.time() - run_start:.0f}s; {time.time() - start:.0f}s so far'
        )


def collect(
    workdir: str,
    seeds: Sequence[int],
    estimators: Sequence[str] = ESTIMATORS,
    importance_updates: Sequence[str] = IMPORTANCE_UPDATES,
) -> list[dict[str, Any]]:
    """A row per setting from the runs' summary.json records (a missing one counts as NaN).

    Each row holds `estimator`, `importance_update`, `seeds`, `finished`, the per-seed values
    `<field>_runs` and their `<field>_mean` / `<field>_std` (sample std, ddof=1; 0 for one seed)
    for `REPORTED`.
    """
    rows = []
    for estimator in estimators:
        for importance_update in importance_updates:
            runs = [
                common.finished_record(run_dir(workdir, estimator, importance_update, seed))
                for seed in seeds
            ]
            row: dict[str, Any] = {
                'estimator': estimator,
                'importance_update': importance_update,
                'seeds': ' '.join(str(s) for s in seeds),
                'finished': sum(run is not None for run in runs),
            }
            for field in REPORTED:
                values = [float(run[field]) if run is not None else float('nan') for run in runs]
                row[f'{field}_runs'] = values
                row[f'{field}_mean'], row[f'{field}_std'] = common.mean_std(values)
            rows.append(row)
    return rows


def csv_columns() -> list[str]:
    return ['estimator', 'importance_update', 'seeds', 'finished'] + [
        f'{field}_{stat}' for field in REPORTED for stat in ('mean', 'std')
    ]


def write_tables(
    rows: Sequence[dict[str, Any]], workdir: str, command: str, config: ml_collections.ConfigDict
) -> None:
    """`ablation.csv` (full-precision fractions) and `ablation.md` (percent, mean ± std)."""
    os.makedirs(workdir, exist_ok=True)
    common.write_csv(os.path.join(workdir, 'ablation.csv'), rows, csv_columns())

    seeds = rows[0]['seeds'] if rows else ''
    lines = [
        f'# Ablation: {config.dataset} / {config.model}, {config.rounds} rounds',
        '',
        f'Command: `{command}`',
        '',
        f'{common.setting_sentence(config)}, th_coeff {config.th_coeff}. Final round, '
        + (f'mean ± sample std over seeds {seeds}' if ' ' in seeds else f'seed {seeds}')
        + '. Accuracy: '
        'unweighted mean over clients; density: mean over masked layers of the kept-row fraction; '
        'weights: kept masked weights / all masked weights.',
        '',
        '| estimator | importance update | accuracy (%) | density (%) | density, weights (%) |',
        '|---|---|---|---|---|',
    ]
    for row in rows:
        cells = [common.percent_cell(row, field) for field in REPORTED]
        note = common.unfinished_note(
            {
                seed: run_dir(workdir, row['estimator'], row['importance_update'], int(seed))
                for seed in row['seeds'].split()
            }
        )
        lines.append(
            f'| `{row["estimator"]}` | `{row["importance_update"]}`{note} | '
            + ' | '.join(cells)
            + ' |'
        )
    files.write_atomic(os.path.join(workdir, 'ablation.md'), '\n'.join(lines) + '\n')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    seeds = common.parse_seeds(_SEEDS.value)
    config, workdir = _CONFIG.value, _WORKDIR.value
    command = 'python experiments/ablation.py ' + ' '.join(
        shlex.quote(a.replace(common.CONFIG_DIR + os.sep, '')) for a in sys.argv[1:]
    )
    estimators, updates = _ESTIMATORS.value, _IMPORTANCE_UPDATES.value
    if _RECORDS_ONLY.value:
        try:
            config = common.config_of_records(
                [run_dir(workdir, e, u, s) for e in estimators for u in updates for s in seeds]
            )
        except ValueError as e:
            common.exit_with_error(f'--records_only: {e}')
    else:
        if _RECORDS_TO.value is not None:
            try:
                common.check_records_to(_RECORDS_TO.value, workdir)
            except ValueError as e:
                common.exit_with_error(str(e))
        with common.reporting_stops():  # one line, never a traceback
            run_ablation(config, workdir, seeds, estimators, updates, records_to=_RECORDS_TO.value)
    write_tables(collect(workdir, seeds, estimators, updates), workdir, command, config)
    names = [setting_name(e, u) for e in estimators for u in updates]
    common.plot_learning_curves(
        common.learning_curves(workdir, names, seeds),
        os.path.join(workdir, 'ablation_curves.png'),
        title=f'{config.dataset} / {config.model}: estimator x importance update',
    )
    with open(os.path.join(workdir, 'ablation.md')) as f:
        print(f.read(), end='')
    print(
        f'tables in {os.path.join(workdir, "ablation.md")} and ablation.csv; curves in '
        f'{os.path.join(workdir, "ablation_curves.png")}'
    )


if __name__ == '__main__':
    sys.argv = common.resolve_config_argument(sys.argv)
    app.run(main, flags_parser=common.parse_flags)
