"""experiments/ablation.py on real digits: the table's rows, its numbers, and resuming."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # end-to-end: deselect with -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION = os.path.join(REPO, 'experiments', 'ablation.py')
# One estimator with the importance update on and off keeps the test short; the command's default is
# every estimator.
SETTINGS = [('long_tailed', 'all_after'), ('long_tailed', 'none')]
SEEDS = (1, 2)
TINY = ['--config=default.py', '--config.num_clients=4', '--config.clients_per_round=2',
        '--config.rounds=2', '--config.local_epochs=1', '--config.eval_every=2']


def _ablation(workdir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ABLATION, *TINY, '--seeds=1,2',
                           '--estimators=long_tailed', '--importance_updates=all_after,none',
                           f'--workdir={workdir}'],
                          capture_output=True, text=True, cwd=REPO, timeout=600, check=False)


def _summary(workdir, estimator, importance_update, seed):
    path = os.path.join(workdir, f'{estimator}__{importance_update}', f'seed{seed}', 'summary.json')
    with open(path) as f:
        return json.load(f)


def test_ablation_table_matches_its_runs_and_resumes(tmp_path):
    workdir = str(tmp_path / 'ablation')
    result = _ablation(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(': running in ') == len(SETTINGS) * len(SEEDS)
    assert '[4/4] estimator=long_tailed importance_update=none seed=2' in result.stdout

    with open(os.path.join(workdir, 'ablation.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['estimator'], r['importance_update']) for r in rows] == SETTINGS
    with open(os.path.join(workdir, 'ablation.md')) as f:
        table = f.read()
    assert 'Command: `python experiments/ablation.py --config=default.py' in table
    for row in rows:
        assert row['seeds'] == '1 2'
        for field in ('accuracy', 'density', 'density_weighted'):
            runs = [_summary(workdir, row['estimator'], row['importance_update'], s)[field]
                    for s in SEEDS]
            assert float(row[f'{field}_mean']) == np.mean(runs), (row, field)
            assert float(row[f'{field}_std']) == np.std(runs, ddof=1), (row, field)
        mean, std = float(row['accuracy_mean']), float(row['accuracy_std'])
        assert (f'| `{row["estimator"]}` | `{row["importance_update"]}` | '
                f'{100 * mean:.2f} ± {100 * std:.2f} |') in table
    # Each sub-run ran with its own setting and seed, and `none` sends no delta down.
    for estimator, importance_update in SETTINGS:
        for seed in SEEDS:
            with open(os.path.join(workdir, f'{estimator}__{importance_update}', f'seed{seed}',
                                   'config.json')) as f:
                config = json.load(f)
            assert (config['estimator'], config['importance_update'], config['seed'],
                    config['rounds']) == (estimator, importance_update, seed, 2)
    on, off = (_summary(workdir, 'long_tailed', u, 1) for u in ('all_after', 'none'))
    assert on['bits_down'] > off['bits_down']

    # A killed ablation: one run finished, one left half-written. Only the unfinished one reruns.
    unfinished = os.path.join(workdir, 'long_tailed__none', 'seed2')
    os.remove(os.path.join(unfinished, 'summary.json'))
    finished_before = _summary(workdir, 'long_tailed', 'all_after', 1)
    result = _ablation(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('done before, skipped') == len(SETTINGS) * len(SEEDS) - 1
    assert result.stdout.count(': running in ') == 1
    assert 'estimator=long_tailed importance_update=none seed=2: running' in result.stdout
    assert _summary(workdir, 'long_tailed', 'all_after', 1) == finished_before
