r"""Methods compared on one config over several seeds: the paper's Table 2 layout, learning curves.

    python experiments/compare.py --config=default.py \
        --methods=spafl,fedavg,local,fedpm,heterofl,fedspa --seeds=1,2 --workdir=/tmp/compare_digits
    python experiments/compare.py --config=fmnist.py --config.rounds=100 --seeds=1 \
        --workdir=/tmp/compare_fmnist

Each (method, seed) is a plain `train.train_and_evaluate` run of the config with `method` and `seed`
set, in `<workdir>/<method>/seed<seed>`. A finished run of the same config (summary.json written) is
skipped and an unfinished one resumes from its checkpoint, so a killed comparison goes on where it
stopped when the same command is run again. Written to <workdir>: `comparison.md` and
`comparison.csv` (accuracy mean ± std over seeds, communication over the whole run in Gbit,
training FLOPs per client, density) and `learning_curves.png` (every method's accuracy by round,
and against the bits it has sent).

With --records_to=research/results/<study>, each run's compact record (config.json,
metrics.jsonl, summary.json) is copied to `research/results/<study>/<method>/seed<seed>` as the run
finishes, diverges or is stopped. With --records_only nothing runs: the tables and the figure are
rebuilt from those records, as committed under research/results/:

    python experiments/compare.py --records_only --workdir=research/results/compare_fmnist500 \
        --methods=spafl,fedavg,local,fedpm,heterofl,fedspa --seeds=1,2

Methods may have run with different settings (each at its own learning rate, say): the settings
that differ between the records are listed under the table.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import shlex
import sys
import time
from typing import Any
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # no install needed

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import ml_collections
import numpy as np

from experiments import common
from spafl_jax import configuration
from spafl_jax import files
from spafl_jax import methods
from spafl_jax import reporting
from spafl_jax import train
# pylint: enable=g-import-not-at-top,wrong-import-position

# Final-round summary fields reported as mean ± std over seeds.
SPREAD = ('accuracy', 'density', 'density_weighted')
CSV_COLUMNS = (
    'method',
    'seeds',
    'finished',
    'rounds',
    'accuracy_mean',
    'accuracy_std',
    'gbit_total',
    'gbit_up',
    'gbit_down',
    'flops_per_client',
    'density_mean',
    'density_std',
    'density_weighted_mean',
    'density_weighted_std',
)
FLOP_UNITS = (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6))

_CONFIG = common.define_config_flag(
    os.path.join(common.CONFIG_DIR, 'default.py'),
    'Config file (a bare name is looked '
    'up in spafl_jax/configs/); override fields with --config.FIELD=VALUE.',
)
_WORKDIR = flags.DEFINE_string(
    'workdir',
    None,
    'Directory of the comparison: one sub-directory '
    'per run, comparison.md / .csv and learning_curves.png.',
    required=True,
)
_METHODS = flags.DEFINE_list('methods', list(methods.METHODS), 'Methods to compare.')
_SEEDS = flags.DEFINE_list('seeds', ['1', '2'], 'Seeds of every method.')
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
    '<records_to>/<method>/seed<seed> as it finishes or stops, e.g. research/results/compare_fmnist500; '
    'then `compare.py --records_only --workdir=<records_to>` rebuilds the tables from them.',
)


def run_dir(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, method, f'seed{seed}')


def run_config(
    config: ml_collections.ConfigDict, method: str, seed: int
) -> ml_collections.ConfigDict:
    out = copy.deepcopy(config)
    out.method, out.seed = method, seed
    return out


def run_comparison(
    config: ml_collections.ConfigDict,
    workdir: str,
    method_names: Sequence[str],
    seeds: Sequence[int],
    log: Callable[[str], None] = print,
    records_to: str | None = None,
) -> None:
    """Runs every (method, seed) that is not finished yet; a diverged run is logged and left out.
    With `records_to`, each run's compact record is copied to the same place under it when the run
    finishes, diverges or stops (a run done before: straight away)."""
    for name in method_names:  # every setting is checked before the first (long) run starts
        configuration.validate(run_config(config, name, seeds[0]))
    jobs = [(name, seed) for name in method_names for seed in seeds]
    start = time.time()
    for i, (name, seed) in enumerate(jobs, 1):
        directory = run_dir(workdir, name, seed)
        prefix = f'[{i}/{len(jobs)}] method={name} seed={seed}'
        this_config = run_config(config, name, seed)
        keep = functools.partial(
            common.keep_record, directory, records_to and run_dir(records_to, name, seed), log
        )
        if common.finished_summary(directory, this_config) is not None:
            log(f'{prefix}: done before, skipped')
            keep()
            continue
        log(f'{prefix}: running in {directory}')  # an unfinished run resumes from its checkpoint
        run_start = time.time()
        try:
            summary = train.train_and_evaluate(this_config, directory)
        except train.NonFiniteError as e:
            # Divergence is a result too: that seed counts as NaN, the comparison goes on.
            log(f'{prefix}: diverged ({e})')
            continue
        finally:
            keep()  # also the record of a run stopped part-way, up to its last round
        log(
            f'{prefix}: accuracy {100 * summary["accuracy"]:.2f}% density '
            f'{100 * summary["density"]:.2f}% in {time.time() - run_start:.0f}s; '
            f'{time.time() - start:.0f}s so far'
        )


def collect(workdir: str, method_names: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """One row per method from the runs' summary.json files (a missing one counts as NaN).

    Communication and FLOPs are the final summary's cumulative totals (bits up and down over the
    whole run; FLOPs summed over the run and averaged over clients), averaged over seeds.
    """
    rows = []
    nan = float('nan')
    for name in method_names:
        summaries = [common.finished_record(run_dir(workdir, name, seed)) for seed in seeds]
        done = [s for s in summaries if s is not None]
        get = lambda field: [s[field] if s is not None else nan for s in summaries]
        row: dict[str, Any] = {
            'method': name,
            'seeds': ' '.join(map(str, seeds)),
            'finished': len(done),
            'rounds': done[0]['rounds'] if done else nan,
        }
        for field in SPREAD:
            row[f'{field}_mean'], row[f'{field}_std'] = common.mean_std(get(field))
        up, down = (float(np.mean(get(field))) for field in ('bits_up', 'bits_down'))
        row.update(
            gbit_up=up / 1e9,
            gbit_down=down / 1e9,
            gbit_total=(up + down) / 1e9,
            flops_per_client=float(np.mean(get('flops'))),
        )
        # The seeds that finished, while others have not: what the table shows until they do.
        row['finished_only'] = (
            collect_summaries(name, done, [s for s, x in zip(seeds, summaries) if x is not None])
            if 0 < len(done) < len(seeds)
            else None
        )
        rows.append(row)
    return rows


def collect_summaries(name: str, done: Sequence[dict], seeds: Sequence[int]) -> dict[str, Any]:
    """`collect`'s row for `name` over the finished summaries `done` alone (of `seeds`)."""
    row: dict[str, Any] = {'method': name, 'seeds': ' '.join(map(str, seeds))}
    for field in SPREAD:
        row[f'{field}_mean'], row[f'{field}_std'] = common.mean_std([s[field] for s in done])
    up, down = (float(np.mean([s[field] for s in done])) for field in ('bits_up', 'bits_down'))
    row.update(
        gbit_up=up / 1e9,
        gbit_down=down / 1e9,
        gbit_total=(up + down) / 1e9,
        flops_per_client=float(np.mean([s['flops'] for s in done])),
    )
    return row


def flop_unit(rows: Sequence[dict]) -> tuple[str, float]:
    """The unit that shows the largest per-client FLOPs of the table with at most 4 digits before
    the point."""
    values = [r['flops_per_client'] for r in rows]
    values += [r['finished_only']['flops_per_client'] for r in rows if r.get('finished_only')]
    largest = max((v for v in values if math.isfinite(v)), default=0.0)
    for unit, scale in FLOP_UNITS:
        if largest >= scale:
            return unit, scale
    return FLOP_UNITS[-1]


def write_tables(
    rows: Sequence[dict], workdir: str, command: str, config: ml_collections.ConfigDict
) -> None:
    """`comparison.csv` (fractions, Gbit and FLOPs at full precision) and `comparison.md`."""
    os.makedirs(workdir, exist_ok=True)
    common.write_csv(os.path.join(workdir, 'comparison.csv'), rows, CSV_COLUMNS)

    unit, scale = flop_unit(rows)
    seeds = rows[0]['seeds'] if rows else ''
    number = common.number_cell
    lines = [
        f'# Comparison: {config.dataset} / {config.model}, {config.rounds} rounds',
        '',
        f'Command: `{command}`',
        '',
        f'{common.setting_sentence(config)}; seeds {seeds}. Accuracy: final round, unweighted '
        "mean over clients of each client's accuracy on its own test split, mean ± sample std over seeds. "
        'Communication: bits sent over the whole run (up + down), 32-bit floats. FLOPs: '
        'training FLOPs per client over the whole run (3 x MACs x kept fraction per example and '
        'step). Density: mean over masked layers of the kept fraction (rows for SpaFL and '
        'HeteroFL, weights for FedPM and FedSpa), and kept masked weights / all masked weights.',
        '',
        f'| method | accuracy (%) | communication (Gbit) | up (Gbit) | down (Gbit) | '
        f'FLOPs per client ({unit}) | density (%) | density, weights (%) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for row in rows:
        name = row['method'] + common.unfinished_note(
            {seed: run_dir(workdir, row['method'], int(seed)) for seed in seeds.split()}
        )
        shown, only = row, ''
        if row.get('finished_only'):  # some seeds finished: their values, marked as theirs
            shown = row['finished_only']
            finished = shown['seeds'].split()
            only = f' (seed{"s" if len(finished) > 1 else ""} {shown["seeds"]})'

        lines.append(
            f'| {name} | {common.percent_cell(shown, "accuracy")}{only} | {number(shown["gbit_total"])} | '
            f'{number(shown["gbit_up"])} | {number(shown["gbit_down"])} | '
            f'{number(shown["flops_per_client"] / scale)} | {common.percent_cell(shown, "density")}{only} | '
            f'{common.percent_cell(shown, "density_weighted")}{only} |'
        )
    lines += by_round_table(workdir, [r['method'] for r in rows], seeds.split(), config.rounds)
    differences = {
        name: setting
        for name, setting in method_settings(
            workdir, [r['method'] for r in rows], seeds.split()
        ).items()
        if setting
    }
    if differences:
        lines += [
            '',
            "Settings that differ between the methods' runs (the header gives the first run's):",
            '',
        ]
        lines += [f'- {name}: {setting}' for name, setting in differences.items()]
    files.write_atomic(os.path.join(workdir, 'comparison.md'), '\n'.join(lines) + '\n')


def by_round_table(
    workdir: str, method_names: Sequence[str], seeds: Sequence[Any], rounds: int
) -> list[str]:
    """Markdown lines: each method's accuracy and density at a few rounds along the run, mean over
    the seeds whose record reached that round (unfinished runs count up to where they are)."""
    marks = [r for r in (10, 25, 50, 100, 200, 300, 400, 500, 1000, 1500) if r < rounds] + [rounds]
    accuracy = common.learning_curves(workdir, method_names, seeds)
    density = common.learning_curves(
        workdir, method_names, seeds, value=lambda record: record.get('density', float('nan'))
    )
    lines = [
        '',
        'Along the run: accuracy (%) / density, mean over the seeds whose record reached '
        'the round (the number of seeds in brackets where fewer than all).',
        '',
        '| method | ' + ' | '.join(f'round {r}' for r in marks) + ' |',
        '|---|' + '---|' * len(marks),
    ]
    for name in method_names:
        cells = []
        for r in marks:
            at = np.flatnonzero(accuracy[name][0] == r)
            if not len(at):
                cells.append('–')
                continue
            i = int(at[0])
            seen = len([s for s in seeds if _reached(workdir, name, s, r)])
            note = f' ({seen})' if seen < len(seeds) else ''
            cells.append(f'{100 * accuracy[name][1][i]:.1f} / {density[name][1][i]:.3f}{note}')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def _reached(workdir: str, name: str, seed: Any, round_index: int) -> bool:
    path = os.path.join(run_dir(workdir, name, int(seed)), reporting.METRICS_FILENAME)
    return os.path.isfile(path) and any(
        int(r['round']) == round_index and 'accuracy' in r for r in reporting.read_metrics(path)
    )


def method_settings(
    workdir: str, method_names: Sequence[str], seeds: Sequence[Any]
) -> dict[str, str]:
    """{method: the config fields where its runs' config.json differs from other methods'}."""
    configs = {}
    for name in method_names:
        for seed in seeds:
            config = common.read_record(run_dir(workdir, name, int(seed)), 'config.json')
            if config is not None:
                if name != 'spafl':  # what a baseline ignores is not a difference
                    config = {k: v for k, v in config.items() if k not in methods.SPAFL_ONLY_FIELDS}
                configs[name] = config
                break
    return common.differing_settings(configs)


def write_report(
    workdir: str,
    method_names: Sequence[str],
    seeds: Sequence[int],
    command: str,
    config: ml_collections.ConfigDict,
) -> list[dict]:
    """The table (md, csv) and learning_curves.png from the runs in `workdir`; returns the rows."""
    rows = collect(workdir, method_names, seeds)
    write_tables(rows, workdir, command, config)
    sent = common.learning_curves(
        workdir,
        method_names,
        seeds,
        value=lambda r: (r.get('bits_up', 0) + r.get('bits_down', 0)) / 1e9,
    )
    common.plot_learning_curves(
        common.learning_curves(workdir, method_names, seeds),
        os.path.join(workdir, 'learning_curves.png'),
        title=f'{config.dataset} / {config.model}',
        gbit=sent,
    )
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    seeds = common.parse_seeds(_SEEDS.value)
    unknown = [m for m in _METHODS.value if m not in methods.METHODS]
    if unknown or not _METHODS.value or not seeds:
        raise app.UsageError(
            f'--methods must be a non-empty list of {",".join(methods.METHODS)} '
            f'(got {",".join(_METHODS.value)}), --seeds a non-empty list.'
        )
    config, workdir = _CONFIG.value, _WORKDIR.value
    command = 'python experiments/compare.py ' + ' '.join(
        shlex.quote(a.replace(common.CONFIG_DIR + os.sep, '')) for a in sys.argv[1:]
    )
    if _RECORDS_ONLY.value:
        try:
            config = common.config_of_records(
                [run_dir(workdir, name, seed) for name in _METHODS.value for seed in seeds]
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
            run_comparison(config, workdir, _METHODS.value, seeds, records_to=_RECORDS_TO.value)
    write_report(workdir, _METHODS.value, seeds, command, config)
    with open(os.path.join(workdir, 'comparison.md')) as f:
        print(f.read(), end='')
    print(
        f'tables in {os.path.join(workdir, "comparison.md")} and comparison.csv; curves in '
        f'{os.path.join(workdir, "learning_curves.png")}'
    )


if __name__ == '__main__':
    sys.argv = common.resolve_config_argument(sys.argv)
    app.run(main, flags_parser=common.parse_flags)
